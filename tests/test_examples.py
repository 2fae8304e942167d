"""Every example and the demo run on the bundled weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script, tmp_path):
    extra = {
        "train_your_own": ["--epochs", "1", "--out", str(tmp_path / "prior")],
        "fitting_regularizer": ["--poses", "8"],  # the fitting energy runs 4 flows per step: a smaller batch
    }.get(script.stem, [])
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(
        [sys.executable, str(script), *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()


def test_quickstart_completes_with_every_bundled_model(monkeypatch, capsys):
    """The quick start's completion step picks joints the model has (a hand prior hides one hand)."""
    import posepriors

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import quickstart
    finally:
        sys.path.pop(0)
    for name in posepriors.list_models():
        monkeypatch.setattr(sys, "argv", ["quickstart.py", "--model", name])
        quickstart.main()
        assert "completed joints" in capsys.readouterr().out, name


def test_demo_prints_a_table():
    from posepriors.demo import main

    assert main(["--model", "gaussian"]) == 0


def test_readme_usage_example_runs_as_written():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert "posepriors.load" in block
    exec(compile(block, "README.md", "exec"), {})
