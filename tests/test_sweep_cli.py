"""Fault-injection sweep, command-line and loader side: each test names the sweep item it covers.

Data are small synthetic ``.npz`` files made in ``tmp_path``; every training run is a ``gaussian`` of 1-3 epochs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import posepriors
from posepriors import data as data_module
from posepriors import evaluate
from posepriors import train as train_module
from posepriors.data import PoseData, load_poses
from posepriors.priors.gaussian import GaussianPrior
from tests.cli import run_cli
from tests.families import synthetic_poses
from tests.test_train_reliability import _read_only_folder

BODY = tuple(range(1, 22))
HANDS = tuple(range(25, 55))


def _body(path: Path, n: int = 64, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, body_pose=synthetic_poses(n, BODY, seed=seed).numpy())
    return path


def _hands(path: Path, n: int = 64, seed: int = 5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    hands = synthetic_poses(n, HANDS, seed=seed).numpy()
    np.savez(path, left_hand_pose=hands[:, :15], right_hand_pose=hands[:, 15:])
    return path


def _train(argv, capsys) -> tuple[int, str, str]:
    return run_cli(train_module.main, argv, capsys)


def _eval(argv, capsys) -> tuple[int, str, str]:
    return run_cli(evaluate.main, argv, capsys)


def _gaussian_args(out: Path, *data: Path, epochs: int = 1, extra=()) -> list[str]:
    args = ["gaussian", "--joints", "body", "--out", str(out), "--max_epochs", str(epochs)]
    args += ["--batch_size", "32", "--logger", "none", "--no-progress", "--sample_every", "0"]
    for path in data:
        args += ["--data_dir", str(path)]
    return [*args, *map(str, extra)]


@pytest.fixture
def body_model(tmp_path) -> Path:
    """A body Gaussian fitted to synthetic poses, saved as a folder."""
    prior = GaussianPrior().fit(synthetic_poses(200, BODY, seed=3))
    posepriors.save_pretrained(prior, tmp_path / "gaussian_model")
    return tmp_path / "gaussian_model"


# ---------------------------------------------------------------------------- 1: resume on other data
def test_item1_resume_refuses_other_data_of_the_same_size(tmp_path, capsys):
    a, b = _body(tmp_path / "a.npz", seed=0), _body(tmp_path / "b.npz", seed=1)
    out = tmp_path / "run"
    assert _train(_gaussian_args(out, a, epochs=1), capsys)[0] == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["data_sha256"]["train"]) == 64 and len(metrics["data_sha256"]["val"]) == 64
    code, stdout, stderr = _train([*_gaussian_args(out, b, epochs=2), "--resume"], capsys)
    assert code == 2 and "Traceback" not in stderr, stderr
    assert "the training data (sha256" in stderr and "the validation data (sha256" in stderr
    assert f"the run used --data_dir {a}" in stderr and "epoch   2" not in stdout
    assert json.loads((out / "last.json").read_text())["epoch"] == 1
    # the same data resume as before
    code, _, stderr = _train([*_gaussian_args(out, a, epochs=2), "--resume"], capsys)
    assert code == 0, stderr
    assert json.loads((out / "metrics.json").read_text())["data_sha256"] == metrics["data_sha256"]


def test_item1_resume_names_changed_validation_data(tmp_path, capsys):
    a = _body(tmp_path / "a.npz", seed=0)
    v1, v2 = _body(tmp_path / "v1.npz", n=20, seed=2), _body(tmp_path / "v2.npz", n=20, seed=3)
    out = tmp_path / "run"
    assert _train(_gaussian_args(out, a, extra=["--val_dir", v1]), capsys)[0] == 0
    code, _, stderr = _train([*_gaussian_args(out, a, epochs=2, extra=["--val_dir", v2]), "--resume"], capsys)
    assert code == 2 and "the validation data (sha256" in stderr and "the training data" not in stderr, stderr


def test_item1_runs_saved_without_a_data_hash_resume_as_before(tmp_path, capsys):
    a = _body(tmp_path / "a.npz", seed=0)
    out = tmp_path / "run"
    assert _train(_gaussian_args(out, a, epochs=1), capsys)[0] == 0
    state = out / json.loads((out / "last.json").read_text())["checkpoint"] / "training_state.json"
    meta = json.loads(state.read_text())
    for key in ("train_sha256", "val_sha256"):  # as a run saved before the hashes were recorded
        meta["data"].pop(key, None)
    state.write_text(json.dumps(meta))
    code, _, stderr = _train([*_gaussian_args(out, a, epochs=2), "--resume"], capsys)
    assert code == 0, stderr
    assert json.loads((out / "last.json").read_text())["epoch"] == 2


# ---------------------------------------------------------------------------- 2: loop flags
BAD_LOOP_FLAGS = [
    ("learning_rate", "inf"),
    ("step_size", "0"),
    ("step_size", "-1"),
    ("gamma", "-1"),
    ("gamma", "0"),
    ("gamma", "nan"),
    ("gamma", "inf"),
    ("patience", "-1"),
    ("val_batch_size", "0"),
    ("val_batch_size", "-1"),
    ("seed", str(2**70)),
    ("seed", "-1"),
    ("grad_clip", "inf"),
    ("weight_decay", "inf"),
    ("sample_every", "-1"),
]


@pytest.mark.parametrize(("name", "value"), BAD_LOOP_FLAGS)
def test_item2_bad_loop_flags_exit_2_before_any_data_is_read(name, value, tmp_path, capsys):
    missing = tmp_path / "not_read.npz"  # reading it would fail with "pose data not found"
    args = _gaussian_args(tmp_path / "out", missing, extra=["--scheduler", "step", f"--{name}", value])
    code, stdout, stderr = _train(args, capsys)
    assert code == 2 and "Traceback" not in stderr
    assert f"posepriors-train: error: expected {name} " in stderr and "not found" not in stderr, stderr
    assert "training" not in stdout and not (tmp_path / "out").exists()


def test_item2_train_config_keeps_its_documented_off_values():
    check = train_module._check_train_config
    check(train_module.TrainConfig(grad_clip=0.0, patience=0))  # 0: off, as documented
    check(train_module.TrainConfig(grad_clip=None, patience=None))  # None: off too
    check(train_module.TrainConfig(seed=2**63 - 1, gamma=2.0, step_size=1))
    for bad in ({"learning_rate": "0.1"}, {"step_size": 2.5}, {"seed": True}, {"gamma": math.inf}):
        with pytest.raises(ValueError, match=f"expected {next(iter(bad))} "):
            check(train_module.TrainConfig(**bad))


def test_item2_the_largest_seed_trains(tmp_path, capsys):
    # the per-epoch generator was seeded with seed * 100003 + epoch, which overflowed for large seeds
    args = _gaussian_args(tmp_path / "out", _body(tmp_path / "a.npz"), extra=["--seed", str(2**63 - 1)])
    code, _, stderr = _train(args, capsys)
    assert code == 0, stderr


# ---------------------------------------------------------------------------- 3: huge angles
def test_item3_huge_finite_angles_never_become_nan(tmp_path):
    poses = synthetic_poses(40, BODY, seed=0).numpy()
    poses[:4] = 1e30  # finite in float32, but its squared norm overflows
    np.savez(tmp_path / "huge.npz", body_pose=poses)
    with pytest.warns() as record:
        data = load_poses(tmp_path / "huge.npz")
    assert torch.isfinite(data.poses).all()
    assert len(data) == 40 or (len(data) == 36 and any("dropped 4 of 40 frames" in str(w.message) for w in record))


def test_item3_frames_that_wrap_to_nan_are_dropped_with_the_warning(tmp_path, monkeypatch):
    np.savez(tmp_path / "a.npz", body_pose=synthetic_poses(10, BODY, seed=0).numpy())
    original = data_module.wrap_axis_angle

    def wrap_with_overflow(aa):  # as an overflowing wrap does with huge angles: rows 2 and 7 come out NaN
        out = original(aa).clone()
        out[[2, 7]] = math.nan
        return out

    monkeypatch.setattr(data_module, "wrap_axis_angle", wrap_with_overflow)
    with pytest.warns(UserWarning, match=r"dropped 2 of 10 frames with NaN/Inf"):
        data = load_poses(tmp_path / "a.npz")
    assert len(data) == 8 and torch.isfinite(data.poses).all()


@pytest.mark.parametrize("error", [ValueError, FloatingPointError])
def test_item3_eval_errors_from_the_evaluation_exit_2(error, body_model, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise error("expected finite pose values, got NaN or Inf")

    monkeypatch.setattr(evaluate, "evaluate", refuse)
    code, _, stderr = _eval([body_model, "--data", _body(tmp_path / "a.npz")], capsys)
    assert code == 2 and "Traceback" not in stderr
    assert "posepriors-eval: error: evaluating" in stderr and "expected finite pose values" in stderr


# ---------------------------------------------------------------------------- 4: stratified split
def _mixed_files(folder: Path) -> list[Path]:
    """SMPL-H (body + hands), seed-format (53 joints) and hand-only files: three observed-joint patterns."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.savez(folder / "c.npz", poses=(0.2 * rng.standard_normal((200, 156))).astype("f4"))
    np.savez(folder / "s.npz", poses=(0.2 * rng.standard_normal((200, 53, 3))).astype("f4"))
    hands = (0.2 * rng.standard_normal((200, 30, 3))).astype("f4")
    np.savez(
        folder / "h.npz",
        left_hand_pose=hands[:, :15],
        right_hand_pose=hands[:, 15:],
        sequence=np.repeat(np.arange(10), 20),
    )
    return [folder / "c.npz", folder / "s.npz", folder / "h.npz"]


