"""Rotation utilities: agreement with scipy, round trips, edge angles, volume factor, gradients and input checks."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from scipy.stats import kstest

from posepriors import rotations as rot

SHAPES = [(), (5,), (2, 3, 4)]
DTYPES = [torch.float32, torch.float64]
EDGE_ANGLES = [0.0, 1e-8, 1e-4, 1e-3, 0.1, 1.0, math.pi - 1e-3, math.pi - 1e-6, math.pi - 1e-7, math.pi]
TOL = {torch.float64: {"atol": 1e-10, "rtol": 1e-10}, torch.float32: {"atol": 1e-5, "rtol": 1e-5}}


def _axes(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    axes = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return (axes / axes.norm(dim=-1, keepdim=True)).to(dtype)


def _random_aa(shape, dtype=torch.float64, seed=0, max_angle=math.pi):
    """Random axis-angle vectors built without the module: random axis, angle uniform in [0, max_angle)."""
    n = math.prod(shape)
    g = torch.Generator().manual_seed(seed + 1000)
    angle = torch.rand(n, 1, generator=g, dtype=torch.float64) * max_angle
    return (_axes(n, seed) * angle).reshape(*shape, 3).to(dtype)


def _edge_aa(dtype=torch.float64, seed=0):
    """Every edge angle about each of three random axes and the coordinate axes, shape (6 * len(EDGE_ANGLES), 3)."""
    axes = torch.cat([_axes(3, seed), torch.eye(3, dtype=torch.float64)])
    angles = torch.tensor(EDGE_ANGLES, dtype=torch.float64)
    return (axes[:, None] * angles[None, :, None]).reshape(-1, 3).to(dtype)


def _scipy(aa):
    return Rotation.from_rotvec(aa.detach().reshape(-1, 3).double().numpy())


def _wxyz(r):
    return torch.from_numpy(np.roll(r.as_quat(), 1, axis=-1))  # scipy is (x, y, z, w)


def _same_rotation(a, b, **tol):
    torch.testing.assert_close(rot.axis_angle_to_matrix(a), rot.axis_angle_to_matrix(b), **tol)


# --- agreement with scipy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_to_matrix_and_quaternion_match_scipy(shape):
    aa = _random_aa(shape)
    r = _scipy(aa)
    R_ref = torch.from_numpy(r.as_matrix()).reshape(*shape, 3, 3)
    q_ref = _wxyz(r).reshape(*shape, 4)
    torch.testing.assert_close(rot.axis_angle_to_matrix(aa), R_ref)
    torch.testing.assert_close(rot.axis_angle_to_quaternion(aa), q_ref * torch.sign(q_ref[..., :1]))
    torch.testing.assert_close(rot.quaternion_to_matrix(q_ref), R_ref)
    torch.testing.assert_close(rot.axis_angle_to_rotation_6d(aa), torch.cat([R_ref[..., :, 0], R_ref[..., :, 1]], -1))


@pytest.mark.parametrize("shape", SHAPES)
def test_from_matrix_matches_scipy(shape):
    r = Rotation.random(max(math.prod(shape), 1), random_state=1)
    R = torch.from_numpy(r.as_matrix()).reshape(*shape, 3, 3)
    q = rot.matrix_to_quaternion(R)
    q_ref = _wxyz(r).reshape(*shape, 4)
    torch.testing.assert_close(q, q_ref * torch.sign(q_ref[..., :1]))
    assert torch.all(q[..., 0] >= 0)
    torch.testing.assert_close(rot.matrix_to_axis_angle(R), torch.from_numpy(r.as_rotvec()).reshape(*shape, 3))
    torch.testing.assert_close(rot.quaternion_to_axis_angle(q_ref), torch.from_numpy(r.as_rotvec()).reshape(*shape, 3))


def test_edge_angles_match_scipy():
    aa = _edge_aa()
    r = _scipy(aa)
    R = rot.axis_angle_to_matrix(aa)
    torch.testing.assert_close(R, torch.from_numpy(r.as_matrix()), atol=1e-14, rtol=0)
    q_ref = _wxyz(r)
    torch.testing.assert_close(rot.axis_angle_to_quaternion(aa), q_ref * torch.sign(q_ref[:, :1]), atol=1e-14, rtol=0)
    torch.testing.assert_close(
        rot.exp_map_log_abs_det(aa), 2 * torch.special.sinc(aa.norm(dim=-1) / (2 * math.pi)).log()
    )


# --- round trips --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trips(dtype):
    aa = torch.cat([_random_aa((200,), dtype), _edge_aa(dtype)])
    tol = TOL[dtype]
    R = rot.axis_angle_to_matrix(aa)
    # rotations always round-trip; near pi the axis sign is ambiguous, so compare matrices
    _same_rotation(rot.matrix_to_axis_angle(R), aa, **tol)
    _same_rotation(rot.quaternion_to_axis_angle(rot.axis_angle_to_quaternion(aa)), aa, **tol)
    _same_rotation(rot.rotation_6d_to_axis_angle(rot.axis_angle_to_rotation_6d(aa)), aa, **tol)
    torch.testing.assert_close(rot.rotation_6d_to_matrix(rot.matrix_to_rotation_6d(R)), R, **tol)
    torch.testing.assert_close(rot.quaternion_to_matrix(rot.matrix_to_quaternion(R)), R, **tol)
    # away from pi the vectors themselves round-trip (canonical inputs)
    away = aa.norm(dim=-1) < math.pi - 1e-2
    torch.testing.assert_close(rot.matrix_to_axis_angle(R)[away], aa[away], **tol)
    torch.testing.assert_close(rot.quaternion_to_axis_angle(rot.axis_angle_to_quaternion(aa))[away], aa[away], **tol)
    torch.testing.assert_close(rot.rotation_6d_to_axis_angle(rot.axis_angle_to_rotation_6d(aa))[away], aa[away], **tol)


@pytest.mark.parametrize("angle", [math.pi - 1e-4, math.pi - 1e-6, math.pi - 1e-7, math.pi])
def test_matrix_to_axis_angle_is_accurate_near_pi(angle):
    aa = _axes(20, seed=2) * angle
    back = rot.matrix_to_axis_angle(rot.axis_angle_to_matrix(aa))
    torch.testing.assert_close(back.norm(dim=-1), aa.norm(dim=-1), atol=1e-12, rtol=0)
    # same axis up to sign (the sign is only free at exactly pi)
    sign = torch.sign((back * aa).sum(-1, keepdim=True))
    torch.testing.assert_close(back * sign, aa, atol=1e-12, rtol=0)
    if angle < math.pi:
        torch.testing.assert_close(back, aa, atol=1e-9, rtol=0)


def test_quaternion_to_axis_angle_normalises_and_ignores_sign():
    q = _wxyz(Rotation.random(50, random_state=3))
    scale = torch.rand(50, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10 + 1e-6
    aa = rot.quaternion_to_axis_angle(q)
    torch.testing.assert_close(rot.quaternion_to_axis_angle(q * scale), aa)
    torch.testing.assert_close(rot.quaternion_to_axis_angle(-q * scale), aa)
    torch.testing.assert_close(rot.quaternion_to_matrix(-q * scale), rot.quaternion_to_matrix(q))
    assert torch.all(aa.norm(dim=-1) <= math.pi)
    # tiny, non-unit quaternions near the identity take the small-angle branch only after normalisation
    tiny = torch.tensor([1e-8, 1e-9, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(rot.quaternion_to_axis_angle(tiny)[0].item(), 2 * math.atan(0.1), atol=1e-15, rtol=0)


def test_rotation_6d_to_matrix_is_gram_schmidt():
    d6 = torch.randn(30, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    R = rot.rotation_6d_to_matrix(d6)
    torch.testing.assert_close(R.transpose(-1, -2) @ R, torch.eye(3, dtype=torch.float64).expand(30, 3, 3))
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(30, dtype=torch.float64))
    # first column along the first vector; second column in the plane of both, on the side of the second vector
    torch.testing.assert_close(R[:, :, 0], d6[:, :3] / d6[:, :3].norm(dim=-1, keepdim=True))
    assert torch.all((R[:, :, 1] * d6[:, 3:]).sum(-1) > 0)
    assert torch.linalg.det(torch.stack([R[:, :, 0], R[:, :, 1], d6[:, 3:]], -1)).abs().max() < 1e-12


# --- wrapping, distances, mirroring ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_wrap_gives_the_canonical_equivalent(dtype):
    aa = _random_aa((500,), dtype, seed=5, max_angle=5 * math.pi)
    wrapped = rot.wrap_axis_angle(aa)
    assert wrapped.dtype == dtype
    assert torch.all(wrapped.norm(dim=-1) <= math.pi + 1e-6)
    _same_rotation(wrapped, aa, atol=1e-4 if dtype == torch.float32 else 1e-10, rtol=0)
    inside = aa.norm(dim=-1) <= math.pi
    assert torch.equal(wrapped[inside], aa[inside])
    assert torch.equal(rot.wrap_axis_angle(wrapped), wrapped)
    # the examples from the docstring, and more than one full turn
    x = torch.tensor([1.0, 0.0, 0.0], dtype=dtype)
    cases = [(3.5, 3.5 - 2 * math.pi), (2 * math.pi + 0.5, 0.5), (4 * math.pi - 0.25, -0.25), (2 * math.pi, 0.0)]
    for angle, expected in cases:
        torch.testing.assert_close(rot.wrap_axis_angle(x * angle), x * expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(rot.wrap_axis_angle(x * 3 * math.pi).norm(), torch.tensor(math.pi, dtype=dtype))
    torch.testing.assert_close(rot.wrap_axis_angle(x * math.pi), x * math.pi)


@pytest.mark.parametrize("shape", SHAPES)
def test_geodesic_matches_scipy(shape):
    a, b = _random_aa(shape, seed=6), _random_aa(shape, seed=7)
    ref = torch.from_numpy((_scipy(a).inv() * _scipy(b)).magnitude()).reshape(shape)
    torch.testing.assert_close(rot.axis_angle_geodesic(a, b), ref)
    torch.testing.assert_close(rot.geodesic_distance(rot.axis_angle_to_matrix(a), rot.axis_angle_to_matrix(b)), ref)
    # non-canonical inputs describe the same rotations
    torch.testing.assert_close(rot.axis_angle_geodesic(a * (1 - 2 * math.pi / a.norm(dim=-1, keepdim=True)), b), ref)


@pytest.mark.parametrize("angle", [0.0, 1e-9, 1e-6, 0.5, math.pi - 1e-4, math.pi - 1e-7, math.pi])
def test_geodesic_is_accurate_at_both_ends(angle):
    # acos of the trace would be off by ~1e-8 near 0 and near pi in float64
    a = _random_aa((10,), seed=8)
    b = rot.matrix_to_axis_angle(rot.axis_angle_to_matrix(a) @ rot.axis_angle_to_matrix(_axes(10, seed=9) * angle))
    expected = torch.full((10,), angle, dtype=torch.float64)
    d_mat = rot.geodesic_distance(rot.axis_angle_to_matrix(a), rot.axis_angle_to_matrix(b))
    d_aa = rot.axis_angle_geodesic(a, b)
    torch.testing.assert_close(d_mat, expected, atol=1e-14, rtol=1e-6)
    torch.testing.assert_close(d_aa, expected, atol=1e-14, rtol=1e-6)
    assert torch.all((d_mat >= 0) & (d_mat <= math.pi)) and torch.all((d_aa >= 0) & (d_aa <= math.pi))


def test_geodesic_broadcasts():
    a, b = _random_aa((4, 1), seed=10), _random_aa((5,), seed=11)
    d = rot.axis_angle_geodesic(a, b)
    assert d.shape == (4, 5)
    torch.testing.assert_close(rot.geodesic_distance(rot.axis_angle_to_matrix(a), rot.axis_angle_to_matrix(b)), d)


def test_mirroring_is_an_involution_and_conjugation_by_a_reflection():
    aa = torch.cat([_random_aa((50,), seed=12), _edge_aa()])
    mirrored = rot.mirror_axis_angle(aa)
    torch.testing.assert_close(mirrored, aa * torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(rot.mirror_axis_angle(mirrored), aa, atol=0, rtol=0)
    R, R_mirrored = rot.axis_angle_to_matrix(aa), rot.axis_angle_to_matrix(mirrored)
    # S reflects across the sagittal plane x = 0: rotating a mirrored point with the mirrored rotation gives the
    # mirror image of the rotated point, i.e. R' = S R S. The rotation diag(1, -1, -1) = -S conjugates identically.
    S = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(R_mirrored, S @ R @ S)
    torch.testing.assert_close(R_mirrored, (-S) @ R @ (-S))
    p = torch.randn(len(aa), 3, 1, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    torch.testing.assert_close(R_mirrored @ (S @ p), S @ (R @ p))
    # mirroring preserves distances
    torch.testing.assert_close(
        rot.axis_angle_geodesic(mirrored, mirrored.flip(0)), rot.axis_angle_geodesic(aa, aa.flip(0))
    )


# --- the exponential map's volume factor ----------------------------------------------------------------------


def _exp_map_abs_det_by_autograd(aa):
    """|det| of the exponential map's differential in the left-invariant frame: columns vee(R^T dR/d aa_i)."""
    dR = torch.autograd.functional.jacobian(rot.axis_angle_to_matrix, aa)  # (3, 3, 3): d R_jk / d aa_i at [j, k, i]
    frame = rot.axis_angle_to_matrix(aa).T @ dR.permute(2, 0, 1)  # (3, 3, 3), skew-symmetric in the last two
    J = torch.stack([frame[:, 2, 1], frame[:, 0, 2], frame[:, 1, 0]], dim=-1)  # (i, vee)
    return torch.linalg.det(J).abs()


