"""Give a trained prior a broad component, a smoothed body density and/or a fitting energy without retraining the
family's weights.

- ``--broad_weight w`` (alias ``--weight``): the broad component (:mod:`posepriors.priors.broad`), fitted in closed
  form on the training data; the prior becomes the exact mixture ``(1 - w) p + w b``.
- ``--smoothed_noise_std s``: the smoothed body density (:mod:`posepriors.priors.smoothed`) that ``denoise`` uses
  for the posterior mean at noise ``s``, trained on the training poses that observe the whole body.
- ``--energy_gaussian_weight lam``: the fitting energy (:mod:`posepriors.priors.energy`) that ``energy`` and
  ``fit_keypoints`` use, with its full-covariance body Gaussian fitted in closed form on the training poses that
  observe the whole body.

The family's own weights are copied unchanged; the result is saved as a new model folder.

Usage (``python tools/attach.py`` runs the same):
    posepriors-attach SRC OUT --data_dir A.npz [--data_dir B.npz ...] [--broad_weight 0.1] [--components 2]
        [--min_std 0.02] [--smoothed_noise_std 0.1] [--smoothed_members 4] [--smoothed_epochs 60] [--seed 0]
        [--energy_gaussian_weight 0.5] [--energy_min_std 0.01] [--energy_members 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import posepriors
from posepriors.data import PoseData, load_poses
from posepriors.train import _existing_outputs, _missing_folders, _remove_if_empty, prepare_data
from posepriors.utils import FolderLockedError, folder_lock

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``posepriors-attach``: attach what the flags ask for to the prior ``src`` and save it as ``out``."""
    parser = argparse.ArgumentParser(
        prog="posepriors-attach",
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("src", help="a bundled model name or a model folder")
    parser.add_argument("out", help="output folder (must not hold a model)")
    parser.add_argument("--data_dir", action="append", required=True, help="training data (repeatable)")
    parser.add_argument("--broad_weight", "--weight", type=float, default=None, help="broad_weight w of the mixture")
    parser.add_argument("--components", type=int, default=2, help="Gaussian components per coordinate")
    parser.add_argument("--min_std", type=float, default=0.02, help="floor on every component's std (radians)")
    parser.add_argument("--smoothed_noise_std", type=float, default=None, help="noise std of the smoothed density")
    parser.add_argument("--smoothed_members", type=int, default=4, help="flows in the smoothed density's ensemble")
    parser.add_argument("--smoothed_hidden", type=int, default=128, help="width of those flows")
    parser.add_argument("--smoothed_num_layers", type=int, default=6, help="coupling layers of those flows")
    parser.add_argument("--smoothed_epochs", type=int, default=60, help="training epochs of each of those flows")
    parser.add_argument("--seed", type=int, default=0, help="seed of the smoothed density's training")
    parser.add_argument(
        "--energy_gaussian_weight", type=float, default=None, help="weight of the body Gaussian in the fitting energy"
    )
    parser.add_argument("--energy_min_std", type=float, default=0.01, help="std floor of that Gaussian (radians)")
    parser.add_argument(
        "--energy_members", type=int, default=0, help="smoothed flows the fitting energy uses (its first ones; 0: all)"
    )
    args = parser.parse_args(argv)
    if args.broad_weight is None and args.smoothed_noise_std is None and args.energy_gaussian_weight is None:
        parser.error("nothing to attach: pass --broad_weight, --smoothed_noise_std and/or --energy_gaussian_weight")
    out = Path(args.out)
    try:
        _check_out(out, args.src)  # before the source is read or anything is fitted
        created = _missing_folders(out)
        try:
            with folder_lock(out):
                _check_out(out, args.src)  # again under the lock: nothing came in between
                return _attach(args, out)
        finally:
            _remove_if_empty(created)  # a failed attach leaves no empty folder behind
    except (ValueError, TypeError, KeyError, OSError, FolderLockedError) as err:
        parser.exit(2, f"posepriors-attach: error: {err}\n")


def _check_out(out: Path, src: str) -> None:
    """Refuse an output folder that holds anything (a model above all: the source's own folder included)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"expected OUT to be a new folder, got the file {out}")
    held = _existing_outputs(out)
    if held:
        what = "the source model's own folder" if Path(src).exists() and Path(src).resolve() == out.resolve() else out
        raise ValueError(
            f"expected a new or empty OUT folder, got {what} holding {held[:6]}{' ...' if len(held) > 6 else ''}; "
            "the result is saved as a new model: choose another OUT"
        )


def _attach(args: argparse.Namespace, out: Path) -> int:
    source = posepriors.load(args.src, frozen=False)
    changes = {}
    if args.broad_weight is not None:
        changes.update(broad_weight=args.broad_weight, broad_components=args.components, broad_min_std=args.min_std)
    if args.smoothed_noise_std is not None:
        changes.update(
            smoothed_noise_std=args.smoothed_noise_std,
            smoothed_members=args.smoothed_members,
            smoothed_hidden=args.smoothed_hidden,
            smoothed_num_layers=args.smoothed_num_layers,
            smoothed_epochs=args.smoothed_epochs,
        )
    if args.energy_gaussian_weight is not None:
        changes.update(
            energy_gaussian_weight=args.energy_gaussian_weight,
            energy_min_std=args.energy_min_std,
            energy_members=args.energy_members,
        )
    prior = type(source)(dataclasses.replace(source.config, **changes))
    refit = tuple(
        prefix
        for prefix, attached in (
            ("broad.", args.broad_weight is not None),
            ("smoothed.", args.smoothed_noise_std),
            ("energy_gaussian.", args.energy_gaussian_weight),
        )
        if attached
    )
    state = {k: v for k, v in source.state_dict().items() if not k.startswith(refit)}
    missing, unexpected = prior.load_state_dict(state, strict=False)
    if unexpected or any(not key.startswith(refit) for key in missing):
        raise ValueError(
            f"expected the source's state to fit the new config, got missing {missing}, unexpected {unexpected}"
        )
    data = prepare_data(PoseData.concat([load_poses(p) for p in args.data_dir]), prior.joints)
    if args.broad_weight is not None:
        prior.fit_broad(data.poses, data.observed)
        print(f"broad component (weight {args.broad_weight}) fitted on {len(data)} poses")
    if args.smoothed_noise_std is not None:
        prior.fit_smoothed(data.poses, data.observed, seed=args.seed, progress=print)
    if args.energy_gaussian_weight:
        prior.fit_energy(data.poses, data.observed)
        print(f"fitting energy (body Gaussian weight {args.energy_gaussian_weight}) fitted on the whole-body poses")
    posepriors.save_pretrained(prior.eval(), out)
    print(f"saved {out}: {type(prior).__name__} with {changes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
