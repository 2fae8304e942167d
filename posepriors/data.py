"""Reading pose files and folders (AMASS, the seed's 53-joint files, prepared body/hand files) into tensors.

Every loader returns a :class:`PoseData`: SMPL-X poses (N, 55, 3) with a per-frame mask of the joints the source
had, and a sequence id per frame so that splits keep sequences whole (only a sequence longer than the validation
share is cut, into contiguous chunks, and a warning says so).
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from posepriors import skeleton
from posepriors.rotations import wrap_axis_angle
from posepriors.utils import from_numpy

__all__ = ["ACCEPTED_KEYS", "PoseData", "load_poses"]

_AMASS_WIDTHS = {156: "smplh", 165: "smplx", 72: "smpl"}
ACCEPTED_KEYS = (
    "poses (AMASS: width 156 SMPL-H, 165 SMPL-X, 72 SMPL; or the seed's (N, 53, 3))",
    *skeleton.DICT_KEYS,
)
"""The keys that make an ``.npz`` file usable."""


@dataclass
class PoseData:
    """Poses in the SMPL-X layout with provenance.

    Attributes:
        poses: Axis-angle rotations, shape (N, 55, 3), float32, canonical, zeros where not observed.
        observed: Which SMPL-X joints each frame's source had, shape (N, 55) bool.
        sequence: Sequence id of each frame, shape (N,) int64, indexing ``sequence_names``.
        sequence_names: Name of every sequence (file, or file + subject/sequence key).
        source_files: The files the poses came from.
        labels: Per-frame label arrays of prepared files by key (e.g. ``source``, ``subject``, ``sequence``), each
            shape (N,) of str; a key is kept only when every file has it. Used to report metrics per group
            (``posepriors-eval --by source``).
        rejected_labels: Keys of prepared files that were not taken as label arrays, with the reason (e.g.
            ``"l.npz: shape (7,), expected (200,), one entry per frame"``), so that a request for one can say why.
    """

    poses: Tensor
    observed: Tensor
    sequence: Tensor
    sequence_names: list[str]
    source_files: list[str]
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    rejected_labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.poses.shape[0]
        if self.poses.shape[1:] != (skeleton.NUM_JOINTS, 3):
            raise ValueError(f"expected poses of shape (N, 55, 3), got {tuple(self.poses.shape)}")
        if self.observed.shape != (n, skeleton.NUM_JOINTS) or self.sequence.shape != (n,):
            raise ValueError(
                f"expected observed (N, 55) and sequence (N,) with N={n}, "
                f"got {tuple(self.observed.shape)} and {tuple(self.sequence.shape)}"
            )
        for key, values in self.labels.items():
            if np.shape(values) != (n,):
                raise ValueError(f"expected label array {key!r} of shape ({n},), got {np.shape(values)}")

    def __len__(self) -> int:
        return self.poses.shape[0]

    def __repr__(self) -> str:
        parts = [name for name, idx in skeleton.PARTS.items() if bool(self.observed[:, list(idx)].any())]
        return (
            f"PoseData({len(self)} poses, {len(self.sequence_names)} sequences, {len(self.source_files)} files, "
            f"parts observed: {'+'.join(parts) or 'none'})"
        )

    def subset(self, index: Tensor | Sequence[int] | slice) -> PoseData:
        """Frames ``index`` (sequence names kept, so ids stay valid)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index)
        rows = index if isinstance(index, slice) else index.cpu().numpy()
        return PoseData(
            self.poses[index],
            self.observed[index],
            self.sequence[index],
            self.sequence_names,
            self.source_files,
            {key: values[rows] for key, values in self.labels.items()},
            dict(self.rejected_labels),
        )

    def joints(self, spec: str | Sequence[int]) -> Tensor:
        """Poses of the joints ``spec`` (a part spec or SMPL-X indices), shape (N, J, 3)."""
        return self.poses[:, list(skeleton.resolve_joints(spec))]

    @staticmethod
    def concat(items: Sequence[PoseData]) -> PoseData:
        """Concatenate several data sets (sequence ids are renumbered)."""
        if not items:
            raise ValueError("expected at least one PoseData to concatenate, got none")
        offsets = np.cumsum([0] + [len(d.sequence_names) for d in items[:-1]])
        common = _common_labels(items)
        rejected: dict[str, str] = {}
        for d in items:
            for key, reason in d.rejected_labels.items():
                rejected.setdefault(key, reason)
        for key in sorted({key for d in items for key in d.labels} - set(common)):
            have = [f for d in items if key in d.labels for f in d.source_files]
            rejected.setdefault(
                key, f"only {len(have)} of {sum(len(d.source_files) for d in items)} files have it ({have[:3]})"
            )
        return PoseData(
            torch.cat([d.poses for d in items]),
            torch.cat([d.observed for d in items]),
            torch.cat([d.sequence + int(o) for d, o in zip(items, offsets, strict=True)]),
            [n for d in items for n in d.sequence_names],
            [f for d in items for f in d.source_files],
            {key: np.concatenate([d.labels[key] for d in items]) for key in common},
            rejected,
        )

    def split_by_sequence(self, val_fraction: float, *, seed: int = 0) -> tuple[PoseData, PoseData]:
        """Split into train and validation by whole sequences (never frame by frame), stratified by the joints the
        frames observe.

        Sequences are grouped by the joints their frames observe (e.g. body files, hand files, whole-body files:
        each observed-joint pattern is a group; groups too small to give validation a frame of their own,
        ``val_fraction * frames < 1``, are pooled), and every group is split on its own, so validation holds about
        ``val_fraction`` of every kind of frame. Within a group, sequences are shuffled with ``seed`` and moved to
        validation until it holds ``val_fraction`` of the group's frames; a sequence that would take it past
        ``1.25 * val_fraction`` of them is skipped, so validation never ends much bigger than asked. A sequence too
        long to ever fit (more than that) is first cut into contiguous chunks of a quarter of the group's
        validation share, each treated as a sequence of its own (named ``name[start:stop]``), and a
        ``UserWarning`` names it: its chunks may fall on both sides of the split. Pass a separate validation set to
        keep every sequence whole. Data whose frames all observe the same joints are split exactly as without
        groups; when no group can give validation a sequence (each holds a single one), all are split together.

        Args:
            val_fraction: Target fraction of frames in the validation split, in (0, 1).
            seed: Seed of the shuffle.

        Returns:
            ``(train, val)``, neither empty.

        Raises:
            ValueError: When ``val_fraction`` is outside (0, 1) or there are fewer than 2 frames.
        """
        if not 0 < val_fraction < 1:
            raise ValueError(f"expected 0 < val_fraction < 1, got {val_fraction}")
        n = len(self)
        if n < 2:
            raise ValueError(
                f"expected at least 2 frames to split into training and validation, got {n}; "
                "add data or pass a separate validation set"
            )
        counts = torch.bincount(self.sequence, minlength=len(self.sequence_names))
        by_sequence = torch.argsort(self.sequence, stable=True).split(counts.tolist())
        present = [sid for sid, frames in enumerate(by_sequence) if len(frames)]
        # the group of a sequence: the observed-joint pattern of its first frame (a file's frames share one)
        _, pattern = torch.unique(self.observed, dim=0, return_inverse=True)
        groups: dict[int, list[int]] = {}
        for sid in present:
            groups.setdefault(int(pattern[by_sequence[sid][0]]), []).append(sid)
        small = [key for key, sids in groups.items() if val_fraction * sum(len(by_sequence[s]) for s in sids) < 1]
        if len(small) > 1 or (small and len(groups) > 1):
            pooled = sorted(sid for key in small for sid in groups.pop(key))
            groups[-1] = pooled
        strata = [groups[key] for key in sorted(groups)]
        split = _split_units(self, by_sequence, strata, val_fraction, seed)
        if not bool(split[0].any()) and len(strata) > 1:  # every group holds a single sequence: split them together
            split = _split_units(self, by_sequence, [present], val_fraction, seed)
        is_val, sequence, names, cut = split
        if cut:
            if all(c[1] == cut[0][1] for c in cut):
                limit, chunk, size = cut[0][1]
                group = "" if size == n else " frames observing the same joints"
                share = f"1.25 x {val_fraction} of {size}" if limit < size - 1 else f"all but one of {size}"
                bound, pieces = f"{limit:.0f} frames, {share}{group}", f"{chunk} frames"
            else:
                bound = f"1.25 x {val_fraction} of the frames observing the same joints"
                pieces = "a quarter of that share"
            listed = [c[0] for c in cut]
            warnings.warn(
                f"{len(cut)} sequence(s) are longer than the validation split may grow ({bound}) and were cut into "
                f"contiguous chunks of {pieces}, which may fall on both sides of the split: {listed[:5]}"
                f"{' ...' if len(cut) > 5 else ''}; pass a separate validation set to keep them whole",
                stacklevel=2,
            )
        data = PoseData(
            self.poses, self.observed, sequence, names, self.source_files, self.labels, self.rejected_labels
        )
        return data.subset(torch.nonzero(~is_val).flatten()), data.subset(torch.nonzero(is_val).flatten())


