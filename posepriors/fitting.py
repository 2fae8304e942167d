"""Fitting body poses to 3D keypoints, with a pose prior as the regulariser.

The model is the approximate skeleton of :mod:`posepriors.kinematics` (not the licensed SMPL-X template): the 22
body keypoints are the positions of SMPL-X joints 0..21 (pelvis, hips, spine, knees, ankles, feet, neck, collars,
head, shoulders, elbows, wrists) as :func:`posepriors.kinematics.forward_kinematics` computes them, with the pelvis
at the origin. :func:`fit_keypoints` optimises the rotations of the 21 body joints (SMPL-X joints 1..21); the root
orientation is known (identity unless given) and there is no translation, so keypoints must be pelvis-centred in
the frame the root orientation refers to. The objective per pose is::

    mean over visible keypoints of |FK(pose)_k - keypoint_k|^2  (m^2)  +  weight * prior.energy(body pose)

(or, in latent space, ``+ weight * |z|^2 / 2``), minimised from the zero pose (or ``init``) with Adam
(``optimizer="adam"``, the default) or L-BFGS with a strong-Wolfe line search (``optimizer="lbfgs"``, as SMPLify
fits). ``prior.energy`` is the prior's fitting energy (:mod:`posepriors.priors.energy`): its NLL for every prior
but one that carries a fitting energy (the shipped ``global_flow``: its smoothed body density times a
full-covariance body Gaussian, which fits better than any single prior; docs/models.md). The batch's objective is
the sum of the per-pose objectives. With Adam (whose statistics are per coordinate) the poses of a batch are
independent: a pose's fit is its fit alone. With L-BFGS they are not (below).

**Which optimiser.** On the Gaussians (``gaussian``, ``gaussian_full``, SMPLify's GMM) and on flows trained with
input noise, L-BFGS reaches the objective's minimum in fewer steps than Adam and fits better (``gaussian_full`` on
80 ``body_val`` poses, 1.5 cm noise: 8.5 deg against 9.3 after 200 Adam steps). On the shipped flows, whose
densities are very sharp, neither converges in pose space: Adam with a constant learning rate moves every
coordinate by about ``lr`` per step and cannot settle into a mode narrower than that, and L-BFGS's line search
stalls (it fits worse than Adam there). docs/models.md ("Why the flows lose at fitting") has the measurements.
L-BFGS runs on the batch's summed objective: its line search and curvature memory are shared by the poses of a
batch, so a pose's fit depends on the batch it is in (and on the number of threads). Measured on 8 ``body_val``
poses (1.5 cm noise, the shipped ``global_flow``, weight 2e-5, 100 iterations): fitted together, they ended up to
0.14 rad from the same poses fitted one at a time in pose space (mean error 8.72 against 8.63 deg), and up to
0.78 rad in latent space (9.51 against 9.09 deg); one broken frame (keypoints in millimetres, which now warns)
among 4 good ones took their errors from 7-10 deg to 19-29 deg. Fit a clip's frames
in one batch only when they are alike in quality, or one pose (or a few) at a time when each must stand alone,
or use Adam. (A per-pose L-BFGS with a backtracking line search, tried in its place, fitted SMPLify's GMM worse
on ``body_val``, 12.4 against 11.9 deg, and needed several times the calls: not kept.)

**Which space.** With ``space="latent"`` the fit optimises a flow's latent code of the body (``global_flow``,
``joint_flow``) instead of the rotations (the way VPoser users fit): the objective is the keypoint term plus
``weight * |z|^2 / 2``, and the pose is the flow's decoding of ``z``. The flow's log-determinant, which makes its
density spiky, is left out, so the optimiser is not pulled into sharp modes; with L-BFGS this is how the flows fit
best (docs/models.md).

**The prior sees the 21 body joints only.** A prior that also models hands (every shipped body prior does) is given
a body-only pose, so the hands count as *missing* and are marginalised exactly, instead of being scored as flat
hands (which distorts the fit). Priors whose joints extend beyond the body and that have no exact marginal
(``mask_marginals = "none"``, so ``supports_mask`` is False) are refused.

Choosing ``weight``: with Gaussian keypoint noise of std ``s`` metres per coordinate and K visible keypoints, the
MAP objective has ``weight = 2 s^2 / K`` (``s = 1.5 cm``, ``K = 22``: about ``2e-5``); in practice tune it on
held-out poses (``benchmarks/fitting.py`` does, docs/models.md lists the tuned values).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from posepriors import skeleton
from posepriors.flows import _numba_spline
from posepriors.kinematics import _joint_positions, rest_offsets
from posepriors.priors.base import PosePrior, _check_generator
from posepriors.rotations import wrap_axis_angle
from posepriors.utils import from_numpy

__all__ = ["BODY_KEYPOINTS", "DEFAULT_STEPS", "FitResult", "body_keypoints", "fit_keypoints"]

BODY_KEYPOINTS = 22
"""Number of body keypoints: SMPL-X joints 0 (pelvis) to 21 (right wrist)."""

_OPTIMIZERS = {"adam": 0.05, "lbfgs": 1.0}  # the optimisers of fit_keypoints and their default learning rates
DEFAULT_STEPS = {"adam": 200, "lbfgs": 800}
"""``fit_keypoints``' default step budget per optimiser: Adam runs all its steps; L-BFGS stops earlier once its line
search finds no step, as a converged float32 fit does (one pose of the shipped ``global_flow`` in about 100 to 200
iterations; a batch of hundreds needs more: its poses share one line search). A float64 fit keeps finding
ever smaller steps and runs the whole budget."""
_BODY = skeleton.PARTS["body"]  # SMPL-X joints 1..21, the optimised rotations
_PARENTS = skeleton.SMPLX_PARENTS[:BODY_KEYPOINTS]


@dataclass
class FitResult:
    """The outcome of :func:`fit_keypoints`.

    Attributes:
        pose: Fitted rotations of the 21 body joints (SMPL-X joints 1..21), canonical axis-angle (angle <= pi),
            shape (*, 21, 3).
        keypoints: Keypoints of the fitted pose (SMPL-X joints 0..21), shape (*, 22, 3).
        loss: Final objective per pose, ``keypoint_loss + weight * prior_energy`` (in latent space
            ``keypoint_loss + weight * |z|^2 / 2``), shape (*,).
        keypoint_loss: Final mean squared keypoint error over the visible keypoints (squared input units, m^2),
            shape (*,); 0 for a pose without visible keypoints.
        prior_nll: Final prior NLL of the body pose (nats), shape (*,), or None without a prior (also after a
            latent-space fit: the pose's NLL, not the latent penalty).
        prior_energy: Final prior term of the pose-space objective, ``prior.energy`` of the body pose (equal to
            ``prior_nll`` for a prior without a fitting energy), shape (*,), or None without a prior.
        steps: Number of optimiser steps allowed (Adam steps, or L-BFGS iterations).
    """

    pose: Tensor
    keypoints: Tensor
    loss: Tensor
    keypoint_loss: Tensor
    prior_nll: Tensor | None
    prior_energy: Tensor | None
    steps: int


def body_keypoints(pose: Tensor, global_orient: Tensor | None = None, offsets: Tensor | None = None) -> Tensor:
    """Positions of the 22 body keypoints (SMPL-X joints 0..21) of body poses (differentiable).

    The same computation as ``forward_kinematics(pose55)[..., :22, :]`` of :mod:`posepriors.kinematics`, restricted
    to the joints that the body keypoints depend on (the hands, jaw and eyes move no body keypoint).

    Args:
        pose: Rotations of the 21 body joints (SMPL-X joints 1..21), axis-angle, shape (*, 21, 3).
        global_orient: Root orientation, axis-angle, shape (*, 3) or (3,); default identity.
        offsets: Bone offsets, shape (55, 3) or (22, 3); default :func:`posepriors.kinematics.rest_offsets`.

    Returns:
        Keypoint positions with the pelvis at the origin, shape (*, 22, 3).
    """
    if pose.dim() < 2 or pose.shape[-2:] != (len(_BODY), 3):
        raise ValueError(f"expected body poses of shape (*, 21, 3), got {tuple(pose.shape)}")
    offsets = _check_offsets(offsets, pose)
    if global_orient is None:
        root = pose.new_zeros(*pose.shape[:-2], 1, 3)
    else:
        if global_orient.shape[-1:] != (3,):
            raise ValueError(f"expected global_orient of shape (*, 3) or (3,), got {tuple(global_orient.shape)}")
        try:
            root = global_orient.to(pose.dtype).expand(*pose.shape[:-2], 3).unsqueeze(-2)
        except RuntimeError:
            raise ValueError(
                f"expected global_orient of shape (3,) or {(*pose.shape[:-2], 3)}, got {tuple(global_orient.shape)}"
            ) from None
    return _joint_positions(torch.cat([root, pose], dim=-2), _PARENTS, offsets)


def fit_keypoints(
    keypoints: Tensor,
    *,
    prior: PosePrior | None = None,
    weight: float | Tensor = 1e-4,
    visible: Tensor | None = None,
    steps: int | None = None,
    lr: float | None = None,
    init: Tensor | None = None,
    global_orient: Tensor | None = None,
    generator: torch.Generator | None = None,
    init_noise: float = 0.0,
    offsets: Tensor | None = None,
    optimizer: str = "adam",
    space: str = "pose",
) -> FitResult:
    """Fit the 21 body joint rotations to 3D body keypoints, optionally regularised by a pose prior.

    Minimises, per pose, the mean squared error over the visible keypoints plus ``weight * prior.energy(body pose)``
    (the prior's fitting energy, :meth:`~posepriors.priors.base.PosePrior.energy`: its NLL unless it carries one)
    with Adam (constant learning rate) from the zero pose, every pose of the batch at once. The root orientation
    is known (``global_orient``, identity by default) and not optimised; there is no translation (the pelvis
    keypoint is the origin). The prior is given the 21 body joints only: joints it models beyond them (hands) are
    marginalised (see the module docstring). The prior's parameters are not touched.

    Args:
        keypoints: Pelvis-centred positions of SMPL-X joints 0..21 (metres for the default skeleton), e.g.
            ``forward_kinematics(pose55)[..., :22, :]`` plus noise, shape (*, 22, 3). A warning says so when the
            pelvis keypoint lies more than 3 bone lengths from the origin, or the bones are not within 5x of the
            skeleton's lengths (millimetres, say).
        prior: Optional :class:`~posepriors.priors.base.PosePrior` modelling some of the body joints, on the
            keypoints' device.
        weight: Weight of the prior's fitting energy (``prior.energy``; its NLL for most priors), >= 0: a number,
            or one per pose, shape (*,) (a tensor or a NumPy array). Ignored without a prior.
        visible: Which keypoints are observed, boolean, shape (22,) or (*, 22), or per-keypoint confidences
            (float, >= 0; a detector's scores), which weigh each keypoint's squared error (the keypoint term is
            their weighted mean); default all. Hidden keypoints (False, or confidence 0) do not enter the loss, and
            their values are not read (NaN is fine there); their joints are left to the prior. A tensor or a NumPy
            array.
        steps: Number of Adam steps, or the most L-BFGS iterations (>= 0; an L-BFGS iteration may evaluate the
            objective several times in its line search, at most ``1.25 * steps`` evaluations in all; it stops
            earlier once its line search finds no step, as a converged float32 fit does). Default
            (:data:`DEFAULT_STEPS`) 200 for Adam and 800 for L-BFGS: one pose converges in about 100 to 200
            iterations, but the poses of a batch share one line search, and the fitting benchmark's 581 poses in
            one batch needed 800 (at 200 their objective was still falling and ``global_flow``'s hidden joints
            ended 2 mm further from the truth; docs/models.md).
        lr: Learning rate (> 0): Adam's, in radians per step at most, roughly (default 0.05); L-BFGS's initial
            step scale (default 1, the usual choice with a line search).
        init: Starting body pose, shape (*, 21, 3); default zeros (the T-pose of the skeleton).
        global_orient: Known root orientation, axis-angle, shape (*, 3) or (3,); default identity.
        generator: Generator of the optional start jitter (``init_noise``); without one the jitter comes from the
            global RNG (the fit itself draws nothing).
        init_noise: Std (radians) of Gaussian jitter added to the start (default 0: a deterministic fit).
        offsets: Bone offsets of the skeleton, shape (55, 3) or (22, 3); default
            :func:`posepriors.kinematics.rest_offsets`.
        optimizer: ``"adam"`` or ``"lbfgs"`` (see the module docstring for which to pick).
        space: ``"pose"`` (optimise the rotations, objective ``keypoint term + weight * prior.energy``) or
            ``"latent"`` (optimise the prior's latent code of the body, as VPoser users fit: objective
            ``keypoint term + weight * |z|^2 / 2``, starting from the code of the start pose; needs a prior with a
            body latent space: ``joint_flow``, or ``global_flow`` with the body as its first part; see their
            ``body_latent``).

    Returns:
        The fit (pose (*, 21, 3), keypoints (*, 22, 3), final loss terms (*,)), in the keypoints' dtype (half-precision
        keypoints are fitted in float32).

    Raises:
        ValueError: On inputs of the wrong shape or value (non-finite keypoints, ``init``, ``global_orient`` or
            ``offsets`` included), or a prior that cannot score a body-only pose.
        TypeError: On non-floating keypoints, a ``visible`` that is neither boolean nor floating-point, or
            arguments of the wrong type.
    """
    if torch.is_inference_mode_enabled():  # the fit needs autograd: run it on copies, with autograd back on
        with torch.inference_mode(False):
            copies = {
                "keypoints": keypoints, "visible": visible, "weight": weight, "init": init,
                "global_orient": global_orient, "offsets": offsets,
            }  # fmt: skip
            copies = {k: v.clone() if isinstance(v, Tensor) else v for k, v in copies.items()}
            return fit_keypoints(
                **copies, prior=prior, steps=steps, lr=lr, generator=generator, init_noise=init_noise,
                optimizer=optimizer, space=space,
            )  # fmt: skip
    keypoints = _float_tensor(keypoints, "keypoints", finite=False)
    if keypoints.dim() < 2 or keypoints.shape[-2:] != (BODY_KEYPOINTS, 3):
        raise ValueError(
            f"expected keypoints of SMPL-X joints 0..21 of shape (*, {BODY_KEYPOINTS}, 3), got {tuple(keypoints.shape)}"
        )
    batch_shape = keypoints.shape[:-2]
    target = keypoints.detach().reshape(-1, BODY_KEYPOINTS, 3)
    B = target.shape[0]
    if B == 0:
        raise ValueError(f"expected at least one pose of keypoints, got an empty batch of shape {tuple(batch_shape)}")
    out_dtype = target.dtype
    if out_dtype in (torch.float16, torch.bfloat16):  # too coarse for the fit's squared errors: fit in float32
        target = target.float()
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"expected optimizer to be one of {sorted(_OPTIMIZERS)}, got {optimizer!r}")
    if steps is None:
        steps = DEFAULT_STEPS[optimizer]
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"expected steps to be an integer >= 0 (or None: the optimiser's default), got {steps!r}")
    steps = int(steps)
    _check_generator(generator)
    if space not in ("pose", "latent"):
        raise ValueError(f"expected space 'pose' or 'latent', got {space!r}")
    if space == "latent" and prior is None:
        raise ValueError("space='latent' fits the prior's latent code: pass a prior with a body latent space")
    if lr is None:
        lr = _OPTIMIZERS[optimizer]
    if isinstance(lr, bool) or not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"expected a finite learning rate lr > 0, got {lr!r}")
    lr = float(lr)
    real = isinstance(init_noise, numbers.Real) and not isinstance(init_noise, bool)
    if not (real and math.isfinite(init_noise) and init_noise >= 0):
        raise ValueError(f"expected a finite init_noise >= 0 (radians), got {init_noise!r}")
    dtype, device = target.dtype, target.device
    vis = _check_visible(visible, batch_shape, B, device, dtype)
    if not bool((torch.isfinite(target) | (vis == 0)[..., None]).all()):
        raise ValueError("expected finite keypoints, got NaN or Inf (mark missing keypoints with visible=False)")
    target = torch.where((vis > 0)[..., None], target, 0.0)  # a hidden keypoint's value is never read
    w = _check_weight(weight, batch_shape, B, device, dtype)
    offsets = _check_offsets(offsets, target)
    _warn_unless_pelvis_centred_metres(target, vis, offsets)
    root = None
    if global_orient is not None:
        global_orient = _float_tensor(global_orient, "global_orient")
        if global_orient.shape[-1:] != (3,):
            raise ValueError(f"expected global_orient of shape (*, 3) or (3,), got {tuple(global_orient.shape)}")
        try:
            root = global_orient.detach().to(device=device, dtype=dtype).expand(*batch_shape, 3).reshape(B, 3)
        except RuntimeError:
            raise ValueError(
                f"expected global_orient of shape (3,) or {(*batch_shape, 3)}, got {tuple(global_orient.shape)}"
            ) from None
    if init is None:
        start = target.new_zeros(B, len(_BODY), 3)
    else:
        init = _float_tensor(init, "init")
        if init.shape != (*batch_shape, len(_BODY), 3):
            raise ValueError(f"expected init of shape {(*batch_shape, len(_BODY), 3)}, got {tuple(init.shape)}")
        start = init.detach().to(device=device, dtype=dtype).reshape(B, len(_BODY), 3)
    if init_noise > 0:
        if generator is None:
            noise = torch.randn(start.shape, device=device, dtype=dtype)
        else:
            noise = torch.randn(start.shape, generator=generator, device=generator.device).to(device, dtype)
        start = start + init_noise * noise
    score = _prior_scorer(prior, device) if prior is not None else None
    decode = None
    if space == "latent":
        encode, decode = _body_latent(prior)
    count = vis.sum(-1)
    count = torch.where(count > 0, count, 1.0)  # the weighted mean (a pose that sees nothing: 0)

    def keypoint_loss(pose: Tensor) -> Tensor:
        fitted = body_keypoints(pose, root, offsets)
        return ((fitted - target).square().sum(-1) * vis).sum(-1) / count  # (B,)

    def objective(variable: Tensor) -> Tensor:
        if decode is not None:  # the latent code: keypoints of its pose + the base density's -log (up to a constant)
            return keypoint_loss(decode(variable)) + w * 0.5 * variable.square().sum(-1)
        data = keypoint_loss(variable)
        return data if score is None else data + w * score(variable)

    with _numba_spline.one_path(steps):  # one arithmetic for the whole fit (see one_path)
        with torch.enable_grad():
            if decode is not None:
                with torch.no_grad():
                    variable = encode(start)
                variable = variable.clone().requires_grad_(True)
            else:
                variable = start.clone().requires_grad_(True)

            def closure() -> Tensor:
                loss = objective(variable).sum()
                (grad,) = torch.autograd.grad(loss, [variable])
                variable.grad = grad.contiguous()  # L-BFGS flattens it with view
                return loss.detach()

            if optimizer == "adam":
                adam = torch.optim.Adam([variable], lr=float(lr))
                for _ in range(steps):
                    closure()
                    adam.step()
            elif steps > 0:
                # tolerances at zero: the objective is in m^2 (values ~1e-4), far below L-BFGS's default thresholds
                lbfgs = torch.optim.LBFGS(
                    [variable], lr=float(lr), max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                    tolerance_grad=0.0, tolerance_change=0.0,
                )  # fmt: skip
                lbfgs.step(closure)
        with torch.no_grad():
            final = variable.detach()
            if decode is not None:
                total = objective(final)  # the latent objective, at the code
                final = decode(final)
            final = wrap_axis_angle(final)
            data = keypoint_loss(final)
            energy = score(final) if score is not None else None
            nll = _prior_scorer(prior, device, "nll")(final) if score is not None else None
            if decode is None:
                total = data if energy is None else data + w * energy
            fitted = body_keypoints(final, root, offsets)

    def shaped(t: Tensor | None, *tail: int) -> Tensor | None:
        return None if t is None else t.reshape((*batch_shape, *tail)).to(out_dtype)

    return FitResult(
        pose=shaped(final, len(_BODY), 3),
        keypoints=shaped(fitted, BODY_KEYPOINTS, 3),
        loss=shaped(total),
        keypoint_loss=shaped(data),
        prior_nll=shaped(nll),
        prior_energy=shaped(energy),
        steps=steps,
    )


def _body_latent(prior: PosePrior) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """The (encode, decode) maps between body poses (B, 21, 3) and the prior's latent body codes."""
    body_latent = getattr(prior, "body_latent", None)
    if body_latent is None:
        raise ValueError(
            f"space='latent' needs a prior with a body latent space (global_flow, joint_flow), got {prior.model_type}; "
            "fit it with space='pose'"
        )
    _, encode, decode = body_latent()
    dtype = prior.dtype  # the flow runs in its own dtype; the fit's variable keeps the keypoints' dtype
    return (lambda pose: encode(pose.to(dtype)).to(pose.dtype)), (lambda z: decode(z.to(dtype)).to(z.dtype))


def _prior_scorer(prior: PosePrior, device: torch.device, method: str = "energy") -> Callable[[Tensor], Tensor]:
    """A function body pose (B, 21, 3) -> the prior's ``energy`` (its fitting energy, the NLL for a prior without
    one) or ``nll`` (B,), which scores only the body joints the prior models."""
    if not isinstance(prior, PosePrior):
        raise TypeError(f"expected prior to be a PosePrior or None, got {type(prior).__name__}")
    joints = set(prior.joints)
    if not joints & set(_BODY):
        raise ValueError(
            f"expected a prior that models some of the 21 body joints (SMPL-X 1..21), got one over joints "
            f"{prior.joints}"
        )
    extra = sorted(joints - set(_BODY))
    if extra and not prior.supports_mask:
        raise ValueError(
            f"{type(prior).__name__} also models joints {extra} beyond the body and has no exact marginal for them "
            f"(mask_marginals='none'); a body-only fit needs a body-only prior or one that marginalises missing joints"
        )
    if prior.device != device:
        raise ValueError(f"keypoints are on {device} but the prior is on {prior.device}; move one of them")
    if tuple(prior.joints) == _BODY:

        def score(pose: Tensor) -> Tensor:
            return getattr(prior, method)(pose).to(pose.dtype)

    else:  # hands (or a root) the fit does not have are marginalised: only body_pose is observed

        def score(pose: Tensor) -> Tensor:
            return getattr(prior, method)({"body_pose": pose}).to(pose.dtype)

    return score


def _check_visible(
    visible: Tensor | np.ndarray | None, batch_shape: torch.Size, batch: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``visible`` as a float (B, 22) tensor of keypoint weights: 1 / 0 for a boolean mask, the confidences
    themselves for a float one (finite, >= 0)."""
    if visible is None:
        return torch.ones(batch, BODY_KEYPOINTS, device=device, dtype=dtype)
    if isinstance(visible, np.ndarray):
        visible = from_numpy(visible)
    if not isinstance(visible, Tensor):
        raise TypeError(
            f"expected visible as a boolean mask or float confidences (torch.Tensor or NumPy array), got "
            f"{type(visible).__name__}"
        )
    if visible.dtype != torch.bool and not visible.is_floating_point():
        raise TypeError(
            f"expected a boolean visible mask (True = observed) or float confidences, got dtype {visible.dtype}"
        )
    if visible.dim() == 0 or visible.shape[-1] != BODY_KEYPOINTS:
        raise ValueError(
            f"expected visible of shape ({BODY_KEYPOINTS},) or (*, {BODY_KEYPOINTS}), got {tuple(visible.shape)}"
        )
    if visible.is_floating_point() and not bool((torch.isfinite(visible) & (visible >= 0)).all()):
        raise ValueError("expected keypoint confidences that are finite and >= 0, got a negative, NaN or Inf one")
    try:
        visible = visible.to(device).expand(*batch_shape, BODY_KEYPOINTS)
    except RuntimeError:
        raise ValueError(
            f"expected visible of shape ({BODY_KEYPOINTS},) or {(*batch_shape, BODY_KEYPOINTS)}, "
            f"got {tuple(visible.shape)}"
        ) from None
    return visible.reshape(batch, BODY_KEYPOINTS).to(dtype)


def _check_weight(
    weight: float | Tensor, batch_shape: torch.Size, batch: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``weight`` as a (B,) tensor of finite values >= 0."""
    if isinstance(weight, np.ndarray):
        weight = from_numpy(weight)
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real | Tensor):
        raise TypeError(
            f"expected weight to be a number or a tensor (or NumPy array) of shape (*,), got {type(weight).__name__}"
        )
    if isinstance(weight, Tensor) and (weight.dtype == torch.bool or weight.is_complex()):
        raise TypeError(f"expected real prior weights, got a tensor of dtype {weight.dtype}")
    w = torch.as_tensor(weight, dtype=dtype).to(device)
    try:
        w = w.expand(batch_shape).reshape(batch)
    except RuntimeError:
        raise ValueError(
            f"expected weight as a number or of shape {tuple(batch_shape)}, got {tuple(w.shape)}"
        ) from None
    if not bool(torch.isfinite(w).all() & (w >= 0).all()):
        raise ValueError(f"expected finite prior weights >= 0, got {weight!r}")
    return w


def _warn_unless_pelvis_centred_metres(target: Tensor, vis: Tensor, offsets: Tensor) -> None:
    """Warn when a pose's keypoints (B, 22, 3) are not pelvis-centred (the fit has no translation) or its bones are
    far from the skeleton's lengths (millimetres, another scale): the fit would run and return wrong rotations (and,
    with L-BFGS, spoil the batch's other poses)."""
    bones = offsets[1:BODY_KEYPOINTS].norm(dim=-1)
    pelvis = torch.where(vis[:, 0] > 0, target[:, 0].norm(dim=-1), 0.0)
    off = (pelvis > 3 * bones.median()).nonzero().flatten()  # far beyond noise: another origin (a camera's)
    if len(off):
        warnings.warn(
            f"the pelvis keypoint (joint 0) of poses {off.tolist()[:8]} lies up to {float(pelvis.max()):.3g} from "
            "the origin, more than 3 bone lengths: expected pelvis-centred keypoints (fit_keypoints has no "
            "translation): subtract keypoints[..., :1, :] first",
            UserWarning,
            stacklevel=3,
        )
    child = torch.arange(1, BODY_KEYPOINTS, device=target.device)
    parent = torch.tensor(skeleton.SMPLX_PARENTS[1:BODY_KEYPOINTS], device=target.device)
    seen = (vis[:, child] > 0) & (vis[:, parent] > 0)
    lengths = (target[:, child] - target[:, parent]).norm(dim=-1) / bones.clamp_min(1e-12)
    ratio = torch.where(seen, lengths, math.nan).nanmedian(-1).values  # per pose; NaN where no bone is seen
    wrong = (~((ratio > 0.2) & (ratio < 5.0)) & seen.any(-1)).nonzero().flatten()
    if len(wrong):
        warnings.warn(
            f"the keypoints' bones of poses {wrong.tolist()[:8]} are {float(ratio[wrong[0]]):.3g} times the "
            "skeleton's (median, first such pose): expected the skeleton's units (metres for the default offsets; "
            "millimetres would be 1000 times): rescale the keypoints or pass offsets= in their units",
            UserWarning,
            stacklevel=3,
        )


def _float_tensor(value: object, name: str, finite: bool = True) -> Tensor:
    """``value`` (a float tensor or NumPy array) as a tensor, or a clear error naming ``name``; with ``finite``, a
    NaN or Inf is an error too."""
    value = skeleton.as_float_tensor(value, name)
    if finite and not bool(torch.isfinite(value).all()):
        raise ValueError(f"expected finite {name}, got NaN or Inf")
    return value


def _check_offsets(offsets: Tensor | None, like: Tensor) -> Tensor:
    """Bone offsets (22, 3) in ``like``'s dtype and device."""
    if offsets is None:
        return rest_offsets(like.dtype, like.device)[:BODY_KEYPOINTS]
    offsets = _float_tensor(offsets, "offsets")
    if offsets.shape not in ((skeleton.NUM_JOINTS, 3), (BODY_KEYPOINTS, 3)):
        raise ValueError(f"expected offsets of shape (55, 3) or (22, 3), got {tuple(offsets.shape)}")
    return offsets[:BODY_KEYPOINTS].to(device=like.device, dtype=like.dtype)
