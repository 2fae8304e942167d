"""Issue 12, training side: no lost runs, no silent wrong numbers, clear errors from ``posepriors-train``.

Each test names the case of the issue it covers. Data are small synthetic files made in ``tmp_path``; the tests
that read ``../shared/data`` use the ``shared_data`` fixture and skip without it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import posepriors
from posepriors import train as train_module
from posepriors.hub import available_model_types
from posepriors.priors.gaussian import GaussianPrior
from posepriors.utils import LOCK_NAME, FolderLockedError, atomic_write, folder_lock, resolve_device
from tests.families import synthetic_poses
from tests.test_train import _args, _write_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return _write_data(tmp_path_factory.mktemp("reliability_data"), n=256)


def _run(argv, capsys) -> tuple[int, str, str]:
    """``main(argv)`` -> (exit code, stdout, stderr); a SystemExit counts as its code."""
    try:
        code = train_module.main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _quick(model, data, out, epochs=2, extra=()):
    """:func:`_args` with the CSV logger inside ``out`` replaced by no logger (fewer files to reason about)."""
    args = _args(model, data, out, epochs=epochs, extra=extra)
    args[args.index("--logger") + 1] = "none"
    return args


# ---------------------------------------------------------------------------- case 2: split, non-finite loss
@pytest.mark.parametrize("where", ["loss", "val_nll"])
def test_non_finite_numbers_stop_the_run_and_keep_the_last_good_checkpoint(
    where, data_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    if where == "loss":
        calls = {"n": 0}
        original = GaussianPrior.training_loss

        def loss_turns_nan(self, pose, generator=None):
            calls["n"] += 1
            loss = original(self, pose, generator)
            return loss * float("nan") if calls["n"] > 3 else loss  # 3 batches per epoch: NaN in epoch 2

        monkeypatch.setattr(GaussianPrior, "training_loss", loss_turns_nan)
    else:
        original = train_module._validate
        epochs = {"n": 0}

        def val_turns_inf(prior, val, batch_size):
            metrics = original(prior, val, batch_size)
            epochs["n"] += 1
            return {**metrics, "val_nll": math.inf} if epochs["n"] == 2 else metrics

        monkeypatch.setattr(train_module, "_validate", val_turns_inf)
    code, stdout, stderr = _run(_quick("gaussian", data_dir / "body.npz", out, epochs=3), capsys)
    assert code == 1 and "Traceback" not in stderr
    expected = "the training loss became nan at epoch 2" if where == "loss" else "the validation NLL became inf"
    assert expected in stderr and "the checkpoint of epoch 1" in stderr
    assert "best epoch" not in stdout  # no summary of a run that failed
    assert json.loads((out / "last.json").read_text())["epoch"] == 1
    prior = posepriors.load(out)
    assert all(torch.isfinite(p).all() for p in prior.parameters())
    assert not (out / LOCK_NAME).exists()


@pytest.mark.shared_data
def test_shared_body_train_trains_on_most_poses(shared_data, tmp_path, capsys):
    # issue 12, case 2: `posepriors-train global_flow --data_dir body_train.npz` trained on 74 poses
    args = [
        "global_flow",
        "--data_dir",
        str(shared_data / "body_train.npz"),
        "--out",
        str(tmp_path / "gf"),
        "--hidden",
        "16",
        "--K",
        "2",
        "--max_epochs",
        "1",
        "--logger",
        "none",
        "--sample_every",
        "0",
    ]
    with pytest.warns(UserWarning, match="amass_train_iid"):
        code, stdout, _ = _run(args, capsys)
    assert code == 0
    metrics = json.loads((tmp_path / "gf" / "metrics.json").read_text())
    assert metrics["train_poses"] > 8000 and metrics["val_poses"] <= 1.25 * 0.1 * 9588
    assert math.isfinite(metrics["val_nll"])


# ---------------------------------------------------------------------------- case 3: default joints
def _write_part(folder: Path, part: str, n: int = 160) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if part == "body":
        np.savez(folder / "body.npz", body_pose=synthetic_poses(n, tuple(range(1, 22)), seed=1).numpy())
        return folder / "body.npz"
    hands = synthetic_poses(n, tuple(range(25, 55)), seed=2).numpy()
    if part == "right_hand":
        np.savez(folder / "right.npz", right_hand_pose=hands[:, 15:])
        return folder / "right.npz"
    np.savez(folder / "hands.npz", left_hand_pose=hands[:, :15], right_hand_pose=hands[:, 15:])
    return folder / "hands.npz"


DEFAULT_JOINT_CASES = {
    # family: (data part, flags without --joints, expected part spec)
    "gaussian": ("hands", [], "left_hand+right_hand"),
    "joint_flow": ("body", ["--hidden", "8", "--K", "2"], "body"),
    "global_flow": ("hands", ["--hidden", "16", "--K", "2"], "left_hand+right_hand"),
    "hand_vae": ("right_hand", ["--z_dim", "4", "--hidden", "16", "--val_iwae_samples", "2"], "right_hand"),
    "gmm": ("hands", ["--num_components", "2"], "left_hand+right_hand"),
}


@pytest.mark.parametrize("model", sorted(DEFAULT_JOINT_CASES))
def test_joints_default_to_what_the_data_observes(model, tmp_path, capsys):
    # issue 12, case 3: joint_flow on body data and gaussian on hand data stopped with "observes none of the
    # modelled joints"
    assert set(DEFAULT_JOINT_CASES) == set(available_model_types())
    part, flags, expected = DEFAULT_JOINT_CASES[model]
    data = _write_part(tmp_path / "data", part)
    args = [model, *flags, "--data_dir", str(data), "--val_fraction", "0.25", "--out", str(tmp_path / "o")]
    args += ["--max_epochs", "1", "--batch_size", "64", "--logger", "none", "--sample_every", "0"]
    code, stdout, stderr = _run(args, capsys)
    assert code == 0, stderr
    assert f"joints: {expected} (" in stdout  # the log says which joints, and why
    prior = posepriors.load(tmp_path / "o")
    assert prior.joints == posepriors.skeleton.resolve_joints(expected)


def test_joints_default_to_the_union_of_parts_and_explicit_joints_still_win(data_dir, tmp_path, capsys):
    args = _quick("global_flow", data_dir, tmp_path / "p", epochs=1)
    i = args.index("--joints")
    del args[i : i + 2]
    code, stdout, stderr = _run([*args, "--parts", "body", "left_hand+right_hand"], capsys)
    assert code == 0, stderr
    assert "joints: body+left_hand+right_hand (51 joints, the union of --parts)" in stdout
    code, _, stderr = _run(
        ["gaussian", "--data_dir", str(data_dir), "--joints", "jaw", "--out", str(tmp_path / "j")], capsys
    )
    assert code == 2 and "observes none of the modelled joints" in stderr


@pytest.mark.shared_data
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("model", "file", "flags", "expected"),
    [
        ("joint_flow", "body_train.npz", ["--hidden", "8", "--K", "2", "--batch_size", "1024"], "body"),
        ("gaussian", "hands_val.npz", ["--batch_size", "4096"], "left_hand+right_hand"),
    ],
)
def test_shared_files_train_without_joints(model, file, flags, expected, shared_data, tmp_path, capsys):
    # issue 12, case 3, the commands of the report (hands_val stands in for the 8x larger hands_train)
    args = [model, "--data_dir", str(shared_data / file), *flags, "--out", str(tmp_path / "o"), "--max_epochs", "1"]
    code, stdout, stderr = _run([*args, "--logger", "none", "--sample_every", "0"], capsys)
    assert code == 0, stderr
    assert f"joints: {expected} (" in stdout


# ---------------------------------------------------------------------------- case 4: existing --out
def test_existing_out_is_refused_without_resume_or_overwrite(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(_quick("gaussian", data_dir, out), capsys)[0] == 0
    before = {name: (out / name).read_bytes() for name in ("model.safetensors", "metrics.json", "last.json")}
    code, stdout, stderr = _run(_quick("joint_flow", data_dir, out), capsys)  # even another family
    assert code == 2 and "Traceback" not in stderr and "epoch" not in stdout
    assert "expected a new or empty --out folder" in stderr and "--resume" in stderr and "--overwrite" in stderr
    assert {name: (out / name).read_bytes() for name in before} == before
    (out / "notes.txt").write_text("mine")
    code, _, stderr = _run([*_quick("global_flow", data_dir, out, epochs=1), "--overwrite"], capsys)
    assert code == 0, stderr
    assert posepriors.load(out).model_type == "global_flow" and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "last.json").read_text())["epoch"] == 1  # the old run's checkpoints are gone
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch_0001"]
    code, _, stderr = _run([*_quick("global_flow", data_dir, out), "--overwrite", "--resume"], capsys)
    assert code == 2 and "got both" in stderr
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.txt").write_text("not a run")
    code, _, stderr = _run(_quick("gaussian", data_dir, tmp_path / "other"), capsys)
    assert code == 2 and "holding ['data.txt']" in stderr


def test_fit_refuses_an_out_that_holds_a_run(data_dir, tmp_path, capsys):
    assert _run(_quick("gaussian", data_dir, tmp_path / "run", epochs=1), capsys)[0] == 0
    data = posepriors.data.load_poses(data_dir)
    train, val = data.split_by_sequence(0.3)
    prior = GaussianPrior()
    train_data = train_module.prepare_data(train, prior.joints)
    val_data = train_module.prepare_data(val, prior.joints, "validation")
    cfg = train_module.TrainConfig(max_epochs=1, logger="none", progress=False)
    with pytest.raises(ValueError, match="expected a new or empty --out folder"):
        train_module.fit(prior, train_data, val_data, cfg, out=tmp_path / "run")
    result = train_module.fit(prior, train_data, val_data, cfg, out=tmp_path / "run", overwrite=True)
    assert result.epochs == 1


def test_a_batch_smaller_than_the_process_count_is_a_clear_error(data_dir, monkeypatch):
    """Under torchrun with --batch_size 1 on 2 processes, process 1 got an empty share, a NaN loss and a message
    about the learning rate; now every process refuses the batch size before training."""
    data = posepriors.data.load_poses(data_dir)
    train, val = data.split_by_sequence(0.3)
    prior = GaussianPrior()
    train_data = train_module.prepare_data(train, prior.joints)
    val_data = train_module.prepare_data(val, prior.joints, "validation")
    monkeypatch.setattr(train_module, "_dist_info", lambda: (1, 2))  # process 1 of 2, without a process group
    cfg = train_module.TrainConfig(max_epochs=1, batch_size=1, logger="none", progress=False)
    with pytest.raises(ValueError, match=r"at least one pose per process \(2 processes\), got --batch_size 1 on"):
        train_module.fit(prior, train_data, val_data, cfg)


@pytest.mark.parametrize("found", ["nothing", "a bare folder"])
@pytest.mark.parametrize("logger", ["wandb", "tensorboard"])
def test_a_logger_whose_package_is_missing_is_refused_before_any_work(
    logger, found, data_dir, tmp_path, capsys, monkeypatch
):
    """It used to raise ImportError with a traceback (exit 1) once the data were read and the model initialised. A
    bare folder of the package's name (wandb's own ./wandb run folder) is a namespace package, not the package."""
    import importlib.machinery
    import importlib.util

    find_spec = importlib.util.find_spec
    stand_in = None if found == "nothing" else importlib.machinery.ModuleSpec(logger, None, is_package=True)
    spec = lambda name, *a: stand_in if name == logger else find_spec(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", spec)
    monkeypatch.setattr(train_module, "load_poses", lambda *a, **k: pytest.fail("the data were read"))
    out = tmp_path / "run"
    argv = _quick("gaussian", data_dir, out)
    argv[argv.index("--logger") + 1] = logger
    code, _, stderr = _run(argv, capsys)
    assert code == 2 and "Traceback" not in stderr
    assert f"expected the package {logger} for --logger {logger}, got none installed: pip install" in stderr
    assert not out.exists()


def test_a_conditioned_flow_is_refused_before_any_work(data_dir, tmp_path, capsys, monkeypatch):
    """posepriors-train has no contexts to give a conditioned global_flow: it used to fail after reading the data and
    initialising, asking for a context= no command line can pass."""
    from posepriors.priors.global_flow import GlobalFlowConfig, GlobalFlowPrior

    monkeypatch.setattr(train_module, "load_poses", lambda *a, **k: pytest.fail("the data were read"))
    out = tmp_path / "run"
    argv = [*_quick("global_flow", data_dir, out), "--use_conditioning", "--context_features", "4"]
    code, _, stderr = _run(argv, capsys)
    assert code == 2 and "Traceback" not in stderr
    assert "expected no --use_conditioning: posepriors-train reads no contexts from the data files" in stderr
    assert not out.exists()
    prior = GlobalFlowPrior(GlobalFlowConfig(use_conditioning=True, context_features=4, hidden=8, num_layers=1))
    with pytest.raises(ValueError, match="expected an unconditioned prior, got a global_flow conditioned on 4"):
        train_module.fit(prior, None, None, train_module.TrainConfig())
    with pytest.raises(ValueError, match="expected context_features=0 without use_conditioning, got 4"):
        GlobalFlowConfig(context_features=4)


# ---------------------------------------------------------------------------- case 5: lock
@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _write_lock(folder: Path, pid: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": time.time()}))
    return lock


def test_a_second_run_on_a_locked_out_fails_at_once(data_dir, tmp_path, capsys, live_pid):
    out = tmp_path / "run"
    lock = _write_lock(out, live_pid)
    tic = time.perf_counter()
    code, stdout, stderr = _run(_quick("gaussian", data_dir, out), capsys)
    assert code == 2 and "Traceback" not in stderr and "training" not in stdout
    assert f"is in use by another run (pid {live_pid}" in stderr and str(lock) in stderr
    assert time.perf_counter() - tic < 5  # before any data is read
    assert lock.is_file() and json.loads(lock.read_text())["pid"] == live_pid  # the other run's lock stays
    assert _run([*_quick("gaussian", data_dir, out), "--overwrite"], capsys)[0] == 2  # --overwrite does not break it


def test_a_stale_lock_is_taken_over_and_the_lock_is_removed_at_exit(data_dir, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    _write_lock(out, dead.pid)
    code, _, stderr = _run(_quick("gaussian", data_dir, out, epochs=1), capsys)
    assert code == 0, stderr
    assert not (out / LOCK_NAME).exists() and (out / "model.safetensors").is_file()


def test_a_real_concurrent_run_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "posepriors.train", *_quick("joint_flow", data_dir, out, epochs=500)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (out / LOCK_NAME).is_file() and time.time() < deadline:
            time.sleep(0.1)
        assert (out / LOCK_NAME).is_file(), "the first run took no lock"
        code, _, stderr = _run([*_quick("joint_flow", data_dir, out), "--resume"], capsys)
        assert code == 2 and f"pid {proc.pid}" in stderr
    finally:
        proc.kill()
        proc.wait()


def test_folder_lock_nests_in_one_process_and_refuses_others(tmp_path, live_pid):
    with folder_lock(tmp_path / "a") as lock:
        with folder_lock(tmp_path / "a"):
            assert lock.is_file()
        assert lock.is_file()  # the inner block does not release the outer one
    assert not lock.exists()
    _write_lock(tmp_path / "b", live_pid)
    with pytest.raises(FolderLockedError, match="in use by another run"), folder_lock(tmp_path / "b"):
        pass
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / LOCK_NAME).write_text("")  # torn lock file, recent: treated as held
    with pytest.raises(FolderLockedError), folder_lock(tmp_path / "c"):
        pass
    old = time.time() - 3600
    os.utime(tmp_path / "c" / LOCK_NAME, (old, old))  # torn and old: stale
    with folder_lock(tmp_path / "c"):
        pass


# ---------------------------------------------------------------------------- case 6: resume with changed flags
def test_resume_refuses_changed_model_and_training_flags(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(_quick("gaussian", data_dir, out, epochs=1), capsys)[0] == 0
    model_before = (out / "model.safetensors").read_bytes()
    for flags, named in [
        (["--min_std", "0.5"], "--min_std 0.5 (the run used 0.01)"),
        (["--learning_rate", "0.1"], "--learning_rate 0.1 (the run used 0.003)"),
        (["--joints", "body+left_hand+right_hand"], "--joints 'body+left_hand+right_hand'"),
        (["--val_fraction", "0.5"], "--val_fraction 0.5 (the run used 0.3)"),
    ]:
        code, stdout, stderr = _run([*_quick("gaussian", data_dir, out, epochs=3), "--resume", *flags], capsys)
        assert code == 2 and named in stderr and "only --max_epochs" in stderr, stderr
        assert "epoch" not in stdout
    assert (out / "model.safetensors").read_bytes() == model_before
    code, _, stderr = _run([*_quick("joint_flow", data_dir, out, epochs=3), "--resume"], capsys)
    assert code == 2 and "expected a joint_flow run" in stderr and "got a gaussian checkpoint" in stderr


def test_resume_uses_the_runs_settings_and_records_what_was_used(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    first = [*_quick("gaussian", data_dir, out, epochs=2), "--scheduler", "cosine", "--min_std", "0.02"]
    assert _run(first, capsys)[0] == 0
    # only the data and the new length: batch size, learning rate, schedule, split and model flags come from the run
    resume = ["gaussian", "--data_dir", str(data_dir), "--out", str(out), "--resume", "--max_epochs", "4"]
    code, _, stderr = _run([*resume, "--logger", "none"], capsys)
    assert code == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    used = metrics["train_config"]
    assert (used["batch_size"], used["learning_rate"], used["scheduler"], used["max_epochs"]) == (64, 3e-3, "cosine", 4)
    assert metrics["model_config"]["min_std"] == 0.02 and metrics["data"]["val_fraction"] == 0.3
    assert metrics["command"].endswith("--min_std 0.02")  # the command that started the run
    assert metrics["resumes"] == [
        {
            "from_epoch": 2,
            "command": f"posepriors-train gaussian --data_dir {data_dir} --out {out} --resume --max_epochs 4 "
            "--logger none",
            "changed": {"max_epochs": [2, 4]},
        }
    ]
    # the cosine schedule is rebuilt for 4 epochs: the rate each resumed epoch trains at is the 4-epoch one (it used
    # to restart upward past the old end); the history logs the rate an epoch trained at, not the next epoch's
    lrs = [h["lr"] for h in metrics["history"]]
    for epoch, lr in enumerate(lrs, start=1):
        old_length = 2 if epoch <= 2 else 4
        assert lr == pytest.approx(3e-3 * (1 + math.cos(math.pi * (epoch - 1) / old_length)) / 2, abs=1e-12)
    assert lrs[0] == 3e-3 and lrs[3] < lrs[2]


# ---------------------------------------------------------------------------- case 10: CSV logs
def _csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def test_csv_logs_one_file_per_run_with_a_header_for_every_column(data_dir, tmp_path, capsys):
    logs = tmp_path / "logs"
    for name in ("a", "b"):
        args = [*_args("gaussian", data_dir, tmp_path / name, epochs=3)]
        args[args.index("--log_dir") + 1] = str(logs)  # both runs share one log folder
        assert _run(args, capsys)[0] == 0
    files = sorted(logs.glob("*/metrics.csv"))
    assert len(files) == 2
    run_ids = {json.loads((tmp_path / name / "metrics.json").read_text())["run_id"] for name in ("a", "b")}
    assert {f.parent.name for f in files} == run_ids
    for path in files:
        header, rows = _csv_rows(path)
        assert [int(r[0]) for r in rows] == [1, 2, 3]
        assert all(len(r) == len(header) for r in rows)
        assert "sample_beyond_range" in header  # first logged in epoch 2 (--sample_every 2): its own column
        column = header.index("sample_beyond_range")
        assert rows[0][column] == "" and float(rows[1][column]) >= 0
        assert float(rows[0][header.index("val_nll")]) > 0  # no value shifted under another header


def test_a_resumed_run_continues_its_csv_without_repeating_epochs(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    original = train_module._save_checkpoint

    def crash_before_checkpoint_2(out, prior, optimizer, scheduler, info, generators):
        if info["epoch"] == 2:  # epoch 2 is logged, but its checkpoint is never written
            raise KeyboardInterrupt
        original(out, prior, optimizer, scheduler, info, generators)

    monkeypatch.setattr(train_module, "_save_checkpoint", crash_before_checkpoint_2)
    assert _run(_args("gaussian", data_dir, out, epochs=3), capsys)[0] == 130  # Ctrl-C
    monkeypatch.setattr(train_module, "_save_checkpoint", original)
    assert not (out / LOCK_NAME).exists()  # released on the way out
    assert _run([*_args("gaussian", data_dir, out, epochs=3), "--resume"], capsys)[0] == 0
    (path,) = (out / "logs").glob("*/metrics.csv")
    header, rows = _csv_rows(path)
    assert [int(r[0]) for r in rows] == [1, 2, 3] and all(len(r) == len(header) for r in rows)


# ---------------------------------------------------------------------------- case 13: corrupt file
def test_corrupt_npz_is_named_or_skipped(data_dir, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "body.npz").write_bytes((data_dir / "body.npz").read_bytes())
    np.savez(folder / "zz_broken.npz", body_pose=np.ones((50, 21, 3), np.float32))
    raw = bytearray((folder / "zz_broken.npz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the array data: the zip member fails its CRC check
    (folder / "zz_broken.npz").write_bytes(bytes(raw))
    code, _, stderr = _run(_quick("gaussian", folder / "zz_broken.npz", tmp_path / "o1"), capsys)
    assert code == 2 and "Traceback" not in stderr
    assert "zz_broken.npz: corrupt .npz, cannot read 'body_pose' (BadZipFile: Bad CRC-32" in stderr
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable .*zz_broken\.npz"):
        code, _, stderr = _run(_quick("gaussian", folder, tmp_path / "o2", epochs=1), capsys)
    assert code == 0, stderr


# ---------------------------------------------------------------------------- case 15: smaller ones
def _read_only_folder(path: Path) -> contextlib.AbstractContextManager:
    """``path`` made read-only (chmod; for root, which ignores modes, the immutable attribute); skips if neither."""
    path.mkdir()

    @contextlib.contextmanager
    def manager():
        path.chmod(0o555)
        immutable = False
        probe = path / "probe"
        try:
            probe.touch()
        except OSError:
            pass
        else:
            probe.unlink()
            immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
            if not immutable:
                path.chmod(0o755)
                pytest.skip("cannot make a read-only folder here")
        try:
            yield path
        finally:
            if immutable:
                subprocess.run(["chattr", "-i", str(path)], check=True)
            path.chmod(0o755)

    return manager()


def test_read_only_out_fails_before_training(data_dir, tmp_path, capsys):
    with _read_only_folder(tmp_path / "ro") as folder:
        for out in (folder, folder / "sub"):
            code, stdout, stderr = _run(_quick("gaussian", data_dir, out), capsys)
            assert code == 2 and "Traceback" not in stderr, stderr
            assert f"expected a writable --out folder, got {out}" in stderr
            assert "epoch" not in stdout and "training" not in stdout


def test_read_only_log_dir_fails_before_training(data_dir, tmp_path, capsys):
    with _read_only_folder(tmp_path / "ro") as folder:
        args = _args("gaussian", data_dir, tmp_path / "o", epochs=1)
        args[args.index("--log_dir") + 1] = str(folder)
        code, stdout, stderr = _run(args, capsys)
        assert code == 1 and "Traceback" not in stderr and "could not write the run's files" in stderr
        assert "epoch   1" not in stdout


def test_one_training_pose_is_a_clear_error(tmp_path, capsys):
    np.savez(tmp_path / "one.npz", body_pose=np.zeros((1, 21, 3), np.float32))
    np.savez(tmp_path / "val.npz", body_pose=np.zeros((5, 21, 3), np.float32))
    argv = ["gaussian", "--data_dir", str(tmp_path / "one.npz"), "--out", str(tmp_path / "a" / "deeper")]
    code, _, stderr = _run(argv, capsys)
    assert code == 2 and "expected at least 2 frames to split into training and validation, got 1" in stderr
    argv = ["gaussian", "--data_dir", str(tmp_path / "one.npz"), "--val_dir", str(tmp_path / "val.npz")]
    code, _, stderr = _run([*argv, "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "expected at least 2 training poses, got 1" in stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # no empty folder left behind


def test_resume_without_a_checkpoint_is_a_clear_error(data_dir, tmp_path, capsys):
    for out in (tmp_path / "missing", tmp_path):
        code, _, stderr = _run([*_quick("gaussian", data_dir, out), "--resume"], capsys)
        assert code == 2 and "Traceback" not in stderr
        assert f"--resume: expected a checkpoint in {out} (last.json" in stderr and "start without --resume" in stderr


def test_a_run_that_stopped_early_is_not_trained_further_by_resume(data_dir, tmp_path, capsys, monkeypatch):
    real, calls = train_module._validate, []

    def worse_after_the_first(*args, **kwargs):  # the validation NLL grows after epoch 1: patience 2 stops at 3
        metrics = real(*args, **kwargs)
        calls.append(1)
        return {**metrics, "val_nll": 10.0 + len(calls)}

    monkeypatch.setattr(train_module, "_validate", worse_after_the_first)
    out = tmp_path / "o"
    code, stdout, _ = _run(_quick("gaussian", data_dir, out, epochs=8, extra=("--patience", "2")), capsys)
    assert code == 0 and "early stop: no better validation NLL for 2 epochs" in stdout

    def epochs() -> list[int]:
        return [row["epoch"] for row in json.loads((out / "metrics.json").read_text())["history"]]

    assert epochs() == [1, 2, 3]
    code, stdout, _ = _run([*_quick("gaussian", data_dir, out, epochs=8), "--resume"], capsys)
    assert code == 0 and "early stop: the run stopped at epoch 3, 2 epochs after its best" in stdout
    assert epochs() == [1, 2, 3]  # nothing trained
    code, stdout, _ = _run([*_quick("gaussian", data_dir, out, epochs=8), "--resume", "--patience", "3"], capsys)
    assert code == 0 and epochs() == [1, 2, 3, 4]  # a larger patience goes on, and stops again


def test_ctrl_c_ends_in_one_line_and_amp_off_cuda_warns(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    with pytest.warns(UserWarning, match="--amp .* runs on CUDA only: ignored here"):
        assert _run([*_quick("gaussian", data_dir, tmp_path / "amp", epochs=1), "--amp"], capsys)[0] == 0
    assert _run(_quick("gaussian", data_dir, out, epochs=1), capsys)[0] == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "fit", interrupted)
    code, _, stderr = _run([*_quick("gaussian", data_dir, out, epochs=2), "--resume"], capsys)
    assert code == 130 and "Traceback" not in stderr
    assert f"interrupted; --out {out} keeps the last finished epoch: continue with --resume" in stderr
    code, _, stderr = _run(_quick("gaussian", data_dir, tmp_path / "new", epochs=2), capsys)
    assert code == 130 and "interrupted before the first epoch finished; nothing was kept" in stderr


def test_resume_of_a_closed_form_family_needs_a_finished_run_of_that_family(data_dir, tmp_path, capsys):
    """gmm's --resume refits; only into a folder that holds a gmm run, never over another family's or a stray one."""
    other, stray, gmm = tmp_path / "other", tmp_path / "stray", tmp_path / "gmm"
    assert _run(_quick("gaussian", data_dir, other, epochs=1), capsys)[0] == 0
    stray.mkdir()
    (stray / "readme").write_text("mine")
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    for out, says in (
        (other, f"--resume: expected a gmm run in {other}, got a gaussian run"),
        (stray, f"--resume: expected a finished gmm run in {stray} (its metrics.json), found none"),
        (tmp_path / "missing", "expected a finished gmm run"),
    ):
        code, _, stderr = _run([*_quick("gmm", data_dir, out, epochs=1), "--resume"], capsys)
        assert code == 2 and "Traceback" not in stderr and says in stderr
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before  # nothing written
    assert sorted(p.name for p in stray.iterdir()) == ["readme"]
    assert _run(_quick("gmm", data_dir, gmm, epochs=1), capsys)[0] == 0
    assert _run([*_quick("gmm", data_dir, gmm, epochs=1), "--resume"], capsys)[0] == 0  # its own run: refits


def test_resume_of_a_closed_form_family_takes_the_runs_settings_and_refuses_changes(data_dir, tmp_path, capsys):
    """gmm's --resume used to refit with the flags given (the default 8 components instead of the run's 2) and with
    whatever data came, replacing the model: it now resumes as a checkpointed run does."""
    out = tmp_path / "gmm"
    assert _run(_quick("gmm", data_dir, out, epochs=1), capsys)[0] == 0  # --num_components 2
    first = json.loads((out / "metrics.json").read_text())
    model = posepriors.load(out).state_dict()
    assert first["run_id"].startswith("gmm-")
    resume = ["gmm", "--data_dir", str(data_dir), "--out", str(out), "--resume", "--logger", "none"]
    code, _, stderr = _run(resume, capsys)  # the flags left out come from the run
    assert code == 0, stderr
    again = json.loads((out / "metrics.json").read_text())
    assert again["model_config"] == first["model_config"] and again["model_config"]["num_components"] == 2
    assert again["run_id"] == first["run_id"] and again["command"] == first["command"]
    assert [r["from_epoch"] for r in again["resumes"]] == [1]
    assert all(torch.equal(v, model[k]) for k, v in posepriors.load(out).state_dict().items())  # the same fit
    other = _write_data(tmp_path / "other_data", n=256, seed=5)  # the same sizes, other poses
    for argv, says in (
        ([*resume, "--num_components", "5"], "--num_components 5 (the run used 2)"),
        (["gmm", "--data_dir", str(other), "--out", str(out), "--resume"], "got other content with the same sizes"),
    ):
        code, _, stderr = _run(argv, capsys)
        assert code == 2 and "Traceback" not in stderr and says in stderr, stderr
    assert json.loads((out / "metrics.json").read_text()) == again  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_clear_error(data_dir, tmp_path, capsys):
    code, stdout, stderr = _run([*_quick("gaussian", data_dir, tmp_path / "o"), "--device", "cuda"], capsys)
    assert code == 2 and "Traceback" not in stderr and "training" not in stdout
    assert "expected an available device ('auto' or 'cpu' here), got 'cuda': CUDA is not available" in stderr
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_files_follow_the_umask(umask, data_dir, tmp_path, capsys):
    previous = os.umask(umask)
    try:
        with atomic_write(tmp_path / "file.txt", "w") as handle:
            handle.write("x")
        assert _run(_quick("gaussian", data_dir, tmp_path / "o", epochs=1), capsys)[0] == 0
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "file.txt").stat().st_mode) == expected
    for name in ("model.safetensors", "config.json", "metrics.json", "last.json"):
        assert stat.S_IMODE((tmp_path / "o" / name).stat().st_mode) == expected, name


def test_help_lists_the_allowed_values_of_choice_flags(capsys):
    with pytest.raises(SystemExit):
        train_module.main(["joint_flow", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for choices in ("{adam,adamw}", "{cosine,step,none}", "{tensorboard,csv,wandb,none}", "{affine,spline}"):
        assert choices in text, choices
    assert "{lu,permutation,none}" in text and "{6d,axis_angle}" in text
    for flag in ("--resume", "--overwrite", LOCK_NAME):
        assert flag in text
    with pytest.raises(SystemExit):
        train_module.main(["hand_vae", "--help"])
    assert "{standard,so3}" in capsys.readouterr().out


def test_model_choices_match_what_the_configs_accept():
    families = available_model_types()
    for config_class in (cls.config_class for cls in families.values()):
        names = {f.name for f in config_class.__dataclass_fields__.values()}
        for name, values in train_module.MODEL_CHOICES.items():
            if name not in names:
                continue
            for value in values:
                config_class(**{name: value})
            with pytest.raises(ValueError, match=name):
                config_class(**{name: "bogus"})
