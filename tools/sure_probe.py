"""The probe behind ``denoise(..., adaptive=True)``: SURE-blended posterior means on sets of noisy body poses.

    python tools/sure_probe.py [--poses 256] [--threads 1]

For ``body_val`` and four sources of ``body_ood_val`` (report only: nothing here is selected on them), 0.1 rad
noise, prints the mean geodesic error (deg) of

1. ``global_flow``'s posterior mean (Tweedie), the diagonal ``gaussian``'s, and the SURE blend of the flow's
   posterior mean with each candidate partner (the ``gaussian`` family's posterior mean, the broad component's,
   the identity ``y``), one blend weight for the whole set;
2. the shipped ``adaptive=True`` on sets of 1, 4, 16, 64 and 256 poses (consecutive poses of one source).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import posepriors
from posepriors.priors import sure
from posepriors.rotations import axis_angle_geodesic

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SOURCES = ("aist_dance_clip", "people_snapshot_apose", "dposer_completion_gt", "nrdf_ik_gt")
SIGMA = 0.1


def _deg(a: torch.Tensor, b: torch.Tensor) -> float:
    return axis_angle_geodesic(a.reshape(-1, 21, 3), b.reshape(-1, 21, 3)).rad2deg().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--poses", type=int, default=256, help="poses per data set")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flow, gaussian = posepriors.load("global_flow"), posepriors.load("gaussian")
    sets = {"body_val": np.load(DATA / "body_val.npz")["body_pose"][: args.poses]}
    ood = np.load(DATA / "body_ood_val.npz")
    sets.update({s: ood["body_pose"][ood["source"] == s][: args.poses] for s in SOURCES})
    log_prob = flow._smoothed_log_prob()

    def tweedie(v: torch.Tensor) -> torch.Tensor:
        return flow.smoothed.posterior_mean(v, log_prob)

    def gauss(v: torch.Tensor) -> torch.Tensor:
        return gaussian.denoise(v.reshape(-1, 21, 3), noise_std=SIGMA, layout="body")[:, :21].reshape(-1, 63)

    generator = torch.Generator().manual_seed(0)
    for name, clean in sets.items():
        x = torch.from_numpy(clean).reshape(-1, 63)
        y = x + SIGMA * torch.randn(x.shape, generator=generator)
        f = tweedie(y)
        div_f = sure.divergence(tweedie, y, step=0.01 * SIGMA, probes=sure.probes_for(len(y)))
        broad, div_broad = flow._broad_posterior_mean(y)
        partners = {
            "gaussian": (gauss(y), sure.divergence(gauss, y, step=0.01 * SIGMA)),
            "broad": (broad, div_broad),
            "identity": (y, torch.full((len(y),), 63.0)),
        }
        row = f"{name[:22]:22s} flow {_deg(f, x):.3f} gaussian {_deg(partners['gaussian'][0], x):.3f}"
        for partner, (g, div_g) in partners.items():
            t = sure.blend_weight(y, f, div_f, g, div_g, SIGMA)
            row += f" | +{partner} t={t:.2f}: {_deg(f + t * (g - f), x):.3f}"
        print(row)
        row = f"{'':22s} adaptive=True on sets of"
        for n in (1, 4, 16, 64, 256):
            parts = [flow.denoise(c, noise_std=SIGMA, layout="body", adaptive=True)[:, :21] for c in y.split(n)]
            out = torch.cat(parts)
            row += f" {n}: {_deg(out, x):.3f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
