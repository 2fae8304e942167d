# ruff: noqa: ANN001, ANN202  (Numba infers the types: annotations would not be read)
"""The Numba loops of :mod:`posepriors.kinematics`' CPU fast path (imported only where Numba is installed).

Rodrigues' formula, the kinematic chain and, backward, their vector-Jacobian product, per pose in registers and
float64: a few microseconds per pose instead of the hundred-odd small tensor ops (and as many autograd nodes) of the
tensor path, which a fitting step of one pose or a few hundred pays at every step. Module-level functions, so that
``cache=True`` keeps their machine code on disk between processes; each loop over the poses comes twice, in
parallel threads and in the calling thread (a few poses, where starting threads would cost more than the work).

The formulas: ``R = I + A K + B K^2`` with ``K = [a]_x``, ``s = |a|^2``, ``A = sin(t)/t``, ``B = (1 - cos t)/t^2``
(Taylor series below an angle of 1e-3, as :func:`posepriors.rotations.axis_angle_to_matrix`). For ``M = dL/dR``:
``dL/da = A w + B ((M + M^T) a - 2 tr(M) a) + 2 a (A' <M, K> + B' <M, K^2>)`` with ``w`` the axial vector of
``M - M^T`` (``<M, K> = w . a``), ``<M, K^2> = a^T M a - s tr(M)``, ``A' = dA/ds = (cos t - A) / (2 s)`` and
``B' = dB/ds = (A - 2 B) / (2 s)``.
"""

from __future__ import annotations

import math

from numba import prange

from posepriors.flows._numba_kernels import jit, scalar, serial  # the loops' compile options, shared
from posepriors.rotations import _SMALL_ANGLE as SMALL  # the Taylor series below this angle

__all__ = ["chain_backward", "chain_backward_serial", "chain_forward", "chain_forward_serial"]


@scalar
def coefficients(s):
    """A, B and their derivatives w.r.t. s = t^2 (module docstring)."""
    if s < SMALL * SMALL:
        a, b = 1.0 - s / 6.0 + s * s / 120.0, 0.5 - s / 24.0 + s * s / 720.0
        return a, b, -1.0 / 6.0 + s / 60.0, -1.0 / 24.0 + s / 360.0
    t = math.sqrt(s)
    a = math.sin(t) / t
    half = math.sin(0.5 * t) / (0.5 * t)
    b = 0.5 * half * half
    return a, b, (math.cos(t) - a) / (2.0 * s), (a - 2.0 * b) / (2.0 * s)


@scalar
def rodrigues(aa, r, j, out):
    """out[r, j] = the rotation matrix of the axis-angle aa[r, j]."""
    x, y, z = aa[r, j, 0], aa[r, j, 1], aa[r, j, 2]
    s = x * x + y * y + z * z
    a, b, _, _ = coefficients(s)
    # K^2 = a a^T - s I
    out[r, j, 0, 0] = 1.0 + b * (x * x - s)
    out[r, j, 1, 1] = 1.0 + b * (y * y - s)
    out[r, j, 2, 2] = 1.0 + b * (z * z - s)
    out[r, j, 0, 1] = -a * z + b * x * y
    out[r, j, 1, 0] = a * z + b * x * y
    out[r, j, 0, 2] = a * y + b * x * z
    out[r, j, 2, 0] = -a * y + b * x * z
    out[r, j, 1, 2] = -a * x + b * y * z
    out[r, j, 2, 1] = a * x + b * y * z


@scalar
def forward_pose(aa, parents, offsets, rot, world, pos, r):
    """Pose r: rot[r] (J, 3, 3), the world rotations world[r] and the positions pos[r] (J, 3), roots at 0."""
    for j in range(aa.shape[1]):
        rodrigues(aa, r, j, rot)
        p = parents[j]
        if p < 0:
            for u in range(3):
                pos[r, j, u] = 0.0
                for v in range(3):
                    world[r, j, u, v] = rot[r, j, u, v]
            continue
        for u in range(3):
            acc = pos[r, p, u]
            for v in range(3):
                acc += world[r, p, u, v] * offsets[j, v]
                m = 0.0
                for k in range(3):
                    m += world[r, p, u, k] * rot[r, j, k, v]
                world[r, j, u, v] = m
            pos[r, j, u] = acc


