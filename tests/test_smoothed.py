"""The posterior-mean denoiser: a smoothed body density (Tweedie's formula), ``PosePrior.denoise`` and its fallbacks."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

import posepriors
from posepriors import skeleton
from posepriors.priors.broad import MarginalMixture
from posepriors.priors.gaussian import GaussianConfig, GaussianPrior
from posepriors.priors.global_flow import GlobalFlowConfig, GlobalFlowPrior
from posepriors.priors.smoothed import SmoothedBody

SIGMA = 0.1


def _correlated_body(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draws from one correlated Gaussian over the body: poses (n, 21, 3), its mean (63,) and covariance (63, 63)."""
    g = torch.Generator().manual_seed(0)  # one distribution; ``seed`` picks the draws
    mean = 0.3 * torch.randn(63, generator=g)
    factors = 0.15 * torch.randn(63, 4, generator=g)
    cov = factors @ factors.T + torch.diag(0.002 + 0.004 * torch.rand(63, generator=g))
    g = torch.Generator().manual_seed(1000 + seed)
    x = mean + torch.randn(n, 63, generator=g) @ torch.linalg.cholesky(cov).T
    return x.reshape(n, 21, 3), mean, cov


def _wiener(y: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, sigma: float) -> torch.Tensor:
    """The posterior mean under the true Gaussian, (B, 63)."""
    gain = cov @ torch.linalg.inv(cov + sigma**2 * torch.eye(63))
    return mean + (y - mean) @ gain.T


def _small_flow(joints: str = "body", **changes: object) -> GlobalFlowPrior:
    settings = dict(
        joints=joints,
        coupling="spline",
        bins=4,
        hidden=16,
        num_layers=2,
        conditional=True,
        smoothed_noise_std=SIGMA,
        smoothed_members=2,
        smoothed_hidden=32,
        smoothed_num_layers=2,
        smoothed_epochs=12,
    )
    settings.update(changes)
    return GlobalFlowPrior(GlobalFlowConfig(**settings)).eval()


@pytest.fixture(scope="module")
def trained() -> tuple[GlobalFlowPrior, torch.Tensor, torch.Tensor]:
    """A body global_flow whose smoothed density is trained on correlated Gaussian poses; with that mean and cov."""
    poses, mean, cov = _correlated_body(4096)
    torch.manual_seed(0)
    prior = _small_flow()
    prior.smoothed.fit(poses, epochs=12, learning_rate=1e-2)  # a larger step than the default: a short test
    return prior, mean, cov


def test_tweedie_formula_with_a_known_density_is_the_wiener_filter():
    _, mean, cov = _correlated_body(8)
    smoothed = SmoothedBody(SIGMA, members=1, hidden=8, num_layers=1).double()
    noisy_cov = cov.double() + SIGMA**2 * torch.eye(63, dtype=torch.float64)
    density = torch.distributions.MultivariateNormal(mean.double(), noisy_cov)
    y = mean.double() + torch.randn(5, 63, dtype=torch.float64)
    out = smoothed.posterior_mean(y, density.log_prob)
    torch.testing.assert_close(out, _wiener(y, mean.double(), cov.double(), SIGMA))


def test_the_ensemble_density_is_the_equal_mixture_of_its_prescaled_flows():
    smoothed = SmoothedBody(SIGMA, members=3, hidden=8, num_layers=1).double()
    smoothed.mean.copy_(torch.linspace(-0.2, 0.2, 63))
    smoothed.var.copy_(torch.linspace(0.01, 0.2, 63))
    y = 0.3 * torch.randn(6, 63, dtype=torch.float64)
    std = (smoothed.var + SIGMA**2).sqrt()
    u = ((y - smoothed.mean) / std).unsqueeze(1)
    members = torch.cat([flow.log_prob(u) for flow in smoothed.flows], -1)
    expected = torch.logsumexp(members, -1) - math.log(3) - std.log().sum()
    torch.testing.assert_close(smoothed.log_prob(y), expected)
    with pytest.raises(ValueError, match=r"expected noisy body poses of shape \(B, 63\), got \(6, 21, 3\)"):
        smoothed.log_prob(y.reshape(6, 21, 3))


def test_a_trained_smoothed_density_denoises_nearly_as_well_as_the_true_posterior_mean(trained):
    prior, mean, cov = trained
    clean, _, _ = _correlated_body(1024, seed=1)
    noisy = clean + SIGMA * torch.randn(clean.shape, generator=torch.Generator().manual_seed(2))
    out = prior.denoise(noisy, noise_std=SIGMA)
    mse = (out - clean).square().mean().item()
    wiener = (_wiener(noisy.flatten(1), mean, cov, SIGMA) - clean.flatten(1)).square().mean().item()
    var = cov.diagonal()
    diagonal = mean + (noisy.flatten(1) - mean) * var / (var + SIGMA**2)  # what a per-coordinate prior can do
    diagonal_mse = (diagonal - clean.flatten(1)).square().mean().item()
    before = (noisy - clean).square().mean().item()
    assert wiener < 0.7 * diagonal_mse < 0.7 * before  # the test is informative: the correlations matter
    assert mse < 0.8 * diagonal_mse and mse < 1.3 * wiener, (mse, wiener, diagonal_mse, before)
    # the MAP of the family's untrained density is no posterior mean: the estimators differ
    assert prior.denoise_estimator(SIGMA) == "tweedie"


