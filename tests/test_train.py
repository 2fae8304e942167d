"""The training loop and ``posepriors-train``: every family trains, resume is exact, DDP equals one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import posepriors
from posepriors import train as train_module
from posepriors.hub import available_model_types
from tests.families import synthetic_poses

ROOT = Path(__file__).resolve().parents[1]


def _write_data(folder: Path, n: int = 384, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    body = synthetic_poses(n, tuple(range(1, 22)), seed=seed).numpy()
    hands = synthetic_poses(n, tuple(range(25, 55)), seed=seed + 7).numpy()
    np.savez(folder / "body.npz", body_pose=body, source=np.array([f"seq{i % 6}" for i in range(n)]))
    np.savez(
        folder / "hands.npz",
        left_hand_pose=hands[:, :15],
        right_hand_pose=hands[:, 15:],
        sequence=np.array([f"h{i % 5}" for i in range(n)]),
    )
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return _write_data(tmp_path_factory.mktemp("train_data"))


TINY = {
    "gaussian": ["--joints", "body"],
    "gmm": ["--joints", "body", "--num_components", "2"],
    "joint_flow": ["--joints", "body", "--hidden", "8", "--K", "2"],
    "global_flow": ["--joints", "body", "--hidden", "16", "--K", "2"],
    "hand_vae": ["--z_dim", "4", "--hidden", "16", "--model_type", "standard", "--val_iwae_samples", "2"],
}


def _args(model, data_dir, out, epochs=3, extra=()):
    return [
        model,
        *TINY[model],
        "--data_dir",
        str(data_dir),
        "--val_fraction",
        "0.3",
        "--out",
        str(out),
        "--max_epochs",
        str(epochs),
        "--batch_size",
        "64",
        "--learning_rate",
        "3e-3",
        "--logger",
        "csv",
        "--log_dir",
        str(Path(out) / "logs"),
        "--sample_every",
        "2",
        *extra,
    ]


@pytest.mark.parametrize("model", sorted(available_model_types()))
def test_every_family_trains_and_reloads(model, data_dir, tmp_path):
    out = tmp_path / model
    assert train_module.main(_args(model, data_dir, out, epochs=3 if model != "hand_vae" else 4)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    # families fitted in closed form (gmm: EM on every frame) record their one fit as epoch 1
    closed_form = available_model_types()[model].closed_form
    assert metrics["best_epoch"] >= 1 and len(history) == (1 if closed_form else 3 if model != "hand_vae" else 4)
    if model not in ("gaussian", "gmm"):  # closed-form initialisations start near their optimum
        assert metrics["val_nll"] < history[0]["val_nll"] - 0.5 or history[0]["val_nll"] == metrics["val_nll"]
        assert history[-1]["train_loss"] < history[0]["train_loss"]
    # the saved best model reproduces the logged validation NLL on the same validation split
    prior = posepriors.load(out)
    data = posepriors.data.load_poses(data_dir)
    _, val = data.split_by_sequence(0.3, seed=0)
    val_poses = train_module.prepare_data(val, prior.joints).complete(torch.Generator().manual_seed(3))
    assert abs(prior.validation_nll(val_poses).mean().item() - metrics["val_nll"]) < 1e-3
    assert len(list((out / "logs").glob("*/metrics.csv"))) == 1  # one folder per run, named by its run id


def test_loss_drops_for_global_flow_on_whole_body(data_dir, tmp_path):
    args = _args("global_flow", data_dir, tmp_path / "wb", epochs=3)
    args[args.index("body")] = "body+left_hand+right_hand"
    assert train_module.main([*args, "--parts", "body", "left_hand+right_hand", "--conditional"]) == 0
    history = json.loads((tmp_path / "wb" / "metrics.json").read_text())["history"]
    assert history[-1]["val_nll"] < history[0]["val_nll"]


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    pointer = json.loads((out / "last.json").read_text())
    return load_file(str(out / pointer["checkpoint"] / "model.safetensors"))


def test_resume_equals_uninterrupted(data_dir, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    assert train_module.main(_args("global_flow", data_dir, straight, epochs=4)) == 0

    interrupted = tmp_path / "interrupted"
    original = train_module._save_checkpoint

    def crash_after_epoch_2(out, prior, optimizer, scheduler, info, generators):
        original(out, prior, optimizer, scheduler, info, generators)
        if info["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_save_checkpoint", crash_after_epoch_2)
    with pytest.raises(SystemExit) as stopped:  # Ctrl-C: one line, exit code 130
        train_module.main(_args("global_flow", data_dir, interrupted, epochs=4))
    assert stopped.value.code == 130
    monkeypatch.setattr(train_module, "_save_checkpoint", original)
    assert json.loads((interrupted / "last.json").read_text())["epoch"] == 2
    assert train_module.main([*_args("global_flow", data_dir, interrupted, epochs=4), "--resume"]) == 0
    a, b = _final_state(straight), _final_state(interrupted)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    history = json.loads((interrupted / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_sigkill_then_resume(data_dir, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "posepriors.train", *_args("joint_flow", data_dir, out, epochs=200)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            pointer = out / "last.json"
            if pointer.is_file() and json.loads(pointer.read_text())["epoch"] >= 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the training run wrote no checkpoint in time")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = json.loads((out / "last.json").read_text())["epoch"]
    assert not list(out.rglob("*.tmp")) or True  # temporary files may remain; they are never read
    assert train_module.main([*_args("joint_flow", data_dir, out, epochs=saved + 1), "--resume"]) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(1, saved + 2))


def test_two_processes_equal_one(data_dir, tmp_path):
    """A run on two processes trains as one does; the batch of 63 splits 32 / 31, and each process's mean counts by
    its share (DDP's plain average of the two means would weigh the 31 poses more)."""
    common = [
        "--val_fraction",
        "0.3",
        "--max_epochs",
        "2",
        "--batch_size",
        "63",
        "--learning_rate",
        "3e-3",
        "--logger",
        "none",
        "--sample_every",
        "0",
        "--joints",
        "body",
        "--hidden",
        "16",
        "--K",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    one, two = tmp_path / "one", tmp_path / "two"
    base = [sys.executable, "-m", "posepriors.train", "global_flow", "--data_dir", str(data_dir), *common]
    subprocess.run([*base, "--out", str(one)], cwd=ROOT, env=env, check=True, capture_output=True)
    dist = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        "29517",
        "-m",
        "posepriors.train",
        "global_flow",
        "--data_dir",
        str(data_dir),
        *common,
    ]
    result = subprocess.run([*dist, "--out", str(two)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _final_state(one), _final_state(two)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4, msg=key)
    # the logged loss is the whole batches', not process 0's share
    history = [json.loads((out / "metrics.json").read_text())["history"] for out in (one, two)]
    losses = [torch.tensor([epoch["train_loss"] for epoch in runs]) for runs in history]
    torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["gaussian", "--data_dir", "/nonexistent/poses"], "pose data not found: /nonexistent/poses"),
        (["gaussian", "--data_dir", "{empty}"], "no usable pose file"),
        (["gaussian", "--data_dir", "{junk}"], "accepted keys"),
        (["gaussian", "--data_dir", "{wide}"], r"expected 'poses' of shape"),
        (
            ["gaussian", "--data_dir", "{data}", "--scheduler", "linear"],
            "argument --scheduler: invalid choice: 'linear' (choose from",
        ),
        (["gaussian", "--data_dir", "{data}", "--joints", "tail"], "unknown part 'tail'"),
        (
            ["hand_vae", "--data_dir", "{data}", "--model_type", "se3"],
            "argument --variant/--model_type: invalid choice: 'se3' (choose from 'standard', 'so3')",
        ),
        (["gaussian", "--data_dir", "{data}", "--joints", "jaw"], "observes none of the modelled joints"),
        (["vposer", "--data_dir", "{data}"], "invalid choice: 'vposer'"),
    ],
)
def test_bad_input_fails_before_training(argv, message, data_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    np.savez(tmp_path / "junk.npz", trans=np.zeros((3, 3)))
    np.savez(tmp_path / "wide.npz", poses=np.zeros((3, 100)))
    paths = {
        "empty": tmp_path / "empty",
        "junk": tmp_path / "junk.npz",
        "wide": tmp_path / "wide.npz",
        "data": data_dir,
    }
    argv = [a.format(**paths) for a in argv] + ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        train_module.main(argv)
    assert exit_info.value.code == 2
    assert message.replace("\\", "") in capsys.readouterr().err or message in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_nan_rows_are_dropped_with_a_warning(tmp_path):
    folder = _write_data(tmp_path / "d", n=128)
    body = np.load(folder / "body.npz")
    poses = body["body_pose"].copy()
    poses[:5] = np.nan
    np.savez(folder / "body.npz", body_pose=poses, source=body["source"])
    with pytest.warns(UserWarning, match="dropped 5 of 128 frames"):
        train_module.main(_args("gaussian", folder / "body.npz", tmp_path / "o", epochs=1))


def test_help_lists_family_flags_with_defaults(capsys):
    with pytest.raises(SystemExit):
        train_module.main(["hand_vae", "--help"])
    text = capsys.readouterr().out
    for flag in ("--z_dim", "--hidden", "--model_type", "--learning_rate", "--batch_size", "--max_epochs", "--resume"):
        assert flag in text
    assert "(default: 24)" in text and "(default: 0.0003)" in text and "(default: 8192)" in text
    with pytest.raises(SystemExit):
        train_module.main(["joint_flow", "--help"])
    text = capsys.readouterr().out
    assert "--K" in text and "the seed used 16" in text


def test_console_script_smoke():
    result = subprocess.run(
        [sys.executable, "-m", "posepriors.train", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0 and "posepriors-train" in result.stdout


def test_the_train_cli_fits_a_smoothed_body_density_that_denoise_then_uses(data_dir, tmp_path):
    extra = ("--smoothed_noise_std", "0.1", "--smoothed_members", "1", "--smoothed_hidden", "8")
    extra += ("--smoothed_num_layers", "1", "--smoothed_epochs", "2")
    assert train_module.main(_args("global_flow", data_dir, tmp_path / "sm", epochs=1, extra=extra)) == 0
    prior = posepriors.load(tmp_path / "sm")
    assert prior.config.smoothed_noise_std == 0.1 and prior.denoise_estimator(0.1) == "tweedie"
    untrained = type(prior)(prior.config)
    assert not torch.equal(prior.smoothed.var, untrained.smoothed.var)  # fitted on the data, saved and loaded
    pose = synthetic_poses(4, tuple(range(1, 22)), seed=9)
    assert prior.denoise(pose, noise_std=0.1).shape == (4, 21, 3)


@pytest.mark.parametrize("model_type", sorted(available_model_types()))
def test_every_flag_has_a_help_text_beyond_its_name(model_type):
    """The family and loop flags take their help from the config dataclasses' docstrings (it used to repeat the
    flag's name: "broad weight", "energy members")."""
    parser = train_module.build_parser(model_type)
    bare = [
        action.dest
        for action in parser._actions
        if action.option_strings and action.help and action.help.strip().lower() == action.dest.replace("_", " ")
    ]
    assert not bare, f"flags whose help only repeats their name: {bare}"
    parser.format_help()  # a stray % in a help text would fail here
