"""The fitting benchmark's paired bootstrap intervals (benchmarks/fitting.py), on synthetic per-pose errors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fitting.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("fitting_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_interval_of_a_constant_difference_is_that_constant(bench) -> None:
    b = torch.rand(40)
    a = b + 1.5
    g = torch.Generator().manual_seed(0)
    mean, low, high = bench.paired_interval(lambda r: (a[r] - b[r]).mean(-1), [torch.arange(40)], 200, g)
    assert mean == pytest.approx(1.5) and low == pytest.approx(1.5) and high == pytest.approx(1.5)


def test_interval_brackets_the_estimate_and_narrows_with_more_poses(bench) -> None:
    g = torch.Generator().manual_seed(1)
    widths = []
    for n in (20, 2000):
        diff = torch.randn(n, generator=g) + 0.3
        mean, low, high = bench.paired_interval(lambda r, d=diff: d[r].mean(-1), [torch.arange(n)], 1000, g)
        assert low < mean < high
        assert mean == pytest.approx(diff.mean().item())
        widths.append(high - low)
    assert widths[1] < widths[0] / 5  # about 1 / sqrt(100)


def test_strata_are_resampled_on_their_own(bench) -> None:
    strata = [torch.arange(0, 7), torch.arange(7, 30)]
    g = torch.Generator().manual_seed(2)
    # the number of positions from the first stratum in a resample: always 7 when strata keep their sizes
    count = bench.paired_interval(lambda r: (r < 7).sum(-1).double(), strata, 500, g)
    assert count == (7.0, 7.0, 7.0)
    # without strata the count varies
    _, low, high = bench.paired_interval(lambda r: (r < 7).sum(-1).double(), [torch.arange(30)], 500, g)
    assert low < 7 < high


def test_intervals_rows_against_the_reference(bench) -> None:
    n = 12
    names = np.array(["body_val"] * 6 + ["dance"] * 3 + ["apose"] * 3)
    groups = {
        "body_val": torch.arange(0, 6),
        "body_ood_val": torch.arange(6, 12),
        "dance": torch.arange(6, 9),
        "apose": torch.arange(9, 12),
    }
    g = torch.Generator().manual_seed(3)
    errors = {}
    for prior, scale in (("gaussian", 1.0), ("flow", 0.8)):
        for scenario in bench.SCENARIOS:
            e = {"angle": scale * (10 + torch.rand(n, generator=g)), "mpjpe": torch.rand(n, generator=g)}
            if scenario.hidden:
                e["hidden"] = scale * (100 + torch.rand(n, generator=g))
            errors[prior, scenario.name] = e
    rows = bench.intervals(errors, ["gaussian", "flow"], groups, names, "gaussian", 300, 0)
    assert len(rows) == len(bench.SCENARIOS) * len(groups)
    assert {r["prior"] for r in rows} == {"flow"}
    for row in rows:
        index = groups[row["data"]]
        mine, base = errors["flow", row["scenario"]], errors["gaussian", row["scenario"]]
        mean, low, high = row["angle_diff_deg"]
        assert mean == pytest.approx((mine["angle"][index] - base["angle"][index]).mean().item(), rel=1e-5)
        assert low <= mean <= high < 0
        if row["scenario"] == "hidden_1.5cm":
            cut = 1 - mine["hidden"][index].mean() / base["hidden"][index].mean()
            assert row["hidden_cut"][0] == pytest.approx(cut.item(), rel=1e-5)
            assert row["hidden_cut"][1] <= row["hidden_cut"][0] <= row["hidden_cut"][2]
        else:
            assert "hidden_cut" not in row
    # seeded: the same numbers again; no rows without the reference
    assert bench.intervals(errors, ["gaussian", "flow"], groups, names, "gaussian", 300, 0) == rows
    assert bench.intervals(errors, ["gaussian", "flow"], groups, names, "gaussian_full", 300, 0) == []
    text = bench.intervals_markdown(rows, "gaussian")
    assert "| flow | hidden_1.5cm | body_ood_val |" in text and "dance" not in text


def test_energy_probe_selection_fits_body_val_only(tmp_path) -> None:
    """``tools/energy_fit_probe.py --selection``: a JSON line per prior and named scenario, from the tuning poses
    and ``body_val`` alone (the body_ood_val poses here are NaN: any use of them would show)."""
    import json
    import subprocess

    g = np.random.default_rng(0)
    for name, n in (("body_train", 8), ("body_val", 5)):
        np.savez(tmp_path / f"{name}.npz", body_pose=0.2 * g.standard_normal((n, 63)).astype(np.float32))
    np.savez(
        tmp_path / "body_ood_val.npz",
        body_pose=np.full((6, 63), np.nan, dtype=np.float32),
        source=np.array(["a", "a", "a", "b", "b", "b"]),
    )
    tool = SCRIPT.parents[1] / "tools" / "energy_fit_probe.py"
    argv = [sys.executable, str(tool), "--selection", "hidden_1.5cm,all_4cm", "--data_dir", str(tmp_path)]
    argv += ["--baselines", "none,gaussian", "--steps", "3", "--max_poses", "4", "--tune_poses", "3", "--threads", "1"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["prior"], r["scenario"]) for r in rows] == [
        ("none", "all_4cm"),
        ("none", "hidden_1.5cm"),
        ("gaussian", "all_4cm"),
        ("gaussian", "hidden_1.5cm"),
    ]
    for row in rows:
        assert np.isfinite([row["body_val_angle"], row["body_val_mpjpe"]]).all()
        assert ("body_val_hidden" in row) == (row["scenario"] == "hidden_1.5cm")
        assert len(row["tuning_angle_deg"]) == (5 if row["prior"] == "gaussian" else 0)
    bad = subprocess.run([*argv[:3], "hidden", *argv[4:]], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown scenarios ['hidden']" in bad.stderr