@pytest.mark.parametrize("seed", range(4))
def test_item4_split_gives_every_observed_joint_pattern_its_share(seed, tmp_path):
    data = PoseData.concat([load_poses(f) for f in _mixed_files(tmp_path)])
    with pytest.warns(UserWarning, match="cut into contiguous chunks"):  # c and s are one sequence each
        train, val = data.split_by_sequence(0.1, seed=seed)
    assert len(train) + len(val) == len(data)
    assert not set(train.sequence.tolist()) & set(val.sequence.tolist())
    for file in ("c.npz", "s.npz", "h.npz"):
        ids = {i for i, name in enumerate(train.sequence_names) if name.startswith(file)}
        in_val = sum(int(s) in ids for s in val.sequence)
        assert 0.1 * 200 <= in_val <= 1.25 * 0.1 * 200, (file, in_val)


def test_item4_training_on_several_parts_validates_on_each(tmp_path, capsys):
    files = _mixed_files(tmp_path / "data")
    out = tmp_path / "out"
    args = ["gaussian", "--out", out, "--max_epochs", "1", "--logger", "none", "--no-progress"]
    args += ["--sample_every", "0", "--batch_size", "64"]
    for file in files:
        args += ["--data_dir", file]
    code, _, stderr = _train(args, capsys)  # seed 0 used to put only hand frames into validation
    assert code == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_poses"] == 40  # 20 of the 200 SMPL-H and 20 of the 200 seed-format frames (the body ones)


