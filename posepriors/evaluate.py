"""Evaluation of pose priors: likelihood, sample quality, denoising and completion; ``posepriors-eval``.

All angular errors are mean per-joint geodesic distances in degrees; NLLs are in nats per pose (and bits per
dimension) w.r.t. the Lebesgue measure on the axis-angle coordinates of the joints that were scored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import os
import sys
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from posepriors import skeleton
from posepriors.data import PoseData, load_poses
from posepriors.priors.base import PRIOR_LAYOUT, PosePrior
from posepriors.rotations import axis_angle_to_matrix
from posepriors.utils import resolve_device

DENOISERS = ("posterior_mean", "adaptive", "map")
"""The denoising test's estimators (:func:`denoise_stats`)."""

__all__ = [
    "CompletionStats",
    "DenoiseStats",
    "EvalReport",
    "NLLStats",
    "SampleStats",
    "completion_stats",
    "denoise_stats",
    "evaluate",
    "evaluate_by",
    "group_by",
    "main",
    "nll_stats",
    "sample_stats",
    "task_generator",
    "to_markdown",
]


@dataclass
class NLLStats:
    """Negative log-likelihood of the data under a prior.

    Attributes:
        mean: Mean NLL per pose (nats).
        median: Median NLL per pose (nats).
        bits_per_dim: Mean NLL in bits per scored dimension.
        dims: Number of scored dimensions per pose (3 x observed modelled joints).
        per_joint: Mean NLL per joint name, for families that factorise over joints (else empty).
    """

    mean: float
    median: float
    bits_per_dim: float
    dims: int
    per_joint: dict[str, float] = field(default_factory=dict)


@dataclass
class SampleStats:
    """Quality of samples drawn from a prior, compared with the data on the joints both have.

    Attributes:
        apd_deg: Average pairwise distance between samples (diversity), degrees.
        nearest_deg: Mean distance of a sample to its nearest data pose (realism), degrees.
        data_nearest_deg: The same for held-out data poses against the rest of the data (the reference value).
        beyond_range: Fraction of sampled coordinates outside the data's per-joint-coordinate [min, max].
    """

    apd_deg: float
    nearest_deg: float
    data_nearest_deg: float
    beyond_range: float


@dataclass
class DenoiseStats:
    """Denoising: Gaussian noise of std ``sigma`` (radians) on every axis-angle coordinate, then the denoiser.

    Attributes:
        sigma: Noise std in radians.
        error_before_deg: Error of the noisy poses, degrees.
        error_after_deg: Error after denoising, degrees.
        reduction: ``1 - after / before``.
        estimator: What ran: ``"closed_form"``, ``"tweedie"`` or ``"map"`` (:meth:`PosePrior.denoise_estimator`),
            or ``"tweedie_sure"`` (``denoise(..., adaptive=True)``).
    """

    sigma: float
    error_before_deg: float
    error_after_deg: float
    reduction: float
    estimator: str = "map"


@dataclass
class CompletionStats:
    """Completion of a masked part with ``project(pose, mask)``.

    Attributes:
        part: Name of the hidden part.
        joints: Number of hidden joints.
        error_deg: Error of the completed joints, degrees.
        rest_error_deg: Error of filling them with zeros (the rest pose), degrees, for reference.
    """

    part: str
    joints: int
    error_deg: float
    rest_error_deg: float


@dataclass
class EvalReport:
    """Everything :func:`evaluate` measured for one prior on one data set.

    With :func:`evaluate_by`, ``group_by`` names the label key (e.g. ``"source"``) and ``group`` the label value of
    the poses measured (``"all"`` for the pooled report); both are None for an ungrouped report.
    """

    model: str
    data: str
    poses: int
    nll: NLLStats
    samples: SampleStats | None = None
    denoise: DenoiseStats | None = None
    completion: list[CompletionStats] = field(default_factory=list)
    reconstruction_deg: float | None = None
    group_by: str | None = None
    group: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------- metrics
def _geodesic_deg(a: Tensor, b: Tensor) -> Tensor:
    """Per-joint geodesic distance in degrees between axis-angle tensors (*, J, 3) -> (*, J)."""
    from posepriors.rotations import axis_angle_geodesic

    return torch.rad2deg(axis_angle_geodesic(a, b))


