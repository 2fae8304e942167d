"""Maintainer tool: keypoint fitting with products of global_flow's smoothed body density and gaussian_full (the
probe that chose the shipped fitting energy, issue 10).

    python tools/energy_fit_probe.py [benchmarks/fitting.py options] --prior product_4_1 --prior product_2_1
    python tools/energy_fit_probe.py --selection hidden_1.5cm [benchmarks/fitting.py options] --prior product_3_1

Adds priors named ``product_K_B`` to ``benchmarks/fitting.py``: the fit's prior term is
``-log p_s(body) - B log N(body)``, with ``p_s`` the shipped ``global_flow``'s smoothed body density cut to its first
K flows (of 4) and mixed with the convolved broad component (what ``denoise`` differentiates), and ``N`` the body
marginal of the shipped ``gaussian_full``. This is ``1 + B`` times the fitting energy with
``energy_gaussian_weight = B / (1 + B)`` and ``energy_members = K`` (:mod:`posepriors.priors.energy`), so the
benchmark's weight grid lands on other multiples of it; the shipped energy is ``product_2_1`` (B = 1: weight 1/2).
Everything else (poses, noise, weight tuning on ``body_train``, metrics) is the benchmark's protocol. With
``--selection`` (comma-separated scenario names) only the selection data are fitted: each prior's weight is tuned in
each named scenario on the tuning poses of ``body_train``, and the fits of ``body_val`` at that weight are scored
(the same poses and noise as the benchmark's); ``body_ood_val`` is neither fitted nor scored. Results:
docs/models.md, "Fitting results".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
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


def selection(scenarios: list[str], argv: list[str]) -> int:
    """Tune each prior in each scenario on the tuning poses and score its fits of ``body_val`` (JSON lines)."""
    args = benchmark.parse(argv)
    torch.set_num_threads(args.threads)
    chosen = [s for s in benchmark.SCENARIOS if s.name in scenarios]
    unknown = sorted(set(scenarios) - {s.name for s in chosen})
    if unknown:
        raise SystemExit(f"unknown scenarios {unknown}; expected names from {[s.name for s in benchmark.SCENARIOS]}")
    g = torch.Generator().manual_seed(args.seed)
    val, _ = benchmark.load_body(args.data_dir / "body_val.npz")
    val = val[benchmark.pick(len(val), args.max_poses, g)].to(args.device)
    with np.load(args.data_dir / "body_ood_val.npz", allow_pickle=False) as npz:
        sources = np.asarray(npz["source"]).astype(str)
    for source in sorted(set(sources.tolist())):  # draw as the benchmark does; these poses are never loaded
        benchmark.pick(int((sources == source).sum()), args.per_source, g)
    train, _ = benchmark.load_body(args.data_dir / "body_train.npz")
    tune_pose = train[benchmark.pick(len(train), args.tune_poses, g)].to(args.device)
    labels = [p for p in args.baselines.split(",") if p] + list(args.prior)
    for label in labels:
        prior = load_prior(label, args.gmm, args.device)
        for k, scenario in enumerate(benchmark.SCENARIOS):
            if scenario not in chosen:
                continue
            weight, grid = 0.0, {}
            if prior is not None:
                weight, grid = benchmark.tune(prior, scenario, tune_pose, args, seed=args.seed * 1000 + 100 + k)
            noise = torch.Generator().manual_seed(args.seed * 1000 + k)  # the benchmark's noise of this scenario
            result, clean, _ = benchmark.fit(val, prior, weight, scenario, args, noise)
            errors = benchmark.per_pose_errors(scenario, result, clean, val)
            row = {"prior": label, "scenario": scenario.name, "multiplier": weight / scenario.map_weight()}
            row |= {"tuning_angle_deg": grid, **{f"body_val_{key}": v.mean().item() for key, v in errors.items()}}
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    benchmark.load_prior = load_prior
    extra = tuple(a for a in sys.argv[1:] if _NAME.fullmatch(a))
    benchmark.DEFAULT_PRIORS = benchmark.DEFAULT_PRIORS + extra  # accepted as --prior names
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--selection", type=lambda text: text.split(","))
    known, rest = parser.parse_known_args()
    sys.exit(benchmark.main(rest) if known.selection is None else selection(known.selection, rest))