def _split_units(
    data: PoseData, by_sequence: Sequence[Tensor], strata: list[list[int]], val_fraction: float, seed: int
) -> tuple[Tensor, Tensor, list[str], list[tuple[str, tuple[float, int, int]]]]:
    """Pick the validation frames of :meth:`PoseData.split_by_sequence`, each stratum (a list of sequence ids) on
    its own; returns (is_val per frame, new sequence ids, new sequence names, cut sequences with (limit, chunk,
    stratum size))."""
    generator = torch.Generator().manual_seed(seed)
    names, sequence = list(data.sequence_names), data.sequence.clone()
    is_val = torch.zeros(len(data), dtype=torch.bool)
    cut: list[tuple[str, tuple[float, int, int]]] = []
    for sids in strata:
        size = sum(len(by_sequence[sid]) for sid in sids)
        target = val_fraction * size
        limit = min(1.25 * target, size - 1)  # below the stratum's size: a lone sequence is cut, never kept whole
        chunk = max(1, math.ceil(target / 4))
        units: list[Tensor] = []
        for sid in sids:
            frames = by_sequence[sid]
            if len(frames) <= max(limit, chunk):
                units.append(frames)
                continue
            cut.append((f"{names[sid]} ({len(frames)} frames)", (limit, chunk, size)))
            for start in range(0, len(frames), chunk):
                piece = frames[start : start + chunk]
                sequence[piece] = len(names)
                names.append(f"{data.sequence_names[sid]}[{start}:{start + len(piece)}]")
                units.append(piece)
        order = torch.randperm(len(units), generator=generator).tolist()
        chosen: list[int] = []
        total = 0
        for u in order:
            if total >= target or len(chosen) == len(units) - 1:
                break
            unit_size = len(units[u])
            if chosen and total + unit_size > limit:
                continue
            chosen.append(u)
            total += unit_size
        for u in chosen:
            is_val[units[u]] = True
    return is_val, sequence, names, cut


