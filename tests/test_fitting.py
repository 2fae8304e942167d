"""posepriors.fitting: body keypoints, the keypoint fit, masks, the prior term and input checks."""

from __future__ import annotations

import math

import pytest
import torch

from posepriors.fitting import BODY_KEYPOINTS, DEFAULT_STEPS, FitResult, body_keypoints, fit_keypoints
from posepriors.kinematics import forward_kinematics, rest_offsets
from posepriors.priors import GaussianConfig, GaussianPrior

LEFT_WRIST = 20


def synthetic_body(n: int, seed: int, scale: float = 0.3) -> torch.Tensor:
    """Random body poses (n, 21, 3), moderate angles."""
    return scale * torch.randn(n, 21, 3, generator=torch.Generator().manual_seed(seed))


def to55(body: torch.Tensor, root: torch.Tensor | None = None) -> torch.Tensor:
    pose = torch.zeros(*body.shape[:-2], 55, 3, dtype=body.dtype)
    pose[..., 1:22, :] = body
    if root is not None:
        pose[..., 0, :] = root
    return pose


def body_prior(mean: torch.Tensor, std: float, joints: str = "body") -> GaussianPrior:
    prior = GaussianPrior(GaussianConfig(joints=joints, min_std=1e-3))
    with torch.no_grad():
        prior.mean.zero_()
        prior.mean[:21] = mean  # the body joints come first in every layout used here
        prior.log_std.fill_(math.log(std))
    return prior.eval().requires_grad_(False)


def test_body_keypoints_match_forward_kinematics():
    body = synthetic_body(5, seed=0, scale=0.8)
    root = 0.5 * torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    expected = forward_kinematics(to55(body, root))[:, :BODY_KEYPOINTS]
    torch.testing.assert_close(body_keypoints(body, root), expected)
    offsets = 1.3 * rest_offsets()
    torch.testing.assert_close(body_keypoints(body, offsets=offsets), forward_kinematics(to55(body), offsets)[:, :22])
    # any leading batch dims
    assert body_keypoints(body.reshape(5, 1, 21, 3)).shape == (5, 1, 22, 3)


def test_fit_recovers_a_known_pose_from_exact_keypoints():
    truth = synthetic_body(4, seed=2).double()
    keypoints = body_keypoints(truth)
    start = fit_keypoints(keypoints, steps=0)
    result = fit_keypoints(keypoints, steps=400, lr=0.02)
    assert isinstance(result, FitResult) and result.prior_nll is None and result.steps == 400
    assert result.pose.shape == (4, 21, 3) and result.keypoints.shape == (4, 22, 3)
    assert result.pose.dtype == torch.float64
    error_mm = 1000 * (result.keypoints - keypoints).norm(dim=-1)
    assert error_mm.mean() < 3.0, error_mm.mean()
    assert bool((result.keypoint_loss < 1e-3 * start.keypoint_loss).all())
    torch.testing.assert_close(result.keypoints, body_keypoints(result.pose))
    # canonical angles
    assert bool((result.pose.norm(dim=-1) <= math.pi + 1e-6).all())


def test_default_step_budgets_and_lbfgs_stops_once_converged(monkeypatch):
    """Without ``steps``, Adam takes 200 steps and L-BFGS at most 800 iterations (``DEFAULT_STEPS``); L-BFGS stops
    by itself once its line search finds no step (in float32 a converged fit does), so a fit that converges early
    costs no more with the larger budget: the same result from 800 as from 300 iterations, in far fewer objective
    evaluations than allowed."""
    truth = synthetic_body(2, seed=4)
    keypoints = body_keypoints(truth) + 0.01 * torch.randn(2, 22, 3, generator=torch.Generator().manual_seed(5))
    prior = body_prior(torch.zeros(21, 3), 0.5)
    assert DEFAULT_STEPS == {"adam": 200, "lbfgs": 800}
    assert fit_keypoints(keypoints, steps=None).steps == 200 and fit_keypoints(keypoints).steps == 200
    evaluations = []
    original = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: evaluations.append(1) or original(*a, **k))
    result = fit_keypoints(keypoints, prior=prior, weight=1e-4, optimizer="lbfgs")
    assert result.steps == 800 and 0 < len(evaluations) < 300, len(evaluations)
    again = fit_keypoints(keypoints, prior=prior, weight=1e-4, optimizer="lbfgs", steps=300)
    torch.testing.assert_close(again.pose, result.pose, atol=0, rtol=0)
    with pytest.raises(ValueError, match="or None"):
        fit_keypoints(keypoints, steps=-1)


