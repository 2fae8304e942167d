"""Forward kinematics (:mod:`posepriors.kinematics`): the pointer-jumping tensor path and the Numba loops of the CPU
fast path give the joint-by-joint chain's positions and gradients, for any angle, batch shape and dtype, and the
fast path runs only where its one-node backward is valid."""

from __future__ import annotations

import pytest
import torch

from posepriors import kinematics, skeleton
from posepriors.fitting import body_keypoints
from posepriors.flows import _numba_spline
from posepriors.kinematics import _joint_positions, forward_kinematics, rest_offsets
from posepriors.rotations import axis_angle_to_matrix

PARENTS = skeleton.SMPLX_PARENTS
HAS_NUMBA = _numba_spline._numba() is not None
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="the fast path needs Numba (pip install 'posepriors[fast]')")


def chain_reference(pose: torch.Tensor, parents: tuple[int, ...], offsets: torch.Tensor) -> torch.Tensor:
    """The joint-by-joint chain, as the tensor path computed it before pointer jumping."""
    rot = axis_angle_to_matrix(pose)
    world, positions = [], []
    for j, p in enumerate(parents):
        if p < 0:
            world.append(rot[..., j, :, :])
            positions.append(torch.zeros_like(pose[..., j, :]))
            continue
        world.append(world[p] @ rot[..., j, :, :])
        positions.append(positions[p] + (world[p] @ offsets[j].unsqueeze(-1)).squeeze(-1))
    return torch.stack(positions, -2)


def ran_fast_path(y: torch.Tensor) -> bool:
    """Whether the autograd graph of ``y`` holds the fast path's node (behind at most a few views)."""
    node = y.grad_fn
    for _ in range(4):
        if node is None or "_Chain" in type(node).__name__:
            break
        node = node.next_functions[0][0] if node.next_functions else None
    return node is not None and "_Chain" in type(node).__name__


@pytest.fixture
def path(request, monkeypatch) -> str:
    """Run with the fast path from the first call ("fast") or switched off ("tensor")."""
    if request.param == "fast" and not HAS_NUMBA:
        pytest.skip("the fast path needs Numba (pip install 'posepriors[fast]')")
    monkeypatch.setattr(_numba_spline, "LOAD_AFTER", 0)
    monkeypatch.setattr(_numba_spline, "ENABLED", request.param == "fast")
    return request.param