def test_exp_map_log_abs_det_is_the_jacobian_determinant():
    aa = torch.cat([_random_aa((8,), seed=14), _axes(3, seed=15) * torch.tensor([[0.05], [3.5], [6.0]])])
    for v in aa:
        torch.testing.assert_close(rot.exp_map_log_abs_det(v), _exp_map_abs_det_by_autograd(v).log())


def test_exp_map_density_integrates_to_the_so3_volume():
    # integral over the pi-ball of exp(log det) = integral_0^pi 4 pi t^2 exp(f(t)) dt = 8 pi^2
    nodes, weights = np.polynomial.legendre.leggauss(40)
    t = torch.from_numpy((nodes + 1) * math.pi / 2)
    f = rot.exp_map_log_abs_det(t[:, None] * torch.tensor([[0.0, 0.6, 0.8]], dtype=torch.float64))
    volume = (torch.from_numpy(weights) * math.pi / 2 * 4 * math.pi * t**2 * f.exp()).sum()
    assert math.isclose(volume.log().item(), rot.LOG_SO3_VOLUME, rel_tol=1e-12)
    assert math.isclose(rot.LOG_SO3_VOLUME, math.log(8 * math.pi**2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_map_log_abs_det_values_and_gradients_at_every_scale(dtype):
    # covers the Taylor branch, its threshold, and float32 accuracy at small angles
    angles = [0.0, 1e-8, 1e-4, 1e-2, 0.0999, 0.1001, 0.5, 2.0, math.pi, 5.0, 2 * math.pi - 0.1]
    x = torch.tensor(angles, dtype=torch.float64)[:, None] * torch.tensor([[0.36, 0.48, 0.8]], dtype=torch.float64)
    x = x.to(dtype).requires_grad_(True)
    value = rot.exp_map_log_abs_det(x)
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert value.dtype == dtype
    t = x.detach().double().norm(dim=-1)
    # 2 (1 - cos t) / t^2 = sinc(t / 2)^2, written without the cancellation in 1 - cos t
    expected = 2 * torch.special.sinc(t / (2 * math.pi)).log()
    # d/dt log(2 (1 - cos t) / t^2) = cot(t / 2) - 2 / t, or its series where that cancels
    t_safe = t.where(t > 1e-2, 1.0)
    dfdt = torch.where(t > 1e-2, 1 / torch.tan(t_safe / 2) - 2 / t_safe, -t / 6 - t**3 / 360)
    expected_grad = dfdt[:, None] * x.detach().double() / t.where(t > 0, 1.0)[:, None]
    if dtype == torch.float64:
        torch.testing.assert_close(value, expected, atol=1e-15, rtol=1e-12)
        torch.testing.assert_close(grad, expected_grad, atol=1e-13, rtol=1e-10)
    else:
        torch.testing.assert_close(value.double(), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad.double(), expected_grad, atol=1e-6, rtol=1e-5)
    assert value[0].item() == 0.0 and torch.all(grad[0] == 0)


# --- gradients --------------------------------------------------------------------------------------------------


def _gradcheck_inputs():
    """float64 inputs away from the singularities (angle pi for the inverse maps, equal rotations for distances)."""
    angles = torch.tensor([0.0, 5e-4, 2e-3, 0.05, 0.2, 1.0, 2.5, 3.0], dtype=torch.float64)
    aa = _axes(len(angles), seed=16) * angles[:, None]
    R = rot.axis_angle_to_matrix(aa)
    q = rot.axis_angle_to_quaternion(aa) * torch.linspace(0.5, 2.0, len(angles), dtype=torch.float64)[:, None]
    d6 = torch.randn(len(angles), 6, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
    big = _axes(4, seed=18) * torch.tensor([[3.5], [5.0], [7.0], [11.0]], dtype=torch.float64)
    other = _random_aa((len(angles),), seed=19, max_angle=2.0) + 0.3
    return {"aa": aa, "R": R, "q": q, "d6": d6, "big": big, "R2": rot.axis_angle_to_matrix(other), "aa2": other}


GRADCHECK_CASES = {
    "axis_angle_to_matrix": (rot.axis_angle_to_matrix, ["aa"]),
    "axis_angle_to_quaternion": (rot.axis_angle_to_quaternion, ["aa"]),
    "axis_angle_to_rotation_6d": (rot.axis_angle_to_rotation_6d, ["aa"]),
    "matrix_to_axis_angle": (rot.matrix_to_axis_angle, ["R"]),
    "matrix_to_quaternion": (rot.matrix_to_quaternion, ["R"]),
    "matrix_to_rotation_6d": (rot.matrix_to_rotation_6d, ["R"]),
    "quaternion_to_axis_angle": (rot.quaternion_to_axis_angle, ["q"]),
    "quaternion_to_matrix": (rot.quaternion_to_matrix, ["q"]),
    "rotation_6d_to_matrix": (rot.rotation_6d_to_matrix, ["d6"]),
    "rotation_6d_to_axis_angle": (rot.rotation_6d_to_axis_angle, ["d6"]),
    "wrap_axis_angle": (rot.wrap_axis_angle, ["big"]),
    "wrap_axis_angle_inside": (rot.wrap_axis_angle, ["aa"]),
    "mirror_axis_angle": (rot.mirror_axis_angle, ["aa"]),
    "exp_map_log_abs_det": (rot.exp_map_log_abs_det, ["aa"]),
    "exp_map_log_abs_det_beyond_pi": (rot.exp_map_log_abs_det, ["big"]),
    "geodesic_distance": (rot.geodesic_distance, ["R", "R2"]),
    "axis_angle_geodesic": (rot.axis_angle_geodesic, ["aa", "aa2"]),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck_float64(name):
    fn, keys = GRADCHECK_CASES[name]
    inputs = _gradcheck_inputs()
    if name == "exp_map_log_abs_det_beyond_pi":
        inputs["big"] = inputs["big"][:2]  # below 2 pi, where the log-determinant is finite
    args = tuple(inputs[k].clone().requires_grad_(True) for k in keys)
    assert torch.autograd.gradcheck(fn, args)


def _grad(fn, x):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("angle", [0.0, 1e-8, math.pi - 1e-6, math.pi])
@pytest.mark.parametrize(
    "fn",
    [
        rot.axis_angle_to_matrix,
        rot.axis_angle_to_quaternion,
        rot.axis_angle_to_rotation_6d,
        rot.exp_map_log_abs_det,
        rot.wrap_axis_angle,
        lambda v: rot.matrix_to_axis_angle(rot.axis_angle_to_matrix(v)),
        lambda v: rot.quaternion_to_axis_angle(rot.axis_angle_to_quaternion(v)),
        lambda v: rot.axis_angle_geodesic(v, v),
        lambda v: rot.axis_angle_geodesic(v, v + 1e-6),
        lambda v: rot.axis_angle_geodesic(v, v.flip(-1)),
        lambda v: rot.geodesic_distance(rot.axis_angle_to_matrix(v), rot.axis_angle_to_matrix(v).detach()),
        lambda v: rot.geodesic_distance(rot.axis_angle_to_matrix(v), rot.axis_angle_to_matrix(v + 1e-6).detach()),
        lambda v: rot.geodesic_distance(torch.eye(3, dtype=v.dtype), rot.axis_angle_to_matrix(v)),
    ],
)
def test_gradients_are_finite_at_zero_and_near_pi(fn, angle, dtype):
    x = (_axes(3, seed=20) * angle).to(dtype)
    assert torch.isfinite(_grad(fn, x)).all()


def test_gradients_at_zero_are_the_right_ones():
    zero = torch.zeros(3, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    dR = torch.autograd.functional.jacobian(rot.axis_angle_to_matrix, zero)  # d exp(K(v)) / dv at 0 is K(e_i)
    generators = torch.linalg.cross(eye[:, None, :], eye[None, :, :], dim=-1)  # [i, k, j] = (e_i x e_k)_j
    torch.testing.assert_close(dR.permute(2, 0, 1), generators.transpose(1, 2))
    dq = torch.autograd.functional.jacobian(rot.axis_angle_to_quaternion, zero)
    torch.testing.assert_close(dq, torch.cat([torch.zeros(1, 3, dtype=torch.float64), eye / 2]))
    # the log map's differential at the identity inverts the exp map's: d aa / d aa = I through R
    dlog = torch.autograd.functional.jacobian(lambda v: rot.matrix_to_axis_angle(rot.axis_angle_to_matrix(v)), zero)
    torch.testing.assert_close(dlog, eye)
    assert torch.all(_grad(rot.exp_map_log_abs_det, zero) == 0)


def _rodrigues_by_products(aa):
    """R = I + a K + b K @ K with batched 3x3 products (what axis_angle_to_matrix computed before it wrote K @ K
    out entry by entry), Taylor series below 1e-3 rad."""
    theta2 = aa.square().sum(-1)[..., None, None]
    small = theta2 < 1e-6
    t = torch.where(small, torch.ones_like(theta2), theta2).sqrt()
    a = torch.where(small, 1 - theta2 / 6 + theta2.square() / 120, torch.sin(t) / t)
    b = torch.where(small, 0.5 - theta2 / 24 + theta2.square() / 720, 0.5 * (torch.sin(t / 2) / (t / 2)).square())
    x, y, z = aa.unbind(-1)
    zero = torch.zeros_like(x)
    K = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).unflatten(-1, (3, 3))
    return torch.eye(3, dtype=aa.dtype) + a * K + b * (K @ K)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matrix_and_6d_entries_equal_the_product_form_with_gradients(dtype):
    aa = torch.cat([_edge_aa(), _random_aa((50,)), 3 * _random_aa((20,), seed=3)]).to(dtype)  # up to 3 pi
    tol = TOL[dtype]
    R, R_ref = rot.axis_angle_to_matrix(aa), _rodrigues_by_products(aa)
    assert R.is_contiguous()
    torch.testing.assert_close(R, R_ref, **tol)
    torch.testing.assert_close(rot.axis_angle_to_rotation_6d(aa), rot.matrix_to_rotation_6d(R_ref), **tol)
    weights = torch.randn(3, 3, generator=torch.Generator().manual_seed(5), dtype=dtype)
    for fn, ref in (
        (lambda v: rot.axis_angle_to_matrix(v) * weights, lambda v: _rodrigues_by_products(v) * weights),
        (lambda v: rot.axis_angle_to_rotation_6d(v) * weights[:2].reshape(6),
         lambda v: rot.matrix_to_rotation_6d(_rodrigues_by_products(v)) * weights[:2].reshape(6)),
    ):  # fmt: skip
        torch.testing.assert_close(_grad(fn, aa), _grad(ref, aa), **tol)


# --- random rotations ------------------------------------------------------------------------------------------


def test_random_rotations_are_haar_uniform():
    state = torch.random.get_rng_state()
    aa = rot.random_rotation_axis_angle((20000,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    angle = aa.norm(dim=-1)
    assert torch.all(angle <= math.pi)
    # the angle of a Haar-random rotation has density (1 - cos t) / pi on [0, pi], i.e. exp(log det) 4 pi t^2 / 8 pi^2
    assert kstest(angle.numpy(), lambda t: (t - np.sin(t)) / np.pi).pvalue > 1e-3
    # and E[R] = 0 for the Haar measure
    assert rot.axis_angle_to_matrix(aa).mean(0).abs().max() < 0.03


def test_random_rotations_shape_dtype_and_reproducibility():
    a = rot.random_rotation_axis_angle((2, 3), generator=torch.Generator().manual_seed(1))
    b = rot.random_rotation_axis_angle((2, 3), generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, 3) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert rot.random_rotation_axis_angle((), dtype=torch.float64).shape == (3,)
    assert rot.random_rotation_axis_angle((0,)).shape == (0, 3)
    with pytest.raises(TypeError, match="torch.int64"):
        rot.random_rotation_axis_angle((2,), dtype=torch.int64)


# --- shapes, dtypes, input checks ------------------------------------------------------------------------------

AA_IN = ["axis_angle_to_matrix", "axis_angle_to_quaternion", "axis_angle_to_rotation_6d", "wrap_axis_angle"]
AA_IN += ["mirror_axis_angle", "exp_map_log_abs_det"]
IN_SHAPE = {name: (3,) for name in AA_IN}
IN_SHAPE |= {"matrix_to_axis_angle": (3, 3), "matrix_to_quaternion": (3, 3), "matrix_to_rotation_6d": (3, 3)}
IN_SHAPE |= {"quaternion_to_axis_angle": (4,), "quaternion_to_matrix": (4,)}
IN_SHAPE |= {"rotation_6d_to_matrix": (6,), "rotation_6d_to_axis_angle": (6,)}
IN_SHAPE |= {"axis_angle_geodesic": (3,), "geodesic_distance": (3, 3)}
OUT_SHAPE = {"axis_angle_to_matrix": (3, 3), "axis_angle_to_quaternion": (4,), "axis_angle_to_rotation_6d": (6,)}
OUT_SHAPE |= {"wrap_axis_angle": (3,), "mirror_axis_angle": (3,), "exp_map_log_abs_det": ()}
OUT_SHAPE |= {"matrix_to_axis_angle": (3,), "matrix_to_quaternion": (4,), "matrix_to_rotation_6d": (6,)}
OUT_SHAPE |= {"quaternion_to_axis_angle": (3,), "quaternion_to_matrix": (3, 3)}
OUT_SHAPE |= {"rotation_6d_to_matrix": (3, 3), "rotation_6d_to_axis_angle": (3,)}
OUT_SHAPE |= {"axis_angle_geodesic": (), "geodesic_distance": ()}
WHAT = {(3,): "axis-angle", (3, 3): "rotation matrix", (4,): "quaternion", (6,): "6D rotation"}


def _valid_input(name, batch, dtype):
    aa = _random_aa(batch, dtype=torch.float64, seed=21)
    tail = IN_SHAPE[name]
    x = {(3,): aa, (3, 3): rot.axis_angle_to_matrix(aa), (4,): rot.axis_angle_to_quaternion(aa)}.get(tail)
    x = rot.axis_angle_to_rotation_6d(aa) if tail == (6,) else x
    return x.to(dtype)


def _call(name, x):
    fn = getattr(rot, name)
    return fn(x, x) if "geodesic" in name else fn(x)


def test_every_public_function_is_covered():
    assert set(IN_SHAPE) | {"LOG_SO3_VOLUME", "random_rotation_axis_angle"} == set(rot.__all__)


@pytest.mark.parametrize("name", sorted(IN_SHAPE))
@pytest.mark.parametrize("batch", [(), (0,), (2, 3, 4)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_shapes_and_dtypes_are_preserved(name, batch, dtype):
    out = _call(name, _valid_input(name, batch, dtype))
    assert out.shape == (*batch, *OUT_SHAPE[name])
    assert out.dtype == dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(IN_SHAPE))
def test_bad_shapes_raise_value_error(name):
    tail = IN_SHAPE[name]
    for bad in [torch.zeros(4, *tail[:-1], tail[-1] + 1), torch.zeros(tail[1:] or (2, 2))]:
        expected = re.escape(f"expected {WHAT[tail]} of shape (*, {', '.join(map(str, tail))}), got {tuple(bad.shape)}")
        with pytest.raises(ValueError, match=expected):
            _call(name, bad)


@pytest.mark.parametrize("name", sorted(IN_SHAPE))
def test_bad_dtypes_raise_type_error(name):
    tail = IN_SHAPE[name]
    with pytest.raises(TypeError, match="floating-point dtype, got torch.int64"):
        _call(name, torch.zeros(2, *tail, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor, got list"):
        _call(name, torch.zeros(2, *tail).tolist())


def test_distances_and_random_rotations_check_their_arguments():
    with pytest.raises(TypeError, match=r"one dtype on one device, got torch.float16 on cpu and torch.float32"):
        rot.axis_angle_geodesic(torch.zeros(3, dtype=torch.float16), torch.zeros(3))
    with pytest.raises(TypeError, match="one dtype"):
        rot.geodesic_distance(torch.eye(3), torch.eye(3).double())
    with pytest.raises(ValueError, match=r"batch shapes broadcast, got \(2, 3\) and \(3, 3\)"):
        rot.axis_angle_geodesic(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"axis-angle of shape \(\*, 3\)"):
        rot.axis_angle_geodesic(torch.zeros(2, 4), torch.zeros(2, 4))
    assert rot.axis_angle_geodesic(torch.zeros(4, 1, 3), torch.zeros(5, 3)).shape == (4, 5)  # broadcasting works
    assert rot.random_rotation_axis_angle(5).shape == (5, 3)
    with pytest.raises(TypeError, match="tuple of sizes"):
        rot.random_rotation_axis_angle((2, -1))
    with pytest.raises(TypeError, match="floating-point torch.dtype, got 'float32'"):
        rot.random_rotation_axis_angle((2,), dtype="float32")
