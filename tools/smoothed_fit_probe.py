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

import math
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
    """``pose -> -log p_s(body)`` of the prior's smoothed body density (its first ``members`` flows), mixed with the
    convolved broad component when ``broad``; ``pose`` is what ``fit_keypoints`` passes, ``{"body_pose": (N, 21, 3)}``.
    """
    smoothed = prior.smoothed
    if smoothed is None or not 1 <= members <= len(smoothed.flows):
        raise ValueError(f"expected a prior with a smoothed body density of at least {members} flows")
    body = prior.body_index
    dims = (body[:, None] * 3 + torch.arange(3, device=body.device)).flatten()
    w = prior.config.broad_weight

    def nll(pose: dict[str, torch.Tensor], mask: None = None, **kwargs: object) -> torch.Tensor:
        y = pose["body_pose"].reshape(-1, 63)
        u, logdet = smoothed._scale(y)
        terms = torch.cat([flow.log_prob(u) for flow in smoothed.flows[:members]], dim=-1)
        log_p = torch.logsumexp(terms, dim=-1) - math.log(members) + logdet
        if broad and prior.broad is not None:
            b = prior.broad.log_prob(y, dims=dims, noise_std=smoothed.noise_std).to(y.dtype)
            log_p = torch.logaddexp(log_p + math.log1p(-w), b + math.log(w))
        return -log_p

    return nll


def load_prior(name: str, gmm: Path, device: str, _builtin=benchmark.load_prior) -> PosePrior | None:  # noqa: ANN001
    match = _NAME.fullmatch(name)
    if match is None:
        return _builtin(name, gmm, device)
    prior = posepriors.load("global_flow", device=device)
    prior.nll = smoothed_nll(prior, int(match[1]), bool(match[2]))  # fit_keypoints calls prior.nll({"body_pose": ...})
    return prior


if __name__ == "__main__":
    benchmark.load_prior = load_prior
    extra = tuple(a for a in sys.argv[1:] if _NAME.fullmatch(a))
    benchmark.DEFAULT_PRIORS = benchmark.DEFAULT_PRIORS + extra  # accepted as --prior names
    sys.exit(benchmark.main())
