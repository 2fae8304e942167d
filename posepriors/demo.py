"""``posepriors-demo``: score a natural and a broken pose with every bundled prior, sample, and project.

Runs offline on the weights that ship inside the package.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence

import torch

from posepriors import skeleton
from posepriors.hub import list_models, load
from posepriors.rotations import axis_angle_geodesic

__all__ = ["broken_pose", "main", "natural_pose"]


def _joint(name: str) -> int:
    return skeleton.SMPLX_JOINT_NAMES.index(name)


def natural_pose() -> torch.Tensor:
    """A relaxed standing pose in the SMPL-X layout: arms down, elbows and knees slightly bent, hands curled.

    Returns:
        Axis-angle rotations, shape (55, 3).
    """
    pose = torch.zeros(55, 3)
    pose[_joint("left_shoulder")] = torch.tensor([0.0, 0.0, -1.1])
    pose[_joint("right_shoulder")] = torch.tensor([0.0, 0.0, 1.1])
    pose[_joint("left_elbow")] = torch.tensor([0.0, -0.35, 0.0])
    pose[_joint("right_elbow")] = torch.tensor([0.0, 0.35, 0.0])
    for side in ("left", "right"):
        pose[_joint(f"{side}_knee")] = torch.tensor([0.15, 0.0, 0.0])
        pose[_joint(f"{side}_hip")] = torch.tensor([-0.1, 0.0, 0.0])
        sign = -1.0 if side == "left" else 1.0
        for finger in ("index", "middle", "ring", "pinky"):
            for k in (1, 2, 3):
                pose[_joint(f"{side}_{finger}{k}")] = torch.tensor([0.0, 0.0, sign * 0.25])
    return pose


def broken_pose() -> torch.Tensor:
    """The natural pose with anatomically impossible joints: a knee bent backwards, an elbow bent the wrong way,
    the head turned 150 degrees and fingers bent back.

    Returns:
        Axis-angle rotations, shape (55, 3).
    """
    pose = natural_pose()
    pose[_joint("left_knee")] = torch.tensor([-1.4, 0.0, 0.0])
    pose[_joint("right_elbow")] = torch.tensor([0.0, -1.6, 0.0])
    pose[_joint("head")] = torch.tensor([0.0, 2.6, 0.0])
    for k in (1, 2, 3):
        pose[_joint(f"right_index{k}")] = torch.tensor([0.0, 0.0, -1.2])
    return pose


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="posepriors-demo",
        description="Score a natural and a broken pose with the bundled priors, sample from them and project.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", action="append", help="model name or folder (repeatable); default: all bundled")
    parser.add_argument("--device", default="cpu", help="device: auto, cpu, cuda, mps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``posepriors-demo``; returns the process exit code."""
    args = _parse(argv)
    names = args.model or list(list_models())
    natural, broken = natural_pose(), broken_pose()
    print(f"posepriors demo: {len(names)} model(s); NLL in nats (lower = more plausible)\n")
    header = f"{'model':<16}{'joints':>7}{'load ms':>9}{'NLL natural':>13}{'NLL broken':>12}"
    header += f"{'NLL samples':>13}{'NLL projected':>15}{'moved deg':>11}"
    print(header)
    print("-" * len(header))
    worst: dict[str, list[str]] = {}
    for name in names:
        start = time.perf_counter()
        prior = load(name, device=args.device)
        load_ms = 1000 * (time.perf_counter() - start)
        device = prior.device
        nat = prior.nll(natural.to(device)).item()
        bad = prior.nll(broken.to(device)).item()
        generator = torch.Generator().manual_seed(args.seed)
        samples = prior.sample(8, generator=generator)
        nll_samples = prior.nll(samples).median().item()
        projected = prior.project(broken.to(device))
        proj = prior.nll(projected).item()
        original = broken.to(device)[prior.joint_index]
        moved = axis_angle_geodesic(original, projected)
        worst[name] = [prior.joint_names[i] for i in moved.argsort(descending=True)[:3].tolist()]
        print(
            f"{name:<16}{prior.num_joints:>7}{load_ms:>9.0f}{nat:>13.1f}{bad:>12.1f}{nll_samples:>13.1f}"
            f"{proj:>15.1f}{math.degrees(moved.max().item()):>11.1f}"
        )
    print("\nNLL samples: median over 8 samples; moved deg: the largest change project() made to one joint.")
    for name, joints in worst.items():
        print(f"  {name}: project() moved {', '.join(joints)} the most")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
