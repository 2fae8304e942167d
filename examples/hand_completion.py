"""Complete hands: fingers hidden by an object, or a whole missing hand.

python examples/hand_completion.py [--model hand_vae] [--data ../shared/data/hands_val.npz]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import posepriors
from posepriors.rotations import axis_angle_geodesic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="models to compare (default: hand_vae and gaussian)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/hands_val.npz")
    parser.add_argument("--poses", type=int, default=64)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    if args.data.is_file():
        hands = np.load(args.data)
        truth = torch.from_numpy(
            hands["right_hand_pose"][:: max(1, len(hands["right_hand_pose"]) // args.poses)][: args.poses]
        )
        source = args.data.name
    else:  # no research data: complete hands drawn from the VAE itself
        vae = posepriors.load("hand_vae")
        truth = vae.to_smplx(vae.sample(args.poses, generator=g))[:, 40:]
        source = "hand_vae samples"
    print(f"{len(truth)} right hands from {source}")

    hidden = torch.zeros(15, dtype=torch.bool)
    hidden[[1, 2, 4, 5, 10, 11]] = True  # the distal index, middle and ring segments: covered by an object
    for name in args.model or ["hand_vae", "gaussian"]:
        prior = posepriors.load(name)
        mask = torch.zeros(55, dtype=torch.bool)
        mask[40:] = ~hidden  # only the visible right-hand joints are observed
        completed = prior.to_smplx(prior.project({"right_hand_pose": truth}, mask))[:, 40:]
        error = torch.rad2deg(axis_angle_geodesic(completed, truth))[:, hidden].mean()
        flat = torch.rad2deg(axis_angle_geodesic(torch.zeros_like(truth), truth))[:, hidden].mean()
        print(f"{name:>12}: hidden finger segments completed with {error:.1f} deg error (flat hand: {flat:.1f} deg)")


if __name__ == "__main__":
    main()
