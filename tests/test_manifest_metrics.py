"""Every shipped model reproduces the validation NLL its manifest entry states, on the shared val sets."""

from __future__ import annotations

import pytest

import posepriors
from posepriors.data import load_poses
from posepriors.evaluate import evaluate

MODELS = posepriors.read_manifest()
CASES = [(name, data) for name, entry in sorted(MODELS.items()) for data in sorted(entry.extra.get("metrics", {}))]


def test_every_shipped_model_states_validation_metrics():
    missing = [name for name, entry in MODELS.items() if entry.bundled and not entry.extra.get("metrics")]
    assert not missing, f"bundled models without validation metrics in the manifest: {missing}"


@pytest.mark.shared_data
@pytest.mark.parametrize(("name", "data"), CASES, ids=[f"{n}-{d}" for n, d in CASES])
def test_eval_reproduces_manifest_nll(name, data, shared_data):
    stated = MODELS[name].extra["metrics"][data]
    prior = posepriors.load(name)
    report = evaluate(prior, load_poses(shared_data / data), samples=False, denoise=False, completion=False)
    assert report.poses == stated["poses"]
    assert report.nll.dims == stated["dims"]
    assert report.nll.mean == pytest.approx(stated["nll_mean"], abs=0.02)
    assert report.nll.median == pytest.approx(stated["nll_median"], abs=0.02)
