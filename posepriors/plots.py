"""Plots for ``posepriors-eval --plots`` (needs the ``plot`` extra: ``pip install posepriors[plot]``).

Stick figures use :mod:`posepriors.kinematics`, an approximate skeleton of posepriors' own (not SMPL-X's).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from posepriors.kinematics import BONES, forward_kinematics

__all__ = ["plot_nll_histograms", "plot_per_joint_nll", "plot_stick_figures", "write_evaluation_plots"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'posepriors[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_nll_histograms(nlls: Mapping[str, Tensor], path: str | Path, title: str = "") -> Path:
    """Overlaid histograms of per-pose NLLs, one per model.

    Args:
        nlls: ``model name -> NLL per pose`` (N,).
        path: PNG file to write.
        title: Figure title.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    values = torch.cat([v.flatten() for v in nlls.values()])
    low, high = torch.quantile(values, 0.005).item(), torch.quantile(values, 0.995).item()
    for name, nll in nlls.items():
        ax.hist(nll.clamp(low, high).numpy(), bins=60, alpha=0.5, label=f"{name} (mean {nll.mean():.1f})")
    ax.set_xlabel("NLL per pose (nats)")
    ax.set_ylabel("poses")
    ax.set_title(title or "NLL per pose")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_per_joint_nll(per_joint: Mapping[str, float], path: str | Path, title: str = "") -> Path:
    """Bar chart of the mean NLL of each joint.

    Args:
        per_joint: ``joint name -> mean NLL``.
        path: PNG file to write.
        title: Figure title.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(per_joint)), 4))
    ax.bar(range(len(per_joint)), list(per_joint.values()))
    ax.set_xticks(range(len(per_joint)), list(per_joint), rotation=90, fontsize=7)
    ax.set_ylabel("mean NLL (nats)")
    ax.set_title(title or "NLL per joint")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_stick_figures(
    poses: Tensor, path: str | Path, title: str = "", labels: Sequence[str] | None = None, columns: int = 4
) -> Path:
    """Front-view stick figures of SMPL-X poses on the approximate skeleton.

    Args:
        poses: SMPL-X poses, shape (N, 55, 3).
        path: PNG file to write.
        title: Figure title.
        labels: Optional caption per pose.
        columns: Figures per row.
    """
    plt = _pyplot()
    joints = forward_kinematics(poses.detach().cpu().float())
    rows = math.ceil(len(poses) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.6 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(poses):
            continue
        p = joints[i]
        for parent, child in BONES:
            ax.plot(
                [p[parent, 0], p[child, 0]],
                [p[parent, 1], p[child, 1]],
                "-",
                lw=1.2,
                color="C0" if child < 25 else "C1",
            )
        ax.set_aspect("equal")
        ax.set_xlim(-1.0, 1.0)
        ax.set_ylim(-1.1, 0.9)
        if labels is not None:
            ax.set_title(labels[i], fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


@torch.no_grad()
def write_evaluation_plots(
    priors: Mapping[str, Any],
    datasets: Mapping[str, Any],
    reports: Sequence[Any],
    folder: str | Path,
    seed: int = 0,
) -> list[Path]:
    """The plots of ``posepriors-eval --plots``: NLL histograms per data set, per-joint NLL bars, stick figures
    of samples and of denoised poses.

    Args:
        priors: ``name -> PosePrior``.
        datasets: ``name -> PoseData``.
        reports: The :class:`~posepriors.evaluate.EvalReport` list of the same run.
        folder: Output folder (created).
        seed: Seed of the samples and the noise (:func:`posepriors.evaluate.task_generator`).

    Returns:
        The written PNG files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def stem(name: str) -> str:  # model names may be folders
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(name).name) or "model"

    written: list[Path] = []
    for d_index, (data_name, data) in enumerate(datasets.items()):
        nlls = {}
        for name, prior in priors.items():
            index = torch.tensor(prior.joints)
            observed = data.observed[:, index].all(0)
            if not bool(observed.any()):
                continue
            pose = data.poses[:2000, index].to(device=prior.device, dtype=prior.dtype)
            mask = None if bool(observed.all()) else observed.to(prior.device)
            nlls[name] = prior.nll(pose, None if mask is None else mask.expand(len(pose), -1)).cpu()
        if nlls:
            written.append(plot_nll_histograms(nlls, folder / f"nll_hist_{d_index}.png", Path(data_name).name))
    for report in reports:
        if report.nll.per_joint:
            written.append(
                plot_per_joint_nll(
                    report.nll.per_joint,
                    folder / f"per_joint_nll_{stem(report.model)}.png",
                    f"{report.model}: NLL per joint",
                )
            )
    from posepriors.evaluate import paired_noise, task_generator

    for name, prior in priors.items():
        generator = task_generator(seed, "plot_samples")
        samples = prior.to_smplx(prior.sample(8, generator=generator)).cpu()
        written.append(plot_stick_figures(samples, folder / f"samples_{stem(name)}.png", f"{name}: samples"))
        data = next(iter(datasets.values()))
        index = torch.tensor(prior.joints)
        observed = data.observed[:, index].all(0)
        if not bool(observed.any()):
            continue
        clean = data.poses[:4, index].to(prior.dtype)
        noise = paired_noise(len(clean), index, seed, "plot_noise")
        noisy = clean + 0.2 * noise.to(clean.dtype) * observed[:, None]
        mask = None if bool(observed.all()) else observed.expand(len(clean), -1).to(prior.device)
        denoised = prior.project(noisy.to(prior.device), mask, noise_std=0.2).cpu()  # as in the denoising test
        figures = torch.cat([prior.to_smplx(t) for t in (clean, noisy, denoised)])
        labels = ["clean"] * 4 + ["noisy"] * 4 + ["projected"] * 4
        written.append(plot_stick_figures(figures, folder / f"denoise_{stem(name)}.png", f"{name}: denoising", labels))
    return written
