"""Rotation conversions, distances and the exponential map's volume factor.

Conventions, stated once for the whole module:

- Angles are in radians; rotation matrices act on column vectors (``x' = R @ x``).
- Axis-angle vectors ``aa = angle * axis`` have shape (*, 3); *canonical* axis-angle has angle in [0, pi].
  Functions returning axis-angle return canonical vectors; at exactly pi both ``axis`` and ``-axis`` are canonical.
- Quaternions are ordered (w, x, y, z), shape (*, 4); functions returning quaternions return unit ones with w >= 0.
- The 6D representation (Zhou et al. 2019) is the first two columns of R concatenated,
  ``(R[..., :, 0], R[..., :, 1])``, shape (*, 6).

Every function accepts any leading batch dimensions (including none and empty ones), float32 and float64, on any
device, and returns finite values and finite gradients at angle 0 and near pi. Inputs are checked by shape and
dtype only (no data-dependent checks, so they are cheap in hot paths): a wrong trailing shape raises ``ValueError``,
a non-floating tensor raises ``TypeError``.
"""

from __future__ import annotations

import math
import operator

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

LOG_SO3_VOLUME: float = math.log(8 * math.pi**2)
"""log(8 pi^2), the log-volume of SO(3) under the Haar measure normalised to agree with Lebesgue measure on
axis-angle vectors at the identity: ``integral over |aa| <= pi of exp(exp_map_log_abs_det(aa)) d^3aa = 8 pi^2``.
The uniform distribution on SO(3) has log-density ``-LOG_SO3_VOLUME`` w.r.t. this measure."""

# Below these angles the Taylor series replace the closed forms: the truncation error is far below float64
# precision there, and the closed forms (ratios with ~0 denominators) would lose accuracy or their gradients.
_SMALL_ANGLE = 1e-3
_SMALL_ANGLE_LOG_DET = 0.1


