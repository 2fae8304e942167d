"""The Gaussian prior and, through it, the PosePrior input handling shared by every family."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import posepriors
from posepriors import skeleton
from posepriors.priors import GaussianConfig, GaussianPrior
from tests.families import check_device_and_dtype, make


def _data(n: int = 512, joints: tuple[int, ...] = skeleton.PARTS["body"], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(len(joints), 3, generator=g) * 0.3
    std = torch.rand(len(joints), 3, generator=g) * 0.3 + 0.05
    return mean + std * torch.randn(n, len(joints), 3, generator=g)


@pytest.fixture
def prior() -> GaussianPrior:
    return GaussianPrior().fit(_data())


def test_closed_form_fit_matches_moments():
    x = _data(2000)
    prior = GaussianPrior().fit(x)
    torch.testing.assert_close(prior.mean.data, x.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(prior.std, x.std(0, unbiased=False), atol=1e-5, rtol=1e-4)


def test_log_prob_matches_torch_distributions(prior):
    x = _data(8, seed=1)
    ref = torch.distributions.Normal(prior.mean, prior.std).log_prob(x).sum((-1, -2))
    torch.testing.assert_close(prior.log_prob(x), ref)
    torch.testing.assert_close(prior.nll(x), -ref)


def test_std_floor_keeps_constant_joints_finite():
    x = _data(100, joints=skeleton.resolve_joints("all"))
    x[:, skeleton.PARTS["eyes"]] = 0.0  # eyes never move in the data
    prior = GaussianPrior(GaussianConfig(joints="all", min_std=0.01)).fit(x)
    assert torch.all(prior.std >= 0.01)
    assert torch.isfinite(prior.log_prob(x)).all()
    assert sum(p.numel() for p in prior.parameters()) == 330  # mean and log-std for 55 x 3


def test_gradient_fit_approaches_closed_form():
    x = _data(1024)
    prior = GaussianPrior()
    opt = torch.optim.Adam(prior.parameters(), lr=5e-2)
    for _ in range(300):
        opt.zero_grad()
        prior.training_loss(x).backward()
        opt.step()
    exact = GaussianPrior().fit(x)
    assert prior.nll(x).mean() - exact.nll(x).mean() < 0.05  # within 0.05 nats of the optimum


def test_mask_gives_exact_marginal(prior):
    x = _data(4, seed=2)
    mask = torch.zeros(prior.num_joints, dtype=torch.bool)
    mask[[0, 3, 7]] = True
    sub = torch.distributions.Normal(prior.mean[mask], prior.std[mask]).log_prob(x[:, mask]).sum((-1, -2))
    torch.testing.assert_close(prior.log_prob(x, mask), sub)
    # the same mask over SMPL-X joints, and per-pose masks
    mask55 = torch.zeros(55, dtype=torch.bool)
    mask55[torch.tensor(prior.joints)[mask]] = True
    torch.testing.assert_close(prior.log_prob(x, mask55), sub)
    torch.testing.assert_close(prior.log_prob(x, mask.expand(4, -1)), sub)


def test_formats_agree(prior):
    body = _data(3, seed=3)
    full = torch.zeros(3, 55, 3)
    full[:, 1:22] = body
    lp = prior.log_prob(body)
    torch.testing.assert_close(prior.log_prob(full), lp)
    torch.testing.assert_close(prior.log_prob(full.reshape(3, 165)), lp)
    torch.testing.assert_close(prior.log_prob(body.reshape(3, 63)), lp)
    torch.testing.assert_close(prior.log_prob(body.numpy()), lp)
    torch.testing.assert_close(prior.log_prob({"body_pose": body.reshape(3, 63)}), lp)
    seed53 = skeleton.from_smplx(full, "seed53")
    torch.testing.assert_close(prior.log_prob(seed53), lp)
    torch.testing.assert_close(prior.log_prob(body[0]), lp[0])  # unbatched -> scalar
    assert prior.log_prob(body.reshape(1, 3, 21, 3)).shape == (1, 3)


def test_missing_joints_are_marginalised():
    prior = GaussianPrior(GaussianConfig(joints="body+left_hand+right_hand")).fit(
        _data(256, joints=skeleton.resolve_joints("body+left_hand+right_hand"))
    )
    body = _data(2, seed=4)
    body_only = GaussianPrior(GaussianConfig(joints="body"))
    body_only.mean.data = prior.mean.data[:21]
    body_only.log_std.data = prior.log_std.data[:21]
    torch.testing.assert_close(prior.log_prob({"body_pose": body}), body_only.log_prob(body))


def test_nll_is_differentiable_wrt_pose(prior):
    x = _data(2, seed=5).requires_grad_(True)
    prior.nll(x).sum().backward()
    expected = (x.detach() - prior.mean) / prior.std.square()
    torch.testing.assert_close(x.grad, expected.detach())


def test_sample_is_reproducible_and_shaped(prior):
    a = prior.sample(16, generator=torch.Generator().manual_seed(7))
    b = prior.sample(16, generator=torch.Generator().manual_seed(7))
    assert a.shape == (16, 21, 3)
    torch.testing.assert_close(a, b)
    cold = prior.sample(4, temperature=0.0)
    torch.testing.assert_close(cold, prior.mean.expand(4, -1, -1).detach())
    many = prior.sample(20000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(many.std(0), prior.std.detach(), atol=0.01, rtol=0.05)


def test_sample_completes_missing_joints(prior):
    x = _data(3, seed=6)
    mask = torch.ones(21, dtype=torch.bool)
    mask[5:9] = False
    out = prior.sample(10, observed=x, mask=mask, generator=torch.Generator().manual_seed(0))
    assert out.shape == (10, 3, 21, 3)
    torch.testing.assert_close(out[:, :, mask], x[:, mask].expand(10, -1, -1, -1))
    assert not torch.allclose(out[0, :, ~mask], out[1, :, ~mask])


def test_project_lowers_nll_of_noisy_poses(prior, generator):
    clean = prior.sample(64, generator=generator)
    noisy = clean + 0.5 * torch.randn(clean.shape, generator=generator)
    projected = prior.project(noisy)
    assert projected.shape == noisy.shape
    assert torch.all(prior.nll(projected) <= prior.nll(noisy) + 1e-5)
    assert prior.nll(projected).mean() < prior.nll(noisy).mean() - 10
    mask = torch.ones(21, dtype=torch.bool)
    mask[:4] = False
    completed = prior.project(noisy, mask)
    torch.testing.assert_close(completed[:, :4], prior.mean[:4].expand(64, -1, -1).detach())


def test_so3_measure_is_a_jacobian_shift(prior):
    x = _data(5, seed=8)
    diff = prior.log_prob(x, measure="so3") - prior.log_prob(x)
    theta = x.norm(dim=-1)
    haar = torch.log(2 * (1 - torch.cos(theta)) / theta.square()).sum(-1)
    torch.testing.assert_close(diff, 21 * math.log(8 * math.pi**2) - haar, atol=1e-4, rtol=1e-5)


def test_float64_prior(prior):
    p64 = prior.to(torch.float64)
    x = _data(3, seed=9).double()
    assert p64.log_prob(x).dtype == torch.float64


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (torch.zeros(2, 20, 3), ValueError, r"expected a pose of shape"),
        (torch.zeros(2, 7), ValueError, r"expected a pose of shape"),
        (torch.zeros(2, 21, 3, dtype=torch.long), TypeError, r"floating"),
        (torch.full((2, 21, 3), float("nan")), ValueError, r"expected finite"),
        (torch.zeros(0, 21, 3), ValueError, r"empty batch"),
        ("a pose", TypeError, r"expected a pose tensor"),
        ({"body_pose": torch.zeros(2, 63), "tail_pose": torch.zeros(2, 3)}, ValueError, r"tail_pose"),
    ],
)
def test_bad_pose_raises(prior, bad, error, match):
    with pytest.raises(error, match=match):
        prior.log_prob(bad)


@pytest.mark.parametrize(
    ("mask", "error", "match"),
    [
        (torch.ones(20, dtype=torch.bool), ValueError, r"expected a mask of shape"),
        (torch.ones(21), TypeError, r"boolean mask"),
        (torch.ones(3, 21, dtype=torch.bool), ValueError, r"expected a mask that broadcasts to the pose batch shape"),
        (torch.zeros(21, dtype=torch.bool), ValueError, r"at least one observed joint"),
    ],
)
def test_bad_mask_raises(prior, mask, error, match):
    with pytest.raises(error, match=match):
        prior.log_prob(torch.zeros(2, 21, 3), mask)


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_bad_sample_count_raises(prior, n):
    with pytest.raises(ValueError, match="n >= 1"):
        prior.sample(n)


def test_bad_temperature_and_project_args_raise(prior):
    with pytest.raises(ValueError, match="temperature"):
        prior.sample(2, temperature=-1)
    with pytest.raises(TypeError, match=r"expected options of the fast mode .* got \[.nonsense.\]"):
        prior.project(torch.zeros(1, 21, 3), nonsense=1)
    with pytest.raises(ValueError, match="fit"):
        GaussianPrior().fit(torch.zeros(1, 21, 3))
    with pytest.raises(ValueError, match="min_std"):
        GaussianConfig(min_std=0)
    with pytest.raises(ValueError, match="measure"):
        prior.log_prob(torch.zeros(1, 21, 3), measure="haar")


@pytest.mark.shared_data
def test_fit_on_shared_body_data_round_trips(shared_data, tmp_path):
    train = np.load(shared_data / "body_train.npz")["body_pose"]
    val = torch.from_numpy(np.load(shared_data / "body_val.npz")["body_pose"])
    prior = GaussianPrior().fit(torch.from_numpy(train))
    nll = prior.nll(val).mean().item()
    posepriors.save_pretrained(prior, tmp_path / "g")
    loaded = posepriors.load(tmp_path / "g")
    torch.testing.assert_close(loaded.log_prob(val), prior.log_prob(val), rtol=0, atol=0)
    # a fitted Gaussian is far better than an untrained one, and plausible for 63 dims of human motion
    assert nll < GaussianPrior().nll(val).mean().item() - 20
    assert -150 < nll < 50


def test_gaussian_on_the_requested_device_and_dtype(device, dtype):
    """``pytest --device cuda --dtype float64`` runs this on a GPU in float64 (it skips where there is none)."""
    check_device_and_dtype(make("gaussian"), device, dtype)