def test_item4_split_still_works_when_every_pattern_has_one_frame():
    poses = torch.zeros(2, 55, 3)
    observed = torch.zeros(2, 55, dtype=torch.bool)
    observed[0, 1:22], observed[1, 25:] = True, True
    data = PoseData(poses, observed, torch.tensor([0, 1]), ["a", "b"], ["x.npz"])
    train, val = data.split_by_sequence(0.1)
    assert len(train) == 1 and len(val) == 1


# ---------------------------------------------------------------------------- 5, 6, 7, 23: loader messages
def test_item5_a_npy_file_is_named_and_a_npz_is_asked_for(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((10, 21, 3), np.float32))
    with pytest.raises(ValueError, match=r"x\.npy: a \.npy array of shape \(10, 21, 3\), not an \.npz archive"):
        load_poses(tmp_path / "x.npy")
    code, _, stderr = _train(_gaussian_args(tmp_path / "out", tmp_path / "x.npy"), capsys)
    assert code == 2 and "x.npy: a .npy array" in stderr and "expected a .npz file" in stderr, stderr
    folder = tmp_path / "folder"
    _body(folder / "good.npz")
    (folder / "renamed.npz").write_bytes((tmp_path / "x.npy").read_bytes())
    with pytest.warns(UserWarning, match=r"renamed\.npz \(a \.npy array"):
        assert len(load_poses(folder)) == 64