def _batched(fn: Any, x: Tensor, *args: Any, batch_size: int = 2048) -> Tensor:
    return torch.cat(
        [fn(x[i : i + batch_size], *(a[i : i + batch_size] for a in args)) for i in range(0, len(x), batch_size)]
    )


@torch.no_grad()
def nll_stats(prior: PosePrior, pose: Tensor, mask: Tensor | None = None, *, batch_size: int = 2048) -> NLLStats:
    """NLL statistics of poses in the prior's joint order.

    Args:
        prior: The prior.
        pose: Poses in the prior's joint order, shape (N, J, 3).
        mask: Optional observed mask, shape (J,) or (N, J).
        batch_size: Poses per forward pass.

    Returns:
        The statistics.
    """

    def nll(x: Tensor, m: Tensor | None = None) -> Tensor:
        return prior.nll(x, m, layout=PRIOR_LAYOUT)

    def per_joint_fn(x: Tensor, m: Tensor | None = None) -> Tensor:
        return prior.log_prob_per_joint(x, m, layout=PRIOR_LAYOUT)

    if mask is not None:
        mask = mask.expand(pose.shape[0], -1)
        nll_values = _batched(nll, pose, mask, batch_size=batch_size)
        dims = int(3 * mask[0].sum())
    else:
        nll_values = _batched(nll, pose, batch_size=batch_size)
        dims = prior.dim
    per_joint: dict[str, float] = {}
    if prior.per_joint_log_prob:  # factorising families: the observed joints' terms
        lp = _batched(per_joint_fn, pose, *([] if mask is None else [mask]), batch_size=batch_size).mean(0)
        scored = range(prior.num_joints) if mask is None else mask[0].nonzero().flatten().tolist()
        per_joint = {prior.joint_names[j]: -lp[j].item() for j in scored}
    return NLLStats(
        mean=nll_values.mean().item(),
        median=nll_values.median().item(),
        bits_per_dim=nll_values.mean().item() / (dims * math.log(2)),
        dims=dims,
        per_joint=per_joint,
    )


def _nearest_deg(queries: Tensor, reference: Tensor, chunk: int = 64) -> Tensor:
    """Mean per-joint geodesic distance (deg) from each query pose to its nearest reference pose, (Q,)."""
    rq = axis_angle_to_matrix(queries).flatten(-2)  # (Q, J, 9)
    rr = axis_angle_to_matrix(reference).flatten(-2)  # (R, J, 9)
    out = []
    for i in range(0, len(rq), chunk):
        trace = torch.einsum("qjk,rjk->qrj", rq[i : i + chunk], rr)
        angle = torch.acos(((trace - 1) / 2).clamp(-1.0, 1.0))
        out.append(torch.rad2deg(angle.mean(-1)).min(-1).values)
    return torch.cat(out)


@torch.no_grad()
def sample_stats(
    prior: PosePrior,
    data: Tensor,
    observed: Tensor,
    *,
    num_samples: int = 512,
    max_reference: int = 4000,
    generator: torch.Generator | None = None,
) -> SampleStats:
    """Diversity and realism of samples against data poses.

    Args:
        prior: The prior.
        data: Data poses in the prior's joint order, shape (N, J, 3).
        observed: Which of the prior's joints the data observes, shape (J,); only those are compared.
        num_samples: Number of samples to draw.
        max_reference: At most this many data poses serve as the nearest-neighbour reference.
        generator: Generator of the data's reference / held-out split, the sample pairs of the diversity and the
            samples, drawn in that order: the split and the pairs depend only on the generator and the sizes, not
            on how much the prior's sampler draws, so priors given equally seeded generators share them.

    Returns:
        The statistics.
    """
    perm = torch.randperm(len(data), generator=generator)
    i, j = torch.triu_indices(num_samples, num_samples, offset=1)
    pick = torch.randperm(len(i), generator=generator)[:20000]
    samples = prior.sample(num_samples, generator=generator)[:, observed].to(device=data.device, dtype=data.dtype)
    data = data[:, observed]
    reference = data[perm[:max_reference]]
    held_out = data[perm[max_reference : max_reference + num_samples]]
    if len(held_out) == 0:  # small data: compare with a leave-half-out split
        half = len(reference) // 2
        held_out, reference = reference[:half], reference[half:]
    apd = _geodesic_deg(samples[i[pick]], samples[j[pick]]).mean()
    low, high = data.amin(0), data.amax(0)
    beyond = ((samples < low) | (samples > high)).float().mean()
    return SampleStats(
        apd_deg=apd.item(),
        nearest_deg=_nearest_deg(samples, reference).mean().item(),
        data_nearest_deg=_nearest_deg(held_out, reference).mean().item(),
        beyond_range=beyond.item(),
    )