def test_hidden_keypoints_do_not_enter_the_fit():
    truth = synthetic_body(3, seed=3)
    keypoints = body_keypoints(truth)
    wrong = keypoints.clone()
    wrong[:, LEFT_WRIST] += 1.0  # one metre off
    visible = torch.ones(BODY_KEYPOINTS, dtype=torch.bool)
    visible[LEFT_WRIST] = False
    hidden = fit_keypoints(wrong, visible=visible, steps=50)
    reference = fit_keypoints(keypoints, visible=visible, steps=50)
    torch.testing.assert_close(hidden.pose, reference.pose)
    torch.testing.assert_close(hidden.keypoint_loss, reference.keypoint_loss)
    seen = fit_keypoints(wrong, steps=50)
    assert not torch.allclose(seen.pose, reference.pose)
    # a per-pose mask: pose 0 sees the wrong wrist, the others do not
    per_pose = visible.expand(3, -1).clone()
    per_pose[0, LEFT_WRIST] = True
    mixed = fit_keypoints(wrong, visible=per_pose, steps=50)
    torch.testing.assert_close(mixed.pose[1:], reference.pose[1:])
    torch.testing.assert_close(mixed.pose[0], seen.pose[0])


def test_unbatched_keypoints_nan_where_hidden_numpy_masks_and_confidences():
    """Found by a review: (22, 3) keypoints crashed after the whole fit; NaN at a hidden keypoint was refused; NumPy
    masks and weights were refused; float confidences were refused."""
    import numpy as np

    truth = synthetic_body(3, seed=3)
    keypoints = body_keypoints(truth)
    prior = body_prior(torch.zeros(21, 3), 0.5)
    one = fit_keypoints(keypoints[0], prior=prior, steps=30)
    assert one.pose.shape == (21, 3) and one.loss.shape == () and one.keypoints.shape == (22, 3)
    torch.testing.assert_close(one.pose, fit_keypoints(keypoints[:1], prior=prior, steps=30).pose[0])
    visible = torch.ones(BODY_KEYPOINTS, dtype=torch.bool)
    visible[LEFT_WRIST] = False
    reference = fit_keypoints(keypoints, prior=prior, visible=visible, steps=30)
    holes = keypoints.clone()
    holes[:, LEFT_WRIST] = math.nan
    torch.testing.assert_close(fit_keypoints(holes, prior=prior, visible=visible, steps=30).pose, reference.pose)
    as_numpy = fit_keypoints(holes, prior=prior, visible=visible.numpy(), weight=np.full(3, 1e-4), steps=30)
    torch.testing.assert_close(as_numpy.pose, reference.pose)
    confidences = fit_keypoints(holes, prior=prior, visible=visible.float(), steps=30)  # 1 / 0: the same fit
    torch.testing.assert_close(confidences.pose, reference.pose)
    scores = 0.02 * (torch.rand(3, BODY_KEYPOINTS, generator=torch.Generator().manual_seed(0)) + 0.1)  # sum < 1
    weighted = fit_keypoints(keypoints, prior=prior, visible=scores, steps=0)
    fitted = body_keypoints(weighted.pose)
    expected = ((fitted - keypoints).square().sum(-1) * scores).sum(-1) / scores.sum(-1)
    torch.testing.assert_close(weighted.keypoint_loss, expected)
    with pytest.raises(ValueError, match="expected finite keypoints"):  # NaN where visible is still refused
        fit_keypoints(holes, prior=prior, steps=1)


