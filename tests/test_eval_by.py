"""posepriors-eval --by KEY: metrics per group of a per-pose label array (e.g. ``source``), plus pooled."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import posepriors
from posepriors import evaluate
from posepriors.data import load_poses

SIZES = {"dance": 40, "mocap": 30, "video": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_by")
    g = np.random.default_rng(0)
    parts, sources = [], []
    for k, (name, n) in enumerate(SIZES.items()):
        parts.append(0.1 * k + 0.2 * g.standard_normal((n, 21, 3)))  # each source a little different
        sources += [name] * n
    body = np.concatenate(parts).astype(np.float32)
    order = g.permutation(len(body))  # sources interleaved in the file
    np.savez(root / "body.npz", body_pose=body[order], source=np.array(sources)[order])
    np.savez(root / "plain.npz", body_pose=body[:10])
    gaussian = posepriors.priors.GaussianPrior().fit(torch.from_numpy(body))
    posepriors.save_pretrained(gaussian, root / "gaussian")
    return root


def test_load_poses_keeps_per_pose_labels(setup):
    data = load_poses(setup / "body.npz")
    assert set(data.labels) == {"source"} and data.labels["source"].shape == (len(data),)
    part = data.subset(torch.arange(5, 15))
    np.testing.assert_array_equal(part.labels["source"], data.labels["source"][5:15])
    assert load_poses(setup / "plain.npz").labels == {}
    # a folder: a key only some files have is dropped, not misaligned
    both = load_poses(setup)
    assert len(both) == len(data) + 10 and both.labels == {}


def test_group_by_splits_exactly(setup):
    data = load_poses(setup / "body.npz")
    groups = evaluate.group_by(data, "source")
    assert {k: len(v) for k, v in groups.items()} == SIZES
    for name, part in groups.items():
        assert set(part.labels["source"].tolist()) == {name}
    with pytest.raises(ValueError, match=r"expected a per-pose label array 'subject'.*got label keys \['source'\]"):
        evaluate.group_by(data, "subject")


def test_evaluate_by_reports_pooled_and_every_group(setup):
    prior = posepriors.load(setup / "gaussian")
    data = load_poses(setup / "body.npz")
    reports = evaluate.evaluate_by(prior, data, "source", num_samples=16, completion=False)
    assert [(r.group_by, r.group, r.poses) for r in reports] == [
        ("source", "all", 71),
        ("source", "dance", 40),
        ("source", "mocap", 30),
        ("source", "video", 1),
    ]
    # the pooled mean NLL is the pose-weighted mean of the groups'
    pooled = sum(r.nll.mean * r.poses for r in reports[1:]) / reports[0].poses
    assert reports[0].nll.mean == pytest.approx(pooled, rel=1e-5)
    # a group's NLL is the NLL of exactly its poses
    dance = data.subset(torch.from_numpy(np.nonzero(data.labels["source"] == "dance")[0]))
    expected = prior.nll(dance.poses[:, 1:22]).mean().item()
    assert reports[1].nll.mean == pytest.approx(expected, rel=1e-5)
    assert reports[3].samples is None  # too few poses for the sample metrics
    assert reports[1].samples is not None


def test_cli_by_source_writes_groups_to_markdown_and_json(setup, capsys):
    out = setup / "out"
    code = evaluate.main(
        [
            str(setup / "gaussian"),
            "--data",
            str(setup / "body.npz"),
            "--by",
            "source",
            "--no_samples",
            "--no_completion",
            "--json",
            str(out / "r.json"),
            "--markdown",
            str(out / "r.md"),
        ]
    )
    assert code == 0
    table = (out / "r.md").read_text()
    for group in ("all", *SIZES):
        assert f"| body.npz [source={group}] |" in table
    assert table.strip().count("\n") == 1 + 1 + len(SIZES)
    reports = json.loads((out / "r.json").read_text())
    assert [(r["group_by"], r["group"]) for r in reports] == [("source", g) for g in ("all", *SIZES)]
    assert "[source=mocap]" in capsys.readouterr().out


def test_cli_by_an_unknown_key_fails_cleanly(setup, capsys):
    code = evaluate.main([str(setup / "gaussian"), "--data", str(setup / "body.npz"), "--by", "subject"])
    assert code == 2
    assert "no per-pose label array 'subject' (has ['source'])" in capsys.readouterr().err


def test_cli_without_by_is_unchanged(setup):
    out = setup / "plain_out"
    code = evaluate.main(
        [
            str(setup / "gaussian"),
            "--data",
            str(setup / "body.npz"),
            "--no_samples",
            "--no_completion",
            "--no_denoise",
            "--json",
            str(out / "r.json"),
        ]
    )
    assert code == 0
    (report,) = json.loads((out / "r.json").read_text())
    assert report["group"] is None and report["poses"] == 71