def load_poses(path: str | os.PathLike, *, fps: float | None = None, recursive: bool = True) -> PoseData:
    """Read a ``.npz`` file or a folder of them into SMPL-X poses.

    Recognised files:

    - AMASS: ``poses`` of width 156 (SMPL-H), 165 (SMPL-X) or 72 (SMPL), with ``mocap_framerate`` (or
      ``mocap_frame_rate``) used to subsample to ``fps``; one sequence per file. Jaw, eyes and hands that hold
      the same value in every frame of a file (not captured: the MANO mean hand of SMPL-H files without fingers,
      zeros in SMPL-X files) count as unobserved, with one warning naming the files.
    - The seed's format: ``poses`` of shape (N, 53, 3); one sequence per file.
    - Prepared files: any of ``global_orient``, ``body_pose`` (N, 21, 3) or (N, 63), ``jaw_pose``, ``leye_pose``,
      ``reye_pose``, ``left_hand_pose``, ``right_hand_pose`` (N, 15, 3) or (N, 45); sequences from per-frame
      ``sequence`` (with ``subject``) or ``source`` keys, else one per file.

    Other keys (``trans``, ``betas``, ``dmpls``, markers, ...) are ignored. Angles beyond pi are wrapped to the
    canonical range; frames with NaN or Inf (before or after wrapping: angles too large to wrap) are dropped and
    counted in one warning. A file given on its own that holds no usable frame (0 frames, or all non-finite) is an
    error naming it; inside a folder it is skipped (and named in a warning) as long as other files have frames.

    Args:
        path: A file or a folder (searched recursively for ``*.npz``, in sorted order).
        fps: Target frame rate for AMASS sequences (keeps every ``round(source / fps)``-th frame), a finite number
            > 0, or None to keep every frame.
        recursive: Search sub-folders too.

    Returns:
        The poses.

    Raises:
        TypeError: When ``fps`` is not a number.
        ValueError: When no file has usable frames, or a file is malformed (a bad ``mocap_framerate``, a ``.npy``
            array given as a file, arrays of the wrong shape...); the message names the file.
    """
    path = Path(path)
    if fps is not None and (not isinstance(fps, numbers.Real) or isinstance(fps, bool)):
        raise TypeError(f"expected fps to be a number (frames per second) or None, got {fps!r} ({type(fps).__name__})")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"expected a finite fps > 0, got {fps}")
    if not path.exists():
        raise FileNotFoundError(f"pose data not found: {path}")
    if path.is_file():
        files, root = [path], path.parent
    else:
        files = sorted(path.rglob("*.npz") if recursive else path.glob("*.npz"))
        root = path
    loaded: list[PoseData] = []
    skipped: list[str] = []
    dropped: dict[str, int] = {}
    empty: list[str] = []  # files without a usable frame, with the reason
    uncaptured: dict[str, list[str]] = {}  # part -> AMASS files that hold one value of it in every frame
    total = 0
    for file in files:
        try:
            item, nonfinite, constant = _load_file(file, root, fps)
        except _UnusableFile as err:
            if path.is_file():
                raise ValueError(str(err)) from None
            skipped.append(f"{file.relative_to(root)} ({err.reason})")
            continue
        total += len(item) + nonfinite
        for part in constant:
            uncaptured.setdefault(part, []).append(str(file.relative_to(root)))
        if nonfinite:
            dropped[str(file.relative_to(root))] = nonfinite
        if len(item):
            loaded.append(item)
            continue
        if nonfinite:
            reason = f"all {nonfinite} frames have NaN/Inf in poses (or angles too large to wrap)"
        else:
            reason = "holds 0 frames"
        if path.is_file():
            raise ValueError(f"{file}: {reason}; expected at least one frame with finite poses")
        empty.append(f"{file.relative_to(root)} ({reason})")
        if not nonfinite:  # all-NaN files are counted in the dropped-frames warning already
            skipped.append(f"{file.relative_to(root)} ({reason})")
    if not loaded:
        seen = [str(f.relative_to(root)) for f in files[:10]] + (["..."] if len(files) > 10 else [])
        if empty:  # some files have pose keys but no usable frame: say so, not which keys are accepted
            unusable = empty + [s for s in skipped if s not in empty]
            raise ValueError(
                f"no usable frames in {path}: saw {len(files)} .npz file(s), none with a finite frame: "
                f"{unusable[:10]}{' ...' if len(unusable) > 10 else ''}"
            )
        raise ValueError(
            f"no usable pose file in {path}: saw {len(files)} .npz file(s) {seen}"
            + (f", skipped {skipped[:10]}" if skipped else "")
            + f"; accepted keys: {', '.join(ACCEPTED_KEYS)}"
        )
    if dropped:
        detail = ", ".join(f"{name}: {count}" for name, count in list(dropped.items())[:10])
        warnings.warn(
            f"dropped {sum(dropped.values())} of {total} frames with NaN/Inf in poses ({detail})", stacklevel=2
        )
    if uncaptured:
        detail = "; ".join(
            f"{part} in {len(names)} ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''})"
            for part, names in uncaptured.items()
        )
        warnings.warn(
            f"AMASS file(s) hold the same value in every frame for parts they did not capture ({detail}): those "
            "parts count as unobserved (a training set would otherwise learn the constant, e.g. the MANO mean hand)",
            stacklevel=2,
        )
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} unreadable or unusable file(s) in {path}: {skipped[:10]}"
            + (" ..." if len(skipped) > 10 else ""),
            stacklevel=2,
        )
    return PoseData.concat(loaded)


