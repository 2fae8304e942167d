"""Maintainer tool: turn ``posepriors-eval --json`` reports into one model's manifest metrics.

    python tools/collect_metrics.py NAME --nll full.json [--nll ...] [--extra rich.json ...] --out metrics.json

``--nll`` reports (run on whole validation sets, ``--no_samples --no_denoise --no_completion``) give the NLL that
``tests/test_manifest_metrics.py`` reproduces; ``--extra`` reports (possibly on a seeded subset, ``--max_poses``)
add sample quality, denoising and completion. The result is keyed by data file name.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def collect(name: str, nll_reports: list[dict[str, Any]], extra_reports: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for report in nll_reports:
        if report["model"] != name:
            continue
        nll = report["nll"]
        out[report["data"]] = {
            "poses": report["poses"],
            "dims": nll["dims"],
            "nll_mean": round(nll["mean"], 4),
            "nll_median": round(nll["median"], 4),
            "bits_per_dim": round(nll["bits_per_dim"], 5),
        }
    for report in extra_reports:
        if report["model"] != name or report["data"] not in out:
            continue
        entry = out[report["data"]]
        entry["subset_poses"] = report["poses"]
        for key in ("samples", "denoise"):
            if report.get(key):
                entry[key] = {k: round(v, 4) if isinstance(v, float) else v for k, v in report[key].items()}
        if report.get("completion"):
            entry["completion"] = [
                {k: round(v, 3) if isinstance(v, float) else v for k, v in c.items()} for c in report["completion"]
            ]
    if not out:
        raise SystemExit(f"no report for model {name!r}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name")
    parser.add_argument("--nll", type=Path, action="append", required=True)
    parser.add_argument("--extra", type=Path, action="append", default=[])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    nll = [r for path in args.nll for r in json.loads(path.read_text())]
    extra = [r for path in args.extra for r in json.loads(path.read_text())]
    args.out.write_text(json.dumps(collect(args.name, nll, extra), indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