@torch.no_grad()
def denoise_stats(
    prior: PosePrior,
    clean: Tensor,
    mask: Tensor | None = None,
    *,
    sigma: float = 0.1,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    batch_size: int = 1024,
    denoiser: str = "posterior_mean",
    **project_kwargs: Any,
) -> DenoiseStats:
    """Add Gaussian noise to clean poses, denoise them, and compare both with the clean poses.

    Args:
        prior: The prior.
        clean: Clean poses in the prior's joint order, shape (N, J, 3).
        mask: Optional observed mask (J,); errors are measured on observed joints.
        sigma: Noise std (radians) per axis-angle coordinate.
        generator: Generator of the noise.
        noise: Standard normal noise of ``clean``'s shape to use (scaled by ``sigma``) instead of drawing it from
            ``generator``. :func:`evaluate` draws it over the data's whole pose layout and takes the prior's joints,
            so that every prior sees the same noise on the joints it shares with another.
        batch_size: Poses per call of the denoiser.
        denoiser: ``"posterior_mean"``: :meth:`PosePrior.denoise` (the MAP where the prior has no posterior mean
            at ``sigma``, without its warning; the stats say which ran); ``"adaptive"``: the same, with
            ``adaptive=True`` where the estimator is Tweedie's formula (each call is one set for SURE's blend
            weight: the poses in near-equal calls of at most ``batch_size``); ``"map"``: ``project(noise_std=sigma)``.
        **project_kwargs: Passed on to ``prior.project`` (``denoiser="map"`` only).

    Returns:
        The statistics.
    """
    if denoiser not in DENOISERS:
        raise ValueError(f"expected denoiser to be one of {DENOISERS}, got {denoiser!r}")
    if project_kwargs and denoiser != "map":
        raise TypeError(f"project options {sorted(project_kwargs)} need denoiser='map', got {denoiser!r}")
    estimator = prior.denoise_estimator(sigma, mask) if denoiser != "map" else "map"
    adaptive = denoiser == "adaptive" and estimator == "tweedie"
    if adaptive:
        estimator = "tweedie_sure"
    if noise is None:
        where = clean.device if generator is None else generator.device  # drawn where the generator lives
        noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype, device=where)
    elif generator is not None:
        raise ValueError("expected either noise or a generator to draw it from, got both")
    elif noise.shape != clean.shape:
        raise ValueError(f"expected noise of the clean poses' shape {tuple(clean.shape)}, got {tuple(noise.shape)}")
    noisy = clean + sigma * noise.to(device=clean.device, dtype=clean.dtype)
    # chunks of at most batch_size poses; for the SURE blend (one weight per call) of near-equal sizes, so that no
    # call gets a small remainder
    chunks = noisy.tensor_split(math.ceil(len(noisy) / batch_size)) if adaptive else noisy.split(batch_size)
    parts = []
    for chunk in chunks:
        m = None if mask is None else mask.expand(len(chunk), -1)
        chunk = chunk.to(prior.device)
        if estimator == "map":  # what denoise falls back to, without its warning (the stats say "map")
            parts.append(prior.project(chunk, m, noise_std=sigma, **project_kwargs).cpu())
        else:
            parts.append(prior.denoise(chunk, m, noise_std=sigma, adaptive=adaptive).cpu())
    projected = torch.cat(parts).to(clean.dtype)
    joints = slice(None) if mask is None else mask
    before = _geodesic_deg(noisy, clean)[:, joints].mean().item()
    after = _geodesic_deg(projected, clean)[:, joints].mean().item()
    return DenoiseStats(
        sigma=sigma, error_before_deg=before, error_after_deg=after, reduction=1 - after / before, estimator=estimator
    )


