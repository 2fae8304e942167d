"""Maintainer tool: keypoint fitting with ``global_flow``'s smoothed body density as the prior (issue 10 probe).

    python tools/smoothed_fit_probe.py [benchmarks/fitting.py options] --prior smoothed_1b --prior smoothed_4b

Adds priors named ``smoothed_K`` and ``smoothed_Kb`` to ``benchmarks/fitting.py``: the NLL is ``-log p_s`` of the
shipped ``global_flow``'s smoothed body density (:class:`posepriors.priors.smoothed.SmoothedBody`, the density of
body poses with noise of std 0.1 rad, which ``denoise`` differentiates), with its first K flows (of 4); the ``b``
suffix mixes it with the broad component convolved with the same noise, as ``denoise`` does. Everything else (poses,
noise, weight tuning on ``body_train``, metrics) is the benchmark's protocol. Results: docs/models.md, "Why the
flows lose at fitting and denoising".
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fitting as benchmark  # noqa: E402  (benchmarks/fitting.py)

import posepriors  # noqa: E402
from posepriors.priors import PosePrior  # noqa: E402

_NAME = re.compile(r"smoothed_(\d+)(b?)")


def smoothed_nll(prior: PosePrior, members: int, broad: bool) -> Callable[..., torch.Tensor]:
    """``pose -> -log p_s(body)`` of the prior's smoothed body density cut to its first ``members`` flows, mixed
    with the convolved broad component when ``broad`` (the density ``denoise`` differentiates); ``pose`` is what
    ``fit_keypoints`` passes, ``{"body_pose": (N, 21, 3)}``."""
    if prior.smoothed is None or not 1 <= members <= len(prior.smoothed.flows):
        raise ValueError(f"expected a prior with a smoothed body density of at least {members} flows")
    prior.smoothed.flows = prior.smoothed.flows[:members]  # an equal mixture of the first flows
    log_prob = prior._smoothed_log_prob() if broad else prior.smoothed.log_prob

    def nll(pose: dict[str, torch.Tensor], mask: None = None, **kwargs: object) -> torch.Tensor:
        return -log_prob(pose["body_pose"].reshape(-1, 63))

    return nll


def load_prior(name: str, gmm: Path, device: str, _builtin=benchmark.load_prior) -> PosePrior | None:  # noqa: ANN001
    match = _NAME.fullmatch(name)
    if match is None:
        return _builtin(name, gmm, device)
    prior = posepriors.load("global_flow", device=device)
    # fit_keypoints minimises prior.energy({"body_pose": ...}) and reports prior.nll: both become -log p_s
    prior.nll = prior.energy = smoothed_nll(prior, int(match[1]), bool(match[2]))
    return prior


if __name__ == "__main__":
    benchmark.load_prior = load_prior
    extra = tuple(a for a in sys.argv[1:] if _NAME.fullmatch(a))
    benchmark.DEFAULT_PRIORS = benchmark.DEFAULT_PRIORS + extra  # accepted as --prior names
    sys.exit(benchmark.main())
