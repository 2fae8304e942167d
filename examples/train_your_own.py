"""Train your own prior on an AMASS folder with ``posepriors-train``, then load and use it.

    python examples/train_your_own.py [--amass ../shared/data/amass_raw] [--out outputs/my_prior]

Without an AMASS folder the example writes a few synthetic AMASS-style files (SMPL-H, 120 fps) to train on.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

import posepriors
from posepriors.train import main as train


def synthetic_amass(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        t = np.linspace(0, 4 * np.pi, 600)[:, None]
        poses = 0.3 * np.sin(t + rng.uniform(0, 6, 156)) + 0.05 * rng.normal(size=(600, 156))
        np.savez(folder / f"subject{i}_poses.npz", poses=poses, trans=np.zeros((600, 3)), mocap_framerate=120.0)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--amass", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/amass_raw")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()

    amass = args.amass if args.amass.is_dir() else synthetic_amass(Path(tempfile.mkdtemp()) / "amass")
    out = args.out or Path(tempfile.mkdtemp()) / "my_prior"
    code = train(
        [
            "global_flow",
            "--joints",
            "body",
            "--hidden",
            "64",
            "--K",
            "4",
            "--coupling",
            "spline",
            "--data_dir",
            str(amass),
            "--fps",
            "30",
            "--val_fraction",
            "0.2",
            "--max_epochs",
            str(args.epochs),
            "--batch_size",
            "128",
            "--logger",
            "csv",
            "--log_dir",
            str(out / "logs"),
            "--out",
            str(out),
        ]
    )
    if code != 0:
        raise SystemExit(code)
    prior = posepriors.load(out)
    data = posepriors.data.load_poses(amass, fps=30)
    print(f"trained prior in {out}: mean NLL of the training folder {prior.nll(data.joints('body')).mean():.1f} nats")
    print("samples:", tuple(prior.sample(4, generator=torch.Generator().manual_seed(0)).shape))


if __name__ == "__main__":
    main()