def completion_parts(prior: PosePrior, observed: Tensor) -> dict[str, Tensor]:
    """Parts to hide for the completion test: a whole arm (shoulder and below) and each hand, restricted to the
    joints the prior models and the data observes, as boolean masks over the prior's joints (True = hidden).

    Args:
        prior: The prior.
        observed: Which of the prior's joints the data observes, shape (J,).
    """
    joints = list(prior.joints)
    descendants = skeleton.modelled_descendants(range(skeleton.NUM_JOINTS))  # positions = SMPL-X indices
    parts = {
        "left_hand": set(skeleton.PARTS["left_hand"]),
        "right_hand": set(skeleton.PARTS["right_hand"]),
        "left_arm": set(descendants[skeleton.SMPLX_JOINT_NAMES.index("left_shoulder")]),
    }
    out = {}
    for name, part in parts.items():
        # hide the part's observed joints (a whole-body prior on body data: the arm down to the wrist); something
        # else must remain observed
        hidden = torch.tensor([j in part for j in joints]) & observed
        duplicate = any(torch.equal(hidden, seen) for seen in out.values())  # the arm of hand-only data: its hand
        if hidden.any() and bool((observed & ~hidden).any()) and not duplicate:
            out[name] = hidden
    return out


@torch.no_grad()
def completion_stats(
    prior: PosePrior, clean: Tensor, observed: Tensor, *, noise_std: float | None = 0.05, batch_size: int = 1024
) -> list[CompletionStats]:
    """Hide each part from :func:`completion_parts`, complete it with ``project(pose, mask, noise_std=...)``, measure
    the error.

    Args:
        prior: The prior.
        clean: Poses in the prior's joint order, shape (N, J, 3).
        observed: Which of the prior's joints the data observes, shape (J,).
        noise_std: Trust in the observed joints (radians) for the MAP completion, which uses what the observed
            joints say about the hidden ones; None for the fast ``project(pose, mask)``.
        batch_size: Poses per call of ``project``.
    """
    out = []
    for name, hidden in completion_parts(prior, observed).items():
        mask = observed & ~hidden
        parts = []
        kwargs = {} if noise_std is None else {"noise_std": noise_std}
        try:
            for i in range(0, len(clean), batch_size):
                chunk = clean[i : i + batch_size]
                m = mask.expand(len(chunk), -1).to(prior.device)
                parts.append(prior.project(chunk.to(prior.device), m, **kwargs).cpu())
        except ValueError as error:  # e.g. a flow without a completion mode cannot complete this mask
            warnings.warn(f"completion of {name} skipped for {prior.model_type}: {error}", stacklevel=2)
            continue
        completed = torch.cat(parts).to(clean.dtype)
        error = _geodesic_deg(completed, clean)[:, hidden].mean().item()
        rest = _geodesic_deg(torch.zeros_like(clean), clean)[:, hidden].mean().item()
        out.append(CompletionStats(part=name, joints=int(hidden.sum()), error_deg=error, rest_error_deg=rest))
    return out


TASKS = ("subset", "samples", "denoise", "plot_samples", "plot_noise")  # the order fixes each task's seed
"""The random tasks of ``posepriors-eval`` (with ``--plots``, the last two), each with a generator of its own
(:func:`task_generator`)."""


