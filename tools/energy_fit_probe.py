"""Maintainer tool: keypoint fitting with products of global_flow's smoothed body density and gaussian_full (the
probe that chose the shipped fitting energy, issue 10).

    python tools/energy_fit_probe.py [benchmarks/fitting.py options] --prior product_4_1 --prior product_2_1

Adds priors named ``product_K_B`` to ``benchmarks/fitting.py``: the fit's prior term is
``-log p_s(body) - B log N(body)``, with ``p_s`` the shipped ``global_flow``'s smoothed body density cut to its first
K flows (of 4) and mixed with the convolved broad component (what ``denoise`` differentiates), and ``N`` the body
marginal of the shipped ``gaussian_full``. This is ``1 + B`` times the fitting energy with
``energy_gaussian_weight = B / (1 + B)`` and ``energy_members = K`` (:mod:`posepriors.priors.energy`), so the
benchmark's weight grid lands on other multiples of it; the shipped energy is ``product_2_1`` (B = 1: weight 1/2).
Everything else (poses, noise, weight tuning on ``body_train``, metrics) is the benchmark's protocol. Results:
docs/models.md, "Fitting results".
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fitting as benchmark  # noqa: E402  (benchmarks/fitting.py)

import posepriors  # noqa: E402
from posepriors.priors import PosePrior  # noqa: E402

_NAME = re.compile(r"product_(\d+)_([0-9.]+)")


def load_prior(name: str, gmm: Path, device: str, _builtin=benchmark.load_prior) -> PosePrior | None:  # noqa: ANN001
    match = _NAME.fullmatch(name)
    if match is None:
        return _builtin(name, gmm, device)
    members, beta = int(match[1]), float(match[2])
    prior = posepriors.load("global_flow", device=device)
    full = posepriors.load("gaussian_full", device=device)
    smoothed = prior._smoothed_log_prob(members)

    def product(pose: dict[str, torch.Tensor], mask: None = None, **kwargs: object) -> torch.Tensor:
        return -smoothed(pose["body_pose"].reshape(-1, 63)) + beta * full.nll(pose)

    prior.energy = product  # what fit_keypoints minimises ({"body_pose": ...})
    return prior


if __name__ == "__main__":
    benchmark.load_prior = load_prior
    extra = tuple(a for a in sys.argv[1:] if _NAME.fullmatch(a))
    benchmark.DEFAULT_PRIORS = benchmark.DEFAULT_PRIORS + extra  # accepted as --prior names
    sys.exit(benchmark.main())