def test_keypoints_off_centre_or_in_millimetres_are_warned_about():
    keypoints = body_keypoints(synthetic_body(2, seed=5))
    mixed = torch.cat([keypoints, 1000 * keypoints[:1]])  # one broken pose among good ones is found
    with pytest.warns(UserWarning, match=r"bones of poses \[2\] are 1e\+03 times the skeleton's .* millimetres"):
        fit_keypoints(mixed, steps=1)
    with pytest.warns(UserWarning, match=r"pelvis keypoint \(joint 0\) of poses \[0, 1\] .*pelvis-centred"):
        fit_keypoints(keypoints + torch.tensor([0.1, 0.2, 3.0]), steps=1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        noisy = keypoints + 0.04 * torch.randn(keypoints.shape, generator=torch.Generator().manual_seed(0))
        fit_keypoints(noisy, steps=1)  # 4 cm noise, the benchmark's largest: no warning


def test_the_prior_term_pulls_towards_the_prior():
    target = synthetic_body(1, seed=4)[0]
    prior = body_prior(target, std=0.05)
    keypoints = torch.zeros(2, BODY_KEYPOINTS, 3)
    nothing = torch.zeros(BODY_KEYPOINTS, dtype=torch.bool)  # no data: only the prior acts
    result = fit_keypoints(keypoints, prior=prior, weight=1.0, visible=nothing, steps=300, lr=0.02)
    assert (result.pose - target).abs().max() < 0.02
    assert result.prior_nll is not None
    torch.testing.assert_close(result.prior_nll, prior.nll(result.pose))
    torch.testing.assert_close(result.loss, result.keypoint_loss + result.prior_nll)
    assert bool((result.keypoint_loss == 0).all())
    # weight 0 (per pose) is the prior-free fit
    truth = synthetic_body(2, seed=5)
    kp = body_keypoints(truth)
    free = fit_keypoints(kp, steps=30)
    weighted = fit_keypoints(kp, prior=prior, weight=torch.tensor([0.0, 1e-2]), steps=30)
    torch.testing.assert_close(weighted.pose[0], free.pose[0])
    assert not torch.allclose(weighted.pose[1], free.pose[1])


def test_the_prior_gradient_reaches_the_pose():
    prior = body_prior(synthetic_body(1, seed=6)[0], std=0.2)
    pose = torch.zeros(2, 21, 3, requires_grad=True)
    prior.nll(pose).sum().backward()
    assert pose.grad is not None and bool(pose.grad.abs().sum() > 0)
    # one Adam step from the zero pose with only the prior moves every coordinate by about lr
    result = fit_keypoints(
        torch.zeros(2, 22, 3), prior=prior, visible=torch.zeros(22, dtype=torch.bool), weight=1.0, steps=1, lr=0.01
    )
    torch.testing.assert_close(result.pose.abs(), torch.full_like(result.pose, 0.01), atol=1e-4, rtol=0)


def test_hands_of_a_whole_body_prior_are_marginalised():
    target = synthetic_body(1, seed=7)[0]
    body_only = body_prior(target, std=0.1)
    with_hands = body_prior(target, std=0.1, joints="body+left_hand+right_hand")
    truth = synthetic_body(3, seed=8)
    kp = body_keypoints(truth) + 0.01 * torch.randn(3, 22, 3, generator=torch.Generator().manual_seed(9))
    a = fit_keypoints(kp, prior=body_only, weight=1e-4, steps=40)
    b = fit_keypoints(kp, prior=with_hands, weight=1e-4, steps=40)
    torch.testing.assert_close(a.pose, b.pose)
    torch.testing.assert_close(a.prior_nll, b.prior_nll)
    # not the NLL of flat (zero) hands scored as observed
    flat = with_hands.nll(to55(b.pose)[:, list(with_hands.joints)])
    assert not torch.allclose(flat, b.prior_nll)


def test_init_noise_is_reproducible_with_a_generator():
    kp = body_keypoints(synthetic_body(2, seed=10))
    a = fit_keypoints(kp, steps=0, init_noise=0.1, generator=torch.Generator().manual_seed(0))
    b = fit_keypoints(kp, steps=0, init_noise=0.1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.pose, b.pose)
    assert a.pose.abs().sum() > 0


def test_leading_batch_dims_and_a_known_root():
    truth = synthetic_body(6, seed=11).reshape(2, 3, 21, 3)
    root = torch.tensor([0.3, -0.2, 0.1])
    kp = body_keypoints(truth, root)
    result = fit_keypoints(kp, global_orient=root, steps=5)
    assert result.pose.shape == (2, 3, 21, 3) and result.loss.shape == (2, 3)
    torch.testing.assert_close(result.keypoints, body_keypoints(result.pose, root))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keypoints": torch.zeros(2, 21, 3)}, r"expected keypoints .* \(\*, 22, 3\), got \(2, 21, 3\)"),
        ({"visible": torch.ones(21, dtype=torch.bool)}, r"expected visible of shape \(22,\).*got \(21,\)"),
        ({"visible": torch.ones(3, 22, dtype=torch.bool)}, r"expected visible .*got \(3, 22\)"),
        ({"init": torch.zeros(2, 22, 3)}, r"expected init of shape \(2, 21, 3\), got \(2, 22, 3\)"),
        ({"weight": torch.ones(3)}, r"expected weight .* \(2,\), got \(3,\)"),
        ({"weight": -1.0}, r"expected finite prior weights >= 0, got -1.0"),
        ({"offsets": torch.zeros(21, 3)}, r"expected offsets of shape \(55, 3\) or \(22, 3\), got \(21, 3\)"),
        ({"global_orient": torch.zeros(2, 4)}, r"expected global_orient .*got \(2, 4\)"),
        ({"steps": -1}, r"expected steps to be an integer >= 0 \(or None: the optimiser.s default\), got -1"),
        ({"lr": 0.0}, r"expected a finite learning rate lr > 0, got 0.0"),
        ({"keypoints": torch.full((2, 22, 3), math.nan)}, r"expected finite keypoints"),
        ({"init": torch.full((2, 21, 3), math.nan)}, r"expected finite init, got NaN or Inf"),
        ({"global_orient": torch.tensor([math.inf, 0, 0])}, r"expected finite global_orient"),
        ({"offsets": torch.full((55, 3), math.nan)}, r"expected finite offsets"),
    ],
)
def test_bad_inputs_raise_value_errors(kwargs, message):
    args = {"keypoints": torch.zeros(2, 22, 3), "prior": body_prior(torch.zeros(21, 3), 0.2)}
    args.update(kwargs)
    keypoints = args.pop("keypoints")
    with pytest.raises(ValueError, match=message):
        fit_keypoints(keypoints, **args)


