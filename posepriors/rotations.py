"""Rotation conversions and distances (any leading batch dims, float32/float64, finite gradients at 0 and pi).

Conventions: radians; matrices act on column vectors; quaternions are (w, x, y, z); the 6D representation
(Zhou et al. 2019) is the first two columns of R, ``(R[..., :, 0], R[..., :, 1])``; canonical axis-angle has
angle in [0, pi].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "LOG_SO3_VOLUME",
    "axis_angle_geodesic",
    "axis_angle_to_matrix",
    "axis_angle_to_quaternion",
    "axis_angle_to_rotation_6d",
    "exp_map_log_abs_det",
    "geodesic_distance",
    "matrix_to_axis_angle",
    "matrix_to_quaternion",
    "matrix_to_rotation_6d",
    "mirror_axis_angle",
    "quaternion_to_axis_angle",
    "quaternion_to_matrix",
    "random_rotation_axis_angle",
    "rotation_6d_to_axis_angle",
    "rotation_6d_to_matrix",
    "wrap_axis_angle",
]

LOG_SO3_VOLUME = math.log(8 * math.pi**2)
"""log of the volume of SO(3) under the Haar measure in exponential coordinates, integral of 2(1-cos t)/t^2."""

_SMALL = 1e-4  # below this angle the Taylor branches are exact to float64 precision in practice


def _check(x: Tensor, tail: tuple[int, ...], what: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor for {what}, got {type(x).__name__}")
    if x.shape[x.dim() - len(tail) :] != tail or x.dim() < len(tail):
        shape = ", ".join(str(t) for t in tail)
        raise ValueError(f"expected {what} of shape (*, {shape}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point {what} tensor, got dtype {x.dtype}")


def _skew(v: Tensor) -> Tensor:
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*v.shape[:-1], 3, 3)


def axis_angle_to_matrix(aa: Tensor) -> Tensor:
    """Rodrigues' formula.

    Args:
        aa: Axis-angle vectors, shape (*, 3).

    Returns:
        Rotation matrices, shape (*, 3, 3).
    """
    _check(aa, (3,), "axis-angle")
    theta2 = (aa * aa).sum(-1, keepdim=True)
    small = theta2 < _SMALL**2
    # Evaluate the exact coefficients on a safe angle so the unused branch of torch.where has finite gradients.
    t2 = torch.where(small, torch.ones_like(theta2), theta2)
    t = t2.sqrt()
    a = torch.where(small, 1 - theta2 / 6 + theta2**2 / 120, torch.sin(t) / t)
    b = torch.where(small, 0.5 - theta2 / 24 + theta2**2 / 720, (1 - torch.cos(t)) / t2)
    K = _skew(aa)
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand(K.shape)
    return eye + a[..., None] * K + b[..., None] * (K @ K)


def axis_angle_to_quaternion(aa: Tensor) -> Tensor:
    """Axis-angle to unit quaternions (w, x, y, z) with w >= 0 for canonical inputs.

    Args:
        aa: Axis-angle vectors, shape (*, 3).

    Returns:
        Quaternions, shape (*, 4).
    """
    _check(aa, (3,), "axis-angle")
    theta2 = (aa * aa).sum(-1, keepdim=True)
    small = theta2 < _SMALL**2
    t = torch.where(small, torch.ones_like(theta2), theta2).sqrt()  # safe angle, see axis_angle_to_matrix
    half_sinc = torch.where(small, 0.5 - theta2 / 48, torch.sin(t / 2) / t)
    w = torch.where(small, 1 - theta2 / 8, torch.cos(t / 2))
    return torch.cat([w, aa * half_sinc], dim=-1)


def quaternion_to_axis_angle(q: Tensor) -> Tensor:
    """Quaternions (w, x, y, z), not necessarily unit, to canonical axis-angle (q and -q give the same result).

    Args:
        q: Quaternions, shape (*, 4).

    Returns:
        Axis-angle vectors with angle in [0, pi], shape (*, 3).
    """
    _check(q, (4,), "quaternion")
    q = q * torch.where(q[..., :1] < 0, -1.0, 1.0).to(q.dtype)  # w >= 0 gives angle <= pi
    w, v = q[..., :1], q[..., 1:]
    s2 = (v * v).sum(-1, keepdim=True)
    small = s2 < (_SMALL * 1e-2) ** 2
    s = torch.where(small, torch.ones_like(s2), s2).sqrt()  # safe norm, see axis_angle_to_matrix
    angle = 2 * torch.atan2(s, w)
    # small |v|: angle ~ 2|v|/w, so the factor angle/|v| tends to 2/w
    factor = torch.where(small, 2 / w.clamp_min(torch.finfo(q.dtype).tiny) * (1 - s2 / (3 * w * w + 1e-30)), angle / s)
    return v * factor


def quaternion_to_matrix(q: Tensor) -> Tensor:
    """Quaternions (w, x, y, z), normalised first, to rotation matrices.

    Args:
        q: Quaternions, shape (*, 4).

    Returns:
        Rotation matrices, shape (*, 3, 3).
    """
    _check(q, (4,), "quaternion")
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    m = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(m, dim=-1).reshape(*q.shape[:-1], 3, 3)


def matrix_to_quaternion(R: Tensor) -> Tensor:
    """Rotation matrices to unit quaternions (w, x, y, z) with w >= 0.

    Picks, per matrix, the best-conditioned of the four standard formulas (largest of w, x, y, z).

    Args:
        R: Rotation matrices, shape (*, 3, 3).

    Returns:
        Quaternions, shape (*, 4).
    """
    _check(R, (3, 3), "rotation matrix")
    m = R.reshape(*R.shape[:-2], 9)
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.unbind(-1)
    # 4*q_i^2 for each component; each row of `cands` is a full quaternion scaled by 4*q_i
    sq = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    cands = torch.stack(
        [
            torch.stack([sq[..., 0], m21 - m12, m02 - m20, m10 - m01], -1),
            torch.stack([m21 - m12, sq[..., 1], m10 + m01, m02 + m20], -1),
            torch.stack([m02 - m20, m10 + m01, sq[..., 2], m12 + m21], -1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, sq[..., 3]], -1),
        ],
        -2,
    )
    # the chosen candidate has a denominator 2*sqrt(sq_i) >= 1, so no division by ~0 reaches the gradient
    denom = 2 * sq.clamp_min(0.1).sqrt()
    cands = cands / denom[..., None]
    best = sq.argmax(-1, keepdim=True)
    q = torch.gather(cands, -2, best[..., None].expand(*best.shape, 4)).squeeze(-2)
    q = q * torch.where(q[..., :1] < 0, -1.0, 1.0).to(q.dtype)
    return q / q.norm(dim=-1, keepdim=True)


def matrix_to_axis_angle(R: Tensor) -> Tensor:
    """Rotation matrices to canonical axis-angle (through quaternions: accurate near 0 and near pi).

    Args:
        R: Rotation matrices, shape (*, 3, 3).

    Returns:
        Axis-angle vectors with angle in [0, pi], shape (*, 3).
    """
    return quaternion_to_axis_angle(matrix_to_quaternion(R))


def matrix_to_rotation_6d(R: Tensor) -> Tensor:
    """The first two columns of R, concatenated.

    Args:
        R: Rotation matrices, shape (*, 3, 3).

    Returns:
        6D representations, shape (*, 6).
    """
    _check(R, (3, 3), "rotation matrix")
    return torch.cat([R[..., :, 0], R[..., :, 1]], dim=-1)


def rotation_6d_to_matrix(d6: Tensor) -> Tensor:
    """Gram-Schmidt on the two 3-vectors of the 6D representation.

    Args:
        d6: 6D representations, shape (*, 6).

    Returns:
        Rotation matrices, shape (*, 3, 3).
    """
    _check(d6, (6,), "6D rotation")
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = torch.nn.functional.normalize(a1, dim=-1)
    b2 = torch.nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def axis_angle_to_rotation_6d(aa: Tensor) -> Tensor:
    """Axis-angle (*, 3) to 6D (*, 6)."""
    return matrix_to_rotation_6d(axis_angle_to_matrix(aa))


def rotation_6d_to_axis_angle(d6: Tensor) -> Tensor:
    """6D (*, 6) to canonical axis-angle (*, 3)."""
    return matrix_to_axis_angle(rotation_6d_to_matrix(d6))


def wrap_axis_angle(aa: Tensor) -> Tensor:
    """The equivalent axis-angle with angle in [0, pi] (e.g. an angle of 3.5 rad becomes 2 pi - 3.5 about -axis).

    Args:
        aa: Axis-angle vectors with any angle, shape (*, 3).

    Returns:
        Canonical axis-angle vectors, shape (*, 3).
    """
    _check(aa, (3,), "axis-angle")
    theta = aa.norm(dim=-1, keepdim=True)
    wrapped = torch.remainder(theta + math.pi, 2 * math.pi) - math.pi  # in [-pi, pi)
    safe = torch.where(theta > 0, theta, torch.ones_like(theta))
    out = aa * (wrapped / safe)
    return torch.where(theta > math.pi, out, aa)


def geodesic_distance(R1: Tensor, R2: Tensor) -> Tensor:
    """Angle of the relative rotation R1^T R2, in [0, pi] (stable at both ends: via quaternions and atan2).

    Args:
        R1: Rotation matrices, shape (*, 3, 3).
        R2: Rotation matrices, shape (*, 3, 3).

    Returns:
        Angles in radians, shape (*,).
    """
    _check(R1, (3, 3), "rotation matrix")
    _check(R2, (3, 3), "rotation matrix")
    return matrix_to_axis_angle(R1.transpose(-1, -2) @ R2).norm(dim=-1).clamp_max(math.pi)


def axis_angle_geodesic(a1: Tensor, a2: Tensor) -> Tensor:
    """Geodesic distance between rotations given as axis-angle.

    Args:
        a1: Axis-angle vectors, shape (*, 3).
        a2: Axis-angle vectors, shape (*, 3).

    Returns:
        Angles in radians, shape (*,).
    """
    q1, q2 = axis_angle_to_quaternion(a1), axis_angle_to_quaternion(a2)
    dot = (q1 * q2).sum(-1).abs()
    # |q1 x q2| via the norm of the relative quaternion's vector part, robust where dot ~ 1
    w1, v1, w2, v2 = q1[..., :1], q1[..., 1:], q2[..., :1], q2[..., 1:]
    vec = w1 * v2 - w2 * v1 - torch.cross(v1, v2, dim=-1)
    sin_half = vec.norm(dim=-1)
    return 2 * torch.atan2(sin_half, dot)


def mirror_axis_angle(aa: Tensor) -> Tensor:
    """Mirror rotations across the sagittal plane (left <-> right hand): (x, y, z) -> (x, -y, -z).

    Args:
        aa: Axis-angle vectors, shape (*, 3).

    Returns:
        Mirrored axis-angle vectors, shape (*, 3).
    """
    _check(aa, (3,), "axis-angle")
    return aa * aa.new_tensor([1.0, -1.0, -1.0])


def exp_map_log_abs_det(aa: Tensor) -> Tensor:
    """log |det| of the exponential map's Jacobian: the Haar measure's density in exponential coordinates.

    ``log(2 (1 - cos t) / t^2) = 2 log(sinc(t / 2))`` with ``t = |aa|``; 0 at t = 0, finite for t < 2 pi. A density
    ``p_aa`` on axis-angle vectors in the pi-ball becomes a density on SO(3) w.r.t. the unnormalised Haar measure
    (total volume ``8 pi^2``, see :data:`LOG_SO3_VOLUME`) as ``log p_so3 = log p_aa - exp_map_log_abs_det(aa)``.

    Args:
        aa: Axis-angle vectors, shape (*, 3).

    Returns:
        Log-determinants, shape (*,).
    """
    _check(aa, (3,), "axis-angle")
    theta2 = (aa * aa).sum(-1)
    small = theta2 < 1e-4
    t = torch.where(small, torch.ones_like(theta2), theta2).sqrt()  # safe angle, see axis_angle_to_matrix
    exact = torch.log(2 * (1 - torch.cos(t)) / (t * t))
    # Taylor: log(1 - t^2/12 + t^4/360) ~ -t^2/12 - t^4/1440
    taylor = -theta2 / 12 - theta2 * theta2 / 1440
    return torch.where(small, taylor, exact)


def random_rotation_axis_angle(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniform (Haar) random rotations as canonical axis-angle.

    Args:
        shape: Batch shape.
        generator: Optional generator.
        dtype: Floating dtype.
        device: Device of the result.

    Returns:
        Axis-angle vectors, shape (*shape, 3).
    """
    q = torch.randn((*shape, 4), generator=generator, dtype=dtype)
    return quaternion_to_axis_angle(q).to(device) if device is not None else quaternion_to_axis_angle(q)