def task_generator(seed: int, task: str) -> torch.Generator:
    """The CPU generator of one random task of ``posepriors-eval`` (:data:`TASKS`), seeded from the run's seed.

    Each task draws from its own generator, so that what it draws depends neither on which other tasks run nor on
    how much a prior's sampler consumed before it. ``"subset"`` (the poses of ``max_poses``) is seeded with ``seed``
    itself; the others with a seed derived from ``seed`` and the task.

    Args:
        seed: The run's seed (>= 0).
        task: One of :data:`TASKS`.

    Returns:
        A fresh generator.
    """
    if task not in TASKS:
        raise ValueError(f"expected task to be one of {TASKS}, got {task!r}")
    if task == "subset":
        return torch.Generator().manual_seed(seed)
    state = np.random.SeedSequence([seed, TASKS.index(task)]).generate_state(2)  # two 32-bit words
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def paired_noise(count: int, index: Tensor, seed: int, task: str) -> Tensor:
    """Standard normal noise for ``count`` poses on the joints ``index`` (SMPL-X indices), drawn over all 55 joints
    from ``task``'s generator (:func:`task_generator`) and then cut to ``index``: every prior gets the same noise on
    the joints it shares with another."""
    return torch.randn((count, skeleton.NUM_JOINTS, 3), generator=task_generator(seed, task))[:, index]


def evaluate(
    prior: PosePrior,
    data: PoseData,
    *,
    model_name: str = "",
    data_name: str = "",
    sigma: float = 0.1,
    num_samples: int = 512,
    max_poses: int | None = None,
    seed: int = 0,
    samples: bool = True,
    denoise: bool = True,
    completion: bool = True,
    completion_noise: float | None = 0.05,
    denoiser: str = "posterior_mean",
) -> EvalReport:
    """Evaluate a prior on poses (the prior's joints that the data observes in every frame).

    Args:
        prior: The prior.
        data: Poses from :func:`posepriors.data.load_poses`.
        model_name: Label for the report.
        data_name: Label for the report.
        sigma: Noise std (radians) of the denoising test.
        num_samples: Samples for the sample-quality metrics.
        max_poses: Evaluate on at most this many poses (a seeded random subset).
        seed: Seed of every random choice. Each task that draws (the subset of ``max_poses``, the samples, the
            denoising noise) has a generator of its own seeded from it (:func:`task_generator`), so that what it
            draws depends neither on the prior nor on which other tasks run: every prior evaluated on the same data
            with the same seed gets the same subset, the same reference split of the sample metrics, and the same
            noisy poses on the joints they share (the noise is drawn over the data's whole pose layout).
        samples: Whether to run the sample-quality metrics.
        denoise: Whether to run the denoising test.
        completion: Whether to run the completion test.
        completion_noise: ``noise_std`` of the MAP completion (None: the fast ``project(pose, mask)``).
        denoiser: The denoising test's estimator (:func:`denoise_stats`).

    Returns:
        The report.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"expected seed to be an integer >= 0, got {seed!r}")
    seed = int(seed)  # torch's generators take Python integers only
    index = torch.tensor(prior.joints)
    pose = data.poses[:, index]
    observed_frames = data.observed[:, index]
    observed = observed_frames.all(0)
    if not bool(observed.any()):
        raise ValueError(
            f"the data observes none of the prior's joints {prior.joint_names[:5]}...: "
            f"evaluate a body prior on body data and a hand prior on hand data"
        )
    if max_poses is not None and len(pose) > max_poses:
        pick = torch.randperm(len(pose), generator=task_generator(seed, "subset"))[:max_poses]
        pose = pose[pick]
    pose = pose.to(prior.dtype)
    mask = None if bool(observed.all()) else observed
    device_pose = pose.to(prior.device)
    report = EvalReport(
        model=model_name or prior.model_type,
        data=data_name,
        poses=len(pose),
        nll=nll_stats(prior, device_pose, None if mask is None else mask.to(prior.device)),
    )
    if samples:
        generator = task_generator(seed, "samples")
        report.samples = sample_stats(prior, pose, observed, num_samples=num_samples, generator=generator)
    if denoise:
        noise = paired_noise(len(pose), index, seed, "denoise")
        report.denoise = denoise_stats(prior, pose, mask, sigma=sigma, noise=noise, denoiser=denoiser)
    if completion:
        report.completion = completion_stats(prior, pose, observed, noise_std=completion_noise)
    if prior.reconstructs:  # auto-encoders: encode -> decoder mean, geodesic degrees
        with torch.no_grad():
            report.reconstruction_deg = prior.reconstruction_error(device_pose).item()
    return report


POOLED = "all"
"""The ``group`` of the pooled report of :func:`evaluate_by`."""


def group_by(data: PoseData, key: str) -> dict[str, PoseData]:
    """Split poses by a per-pose label array of the data file (e.g. ``source`` of ``body_ood_val.npz``).

    Args:
        data: Poses from :func:`posepriors.data.load_poses`, whose ``labels`` hold ``key``.
        key: The label key.

    Returns:
        The poses of each label value, in sorted order of the values.
    """
    if key not in data.labels:
        raise ValueError(
            f"expected a per-pose label array {key!r} in the data (a 1-D key of the .npz with one entry per pose), "
            f"got label keys {sorted(data.labels)}{_rejected_label(data, key)}"
        )
    values = data.labels[key]
    return {str(v): data.subset(torch.from_numpy((values == v).nonzero()[0])) for v in sorted(set(values.tolist()))}


def _rejected_label(data: PoseData, key: str) -> str:
    """Why the data's key ``key`` is not a label array (``"; ..."``), or ``""`` when no file has such a key."""
    reason = data.rejected_labels.get(key)
    return f"; the key {key!r} exists but was not taken as a label array: {reason}" if reason else ""