@pytest.mark.parametrize("kind", ["nan", "inf", "empty"])
def test_item6_a_file_without_usable_frames_says_so(kind, tmp_path, capsys):
    if kind == "empty":
        np.savez(tmp_path / "f.npz", body_pose=np.zeros((0, 21, 3), np.float32))
        expected = "f.npz: holds 0 frames"
    else:
        np.savez(tmp_path / "f.npz", poses=np.full((30, 156), np.nan if kind == "nan" else np.inf, np.float32))
        expected = "f.npz: all 30 frames have NaN/Inf"
    with pytest.raises(ValueError, match=expected):
        load_poses(tmp_path / "f.npz")
    code, _, stderr = _train(_gaussian_args(tmp_path / "out", tmp_path / "f.npz"), capsys)
    assert code == 2 and expected in stderr and "accepted keys" not in stderr, stderr
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "f.npz").write_bytes((tmp_path / "f.npz").read_bytes())
    with pytest.raises(ValueError, match=r"no usable frames in .*folder.*f\.npz \((holds 0|all 30)") as info:
        load_poses(folder)
    assert "accepted keys" not in str(info.value)


@pytest.mark.parametrize("rate", ["fast", [120.0, 60.0], 0.0, -30.0, math.nan])
def test_item7_a_bad_mocap_framerate_names_the_file_and_key(rate, tmp_path, capsys):
    np.savez(tmp_path / "f.npz", poses=np.zeros((40, 165), np.float32), mocap_framerate=rate)
    with pytest.raises(ValueError, match=r"f\.npz: expected .*mocap_framerate .*> 0"):
        load_poses(tmp_path / "f.npz", fps=30)
    code, _, stderr = _train(_gaussian_args(tmp_path / "out", tmp_path / "f.npz", extra=["--fps", "30"]), capsys)
    assert code == 2 and "f.npz: expected" in stderr and "mocap_framerate" in stderr, stderr


def test_item7_a_good_frame_rate_still_subsamples(tmp_path):
    np.savez(tmp_path / "f.npz", poses=np.zeros((40, 165), np.float32), mocap_framerate=np.array([120]))
    assert len(load_poses(tmp_path / "f.npz", fps=30)) == 10


@pytest.mark.parametrize("fps", ["30", True, [30]])
def test_item23_a_non_numeric_fps_is_a_type_error_naming_fps(fps, tmp_path):
    _body(tmp_path / "a.npz")
    with pytest.raises(TypeError, match="expected fps to be a number"):
        load_poses(tmp_path / "a.npz", fps=fps)
    with pytest.raises(ValueError, match="expected a finite fps > 0"):
        load_poses(tmp_path / "a.npz", fps=math.inf)


# ---------------------------------------------------------------------------- 8, 20, 21: posepriors-eval
def _no_evaluation(monkeypatch) -> None:
    def must_not_run(*args, **kwargs):
        raise AssertionError("the evaluation ran before the output paths were checked")

    monkeypatch.setattr(evaluate, "evaluate", must_not_run)


def test_item8_json_pointing_at_a_folder_fails_before_the_evaluation(body_model, tmp_path, capsys, monkeypatch):
    _no_evaluation(monkeypatch)
    data = _body(tmp_path / "a.npz")
    code, stdout, stderr = _eval([body_model, "--data", data, "--json", tmp_path], capsys)
    assert code == 2 and "--json" in stderr and "expected a file name, got an existing folder" in stderr
    assert "| model |" not in stdout
    (tmp_path / "file.txt").write_text("x")
    code, _, stderr = _eval([body_model, "--data", data, "--plots", tmp_path / "file.txt"], capsys)
    assert code == 2 and "--plots" in stderr and "expected a folder for the plots" in stderr
    code, _, stderr = _eval([body_model, "--data", data, "--markdown", tmp_path / "file.txt" / "t.md"], capsys)
    assert code == 2 and "is a file, not a folder" in stderr


def test_item8_markdown_in_an_unwritable_folder_fails_before_the_evaluation(body_model, tmp_path, capsys, monkeypatch):
    data = _body(tmp_path / "a.npz")
    with _read_only_folder(tmp_path / "ro") as folder:
        _no_evaluation(monkeypatch)
        for target in (folder / "t.md", folder / "sub" / "t.md"):
            code, _, stderr = _eval([body_model, "--data", data, "--markdown", target], capsys)
            assert code == 2 and "Traceback" not in stderr and "is not writable" in stderr, stderr