def test_bad_types_and_priors_raise():
    with pytest.raises(TypeError, match="boolean visible mask .* or float confidences, got dtype torch.int64"):
        fit_keypoints(torch.zeros(1, 22, 3), visible=torch.ones(22, dtype=torch.long))
    with pytest.raises(ValueError, match="expected keypoint confidences that are finite and >= 0"):
        fit_keypoints(torch.zeros(1, 22, 3), visible=-torch.ones(22))
    with pytest.raises(TypeError, match="keypoints as floating-point values"):
        fit_keypoints(torch.zeros(1, 22, 3, dtype=torch.long))
    hand = GaussianPrior(GaussianConfig(joints="left_hand"))
    with pytest.raises(ValueError, match=r"models some of the 21 body joints .*got one over joints \(25,"):
        fit_keypoints(torch.zeros(1, 22, 3), prior=hand)
    with pytest.raises(ValueError, match=r"expected body poses of shape \(\*, 21, 3\), got \(2, 55, 3\)"):
        body_keypoints(torch.zeros(2, 55, 3))
    for kwargs, message in (
        ({"generator": 0, "init_noise": 0.1}, "expected generator to be None or a torch.Generator"),
        ({"weight": torch.ones(1, dtype=torch.complex64)}, "expected real prior weights"),
        ({"weight": torch.ones(1, dtype=torch.bool)}, "expected real prior weights"),
        ({"init": [0.0] * 63}, "expected init as a tensor or numpy array, got list"),
    ):
        with pytest.raises(TypeError, match=message):
            fit_keypoints(torch.zeros(1, 22, 3), prior=body_prior(torch.zeros(21, 3), 0.2), **kwargs)
    with pytest.raises(ValueError, match=r"expected global_orient of shape \(3,\) or \(4, 3\), got \(3, 3\)"):
        body_keypoints(torch.zeros(4, 21, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"expected offsets as a tensor of shape \(55, 3\), got \(22, 3\)"):
        forward_kinematics(torch.zeros(1, 55, 3), torch.zeros(22, 3))


def test_numpy_numbers_half_keypoints_and_inference_mode_are_fitted_as_usual():
    import numpy as np

    truth = 0.3 * torch.randn(2, 21, 3, generator=torch.Generator().manual_seed(4))
    keypoints = body_keypoints(truth)
    prior = body_prior(torch.zeros(21, 3), 0.5)
    plain = fit_keypoints(keypoints, prior=prior, steps=20)
    numpy_args = fit_keypoints(
        keypoints, prior=prior, steps=np.int64(20), lr=np.float64(0.05), init=np.zeros((2, 21, 3))
    )
    torch.testing.assert_close(numpy_args.pose, plain.pose)
    with torch.inference_mode():
        inside = fit_keypoints(keypoints, prior=prior, steps=20)
    torch.testing.assert_close(inside.pose, plain.pose)
    half = fit_keypoints(keypoints.half(), prior=prior, steps=20)  # fitted in float32, returned in float16
    assert half.pose.dtype == torch.float16 and torch.isfinite(half.loss).all()
    torch.testing.assert_close(half.pose.float(), plain.pose, atol=2e-2, rtol=0)
    double = rest_offsets(torch.float64)  # offsets in another dtype are cast to the pose's
    torch.testing.assert_close(
        forward_kinematics(torch.zeros(1, 55, 3), double), forward_kinematics(torch.zeros(1, 55, 3))
    )


def test_lbfgs_reaches_a_lower_objective_than_adam_with_a_gaussian_prior() -> None:
    """L-BFGS converges on the regularised objective: its final loss is at most Adam's after the same steps."""
    torch.manual_seed(0)
    truth = 0.3 * torch.randn(4, 21, 3)
    keypoints = body_keypoints(truth) + 0.01 * torch.randn(4, BODY_KEYPOINTS, 3)
    prior = GaussianPrior(GaussianConfig(joints="body")).eval().requires_grad_(False)
    adam = fit_keypoints(keypoints, prior=prior, weight=1e-4, steps=60)
    lbfgs = fit_keypoints(keypoints, prior=prior, weight=1e-4, steps=60, optimizer="lbfgs")
    assert lbfgs.loss.shape == (4,) and lbfgs.pose.shape == (4, 21, 3)
    assert lbfgs.loss.sum() <= adam.loss.sum() + 1e-7
    assert bool(torch.isfinite(lbfgs.loss).all())


def test_fit_keypoints_rejects_an_unknown_optimizer() -> None:
    keypoints = torch.zeros(1, BODY_KEYPOINTS, 3)
    with pytest.raises(ValueError, match="optimizer.*'adam'.*'sgd'"):
        fit_keypoints(keypoints, optimizer="sgd")
    with pytest.raises(ValueError, match="lr > 0"):
        fit_keypoints(keypoints, optimizer="lbfgs", lr=-1.0)


def test_lbfgs_runs_without_a_prior() -> None:
    truth = 0.2 * torch.randn(2, 21, 3, generator=torch.Generator().manual_seed(1))
    result = fit_keypoints(body_keypoints(truth), steps=30, optimizer="lbfgs")
    assert result.prior_nll is None and result.keypoint_loss.max() < 1e-4


def test_latent_space_fit_lowers_its_objective_and_returns_poses() -> None:
    from posepriors.priors import GlobalFlowConfig, GlobalFlowPrior

    torch.manual_seed(0)
    prior = GlobalFlowPrior(GlobalFlowConfig(joints="body", hidden=16, num_layers=2, coupling="spline"))
    prior.eval().requires_grad_(False)
    truth = 0.2 * torch.randn(3, 21, 3, generator=torch.Generator().manual_seed(2))
    keypoints = body_keypoints(truth)
    start = fit_keypoints(keypoints, prior=prior, weight=1e-5, steps=0, space="latent")
    result = fit_keypoints(keypoints, prior=prior, weight=1e-5, steps=40, optimizer="lbfgs", space="latent")
    assert result.pose.shape == (3, 21, 3) and result.prior_nll.shape == (3,)
    assert bool((result.loss < start.loss).all())
    assert bool((result.keypoint_loss < start.keypoint_loss).all())
    # the reported NLL is the fitted pose's own
    torch.testing.assert_close(result.prior_nll, prior.nll(result.pose), atol=1e-3, rtol=1e-4)
    # steps=0 from a pose: the pose comes back (through its latent code)
    back = fit_keypoints(keypoints, prior=prior, weight=1e-5, steps=0, init=truth, space="latent")
    torch.testing.assert_close(back.pose, truth, atol=1e-4, rtol=0)


def test_latent_space_fit_needs_a_prior_with_a_body_latent_space() -> None:
    keypoints = torch.zeros(1, BODY_KEYPOINTS, 3)
    with pytest.raises(ValueError, match="pass a prior with a body latent space"):
        fit_keypoints(keypoints, space="latent")
    prior = GaussianPrior(GaussianConfig(joints="body")).eval()
    with pytest.raises(ValueError, match=r"body latent space \(global_flow, joint_flow\), got gaussian"):
        fit_keypoints(keypoints, prior=prior, space="latent")
    with pytest.raises(ValueError, match="space 'pose' or 'latent'"):
        fit_keypoints(keypoints, prior=prior, space="z")


def test_latent_space_fit_keeps_the_keypoints_dtype() -> None:
    from posepriors.priors import GlobalFlowConfig, GlobalFlowPrior

    prior = GlobalFlowPrior(GlobalFlowConfig(joints="body", hidden=8, num_layers=1)).eval().requires_grad_(False)
    keypoints = body_keypoints(torch.zeros(2, 21, 3, dtype=torch.float64))
    result = fit_keypoints(keypoints, prior=prior, weight=1e-5, steps=5, space="latent")
    assert result.pose.dtype == torch.float64 and result.loss.dtype == torch.float64