def poses(scale: float, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """SMPL-X poses in float64 with some exact zeros and tiny (Taylor-series) rotations among them."""
    g = torch.Generator().manual_seed(seed)
    pose = scale * torch.randn(*shape, skeleton.NUM_JOINTS, 3, generator=g, dtype=torch.float64)
    flat = pose.view(-1, skeleton.NUM_JOINTS, 3)
    flat[0, 3] = 0.0
    flat[0, 5] = 1e-5
    return pose


@pytest.mark.parametrize("path", ["tensor", "fast"], indirect=True)
@pytest.mark.parametrize("scale", [1e-5, 0.4, 2.5])
@pytest.mark.parametrize("shape", [(), (1,), (7,), (2, 3)])
def test_positions_and_gradients_match_the_joint_by_joint_chain(path, scale, shape):
    pose = poses(scale, shape)
    offsets = rest_offsets(torch.float64)
    weights = torch.randn(pose.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    for fn in (chain_reference, _joint_positions):
        x = pose.clone().requires_grad_(True)
        y = fn(x, PARENTS, offsets)
        (y * weights).sum().backward()
        results.append((y.detach(), x.grad))
        if fn is _joint_positions:
            assert ran_fast_path(y) == (path == "fast")  # the path under test ran
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=1e-12)


@needs_numba
@pytest.mark.parametrize("path", ["fast"], indirect=True)
def test_fast_path_passes_gradcheck_and_its_loops_agree(path, monkeypatch):
    pose = poses(0.7, (3,), seed=2).requires_grad_(True)
    offsets = rest_offsets(torch.float64)
    assert torch.autograd.gradcheck(lambda x: _joint_positions(x, PARENTS, offsets), (pose,))
    # the parallel loops (many poses) against the serial ones (a few)
    many = poses(0.7, (80,), seed=3).requires_grad_(True)
    outputs = []
    for threshold in (1, 10**9):
        monkeypatch.setattr(kinematics, "PARALLEL_POSES", threshold)
        y = _joint_positions(many, PARENTS, offsets)
        (grad,) = torch.autograd.grad(y.square().sum(), many)
        outputs.append((y, grad))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


@pytest.mark.parametrize("path", ["tensor", "fast"], indirect=True)
def test_float32_poses_keep_their_dtype_and_agree_with_float64(path):
    pose = poses(0.5, (4,))
    y64 = forward_kinematics(pose)
    y32 = forward_kinematics(pose.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, y64.float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", ["fast"], indirect=True)
def test_gradients_reach_the_root_and_offsets_that_ask_for_them(path):
    pose = poses(0.5, (3,))[..., 1:22, :]
    root = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    offsets = rest_offsets(torch.float64)[:22]
    expected = chain_reference(torch.cat([root.unsqueeze(-2), pose], -2), PARENTS[:22], offsets)
    x, r, o = (t.clone().requires_grad_(True) for t in (pose, root, offsets))
    y = body_keypoints(x, r, o)  # offsets with a gradient: the tensor path
    assert not ran_fast_path(y)
    y.sum().backward()
    x2, r2 = pose.clone().requires_grad_(True), root.clone().requires_grad_(True)
    y2 = body_keypoints(x2, r2, offsets)  # the fast path; the root's gradient flows through the concatenation
    assert ran_fast_path(y2)
    y2.sum().backward()
    for result in (y, y2):
        torch.testing.assert_close(result.detach(), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(x2.grad, x.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(r2.grad, r.grad, rtol=0, atol=1e-12)
    assert o.grad is not None and bool(o.grad.abs().sum() > 0)


@needs_numba
@pytest.mark.parametrize("path", ["fast"], indirect=True)
def test_fast_path_refuses_a_backward_after_an_in_place_change(path):
    pose = poses(0.5, (2,)).requires_grad_(True)
    offsets = rest_offsets(torch.float64)
    for changed in ("pose", "offsets"):
        x, o = pose * 1.0, offsets.clone()
        y = _joint_positions(x, PARENTS, o)
        assert ran_fast_path(y)
        (x if changed == "pose" else o).add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


@pytest.mark.parametrize("path", ["tensor", "fast"], indirect=True)
def test_second_derivatives_match_the_joint_by_joint_chain(path):
    """A backward with create_graph=True is differentiable on either path (the fast path's runs as tensor ops)."""
    pose = poses(0.6, (3,), seed=5)
    offsets = rest_offsets(torch.float64)
    results = []
    for fn in (chain_reference, _joint_positions):
        x = pose.clone().requires_grad_(True)
        y = fn(x, PARENTS, offsets)
        (grad,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        (second,) = torch.autograd.grad((grad * torch.linspace(-1, 1, grad.numel()).view_as(grad)).sum(), x)
        results.append((grad.detach(), second))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("path", ["tensor", "fast"], indirect=True)
def test_mismatched_shapes_are_refused(path):
    offsets = rest_offsets(torch.float64)
    with pytest.raises(ValueError, match=r"expected poses \(\*, 55, 3\) and offsets \(55, 3\)"):
        _joint_positions(torch.zeros(2, 55, 3, dtype=torch.float64), PARENTS, offsets[:22])
    with pytest.raises(ValueError, match=r"expected poses"):
        _joint_positions(torch.zeros(2, 54, 3, dtype=torch.float64), PARENTS, offsets)


@needs_numba
@pytest.mark.parametrize("path", ["fast"], indirect=True)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside torch.func
def test_transforms_and_forward_mode_keep_the_tensor_path(path):
    pose = poses(0.5, (2,))
    offsets = rest_offsets(torch.float64)
    # torch.func: a per-sample Jacobian needs the tensor ops
    jac = torch.func.vmap(torch.func.jacrev(lambda p: _joint_positions(p, PARENTS, offsets)))(pose)
    assert jac.shape == (2, skeleton.NUM_JOINTS, 3, skeleton.NUM_JOINTS, 3)
    x = pose[0].clone().requires_grad_(True)
    (row,) = torch.autograd.grad(_joint_positions(x, PARENTS, offsets)[7, 1], x)
    torch.testing.assert_close(jac[0, 7, 1], row, rtol=0, atol=1e-12)
    # forward-mode AD
    import torch.autograd.forward_ad as fwAD

    tangent = torch.randn_like(pose)
    with fwAD.dual_level():
        out = _joint_positions(fwAD.make_dual(pose, tangent), PARENTS, offsets)
        jvp = fwAD.unpack_dual(out).tangent
    assert jvp is not None and jvp.shape == pose.shape


def test_parents_after_their_children_are_refused():
    with pytest.raises(ValueError, match="parents that precede their children"):
        _joint_positions(torch.zeros(3, 3), (-1, 2, 0), torch.zeros(3, 3))