def evaluate_by(prior: PosePrior, data: PoseData, key: str, **kwargs: Any) -> list[EvalReport]:
    """:func:`evaluate` on all poses and on each group of :func:`group_by` (``max_poses`` caps each one).

    Groups of fewer than :data:`MIN_SAMPLE_POSES` poses skip the sample-quality metrics.

    Args:
        prior: The prior.
        data: Poses with the label array ``key``.
        key: The label key to group by (e.g. ``"source"``).
        **kwargs: Passed on to :func:`evaluate`.

    Returns:
        The pooled report (``group="all"``), then one per label value, each with ``group_by=key``.
    """
    groups = group_by(data, key)
    reports = [dataclasses.replace(evaluate(prior, data, **kwargs), group_by=key, group=POOLED)]
    for value, part in groups.items():
        options = dict(kwargs)
        if len(part) < MIN_SAMPLE_POSES:
            options["samples"] = False
        reports.append(dataclasses.replace(evaluate(prior, part, **options), group_by=key, group=value))
    return reports


def _evaluate_grouped(key: str | None, prior: PosePrior, data: PoseData, **kwargs: Any) -> list[EvalReport]:
    """``[evaluate(...)]``, or :func:`evaluate_by` when ``key`` is given."""
    return [evaluate(prior, data, **kwargs)] if key is None else evaluate_by(prior, data, key, **kwargs)


