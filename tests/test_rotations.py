"""Rotation utilities against scipy, round trips, edge angles and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.spatial.transform import Rotation

from posepriors import rotations as rot

EDGE_ANGLES = [0.0, 1e-8, 1e-4, 0.5, math.pi - 1e-6, math.pi]


def _random_aa(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return rot.wrap_axis_angle(torch.randn(*shape, 3, generator=g, dtype=dtype) * 1.5)


def _edge_aa(dtype=torch.float64):
    axis = torch.tensor([0.3, -0.5, 0.8], dtype=dtype)
    axis = axis / axis.norm()
    return torch.stack([axis * a for a in EDGE_ANGLES])


@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 4)])
def test_matrix_matches_scipy(shape):
    aa = _random_aa(shape)
    ref = Rotation.from_rotvec(aa.reshape(-1, 3).numpy()).as_matrix().reshape(*shape, 3, 3)
    torch.testing.assert_close(rot.axis_angle_to_matrix(aa), torch.from_numpy(ref))


def test_quaternion_matches_scipy_wxyz():
    aa = torch.cat([_random_aa((50,)), _edge_aa()])
    q = rot.axis_angle_to_quaternion(aa)
    ref = torch.from_numpy(Rotation.from_rotvec(aa.numpy()).as_quat(scalar_first=True))
    sign = torch.where((q * ref).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(q.dtype)
    torch.testing.assert_close(q, ref * sign)
    torch.testing.assert_close(rot.quaternion_to_matrix(q), rot.axis_angle_to_matrix(aa))
    torch.testing.assert_close(rot.matrix_to_quaternion(rot.axis_angle_to_matrix(aa)).abs(), q.abs())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trips(dtype):
    aa = torch.cat([_random_aa((200,), dtype), _edge_aa(dtype)])
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-10}
    R = rot.axis_angle_to_matrix(aa)
    # near pi the axis sign is ambiguous: compare rotations, not vectors
    torch.testing.assert_close(rot.axis_angle_to_matrix(rot.matrix_to_axis_angle(R)), R, **tol)
    torch.testing.assert_close(
        rot.axis_angle_to_matrix(rot.quaternion_to_axis_angle(rot.axis_angle_to_quaternion(aa))), R, **tol
    )
    torch.testing.assert_close(rot.rotation_6d_to_matrix(rot.matrix_to_rotation_6d(R)), R, **tol)
    torch.testing.assert_close(
        rot.axis_angle_to_matrix(rot.rotation_6d_to_axis_angle(rot.axis_angle_to_rotation_6d(aa))), R, **tol
    )
    away = aa.norm(dim=-1) < 3.0  # away from pi the vectors themselves round-trip
    torch.testing.assert_close(rot.matrix_to_axis_angle(R)[away], aa[away], **tol)
    assert rot.matrix_to_axis_angle(R).dtype == dtype


def test_pi_is_exact():
    aa = torch.tensor([[math.pi - 1e-7, 0, 0], [0, 0, math.pi]], dtype=torch.float64)
    back = rot.matrix_to_axis_angle(rot.axis_angle_to_matrix(aa))
    torch.testing.assert_close(back.norm(dim=-1), aa.norm(dim=-1), atol=1e-6, rtol=0)


def test_wrap_gives_canonical_equivalent():
    aa = torch.randn(500, 3, dtype=torch.float64) * 4
    wrapped = rot.wrap_axis_angle(aa)
    assert torch.all(wrapped.norm(dim=-1) <= math.pi + 1e-12)
    torch.testing.assert_close(rot.axis_angle_to_matrix(wrapped), rot.axis_angle_to_matrix(aa))
    small = aa[aa.norm(dim=-1) < math.pi]
    torch.testing.assert_close(rot.wrap_axis_angle(small), small)
    torch.testing.assert_close(
        rot.wrap_axis_angle(torch.tensor([3.5, 0.0, 0.0])), torch.tensor([3.5 - 2 * math.pi, 0, 0])
    )


def test_geodesic_matches_scipy():
    a, b = _random_aa((100,), seed=1), _random_aa((100,), seed=2)
    ref = (Rotation.from_rotvec(a.numpy()).inv() * Rotation.from_rotvec(b.numpy())).magnitude()
    torch.testing.assert_close(rot.axis_angle_geodesic(a, b), torch.from_numpy(ref))
    Ra, Rb = rot.axis_angle_to_matrix(a), rot.axis_angle_to_matrix(b)
    torch.testing.assert_close(rot.geodesic_distance(Ra, Rb), torch.from_numpy(ref))
    assert torch.all(rot.axis_angle_geodesic(a, a) < 1e-7)


def test_mirroring_is_an_involution_and_a_reflection():
    aa = _random_aa((20,))
    torch.testing.assert_close(rot.mirror_axis_angle(rot.mirror_axis_angle(aa)), aa)
    S = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))  # reflection across the sagittal (x) plane
    mirrored = rot.axis_angle_to_matrix(rot.mirror_axis_angle(aa))
    torch.testing.assert_close(mirrored, S @ rot.axis_angle_to_matrix(aa) @ S)


def test_exp_map_log_abs_det_is_the_haar_volume_factor():
    # the exponential map's Jacobian determinant, computed numerically through rotations as quaternions:
    # d/dw of the unit quaternion; det of the (4x3) Jacobian's Gram matrix gives the volume ratio up to a constant 1/8
    def quat(w):
        return rot.axis_angle_to_quaternion(w)

    for w in _random_aa((6,), seed=3):
        J = torch.autograd.functional.jacobian(quat, w)  # (4, 3)
        vol = torch.sqrt(torch.linalg.det(J.T @ J)) * 8  # Haar density in exp coords (SO(3) volume 8 pi^2)
        torch.testing.assert_close(rot.exp_map_log_abs_det(w), vol.log(), atol=1e-8, rtol=1e-8)
    assert rot.exp_map_log_abs_det(torch.zeros(3)).item() == 0.0
    assert math.isclose(rot.LOG_SO3_VOLUME, math.log(8 * math.pi**2))


def test_gradcheck_float64():
    x = _random_aa((4,)).requires_grad_(True)
    y = _random_aa((4,), seed=5).requires_grad_(True)
    for fn in (
        rot.axis_angle_to_matrix,
        rot.axis_angle_to_quaternion,
        rot.exp_map_log_abs_det,
        rot.axis_angle_to_rotation_6d,
        lambda v: rot.matrix_to_axis_angle(rot.axis_angle_to_matrix(v)),
        lambda v: rot.rotation_6d_to_axis_angle(rot.axis_angle_to_rotation_6d(v)),
    ):
        assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradcheck(rot.axis_angle_geodesic, (x, y))


@pytest.mark.parametrize(
    "fn",
    [
        rot.axis_angle_to_matrix,
        rot.axis_angle_to_quaternion,
        rot.exp_map_log_abs_det,
        lambda v: rot.matrix_to_axis_angle(rot.axis_angle_to_matrix(v)),
        lambda v: rot.quaternion_to_axis_angle(rot.axis_angle_to_quaternion(v)),
    ],
)
def test_gradients_finite_at_zero_and_near_pi(fn):
    for angle in (0.0, 1e-9, math.pi - 1e-3):
        x = (torch.tensor([[0.6, 0.0, 0.8]], dtype=torch.float64) * angle).requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(x).sum(), x)
        assert torch.isfinite(grad).all(), angle


def test_random_rotations_are_uniform():
    aa = rot.random_rotation_axis_angle((20000,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    angle = aa.norm(dim=-1)
    # the Haar angle density is (1 - cos t) / pi on [0, pi]: mean angle pi/2 + 2/pi
    assert abs(angle.mean().item() - (math.pi / 2 + 2 / math.pi)) < 0.02
    assert torch.all(angle <= math.pi + 1e-9)


@pytest.mark.parametrize(
    ("fn", "bad", "error", "match"),
    [
        (rot.axis_angle_to_matrix, torch.zeros(4, 2), ValueError, r"\(\*, 3\), got \(4, 2\)"),
        (rot.matrix_to_axis_angle, torch.zeros(4, 3), ValueError, r"\(\*, 3, 3\)"),
        (rot.quaternion_to_axis_angle, torch.zeros(4, 3), ValueError, r"\(\*, 4\)"),
        (rot.rotation_6d_to_matrix, torch.zeros(4, 5), ValueError, r"\(\*, 6\)"),
        (rot.axis_angle_to_matrix, torch.zeros(4, 3, dtype=torch.long), TypeError, r"floating"),
        (rot.axis_angle_to_matrix, [0.0, 0.0, 0.0], TypeError, r"torch.Tensor"),
    ],
)
def test_bad_input(fn, bad, error, match):
    with pytest.raises(error, match=match):
        fn(bad)


def test_empty_batch():
    assert rot.axis_angle_to_matrix(torch.zeros(0, 3)).shape == (0, 3, 3)
    assert rot.matrix_to_axis_angle(torch.zeros(0, 3, 3)).shape == (0, 3)
