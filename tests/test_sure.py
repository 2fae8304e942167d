"""Stein's unbiased risk estimate (:mod:`posepriors.priors.sure`), the broad component's closed-form posterior mean
and ``PosePrior.denoise(..., adaptive=True)``, which blends Tweedie's posterior mean by the SURE-optimal weight."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import posepriors
from posepriors.evaluate import denoise_stats
from posepriors.priors import sure
from posepriors.priors.broad import MarginalMixture
from posepriors.priors.gaussian import GaussianConfig, GaussianPrior
from posepriors.priors.global_flow import GlobalFlowPrior
from posepriors.rotations import axis_angle_geodesic
from tests.test_smoothed import SIGMA, _correlated_body, _small_flow, _wiener


def _gain(cov: torch.Tensor, sigma: float) -> torch.Tensor:
    """The Wiener filter's gain ``cov (cov + s^2 I)^-1``: the Jacobian of the true posterior mean, (63, 63)."""
    return cov @ torch.linalg.inv(cov + sigma**2 * torch.eye(len(cov), dtype=cov.dtype))


def _gaussian_set(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean draws (n, 63), their noisy copies (noise SIGMA), the true mean and covariance, all float64."""
    clean, mean, cov = _correlated_body(n, seed=seed)
    clean, mean, cov = clean.flatten(1).double(), mean.double(), cov.double()
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
    return clean, clean + SIGMA * noise, mean, cov


def _grid_argmin(y, f, div_f, g, div_g, noise_std: float, steps: int = 100_001) -> float:
    """The t in [0, 1] on a fine grid that minimises the summed SURE of ``f + t (g - f)``."""
    t = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    gap, residual = g - f, f - y
    # sum |f - y + t gap|^2, expanded so the grid needs no (steps, N, d) tensor
    squares = residual.square().sum() + 2 * t * (residual * gap).sum() + t.square() * gap.square().sum()
    divergences = div_f.sum() + t * (div_g - div_f).sum()
    total = squares + 2 * noise_std**2 * divergences - y.numel() * noise_std**2
    return t[total.argmin()].item()


# ---------------------------------------------------------------------------------------------------------------
# divergence


def test_divergence_of_a_linear_map_with_a_diagonal_jacobian_is_its_trace_exactly():
    g = torch.Generator().manual_seed(0)
    a = torch.diag(torch.randn(7, generator=g, dtype=torch.float64))
    y = torch.randn(5, 7, generator=g, dtype=torch.float64)
    for probes, chunk_rows in ((1, 4096), (3, 2), (2, 1)):  # the chunking must not change the rows' pairing
        div = sure.divergence(lambda v: v @ a.T, y, step=0.05, probes=probes, chunk_rows=chunk_rows)
        assert div.shape == (5,) and div.dtype == torch.float64
        torch.testing.assert_close(div, torch.full((5,), a.trace().item(), dtype=torch.float64), rtol=0, atol=1e-8)


def test_divergence_of_a_dense_linear_map_is_unbiased_with_the_rademacher_variance():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    trace = a.trace().item()
    # e'Ae = tr A + sum_{i<j} (A_ij + A_ji) e_i e_j: variance sum_{i<j} (A_ij + A_ji)^2
    sym = a + a.T
    variance = sym.triu(1).square().sum().item()
    assert variance > 1  # the test is informative: one probe is far from exact

    def linear(v: torch.Tensor) -> torch.Tensor:
        return v @ a.T

    # many probes at a few points: each point's estimate is close to the trace
    y = torch.randn(4, 6, generator=g, dtype=torch.float64)
    probes = 4000
    many = sure.divergence(linear, y, step=0.1, probes=probes, generator=torch.Generator().manual_seed(2))
    assert (many - trace).abs().max().item() < 5 * (variance / probes) ** 0.5, (many, trace)
    # one probe at many points: the mean of the per-point estimates is the trace, their spread the theory's
    y = torch.randn(20_000, 6, generator=g, dtype=torch.float64)
    single = sure.divergence(linear, y, step=0.1, generator=torch.Generator().manual_seed(3))
    assert abs(single.mean().item() - trace) < 5 * (variance / len(y)) ** 0.5, (single.mean(), trace)
    assert single.var().item() == pytest.approx(variance, rel=0.1)
    # every single estimate is e'Ae for a sign vector e: the trace plus at most sum |A_ij + A_ji| over i < j
    assert (single - trace).abs().max().item() <= sym.triu(1).abs().sum().item() + 1e-9


def test_divergence_is_deterministic_without_a_generator_and_uses_the_one_it_is_given():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    y = torch.randn(8, 5, generator=g, dtype=torch.float64)

    def linear(v: torch.Tensor) -> torch.Tensor:
        return v @ a.T

    state = torch.random.get_rng_state()
    first = sure.divergence(linear, y, step=0.1)
    torch.manual_seed(12345)  # the global RNG does not matter
    torch.testing.assert_close(sure.divergence(linear, y, step=0.1), first, rtol=0, atol=0)
    torch.random.set_rng_state(state)
    sure.divergence(linear, y, step=0.1)
    assert torch.equal(torch.random.get_rng_state(), state)  # and is not used

    def seeded(seed: int) -> torch.Tensor:
        return sure.divergence(linear, y, step=0.1, generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(seeded(7), seeded(7), rtol=0, atol=0)
    assert not torch.allclose(seeded(7), seeded(8))
    generator = torch.Generator().manual_seed(7)
    once = sure.divergence(linear, y, step=0.1, generator=generator)
    again = sure.divergence(linear, y, step=0.1, generator=generator)  # the generator advanced
    assert not torch.allclose(once, again)


def test_divergence_of_a_separable_nonlinear_map_matches_the_analytic_one():
    y = 1.5 * torch.randn(10, 9, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = (1 - torch.tanh(y).square()).sum(-1)
    got = sure.divergence(torch.tanh, y, step=1e-4)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)
    coarse = sure.divergence(torch.tanh, y, step=0.5)  # the difference error is O(step^2): visible at a large step
    assert (coarse - expected).abs().max() > 1e-3


def test_divergence_rejects_bad_shapes_and_settings_with_a_message():
    y = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"expected points of shape \(N, d\), got \(4,\)"):
        sure.divergence(torch.tanh, y[0], step=0.1)
    with pytest.raises(ValueError, match=r"expected points of shape \(N, d\), got \(2, 3, 4\)"):
        sure.divergence(torch.tanh, torch.zeros(2, 3, 4), step=0.1)
    for step in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"expected step > 0, probes >= 1 and chunk_rows >= 1"):
            sure.divergence(torch.tanh, y, step=step)
    with pytest.raises(ValueError, match=r"probes >= 1 .*got 0.1, 0, 4096"):
        sure.divergence(torch.tanh, y, step=0.1, probes=0)
    with pytest.raises(ValueError, match=r"chunk_rows >= 1, got 0.1, 1, 0"):
        sure.divergence(torch.tanh, y, step=0.1, chunk_rows=0)
    with pytest.raises(ValueError, match=r"expected the denoiser to return shape \(6, 4\), got \(6, 2\)"):
        sure.divergence(lambda v: v[:, :2], y, step=0.1)


def test_probes_for_spreads_a_budget_over_the_set():
    counts = [sure.probes_for(n) for n in range(0, 1000)]
    assert all(1 <= c <= 64 for c in counts)
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))  # fewer per point for larger sets
    assert all(n * sure.probes_for(n) >= 256 for n in range(4, 1000))  # the budget is met where the cap allows
    assert sure.probes_for(1) == 64 and sure.probes_for(256) == 1 and sure.probes_for(10_000) == 1
    assert sure.probes_for(10, budget=100, most=5) == 5


# ---------------------------------------------------------------------------------------------------------------
# sure and blend_weight


def test_sure_of_the_wiener_filter_is_an_unbiased_estimate_of_its_squared_error():
    clean, noisy, mean, cov = _gaussian_set(4000, seed=10)
    gain = _gain(cov, SIGMA)
    denoised = _wiener(noisy, mean, cov, SIGMA)
    div = torch.full((len(noisy),), gain.trace().item(), dtype=torch.float64)
    estimate = sure.sure(denoised, noisy, div, SIGMA)
    assert estimate.shape == (len(noisy),)
    error = (denoised - clean).square().sum(-1)
    gap = estimate - error
    stderr = gap.std().item() / len(gap) ** 0.5
    assert abs(gap.mean().item()) < 4 * stderr, (estimate.mean(), error.mean(), stderr)
    # the divergence term matters: without it the estimate is biased by many standard errors
    biased = sure.sure(denoised, noisy, torch.zeros_like(div), SIGMA) - error
    assert abs(biased.mean().item()) > 20 * stderr
    # and the noisy poses themselves (div = d): their SURE is d s^2 exactly, their expected error
    identity = sure.sure(noisy, noisy, torch.full_like(div, 63.0), SIGMA)
    torch.testing.assert_close(identity, torch.full_like(div, 63 * SIGMA**2))


@pytest.mark.parametrize("target", [0.3, 0.7, -0.5, 1.8])
def test_blend_weight_is_the_argmin_of_the_summed_sure_on_a_grid(target):
    g = torch.Generator().manual_seed(int(10 * target) + 20)
    y = torch.randn(50, 8, generator=g, dtype=torch.float64)
    f = y + 0.3 * torch.randn(50, 8, generator=g, dtype=torch.float64)
    gap = 0.5 * torch.randn(50, 8, generator=g, dtype=torch.float64)
    y = f + target * gap + 0.05 * torch.randn(50, 8, generator=g, dtype=torch.float64)  # optimum near ``target``
    div_f = 4 + torch.randn(50, generator=g, dtype=torch.float64)
    div_g = 3 + torch.randn(50, generator=g, dtype=torch.float64)
    weight = sure.blend_weight(y, f, div_f, f + gap, div_g, SIGMA)
    assert weight.shape == () and 0 <= weight.item() <= 1
    assert weight.item() == pytest.approx(_grid_argmin(y, f, div_f, f + gap, div_g, SIGMA), abs=2e-5)
    if target < 0:
        assert weight.item() == 0.0
    elif target > 1:
        assert weight.item() == 1.0
    else:
        assert 0.1 < weight.item() < 0.9  # interior: the grid check above is not only the clipping


def test_blend_weight_is_zero_where_the_denoisers_agree():
    g = torch.Generator().manual_seed(30)
    y = torch.randn(20, 5, generator=g, dtype=torch.float64)
    f = 0.5 * y
    div = torch.full((20,), 2.5, dtype=torch.float64)
    weight = sure.blend_weight(y, f, div, f.clone(), div.clone(), SIGMA)
    assert weight.shape == () and weight.item() == 0.0


def test_blend_weight_leaves_out_points_with_non_finite_entries():
    _, noisy, mean, cov = _gaussian_set(200, seed=12)
    wiener = _wiener(noisy, mean, cov, SIGMA)
    div_wiener = torch.full((len(noisy),), _gain(cov, SIGMA).trace().item(), dtype=torch.float64)
    div_identity = torch.full_like(div_wiener, 63.0)
    expected = sure.blend_weight(noisy[1:], noisy[1:], div_identity[1:], wiener[1:], div_wiener[1:], SIGMA)
    for broken in ("g", "div"):
        g, div_g = wiener.clone(), div_wiener.clone()
        if broken == "g":
            g[0, 3] = float("nan")
        else:
            div_g[0] = float("inf")
        weight = sure.blend_weight(noisy, noisy, div_identity, g, div_g, SIGMA)
        torch.testing.assert_close(weight, expected)


def test_blend_weight_picks_the_true_posterior_mean_over_no_denoising():
    _, noisy, mean, cov = _gaussian_set(2000, seed=11)
    wiener = _wiener(noisy, mean, cov, SIGMA)
    div_wiener = torch.full((len(noisy),), _gain(cov, SIGMA).trace().item(), dtype=torch.float64)
    div_identity = torch.full_like(div_wiener, 63.0)
    towards_wiener = sure.blend_weight(noisy, noisy, div_identity, wiener, div_wiener, SIGMA).item()
    towards_identity = sure.blend_weight(noisy, wiener, div_wiener, noisy, div_identity, SIGMA).item()
    assert towards_wiener > 0.95 and towards_identity < 0.05, (towards_wiener, towards_identity)


# ---------------------------------------------------------------------------------------------------------------
# MarginalMixture.posterior_mean


def _mixture() -> MarginalMixture:
    g = torch.Generator().manual_seed(40)
    broad = MarginalMixture(4, 3).double()
    broad.means.copy_(0.5 * torch.randn(3, 4, generator=g, dtype=torch.float64))
    broad.stds.copy_(0.05 + 0.3 * torch.rand(3, 4, generator=g, dtype=torch.float64))
    broad.log_weights.copy_(torch.log_softmax(torch.randn(3, 4, generator=g, dtype=torch.float64), 0))
    return broad


@pytest.mark.parametrize("dims", [None, [3, 1]])
def test_the_broad_posterior_mean_is_tweedies_formula_and_its_divergence_the_jacobians_trace(dims):
    broad = _mixture()
    dims = None if dims is None else torch.tensor(dims)
    width = 4 if dims is None else len(dims)
    y = torch.randn(6, width, generator=torch.Generator().manual_seed(41), dtype=torch.float64)
    y[0] = 3.0  # far out in the tails too
    s = 0.2
    out, div = broad.posterior_mean(y, dims=dims, noise_std=s)
    assert out.shape == y.shape and div.shape == (6,)
    point = y.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(broad.log_prob(point, dims=dims, noise_std=s).sum(), point)
    torch.testing.assert_close(out, y + s**2 * score)
    for row in y[:3]:
        jacobian = torch.autograd.functional.jacobian(
            lambda v: broad.posterior_mean(v[None], dims=dims, noise_std=s)[0][0], row
        )
        off_diagonal = jacobian - torch.diag(jacobian.diagonal())
        assert off_diagonal.abs().max().item() < 1e-12  # per coordinate
    jacobians = [
        torch.autograd.functional.jacobian(lambda v: broad.posterior_mean(v[None], dims=dims, noise_std=s)[0][0], row)
        for row in y
    ]
    torch.testing.assert_close(div, torch.stack([j.diagonal().sum() for j in jacobians]))
    if dims is not None:  # a subset is those coordinates of the whole
        whole = torch.zeros(6, 4, dtype=torch.float64)
        whole[:, dims] = y
        torch.testing.assert_close(out, broad.posterior_mean(whole, noise_std=s)[0][:, dims])


def test_a_one_component_broad_posterior_mean_is_the_per_coordinate_wiener_filter():
    broad = _mixture()
    single = MarginalMixture(4, 1).double()
    single.means.copy_(broad.means[:1])
    single.stds.copy_(broad.stds[:1])
    y = torch.randn(5, 4, generator=torch.Generator().manual_seed(42), dtype=torch.float64)
    s = 0.15
    var = single.stds[0].square()
    out, div = single.posterior_mean(y, noise_std=s)
    torch.testing.assert_close(out, single.means[0] + (y - single.means[0]) * var / (var + s**2))
    torch.testing.assert_close(div, (var / (var + s**2)).sum().expand(5))


def test_the_broad_posterior_mean_rejects_bad_shapes_and_noise():
    broad = _mixture()
    with pytest.raises(ValueError, match=r"expected points of shape \(B, 4\), got \(5, 3\)"):
        broad.posterior_mean(torch.zeros(5, 3, dtype=torch.float64), noise_std=0.1)
    with pytest.raises(ValueError, match=r"expected points of shape \(B, 2\), got \(5, 4\)"):
        broad.posterior_mean(torch.zeros(5, 4, dtype=torch.float64), dims=torch.tensor([0, 2]), noise_std=0.1)
    with pytest.raises(ValueError, match=r"expected points of shape \(B, 4\), got \(4,\)"):
        broad.posterior_mean(torch.zeros(4, dtype=torch.float64), noise_std=0.1)
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="expected noise_std > 0"):
            broad.posterior_mean(torch.zeros(5, 4, dtype=torch.float64), noise_std=bad)


# ---------------------------------------------------------------------------------------------------------------
# PosePrior.denoise(adaptive=True)


@pytest.fixture(scope="module")
def trained() -> tuple[GlobalFlowPrior, GlobalFlowPrior]:
    """Two body global_flows with one smoothed density trained on correlated Gaussian poses: without a broad
    component (its partner: the smoothed density's per-coordinate Gaussian) and with one (broad_weight 0.3)."""
    poses, _, _ = _correlated_body(4096)
    torch.manual_seed(0)
    plain = _small_flow()
    plain.smoothed.fit(poses, epochs=12, learning_rate=1e-2)  # a larger step than the default: a short test
    broad = _small_flow(broad_weight=0.3)
    broad.smoothed.load_state_dict(plain.smoothed.state_dict())
    broad.fit_broad(poses)
    assert plain.broad is None and broad.broad is not None
    return plain, broad


def _noisy(clean: torch.Tensor, seed: int = 50) -> torch.Tensor:
    return clean + SIGMA * torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))


