"""Reading pose files and folders."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from posepriors.data import PoseData, load_poses


def _amass(path, width, frames=120, rate=120.0, key="mocap_framerate"):
    poses = np.random.default_rng(0).normal(0, 0.3, (frames, width))
    np.savez(
        path, poses=poses, trans=np.zeros((frames, 3)), betas=np.zeros(16), gender=np.array(b"male"), **{key: rate}
    )
    return poses


@pytest.mark.parametrize(("width", "observed_joints"), [(156, 52), (165, 55), (72, 22)])
def test_amass_widths(tmp_path, width, observed_joints):
    poses = _amass(tmp_path / "seq.npz", width)
    data = load_poses(tmp_path / "seq.npz")
    assert data.poses.shape == (120, 55, 3) and data.poses.dtype == torch.float32
    assert int(data.observed[0].sum()) == observed_joints
    torch.testing.assert_close(data.poses[:, 1:22].reshape(120, 63), torch.from_numpy(poses[:, 3:66]).float())


def test_fps_subsampling_and_frame_rate_key(tmp_path):
    _amass(tmp_path / "a.npz", 156, frames=120, rate=120.0)
    _amass(tmp_path / "b.npz", 165, frames=30, rate=30, key="mocap_frame_rate")
    data = load_poses(tmp_path, fps=30)
    assert len(data) == 30 + 30  # every 4th frame of a; b is already at 30 fps
    assert len(data.sequence_names) == 2


def test_seed_and_prepared_formats(tmp_path):
    np.savez(tmp_path / "seed.npz", poses=np.zeros((7, 53, 3), np.float32))
    seed = load_poses(tmp_path / "seed.npz")
    assert len(seed) == 7 and not seed.observed[0, 23] and seed.observed[0, 22]
    np.savez(
        tmp_path / "hands.npz",
        left_hand_pose=np.zeros((6, 15, 3), np.float32),
        right_hand_pose=np.zeros((6, 45), np.float32),
        subject=np.array(["s1"] * 3 + ["s2"] * 3),
        sequence=np.array(["a", "a", "b", "a", "a", "a"]),
    )
    hands = load_poses(tmp_path / "hands.npz")
    assert hands.observed[0].sum() == 30 and len(hands.sequence_names) == 3
    np.savez(tmp_path / "body.npz", body_pose=np.zeros((5, 21, 3), np.float32), source=np.array(["x"] * 5))
    body = load_poses(tmp_path / "body.npz")
    assert body.observed[0].sum() == 21
    assert body.joints("body").shape == (5, 21, 3)


def test_nan_rows_are_dropped_and_counted(tmp_path):
    poses = np.zeros((10, 156))
    poses[[2, 5]] = np.nan
    np.savez(tmp_path / "nan.npz", poses=poses, marker_data=np.full((10, 3, 3), np.nan))
    with pytest.warns(UserWarning, match=r"dropped 2 of 10 frames with NaN/Inf"):
        data = load_poses(tmp_path / "nan.npz")
    assert len(data) == 8 and torch.isfinite(data.poses).all()


def test_unwrapped_angles_are_wrapped(tmp_path):
    body = np.zeros((2, 21, 3), np.float32)
    body[:, 0] = [3.5, 0.0, 0.0]
    np.savez(tmp_path / "w.npz", body_pose=body)
    data = load_poses(tmp_path / "w.npz")
    assert data.poses[0, 1].norm() <= math.pi
    torch.testing.assert_close(data.poses[0, 1], torch.tensor([3.5 - 2 * math.pi, 0.0, 0.0]))


def test_angles_in_degrees_are_warned_about(tmp_path):
    """Degrees wrapped as radians give valid but wrong rotations, silently until this warning."""
    rng = np.random.default_rng(0)
    radians = rng.normal(0.0, 0.4, (50, 21, 3)).astype(np.float32)
    np.savez(tmp_path / "deg.npz", body_pose=np.degrees(radians))
    with pytest.warns(UserWarning, match=r"deg.npz: \d+% of the rotations turn by more than 2 pi .* degrees\?"):
        load_poses(tmp_path / "deg.npz")
    angle = np.linalg.norm(radians, axis=-1, keepdims=True)  # the same rotations as 2 pi - t about -axis
    unwrapped = radians / angle * (angle - 2 * np.pi)  # every angle beyond pi: radians still, no warning
    np.savez(tmp_path / "rad.npz", body_pose=unwrapped)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_poses(tmp_path / "rad.npz")


def test_split_by_sequence(tmp_path):
    for i in range(10):
        _amass(tmp_path / f"s{i}.npz", 156, frames=10 + i)
    data = load_poses(tmp_path)
    train, val = data.split_by_sequence(0.3, seed=1)
    assert len(train) + len(val) == len(data)
    assert not set(train.sequence.tolist()) & set(val.sequence.tolist())
    again = data.split_by_sequence(0.3, seed=1)[1]
    assert torch.equal(again.sequence, val.sequence)
    one = data.subset(torch.nonzero(data.sequence == 0).flatten())  # a single sequence is cut into chunks
    with pytest.warns(UserWarning, match=r"cut into contiguous chunks .*s0\.npz \(10 frames\)"):
        train, val = one.split_by_sequence(0.5)
    assert len(train) + len(val) == 10 and 1 <= len(val) <= 6
    assert not set(train.sequence.tolist()) & set(val.sequence.tolist())
    with pytest.raises(ValueError, match="expected at least 2 frames to split"):
        one.subset([0]).split_by_sequence(0.5)
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_by_sequence(1.5)


def _dominant(n_big: int = 900, n_small: int = 20, size: int = 5) -> PoseData:
    """One long sequence and many short ones (like i.i.d. frames stored under one source label)."""
    n = n_big + n_small * size
    sequence = torch.cat([torch.zeros(n_big, dtype=torch.long), torch.arange(1, n_small + 1).repeat_interleave(size)])
    names = ["iid"] + [f"short{i}" for i in range(n_small)]
    poses = torch.randn(n, 55, 3, generator=torch.Generator().manual_seed(0)) * 0.1
    return PoseData(poses, torch.ones(n, 55, dtype=torch.bool), sequence, names, ["x.npz"])


@pytest.mark.parametrize("seed", range(8))
def test_split_never_leaves_validation_much_bigger_than_asked(seed):
    # issue 12, case 2: a whole dominant sequence used to land in validation (74 poses left to train on)
    data = _dominant()
    with pytest.warns(UserWarning, match=r"iid \(900 frames\)"):
        train, val = data.split_by_sequence(0.1, seed=seed)
    assert 1 <= len(val) <= 1.25 * 0.1 * len(data) and len(train) >= 0.85 * len(data)
    assert len(train) + len(val) == len(data)
    assert not set(train.sequence.tolist()) & set(val.sequence.tolist())  # chunks get ids of their own
    chunks = [train.sequence_names[i] for i in set(val.sequence.tolist())]
    assert all(name.startswith("short") or name.startswith("iid[") for name in chunks)
    for part in (train, val):  # every chunk is a contiguous run of the long sequence
        for sid in set(part.sequence.tolist()):
            name = part.sequence_names[sid]
            if name.startswith("iid["):
                start, stop = (int(v) for v in name[4:-1].split(":"))
                frames = torch.nonzero(part.sequence == sid).flatten()
                assert len(frames) == stop - start
    with warnings.catch_warnings():  # no sequence is too long for a larger share: nothing is cut
        warnings.simplefilter("error")
        train, val = _dominant(n_big=50, n_small=20).split_by_sequence(0.4, seed=seed)
    assert len(val) <= 1.25 * 0.4 * 150


@pytest.mark.shared_data
def test_shared_body_train_split_keeps_most_poses_for_training(shared_data):
    # issue 12, case 2: 9,000 i.i.d. frames share one `source` label in body_train.npz
    body = load_poses(shared_data / "body_train.npz")
    with pytest.warns(UserWarning, match="amass_train_iid"):
        train, val = body.split_by_sequence(0.1)
    assert len(val) <= 1.25 * 0.1 * len(body) and len(train) > 8000


def _corrupt(path, offset_fraction: float = 0.5) -> None:
    """Flip a byte inside the stored array data, so that the zip member fails its CRC check."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_crc_corrupt_file_is_named_and_skipped_in_a_folder(tmp_path):
    # issue 12, case 13: a BadZipFile traceback used to abort the whole folder
    np.savez(tmp_path / "good.npz", body_pose=np.zeros((40, 21, 3), np.float32))
    np.savez(tmp_path / "bad.npz", body_pose=np.ones((40, 21, 3), np.float32))
    _corrupt(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match=r"bad\.npz: corrupt \.npz, cannot read 'body_pose' \(BadZipFile: Bad CRC-32"):
        load_poses(tmp_path / "bad.npz")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable or unusable file.*bad\.npz \(corrupt \.npz"):
        data = load_poses(tmp_path)
    assert len(data) == 40 and data.source_files == [str(tmp_path / "good.npz")]
    np.savez_compressed(tmp_path / "zipped.npz", body_pose=np.random.default_rng(0).normal(size=(400, 21, 3)))
    _corrupt(tmp_path / "zipped.npz")  # damaged deflate data: zlib.error or a CRC error
    with pytest.raises(ValueError, match=r"zipped\.npz: corrupt \.npz"):
        load_poses(tmp_path / "zipped.npz")


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_poses(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no usable pose file .* saw 0 \.npz"):
        load_poses(tmp_path / "empty")
    np.savez(tmp_path / "junk.npz", trans=np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"accepted keys: poses .*body_pose"):
        load_poses(tmp_path / "junk.npz")
    (tmp_path / "f").mkdir()
    np.savez(tmp_path / "f" / "junk.npz", trans=np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"saw 1 \.npz file\(s\) \['junk.npz'\]"):
        load_poses(tmp_path / "f")
    np.savez(tmp_path / "wide.npz", poses=np.zeros((3, 100)))
    with pytest.raises(ValueError, match=r"expected 'poses' of shape .* got \(3, 100\)"):
        load_poses(tmp_path / "wide.npz")
    np.savez(tmp_path / "body20.npz", body_pose=np.zeros((3, 20, 3)))
    with pytest.raises(ValueError, match=r"body20.npz: expected body_pose of shape"):
        load_poses(tmp_path / "body20.npz")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")  # numpy's own message spoke of pickled data
    with pytest.raises(ValueError, match=r"broken.npz: not an .npz archive \(it starts with b'not a ', not a zip"):
        load_poses(tmp_path / "broken.npz")
    np.savez(tmp_path / "torn.npz", body_pose=np.zeros((3, 21, 3)))
    (tmp_path / "torn.npz").write_bytes((tmp_path / "torn.npz").read_bytes()[:100])  # a zip header, then nothing
    with pytest.raises(ValueError, match="torn.npz: not a readable .npz"):
        load_poses(tmp_path / "torn.npz")


def test_malformed_prepared_files_name_the_file_and_key(tmp_path):
    cases = {
        "strings": ({"body_pose": np.array([["x"] * 63] * 5)}, r"'body_pose' to hold numbers .* dtype <U1"),
        "complex": ({"body_pose": np.zeros((5, 63), np.complex64)}, r"'body_pose' to hold numbers .* complex64"),
        "one_frame": ({"body_pose": np.zeros(63, np.float32)}, r"'body_pose' with a leading frame axis.* \(63,\)"),
        "typo": ({"body_pose": np.zeros((5, 63)), "left_hand": np.zeros((5, 45))}, r"unknown pose key 'left_hand'"),
        "subject": (
            {"body_pose": np.zeros((5, 63)), "sequence": np.array(list("aabbc")), "subject": np.array(["s1", "s2"])},
            r"'subject' of the shape of 'sequence', \(5,\), got \(2,\)",
        ),
    }
    for name, (arrays, match) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(ValueError, match=rf"{name}\.npz: (expected )?{match}"):
            load_poses(tmp_path / f"{name}.npz")
    np.savez(tmp_path / "label.npz", body_pose=np.zeros((5, 63)), hand=np.array(["left"] * 5))  # a label, not a typo
    assert list(load_poses(tmp_path / "label.npz").labels) == ["hand"]


def test_fps_needs_a_frame_rate_and_a_lone_sequence_still_splits(tmp_path):
    np.savez(tmp_path / "norate.npz", poses=np.zeros((120, 156), np.float32))
    with pytest.raises(ValueError, match=r"norate.npz: cannot subsample to 30 fps: the file has no frame rate"):
        load_poses(tmp_path / "norate.npz", fps=30)
    data = load_poses(tmp_path / "norate.npz")
    for fraction in (0.8, 0.9):  # 1.25 x the share would keep the one sequence whole, and validation empty
        with pytest.warns(UserWarning, match="all but one of 120"):
            train, val = data.split_by_sequence(fraction)
        assert len(train) > 0 and len(val) > 0 and len(train) + len(val) == 120


def test_parts_an_amass_file_did_not_capture_count_as_unobserved(tmp_path):
    rng = np.random.default_rng(0)
    poses = rng.normal(scale=0.2, size=(40, 156)).astype(np.float32)
    poses[:, 66:111] = rng.normal(scale=0.2, size=45)  # left hand: one pose in every frame (no finger capture)
    np.savez(tmp_path / "smplh.npz", poses=poses, mocap_framerate=np.array(30.0))
    with pytest.warns(UserWarning, match=r"same value in every frame .*left_hand in 1 \(smplh.npz\)"):
        data = load_poses(tmp_path / "smplh.npz")
    left, right = list(range(25, 40)), list(range(40, 55))
    assert not data.observed[:, left].any() and bool((data.poses[:, left] == 0).all())
    assert data.observed[:, right].all() and data.observed[:, 1:22].all()
    torch.testing.assert_close(data.poses[:, right].reshape(40, 45), torch.from_numpy(poses[:, 111:156]))
    np.savez(tmp_path / "one.npz", poses=poses[:1], mocap_framerate=np.array(30.0))  # one frame: nothing to tell
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_poses(tmp_path / "one.npz").observed[:, left].all()


def test_posedata_validation():
    with pytest.raises(ValueError, match=r"\(N, 55, 3\)"):
        PoseData(
            torch.zeros(2, 54, 3), torch.zeros(2, 55, dtype=torch.bool), torch.zeros(2, dtype=torch.long), ["a"], []
        )


@pytest.mark.shared_data
def test_shared_amass_folder(shared_data):
    data = load_poses(shared_data / "amass_raw", fps=30)
    assert len(data.sequence_names) == 9
    assert 900 < len(data) < 1300 and torch.isfinite(data.poses).all()
    assert data.poses.norm(dim=-1).max() <= math.pi + 1e-5


@pytest.mark.shared_data
def test_shared_prepared_files(shared_data):
    seed = load_poses(shared_data / "seed_format" / "train_poses.npz")
    assert len(seed) == 297
    body = load_poses(shared_data / "body_train.npz")
    assert len(body) == 9588 and body.observed[:, 1:22].all() and not body.observed[:, 22:].any()
    hands = load_poses(shared_data / "hands_val.npz")
    assert len(hands) == 11931 and hands.observed[:, 25:].all()
    train, val = hands.split_by_sequence(0.2)
    assert not set(train.sequence.tolist()) & set(val.sequence.tolist())