@jit
def chain_forward(aa, parents, offsets, rot, world, pos):
    for r in prange(aa.shape[0]):
        forward_pose(aa, parents, offsets, rot, world, pos, r)


@serial
def chain_forward_serial(aa, parents, offsets, rot, world, pos):
    for r in range(aa.shape[0]):
        forward_pose(aa, parents, offsets, rot, world, pos, r)


@scalar
def rodrigues_vjp(aa, r, j, m, out):
    """out[r, j] = dL/da of the axis-angle aa[r, j] given m[r, j] = dL/dR (module docstring)."""
    x, y, z = aa[r, j, 0], aa[r, j, 1], aa[r, j, 2]
    s = x * x + y * y + z * z
    a, b, da, db = coefficients(s)
    m00, m01, m02 = m[r, j, 0, 0], m[r, j, 0, 1], m[r, j, 0, 2]
    m10, m11, m12 = m[r, j, 1, 0], m[r, j, 1, 1], m[r, j, 1, 2]
    m20, m21, m22 = m[r, j, 2, 0], m[r, j, 2, 1], m[r, j, 2, 2]
    wx, wy, wz = m21 - m12, m02 - m20, m10 - m01
    tr = m00 + m11 + m22
    sx = 2.0 * m00 * x + (m01 + m10) * y + (m02 + m20) * z  # (M + M^T) a
    sy = (m01 + m10) * x + 2.0 * m11 * y + (m12 + m21) * z
    sz = (m02 + m20) * x + (m12 + m21) * y + 2.0 * m22 * z
    k1 = wx * x + wy * y + wz * z  # <M, K>
    k2 = 0.5 * (sx * x + sy * y + sz * z) - s * tr  # <M, K^2> = a^T M a - s tr(M)
    c = 2.0 * (da * k1 + db * k2)
    out[r, j, 0] = a * wx + b * (sx - 2.0 * tr * x) + c * x
    out[r, j, 1] = a * wy + b * (sy - 2.0 * tr * y) + c * y
    out[r, j, 2] = a * wz + b * (sz - 2.0 * tr * z) + c * z


@scalar
def backward_pose(aa, parents, offsets, rot, world, grad_pos, grad_world, grad_rot, grad_aa, r):
    """Pose r's vector-Jacobian product: grad_aa[r] (J, 3) from grad_pos[r] (J, 3), which it accumulates into (as it
    does the world rotations' gradients into grad_world[r]; grad_rot[r] is scratch). Children after parents, so the
    joints run backwards."""
    J = aa.shape[1]
    for j in range(J):
        for u in range(3):
            for v in range(3):
                grad_world[r, j, u, v] = 0.0
    for j in range(J - 1, -1, -1):
        p = parents[j]
        if p < 0:  # the root's position is the origin: only its rotation reaches the others
            for u in range(3):
                for v in range(3):
                    grad_rot[r, j, u, v] = grad_world[r, j, u, v]
        else:
            for u in range(3):
                g = grad_pos[r, j, u]
                grad_pos[r, p, u] += g
                for v in range(3):
                    # pos_j = pos_p + world_p offsets_j and world_j = world_p rot_j
                    acc = g * offsets[j, v]
                    gr = 0.0
                    for k in range(3):
                        acc += grad_world[r, j, u, k] * rot[r, j, v, k]
                        gr += world[r, p, k, u] * grad_world[r, j, k, v]
                    grad_world[r, p, u, v] += acc
                    grad_rot[r, j, u, v] = gr
        rodrigues_vjp(aa, r, j, grad_rot, grad_aa)


@jit
def chain_backward(aa, parents, offsets, rot, world, grad_pos, grad_world, grad_rot, grad_aa):
    for r in prange(aa.shape[0]):
        backward_pose(aa, parents, offsets, rot, world, grad_pos, grad_world, grad_rot, grad_aa, r)


@serial
def chain_backward_serial(aa, parents, offsets, rot, world, grad_pos, grad_world, grad_rot, grad_aa):
    for r in range(aa.shape[0]):
        backward_pose(aa, parents, offsets, rot, world, grad_pos, grad_world, grad_rot, grad_aa, r)
