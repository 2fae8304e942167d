"""Maintainer tool: complete a hidden hand with a hands-only global_flow whose second part is that hand.

    python tools/hand_pair_completion.py MODEL_DIR [--data ../shared/data] [--samples 32]

MODEL_DIR is a ``global_flow`` over both hands with ``--parts SEEN_HAND HIDDEN_HAND`` (e.g. ``--joints
left_hand+right_hand --parts left_hand right_hand`` completes the right hand from the left). On ``hands_val`` it
reports the mean geodesic error (degrees) of the hidden hand for: the training data's mean hand, the conditional
flow at latent zero, and the rotation mean (chordal: the SVD projection of the mean rotation matrix) of
``--samples`` conditional draws at temperatures 1 and 0.5. docs/models.md compares them with the linear Gaussian
conditional of ``gaussian_full`` (``tools/fit_full_gaussian.py``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import posepriors
from posepriors import skeleton
from posepriors.rotations import axis_angle_geodesic, axis_angle_to_matrix, matrix_to_axis_angle


def rotation_mean(matrices: torch.Tensor) -> torch.Tensor:
    """The chordal mean of rotation matrices summed over draws, (..., 3, 3) -> axis-angle (..., 3)."""
    u, _, vh = torch.linalg.svd(matrices)
    flip = torch.where(torch.det(u @ vh) < 0, -1.0, 1.0)
    u = torch.cat([u[..., :2], u[..., 2:] * flip[..., None, None]], dim=-1)
    return matrix_to_axis_angle(u @ vh)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    prior = posepriors.load(args.model)
    parts = [[prior.joints[i] for i in idx] for idx in prior._part_index]
    names = {tuple(skeleton.PARTS[p]): p for p in ("left_hand", "right_hand")}
    if len(parts) != 2 or tuple(parts[0]) not in names or tuple(parts[1]) not in names:
        raise SystemExit(f"expected a global_flow with parts (one hand, the other hand), got parts {parts}")
    seen_part, hidden_part = names[tuple(parts[0])], names[tuple(parts[1])]
    val, train = np.load(args.data / "hands_val.npz"), np.load(args.data / "hands_train.npz")
    seen = torch.from_numpy(val[f"{seen_part}_pose"]).float()
    truth = torch.from_numpy(val[f"{hidden_part}_pose"]).float()
    n = len(seen)

    def error(estimate: torch.Tensor) -> float:
        return torch.rad2deg(axis_angle_geodesic(estimate, truth)).mean().item()

    mean = torch.from_numpy(train[f"{hidden_part}_pose"].reshape(-1, 45).mean(0)).float().reshape(1, 15, 3)
    print(f"{hidden_part} from {seen_part}: data mean {error(mean.expand_as(truth)):.2f} deg")
    x = torch.zeros(n, prior.num_joints, 3)
    x[:, :15] = seen
    context = prior._part_context(x, 1, None)
    flow = prior.flows[1]
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        zero, _ = flow.inverse(torch.zeros(n, 1, 45), context)
        print(f"  flow at latent zero {error(zero.reshape(n, 15, 3)):.2f} deg")
        for temperature in (1.0, 0.5):
            total = torch.zeros(n, 15, 3, 3)
            for _ in range(args.samples):
                draw, _ = flow.inverse(temperature * torch.randn(n, 1, 45, generator=g), context)
                total += axis_angle_to_matrix(draw.reshape(n, 15, 3))
            print(
                f"  rotation mean of {args.samples} draws, temperature {temperature}: {error(rotation_mean(total)):.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