def _on_segment(out: torch.Tensor, f: torch.Tensor, g: torch.Tensor) -> float:
    """Checks that ``out = f + t (g - f)`` with one scalar ``t`` for the whole set, in [0, 1]; returns ``t``."""
    out, f, g = out.flatten(), f.flatten(), g.flatten()
    gap = g - f
    assert gap.square().sum() > 1e-6  # the denoisers differ: the check is informative
    t = ((out - f) @ gap / gap.square().sum()).item()
    assert -1e-6 <= t <= 1 + 1e-6, t
    torch.testing.assert_close(out, f + t * gap, rtol=0, atol=1e-5)
    return t


def test_adaptive_denoise_keeps_the_shape_and_works_in_inference_mode(trained):
    prior, _ = trained
    noisy = _noisy(_correlated_body(24, seed=1)[0]).reshape(2, 12, 21, 3)
    plain = prior.denoise(noisy, noise_std=SIGMA)
    out = prior.denoise(noisy, noise_std=SIGMA, adaptive=True)
    assert out.shape == plain.shape == (2, 12, 21, 3) and out.dtype == plain.dtype
    assert torch.isfinite(out).all() and not out.requires_grad
    with torch.inference_mode():
        torch.testing.assert_close(prior.denoise(noisy, noise_std=SIGMA, adaptive=True), out)
    # one set: the batch shape does not split it
    torch.testing.assert_close(
        prior.denoise(noisy.reshape(24, 21, 3), noise_std=SIGMA, adaptive=True).reshape(out.shape), out
    )


