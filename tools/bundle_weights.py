"""Maintainer tool: copy a trained model into the package and record it in ``weights_manifest.json``.

    python tools/bundle_weights.py NAME TRAINED_DIR --description "..." --command "posepriors-train ..." \
        --training_data "..." [--metrics metrics.json]

The files are copied into ``posepriors/weights/NAME/``; the manifest entry gets their SHA-256 and size, the
training command and data, the licence note and the validation metrics.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from posepriors.hub import BUNDLED_DIR, CONFIG_NAME, MANIFEST_PATH, WEIGHTS_NAME, load_pretrained
from posepriors.utils import atomic_write, sha256_file

LICENSE = "trained on AMASS- and ARCTIC-derived poses; non-commercial research use"
HUB = {"repo_id": "posepriors/posepriors", "revision": None}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name")
    parser.add_argument("trained_dir", type=Path)
    parser.add_argument("--description", required=True)
    parser.add_argument("--command", required=True, help="the exact training command")
    parser.add_argument("--training_data", required=True)
    parser.add_argument("--metrics", type=Path, help="JSON file with validation metrics")
    parser.add_argument("--license", default=LICENSE)
    args = parser.parse_args(argv)

    prior = load_pretrained(args.trained_dir)  # refuse to bundle anything that does not load
    target = BUNDLED_DIR / args.name
    target.mkdir(parents=True, exist_ok=True)
    for filename in (CONFIG_NAME, WEIGHTS_NAME):
        shutil.copyfile(args.trained_dir / filename, target / filename)
    manifest = json.loads(MANIFEST_PATH.read_text()) if MANIFEST_PATH.is_file() else {}
    manifest.setdefault("format_version", 1)
    manifest.setdefault("hub", HUB)
    models = manifest.setdefault("models", {})
    entry = {
        "model_type": prior.model_type,
        "description": args.description,
        "bundled": True,
        "subfolder": args.name,
        "files": {
            f: {"sha256": sha256_file(target / f), "size": (target / f).stat().st_size}
            for f in (CONFIG_NAME, WEIGHTS_NAME)
        },
        "parameters": sum(p.numel() for p in prior.parameters()),
        "joints": list(prior.joints),
        "license": args.license,
        "training_command": args.command,
        "training_data": args.training_data,
    }
    if args.metrics:
        entry["metrics"] = json.loads(args.metrics.read_text())
    models[args.name] = entry
    with atomic_write(MANIFEST_PATH, "w") as handle:
        handle.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(f"bundled {args.name}: {entry['files'][WEIGHTS_NAME]['size']} bytes, {entry['parameters']} parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
