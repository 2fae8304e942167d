"""Give a trained prior a broad component (posepriors.priors.broad) without retraining the family's weights.

The broad component is fitted in closed form on the training data; the result is the exact mixture
``(1 - w) p + w b``, saved as a new model folder.

Usage:
    python tools/attach_broad.py SRC OUT --data_dir A.npz [--data_dir B.npz ...] [--weight 0.1] [--components 2]
        [--min_std 0.02]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import posepriors
from posepriors.data import PoseData, load_poses
from posepriors.train import prepare_data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="a bundled model name or a model folder")
    parser.add_argument("out", help="output folder (must not hold a model)")
    parser.add_argument("--data_dir", action="append", required=True, help="training data (repeatable)")
    parser.add_argument("--weight", type=float, default=0.1, help="broad_weight w of the mixture")
    parser.add_argument("--components", type=int, default=2, help="Gaussian components per coordinate")
    parser.add_argument("--min_std", type=float, default=0.02, help="floor on every component's std (radians)")
    args = parser.parse_args(argv)

    source = posepriors.load(args.src, frozen=False)
    config = dataclasses.replace(
        source.config, broad_weight=args.weight, broad_components=args.components, broad_min_std=args.min_std
    )
    prior = type(source)(config)
    missing, unexpected = prior.load_state_dict(source.state_dict(), strict=False)
    if unexpected or any(not key.startswith("broad.") for key in missing):
        raise SystemExit(f"state mismatch: missing {missing}, unexpected {unexpected}")
    data = prepare_data(PoseData.concat([load_poses(p) for p in args.data_dir]), prior.joints)
    prior.fit_broad(data.poses, data.observed)
    posepriors.save_pretrained(prior.eval(), args.out)
    print(f"saved {args.out}: {type(prior).__name__} with broad_weight {args.weight} on {len(data)} poses")
    return 0


if __name__ == "__main__":
    sys.exit(main())