def _check(x: Tensor, tail: tuple[int, ...], what: str) -> None:
    """Raise unless ``x`` is a floating tensor of shape (*, *tail)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected {what} as a torch.Tensor, got {type(x).__name__}")
    if x.dim() < len(tail) or tuple(x.shape[x.dim() - len(tail) :]) != tail:
        raise ValueError(f"expected {what} of shape (*, {', '.join(map(str, tail))}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected {what} with a floating-point dtype, got {x.dtype}")


def _check_pair(x1: Tensor, x2: Tensor, tail: int, what: str) -> None:
    """Raise unless two checked inputs share a dtype and device and their batch shapes (all but the last ``tail``
    dims) broadcast."""
    if x1.dtype != x2.dtype or x1.device != x2.device:
        raise TypeError(
            f"expected two {what} of one dtype on one device, got {x1.dtype} on {x1.device} and {x2.dtype} on "
            f"{x2.device}"
        )
    try:
        torch.broadcast_shapes(x1.shape[: x1.dim() - tail], x2.shape[: x2.dim() - tail])
    except RuntimeError:
        raise ValueError(
            f"expected {what} whose batch shapes broadcast, got {tuple(x1.shape)} and {tuple(x2.shape)}"
        ) from None


def _safe_sqrt(x2: Tensor, small: Tensor) -> Tensor:
    """sqrt(x2) where ``small`` is False and 1 where it is True."""
    # sqrt has an infinite derivative at 0: substituting 1 keeps the unused torch.where branch's gradient finite
    return torch.where(small, torch.ones_like(x2), x2).sqrt()


def _rodrigues_columns(aa: Tensor, columns: int) -> list[Tensor]:
    """The first ``columns`` columns of the rotation matrix of ``aa`` (*, 3), entry by entry (column-major, each
    (*,)), by Rodrigues' formula ``R = I + a K + b K^2`` with ``K = [aa]_x``, ``a = sin(t)/t`` and
    ``b = (1 - cos t)/t^2`` (Taylor series near angle 0). ``K^2 = aa aa^T - t^2 I`` is written out entry by entry
    (off the diagonal ``b x y``, on it ``-b (y^2 + z^2)``): element-wise ops only, no batched 3x3 product."""
    x, y, z = aa.movedim(-1, 0).contiguous()  # each (*,), contiguous: the ops below read it at stride 1
    xx, yy, zz = x.square(), y.square(), z.square()
    theta2 = xx + yy + zz
    small = theta2 < _SMALL_ANGLE**2
    t = _safe_sqrt(theta2, small)
    half_sinc = torch.sin(t / 2) / (t / 2)
    # 1 - cos t = 2 sin^2(t/2) avoids cancellation in float32
    a = torch.where(small, 1 - theta2 / 6 + theta2.square() / 120, torch.sin(t) / t)
    b = torch.where(small, 0.5 - theta2 / 24 + theta2.square() / 720, 0.5 * half_sinc.square())
    ax, ay, az = a * x, a * y, a * z
    bx, by = b * x, b * y
    out = [1 - b * (yy + zz), az + bx * y, bx * z - ay]  # column 0
    if columns > 1:
        out += [bx * y - az, 1 - b * (xx + zz), ax + by * z]
    if columns > 2:
        out += [ay + bx * z, by * z - ax, 1 - b * (xx + yy)]
    return out


def axis_angle_to_matrix(aa: Tensor) -> Tensor:
    """Axis-angle to rotation matrices (Rodrigues' formula, Taylor series near angle 0).

    Args:
        aa: Axis-angle vectors (any angle), shape (*, 3).

    Returns:
        Rotation matrices, shape (*, 3, 3).
    """
    _check(aa, (3,), "axis-angle")
    c = _rodrigues_columns(aa, 3)
    return torch.stack([c[0], c[3], c[6], c[1], c[4], c[7], c[2], c[5], c[8]], dim=-1).unflatten(-1, (3, 3))


def axis_angle_to_quaternion(aa: Tensor) -> Tensor:
    """Axis-angle to unit quaternions (w, x, y, z); w >= 0 when the input is canonical.

    Args:
        aa: Axis-angle vectors (any angle), shape (*, 3).

    Returns:
        Unit quaternions, shape (*, 4).
    """
    _check(aa, (3,), "axis-angle")
    theta2 = aa.square().sum(-1, keepdim=True)
    small = theta2 < _SMALL_ANGLE**2
    t = _safe_sqrt(theta2, small)
    w = torch.where(small, 1 - theta2 / 8 + theta2.square() / 384, torch.cos(t / 2))
    scale = torch.where(small, 0.5 - theta2 / 48 + theta2.square() / 3840, torch.sin(t / 2) / t)
    return torch.cat([w, aa * scale], dim=-1)


def quaternion_to_axis_angle(q: Tensor) -> Tensor:
    """Quaternions (w, x, y, z) to canonical axis-angle; ``q`` is normalised first and ``q``, ``-q`` agree.

    Args:
        q: Non-zero quaternions, not necessarily unit, shape (*, 4).

    Returns:
        Axis-angle vectors with angle in [0, pi], shape (*, 3).
    """
    _check(q, (4,), "quaternion")
    q = q / q.norm(dim=-1, keepdim=True)
    q = torch.where(q[..., :1] < 0, -q, q)  # w >= 0 <=> angle <= pi
    w, v = q[..., :1], q[..., 1:]
    s2 = v.square().sum(-1, keepdim=True)  # sin^2(angle / 2)
    small = s2 < _SMALL_ANGLE**2
    s = _safe_sqrt(s2, small)
    # angle / s = 2 atan2(s, w) / s; for a unit quaternion near w = 1 this is 2 asin(s) / s = 2 + s^2/3 + 3 s^4/20
    factor = torch.where(small, 2 + s2 / 3 + 0.15 * s2.square(), 2 * torch.atan2(s, w) / s)
    return v * factor


def quaternion_to_matrix(q: Tensor) -> Tensor:
    """Quaternions (w, x, y, z) to rotation matrices; ``q`` is normalised first.

    Args:
        q: Non-zero quaternions, not necessarily unit, shape (*, 4).

    Returns:
        Rotation matrices, shape (*, 3, 3).
    """
    _check(q, (4,), "quaternion")
    w, x, y, z = (q / q.norm(dim=-1, keepdim=True)).unbind(-1)
    m = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(m, dim=-1).unflatten(-1, (3, 3))


def matrix_to_quaternion(R: Tensor) -> Tensor:
    """Rotation matrices to unit quaternions (w, x, y, z) with w >= 0.

    Each of w, x, y, z gives a formula for the whole quaternion divided by that component; per matrix the
    formula of the largest component is used (its divisor is >= 1/2), which is accurate at every angle.

    Args:
        R: Rotation matrices, shape (*, 3, 3).

    Returns:
        Unit quaternions, shape (*, 4).
    """
    _check(R, (3, 3), "rotation matrix")
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = R.flatten(-2).unbind(-1)
    # 4 w^2, 4 x^2, 4 y^2, 4 z^2
    sq = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    # row i is 4 q_i * (w, x, y, z)
    rows = torch.stack(
        [
            torch.stack([sq[..., 0], m21 - m12, m02 - m20, m10 - m01], -1),
            torch.stack([m21 - m12, sq[..., 1], m10 + m01, m02 + m20], -1),
            torch.stack([m02 - m20, m10 + m01, sq[..., 2], m12 + m21], -1),
            torch.stack([m10 - m01, m02 + m20, m12 + m21, sq[..., 3]], -1),
        ],
        -2,
    )
    # The chosen row has sq >= 1 (the four sum to 4); clamping keeps the unchosen rows' gradients finite.
    rows = rows / (2 * sq.clamp_min(0.1).sqrt())[..., None]
    best = sq.argmax(-1, keepdim=True)[..., None].expand(*sq.shape[:-1], 1, 4)
    q = rows.gather(-2, best).squeeze(-2)
    q = torch.where(q[..., :1] < 0, -q, q)
    return q / q.norm(dim=-1, keepdim=True)  # exact unit norm also for slightly non-orthogonal R


def matrix_to_axis_angle(R: Tensor) -> Tensor:
    """Rotation matrices to canonical axis-angle, through quaternions (accurate near 0 and at pi).

    Args:
        R: Rotation matrices, shape (*, 3, 3).

    Returns:
        Axis-angle vectors with angle in [0, pi], shape (*, 3).
    """
    return quaternion_to_axis_angle(matrix_to_quaternion(R))


def matrix_to_rotation_6d(R: Tensor) -> Tensor:
    """Rotation matrices to the 6D representation: the first two columns, concatenated.

    Args:
        R: Rotation matrices, shape (*, 3, 3).

    Returns:
        6D representations ``(R[..., :, 0], R[..., :, 1])``, shape (*, 6).
    """
    _check(R, (3, 3), "rotation matrix")
    return torch.cat([R[..., :, 0], R[..., :, 1]], dim=-1)


def rotation_6d_to_matrix(d6: Tensor) -> Tensor:
    """6D representations to rotation matrices by Gram-Schmidt (any two non-parallel 3-vectors are valid).

    Args:
        d6: 6D representations, shape (*, 6).

    Returns:
        Rotation matrices whose first two columns span the same half-plane as the inputs, shape (*, 3, 3).
    """
    _check(d6, (6,), "6D rotation")
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = torch.nn.functional.normalize(a1, dim=-1)
    b2 = torch.nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def axis_angle_to_rotation_6d(aa: Tensor) -> Tensor:
    """Axis-angle to the 6D representation.

    Args:
        aa: Axis-angle vectors (any angle), shape (*, 3).

    Returns:
        6D representations, shape (*, 6).
    """
    _check(aa, (3,), "axis-angle")
    return torch.stack(_rodrigues_columns(aa, 2), dim=-1)  # the two columns alone


def rotation_6d_to_axis_angle(d6: Tensor) -> Tensor:
    """6D representation to canonical axis-angle.

    Args:
        d6: 6D representations, shape (*, 6).

    Returns:
        Axis-angle vectors with angle in [0, pi], shape (*, 3).
    """
    return matrix_to_axis_angle(rotation_6d_to_matrix(d6))


def wrap_axis_angle(aa: Tensor) -> Tensor:
    """The equivalent canonical axis-angle: angles above pi become ``angle - 2 pi k`` in [-pi, pi), i.e. the
    angle ``|angle - 2 pi k|`` about the opposite axis when negative (3.5 rad becomes 2 pi - 3.5 about -axis).

    Vectors with angle <= pi (up to a few ulps) are returned unchanged, so wrapping is idempotent.

    Args:
        aa: Axis-angle vectors with any angle, shape (*, 3).

    Returns:
        Axis-angle vectors with angle in [0, pi] describing the same rotations, shape (*, 3).
    """
    _check(aa, (3,), "axis-angle")
    theta2 = aa.square().sum(-1, keepdim=True)
    # a few ulps of slack: float32(pi) > pi, and the result must be a fixed point (wrap(wrap(x)) == wrap(x))
    inside = theta2 <= math.pi**2 * (1 + 8 * torch.finfo(aa.dtype).eps)
    theta = _safe_sqrt(theta2, inside)  # only used outside the pi-ball, where it is > pi
    wrapped = torch.remainder(theta + math.pi, 2 * math.pi) - math.pi  # in [-pi, pi)
    return torch.where(inside, aa, aa * (wrapped / theta))


def geodesic_distance(R1: Tensor, R2: Tensor) -> Tensor:
    """Angle of the relative rotation ``R1^T R2``, in [0, pi].

    Computed as ``atan2(|R - R^T| / 2, (tr R - 1) / 2) = atan2(sin t, cos t)``, which, unlike ``acos`` of the trace,
    is accurate and has finite gradients near 0 and near pi.

    Args:
        R1: Rotation matrices, shape (*, 3, 3).
        R2: Rotation matrices, shape broadcastable with ``R1``, (*, 3, 3).

    Returns:
        Angles in radians, shape (*,).
    """
    _check(R1, (3, 3), "rotation matrix")
    _check(R2, (3, 3), "rotation matrix")
    _check_pair(R1, R2, 2, "rotation matrices")
    M = R1.transpose(-1, -2) @ R2
    skew = torch.stack([M[..., 2, 1] - M[..., 1, 2], M[..., 0, 2] - M[..., 2, 0], M[..., 1, 0] - M[..., 0, 1]], -1)
    s2 = skew.square().sum(-1)  # (2 sin t)^2
    same = s2 == 0
    # the distance has a kink where R1 == R2: substituting there keeps the gradient finite (it is then 0)
    two_sin = torch.where(same, 0.0, _safe_sqrt(s2, same))
    two_cos = M.diagonal(dim1=-2, dim2=-1).sum(-1) - 1
    return torch.atan2(two_sin, two_cos)


def axis_angle_geodesic(a1: Tensor, a2: Tensor) -> Tensor:
    """Geodesic distance (angle of the relative rotation) between rotations given as axis-angle.

    Computed as ``2 atan2(|vec(q)|, |w(q)|)`` for the relative quaternion ``q = conj(q1) q2``: accurate near 0 and pi.

    Args:
        a1: Axis-angle vectors (any angle), shape (*, 3).
        a2: Axis-angle vectors (any angle), shape broadcastable with ``a1``, (*, 3).

    Returns:
        Angles in radians in [0, pi], shape (*,).
    """
    _check(a1, (3,), "axis-angle")
    _check(a2, (3,), "axis-angle")
    _check_pair(a1, a2, 1, "axis-angle vectors")
    q1, q2 = torch.broadcast_tensors(axis_angle_to_quaternion(a1), axis_angle_to_quaternion(a2))
    w1, v1, w2, v2 = q1[..., :1], q1[..., 1:], q2[..., :1], q2[..., 1:]
    cos_half = (w1 * w2 + (v1 * v2).sum(-1, keepdim=True)).squeeze(-1).abs()  # |w| folds q ~ -q
    vec = w1 * v2 - w2 * v1 - torch.linalg.cross(v1, v2, dim=-1)
    s2 = vec.square().sum(-1)
    same = s2 == 0
    # kink at equal rotations: see geodesic_distance
    sin_half = torch.where(same, 0.0, _safe_sqrt(s2, same))
    return 2 * torch.atan2(sin_half, cos_half)


def mirror_axis_angle(aa: Tensor) -> Tensor:
    """Mirror rotations across the sagittal (x = 0) plane, left <-> right: (x, y, z) -> (x, -y, -z).

    For rotation matrices this is ``R -> S R S`` with ``S = diag(-1, 1, 1)`` (equivalently ``diag(1, -1, -1)``).
    It is an involution.

    Args:
        aa: Axis-angle vectors, shape (*, 3).

    Returns:
        Mirrored axis-angle vectors, shape (*, 3).
    """
    _check(aa, (3,), "axis-angle")
    return torch.cat([aa[..., :1], -aa[..., 1:]], dim=-1)


def exp_map_log_abs_det(aa: Tensor) -> Tensor:
    """log |det| of the Jacobian of the exponential map at ``aa``: the Haar density in axis-angle coordinates.

    Equals ``log(2 (1 - cos t) / t^2) = 2 log|sinc(t / 2)|`` with ``t = |aa|``: 0 with gradient 0 at t = 0 (Taylor
    series there), finite for t < 2 pi. A density ``p_aa`` on axis-angle vectors inside the pi-ball is a density on
    SO(3) w.r.t. the Haar measure of total volume ``8 pi^2`` (see :data:`LOG_SO3_VOLUME`) as
    ``log p_so3 = log p_aa - exp_map_log_abs_det(aa)``.

    Args:
        aa: Axis-angle vectors, shape (*, 3).

    Returns:
        Log-determinants, shape (*,).
    """
    _check(aa, (3,), "axis-angle")
    theta2 = aa.square().sum(-1)
    small = theta2 < _SMALL_ANGLE_LOG_DET**2
    half = _safe_sqrt(theta2, small) / 2
    exact = 2 * torch.log(torch.sin(half).abs() / half)  # no 1 - cos t: keeps float32 accurate at small t
    # 2 log sinc(t/2) = -2 sum_n zeta(2n) / n (t / 2 pi)^(2n); the first omitted term is < 1e-18 at t = 0.1
    taylor = -theta2 * (1 / 12 + theta2 * (1 / 1440 + theta2 * (1 / 90720 + theta2 / 4838400)))
    return torch.where(small, taylor, exact)


def _sizes(shape: object) -> tuple[int, ...] | None:
    """``shape`` (one size, or a sequence of Python or NumPy integers) as a tuple of ints >= 0, else None."""
    items = shape if isinstance(shape, (tuple, list, torch.Size)) else (shape,)
    if any(isinstance(n, bool) for n in items):
        return None
    try:
        sizes = tuple(operator.index(n) for n in items)
    except TypeError:
        return None
    return sizes if all(n >= 0 for n in sizes) else None


def random_rotation_axis_angle(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniform (Haar) random rotations as canonical axis-angle (normalised Gaussian quaternions).

    Args:
        shape: Batch shape of the result (a tuple of sizes, or one size).
        generator: Optional random generator; the default device is the generator's.
        dtype: Floating-point dtype of the result.
        device: Device of the result (default: the generator's device, else torch's default device).

    Returns:
        Axis-angle vectors with angle in [0, pi], shape (*shape, 3).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"expected a floating-point torch.dtype, got {dtype!r}")
    sizes = _sizes(shape)
    if sizes is None:
        raise TypeError(f"expected shape to be a tuple of sizes >= 0 (or one int), got {shape!r}")
    shape = sizes
    if generator is None:
        q = torch.randn((*shape, 4), dtype=dtype, device=device)
    else:  # drawn where the generator lives, then moved
        q = torch.randn((*shape, 4), generator=generator, dtype=dtype, device=generator.device)
        q = q.to(device) if device is not None else q
    return quaternion_to_axis_angle(q)