def test_denoise_falls_back_to_the_map_with_a_warning_at_another_noise_level(trained):
    prior, _, _ = trained
    noisy = _correlated_body(4, seed=3)[0]
    assert prior.denoise_estimator(0.05) == "map"
    with pytest.warns(UserWarning, match=r"no posterior mean at noise_std=0.05 .*noise_std=0.1 only.*MAP"):
        out = prior.denoise(noisy, noise_std=0.05)
    torch.testing.assert_close(out, prior.project(noisy, noise_std=0.05))


def test_gaussian_families_denoise_in_closed_form_without_a_warning():
    poses, _, _ = _correlated_body(512)
    prior = GaussianPrior(GaussianConfig(joints="body")).fit(poses).eval()
    noisy = poses[:8] + 0.1
    assert prior.denoise_estimator(SIGMA) == "closed_form"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = prior.denoise(noisy, noise_std=SIGMA)
    torch.testing.assert_close(out, prior.project(noisy, noise_std=SIGMA))
    assert posepriors.load("gaussian_full").denoise_estimator(SIGMA) == "closed_form"


def test_a_mask_that_hides_body_joints_gets_the_map_with_a_warning_that_says_why(trained):
    prior, _, _ = trained
    noisy = _correlated_body(3, seed=4)[0]
    mask = torch.ones(3, 21, dtype=torch.bool)
    mask[:, 5] = False
    assert prior.denoise_estimator(SIGMA, mask) == "map" and prior.denoise_estimator(SIGMA, mask[0]) == "map"
    assert prior.denoise_estimator(SIGMA, torch.ones(21, dtype=torch.bool)) == "tweedie"
    with pytest.warns(UserWarning, match="the mask hides body joints"):
        out = prior.denoise(noisy, mask, noise_std=SIGMA)
    torch.testing.assert_close(out, prior.project(noisy, mask, noise_std=SIGMA))
    with pytest.raises(ValueError, match="expected a finite noise_std > 0"):
        prior.denoise(noisy, noise_std=0.0)
    with pytest.raises(TypeError, match="expected a boolean mask"):
        prior.denoise_estimator(SIGMA, torch.ones(21))


def test_a_body_only_input_to_a_body_and_hands_prior_gets_its_hands_completed_given_the_denoised_body(trained):
    body_prior, _, _ = trained
    prior = _small_flow("body+left_hand+right_hand", parts=("body", "left_hand+right_hand"))
    prior.smoothed.load_state_dict(body_prior.smoothed.state_dict())
    noisy = _correlated_body(5, seed=5)[0]
    out = prior.denoise({"body_pose": noisy}, noise_std=SIGMA)
    assert out.shape == (5, 51, 3)
    torch.testing.assert_close(out[:, :21], body_prior.denoise(noisy, noise_std=SIGMA))
    assert torch.isfinite(out).all()
    with torch.inference_mode():  # works there too (the score needs autograd: done on a copy)
        torch.testing.assert_close(prior.denoise({"body_pose": noisy}, noise_std=SIGMA), out)


def test_with_a_broad_component_the_score_is_that_of_the_exact_noisy_mixture(trained):
    body_prior, _, _ = trained
    poses, _, _ = _correlated_body(512)
    prior = _small_flow(broad_weight=0.3)
    prior.smoothed.load_state_dict(body_prior.smoothed.state_dict())
    prior.fit_broad(poses * 1.5)
    noisy = 2.5 * _correlated_body(4, seed=6)[0].flatten(1).double()  # off the data, where the broad part counts
    prior = prior.double()

    def mixture(v: torch.Tensor) -> torch.Tensor:
        b = prior.broad.log_prob(v, noise_std=SIGMA)
        return torch.logaddexp(prior.smoothed.log_prob(v) + math.log(0.7), b + math.log(0.3))

    expected = prior.smoothed.posterior_mean(noisy, mixture)
    out = prior.denoise(noisy.reshape(4, 21, 3), noise_std=SIGMA).flatten(1)
    torch.testing.assert_close(out, expected)
    assert (out - prior.smoothed.posterior_mean(noisy)).abs().max() > 1e-4  # the broad part counts