def test_item8_a_failed_write_is_an_error_not_a_traceback(body_model, tmp_path, capsys, monkeypatch):
    # let a bad path through the up-front check, so that the write itself fails
    monkeypatch.setattr(evaluate, "_output_problem", lambda path, folder: None, raising=False)
    args = [body_model, "--data", _body(tmp_path / "a.npz"), "--no_samples", "--no_denoise", "--no_completion"]
    code, stdout, stderr = _eval([*args, "--json", tmp_path], capsys)
    assert code == 2 and "could not write the results" in stderr and "Traceback" not in stderr
    assert "| model |" in stdout  # the table came first


def test_item20_eval_with_nothing_to_evaluate_exits_2(body_model, tmp_path, capsys):
    code, _, stderr = _eval([body_model, "--data", _hands(tmp_path / "hands.npz")], capsys)
    assert code == 2 and "nothing was evaluated" in stderr and "gaussian_model on hands.npz" in stderr


def test_item21_by_names_a_label_key_of_the_wrong_length(body_model, tmp_path, capsys):
    poses = synthetic_poses(50, BODY, seed=0).numpy()
    np.savez(tmp_path / "l.npz", body_pose=poses, source=np.array(["x"] * 7))
    data = load_poses(tmp_path / "l.npz")
    assert "source" not in data.labels and "shape (7,), expected (50,)" in data.rejected_labels["source"]
    code, _, stderr = _eval([body_model, "--data", tmp_path / "l.npz", "--by", "source"], capsys)
    assert code == 2 and "'source' exists but was not taken as a label array" in stderr
    assert "l.npz: shape (7,), expected (50,)" in stderr
    with pytest.raises(ValueError, match=r"shape \(7,\), expected \(50,\)"):
        evaluate.group_by(data, "source")


def test_item21_a_label_key_missing_from_some_files_is_explained(tmp_path):
    poses = synthetic_poses(20, BODY, seed=0).numpy()
    np.savez(tmp_path / "a.npz", body_pose=poses, source=np.array(["x"] * 20))
    np.savez(tmp_path / "b.npz", body_pose=poses)
    data = load_poses(tmp_path)
    assert "only 1 of 2 files have it" in data.rejected_labels["source"]


# ---------------------------------------------------------------------------- 9: push_to_hub
def test_item9_a_failed_upload_keeps_the_model_and_exits_1(tmp_path, capsys, monkeypatch):
    from huggingface_hub.errors import OfflineModeIsEnabled

    def offline(prior, repo_id, **kwargs):
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")

    monkeypatch.setattr(posepriors.hub, "push_to_hub", offline)
    out = tmp_path / "out"
    args = _gaussian_args(out, _body(tmp_path / "a.npz"), extra=["--push_to_hub", "user/repo"])
    code, stdout, stderr = _train(args, capsys)
    assert code == 1 and "Traceback" not in stderr
    assert f"the model is kept in --out {out}" in stderr and "OfflineModeIsEnabled" in stderr
    assert "epoch   1" in stdout and posepriors.load(out).model_type == "gaussian"


def test_item9_offline_mode_is_refused_before_training(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    def never(prior, repo_id, **kwargs):
        raise AssertionError("push_to_hub was called")

    monkeypatch.setattr(posepriors.hub, "push_to_hub", never)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    args = _gaussian_args(tmp_path / "out", _body(tmp_path / "a.npz"), extra=["--push_to_hub", "user/repo"])
    code, stdout, stderr = _train(args, capsys)
    assert code == 2 and "HF_HUB_OFFLINE is set" in stderr and "epoch" not in stdout, stderr


# ---------------------------------------------------------------------------- 19: a file given twice
def test_item19_a_file_given_twice_is_refused(tmp_path, capsys):
    a = _body(tmp_path / "data" / "a.npz")
    cases = [
        (_gaussian_args(tmp_path / "o1", a, a), "in --data_dir", "trained on twice"),
        (_gaussian_args(tmp_path / "o2", a, extra=["--val_dir", a]), "and --val_dir", "validated on the frames"),
        (_gaussian_args(tmp_path / "o3", tmp_path / "data", a), "and --data_dir", "trained on twice"),
    ]
    for args, where, why in cases:
        code, stdout, stderr = _train(args, capsys)
        assert code == 2 and "expected every data file once, got" in stderr and "a.npz" in stderr, stderr
        assert where in stderr and why in stderr and "training" not in stdout
