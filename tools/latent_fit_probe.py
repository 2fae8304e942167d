"""Maintainer tool: a quick fitting probe of one prior (docs/models.md, "Why the flows lose at fitting").

    python tools/latent_fit_probe.py NAME_OR_DIR [OPTIMIZER (lbfgs, adam)] [STEPS (200)]

80 seeded ``body_val`` poses and 14 seeded poses per source of ``body_ood_val``; every keypoint seen, 1.5 cm noise;
L-BFGS (or Adam), weight 1 x MAP (no tuning), in latent space for priors with one (``global_flow``), else in pose space.
Prints the prior's ``body_val`` NLL and the mean joint-angle errors (deg).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import posepriors
from posepriors.fitting import body_keypoints, fit_keypoints
from posepriors.rotations import axis_angle_geodesic


def main(name: str, optimizer: str = "lbfgs", steps: int = 200) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    va = np.load("../shared/data/body_val.npz")
    idx = torch.randperm(len(va["body_pose"]), generator=g)[:80].numpy()
    val = torch.from_numpy(va["body_pose"][idx]).float()
    ood = np.load("../shared/data/body_ood_val.npz")
    picks = []
    for s in sorted(set(ood["source"].tolist())):
        ii = np.nonzero(ood["source"] == s)[0]
        picks += list(ii[torch.randperm(len(ii), generator=g)[:14].numpy()])
    oo = torch.from_numpy(ood["body_pose"][np.array(picks)]).float()
    p = posepriors.load(name)
    out = []
    for truth in (val, oo):
        kp = body_keypoints(truth)
        kp = kp + 0.015 * torch.randn(kp.shape, generator=g)
        space = "latent" if hasattr(p, "body_latent") else "pose"
        r = fit_keypoints(kp, prior=p, weight=2 * 0.015**2 / 22, optimizer=optimizer, steps=steps, space=space)
        out.append(torch.rad2deg(axis_angle_geodesic(r.pose, truth)).mean().item())
    with torch.no_grad():
        nll = p.nll({"body_pose": torch.from_numpy(va["body_pose"]).float()}).mean().item()
    print(
        f"{name} ({optimizer}, {steps} steps): body_val NLL {nll:.1f}; fit deg val {out[0]:.2f} ood {out[1]:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("name", help="a bundled model name or a model folder")
    parser.add_argument("optimizer", nargs="?", default="lbfgs", choices=("lbfgs", "adam"))
    parser.add_argument("steps", nargs="?", type=int, default=200, help="optimiser steps (L-BFGS iterations)")
    cli = parser.parse_args()
    main(cli.name, cli.optimizer, cli.steps)
