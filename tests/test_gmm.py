"""The Gaussian mixture (``gmm``) and its one-component case, the full-covariance Gaussian: closed-form fit, EM,
exact marginals, conditional completion, the Wiener-filter denoiser, conditional sampling, save/load, training."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

import posepriors
from posepriors import skeleton
from posepriors import train as train_module
from posepriors.priors import GaussianConfig, GaussianPrior, GMMConfig, GMMPrior
from tests.families import check_device_and_dtype, make, synthetic_poses

MIN_STD = 0.01


def _random_mixture(K: int, D: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means (K, D), covariances (K, D, D) well above the floor, weights (K,)."""
    g = np.random.default_rng(seed)
    A = g.normal(size=(K, D, D)) * 0.15
    covs = A @ A.transpose(0, 2, 1) + 0.03 * np.eye(D)
    means = g.normal(size=(K, D)) * 0.4
    weights = g.dirichlet(np.full(K, 3.0))
    return means, covs, weights


def _prior_from(
    means: np.ndarray, covs: np.ndarray, weights: np.ndarray, joints: tuple[int, ...], dtype: torch.dtype
) -> GMMPrior:
    prior = GMMPrior(GMMConfig(joints=joints, num_components=len(weights), min_std=MIN_STD)).to(dtype)
    with torch.no_grad():
        prior.means.copy_(torch.from_numpy(means))
        prior._set_covariances(torch.from_numpy(covs))
        prior.logits.copy_(torch.from_numpy(np.log(weights)))
    return prior.eval().requires_grad_(False)


