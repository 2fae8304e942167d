"""The prior as a fitting regulariser: recover a pose from noisy, partial observations.

Two tasks, each solved with and without ``w * prior.energy(pose)`` (the prior's fitting energy: its NLL for every
prior but the shipped ``global_flow``, whose energy fits better) in the loss:

1. noisy rotations of a subset of the joints (the others unobserved);
2. noisy 3D keypoints of the approximate posepriors skeleton (``posepriors.kinematics``; not the SMPL-X template).

    python examples/fitting_regularizer.py [--model global_flow] [--data ../shared/data/body_val.npz]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import posepriors
from posepriors.kinematics import forward_kinematics
from posepriors.rotations import axis_angle_geodesic


def targets(data: Path | None, n: int, generator: torch.Generator) -> torch.Tensor:
    """Ground-truth SMPL-X poses (n, 55, 3): real held-out poses when available, else prior samples."""
    if data is not None and data.is_file():
        body = torch.from_numpy(np.load(data)["body_pose"][:n])
        pose = torch.zeros(len(body), 55, 3)
        pose[:, 1:22] = body
        return pose
    gaussian = posepriors.load("gaussian")
    return gaussian.to_smplx(gaussian.sample(n, generator=generator, temperature=0.7))


def fit(loss_fn, init: torch.Tensor, steps: int = 200) -> torch.Tensor:
    pose = init.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([pose], lr=0.03)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(pose).backward()
        optimizer.step()
    return pose.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="global_flow")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/body_val.npz")
    parser.add_argument("--poses", type=int, default=32)
    parser.add_argument(
        "--weight",
        type=float,
        default=1.0,
        help="weight of the prior's energy in both tasks (1: the MAP objective, as the data terms are Gaussian NLLs)",
    )
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    prior = posepriors.load(args.model)
    truth = targets(args.data, args.poses, g)
    body = slice(1, 22)

    def error(pose: torch.Tensor) -> float:
        return torch.rad2deg(axis_angle_geodesic(pose[:, body], truth[:, body])).mean().item()

    # 1. noisy rotations of 12 of the 21 body joints
    observed = torch.zeros(55, dtype=torch.bool)
    observed[torch.randperm(21, generator=g)[:12] + 1] = True
    noisy = truth + 0.15 * torch.randn(truth.shape, generator=g)

    def rotation_loss(pose: torch.Tensor, w: float) -> torch.Tensor:
        data = ((pose - noisy)[:, observed].square()).sum() / (2 * 0.15**2)
        return data + (w * prior.energy({"body_pose": pose[:, body]}).sum() if w else 0.0)

    start = torch.zeros_like(truth)
    plain = fit(lambda p: rotation_loss(p, 0.0), start)
    regular = fit(lambda p: rotation_loss(p, args.weight), start)
    print(
        f"1. rotations of 12/21 joints, noise 0.15 rad: error without prior {error(plain):.1f} deg, "
        f"with prior {error(regular):.1f} deg"
    )

    # 2. noisy keypoints (2 cm) of the body joints under the approximate skeleton
    keypoints = forward_kinematics(truth) + 0.02 * torch.randn(truth.shape, generator=g)

    def keypoint_loss(pose: torch.Tensor, w: float) -> torch.Tensor:
        full = torch.zeros_like(truth).index_copy(1, torch.arange(1, 22), pose[:, body])
        data = (forward_kinematics(full)[:, :22] - keypoints[:, :22]).square().sum() / (2 * 0.02**2)
        return data + (w * prior.energy({"body_pose": pose[:, body]}).sum() if w else 0.0)

    plain = fit(lambda p: keypoint_loss(p, 0.0), start)
    regular = fit(lambda p: keypoint_loss(p, args.weight), start)
    print(
        f"2. keypoints with 2 cm noise: rotation error without prior {error(plain):.1f} deg, "
        f"with prior {error(regular):.1f} deg (twists about bones are invisible to keypoints)"
    )


if __name__ == "__main__":
    main()