# ---------------------------------------------------------------------------- output
def to_markdown(reports: Sequence[EvalReport]) -> str:
    """A Markdown table of reports (one row per model and data set)."""
    head = (
        "| model | data | poses | dims | NLL mean | NLL median | bits/dim | APD deg | nearest deg | beyond range "
        "| denoise before→after deg | completion deg (rest) | recon deg |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in reports:
        s, d = r.samples, r.denoise
        data = r.data if r.group is None else f"{r.data} [{r.group_by}={r.group}]"
        comp = ", ".join(f"{c.part} {c.error_deg:.1f} ({c.rest_error_deg:.1f})" for c in r.completion) or "–"
        lines.append(
            f"| {r.model} | {data} | {r.poses} | {r.nll.dims} | {r.nll.mean:.2f} | {r.nll.median:.2f} "
            f"| {r.nll.bits_per_dim:.3f} "
            + (
                f"| {s.apd_deg:.1f} | {s.nearest_deg:.1f} (data {s.data_nearest_deg:.1f}) | {s.beyond_range:.3f} "
                if s
                else "| – | – | – "
            )
            + (
                f"| {d.error_before_deg:.2f} → {d.error_after_deg:.2f} ({100 * d.reduction:.0f}%, {d.estimator}) "
                if d
                else "| – "
            )
            + f"| {comp} "
            + (f"| {r.reconstruction_deg:.1f} |" if r.reconstruction_deg is not None else "| – |")
        )
    return "\n".join(lines)


def _number(kind: type, low: float, *, inclusive: bool = True) -> Any:
    """An argparse ``type`` for finite numbers ``>= low`` (or ``> low``): bad values exit 2 with a message."""
    bound = f">= {low}" if inclusive else f"> {low}"

    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (not inclusive and value == low):
            raise argparse.ArgumentTypeError(f"expected a finite value {bound}, got {text!r}")
        return value

    convert.__name__ = f"{kind.__name__} {bound}"  # argparse names the type in its messages
    return convert


MIN_SAMPLE_POSES = 2
"""Fewest poses the sample-quality metrics need (a nearest-neighbour reference and a held-out pose)."""


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="posepriors-eval",
        description="Evaluate pose priors on a data file or folder: NLL, sample quality, denoising, completion.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("models", nargs="+", help="model names (see posepriors.list_models()) or folders")
    parser.add_argument("--data", action="append", required=True, type=Path, help="data file or folder (repeatable)")
    parser.add_argument("--gmm", type=Path, help="also evaluate SMPLify's GMM from this .npz (means, covars, weights)")
    parser.add_argument(
        "--sigma",
        type=_number(float, 0, inclusive=False),
        default=0.1,
        help="noise std (radians) of the denoising test",
    )
    parser.add_argument(
        "--num_samples", type=_number(int, 2), default=512, help="samples for the sample-quality metrics (>= 2)"
    )
    parser.add_argument(
        "--max_poses", type=_number(int, 1), default=None, help="evaluate on at most this many poses per set (>= 1)"
    )
    parser.add_argument(
        "--fps", type=_number(float, 0, inclusive=False), default=None, help="subsample AMASS sequences to this rate"
    )
    parser.add_argument("--seed", type=_number(int, 0), default=0, help="seed of every random choice (>= 0)")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda, mps")
    parser.add_argument("--json", type=Path, help="write the reports as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the Markdown table here")
    parser.add_argument("--plots", type=Path, help="write PNG plots into this folder (needs matplotlib)")
    parser.add_argument("--no_samples", action="store_true", help="skip the sample-quality metrics")
    parser.add_argument("--no_denoise", action="store_true", help="skip the denoising test")
    parser.add_argument(
        "--denoiser",
        choices=DENOISERS,
        default="posterior_mean",
        help="the denoising test's estimator: prior.denoise (posterior_mean: the posterior mean, or the MAP where "
        "the prior has none at --sigma; adaptive: the same with adaptive=True where it is Tweedie's formula, each "
        "call one set: near-equal calls of at most 1,024 poses) or the MAP project(noise_std=sigma)",
    )
    parser.add_argument("--no_completion", action="store_true", help="skip the completion test")
    parser.add_argument(
        "--completion_noise",
        type=_number(float, 0),
        default=0.05,
        help="noise_std (radians) of the MAP completion, project(pose, mask, noise_std=...); 0: fast project",
    )
    parser.add_argument(
        "--by",
        metavar="KEY",
        default=None,
        help="also report every metric per value of this per-pose label array of the data (e.g. source)",
    )
    args = parser.parse_args(argv)
    for path in [*args.data, *([args.gmm] if args.gmm is not None else [])]:
        if not path.exists():
            parser.error(f"no such file or folder: {path}")
    for flag, path in (("--json", args.json), ("--markdown", args.markdown), ("--plots", args.plots)):
        if path is not None:
            problem = _output_problem(path, folder=flag == "--plots")
            if problem:
                parser.error(f"{flag} {path}: {problem}")
    try:
        resolve_device(args.device)
    except ValueError as err:
        parser.error(f"--device: {err}")
    return args


def _output_problem(path: Path, *, folder: bool) -> str | None:
    """Why ``path`` cannot be written (a file for ``--json`` / ``--markdown``, a folder for ``--plots``), or None.

    Checked before the evaluation, so that its results are not lost to a bad path at the end.
    """
    if folder and path.exists() and not path.is_dir():
        return "expected a folder for the plots, got an existing file"
    if not folder and path.is_dir():
        return "expected a file name, got an existing folder"
    if not folder and path.exists() and not os.access(path, os.W_OK):
        return "the file exists and is not writable"
    base = path if folder else path.parent
    while not base.exists() and base != base.parent:  # the nearest existing folder, where the rest is created
        base = base.parent
    if not base.is_dir():
        return f"cannot create it: {base} is a file, not a folder"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"cannot create it: the folder {base} is not writable"
    return None


def _fail(message: str) -> int:
    """Print a ``posepriors-eval: error:`` line (as argparse does) and return the exit code 2."""
    print(f"posepriors-eval: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``posepriors-eval``; returns the process exit code.

    Exit codes: 0 when every report was written; 2 (a ``posepriors-eval: error:`` line, no traceback) for bad flags,
    an output path that cannot be written (checked before the evaluation), models or data that cannot be read, data
    the evaluation refuses, nothing to evaluate (no model shares joints with any data set), or a failed write.
    """
    from posepriors.hub import load

    args = _parse(argv)
    priors: dict[str, PosePrior] = {}
    try:
        for name in args.models:
            priors[name] = load(name, device=args.device)
        if args.gmm is not None:
            from posepriors.priors.gmm import GMMPrior

            name = str(args.gmm)
            priors["smplify_gmm"] = GMMPrior.from_smplify(args.gmm).to(args.device)
        datasets = {}
        for path in args.data:
            name = str(path)
            datasets[name] = load_poses(path, fps=args.fps)
    except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as err:
        return _fail(f"{name}: {err}")
    for name, data in datasets.items():
        if args.by is not None and args.by not in data.labels:
            return _fail(
                f"{name}: --by {args.by}: no per-pose label array {args.by!r} (has {sorted(data.labels)})"
                + _rejected_label(data, args.by)
            )
    for name, data in datasets.items():
        count = min(len(data), args.max_poses or len(data))
        if count < MIN_SAMPLE_POSES and not args.no_samples:
            print(
                f"{name}: {count} pose; the sample-quality metrics need >= {MIN_SAMPLE_POSES}: skipped", file=sys.stderr
            )
    reports: list[EvalReport] = []
    skipped: list[str] = []
    for data_name, data in datasets.items():
        for model_name, prior in priors.items():
            observed = data.observed[:, torch.tensor(prior.joints)].all(0)
            if not bool(observed.any()):
                print(f"skipping {model_name} on {data_name}: the data has none of its joints", file=sys.stderr)
                skipped.append(f"{model_name} on {Path(data_name).name}")
                continue
            try:  # a density for the joints the data observes (global_flow: not for hands without a body)
                prior.log_prob(data.poses[:1, torch.tensor(prior.joints)].to(prior.device, prior.dtype), observed)
            except ValueError as err:
                print(f"skipping {model_name} on {data_name}: {err}", file=sys.stderr)
                skipped.append(f"{model_name} on {Path(data_name).name}")
                continue
            try:
                reports.extend(
                    _evaluate_grouped(
                        args.by,
                        prior,
                        data,
                        model_name=model_name,
                        data_name=Path(data_name).name,
                        sigma=args.sigma,
                        num_samples=args.num_samples,
                        max_poses=args.max_poses,
                        seed=args.seed,
                        samples=not args.no_samples and min(len(data), args.max_poses or len(data)) >= MIN_SAMPLE_POSES,
                        denoise=not args.no_denoise,
                        completion=not args.no_completion,
                        completion_noise=args.completion_noise or None,
                        denoiser=args.denoiser,
                    )
                )
            except (ValueError, FloatingPointError) as err:  # bad data, e.g. poses the prior cannot score
                return _fail(f"evaluating {model_name} on {data_name} failed: {err}")
    if not reports:
        return _fail(
            f"nothing was evaluated: no model has a density for the data's joints (skipped {', '.join(skipped[:10])}); "
            "evaluate a body prior on body data and a hand prior on hand data"
        )
    table = to_markdown(reports)
    print(table)
    try:
        if args.markdown:
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text(table + "\n")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps([r.to_dict() for r in reports], indent=2) + "\n")
        if args.plots:
            from posepriors.plots import write_evaluation_plots

            pooled = [r for r in reports if r.group in (None, POOLED)]
            paths = write_evaluation_plots(priors, datasets, pooled, args.plots, seed=args.seed)
            print(f"wrote {len(paths)} plots to {args.plots}")
    except OSError as err:
        return _fail(f"could not write the results (the table above is complete): {err}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