def test_adaptive_warns_on_small_sets(trained):
    prior, _ = trained
    noisy = _noisy(_correlated_body(16, seed=2)[0])
    with pytest.warns(UserWarning, match=r"on 3 pose\(s\).*from about 16 poses of one source"):
        prior.denoise(noisy[:3], noise_std=SIGMA, adaptive=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prior.denoise(noisy, noise_std=SIGMA, adaptive=True)  # 16 poses: no warning
        prior.denoise(noisy[:3], noise_std=SIGMA)  # nor without adaptive


def test_without_a_broad_component_the_partner_is_the_smoothed_densitys_per_coordinate_gaussian(trained):
    prior, _ = trained
    shifted = 2.5 * _correlated_body(256, seed=2)[0]  # where the partner gets weight
    noisy = _noisy(shifted)
    y = noisy.flatten(1)
    mean, var = prior.smoothed.mean, prior.smoothed.var
    partner = mean + (y - mean) * var / (var + SIGMA**2)
    g, div_g = prior._broad_posterior_mean(y)
    torch.testing.assert_close(g, partner)
    torch.testing.assert_close(div_g, (var / (var + SIGMA**2)).sum().expand(len(y)))
    f = prior.denoise(noisy, noise_std=SIGMA).flatten(1)
    t = _on_segment(prior.denoise(noisy, noise_std=SIGMA, adaptive=True).flatten(1), f, partner)
    assert t > 0.5


def test_with_a_broad_component_the_partner_is_its_posterior_mean(trained):
    _, prior = trained
    shifted = 2.5 * _correlated_body(256, seed=3)[0]
    noisy = _noisy(shifted)
    y = noisy.flatten(1)
    g, div_g = prior._broad_posterior_mean(y)
    expected, expected_div = prior.broad.posterior_mean(y, noise_std=SIGMA)  # a body-only prior: every coordinate
    torch.testing.assert_close(g, expected)
    torch.testing.assert_close(div_g, expected_div)
    f = prior.denoise(noisy, noise_std=SIGMA).flatten(1)
    t = _on_segment(prior.denoise(noisy, noise_std=SIGMA, adaptive=True).flatten(1), f, g)
    assert t > 0.2


@pytest.mark.parametrize("scale", [1.0, 1.5, 2.5], ids=["training", "wider", "much_wider"])
@pytest.mark.parametrize("which", [0, 1], ids=["no_broad", "broad"])
def test_the_adaptive_weight_is_near_the_oracles_and_helps_only_off_the_training_distribution(trained, which, scale):
    prior = trained[which]
    clean = scale * _correlated_body(1024, seed=4)[0]  # scale 1: the training distribution
    noisy = _noisy(clean)
    f = prior.denoise(noisy, noise_std=SIGMA)
    out = prior.denoise(noisy, noise_std=SIGMA, adaptive=True)
    g = prior._broad_posterior_mean(noisy.flatten(1))[0].reshape(f.shape)
    t = _on_segment(out, f, g)
    # SURE is unbiased: the weight is close to the one that knows the clean poses (least squared error on the set)
    gap = (g - f).flatten()
    oracle = (-((f - clean).flatten() @ gap) / gap.square().sum()).clamp(0, 1).item()
    assert abs(t - oracle) < 0.05, (t, oracle)
    plain = (f - clean).square().mean().item()
    adaptive = (out - clean).square().mean().item()
    if scale == 1.0:  # the flow's correlations hold: the blend stays near the flow and costs next to nothing
        assert t < 0.3 and adaptive < 1.02 * plain, (t, adaptive, plain)
    else:
        assert t > 0.3 and adaptive < (0.8 if scale > 2 else 1.0) * plain, (t, adaptive, plain)


def test_adaptive_needs_tweedies_formula_and_a_bool(trained):
    prior, _ = trained
    noisy = _noisy(_correlated_body(4, seed=5)[0])
    gaussian = GaussianPrior(GaussianConfig(joints="body")).fit(_correlated_body(512)[0]).eval()
    with pytest.raises(ValueError, match=r"adaptive=True .* GaussianPrior\.denoise runs the 'closed_form' estimator"):
        gaussian.denoise(noisy, noise_std=SIGMA, adaptive=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no MAP fallback warning before the error
        with pytest.raises(ValueError, match=r"'map' estimator at noise_std=0.05 \(.*noise_std=0.1 only\)"):
            prior.denoise(noisy, noise_std=0.05, adaptive=True)
    mask = torch.ones(4, 21, dtype=torch.bool)
    mask[:, 3] = False
    with pytest.raises(ValueError, match="the mask hides body joints"):
        prior.denoise(noisy, mask, noise_std=SIGMA, adaptive=True)
    for bad in ("yes", 1, None):
        with pytest.raises(TypeError, match=f"expected adaptive to be a bool, got {type(bad).__name__}"):
            prior.denoise(noisy, noise_std=SIGMA, adaptive=bad)
    # adaptive=False changes nothing
    torch.testing.assert_close(
        prior.denoise(noisy, noise_std=SIGMA, adaptive=False), prior.denoise(noisy, noise_std=SIGMA)
    )


def test_denoise_stats_reports_the_adaptive_estimator_where_it_runs(trained):
    prior, _ = trained
    clean = _correlated_body(64, seed=6)[0]
    adaptive = denoise_stats(prior, clean, generator=torch.Generator().manual_seed(0), denoiser="adaptive")
    plain = denoise_stats(prior, clean, generator=torch.Generator().manual_seed(0))
    assert (adaptive.estimator, plain.estimator) == ("tweedie_sure", "tweedie")
    assert adaptive.error_before_deg == plain.error_before_deg and adaptive.error_after_deg != plain.error_after_deg
    gaussian = GaussianPrior(GaussianConfig(joints="body")).fit(_correlated_body(512)[0]).eval()
    closed = denoise_stats(gaussian, clean, generator=torch.Generator().manual_seed(0), denoiser="adaptive")
    closed_plain = denoise_stats(gaussian, clean, generator=torch.Generator().manual_seed(0))
    assert closed.estimator == "closed_form" and closed.error_after_deg == closed_plain.error_after_deg
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # at another level: the MAP, without a warning or an error
        assert denoise_stats(prior, clean, sigma=0.05, denoiser="adaptive").estimator == "map"


def test_denoise_stats_gives_the_sure_blend_near_equal_sets(trained, monkeypatch):
    prior, _ = trained
    clean = _correlated_body(21, seed=7)[0]
    sizes = []
    denoise = prior.denoise

    def recording(pose, *args, **kwargs):
        sizes.append((len(pose), kwargs["adaptive"]))
        return denoise(pose, *args, **kwargs)

    monkeypatch.setattr(prior, "denoise", recording)
    with pytest.warns(UserWarning, match=r"adaptive=True\) on 7 pose\(s\): the SURE weight is noisy"):
        denoise_stats(prior, clean, denoiser="adaptive", batch_size=10)
    assert sizes == [(7, True)] * 3  # not 10 + 10 + 1
    sizes.clear()
    denoise_stats(prior, clean, batch_size=10)
    assert sizes == [(10, False), (10, False), (1, False)]


# ---------------------------------------------------------------------------------------------------------------
# real data


def _geodesic_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.rad2deg(axis_angle_geodesic(a, b)).mean().item()


@pytest.mark.shared_data
def test_on_a_dance_clip_the_shipped_flow_denoises_better_adaptively(shared_data):
    ood = np.load(shared_data / "body_ood_val.npz")
    clean = torch.from_numpy(ood["body_pose"][ood["source"] == "aist_dance_clip"])
    assert clean.shape == (320, 21, 3)
    noisy = _noisy(clean, seed=0)
    flow, gaussian = posepriors.load("global_flow"), posepriors.load("gaussian")

    def error(prior: posepriors.PosePrior, poses: torch.Tensor, truth: torch.Tensor, **kwargs: object) -> float:
        out = prior.denoise(poses, noise_std=SIGMA, layout="body", **kwargs)
        assert out.shape == (len(poses), prior.num_joints, 3)
        return _geodesic_deg(out[:, :21], truth)  # the first 21 of the prior's joints are the body

    adaptive, plain = error(flow, noisy, clean, adaptive=True), error(flow, noisy, clean)
    closed = error(gaussian, noisy, clean)
    assert adaptive < plain and adaptive < closed, (adaptive, plain, closed)
    # on AMASS poses the flow's correlations hold: the blend changes next to nothing
    val = torch.from_numpy(np.load(shared_data / "body_val.npz")["body_pose"][:300])
    noisy = _noisy(val, seed=0)
    adaptive, plain = error(flow, noisy, val, adaptive=True), error(flow, noisy, val)
    assert abs(adaptive - plain) < 0.05, (adaptive, plain)
