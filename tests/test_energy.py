"""The fitting energy: :class:`BodyGaussian`, ``PosePrior.energy`` and ``fit_energy``, and its use in fits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import posepriors
from posepriors import skeleton
from posepriors.fitting import body_keypoints, fit_keypoints
from posepriors.priors.energy import BodyGaussian
from posepriors.priors.gaussian import GaussianConfig, GaussianPrior
from posepriors.priors.global_flow import GlobalFlowConfig, GlobalFlowPrior

LAM = 0.5
HANDS = skeleton.PARTS["left_hand"] + skeleton.PARTS["right_hand"]


def _correlated(n: int, dim: int = 63, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draws (n, dim) from one correlated Gaussian, with its mean and covariance."""
    g = torch.Generator().manual_seed(0)
    mean = 0.3 * torch.randn(dim, generator=g, dtype=torch.float64)
    factors = 0.15 * torch.randn(dim, 4, generator=g, dtype=torch.float64)
    cov = factors @ factors.T + torch.diag(0.002 + 0.004 * torch.rand(dim, generator=g, dtype=torch.float64))
    g = torch.Generator().manual_seed(1000 + seed)
    x = mean + torch.randn(n, dim, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    return x, mean, cov


def _flow(joints: str = "body+left_hand+right_hand", **changes: object) -> GlobalFlowPrior:
    """A small global_flow (body, then hands given the body) with a smoothed density and a fitting energy."""
    settings = dict(
        joints=joints,
        parts=("body", "left_hand+right_hand") if "hand" in joints else (),
        coupling="spline",
        bins=4,
        hidden=16,
        num_layers=2,
        broad_weight=0.1,
        smoothed_noise_std=0.1,
        smoothed_members=2,
        smoothed_hidden=16,
        smoothed_num_layers=1,
        energy_gaussian_weight=LAM,
    )
    settings.update(changes)
    prior = GlobalFlowPrior(GlobalFlowConfig(**settings)).double()
    poses = torch.zeros(256, prior.num_joints, 3, dtype=torch.float64)
    body = prior.body_index
    poses[:, body] = _correlated(256)[0].reshape(256, 21, 3)
    poses[:, ~torch.isin(torch.arange(prior.num_joints), body)] += 0.2 * torch.randn(
        256, prior.num_joints - 21, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    if prior.broad is not None:
        prior.fit_broad(poses)
    prior.fit_energy(poses)
    return prior.eval()


def _full_pose(prior: GlobalFlowPrior, n: int, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.2 * torch.randn(n, prior.num_joints, 3, generator=g, dtype=torch.float64)


def test_body_gaussian_is_the_floored_maximum_likelihood_gaussian():
    x, _, _ = _correlated(2000)
    gaussian = BodyGaussian(63).double().fit(x, min_std=0.01)
    torch.testing.assert_close(gaussian.mean, x.mean(0))
    cov = torch.cov(x.T, correction=0)
    eigval, eigvec = torch.linalg.eigh(cov)
    floored = (eigvec * eigval.clamp_min(1e-4)) @ eigvec.T
    precision = gaussian.whiten @ gaussian.whiten.T
    torch.testing.assert_close(torch.linalg.inv(precision), floored, rtol=1e-6, atol=1e-9)
    reference = torch.distributions.MultivariateNormal(x.mean(0), floored)
    y = x[:7] + 0.1
    torch.testing.assert_close(gaussian.log_prob(y), reference.log_prob(y))
    # a float32 copy scores in float32
    assert gaussian.float().log_prob(y.float()).dtype == torch.float32


def test_body_gaussian_floors_a_degenerate_direction():
    x, _, _ = _correlated(500)
    x[:, 5] = 0.25  # a constant coordinate: zero variance
    gaussian = BodyGaussian(63).double().fit(x, min_std=0.02)
    cov = torch.linalg.inv(gaussian.whiten @ gaussian.whiten.T)
    assert torch.linalg.eigvalsh(cov).min() >= 0.02**2 * (1 - 1e-6)
    assert torch.isfinite(gaussian.log_prob(x[:3])).all()


def test_body_gaussian_rejects_bad_input():
    gaussian = BodyGaussian(63)
    with pytest.raises(ValueError, match="at least 2 training rows of shape"):
        gaussian.fit(torch.zeros(1, 63), min_std=0.01)
    with pytest.raises(ValueError, match="min_std > 0"):
        gaussian.fit(torch.zeros(4, 63), min_std=0.0)
    with pytest.raises(ValueError, match=r"rows of shape \(B, 63\)"):
        gaussian.log_prob(torch.zeros(4, 60))
    with pytest.raises(ValueError, match="dim >= 1"):
        BodyGaussian(0)


def test_energy_is_the_nll_for_a_prior_without_a_fitting_energy():
    prior = GaussianPrior(GaussianConfig(joints="body+left_hand+right_hand")).eval()
    pose = 0.3 * torch.randn(4, prior.num_joints, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(prior.energy(pose), prior.nll(pose))
    body = {"body_pose": pose[:, :21]}
    torch.testing.assert_close(prior.energy(body), prior.nll(body))
    assert prior.energy_gaussian is None


def test_energy_of_a_body_is_the_weighted_sum_of_its_two_experts():
    prior = _flow()
    pose = _full_pose(prior, 6)
    body = pose[:, prior.body_index]
    v = body.flatten(1)
    expected = -(1 - LAM) * prior._smoothed_log_prob()(v) - LAM * prior.energy_gaussian.log_prob(v)
    torch.testing.assert_close(prior.energy({"body_pose": body}), expected)


def test_energy_members_takes_the_first_smoothed_flows():
    prior = _flow(energy_members=1, broad_weight=0.0)  # no broad component, which would dominate untrained flows
    with torch.no_grad():  # untrained flows start at the same map: make the second one differ
        for p in prior.smoothed.flows[1].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    body = _full_pose(prior, 5)[:, prior.body_index]
    v = body.flatten(1)
    first = prior._smoothed_log_prob(1)(v)
    assert not torch.allclose(first, prior._smoothed_log_prob()(v))
    expected = -(1 - LAM) * first - LAM * prior.energy_gaussian.log_prob(v)
    torch.testing.assert_close(prior.energy({"body_pose": body}), expected)
    with pytest.raises(ValueError, match="expected members between 1 and 2"):
        prior._smoothed_log_prob(3)
    with pytest.raises(ValueError, match="energy_members <= the smoothed density's members"):
        GlobalFlowConfig(smoothed_noise_std=0.1, smoothed_members=2, energy_gaussian_weight=0.5, energy_members=3)


def test_energy_adds_the_conditional_nll_of_observed_hands():
    prior = _flow()
    pose = _full_pose(prior, 6)
    body_only = {"body_pose": pose[:, prior.body_index]}
    hands_term = prior.nll(pose, layout="prior") - prior.nll(body_only)
    torch.testing.assert_close(prior.energy(pose, layout="prior"), prior.energy(body_only) + hands_term)
    assert not torch.allclose(hands_term, torch.zeros_like(hands_term))


def test_energy_without_a_smoothed_density_uses_the_exact_body_marginal():
    prior = _flow(smoothed_noise_std=0.0)
    assert prior.smoothed is None
    body = _full_pose(prior, 5)[:, prior.body_index]
    v = body.flatten(1)
    expected = (1 - LAM) * prior.nll({"body_pose": body}) - LAM * prior.energy_gaussian.log_prob(v)
    torch.testing.assert_close(prior.energy({"body_pose": body}), expected)


def test_energy_falls_back_to_the_nll_when_the_mask_hides_body_joints():
    prior = GaussianPrior(GaussianConfig(energy_gaussian_weight=LAM)).double()
    x, _, _ = _correlated(300)
    prior.fit_energy(x.reshape(300, 21, 3))
    pose = x[:4].reshape(4, 21, 3) + 0.05
    mask = torch.ones(21, dtype=torch.bool)
    mask[3] = False
    torch.testing.assert_close(prior.energy(pose, mask), prior.nll(pose, mask))
    assert not torch.allclose(prior.energy(pose), prior.nll(pose))


def test_energy_routes_each_pose_by_its_own_mask():
    """One pose that hid a body joint used to turn the whole batch's energy into its NLL (silently, for every other
    pose), or, for global_flow, into an error."""
    prior = GaussianPrior(GaussianConfig(energy_gaussian_weight=LAM)).double()
    x, _, _ = _correlated(300)
    prior.fit_energy(x.reshape(300, 21, 3))
    pose = x[:4].reshape(4, 21, 3) + 0.05
    mask = torch.ones(4, 21, dtype=torch.bool)
    mask[2, 3] = False
    expected = torch.cat([prior.energy(pose[:2]), prior.nll(pose[2:3], mask[2:3]), prior.energy(pose[3:])])
    torch.testing.assert_close(prior.energy(pose, mask), expected)
    flow = _flow()
    full = _full_pose(flow, 3)
    mask = torch.ones(3, flow.num_joints, dtype=torch.bool)
    mask[1, 5] = False  # a body joint of pose 1
    with pytest.raises(ValueError, match=r"GlobalFlowPrior\.energy with hidden body joints \(poses \[1\]\)"):
        flow.energy(full, mask)
    mask[1, 5], mask[1, 21:] = True, False  # pose 1 hides its hands only: every pose gets the energy
    expected = torch.cat([flow.energy(full[i : i + 1], mask[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(flow.energy(full, mask), expected)


def test_energy_with_hidden_body_joints_says_what_it_needs_where_the_nll_has_no_marginal():
    """The shipped global_flow has no exact marginal for a partly hidden body: energy() says so in its own terms."""
    prior = posepriors.load("global_flow")
    mask = torch.ones(55, dtype=torch.bool)
    mask[20] = False  # the left wrist
    with pytest.raises(ValueError, match=r"GlobalFlowPrior\.energy with hidden body joints.*partially observed part"):
        prior.energy(torch.zeros(2, 55, 3), mask)


def test_energy_has_the_gradient_of_its_terms():
    prior = _flow(joints="body")
    body = _full_pose(prior, 3).requires_grad_(True)
    torch.autograd.gradcheck(lambda p: prior.energy({"body_pose": p}), (body,), eps=1e-6, atol=1e-5)


def test_the_fitting_energy_survives_save_and_load(tmp_path):
    prior = _flow(joints="body").float()
    posepriors.save_pretrained(prior, tmp_path / "model")
    loaded = posepriors.load(tmp_path / "model")
    assert loaded.config.energy_gaussian_weight == LAM
    body = {"body_pose": _full_pose(prior, 4).float()}
    torch.testing.assert_close(loaded.energy(body), prior.energy(body))
    torch.testing.assert_close(loaded.energy_gaussian.whiten, prior.energy_gaussian.whiten)


def test_fit_energy_and_the_config_reject_what_they_cannot_use():
    with pytest.raises(ValueError, match="energy_gaussian_weight 0: there is no fitting energy to fit"):
        GaussianPrior(GaussianConfig()).fit_energy(torch.zeros(4, 21, 3))
    prior = GaussianPrior(GaussianConfig(energy_gaussian_weight=0.5))
    with pytest.raises(ValueError, match="at least 2 training poses that observe every body joint, got 1"):
        prior.fit_energy(torch.zeros(1, 21, 3))
    with pytest.raises(ValueError, match=r"expected poses of shape \(N, 21, 3\)"):
        prior.fit_energy(torch.zeros(4, 20, 3))
    with pytest.raises(ValueError, match="0 <= energy_gaussian_weight <= 1"):
        GaussianConfig(energy_gaussian_weight=1.5)
    with pytest.raises(ValueError, match="energy_min_std"):
        GaussianConfig(energy_gaussian_weight=0.5, energy_min_std=0.0)
    with pytest.raises(ValueError, match="a fitting energy .* needs the 21 body joints"):
        GaussianConfig(joints="left_hand", energy_gaussian_weight=0.5)


def test_fit_energy_uses_only_poses_that_observe_the_body():
    prior = GaussianPrior(GaussianConfig(joints="body+left_hand+right_hand", energy_gaussian_weight=0.5))
    x, _, _ = _correlated(300)
    poses = torch.zeros(400, prior.num_joints, 3, dtype=torch.float64)
    poses[:300, :21] = x.reshape(300, 21, 3)
    poses[300:, :21] = 5.0  # frames that miss the body: their values must not count
    observed = torch.ones(400, prior.num_joints, dtype=torch.bool)
    observed[300:, :21] = False
    prior.double().fit_energy(poses, observed)
    torch.testing.assert_close(prior.energy_gaussian.mean, x.mean(0))


def test_fit_keypoints_minimises_the_energy_and_reports_both_prior_terms():
    prior = _flow(joints="body").float()
    g = torch.Generator().manual_seed(0)
    truth = (0.2 * torch.randn(4, 21, 3, generator=g)).float()
    keypoints = body_keypoints(truth) + 0.01 * torch.randn(4, 22, 3, generator=g)
    result = fit_keypoints(keypoints, prior=prior, weight=2e-5, steps=20)
    pose = {"body_pose": result.pose}
    torch.testing.assert_close(result.prior_energy, prior.energy(pose), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(result.prior_nll, prior.nll(pose), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(result.loss, result.keypoint_loss + 2e-5 * result.prior_energy)
    assert not torch.allclose(result.prior_energy, result.prior_nll)
    plain = fit_keypoints(keypoints, prior=GaussianPrior(GaussianConfig()).eval(), weight=2e-5, steps=2)
    torch.testing.assert_close(plain.prior_energy, plain.prior_nll)


def _angle_deg(pose: torch.Tensor, truth: torch.Tensor) -> float:
    return math.degrees(posepriors.rotations.axis_angle_geodesic(pose, truth).mean().item())


def test_the_shipped_fitting_energy_fits_better_than_the_exact_nll(shared_data):
    """The shipped global_flow regularising a keypoint fit (L-BFGS in pose space, 1.5 cm noise, a hidden left
    arm): with its fitting energy the fit is closer to the truth than with its exact NLL, and than with
    the diagonal Gaussian."""
    poses = np.load(shared_data / "body_val.npz")["body_pose"]
    rows = np.random.default_rng(0).choice(len(poses), 24, replace=False)
    truth = torch.from_numpy(poses[rows]).float()
    g = torch.Generator().manual_seed(0)
    keypoints = body_keypoints(truth) + 0.015 * torch.randn(24, 22, 3, generator=g)
    visible = torch.ones(22, dtype=torch.bool)
    visible[[18, 20]] = False  # the left elbow and wrist
    flow, gaussian = posepriors.load("global_flow"), posepriors.load("gaussian")
    weight = 2 * 0.015**2 / int(visible.sum())  # the MAP weight

    def error(prior: posepriors.PosePrior) -> float:
        fit = fit_keypoints(keypoints, prior=prior, weight=weight, visible=visible, steps=60, optimizer="lbfgs")
        return _angle_deg(fit.pose, truth)

    with_energy = error(flow)
    flow.energy = flow.nll  # the same fit on the exact density
    assert with_energy < error(flow) - 2.0
    assert with_energy < error(gaussian) - 1.0


def test_body_gaussian_conditional_matches_the_covariance_formulas():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(4000, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    gauss = BodyGaussian(6).double().fit(data, min_std=1e-3)
    cov = torch.cov(data.T, correction=0)
    mu = data.mean(0)
    observed = torch.tensor([True, False, True, True, False, False])
    v = torch.randn(5, 6, generator=g, dtype=torch.float64)
    mean, upper = gauss.conditional(v, observed)
    s_mo, s_oo = cov[~observed][:, observed], cov[observed][:, observed]
    want = mu[~observed] + (s_mo @ torch.linalg.solve(s_oo, (v[:, observed] - mu[observed]).T)).T
    torch.testing.assert_close(mean, want, atol=1e-8, rtol=1e-6)
    cond = cov[~observed][:, ~observed] - s_mo @ torch.linalg.solve(s_oo, s_mo.T)
    torch.testing.assert_close(torch.linalg.inv(upper.T @ upper), cond, atol=1e-8, rtol=1e-6)


def test_global_flow_draws_hidden_body_joints_from_its_own_conditional(monkeypatch):
    """The completion flow's draws of hidden body joints were far too spread (their NLL tens of nats worse than
    the poses they completed); importance resampling with the energy Gaussian's conditional as proposal draws from
    the prior's own conditional (the bundled prior; poses drawn from it)."""
    prior = posepriors.load("global_flow")
    g = torch.Generator().manual_seed(0)
    truth = prior.sample(40, generator=g, temperature=0.7)[:, :21]  # body poses the prior finds typical
    head = skeleton.resolve_joints("body").index(15)  # SMPL-X joint 15, in the body's order
    mask = torch.ones(40, 21, dtype=torch.bool)
    mask[:, head] = False
    completed = prior.sample(2, observed={"body_pose": truth}, mask=_body_mask(prior, mask), generator=g)
    completed = completed[..., :21, :]
    assert torch.equal(completed[:, mask], truth[mask].expand(2, -1, -1))  # observed joints copied exactly
    nll_truth = prior.nll({"body_pose": truth}).mean()
    nll_resampled = prior.nll({"body_pose": completed.reshape(-1, 21, 3)}).mean()
    monkeypatch.setattr(type(prior), "_resampled_rows", lambda self, m: torch.zeros_like(m[:, 0]))
    by_flow = prior.sample(2, observed={"body_pose": truth}, mask=_body_mask(prior, mask), generator=g)
    nll_flow = prior.nll({"body_pose": by_flow[..., :21, :].reshape(-1, 21, 3)}).mean()
    assert abs(nll_resampled - nll_truth) < 10 and nll_flow > nll_resampled + 10, (nll_truth, nll_resampled, nll_flow)
    monkeypatch.undo()
    # temperature 0: the Gaussian's conditional mean, deterministic, and project()'s completion
    zero = prior.sample(1, observed={"body_pose": truth}, mask=_body_mask(prior, mask), temperature=0)[0]
    again = prior.sample(1, observed={"body_pose": truth}, mask=_body_mask(prior, mask), temperature=0)[0]
    assert torch.equal(zero, again)
    kept = prior.project({"body_pose": truth}, _body_mask(prior, mask), keep_observed=True)
    torch.testing.assert_close(kept[:, :21], zero[:, :21])
    observed = torch.ones(63, dtype=torch.bool)
    observed[3 * head : 3 * head + 3] = False
    mean, _ = prior.energy_gaussian.conditional(truth.flatten(1), observed)
    torch.testing.assert_close(zero[:, head], mean.float())


def _body_mask(prior, body_mask):
    """A (B, J) mask of ``prior``'s joints from one over the 21 body joints (the hands missing)."""
    full = torch.zeros(body_mask.shape[0], prior.num_joints, dtype=torch.bool)
    full[:, :21] = body_mask
    return full


def test_global_flow_draws_a_hidden_hand_given_the_other_from_its_own_conditional(monkeypatch):
    """A partly observed last part (the left hand hidden, the body and the right hand seen; or one finger hidden):
    the completion flow's draws were far too spread (poses scoring hundreds of nats below the ones they completed);
    importance resampling with a Gaussian fitted to the prior's own draws of the hands as proposal draws from the
    prior's own conditional. Poses drawn from the bundled prior stand for the truth."""
    prior = posepriors.load("global_flow")
    g = torch.Generator().manual_seed(0)
    truth = prior.sample(24, generator=g, temperature=0.7)
    left = [i for i, j in enumerate(prior.joints) if 25 <= j < 40]
    for hidden in (left, left[-3:]):  # the whole left hand; its thumb
        mask = torch.ones(prior.num_joints, dtype=torch.bool)
        mask[hidden] = False
        kwargs = dict(observed=truth, mask=mask, layout="prior")
        completed = prior.sample(2, generator=g, **kwargs)
        assert torch.equal(completed[:, :, mask], truth[:, mask].expand(2, -1, -1, -1))  # observed joints exact
        nll_truth = prior.nll(truth, layout="prior").median()
        nll_resampled = prior.nll(completed.reshape(-1, prior.num_joints, 3), layout="prior").median()
        with monkeypatch.context() as patch:
            patch.setattr(type(prior), "_last_part_rows", lambda self, m: torch.zeros_like(m[:, 0]))
            by_flow = prior.sample(2, generator=g, **kwargs)
        nll_flow = prior.nll(by_flow.reshape(-1, prior.num_joints, 3), layout="prior").median()
        numbers = (nll_truth, nll_resampled, nll_flow)
        assert abs(nll_resampled - nll_truth) < 40 and nll_flow > nll_resampled + 100, numbers
        # temperature 0: the proposal Gaussian's conditional mean, deterministic, and project()'s completion
        zero = prior.sample(1, temperature=0, **kwargs)[0]
        assert torch.equal(zero, prior.sample(1, temperature=0, **kwargs)[0])
        kept = prior.project(truth, mask, layout="prior", keep_observed=True)
        torch.testing.assert_close(kept[:, hidden], zero[:, hidden])
