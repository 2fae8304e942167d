"""Behaviour every family shares: formats, shapes, gradients, sampling, projection, masks, save/load.

The common cross-family file; each family has its own file too (test_gaussian.py, test_gmm.py, test_joint_flow.py,
test_global_flow.py, test_hand_vae.py)."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

import posepriors
from posepriors import skeleton
from posepriors.flows import _numba_spline
from tests.families import NAMES, make, synthetic_poses, train


@pytest.fixture(scope="module", params=NAMES)
def trained(request):
    torch.manual_seed(0)
    prior, held_out = train(make(request.param))
    return request.param, prior, held_out


def test_training_lowers_nll():
    for name in ("joint_flow", "global_flow", "hand_vae"):
        prior = make(name)
        data = synthetic_poses(256, prior.joints, seed=3)
        prior.initialize_from_data(data)
        before = prior.nll(data).mean().item()
        trained_prior, _ = train(prior, steps=40, seed=3)
        after = trained_prior.nll(data).mean().item()
        assert after < before - 5, (name, before, after)


def test_formats_and_shapes(trained):
    name, prior, x = trained
    lp = prior.log_prob(x)
    assert lp.shape == (64,) and torch.isfinite(lp).all()
    full = prior.to_smplx(x)
    torch.testing.assert_close(prior.log_prob(full), lp, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(prior.log_prob(full.reshape(64, 165)), lp, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(prior.log_prob(skeleton.from_smplx(full, "seed53")), lp, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(prior.log_prob(skeleton.to_smplx_dict(full)), lp, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(prior.log_prob(x.reshape(64, -1)), lp, atol=1e-4, rtol=1e-5)
    assert prior.log_prob(x[0]).shape == ()
    assert prior.log_prob(x.reshape(4, 16, -1, 3)).shape == (4, 16)
    torch.testing.assert_close(prior.nll(x), -lp)


def test_save_load_round_trip(trained, tmp_path, monkeypatch):
    name, prior, x = trained
    # one code path for both calls: the fused kernels must not start loading between them (they load after a
    # count of spline calls in the process, which depends on the tests that ran before)
    monkeypatch.setattr(_numba_spline, "LOAD_AFTER", 10**9)
    monkeypatch.setattr(_numba_spline, "LOAD_AT_VALUES", 10**18)
    posepriors.save_pretrained(prior, tmp_path / name)
    loaded = posepriors.load(tmp_path / name)
    # bit-identical on the same code path (a loaded prior is frozen: flows then fold their linear blocks) ...
    frozen = copy.deepcopy(prior).eval().requires_grad_(False)
    assert torch.equal(loaded.log_prob(x), frozen.log_prob(x))
    # ... and equal to float precision to the trainable original
    torch.testing.assert_close(loaded.log_prob(x), prior.log_prob(x).detach(), atol=1e-4, rtol=1e-5)
    assert type(loaded) is type(prior) and loaded.config == prior.config


def test_gradients_reach_every_parameter(trained):
    name, prior, x = trained
    prior.train()
    prior.zero_grad()
    prior.training_loss(x, torch.Generator().manual_seed(0)).backward()
    prior.eval()
    dead = [
        n for n, p in prior.named_parameters() if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))
    ]
    assert not dead, f"{name}: no gradient reaches {dead}"


def test_nll_gradient_wrt_pose(trained):
    name, prior, x = trained
    pose = x[:3].clone().requires_grad_(True)
    prior.nll(pose).sum().backward()
    assert torch.isfinite(pose.grad).all() and pose.grad.abs().sum() > 0


def test_float64(trained):
    name, prior, x = trained
    p64 = make(name).double()
    p64.load_state_dict(prior.state_dict())
    p64.eval()
    lp = p64.log_prob(x.double())
    assert lp.dtype == torch.float64
    torch.testing.assert_close(lp.float(), prior.log_prob(x), atol=1e-2, rtol=1e-4)


def test_sampling(trained):
    name, prior, x = trained
    a = prior.sample(16, generator=torch.Generator().manual_seed(1))
    b = prior.sample(16, generator=torch.Generator().manual_seed(1))
    assert a.shape == (16, prior.num_joints, 3) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    cold = prior.sample(256, generator=torch.Generator().manual_seed(2), temperature=0.3)
    hot = prior.sample(256, generator=torch.Generator().manual_seed(2), temperature=1.0)
    assert cold.std(0).mean() < hot.std(0).mean()
    # samples look like the data: their NLL is in the data's range, unlike random poses
    assert prior.nll(hot).median() < prior.nll(torch.randn_like(hot)).median()


def test_project_lowers_nll_of_noisy_poses(trained):
    name, prior, x = trained
    noisy = x + 0.15 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    projected = prior.project(noisy)
    assert projected.shape == noisy.shape and torch.isfinite(projected).all()
    assert prior.nll(projected).mean() < prior.nll(noisy).mean()


def _completion_mask(prior):
    """Hide the right hand when the prior models it and more (whole-body priors, the two-hand VAE), the last 5
    joints otherwise (the name of the family plays no part)."""
    hand = torch.tensor([j in skeleton.PARTS["right_hand"] for j in prior.joints])
    if bool(hand.any()) and not bool(hand.all()):
        return ~hand
    mask = torch.ones(prior.num_joints, dtype=torch.bool)
    mask[-5:] = False
    return mask


def test_masked_completion_keeps_observed_joints(trained):
    name, prior, x = trained
    mask = _completion_mask(prior)
    samples = prior.sample(4, observed=x[:6], mask=mask, generator=torch.Generator().manual_seed(4))
    assert samples.shape == (4, 6, prior.num_joints, 3) and torch.isfinite(samples).all()
    torch.testing.assert_close(samples[:, :, mask], x[:6, mask].expand(4, -1, -1, -1))
    completed = prior.project(x[:6], mask)
    assert completed.shape == (6, prior.num_joints, 3) and torch.isfinite(completed).all()
    if "keep_observed" in prior.project_options():  # float64 poses: observed joints as given, not via float32
        x64 = x[:6].double() + 1e-12
        kept = prior.project(x64, mask, keep_observed=True)
        assert kept.dtype == torch.float64 and torch.equal(kept[:, mask], x64[:, mask])


def test_missing_part_marginal(trained):
    name, prior, x = trained
    if set(prior.joints) <= set(skeleton.PARTS["body"]):
        pytest.skip("body-only prior: no part is missing")
    mask = _completion_mask(prior)
    lp = prior.log_prob(x, mask)
    assert lp.shape == (64,) and torch.isfinite(lp).all()
    if prior.exact_log_prob:  # hiding joints from an exact density raises the density of the rest
        assert not torch.allclose(lp, prior.log_prob(x))


@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("clang++")), reason="torch.compile on CPU needs a C++ compiler"
)
@pytest.mark.parametrize("name", ["joint_flow", "global_flow"])
def test_compiled_nll_matches_eager(name):
    """``torch.compile(prior.nll)``, the tip for long fitting loops: the same values and pose gradients as eager.

    Compared in float64, where the compiled kernels' reassociation of sums (which differs across CPUs and vector
    widths) stays at the 1e-12 level, so the tolerance holds on any machine; in float32 it reaches 1e-4."""
    torch.manual_seed(0)
    prior, x = train(make(name))
    prior = prior.double().eval().requires_grad_(False)  # frozen, as posepriors.load returns it
    pose = x[:2].double().clone().requires_grad_(True)
    expected = prior.nll(pose)
    (expected_grad,) = torch.autograd.grad(expected.sum(), pose)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(prior.nll, dynamic=False)
        for _ in range(2):  # the second call reuses the compiled graphs
            value = compiled(pose)
            (grad,) = torch.autograd.grad(value.sum(), pose)
            assert value.dtype == grad.dtype == torch.float64
            torch.testing.assert_close(value, expected, atol=1e-8, rtol=1e-9)
            torch.testing.assert_close(grad, expected_grad, atol=1e-8, rtol=1e-8)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("name", ["gaussian_full", "joint_flow", "global_flow"])
def test_clear_caches_after_writes_through_data(name, monkeypatch):
    """Writes through ``.data`` bump no version counter, so the frozen caches keep the old weights (a silent wrong
    number) until ``clear_caches``; after it, every path (the NumPy flow of a few poses, the loops and tensor ops
    of a batch) scores with the new weights, as the uncached path with weights that require grad does."""
    monkeypatch.setattr(_numba_spline, "LOAD_AFTER", 0)
    prior = posepriors.load(name)
    x = prior.sample(300, generator=torch.Generator().manual_seed(0), temperature=0.7)
    batches = (x[:2], x)
    before = [prior.log_prob(b) for b in batches]
    with torch.no_grad():
        for p in prior.parameters():
            p.data.mul_(1.01)
    stale = [prior.log_prob(b) for b in batches]
    assert prior.clear_caches() is prior
    cleared = [prior.log_prob(b) for b in batches]
    prior.requires_grad_(True)  # no cache: the weights as they are
    with torch.no_grad():
        truth = [prior.log_prob(b) for b in batches]
    for old, s, c, t in zip(before, stale, cleared, truth, strict=True):
        assert (t - old).abs().max() > 0.5  # the change matters
        assert (s - t).abs().max() > 0.5  # and the caches alone do not see it
        torch.testing.assert_close(c, t, atol=1e-4, rtol=1e-5)