def test_the_broad_components_noisy_density_is_the_exact_convolution():
    broad = MarginalMixture(2, 2).double()
    broad.means.copy_(torch.tensor([[-0.3, 0.1], [0.4, 0.2]]))
    broad.stds.copy_(torch.tensor([[0.1, 0.2], [0.3, 0.05]]))
    broad.log_weights.copy_(torch.tensor([[0.3, 0.5], [0.7, 0.5]]).log())
    grid = torch.linspace(-3, 3, 20001, dtype=torch.float64)
    kernel = torch.distributions.Normal(0.0, SIGMA)
    y = torch.tensor([[0.05, -0.1]], dtype=torch.float64)
    for d in range(2):
        points = torch.zeros(len(grid), 2, dtype=torch.float64)
        points[:, d] = grid
        observed = torch.zeros_like(points, dtype=torch.bool)
        observed[:, d] = True
        density = broad.log_prob(points, observed).exp() * kernel.log_prob(y[0, d] - grid).exp()
        integral = torch.trapezoid(density, grid)
        got = broad.log_prob(y[:, [d]], dims=torch.tensor([d]), noise_std=SIGMA)
        torch.testing.assert_close(got, integral.log()[None], rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match=r"expected points of shape \(B, 1\), got \(1, 2\)"):
        broad.log_prob(y, dims=torch.tensor([0]))


def test_the_smoothed_density_survives_save_and_load(trained, tmp_path):
    prior, _, _ = trained
    posepriors.save_pretrained(prior, tmp_path / "model")
    loaded = posepriors.load(tmp_path / "model")
    assert loaded.config.smoothed_noise_std == SIGMA and loaded.smoothed is not None
    noisy = _correlated_body(4, seed=7)[0]
    torch.testing.assert_close(loaded.denoise(noisy, noise_std=SIGMA), prior.denoise(noisy, noise_std=SIGMA))
    assert not any(p.requires_grad for p in loaded.smoothed.parameters())


def test_bad_smoothed_settings_fail_at_construction_naming_the_field():
    with pytest.raises(ValueError, match="needs the 21 body joints"):
        GlobalFlowConfig(joints="left_hand", smoothed_noise_std=SIGMA)
    with pytest.raises(ValueError, match="expected 0 <= smoothed_noise_std < inf"):
        GlobalFlowConfig(smoothed_noise_std=-0.1)
    with pytest.raises(ValueError, match="expected smoothed_members >= 1, got 0"):
        GlobalFlowConfig(smoothed_noise_std=SIGMA, smoothed_members=0)
    prior = GlobalFlowPrior(GlobalFlowConfig(hidden=8, num_layers=1))
    with pytest.raises(ValueError, match="smoothed_noise_std 0: there is no smoothed density to fit"):
        prior.fit_smoothed(torch.zeros(4, 21, 3))


def test_fit_smoothed_uses_only_poses_that_observe_the_whole_body():
    prior = _small_flow(smoothed_members=1, smoothed_epochs=1)
    poses, _, _ = _correlated_body(64)
    observed = torch.zeros(64, 21, dtype=torch.bool)
    with pytest.raises(ValueError, match="at least 2 training poses that observe every body joint, got 0"):
        prior.fit_smoothed(poses, observed)
    observed[:32] = True
    before = [p.clone() for p in prior.smoothed.parameters()]
    prior.fit_smoothed(poses, observed)
    assert any(not torch.equal(a, b) for a, b in zip(before, prior.smoothed.parameters(), strict=True))
    both = torch.cat([poses[:32], skeleton.mirror_pose(poses[:32], skeleton.PARTS["body"])]).flatten(1)
    torch.testing.assert_close(prior.smoothed.mean, both.mean(0))


def test_the_family_loss_never_trains_the_smoothed_density():
    prior = _small_flow(smoothed_members=1)
    assert not any(p.requires_grad for p in prior.smoothed.parameters())
    trainable = {id(p) for p in prior.parameters() if p.requires_grad}
    assert trainable and not trainable & {id(p) for p in prior.smoothed.parameters()}
    assert dataclasses.replace(prior.config).smoothed_epochs == 12


def test_the_evaluation_runs_the_posterior_mean_and_records_which_estimator_ran(trained):
    from posepriors.evaluate import denoise_stats

    prior, _, _ = trained
    clean = _correlated_body(64, seed=8)[0]
    mean = denoise_stats(prior, clean, generator=torch.Generator().manual_seed(0))
    mapped = denoise_stats(prior, clean, generator=torch.Generator().manual_seed(0), denoiser="map", steps=5)
    assert (mean.estimator, mapped.estimator) == ("tweedie", "map")
    assert mean.error_before_deg == mapped.error_before_deg and mean.error_after_deg != mapped.error_after_deg
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback's warning is not raised: the stats say "map" instead
        assert denoise_stats(prior, clean, sigma=0.05, denoiser="posterior_mean").estimator == "map"
    expected = r"expected denoiser to be one of \('posterior_mean', 'adaptive', 'map'\), got 'mmse'"
    with pytest.raises(ValueError, match=expected):
        denoise_stats(prior, clean, denoiser="mmse")
    with pytest.raises(TypeError, match=r"project options \['steps'\] need denoiser='map'"):
        denoise_stats(prior, clean, steps=5)
