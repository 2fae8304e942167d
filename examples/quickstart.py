"""Quick start: load a bundled prior, score poses, sample, project, complete.

python examples/quickstart.py [--model global_flow]
"""

from __future__ import annotations

import argparse

import torch

import posepriors
from posepriors.demo import broken_pose, natural_pose


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="global_flow", help="a name from posepriors.list_models() or a folder")
    args = parser.parse_args()

    print("bundled models:", ", ".join(posepriors.list_models()))
    prior = posepriors.load(args.model)  # eval mode, frozen parameters, sha256-checked
    print(f"{args.model}: {prior.num_joints} joints, {sum(p.numel() for p in prior.parameters())} parameters")

    poses = torch.stack([natural_pose(), broken_pose()])  # SMPL-X (2, 55, 3); any supported layout works
    nll = prior.nll(poses)
    print(f"NLL natural {nll[0]:.1f}, broken {nll[1]:.1f} (nats; lower is more plausible)")

    samples = prior.sample(4, generator=torch.Generator().manual_seed(0), temperature=0.8)
    print("samples:", tuple(samples.shape), "NLL", [round(v, 1) for v in prior.nll(samples).tolist()])

    fixed = prior.project(poses[1:])  # fast projection of the broken pose
    print(f"projected broken pose: NLL {prior.nll(fixed).item():.1f}")

    # completion: hide the hands of a body + hands prior (a hand prior: hide the right hand) and fill them in
    hidden = list(range(25, 55)) if min(prior.joints) < 25 else list(range(40, 55))
    if set(hidden) < set(prior.joints):
        mask = torch.ones(55, dtype=torch.bool)
        mask[hidden] = False
        completed = prior.to_smplx(prior.project(poses[:1], mask))  # results come in the prior's joint order
        print(f"completed joints {hidden[0]}..{hidden[-1]} (first one):", completed[0, hidden[0]].tolist())


if __name__ == "__main__":
    main()