def _mixture_pdf(x: np.ndarray, means: np.ndarray, covs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return sum(w * multivariate_normal(m, c).pdf(x) for w, m, c in zip(weights, means, covs, strict=True))


def _sample_mixture(n: int, means: np.ndarray, covs: np.ndarray, weights: np.ndarray, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    k = g.choice(len(weights), size=n, p=weights)
    chol = np.linalg.cholesky(covs)
    return means[k] + np.einsum("nij,nj->ni", chol[k], g.normal(size=(n, means.shape[1])))


def _floor(cov: np.ndarray, floor: float) -> np.ndarray:
    eigval, eigvec = np.linalg.eigh(cov)
    return (eigvec * np.maximum(eigval, floor)) @ eigvec.T


def _conditional(x, obs, means, covs, weights):
    """Posterior mean of all coordinates given ``x[obs]`` under a mixture, by the textbook formula (numpy)."""
    mis = ~obs
    resp = np.array(
        [
            w * multivariate_normal(m[obs], c[np.ix_(obs, obs)]).pdf(x[obs])
            for w, m, c in zip(weights, means, covs, strict=True)
        ]
    )
    resp /= resp.sum()
    out = x.copy()
    out[mis] = sum(
        r * (m[mis] + c[np.ix_(mis, obs)] @ np.linalg.solve(c[np.ix_(obs, obs)], x[obs] - m[obs]))
        for r, m, c in zip(resp, means, covs, strict=True)
    )
    return out


# ---------------------------------------------------------------------------- exact density and marginals
@pytest.mark.parametrize("K", [1, 2])
def test_log_prob_matches_scipy_and_normalises(K):
    means, covs, weights = _random_mixture(K, 3, seed=K)
    prior = _prior_from(means, covs, weights, (1,), torch.float64)
    x = np.random.default_rng(5).normal(size=(6, 3)) * 0.4
    ref = np.log(_mixture_pdf(x, means, covs, weights))
    torch.testing.assert_close(prior.log_prob(torch.from_numpy(x).reshape(6, 1, 3)), torch.from_numpy(ref))
    # the density integrates to 1 over R^3 (Riemann sum on a fine grid; Gaussian tails beyond the box are ~1e-12)
    axis = torch.linspace(-3.5, 3.5, 101, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 1, 3)
    h = (axis[1] - axis[0]).item()
    total = prior.log_prob(grid).exp().sum().item() * h**3
    assert abs(total - 1) < 1e-6


@pytest.mark.parametrize("K", [1, 3])
def test_marginal_equals_brute_force_integral(K):
    """log_prob under a mask equals the numerical integral of the joint density over the hidden joint's 3
    coordinates, and the density of the sub-covariance computed independently with scipy."""
    means, covs, weights = _random_mixture(K, 6, seed=10 + K)
    prior = _prior_from(means, covs, weights, (1, 2), torch.float64)
    x = np.random.default_rng(3).normal(size=(3, 6)) * 0.4
    hide_second = torch.tensor([True, False])
    marginal = prior.log_prob(torch.from_numpy(x).reshape(3, 2, 3), hide_second)
    ref = np.log(_mixture_pdf(x[:, :3], means[:, :3], covs[:, :3, :3], weights))
    torch.testing.assert_close(marginal, torch.from_numpy(ref))
    axis = torch.linspace(-4.0, 4.0, 71, dtype=torch.float64)
    h = (axis[1] - axis[0]).item()
    hidden = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    for i in range(3):
        pose = torch.cat([torch.from_numpy(x[i, :3]).expand(len(hidden), 3), hidden], -1).reshape(-1, 2, 3)
        integral = prior.log_prob(pose).exp().sum().item() * h**3
        assert math.log(integral) == pytest.approx(marginal[i].item(), abs=1e-8)


def test_masks_work_like_every_other_family():
    """Masks over the prior's joints, over SMPL-X joints, per pose, and joints a dict does not carry."""
    joints = skeleton.resolve_joints("body+right_hand")
    D = 3 * len(joints)
    means, covs, weights = _random_mixture(2, D, seed=4)
    prior = _prior_from(means, covs, weights, joints, torch.float32)
    x = torch.from_numpy(_sample_mixture(5, means, covs, weights, seed=1)).float().reshape(5, -1, 3)
    body = torch.tensor([j in skeleton.PARTS["body"] for j in joints])
    sub = np.log(_mixture_pdf(x[:, body].reshape(5, -1).double().numpy(), means[:, :63], covs[:, :63, :63], weights))
    expected = torch.from_numpy(sub).float()
    torch.testing.assert_close(prior.log_prob(x, body), expected, atol=1e-3, rtol=1e-5)
    mask55 = torch.zeros(55, dtype=torch.bool)
    mask55[list(skeleton.PARTS["body"])] = True
    torch.testing.assert_close(prior.log_prob(x, mask55), expected, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(prior.log_prob(x, body.expand(5, -1)), expected, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(prior.log_prob({"body_pose": x[:, body]}), expected, atol=1e-3, rtol=1e-5)
    # per-pose masks: each row gets its own marginal
    mixed = torch.stack([body, ~body, body, torch.ones_like(body), ~body])
    lp = prior.log_prob(x, mixed)
    for i in range(5):
        torch.testing.assert_close(lp[i], prior.log_prob(x[i], mixed[i]))
    assert not torch.allclose(prior.log_prob(x, body), prior.log_prob(x))


def test_nll_gradient_reaches_the_pose():
    means, covs, weights = _random_mixture(1, 6, seed=2)
    prior = _prior_from(means, covs, weights, (1, 2), torch.float64)
    pose = torch.randn(4, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).mul(0.3)
    pose.requires_grad_(True)
    prior.nll(pose).sum().backward()
    expected = (
        torch.from_numpy(np.linalg.inv(covs[0])) @ (pose.detach().reshape(4, 6) - torch.from_numpy(means[0])).T
    ).T
    torch.testing.assert_close(pose.grad.reshape(4, 6), expected)
    # and under a mask (the marginal's gradient), for a mixture, in float32
    prior32 = _prior_from(*_random_mixture(3, 6, seed=3), (1, 2), torch.float32)
    pose32 = pose.detach().float().requires_grad_(True)
    prior32.nll(pose32, torch.tensor([True, False])).sum().backward()
    assert torch.isfinite(pose32.grad).all() and pose32.grad[:, 0].abs().sum() > 0
    assert torch.all(pose32.grad[:, 1] == 0)


def test_frozen_prior_caches_its_factors_and_sees_parameter_updates():
    means, covs, weights = _random_mixture(2, 6, seed=7)
    prior = _prior_from(means, covs, weights, (1, 2), torch.float64)  # frozen: requires_grad False
    x = torch.from_numpy(_sample_mixture(3, means, covs, weights, seed=1)).reshape(3, 2, 3)
    with torch.inference_mode():  # nothing computed here may be cached (inference tensors cannot enter autograd)
        prior.log_prob(x)
    pose = x.clone().requires_grad_(True)
    first = prior.nll(pose)
    first.sum().backward()
    assert prior._cache and torch.isfinite(pose.grad).all()
    assert torch.equal(prior.nll(x), first.detach())
    with torch.no_grad():  # in-place updates invalidate the cached covariances and factors
        prior.means.add_(0.1)
    moved = _prior_from(means + 0.1, covs, weights, (1, 2), torch.float64)
    torch.testing.assert_close(prior.nll(x), moved.nll(x))
    # a trainable prior builds the graph every call: gradients reach the parameters
    prior.requires_grad_(True)
    prior.nll(x).sum().backward()
    assert prior.tril_lower.grad is not None and prior.tril_lower.grad.abs().sum() > 0


def test_float64_inputs_and_priors():
    means, covs, weights = _random_mixture(2, 6, seed=6)
    p32 = _prior_from(means, covs, weights, (1, 2), torch.float32)
    p64 = _prior_from(means, covs, weights, (1, 2), torch.float64)
    x = torch.from_numpy(_sample_mixture(4, means, covs, weights, seed=2)).reshape(4, 2, 3)
    ref = torch.from_numpy(np.log(_mixture_pdf(x.reshape(4, 6).numpy(), means, covs, weights)))
    lp64 = p64.log_prob(x)
    assert lp64.dtype == torch.float64
    torch.testing.assert_close(lp64, ref, atol=1e-7, rtol=1e-8)  # the 1e-10 I jitter
    torch.testing.assert_close(p32.log_prob(x).double(), ref, atol=1e-3, rtol=1e-5)  # float64 input, float32 prior
    mask = torch.tensor([True, False])
    torch.testing.assert_close(p32.complete(x, mask).double(), p64.complete(x, mask), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        p32.project(x, noise_std=0.1).double(), p64.project(x, noise_std=0.1), atol=1e-4, rtol=1e-4
    )


# ---------------------------------------------------------------------------- completion, denoising, projection
@pytest.mark.parametrize("K", [1, 3])
def test_conditional_completion_matches_the_gaussian_formula(K):
    joints = (1, 2, 3)
    means, covs, weights = _random_mixture(K, 9, seed=20 + K)
    prior = _prior_from(means, covs, weights, joints, torch.float64)
    x = _sample_mixture(4, means, covs, weights, seed=7) + 0.1
    masks = [np.array([True, False, True]), np.array([False, True, False])]
    for joint_mask in masks:
        obs = np.repeat(joint_mask, 3)
        completed = prior.complete(torch.from_numpy(x).reshape(4, 3, 3), torch.from_numpy(joint_mask))
        expected = np.stack([_conditional(row, obs, means, covs, weights) for row in x])
        np.testing.assert_allclose(completed.reshape(4, 9).numpy(), expected, atol=1e-8)  # the 1e-10 I jitter
        assert np.array_equal(completed.reshape(4, 9).numpy()[:, obs], x[:, obs])  # observed joints untouched
        # the MAP/posterior-mean mode tends to the same completion as the observation noise vanishes
        tight = prior.project(torch.from_numpy(x).reshape(4, 3, 3), torch.from_numpy(joint_mask), noise_std=1e-5)
        np.testing.assert_allclose(tight.reshape(4, 9).numpy(), expected, atol=1e-6)
    # nothing missing: complete returns the poses
    assert torch.equal(prior.complete(torch.from_numpy(x).reshape(4, 3, 3)), torch.from_numpy(x).reshape(4, 3, 3))


def test_map_project_is_the_wiener_filter():
    means, covs, weights = _random_mixture(1, 9, seed=30)
    prior = _prior_from(means, covs, weights, (1, 2, 3), torch.float64)
    y = _sample_mixture(5, means, covs, weights, seed=8) + 0.2
    s = 0.1
    mu, S = means[0], covs[0]
    expected = mu + (S @ np.linalg.solve(S + s**2 * np.eye(9), (y - mu).T)).T
    out = prior.project(torch.from_numpy(y).reshape(5, 3, 3), noise_std=s)
    np.testing.assert_allclose(out.reshape(5, 9).numpy(), expected, atol=1e-10)
    # with hidden joints: the filter uses the observed ones only, the rest get the posterior mean
    obs = np.repeat([True, True, False], 3)
    gain = S[:, obs] @ np.linalg.inv(S[np.ix_(obs, obs)] + s**2 * np.eye(6))
    expected = mu + (gain @ (y[:, obs] - mu[obs]).T).T
    out = prior.project(torch.from_numpy(y).reshape(5, 3, 3), torch.tensor([True, True, False]), noise_std=s)
    np.testing.assert_allclose(out.reshape(5, 9).numpy(), expected, atol=1e-10)
    # for a mixture: the responsibility-weighted component filters (responsibilities of y under S_k + s^2 I)
    means, covs, weights = _random_mixture(3, 9, seed=31)
    prior = _prior_from(means, covs, weights, (1, 2, 3), torch.float64)
    noisy_covs = covs + s**2 * np.eye(9)
    resp = np.stack(
        [w * multivariate_normal(m, c).pdf(y) for w, m, c in zip(weights, means, noisy_covs, strict=True)], -1
    )
    resp /= resp.sum(-1, keepdims=True)
    filters = np.stack(
        [m + (c @ np.linalg.solve(nc, (y - m).T)).T for m, c, nc in zip(means, covs, noisy_covs, strict=True)], 1
    )  # (5, K, 9)
    expected = np.einsum("bk,bkd->bd", resp, filters)
    out = prior.project(torch.from_numpy(y).reshape(5, 3, 3), noise_std=s)
    np.testing.assert_allclose(out.reshape(5, 9).numpy(), expected, atol=1e-10)


def test_one_diagonal_component_behaves_like_the_gaussian_family():
    """log_prob, masks, fast project (clamp) and MAP project (Wiener filter) agree with ``gaussian``."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(21, 3, generator=g, dtype=torch.float64) * 0.2
    std = torch.linspace(0.05, 0.4, 63, dtype=torch.float64)[torch.randperm(63, generator=g)].reshape(21, 3)
    gauss = GaussianPrior(GaussianConfig(min_std=MIN_STD)).double()
    gmm = GMMPrior(GMMConfig(num_components=1, min_std=MIN_STD)).double()
    with torch.no_grad():
        gauss.mean.copy_(mean)
        gauss.log_std.copy_(std.log())
        gmm.means.copy_(mean.reshape(1, 63))
        gmm._set_covariances(torch.diag(std.reshape(63).square())[None])
    x = mean + std * 3 * torch.randn(6, 21, 3, generator=g, dtype=torch.float64)
    mask = torch.ones(21, dtype=torch.bool)
    mask[4:9] = False
    torch.testing.assert_close(gmm.log_prob(x), gauss.log_prob(x))
    torch.testing.assert_close(gmm.log_prob(x, mask), gauss.log_prob(x, mask))
    torch.testing.assert_close(gmm.project(x), gauss.project(x))
    torch.testing.assert_close(gmm.project(x, max_sigma=1.0), gauss.project(x, max_sigma=1.0))
    torch.testing.assert_close(gmm.project(x, mask), gauss.project(x, mask))
    torch.testing.assert_close(gmm.project(x, mask, noise_std=0.1), gauss.project(x, mask, noise_std=0.1))
    torch.testing.assert_close(gmm.complete(x, mask)[:, ~mask], mean[~mask].expand(6, -1, -1))


def test_fast_project_clamps_along_principal_axes_and_completes():
    means, covs, weights = _random_mixture(1, 9, seed=40)
    prior = _prior_from(means, covs, weights, (1, 2, 3), torch.float64)
    x = torch.from_numpy(_sample_mixture(64, means, covs, weights, seed=9)).reshape(64, 3, 3)
    noisy = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = prior.project(noisy)
    assert torch.all(prior.nll(out) <= prior.nll(noisy) + 1e-9)
    eigval, eigvec = np.linalg.eigh(covs[0])
    z = (out.reshape(64, 9).numpy() - means[0]) @ eigvec / np.sqrt(eigval)
    assert np.abs(z).max() <= 2 + 1e-6
    inside = prior.project(torch.from_numpy(means[0]).reshape(1, 3, 3))  # the mean is inside the box: unchanged
    torch.testing.assert_close(inside.reshape(9), torch.from_numpy(means[0]))
    mask = torch.tensor([True, True, False])
    out = prior.project(noisy, mask)
    torch.testing.assert_close(out, prior.complete(out, mask))  # missing joint = conditional mean of the clamped ones
    with pytest.raises(TypeError, match=r"expected options of the fast mode .* got \[.nonsense.\]"):
        prior.project(noisy, nonsense=1)
    with pytest.raises(ValueError, match="max_sigma"):
        prior.project(noisy, max_sigma=-1.0)


# ---------------------------------------------------------------------------- sampling
def test_sampling_is_reproducible_and_matches_the_mixture():
    means, covs, weights = _random_mixture(3, 6, seed=50)
    prior = _prior_from(means, covs, weights, (1, 2), torch.float64)
    a = prior.sample(8, generator=torch.Generator().manual_seed(3))
    b = prior.sample(8, generator=torch.Generator().manual_seed(3))
    assert a.shape == (8, 2, 3) and torch.equal(a, b)
    many = prior.sample(100000, generator=torch.Generator().manual_seed(0)).reshape(-1, 6).numpy()
    mix_mean = weights @ means
    mix_cov = sum(w * (c + np.outer(m - mix_mean, m - mix_mean)) for w, m, c in zip(weights, means, covs, strict=True))
    np.testing.assert_allclose(many.mean(0), mix_mean, atol=0.01)
    np.testing.assert_allclose(np.cov(many.T), mix_cov, atol=0.01)
    cold = prior.sample(4, temperature=0.0, generator=torch.Generator().manual_seed(1)).reshape(4, 6).numpy()
    assert all(np.abs(means - row).sum(-1).min() < 1e-9 for row in cold)  # temperature 0: component means


def test_conditional_sampling_draws_from_the_gaussian_conditional():
    means, covs, weights = _random_mixture(1, 9, seed=60)
    prior = _prior_from(means, covs, weights, (1, 2, 3), torch.float64)
    x = torch.from_numpy(_sample_mixture(2, means, covs, weights, seed=3)).reshape(2, 3, 3)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    draws = prior.sample(30000, observed=x, mask=mask, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (30000, 2, 3, 3)
    assert torch.equal(draws[:, mask], x[mask].expand(30000, -1, -1))
    for i in range(2):
        obs = np.repeat(mask[i].numpy(), 3)
        mis = ~obs
        S = covs[0]
        cond_cov = S[np.ix_(mis, mis)] - S[np.ix_(mis, obs)] @ np.linalg.solve(S[np.ix_(obs, obs)], S[np.ix_(obs, mis)])
        hidden = draws[:, i].reshape(-1, 9)[:, torch.from_numpy(mis)].numpy()
        np.testing.assert_allclose(hidden.mean(0), prior.complete(x[i], mask[i]).reshape(9)[mis].numpy(), atol=0.01)
        np.testing.assert_allclose(np.cov(hidden.T), cond_cov, atol=0.005)
    again = prior.sample(5, observed=x, mask=mask, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, prior.sample(5, observed=x, mask=mask, generator=torch.Generator().manual_seed(1)))


# ---------------------------------------------------------------------------- fitting
def test_one_component_fit_is_the_sample_mean_and_covariance():
    means, covs, weights = _random_mixture(1, 9, seed=70)
    data = _sample_mixture(3000, means, covs, weights, seed=1)
    prior = GMMPrior(GMMConfig(joints=(1, 2, 3), num_components=1, min_std=MIN_STD)).double()
    assert prior.fit(torch.from_numpy(data).reshape(-1, 3, 3)) is prior
    np.testing.assert_allclose(prior.means.detach().numpy()[0], data.mean(0), atol=1e-12)
    np.testing.assert_allclose(prior.covariance().detach().numpy()[0], np.cov(data.T, bias=True), atol=1e-9)
    assert len(prior.fit_history) == 1
    torch.testing.assert_close(
        torch.tensor(prior.fit_history[0], dtype=torch.float64),
        prior.log_prob(torch.from_numpy(data).reshape(-1, 3, 3)).mean(),
    )
    # float32 prior, float32 data: the same to float precision
    p32 = GMMPrior(GMMConfig(joints=(1, 2, 3), num_components=1)).fit(torch.from_numpy(data).float().reshape(-1, 3, 3))
    np.testing.assert_allclose(p32.covariance().detach().numpy()[0], np.cov(data.T, bias=True), atol=1e-6)


def test_fit_floors_the_eigenvalues_at_min_std():
    g = np.random.default_rng(0)
    data = g.normal(size=(500, 2, 3)) * 0.2
    data[:, 1] = 0.3  # a joint that never moves (like the eyes)
    prior = GMMPrior(GMMConfig(joints=(1, 2), num_components=1, min_std=0.05)).double().fit(torch.from_numpy(data))
    cov = prior.covariance().detach().numpy()[0]
    np.testing.assert_allclose(cov, _floor(np.cov(data.reshape(500, 6).T, bias=True), 0.05**2), atol=1e-8)
    assert np.linalg.eigvalsh(cov).min() >= 0.05**2 - 1e-12
    assert torch.isfinite(prior.log_prob(torch.from_numpy(data))).all()
    # the alternative regularisation adds the floor to every eigenvalue
    added = GMMPrior(GMMConfig(joints=(1, 2), num_components=1, min_std=0.05)).double()
    added.fit(torch.from_numpy(data), regularization="add")
    expected = np.cov(data.reshape(500, 6).T, bias=True) + 0.05**2 * np.eye(6)
    np.testing.assert_allclose(added.covariance().detach().numpy()[0], expected, atol=1e-8)


def test_fit_with_missing_joints_uses_pairwise_statistics():
    """Frames observing joints {0, 1} and frames observing {1, 2}: means per coordinate, covariances per pair from
    the frames that observe both, 0 for pairs never observed together, then the floor."""
    means, covs, weights = _random_mixture(1, 9, seed=80)
    data = _sample_mixture(1000, means, covs, weights, seed=2)
    observed = np.ones((1000, 3), dtype=bool)
    observed[:600, 2] = False
    observed[600:, 0] = False
    prior = GMMPrior(GMMConfig(joints=(1, 2, 3), num_components=1, min_std=MIN_STD)).double()
    poses = torch.from_numpy(np.where(np.repeat(observed, 3, 1), data, np.nan)).reshape(-1, 3, 3)
    prior.fit(poses, torch.from_numpy(observed))
    w = np.repeat(observed, 3, 1)
    mu = np.array([data[w[:, d], d].mean() for d in range(9)])
    S = np.zeros((9, 9))
    for i in range(9):
        for j in range(9):
            both = w[:, i] & w[:, j]
            if both.any():
                S[i, j] = ((data[both, i] - mu[i]) * (data[both, j] - mu[j])).mean()
    np.testing.assert_allclose(prior.means.detach().numpy()[0], mu, atol=1e-12)
    np.testing.assert_allclose(prior.covariance().detach().numpy()[0], _floor(S, MIN_STD**2), atol=1e-9)
    cov = prior.covariance().detach().numpy()[0]
    assert np.abs(cov[:3, 6:]).max() < 1e-8  # joints 0 and 2 never seen together: independent


def test_em_increases_the_likelihood_monotonically():
    means, covs, weights = _random_mixture(3, 6, seed=90)
    means *= 3  # well separated
    data = _sample_mixture(1500, means, covs, weights, seed=4)
    poses = torch.from_numpy(data).reshape(-1, 2, 3)
    prior = GMMPrior(GMMConfig(joints=(1, 2), num_components=3, min_std=MIN_STD)).double()
    prior.fit(poses, generator=torch.Generator().manual_seed(0), tol=0.0, max_iter=40)
    history = np.array(prior.fit_history)
    assert len(history) > 5 and np.all(np.diff(history) >= -1e-9)
    truth = np.log(_mixture_pdf(data, means, covs, weights)).mean()
    assert prior.log_prob(poses).mean().item() > truth - 1e-3  # the ML fit is at least as likely as the truth
    np.testing.assert_allclose(np.sort(torch.softmax(prior.logits.detach(), -1).numpy()), np.sort(weights), atol=0.03)
    # frames that miss joints (EM for missing data): still monotone, still close to the truth
    observed = np.ones((1500, 2), dtype=bool)
    observed[:400, 1] = False
    observed[400:700, 0] = False
    missing = GMMPrior(GMMConfig(joints=(1, 2), num_components=3, min_std=MIN_STD)).double()
    missing.fit(poses, torch.from_numpy(observed), generator=torch.Generator().manual_seed(0), tol=0.0, max_iter=40)
    assert np.all(np.diff(missing.fit_history) >= -1e-9)
    assert abs(missing.log_prob(poses).mean().item() - prior.log_prob(poses).mean().item()) < 0.1


def test_em_is_reproducible_with_a_generator_and_stops_at_tol():
    means, covs, weights = _random_mixture(4, 6, seed=91)
    poses = torch.from_numpy(_sample_mixture(800, means, covs, weights, seed=5)).float().reshape(-1, 2, 3)
    fits = [
        GMMPrior(GMMConfig(joints=(1, 2), num_components=4)).fit(poses, generator=torch.Generator().manual_seed(s))
        for s in (1, 1)
    ]
    for a, b in zip(fits[0].parameters(), fits[1].parameters(), strict=True):
        assert torch.equal(a, b)
    stopped = GMMPrior(GMMConfig(joints=(1, 2), num_components=4)).fit(
        poses, generator=torch.Generator().manual_seed(1), tol=1e-3
    )
    assert len(stopped.fit_history) < 200 and stopped.fit_history[-1] - stopped.fit_history[-2] < 1e-3
    rand = GMMPrior(GMMConfig(joints=(1, 2), num_components=4)).fit(
        poses, generator=torch.Generator().manual_seed(1), init="random", max_iter=5
    )
    assert len(rand.fit_history) <= 5 and torch.isfinite(rand.log_prob(poses)).all()
    added = GMMPrior(GMMConfig(joints=(1, 2), num_components=4)).fit(poses, regularization="add", max_iter=5)
    assert torch.linalg.eigvalsh(added.covariance()).min() >= MIN_STD**2 and torch.isfinite(added.log_prob(poses)).all()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda p: p.fit(torch.zeros(10, 3, 3)), ValueError, r"expected poses of shape \(N, 2, 3\)"),
        (lambda p: p.fit(torch.zeros(10, 2, 3, dtype=torch.long)), TypeError, r"floating-point"),
        (lambda p: p.fit(torch.zeros(10, 2, 3), torch.ones(10, 2)), ValueError, r"boolean observed mask"),
        (lambda p: p.fit(torch.zeros(1, 2, 3)), ValueError, r"at least 2 poses"),
        (lambda p: p.fit(torch.full((10, 2, 3), float("nan"))), ValueError, r"finite"),
        (lambda p: p.fit(torch.zeros(10, 2, 3), init="best"), ValueError, r"init"),
        (lambda p: p.fit(torch.zeros(10, 2, 3), max_iter=0), ValueError, r"max_iter"),
        (lambda p: p.fit(torch.zeros(10, 2, 3), tol=-1.0), ValueError, r"tol"),
        (lambda p: p.fit(torch.zeros(10, 2, 3), regularization="ridge"), ValueError, r"regularization"),
    ],
)
def test_bad_fit_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call(GMMPrior(GMMConfig(joints=(1, 2), num_components=2)))


def test_bad_config_raises():
    with pytest.raises(ValueError, match="num_components"):
        GMMConfig(num_components=0)
    with pytest.raises(ValueError, match="min_std"):
        GMMConfig(min_std=-1.0)
    with pytest.raises(ValueError, match="min_std > 0"):
        GMMPrior(GMMConfig(joints=(1,), num_components=1, min_std=0.0)).fit(torch.randn(10, 1, 3))
    with pytest.raises(ValueError, match="num_components=4"):
        GMMPrior(GMMConfig(joints=(1,), num_components=4)).fit(torch.randn(3, 1, 3))


# ---------------------------------------------------------------------------- saving and training
def test_save_load_round_trip(tmp_path):
    joints = skeleton.resolve_joints("body+left_hand+right_hand")
    g = torch.Generator().manual_seed(0)
    poses = torch.randn(300, len(joints), 3, generator=g) * 0.3
    observed = torch.ones(300, len(joints), dtype=torch.bool)
    observed[:150, 21:] = False  # body-only frames
    observed[150:, :21] = False  # hand-only frames
    prior = GMMPrior(GMMConfig(joints="body+left_hand+right_hand", num_components=1)).fit(poses, observed)
    posepriors.save_pretrained(prior, tmp_path / "gaussian_full")
    loaded = posepriors.load(tmp_path / "gaussian_full")
    assert type(loaded) is GMMPrior and loaded.config == prior.config
    assert not any(p.requires_grad for p in loaded.parameters())
    x = poses[:4]
    assert torch.equal(loaded.log_prob(x), prior.log_prob(x))
    hands = torch.zeros(len(joints), dtype=torch.bool)
    hands[21:] = True
    assert torch.equal(loaded.log_prob(x, hands), prior.log_prob(x, hands))
    assert torch.equal(loaded.complete(x, hands), prior.complete(x, hands))


def _write_training_data(folder, n: int = 300):
    folder.mkdir()
    g = np.random.default_rng(0)
    body = (g.normal(size=(n, 21, 3)) * 0.2).astype(np.float32)
    hands = (g.normal(size=(n, 30, 3)) * 0.2).astype(np.float32)
    np.savez(folder / "body.npz", body_pose=body, source=np.array([f"s{i % 6}" for i in range(n)]))
    np.savez(
        folder / "hands.npz",
        left_hand_pose=hands[:, :15],
        right_hand_pose=hands[:, 15:],
        sequence=np.array([f"h{i % 5}" for i in range(n)]),
    )


def test_posepriors_train_fits_in_closed_form(tmp_path):
    """``posepriors-train gmm`` calls the closed-form fit on all training frames (body-only and hand-only ones),
    records it as one epoch and saves a model equal to a direct ``fit``."""
    _write_training_data(tmp_path / "data")
    out = tmp_path / "out"
    args = ["gmm", "--joints", "body+left_hand+right_hand", "--num_components", "1", "--data_dir"]
    args += [str(tmp_path / "data"), "--val_fraction", "0.3", "--out", str(out), "--logger", "none"]
    assert train_module.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_epoch"] == 1 and len(metrics["history"]) == 1 and metrics["closed_form"]
    saved = posepriors.load(out)
    data = posepriors.data.load_poses(tmp_path / "data")
    train_split, val_split = data.split_by_sequence(0.3, seed=0)
    train = train_module.prepare_data(train_split, saved.joints)
    direct = GMMPrior(saved.config).fit(train.poses, train.observed)
    torch.testing.assert_close(saved.covariance(), direct.covariance(), atol=1e-6, rtol=1e-6)
    val = train_module.prepare_data(val_split, saved.joints).complete(torch.Generator().manual_seed(3))
    assert abs(saved.validation_nll(val).mean().item() - metrics["val_nll"]) < 1e-3


@pytest.mark.shared_data
def test_full_covariance_beats_the_diagonal_gaussian_on_shared_body_data(shared_data):
    train = torch.from_numpy(np.load(shared_data / "body_train.npz")["body_pose"])
    val = torch.from_numpy(np.load(shared_data / "body_val.npz")["body_pose"])
    full = GMMPrior(GMMConfig(num_components=1)).fit(train)
    diagonal = GaussianPrior().fit(train)
    nll_full, nll_diag = full.nll(val).mean().item(), diagonal.nll(val).mean().item()
    assert nll_full < nll_diag - 5 and -150 < nll_full < 50


def test_gmm_on_the_requested_device_and_dtype(device, dtype):
    """``pytest --device cuda --dtype float64`` runs this on a GPU in float64 (it skips where there is none)."""
    check_device_and_dtype(make("gmm"), device, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_log_prob_in_half_precision_solves_in_float32(dtype):
    prior = make("gmm").eval()
    x = synthetic_poses(4, prior.joints, seed=3)
    mask = torch.ones(prior.num_joints, dtype=torch.bool)
    mask[-1] = False
    references = ((None, prior.log_prob(x)), (mask, prior.log_prob(x, mask)))
    prior.to(dtype)
    for m, reference in references:
        got = prior.log_prob(x.to(dtype), m)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), reference, rtol=2e-2, atol=1.0)


def test_posterior_mean_with_a_broad_component_is_the_mixtures():
    """``project(noise_std=s)`` of a GMM with a broad component is the exact mixture's posterior mean: checked
    against self-normalised importance sampling with 400,000 draws of the prior (one joint, 3-D), with a joint
    missing too; and ``denoise`` runs it in closed form."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(4000, 2, 3, generator=g) * torch.tensor([0.3, 0.1, 0.2]) + 0.2
    prior = GMMPrior(GMMConfig(joints=(16, 18), num_components=2, broad_weight=0.3)).double()
    prior.fit(data.double(), generator=torch.Generator().manual_seed(1))
    prior.fit_broad(data.double())
    with torch.no_grad():  # a broad part unlike the Gaussian part, so that mixing them matters
        prior.broad.means.add_(torch.tensor([[0.5], [-0.5]], dtype=torch.float64))
        prior.broad.stds.mul_(2.0)
    prior.eval().requires_grad_(False)
    draws = prior.sample(400_000, generator=torch.Generator().manual_seed(2)).flatten(1)  # (N, 6)
    y = torch.tensor([[0.9, -0.4, 0.1, 0.2, 0.3, 0.0], [0.2, 0.2, 0.2, 0.1, 0.2, 0.1]], dtype=torch.float64)
    s = 0.3
    for mask in (None, torch.tensor([True, False])):
        seen = slice(None) if mask is None else slice(0, 3)
        weights = torch.softmax(-((draws[None, :, seen] - y[:, None, seen]) ** 2).sum(-1) / (2 * s**2), dim=1)
        want = weights @ draws  # (2, 6)
        got = prior.project(y.reshape(2, 2, 3), mask, noise_std=s).reshape(2, 6)
        torch.testing.assert_close(got, want, atol=0.01, rtol=0)
        without = copy.deepcopy(prior)
        without.broad = None
        assert (without.project(y.reshape(2, 2, 3), mask, noise_std=s).reshape(2, 6) - want).abs().max() > 0.03
    assert prior.denoise_estimator(s) == "closed_form"
    poses = y.reshape(2, 2, 3)
    torch.testing.assert_close(prior.denoise(poses, noise_std=s), prior.project(poses, noise_std=s))


def test_the_bundled_hand_prior_does_not_put_a_flat_hand_hundreds_of_nats_out():
    """The flat hand, the usual start of a fit, scored +569 nats under the hand Gaussian alone (the diagonal
    gaussian: +13.7); the shipped `hands` mixes in a broad component."""
    hands = posepriors.load("hands")
    flat = {"left_hand_pose": torch.zeros(1, 45), "right_hand_pose": torch.zeros(1, 45)}
    assert hands.config.broad_weight > 0
    assert hands.nll(flat).item() < 30
    alone = copy.deepcopy(hands)
    alone.broad = None
    assert alone.nll(flat).item() > 300
