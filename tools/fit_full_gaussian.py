"""Maintainer tool: fit the full-covariance Gaussian baselines (``gmm`` family) on ../shared/data and measure them.

    python tools/fit_full_gaussian.py [--data ../shared/data] [--out /tmp/gmm_out] [--json results.json]

Fits, with ``posepriors-train`` (closed form, no SGD; the command is recorded in each folder's ``metrics.json``):

- ``gaussian_full``: one full-covariance Gaussian over body + left hand + right hand, from ``body_train.npz``
  (body-only frames) and ``hands_train.npz`` (both hands, no body); body and hand frames are unpaired, so the
  body-hand correlations are 0 and the two hands' joint covariance comes from ARCTIC's bimanual frames;
- ``gmm_body8``: an 8-component mixture on the 21 body joints from ``body_train.npz`` (EM, seed 0).

Then reports NLL (nats per pose, exact marginals) on ``body_val`` (63-D), ``hands_val`` (right hand 45-D, left hand
45-D, both hands 90-D) and ``body_ood_val`` per source; whole-hand completion on ``hands_val`` (one hand hidden,
completed from the other by the conditional mean; MAP ``project(noise_std=0.05)`` as ``posepriors-eval`` runs it;
the data mean as the reference), and denoising at sigma 0.1. Nothing is trained on any ``*_val`` file: they serve
only as validation sets (logged NLL) and for these measurements.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import posepriors
from posepriors import evaluate, skeleton
from posepriors import train as train_module
from posepriors.priors import GMMPrior
from posepriors.rotations import axis_angle_geodesic

WHOLE = "body+left_hand+right_hand"


def fit(name: str, args: list[str], out: Path) -> GMMPrior:
    """Run ``posepriors-train gmm ARGS --out OUT/NAME`` and load the result."""
    tic = time.perf_counter()
    code = train_module.main(["gmm", *args, "--out", str(out / name), "--logger", "none"])
    if code != 0:
        raise SystemExit(f"posepriors-train failed for {name} (exit code {code})")
    print(f"{name}: fitted in {time.perf_counter() - tic:.1f} s -> {out / name}", flush=True)
    prior = posepriors.load(out / name)
    if not isinstance(prior, GMMPrior):
        raise SystemExit(f"expected a gmm prior in {out / name}, got {prior.model_type}")
    return prior


def in_prior_order(prior: GMMPrior, parts: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Poses (N, J, 3) in the prior's joint order and the observed mask (J,) from SMPL-X part arrays."""
    n = len(next(iter(parts.values())))
    full = torch.zeros(n, skeleton.NUM_JOINTS, 3)
    seen = torch.zeros(skeleton.NUM_JOINTS, dtype=torch.bool)
    for part, values in parts.items():
        index = list(skeleton.PARTS[part])
        full[:, index] = torch.from_numpy(values).float().reshape(n, len(index), 3)
        seen[index] = True
    joints = list(prior.joints)
    return full[:, joints], seen[joints]


def nll(prior: GMMPrior, parts: dict[str, np.ndarray]) -> dict[str, float]:
    pose, mask = in_prior_order(prior, parts)
    stats = evaluate.nll_stats(prior, pose, None if bool(mask.all()) else mask)
    return {"nll_mean": stats.mean, "nll_median": stats.median, "dims": stats.dims}


def hand_completion(prior: GMMPrior, hands: dict[str, np.ndarray], data_mean: dict[str, np.ndarray]) -> dict[str, Any]:
    """Hide each hand of the hands_val frames, complete it from the other; geodesic joint-angle errors (deg)."""
    pose, observed = in_prior_order(prior, hands)
    out: dict[str, Any] = {}
    for hidden_part, seen_part in (("left_hand", "right_hand"), ("right_hand", "left_hand")):
        hidden = torch.tensor([j in skeleton.PARTS[hidden_part] for j in prior.joints])
        mask = observed & ~hidden
        truth = pose[:, hidden]
        conditional = prior.complete(pose, mask)[:, hidden]
        map_005 = prior.project(pose, mask.expand(len(pose), -1), noise_std=0.05)[:, hidden]
        mean = torch.from_numpy(data_mean[hidden_part]).float().reshape(1, 15, 3).expand_as(truth)

        def err(estimate: torch.Tensor, truth: torch.Tensor = truth) -> float:
            return torch.rad2deg(axis_angle_geodesic(estimate, truth)).mean().item()

        out[f"{hidden_part}_from_{seen_part}"] = {
            "conditional_mean_deg": err(conditional),
            "map_noise_0.05_deg": err(map_005),
            "data_mean_deg": err(mean),
            "rest_pose_deg": err(torch.zeros_like(truth)),
        }
    return out


def denoise(prior: GMMPrior, parts: dict[str, np.ndarray], sigma: float = 0.1) -> dict[str, float]:
    pose, mask = in_prior_order(prior, parts)
    stats = evaluate.denoise_stats(
        prior, pose, None if bool(mask.all()) else mask, sigma=sigma, generator=torch.Generator().manual_seed(0)
    )
    return {"sigma": sigma, "before_deg": stats.error_before_deg, "after_deg": stats.error_after_deg}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/gmm_out"))
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    parser.add_argument("--no_body_gmm", action="store_true", help="skip the 8-component body mixture")
    args = parser.parse_args(argv)
    d = args.data
    body = ["--data_dir", str(d / "body_train.npz"), "--val_dir", str(d / "body_val.npz")]
    hands = ["--data_dir", str(d / "hands_train.npz"), "--val_dir", str(d / "hands_val.npz")]
    priors = {
        "gaussian_full": fit("gaussian_full", ["--joints", WHOLE, "--num_components", "1", *body, *hands], args.out)
    }
    if not args.no_body_gmm:
        priors["gmm_body8"] = fit("gmm_body8", ["--joints", "body", "--num_components", "8", *body], args.out)

    body_val = np.load(d / "body_val.npz")
    hands_val = np.load(d / "hands_val.npz")
    ood = np.load(d / "body_ood_val.npz")
    hands_train = np.load(d / "hands_train.npz")
    data_mean = {p: hands_train[f"{p}_pose"].reshape(-1, 45).mean(0) for p in ("left_hand", "right_hand")}
    both = {"left_hand": hands_val["left_hand_pose"], "right_hand": hands_val["right_hand_pose"]}
    results: dict[str, Any] = {}
    for name, prior in priors.items():
        r: dict[str, Any] = {"body_val (63-D)": nll(prior, {"body": body_val["body_pose"]})}
        for source in sorted(set(ood["source"].tolist())):
            pick = ood["source"] == source
            r[f"body_ood_val/{source} ({int(pick.sum())})"] = nll(prior, {"body": ood["body_pose"][pick]})
        r["body_ood_val/all"] = nll(prior, {"body": ood["body_pose"]})
        r["denoise body_val"] = denoise(prior, {"body": body_val["body_pose"]})
        if set(skeleton.PARTS["right_hand"]) <= set(prior.joints):
            r["hands_val right hand (45-D)"] = nll(prior, {"right_hand": both["right_hand"]})
            r["hands_val left hand (45-D)"] = nll(prior, {"left_hand": both["left_hand"]})
            r["hands_val both hands (90-D)"] = nll(prior, both)
            r["completion hands_val"] = hand_completion(prior, both, data_mean)
            r["denoise hands_val both hands"] = denoise(prior, both)
        results[name] = r
    print(json.dumps(results, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