class _UnusableFile(Exception):
    """A file that is not a readable ``.npz`` or has no pose key (skipped in a folder, an error on its own)."""

    def __init__(self, file: Path, reason: str, *, list_keys: bool = True) -> None:
        keys = f"; accepted keys: {', '.join(ACCEPTED_KEYS)}" if list_keys else ""
        super().__init__(f"{file}: {reason}{keys}")
        self.reason = reason


# What reading a damaged .npz raises: BadZipFile for a bad CRC or a torn archive, zlib.error for damaged compressed
# data, EOFError / OSError for a truncated file.
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError)


def _unreadable(file: Path, err: Exception) -> _UnusableFile:
    """Why ``np.load`` could not read ``file``: not an archive at all (NumPy's own message then speaks of pickled
    data), or a damaged one."""
    try:
        with open(file, "rb") as handle:
            magic = handle.read(6)
    except OSError:
        magic = None
    if magic is not None and not magic.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")):  # zip or .npy
        return _UnusableFile(file, f"not an .npz archive (it starts with {magic!r}, not a zip header)", list_keys=False)
    return _UnusableFile(file, f"not a readable .npz ({err})")


def _load_file(file: Path, root: Path, fps: float | None) -> tuple[PoseData, int]:
    """One file -> (PoseData, number of non-finite frames dropped)."""
    try:
        npz = np.load(file, allow_pickle=False)
    except (ValueError, *_READ_ERRORS) as err:
        raise _unreadable(file, err) from None
    if not isinstance(npz, np.lib.npyio.NpzFile):  # np.load reads a .npy array (whatever the file's name) as is
        raise _UnusableFile(
            file,
            f"a .npy array of shape {np.shape(npz)}, not an .npz archive; expected a .npz file with named pose arrays, "
            "e.g. np.savez(path, body_pose=poses)",
            list_keys=False,
        )
    with npz:
        keys = set(npz.files)
        name = str(file.relative_to(root)) if file.is_relative_to(root) else str(file)
        if "poses" in keys:
            poses, layout, rate = _read_amass_or_seed(npz, file)
            amass = layout != "smplx_no_eyes"  # the seed's format has no frame rate and no uncaptured parts
            step = 1
            if fps is not None and rate is None and amass:
                raise ValueError(
                    f"{file}: cannot subsample to {fps} fps: the file has no frame rate (mocap_framerate or "
                    "mocap_frame_rate); add it, or load without fps"
                )
            if fps is not None and rate is not None and rate > fps:
                step = max(1, round(rate / fps))
            pose55, observed = skeleton.to_smplx(from_numpy(poses[::step]), layout=layout)
            constant = _uncaptured_parts(pose55, observed) if amass else []
            seq_names, seq = [name], torch.zeros(len(pose55), dtype=torch.long)
            labels: dict[str, np.ndarray] = {}
            rejected: dict[str, str] = {}
        elif keys & set(skeleton.DICT_KEYS):
            parts = {key: from_numpy(_pose_array(npz, key, file)) for key in skeleton.DICT_KEYS if key in keys}
            for key in skeleton.unknown_pose_keys(keys):
                if _read_array(npz, key, file).dtype.kind == "f":  # rotations, not a label
                    raise ValueError(
                        f"{file}: unknown pose key {key!r} (a typo?); expected pose keys {list(skeleton.DICT_KEYS)}"
                    )
            n = {k: v.shape[0] for k, v in parts.items()}
            if len(set(n.values())) != 1:
                raise ValueError(f"{file}: the pose arrays have different frame counts: {n}")
            try:
                pose55, observed = skeleton.to_smplx(parts)
            except ValueError as err:
                raise ValueError(f"{file}: {err}") from None
            seq_names, seq = _sequences(npz, file, name, len(pose55))
            labels, rejected = _labels(npz, len(pose55), name)
            constant = []
        else:
            raise _UnusableFile(file, f"none of the accepted keys (has {sorted(keys)[:12]})")
    _warn_if_degrees(pose55, observed, file)
    # wrapped first, then filtered: a huge finite angle (1e30) may overflow to NaN/Inf inside the wrap
    pose55 = wrap_axis_angle(pose55.to(torch.float32))
    finite = torch.isfinite(pose55).all(-1).all(-1)
    nonfinite = int((~finite).sum())
    if nonfinite:
        pose55, seq = pose55[finite], seq[finite]
        labels = {key: values[finite.numpy()] for key, values in labels.items()}
    obs = observed.expand(len(pose55), -1).clone()
    return PoseData(pose55, obs, seq, seq_names, [str(file)], labels, rejected), nonfinite, constant


def _warn_if_degrees(pose55: Tensor, observed: Tensor, file: Path) -> None:
    """Warn when most of a file's rotations turn by more than 2 pi: axis-angle in degrees, most likely (a rotation
    in radians needs no more than 2 pi, even unwrapped, e.g. 2 pi - t from a quaternion with w < 0; wrapping degrees
    gives valid but wrong rotations)."""
    angles = torch.linalg.vector_norm(pose55.double(), dim=-1)[:, observed.reshape(-1, observed.shape[-1])[0]]
    angles = angles[torch.isfinite(angles) & (angles > 1e-6)]
    beyond = float((angles > 2 * math.pi + 1e-6).double().mean())
    if angles.numel() >= 10 and beyond > 0.5:
        warnings.warn(
            f"{file}: {beyond:.0%} of the rotations turn by more than 2 pi "
            f"(median {float(angles.median()):.3g}): expected axis-angle in radians; degrees? (np.radians them). "
            "They were wrapped to the canonical range as radians",
            stacklevel=4,
        )


_UNCAPTURED = ("jaw", "eyes", "left_hand", "right_hand")
"""Parts an AMASS file may fill with one value in every frame when they were not captured (SMPL-H files without
finger capture hold the MANO mean hand, SMPL-X files zeros for the jaw and eyes)."""


def _uncaptured_parts(pose55: Tensor, observed: Tensor) -> list[str]:
    """The parts of :data:`_UNCAPTURED` that hold the same value in every one of several frames: marked unobserved
    (``observed`` (55,) is changed) and zeroed in ``pose55`` (T, 55, 3), in place; returns their names."""
    if len(pose55) < 2:
        return []
    constant = []
    for part in _UNCAPTURED:
        joints = list(skeleton.PARTS[part])
        if bool(observed[joints].all()) and bool((pose55[:, joints] == pose55[:1, joints]).all()):
            observed[joints] = False
            pose55[:, joints] = 0.0
            constant.append(part)
    return constant


def _labels(npz: np.lib.npyio.NpzFile, n: int, name: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Per-frame label arrays of a prepared file: 1-D string, integer or bool arrays of length ``n``, as str; and
    the other keys with the reason each is not one (``name`` is the file's name for those reasons)."""
    out, rejected = {}, {}
    for key in npz.files:
        if key in skeleton.DICT_KEYS:
            continue
        try:
            values = npz[key]
        except (ValueError, *_READ_ERRORS) as err:  # object arrays (pickle) or a damaged member: not a label
            rejected[key] = f"{name}: cannot be read ({type(err).__name__}: {err})"
            continue
        if values.shape != (n,):
            rejected[key] = f"{name}: shape {values.shape}, expected ({n},), one entry per frame"
        elif values.dtype.kind not in "USiub":
            rejected[key] = f"{name}: dtype {values.dtype}, expected strings, integers or booleans"
        else:
            out[key] = values.astype(str)
    return out, rejected


def _common_labels(items: Sequence[PoseData]) -> list[str]:
    """Label keys that every item has, in the first item's order."""
    return [key for key in items[0].labels if all(key in d.labels for d in items[1:])]


def _read_array(npz: np.lib.npyio.NpzFile, key: str, file: Path) -> np.ndarray:
    """``npz[key]``; a damaged member raises :class:`_UnusableFile` naming the file, an object array ``ValueError``."""
    try:
        return npz[key]
    except _READ_ERRORS as err:
        reason = f"corrupt .npz, cannot read {key!r} ({type(err).__name__}: {err})"
        raise _UnusableFile(file, reason, list_keys=False) from None
    except ValueError as err:
        if "pickle" in str(err):  # object arrays need pickle, which we never allow
            raise ValueError(f"{file}: key {key!r} cannot be read without pickle ({err})") from None
        raise _UnusableFile(file, f"corrupt .npz, cannot read {key!r} ({err})", list_keys=False) from None


def _pose_array(npz: np.lib.npyio.NpzFile, key: str, file: Path) -> np.ndarray:
    """``npz[key]`` as float32 rotations with a leading frame axis (else ``ValueError`` naming the file and key)."""
    values = _read_array(npz, key, file)
    if values.dtype.kind not in "fiu":
        raise ValueError(f"{file}: expected {key!r} to hold numbers (rotations), got dtype {values.dtype}")
    if values.ndim < 2:
        raise ValueError(
            f"{file}: expected {key!r} with a leading frame axis, (frames, 3 x joints) or (frames, joints, 3), "
            f"got shape {values.shape}"
        )
    return np.asarray(values, dtype=np.float32)


def _read_amass_or_seed(npz: np.lib.npyio.NpzFile, file: Path) -> tuple[np.ndarray, str, float | None]:
    poses = _pose_array(npz, "poses", file)
    if poses.ndim == 3 and poses.shape[1:] == (53, 3):
        return poses, "smplx_no_eyes", None
    if poses.ndim == 2 and poses.shape[1] in _AMASS_WIDTHS:
        rate = None
        for key in ("mocap_framerate", "mocap_frame_rate"):
            if key in npz.files:
                rate = _frame_rate(np.asarray(_read_array(npz, key, file)), key, file)
                break
        return poses, _AMASS_WIDTHS[poses.shape[1]], rate
    raise ValueError(
        f"{file}: expected 'poses' of shape (T, 156) SMPL-H, (T, 165) SMPL-X, (T, 72) SMPL or (N, 53, 3) seed, "
        f"got {poses.shape}"
    )


def _frame_rate(value: np.ndarray, key: str, file: Path) -> float:
    """A file's frame rate: a single finite number > 0 (else ``ValueError`` naming the file and the key)."""
    shown = np.array2string(value, threshold=6) if value.size else f"an empty array of shape {value.shape}"
    if value.size != 1 or value.dtype.kind not in "iuf":
        what = f"{value.size} values" if value.size != 1 else f"dtype {value.dtype}"
        raise ValueError(f"{file}: expected {key} to be a single number > 0 (frames per second), got {shown} ({what})")
    rate = float(value.reshape(()))
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"{file}: expected a finite {key} > 0 (frames per second), got {rate}")
    return rate


def _sequences(npz: np.lib.npyio.NpzFile, file: Path, name: str, n: int) -> tuple[list[str], Tensor]:
    """Per-frame sequence ids from ``sequence`` (+ ``subject``) or ``source`` keys; else one sequence."""
    labels = None
    if "sequence" in npz.files:
        labels = np.asarray(_read_array(npz, "sequence", file)).astype(str)
        if "subject" in npz.files:
            subject = np.asarray(_read_array(npz, "subject", file)).astype(str)
            if subject.shape != labels.shape:
                raise ValueError(
                    f"{file}: expected 'subject' of the shape of 'sequence', {labels.shape}, got {subject.shape}"
                )
            labels = np.char.add(np.char.add(subject, "/"), labels)
    elif "source" in npz.files:
        labels = np.asarray(_read_array(npz, "source", file)).astype(str)
    if labels is None or labels.shape != (n,):
        return [name], torch.zeros(n, dtype=torch.long)
    uniques, inverse = np.unique(labels, return_inverse=True)
    return [f"{name}:{u}" for u in uniques], torch.from_numpy(inverse.astype(np.int64))
