"""The training loop of every family, and ``posepriors-train`` (plain PyTorch; DDP through ``torchrun``).

``posepriors-train MODEL --data_dir DATA --out DIR`` trains a prior and writes the best model (by validation NLL)
to ``DIR`` as ``config.json`` + ``model.safetensors``, with ``metrics.json`` beside it. ``DIR/checkpoints`` holds
the latest epoch's model and training state (optimizer, scheduler, RNGs: safetensors + JSON, never pickle), and
``DIR/last.json`` points at it; every file is written atomically, so ``--resume`` continues an interrupted run
(even one killed with SIGKILL) from its last completed epoch and gives the same result as an uninterrupted run.

A run holds a lock on ``DIR`` (a file ``.posepriors.lock`` with its pid) while it runs, so a second run on the same
folder fails at once. A folder that holds files already is refused unless ``--resume`` (continue the run saved
there, with the settings it was started with; only :data:`SAFE_ON_RESUME` flags may change) or ``--overwrite``
(delete that run's files and start afresh).

Multi-process: ``torchrun --nproc_per_node 2 -m posepriors.train MODEL ...`` splits every global batch across the
processes (gloo on CPU, nccl on CUDA); only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import math
import numbers
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from posepriors import skeleton
from posepriors.data import PoseData, load_poses
from posepriors.hub import available_model_types, load_pretrained, save_pretrained
from posepriors.priors.base import PosePrior, PriorConfig
from posepriors.utils import LOCK_NAME, FolderLockedError, atomic_write, folder_lock, resolve_device

__all__ = [
    "FAMILY_DEFAULTS",
    "SAFE_ON_RESUME",
    "TrainConfig",
    "TrainResult",
    "TrainingData",
    "augment",
    "build_parser",
    "fit",
    "main",
    "prepare_data",
]


@dataclass
class TrainConfig:
    """Settings of the training loop (the model's own settings live in its config dataclass).

    Attributes:
        optimizer: ``"adam"`` or ``"adamw"``.
        learning_rate: Initial learning rate.
        weight_decay: Weight decay (decoupled for AdamW).
        scheduler: ``"cosine"`` (to zero over ``max_epochs``), ``"step"`` (x ``gamma`` every ``step_size``
            epochs) or ``"none"``.
        step_size: Epochs between decays of the step scheduler (>= 1).
        gamma: Decay factor of the step scheduler (finite, > 0).
        grad_clip: Max gradient norm (0 or None: off).
        max_epochs: Number of epochs.
        batch_size: Global batch size (split across processes).
        patience: Early-stopping patience in epochs without a better validation NLL (0 or None: off).
        seed: Seed of initialisation, shuffling, pairing and training noise, in [0, 2**63 - 1].
        device: ``auto`` (cuda > mps > cpu), ``cpu``, ``cuda``, ``mps``...
        amp: Mixed precision (CUDA only).
        val_batch_size: Batch size of validation passes.
        sample_every: Compute sample statistics every this many epochs (0: only at the end).
        logger: ``tensorboard``, ``csv``, ``wandb`` or ``none``.
        log_dir: Folder of the logs (default ``runs/<model>``); every run logs into its own sub-folder named by its
            run id (``<model>-<date>-<time>-<random>``, kept by ``--resume``): ``runs/gaussian/<run id>/metrics.csv``.
        progress: Show tqdm progress bars.
        mirror: Mirror each training pose left-right with probability 1/2 every epoch (needs joints closed under
            mirroring, e.g. the body or the body and both hands).
        input_noise: Std (radians) of Gaussian noise added to the training poses' axis-angle coordinates, drawn
            anew every epoch: the prior learns the data's density smoothed by this kernel, which keeps it from
            collapsing onto the training poses.
    """

    optimizer: str = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    step_size: int = 30
    gamma: float = 0.5
    grad_clip: float = 0.0
    max_epochs: int = 30
    batch_size: int = 256
    patience: int = 0
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    val_batch_size: int = 4096
    sample_every: int = 5
    logger: str = "csv"
    log_dir: str | None = None
    progress: bool = True
    mirror: bool = False
    input_noise: float = 0.0


FAMILY_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {name: cls.training_defaults for name, cls in available_model_types().items()}
)
"""Deprecated, kept for old code: the loop defaults of each family, now the families' own
:attr:`~posepriors.priors.base.PosePrior.training_defaults` (read those; families registered later are not here)."""
SAFE_ON_RESUME = (
    "max_epochs",
    "patience",
    "device",
    "amp",
    "val_batch_size",
    "sample_every",
    "logger",
    "log_dir",
    "progress",
)
"""Loop settings that ``--resume`` may change: they do not change what the run learns from (a changed
``max_epochs`` stretches or shortens the cosine schedule: from the resumed epoch on, the learning rate is the one a
run started with the new ``max_epochs`` has). Every other setting, and every model setting, must stay as it was."""
LOOP_CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("adam", "adamw"),
    "scheduler": ("cosine", "step", "none"),
    "logger": ("tensorboard", "csv", "wandb", "none"),
}
MODEL_CHOICES: dict[str, tuple[str, ...]] = {
    "coupling": ("affine", "spline"),
    "mixing": ("lu", "permutation", "none"),
    "context": ("6d", "axis_angle"),
    "variant": ("standard", "so3"),
}
"""Allowed values of the string model flags (the configs check them too; tests keep both in step)."""
OUTPUT_NAMES = ("config.json", "model.safetensors", "metrics.json", "last.json", "checkpoints")
"""What a run writes into ``--out`` (``--overwrite`` deletes these, and only these, before it starts)."""


@dataclass
class TrainResult:
    """What :func:`fit` did.

    Attributes:
        best_epoch: Epoch (1-based) of the best validation NLL.
        best_val_nll: The best validation NLL (nats per pose).
        epochs: Epochs completed in total (including resumed ones).
        history: One dict of metrics per epoch.
        out: Folder of the best model (None when nothing was written).
    """

    best_epoch: int
    best_val_nll: float
    epochs: int
    history: list[dict[str, float]] = field(default_factory=list)
    out: Path | None = None


# ---------------------------------------------------------------------------- data
@dataclass
class TrainingData:
    """Poses in a prior's joint order with a recipe to complete frames that miss some joints.

    Attributes:
        poses: (N, J, 3) poses; missing joints hold zeros until :meth:`complete` fills them.
        observed: (N, J) bool.
    """

    poses: Tensor
    observed: Tensor

    def __len__(self) -> int:
        return self.poses.shape[0]

    def complete(self, generator: torch.Generator) -> Tensor:
        """Fill each frame's missing joints from a random frame that observes them (body data and hand data are
        combined this way); returns (N, J, 3)."""
        out = self.poses.clone()
        patterns, inverse = torch.unique(self.observed, dim=0, return_inverse=True)
        for p, pattern in enumerate(patterns):
            missing = ~pattern
            if not bool(missing.any()):
                continue
            rows = torch.nonzero(inverse == p).flatten()
            donors = torch.nonzero(self.observed[:, missing].all(-1)).flatten()
            pick = donors[torch.randint(len(donors), (len(rows),), generator=generator)]
            out[rows[:, None], torch.nonzero(missing).flatten()] = self.poses[pick][:, missing]
        return out


def prepare_data(data: PoseData, joints: tuple[int, ...], what: str = "training") -> TrainingData:
    """Select a prior's joints and check that every frame can be completed from other frames.

    Raises:
        ValueError: When some modelled joints are observed by no frame, or a frame's missing joints are observed
            together by no other frame.
    """
    index = torch.tensor(joints)
    observed = data.observed[:, index]
    useful = observed.any(-1)  # frames with none of the modelled joints (hand data for a body prior) are dropped
    data, observed = data.subset(torch.nonzero(useful).flatten()), observed[useful]
    never = [skeleton.SMPLX_JOINT_NAMES[joints[i]] for i in torch.nonzero(~observed.any(0)).flatten().tolist()]
    if never:
        raise ValueError(
            f"the {what} data observes none of the modelled joints {never[:6]}{'...' if len(never) > 6 else ''}; "
            f"add data with those joints (files: {data.source_files[:3]}) or model fewer joints (--joints)"
        )
    for pattern in torch.unique(observed, dim=0):
        missing = ~pattern
        if bool(missing.any()) and not bool(observed[:, missing].all(-1).any()):
            names = [skeleton.SMPLX_JOINT_NAMES[joints[i]] for i in torch.nonzero(missing).flatten().tolist()]
            raise ValueError(
                f"no {what} frame observes all of {names[:6]} together, so frames missing them "
                "cannot be completed; add data that has them together"
            )
    return TrainingData(data.poses[:, index].contiguous(), observed)


def augment(
    poses: Tensor, joints: tuple[int, ...], mirror: bool, input_noise: float, generator: torch.Generator
) -> Tensor:
    """Training-time augmentation: left-right mirroring of a random half and Gaussian noise on every coordinate.

    Args:
        poses: Poses in ``joints`` order, shape (N, J, 3).
        joints: Their SMPL-X joints.
        mirror: Mirror each pose with probability 1/2 (:func:`posepriors.skeleton.mirror_pose`).
        input_noise: Std of the noise in radians (0: none).
        generator: Source of the coin flips and the noise.

    Returns:
        Augmented poses, shape (N, J, 3).
    """
    if mirror:
        flip = torch.rand(poses.shape[0], generator=generator) < 0.5
        poses = torch.where(flip[:, None, None], skeleton.mirror_pose(poses, joints), poses)
    if input_noise > 0:
        poses = poses + input_noise * torch.randn(poses.shape, generator=generator, dtype=poses.dtype)
    return poses


# ---------------------------------------------------------------------------- distributed
def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _init_distributed(device: torch.device) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


class _LossModule(nn.Module):
    """Puts ``training_loss`` behind ``forward`` so DistributedDataParallel can average its gradients."""

    def __init__(self, prior: PosePrior) -> None:
        super().__init__()
        self.prior = prior

    def forward(self, pose: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.prior.training_loss(pose, generator)


# ---------------------------------------------------------------------------- checkpoints
def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for key, values in state["state"].items():
        meta["state"][str(key)] = {}
        for name, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{key}.{name}"] = value.detach().cpu().contiguous()
                meta["state"][str(key)][name] = "tensor"
            else:
                meta["state"][str(key)][name] = value
    return tensors, meta


def _optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[str, Any] = {"param_groups": meta["param_groups"], "state": {}}
    for key, values in meta["state"].items():
        state["state"][int(key)] = {
            name: tensors[f"optimizer.{key}.{name}"] if value == "tensor" else value for name, value in values.items()
        }
    optimizer.load_state_dict(state)


def _save_checkpoint(
    out: Path,
    prior: PosePrior,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    info: dict[str, Any],
    generators: dict[str, torch.Generator],
) -> None:
    folder = out / "checkpoints" / f"epoch_{info['epoch']:04d}"
    save_pretrained(prior, folder)
    tensors, meta = _optimizer_to_files(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    for name, gen in generators.items():
        tensors[f"rng.{name}"] = gen.get_state()
    meta.update(info)
    meta["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    with atomic_write(folder / "training_state.safetensors", "wb") as handle:
        handle.write(safetensors_bytes(tensors))
    with atomic_write(folder / "training_state.json", "w") as handle:
        handle.write(json.dumps(meta, indent=1, sort_keys=True, default=float))
    # the pointer moves last: a run killed before this line resumes from the previous checkpoint
    with atomic_write(out / "last.json", "w") as handle:
        handle.write(json.dumps({"checkpoint": folder.relative_to(out).as_posix(), "epoch": info["epoch"]}))
    for old in sorted((out / "checkpoints").glob("epoch_*")):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)


def _checkpoint_meta(out: Path) -> tuple[Path, dict[str, Any]]:
    """The folder and JSON state of ``out``'s last checkpoint (a ``ValueError`` says what is missing)."""
    pointer = out / "last.json"
    if not pointer.is_file():
        raise ValueError(
            f"--resume: expected a checkpoint in {out} ({pointer.name}, written after every epoch), got none; "
            "start without --resume"
        )
    try:
        folder = out / json.loads(pointer.read_text())["checkpoint"]
        meta = json.loads((folder / "training_state.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"--resume: the checkpoint in {out} cannot be read ({type(err).__name__}: {err}); "
            "start again with --overwrite"
        ) from None
    return folder, meta


def _load_checkpoint(out: Path) -> tuple[Path, dict[str, Tensor], dict[str, Any]]:
    folder, meta = _checkpoint_meta(out)
    try:
        tensors = load_file(str(folder / "training_state.safetensors"))
    except Exception as err:  # safetensors raises its own error types besides OSError
        raise ValueError(
            f"--resume: the checkpoint in {folder} cannot be read ({type(err).__name__}: {err}); "
            "start again with --overwrite"
        ) from None
    return folder, tensors, meta


def _checkpoint_model_config(folder: Path) -> tuple[str, dict[str, Any]]:
    """``(model_type, config dict)`` of the model saved in a checkpoint folder."""
    try:
        raw = json.loads((folder / "config.json").read_text())
        return raw["model_type"], dict(raw["config"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"--resume: the model config in {folder} cannot be read ({type(err).__name__}: {err}); "
            "start again with --overwrite"
        ) from None


def _loop_changes(saved: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Loop settings of ``cfg`` that differ from a checkpoint's (fields it predates count as their defaults)."""
    defaults = dataclasses.asdict(TrainConfig())
    changes = {}
    for name, value in dataclasses.asdict(cfg).items():
        old = saved.get(name, defaults[name])
        if old != value:
            changes[name] = (old, value)
    return changes


def _refuse_changes(out: Path, refused: list[str]) -> NoReturn:
    raise ValueError(
        f"--resume continues the run in {out} with the settings it started with; these differ: {', '.join(refused)}. "
        f"Expected the run's model and training settings (only --{', --'.join(SAFE_ON_RESUME)} may change on "
        "resume); start a new run (another --out, or --overwrite) to change the others"
    )


def _data_sha256(data: TrainingData) -> str:
    """SHA-256 of a data set's content: the poses' and the observed mask's bytes, dtypes and shapes."""
    digest = hashlib.sha256()
    for tensor in (data.poses, data.observed):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{array.dtype.str}{array.shape};".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def _data_record(train: TrainingData, val: TrainingData, *, hashed: bool) -> dict[str, Any]:
    """A run's data as checkpoints and ``metrics.json`` record it: the sizes and, when ``hashed`` (a run that writes
    its files), the content hashes that make ``--resume`` refuse other data of the same sizes (computed once)."""
    record: dict[str, Any] = {"train_poses": len(train), "val_poses": len(val)}
    if hashed:
        record.update(train_sha256=_data_sha256(train), val_sha256=_data_sha256(val))
    return record


def _resumed_info(
    saved: dict[str, Any], run_id: str, run_info: dict[str, Any], from_epoch: int, changes: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The run id and run info of a resumed run: the saved run's (``saved``: a checkpoint's state, or
    :func:`_saved_run`'s), with this resume (its epoch, command and changed settings) added to ``resumes``."""
    saved_info = dict(saved.get("run_info") or run_info)
    resumed = {"from_epoch": from_epoch, "command": run_info.get("command"), "changed": changes}
    return saved.get("run_id", run_id), {**saved_info, "resumes": [*saved_info.get("resumes", []), resumed]}


def _check_resumable(
    prior: PosePrior, cfg: TrainConfig, sizes: dict[str, int], run: tuple[str, dict, dict], out: Path
) -> dict[str, tuple[Any, Any]]:
    """Raise ``ValueError`` when a resumed run would not continue the saved run ``run`` (:func:`_saved_run`); return
    the safe changes."""
    model_type, saved, meta = run
    if model_type != prior.model_type:
        raise ValueError(f"--resume: expected a {prior.model_type} run in {out}, got a {model_type} checkpoint")
    current = prior.config.to_dict()
    refused = [
        f"{name} {current.get(name)!r} (the run used {saved.get(name)!r})"
        for name in sorted(set(current) | set(saved))
        if current.get(name) != saved.get(name)
    ]
    changes = _loop_changes(meta["train_config"], cfg) if "train_config" in meta else {}
    refused += [f"{k} {new!r} (the run used {old!r})" for k, (old, new) in changes.items() if k not in SAFE_ON_RESUME]
    if refused:
        _refuse_changes(out, refused)
    then = meta.get("data")
    saved_flags = (meta.get("run_info") or {}).get("data") or {}
    used = ", ".join(
        f"--{name} {' '.join(map(str, value)) if isinstance(value, list) else value}"
        for name, value in saved_flags.items()
        if value is not None
    )
    advice = "pass the same --data_dir, --val_dir, --val_fraction and --fps" + (
        f" (the run used {used})" if used else ""
    )
    if then and (then["train_poses"], then["val_poses"]) != (sizes["train_poses"], sizes["val_poses"]):
        raise ValueError(
            f"--resume: expected the data of the run in {out} ({then['train_poses']} training and "
            f"{then['val_poses']} validation poses), got {sizes['train_poses']} and {sizes['val_poses']}; {advice}"
        )
    # runs saved before data hashes were recorded have none: they resume on the sizes check alone
    changed = [
        f"the {what} data (sha256 {sizes[key][:12]}..., the run's {then[key][:12]}...)"
        for what, key in (("training", "train_sha256"), ("validation", "val_sha256"))
        if then and then.get(key) and sizes.get(key) and then[key] != sizes[key]
    ]
    if changed:
        raise ValueError(
            f"--resume: expected the data of the run in {out}, got other content with the same sizes: "
            f"{' and '.join(changed)} differ; {advice}"
        )
    return changes


def _existing_outputs(out: Path) -> list[str]:
    """Entries of ``out`` other than the lock (empty when ``out`` does not exist)."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if not p.name.startswith(LOCK_NAME))


def _check_output_folder(out: Path, *, resume: bool, overwrite: bool, closed_form: str | None = None) -> None:
    """Refuse an output folder that a run must not write into (a ``ValueError`` says what to pass).
    ``closed_form``: the model type of a family fitted in closed form (its ``--resume`` refits, into a folder that
    holds a finished run of that family only)."""
    if resume and overwrite:
        raise ValueError("expected --resume (continue the run in --out) or --overwrite (replace it), got both")
    if out.exists() and not out.is_dir():
        raise ValueError(f"expected --out to be a folder, got the file {out}")
    if resume and closed_form:
        _closed_form_run(out, closed_form)
    elif resume:
        _checkpoint_meta(out)
    if resume or overwrite:
        return
    held = _existing_outputs(out)
    if held:
        raise ValueError(
            f"expected a new or empty --out folder, got {out} holding {held[:6]}{' ...' if len(held) > 6 else ''}; "
            "pass --resume to continue the run saved there, --overwrite to replace it, or choose another --out"
        )


def _closed_form_run(out: Path, model_type: str) -> dict[str, Any]:
    """The ``metrics.json`` of the finished closed-form run in ``out``; ``ValueError`` unless ``out`` holds one of
    ``model_type``."""
    try:
        summary = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        summary = None
    found = summary.get("model_type") if isinstance(summary, dict) else None
    if found is not None and found != model_type:
        raise ValueError(f"--resume: expected a {model_type} run in {out}, got a {found} run")
    if found is None or not summary.get("closed_form") or not isinstance(summary.get("model_config"), dict):
        raise ValueError(
            f"--resume: expected a finished {model_type} run in {out} (its metrics.json), found none; drop --resume "
            "to start a run"
        )
    return summary


def _saved_run(out: Path, closed_form: str | None) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(model_type, model config dict, state)`` of the run to resume in ``out``: its last checkpoint's, or for a
    family fitted in closed form (``closed_form``: its model type; no checkpoints) its ``metrics.json``'s. The state
    has the checkpoint's keys (``train_config``, ``data``: the sizes and hashes, ``run_info``, ``run_id``, ...)."""
    if closed_form is None:
        folder, meta = _checkpoint_meta(out)
        return (*_checkpoint_model_config(folder), meta)
    summary = _closed_form_run(out, closed_form)
    hashes = summary.get("data_sha256") or {}
    meta = {
        "train_config": summary.get("train_config"),
        "data": {
            "train_poses": summary.get("train_poses"),
            "val_poses": summary.get("val_poses"),
            "train_sha256": hashes.get("train"),
            "val_sha256": hashes.get("val"),
        },
        "run_info": {key: summary[key] for key in ("command", "data", "resumes") if key in summary},
        "run_id": summary.get("run_id"),
    }
    return summary["model_type"], summary["model_config"], {k: v for k, v in meta.items() if v is not None}


def _clear_outputs(out: Path) -> None:
    """Delete an earlier run's files from ``out`` (only :data:`OUTPUT_NAMES`; anything else stays)."""
    for name in OUTPUT_NAMES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _new_run_id(model_type: str) -> str:
    """``<model>-<date>-<time>-<6 random hex digits>`` (from ``os.urandom``: no RNG state is touched)."""
    return f"{model_type}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"


# ---------------------------------------------------------------------------- loggers
class _Logger:
    """Per-run logs: ``log_dir/<run id>/`` (CSV file or TensorBoard events) or a W&B run named by the run id."""

    def __init__(self, kind: str, log_dir: Path, run_config: dict[str, Any], run_id: str | None = None) -> None:
        self.kind, self.writer, self.csv_path = kind, None, None
        self.run_id = run_id or _new_run_id(str(run_config.get("model_type", "run")))
        self.path = log_dir / self.run_id
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("--logger tensorboard needs tensorboard: pip install 'posepriors[train]'") from err
            self.writer = SummaryWriter(log_dir=str(self.path))
        elif kind == "wandb":
            try:
                import wandb
            except ImportError as err:
                raise ImportError("--logger wandb needs wandb: pip install 'posepriors[wandb]'") from err
            log_dir.mkdir(parents=True, exist_ok=True)
            self.writer = wandb.init(
                project="posepriors",
                dir=str(log_dir),
                name=self.run_id,
                id=self.run_id,
                resume="allow",
                config=run_config,
            )
        elif kind == "csv":
            self.path.mkdir(parents=True, exist_ok=True)  # fails now, not after the first epoch, when not writable
            self.csv_path = self.path / "metrics.csv"

    def log(self, metrics: dict[str, float], epoch: int) -> None:
        if self.kind == "tensorboard":
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, epoch)
            self.writer.flush()
        elif self.kind == "wandb":
            self.writer.log(metrics, step=epoch)
        elif self.kind == "csv":
            # The file is rewritten (atomically) every epoch: a column that first appears later (sample metrics)
            # widens the header instead of shifting values, and a resumed run replaces the epochs it repeats.
            fields, rows = ["epoch"], []
            if self.csv_path.is_file():
                with open(self.csv_path, newline="") as handle:
                    reader = csv.DictReader(handle)
                    fields = list(reader.fieldnames or fields)
                    rows = [r for r in reader if (r.get("epoch") or "").isdigit() and int(r["epoch"]) < epoch]
            row = {"epoch": epoch, **metrics}
            fields += [key for key in row if key not in fields]
            with atomic_write(self.csv_path, "w") as handle:
                writer = csv.DictWriter(handle, fieldnames=fields, lineterminator="\n")
                writer.writeheader()
                writer.writerows([*rows, row])

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.writer.close()
        elif self.kind == "wandb":
            self.writer.finish()


# ---------------------------------------------------------------------------- metrics
@torch.no_grad()
def _validate(prior: PosePrior, val: Tensor, batch_size: int) -> dict[str, float]:
    nll = torch.cat([prior.validation_nll(val[i : i + batch_size]) for i in range(0, len(val), batch_size)])
    mean = nll.mean().item()
    metrics = {"val_nll": mean, "val_bits_per_dim": mean / (prior.dim * math.log(2))}
    metrics.update(prior.diagnostics(val[:batch_size]))
    return metrics


@torch.no_grad()
def _sample_metrics(prior: PosePrior, data: Tensor, generator: torch.Generator) -> dict[str, float]:
    samples = prior.sample(1024, generator=generator).to(data.dtype)
    low, high = data.amin(0), data.amax(0)
    return {
        "sample_mean_abs_diff": (samples.mean(0) - data.mean(0)).abs().mean().item(),
        "sample_std_abs_diff": (samples.std(0) - data.std(0)).abs().mean().item(),
        "sample_beyond_range": ((samples < low) | (samples > high)).float().mean().item(),
    }


# ---------------------------------------------------------------------------- the loop
def fit(
    prior: PosePrior,
    train: TrainingData,
    val: TrainingData,
    cfg: TrainConfig,
    *,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    run_info: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``prior`` by minimising ``prior.training_loss`` and keep the epoch with the best validation NLL.

    ``out`` is locked for the whole run (:func:`posepriors.utils.folder_lock`): a second run on the same folder
    raises :class:`~posepriors.utils.FolderLockedError` at once. A non-finite training loss or validation NLL stops
    the run with ``FloatingPointError``; the best model and the last checkpoint (of the last finite epoch) stay.

    Args:
        prior: The prior to train (modified in place; ends with the best epoch's weights).
        train: Training poses (see :func:`prepare_data`), at least 2.
        val: Validation poses, at least 1.
        cfg: Loop settings.
        out: Folder for the best model, checkpoints and ``metrics.json`` (None: write nothing). It must be new or
            empty unless ``resume`` or ``overwrite``.
        resume: Continue the run saved in ``out`` from its last checkpoint. The prior's config and every loop
            setting but :data:`SAFE_ON_RESUME` must equal the run's; the data must have the same sizes and the same
            content (SHA-256 of the poses and observed masks, recorded by runs since the hash was added).
        overwrite: Delete the earlier run's files from ``out`` (:data:`OUTPUT_NAMES`) and start afresh.
        run_info: Extra entries for ``metrics.json`` (e.g. the command line).

    Returns:
        What happened.

    Raises:
        ValueError: On bad settings, an ``out`` that holds another run (without ``resume`` / ``overwrite``), or a
            resume whose settings or data differ from the run's.
        FloatingPointError: When the loss or the validation NLL stops being finite.
    """
    _check_train_config(cfg)
    if prior.conditioning_features:
        raise ValueError(
            f"expected an unconditioned prior, got a {prior.model_type} conditioned on {prior.conditioning_features} "
            "context features: this loop has no contexts to pass; train it in your own loop with "
            "loss = prior.training_loss(pose, context=context) (docs/conventions.md)"
        )
    if len(train) < 2 or len(val) < 1:
        raise ValueError(f"expected at least 2 training poses and 1 validation pose, got {len(train)} and {len(val)}")
    if out is None or int(os.environ.get("RANK", "0")) != 0:
        return _seeded_fit(prior, train, val, cfg, out=out, resume=resume, run_info=run_info)
    out_path = Path(out)
    with folder_lock(out_path):
        closed_form = prior.model_type if prior.closed_form else None
        _check_output_folder(out_path, resume=resume, overwrite=overwrite, closed_form=closed_form)
        if overwrite:
            _clear_outputs(out_path)
        return _seeded_fit(prior, train, val, cfg, out=out_path, resume=resume, run_info=run_info)


def _seeded_fit(
    prior: PosePrior, train: TrainingData, val: TrainingData, cfg: TrainConfig, **kwargs: Any
) -> TrainResult:
    """:func:`_fit` with the global RNGs seeded from ``cfg.seed`` inside ``torch.random.fork_rng``: what the loop
    draws without a generator of its own is reproducible, and the caller's global RNG state is restored after it."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(cfg.seed)
        return _fit(prior, train, val, cfg, **kwargs)


def _fit(
    prior: PosePrior,
    train: TrainingData,
    val: TrainingData,
    cfg: TrainConfig,
    *,
    out: str | os.PathLike | None,
    resume: bool,
    run_info: dict[str, Any] | None,
) -> TrainResult:
    """:func:`fit` once the output folder is locked and checked."""
    if cfg.mirror:
        skeleton.mirror_index(prior.joints)  # raises now, not after the first epoch, when joints lack counterparts
    device = resolve_device(cfg.device)
    if prior.closed_form:  # e.g. gmm: one exact fit (EM) on every training frame, no SGD
        return _fit_closed_form(prior, train, val, cfg, device, out, run_info, resume)
    return _Trainer(prior, train, val, cfg, device, out, run_info).run(resume)


class _Trainer:
    """One SGD run of :func:`fit`, in its steps: setup (``__init__``), :meth:`_resume` or :meth:`_initialise`,
    :meth:`_epoch` (train and validate), :meth:`_record` and :meth:`_checkpoint` after every epoch, and
    :meth:`_finish` (best weights back, ``metrics.json``, summary). :meth:`run` chains them."""

    def __init__(
        self,
        prior: PosePrior,
        train: TrainingData,
        val: TrainingData,
        cfg: TrainConfig,
        device: torch.device,
        out: str | os.PathLike | None,
        run_info: dict[str, Any] | None,
    ) -> None:
        self.prior, self.train, self.val, self.cfg = prior, train, val, cfg
        self.distributed = _init_distributed(device)
        self.rank, self.world = _dist_info()
        if device.type == "cuda" and self.world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        self.device = device
        self.out = Path(out) if out is not None else None
        prior.to(device).train()
        self.generators = {
            "shuffle": torch.Generator().manual_seed(cfg.seed),
            "noise": torch.Generator().manual_seed(cfg.seed + 1),
            "sampling": torch.Generator().manual_seed(cfg.seed + 2),
        }
        self.val_poses = val.complete(torch.Generator().manual_seed(cfg.seed + 3)).to(device)
        self.params = [p for p in prior.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the prior has no trainable parameters; call prior.requires_grad_(True) to train it")
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.scheduler: Any = None
        if cfg.scheduler == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=cfg.max_epochs)
        elif cfg.scheduler == "step":
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
        self.start_epoch, self.history, self.since_best = 0, [], 0
        self.best: dict[str, Any] = {"val_nll": math.inf, "epoch": 0}
        self.sizes = _data_record(train, val, hashed=self.out is not None)
        self.run_id, self.run_info = _new_run_id(prior.model_type), dict(run_info or {})
        self.writer = self.rank == 0 and self.out is not None
        self.global_batch = min(cfg.batch_size, len(train))
        if self.global_batch < self.world:  # a process would get no pose of a batch
            raise ValueError(
                f"expected a batch of at least one pose per process ({self.world} processes), got --batch_size "
                f"{cfg.batch_size} on {len(train)} training poses; pass --batch_size {self.world} or more"
            )
        self.logger: _Logger | None = None

    def run(self, resume: bool) -> TrainResult:
        if resume:
            self._resume()
        else:
            self._initialise()
        model: nn.Module = _LossModule(self.prior)
        if self.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self._open_logger()
        self._prepare_loop()
        epoch = self.start_epoch
        stopped = self.cfg.patience and self.since_best >= self.cfg.patience  # a resumed run that stopped early
        if stopped and self.rank == 0:
            print(
                f"early stop: the run stopped at epoch {epoch}, {self.since_best} epochs after its best "
                f"(--patience {self.cfg.patience}); nothing to train (pass a larger --patience to go on)"
            )
        for epoch in range(self.start_epoch + 1, 0 if stopped else self.cfg.max_epochs + 1):
            metrics = self._epoch(model, epoch)
            self._record(epoch, metrics)
            if self.writer:
                self._checkpoint(epoch)
            if self.cfg.patience and self.since_best >= self.cfg.patience:
                if self.rank == 0:
                    print(f"early stop: no better validation NLL for {self.cfg.patience} epochs")
                break
        return self._finish(epoch)

    # ------------------------------------------------------------------ start
    def _resume(self) -> None:
        """Continue the run saved in ``out``: weights, optimizer, scheduler, RNG states, history and run info."""
        cfg, out = self.cfg, self.out
        if out is None:
            raise ValueError("resume needs the output folder of the interrupted run")
        folder, tensors, meta = _load_checkpoint(out)
        changes = _check_resumable(self.prior, cfg, self.sizes, (*_checkpoint_model_config(folder), meta), out)
        state = load_pretrained(folder, device=self.device, frozen=False).state_dict()
        self.prior.load_state_dict(state, strict=True)
        _optimizer_from_files(self.optimizer, tensors, meta)
        self.start_epoch, self.history, self.best = meta["epoch"], meta["history"], meta["best"]
        scheduler = self.scheduler
        if scheduler is not None and meta.get("scheduler"):
            scheduler.load_state_dict(meta["scheduler"])
            if cfg.scheduler == "cosine" and scheduler.T_max != cfg.max_epochs:
                # the schedule of a run started with the new max_epochs, from the resumed epoch on
                scheduler.T_max = cfg.max_epochs
                for group, base in zip(self.optimizer.param_groups, scheduler.base_lrs, strict=True):
                    cosine = (1 + math.cos(math.pi * self.start_epoch / cfg.max_epochs)) / 2
                    group["lr"] = scheduler.eta_min + (base - scheduler.eta_min) * cosine
        torch.set_rng_state(tensors["rng.torch"])
        for name, gen in self.generators.items():
            gen.set_state(tensors[f"rng.{name}"])
        self.since_best = self.start_epoch - self.best["epoch"]
        self.run_id, self.run_info = _resumed_info(meta, self.run_id, self.run_info, self.start_epoch, changes)
        if self.rank == 0 and self.start_epoch >= cfg.max_epochs:
            print(f"the run in {out} has completed {self.start_epoch} epochs already (max_epochs {cfg.max_epochs})")

    def _initialise(self) -> None:
        """Data-dependent initialisation of a new run (and the closed-form fit of the broad component)."""
        cfg, prior, train = self.cfg, self.prior, self.train
        init = train.complete(torch.Generator().manual_seed(cfg.seed + 4))
        pick = torch.randperm(len(init), generator=torch.Generator().manual_seed(cfg.seed + 5))[:20000]
        prior.initialize_from_data(init[pick].to(self.device))
        if prior.broad is not None:  # closed form, on every training pose (each coordinate where observed)
            prior.fit_broad(train.poses.to(self.device), train.observed.to(self.device))
        if prior.smoothed is not None:  # its own maximum-likelihood fit on noisy poses, before the family's loop
            say = print if self.rank == 0 and cfg.progress else None
            prior.fit_smoothed(train.poses.to(self.device), train.observed.to(self.device), seed=cfg.seed, progress=say)

    def _open_logger(self) -> None:
        cfg, prior = self.cfg, self.prior
        if self.rank == 0 and cfg.logger != "none":
            log_dir = Path(cfg.log_dir) if cfg.log_dir else Path("runs") / prior.model_type
            run_config = {**dataclasses.asdict(cfg), **prior.config.to_dict()}
            self.logger = _Logger(cfg.logger, log_dir, run_config, self.run_id)
            print(f"run {self.run_id}: {cfg.logger} logs in {self.logger.path.resolve()}", flush=True)

    def _prepare_loop(self) -> None:
        """Mixed precision, progress bars and the global batch size of the epochs."""
        cfg = self.cfg
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp else None
        self.progress = _progress_factory(cfg.progress and self.rank == 0)
        if self.global_batch < cfg.batch_size and self.rank == 0:
            warnings.warn(
                f"batch_size {cfg.batch_size} exceeds the {len(self.train)} training poses; using {self.global_batch}",
                stacklevel=4,
            )

    # ------------------------------------------------------------------ epochs
    def _epoch(self, model: nn.Module, epoch: int) -> dict[str, float]:
        """One epoch: a pass over the (completed, augmented, shuffled) training poses, then validation."""
        cfg, prior, device, rank = self.cfg, self.prior, self.device, self.rank
        use_amp, scaler, global_batch = self.use_amp, self.scaler, self.global_batch
        tic = time.perf_counter()
        epoch_rng = torch.Generator().manual_seed((cfg.seed * 100003 + epoch) % 2**64)  # the same below 2**64
        poses = augment(self.train.complete(epoch_rng), prior.joints, cfg.mirror, cfg.input_noise, epoch_rng)
        order = torch.randperm(len(poses), generator=self.generators["shuffle"])
        total, count = 0.0, 0
        bar = self.progress(range(0, len(order) - global_batch + 1, global_batch), f"epoch {epoch}/{cfg.max_epochs}")
        for start in bar:
            batch_index = order[start : start + global_batch][rank :: self.world]
            batch = poses[batch_index].to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=use_amp):
                loss = model(batch, self.generators["noise"])
            if not math.isfinite(loss.item()):  # checked before the step, so the weights stay finite
                reason = f"the training loss became {loss.item()} at epoch {epoch}"
                _stop(reason, epoch, self.best, self.out if self.writer else None)
            self.optimizer.zero_grad(set_to_none=True)
            # DDP averages the processes' gradients; weighing each process's mean by its share of the batch makes
            # that the gradient of the whole batch's mean when the batch does not split evenly (1 on one process)
            weighted = loss * (len(batch_index) * self.world / global_batch)
            if scaler is not None:
                scaler.scale(weighted).backward()
                scaler.unscale_(self.optimizer)
            else:
                weighted.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            if scaler is not None:
                scaler.step(self.optimizer)
                scaler.update()
            else:
                self.optimizer.step()
            total, count = total + loss.item() * len(batch_index), count + len(batch_index)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if self.world > 1:  # the loss over every process's share of the batches, not this process's alone
            local = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
            sums = torch.tensor([total, count], dtype=torch.float64, device=local)
            dist.all_reduce(sums)
            total, count = sums.tolist()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this epoch trained at (the scheduler moves it next)
        if self.scheduler is not None:
            self.scheduler.step()
        prior.eval()
        metrics = {"train_loss": total / max(count, 1), **_validate(prior, self.val_poses, cfg.val_batch_size)}
        if (cfg.sample_every and epoch % cfg.sample_every == 0) or epoch == cfg.max_epochs:
            metrics.update(_sample_metrics(prior, self.val_poses, self.generators["sampling"]))
        prior.train()
        metrics["lr"] = lr
        metrics["epoch_seconds"] = time.perf_counter() - tic
        if not math.isfinite(metrics["val_nll"]):
            reason = f"the validation NLL became {metrics['val_nll']} at epoch {epoch}"
            _stop(reason, epoch, self.best, self.out if self.writer else None)
        return metrics

    def _record(self, epoch: int, metrics: dict[str, float]) -> None:
        """Add an epoch to the history, keep the best model, print and log."""
        self.history.append({"epoch": epoch, **metrics})
        improved = metrics["val_nll"] < self.best["val_nll"]
        if improved:
            self.best = {"val_nll": metrics["val_nll"], "epoch": epoch}
            self.since_best = 0
            if self.writer:
                save_pretrained(self.prior, self.out)
        else:
            self.since_best += 1
        if self.rank == 0:
            flag = " *" if improved else ""
            print(
                f"epoch {epoch:>3}: train {metrics['train_loss']:.3f}  val NLL {metrics['val_nll']:.3f}  "
                f"bits/dim {metrics['val_bits_per_dim']:.3f}{flag}",
                flush=True,
            )
            if self.logger is not None:
                self.logger.log(metrics, epoch)

    def _checkpoint(self, epoch: int) -> None:
        """The epoch's checkpoint (model and training state) in ``out/checkpoints``, and ``last.json``."""
        info = {
            "epoch": epoch,
            "history": self.history,
            "best": self.best,
            "run_id": self.run_id,
            "run_info": self.run_info,
            "train_config": dataclasses.asdict(self.cfg),
            "data": self.sizes,
        }
        _save_checkpoint(self.out, self.prior, self.optimizer, self.scheduler, info, self.generators)

    # ------------------------------------------------------------------ end
    def _finish(self, epoch: int) -> TrainResult:
        """Close the logs, load the best weights back, write ``metrics.json`` and the summary, leave DDP."""
        if self.logger is not None:
            self.logger.close()
        out = self.out
        if out is not None and (out / "model.safetensors").is_file():
            self.prior.load_state_dict(load_pretrained(out, device=self.device, frozen=False).state_dict())
        result = TrainResult(
            self.best["epoch"], self.best["val_nll"], epoch, self.history, out if self.writer else None
        )
        if self.writer:
            extra = {"run_id": self.run_id, **self.run_info}
            _write_summary(out, self.prior, self.cfg, self.sizes, self.history, self.best, extra)
        if self.distributed:
            dist.barrier()
            dist.destroy_process_group()
        return result


def _fit_closed_form(
    prior: PosePrior,
    train: TrainingData,
    val: TrainingData,
    cfg: TrainConfig,
    device: torch.device,
    out: str | os.PathLike | None,
    run_info: dict[str, Any] | None,
    resume: bool,
) -> TrainResult:
    """:func:`fit` for families with ``closed_form = True`` (``gmm``): one ``prior.fit(poses, observed,
    generator=...)`` on every training frame (missing joints handled by the family), recorded as epoch 1 with the
    loop's metrics and files; no SGD, no checkpoints (a rerun gives the same fit). ``resume`` refits the run in
    ``out`` with its settings and data (checked as a checkpoint's are) and keeps its run id."""
    tic = time.perf_counter()
    if cfg.mirror or cfg.input_noise > 0:
        warnings.warn(
            f"{prior.model_type} is fitted in closed form: --mirror and --input_noise are not used", stacklevel=3
        )
    out_path = Path(out) if out is not None else None
    sizes = _data_record(train, val, hashed=out_path is not None)
    run_id, info = _new_run_id(prior.model_type), dict(run_info or {})
    if resume:
        if out_path is None:
            raise ValueError("resume needs the output folder of the run")
        run = _saved_run(out_path, prior.model_type)
        changes = _check_resumable(prior, cfg, sizes, run, out_path)
        run_id, info = _resumed_info(run[2], run_id, info, 1, changes)
    prior.to(device)
    prior.fit(train.poses.to(device), train.observed.to(device), generator=torch.Generator().manual_seed(cfg.seed))
    prior.eval()
    val_poses = val.complete(torch.Generator().manual_seed(cfg.seed + 3)).to(device)
    train_poses = train.complete(torch.Generator().manual_seed(cfg.seed + 4)).to(device)
    metrics = {"train_loss": _validate(prior, train_poses, cfg.val_batch_size)["val_nll"]}
    metrics.update(_validate(prior, val_poses, cfg.val_batch_size))
    metrics.update(_sample_metrics(prior, val_poses, torch.Generator().manual_seed(cfg.seed + 2)))
    metrics["epoch_seconds"] = time.perf_counter() - tic
    history, best = [{"epoch": 1, **metrics}], {"val_nll": metrics["val_nll"], "epoch": 1}
    writer = int(os.environ.get("RANK", "0")) == 0 and out_path is not None
    if int(os.environ.get("RANK", "0")) == 0 and cfg.logger != "none":
        log_dir = Path(cfg.log_dir) if cfg.log_dir else Path("runs") / prior.model_type
        logger = _Logger(cfg.logger, log_dir, {**dataclasses.asdict(cfg), **prior.config.to_dict()}, run_id)
        logger.log(metrics, 1)
        logger.close()
    if writer:
        save_pretrained(prior, out_path)
        extra = {"closed_form": True, "run_id": run_id, **info}
        _write_summary(out_path, prior, cfg, sizes, history, best, extra)
    return TrainResult(1, metrics["val_nll"], 1, history, out_path if writer else None)


def _write_summary(
    out: Path,
    prior: PosePrior,
    cfg: TrainConfig,
    data: dict[str, Any],
    history: list[dict[str, float]],
    best: dict[str, Any],
    extra: dict[str, Any],
) -> None:
    """Write ``metrics.json`` (the best epoch, both configs as used, the data: :func:`_data_record`, the history)
    and print the summary."""
    summary = {
        "model_type": prior.model_type,
        "best_epoch": best["epoch"],
        "val_nll": best["val_nll"],
        "val_bits_per_dim": best["val_nll"] / (prior.dim * math.log(2)),
        "dims": prior.dim,
        "parameters": sum(p.numel() for p in prior.parameters()),
        "train_poses": data["train_poses"],
        "val_poses": data["val_poses"],
        "data_sha256": {"train": data.get("train_sha256"), "val": data.get("val_sha256")},
        "train_config": dataclasses.asdict(cfg),
        "model_config": prior.config.to_dict(),
        "history": history,
        **extra,
    }
    with atomic_write(out / "metrics.json", "w") as handle:
        handle.write(json.dumps(summary, indent=2, sort_keys=True, default=float) + "\n")
    _print_summary(history, best)


def _stop(reason: str, epoch: int, best: dict[str, Any], out: Path | None) -> NoReturn:
    """End a run whose numbers stopped being finite, saying what is kept."""
    if out is None:
        kept = "nothing was written (no output folder)"
    elif epoch > 1:
        kept = (
            f"{out} keeps the best model (epoch {best['epoch']}) and the checkpoint of epoch {epoch - 1}, "
            "the last finite one"
        )
    else:
        kept = f"{out} holds no model (the first epoch did not finish)"
    raise FloatingPointError(
        f"{reason}; the run stopped and {kept}. Lower --learning_rate, set --grad_clip, or check the data for "
        "outliers, then start again (--overwrite)"
    )


def _check_train_config(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` naming the first loop setting that has the wrong type or is out of range."""

    def one_of(values: tuple[str, ...]) -> str:
        quoted = [repr(v) for v in values]
        return ", ".join(quoted[:-1]) + f" or {quoted[-1]}"

    def real(value: Any) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)

    def integer(value: Any) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    def number(low: float, strict: bool = False, off: bool = False) -> Callable[[Any], bool]:
        def ok(value: Any) -> bool:
            if value is None:
                return off
            return real(value) and math.isfinite(value) and (value > low if strict else value >= low)

        return ok

    def count(low: int, high: int | None = None, off: bool = False) -> Callable[[Any], bool]:
        def ok(value: Any) -> bool:
            if value is None:
                return off
            return integer(value) and value >= low and (high is None or value <= high)

        return ok

    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        **{name: (lambda v, values=values: v in values, one_of(values)) for name, values in LOOP_CHOICES.items()},
        "learning_rate": (number(0, strict=True), "a finite number > 0"),
        "weight_decay": (number(0), "a finite number >= 0"),
        "step_size": (count(1), "an integer >= 1 (epochs between decays of the step scheduler)"),
        "gamma": (number(0, strict=True), "a finite number > 0 (the step scheduler's decay factor)"),
        "grad_clip": (number(0, off=True), "a finite number >= 0 (0: no clipping)"),
        "max_epochs": (count(1), "an integer >= 1"),
        "batch_size": (count(1), "an integer >= 1"),
        "patience": (count(0, off=True), "an integer >= 0 (0: no early stopping)"),
        "seed": (count(0, 2**63 - 1), "an integer in [0, 2**63 - 1]"),
        "val_batch_size": (count(1), "an integer >= 1"),
        "sample_every": (count(0), "an integer >= 0 (0: only at the end)"),
        "input_noise": (number(0), "a finite number >= 0"),
    }
    for name, (ok, expected) in checks.items():
        if not ok(getattr(cfg, name)):
            raise ValueError(f"expected {name} {expected}, got {getattr(cfg, name)!r}")
    package, extra = LOGGER_PACKAGES.get(cfg.logger, (None, None))
    spec = importlib.util.find_spec(package) if package is not None else None
    if package is not None and (spec is None or spec.origin is None):  # found now, not after the first epoch
        # (a bare folder of that name, e.g. wandb's own ./wandb run folder, is a namespace package: not it)
        raise ValueError(
            f"expected the package {package} for --logger {cfg.logger}, got none installed: "
            f"pip install 'posepriors[{extra}]', or pass --logger csv"
        )


LOGGER_PACKAGES = {"tensorboard": ("tensorboard", "train"), "wandb": ("wandb", "wandb")}
"""The package each ``--logger`` needs and the extra that installs it."""


def _progress_factory(enabled: bool) -> Any:
    def plain(iterable: Any, desc: str) -> Any:
        return iterable

    if not enabled or not sys.stderr.isatty():
        return plain
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return plain
    return lambda iterable, desc: tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


def _print_summary(history: list[dict[str, float]], best: dict[str, Any]) -> None:
    keys = [
        "train_loss",
        "val_nll",
        "val_bits_per_dim",
        "round_trip_error",
        "reconstruction_deg",
        "sample_beyond_range",
    ]
    keys = [k for k in keys if any(k in h for h in history)]
    print("\n" + " | ".join(["epoch", *keys]))
    rows = history if len(history) <= 12 else history[:3] + history[-9:]
    for h in rows:
        print(" | ".join([f"{int(h['epoch']):>5}", *(f"{h[k]:.4g}" if k in h else "-" for k in keys)]))
    print(f"best epoch {best['epoch']}: val NLL {best['val_nll']:.4f}")


# ---------------------------------------------------------------------------- command line
def _config_fields(config_class: type[PriorConfig]) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_class)]


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's description from the ``Attributes:`` sections of the docstrings of ``cls`` and its bases (the
    flags' help), as plain text."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        text = inspect.getdoc(klass) or ""
        if "\nAttributes:\n" not in text:
            continue
        current = None
        for line in text.split("\nAttributes:\n", 1)[1].splitlines():
            entry = re.match(r"^ {4}(\w+): (.*)$", line)
            if entry:
                current = entry[1]
                docs[current] = entry[2]
            elif current is not None and line.startswith(" " * 8):
                docs[current] += " " + line.strip()
            elif line.strip():  # the next section
                break
    plain = {name: re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "") for name, text in docs.items()}
    return {name: text.replace("%", "%%") for name, text in plain.items()}


def build_parser(model_type: str | None) -> argparse.ArgumentParser:
    """The argument parser of ``posepriors-train`` (with the family flags of ``model_type`` when given)."""
    families = available_model_types()
    parser = argparse.ArgumentParser(
        prog="posepriors-train",
        description="Train a pose prior. Every setting is a flag; the model's flags depend on MODEL "
        "(see `posepriors-train MODEL --help`).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model", choices=sorted(families), help="model family")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data_dir",
        action="append",
        required=model_type is not None,
        type=Path,
        help="training data: a .npz file or a folder (repeatable; e.g. body and hand files)",
    )
    data.add_argument("--val_dir", action="append", type=Path, help="validation data (repeatable); default: a split")
    data.add_argument(
        "--val_fraction", type=float, default=0.1, help="validation share when no --val_dir (by sequence)"
    )
    data.add_argument("--fps", type=float, default=None, help="subsample AMASS sequences to this frame rate")
    run = parser.add_argument_group("run")
    run.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: outputs/<model>); must be new or empty unless --resume or --overwrite; "
        f"locked while the run lasts ({LOCK_NAME} holds the pid), so a second run on it fails at once",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, with the settings it was started with (flags not "
        f"given are taken from it; only --{', --'.join(SAFE_ON_RESUME)} may differ)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace the run in --out: delete its {', '.join(OUTPUT_NAMES)} first (other files stay)",
    )
    run.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help="upload the best model to this Hub repo")
    family = families[model_type] if model_type is not None else None
    defaults = {**dataclasses.asdict(TrainConfig()), **(family.training_defaults if family is not None else {})}
    seed_batch = family.seed_batch_size if family is not None else None
    loop = parser.add_argument_group("training loop")
    helps = {
        "batch_size": "global batch size"
        + (
            f" (the seed used {seed_batch}: too small for ~10k-100k poses on CPU, slow and noisy; "
            "the default is larger with the same learning rate)"
            if seed_batch is not None and seed_batch != defaults["batch_size"]
            else ""
        ),
        "logger": "where to log; every run gets its own sub-folder of --log_dir",
        "log_dir": "folder of the logs (default: runs/<model>); a run logs into <log_dir>/<run id>/",
        "device": "auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps",
    }
    described = _field_docs(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        _add_flag(
            loop,
            f.name,
            defaults[f.name],
            helps.get(f.name, described.get(f.name, f.name.replace("_", " "))),
            f.type,
            choices=LOOP_CHOICES.get(f.name),
        )
    if family is not None:
        group = parser.add_argument_group(f"{model_type} model")
        config_class = family.config_class
        described = _field_docs(config_class)
        for f in _config_fields(config_class):
            default = getattr(config_class(), f.name)
            if f.name == "joints":
                group.add_argument(
                    "--joints",
                    default=None,
                    help="modelled joints: a part spec such as 'body', 'body+left_hand+right_hand', 'hands' "
                    "(default: the family's joints that the training data observes, or the union of --parts; "
                    "when the data observes none of them, the body and hand joints it observes; the log says which)",
                )
                continue
            old = family.flag_aliases.get(f.name)
            names = [f"--{f.name}"] + ([f"--{old}"] if old else [])
            help_text = described.get(f.name, f.name.replace("_", " "))
            help_text += f" (--{old}: its old name, still accepted)" if old else ""
            _add_flag(group, f.name, default, help_text, f.type, names, MODEL_CHOICES.get(f.name))
    return parser


def _add_flag(
    group: Any,
    name: str,
    default: Any,
    help_text: str,
    annotation: Any,
    names: list[str] | None = None,
    choices: tuple[str, ...] | None = None,
) -> None:
    names = names or [f"--{name}"]
    if isinstance(default, bool):
        group.add_argument(*names, dest=name, default=default, action=argparse.BooleanOptionalAction, help=help_text)
    elif isinstance(default, tuple):
        group.add_argument(*names, dest=name, default=default, nargs="*", help=help_text)
    elif default is None:
        group.add_argument(*names, dest=name, default=None, help=help_text)
    else:
        group.add_argument(*names, dest=name, default=default, type=type(default), choices=choices, help=help_text)


def _explicit_flags(parser: argparse.ArgumentParser, argv: list[str], dests: set[str]) -> set[str]:
    """The destinations of the flags given on the command line (not left at their defaults).

    argparse fills in a default only for attributes the namespace lacks, and no parsed flag value is None, so a
    namespace that starts with every destination at None ends with exactly the given flags set.
    """
    namespace = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(dests)))
    return {dest for dest, value in vars(namespace).items() if value is not None}


def _default_joints(
    model_type: str, config_class: type[PriorConfig], parts: Sequence[str], data: PoseData
) -> tuple[tuple[int, ...], str]:
    """The joints to model when ``--joints`` is not given, and a sentence that says why.

    The union of ``parts`` when given; else the family's default joints that the training data observes; else
    (the data observes none of them, e.g. hand data for a body prior) the body and hand joints it observes.
    """
    if parts:
        joints = tuple(sorted({j for spec in parts for j in skeleton.resolve_joints(spec)}))
        return joints, f"{skeleton.describe_joints(joints)} ({len(joints)} joints, the union of --parts)"
    family = config_class().joints
    seen = set(torch.nonzero(data.observed.any(0)).flatten().tolist())
    joints = tuple(j for j in family if j in seen)
    if not joints:
        articulated = {j for part in ("body", "left_hand", "right_hand") for j in skeleton.PARTS[part]}
        joints = tuple(sorted(seen & articulated))
    if not joints:
        raise ValueError(
            f"expected training data with some of {model_type}'s joints ({skeleton.describe_joints(family)}) or any "
            f"body or hand joint, got data that observes {skeleton.describe_joints(sorted(seen))}; pass --joints"
        )
    observed = skeleton.describe_joints(sorted(seen))
    return joints, (
        f"{skeleton.describe_joints(joints)} ({len(joints)} joints; the training data observes {observed}, "
        f"{model_type}'s default is {skeleton.describe_joints(family)}; pass --joints to choose)"
    )


def _model_config(
    args: argparse.Namespace, config_class: type[PriorConfig], data: PoseData, say: Callable[[str], None]
) -> PriorConfig:
    """The model config of a new run from its flags (``--joints`` defaults to the observed joints)."""
    kwargs: dict[str, Any] = {}
    for f in _config_fields(config_class):
        value = getattr(args, f.name, None)
        if f.name != "joints":
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    if getattr(args, "joints", None) is not None:
        return config_class(joints=args.joints, **kwargs)
    joints, note = _default_joints(args.model, config_class, kwargs.get("parts") or (), data)
    try:
        config = config_class(joints=joints, **kwargs)
    except ValueError as err:
        raise ValueError(f"{err} (--joints was not given and defaulted to {note})") from None
    say(f"joints: {note}")
    return config


def _resume_settings(
    out: Path, args: argparse.Namespace, explicit: set[str], config_class: type[PriorConfig], closed_form: str | None
) -> tuple[PriorConfig, dict[str, Any], dict[str, Any]]:
    """Model config, loop settings and data flags of the run in ``out`` (:func:`_saved_run`), with the flags given
    now.

    Flags not given take the run's values. A given flag that differs from the run's is refused (``ValueError``),
    except the loop settings in :data:`SAFE_ON_RESUME`, which take the new value.
    """
    model_type, saved_model, meta = _saved_run(out, closed_form)
    if model_type != args.model:
        raise ValueError(f"--resume: expected a {args.model} run in {out}, got a {model_type} checkpoint")
    saved_config = config_class.from_dict(saved_model)
    given = {}
    for f in _config_fields(config_class):
        if f.name in explicit:
            value = getattr(args, f.name)
            given[f.name] = tuple(value) if isinstance(value, list) else value
    candidate = config_class.from_dict({**saved_model, **given}).to_dict()
    refused = [
        f"--{name} {given[name]!r} (the run used {saved_model.get(name)!r})"
        for name in given
        if candidate[name] != saved_config.to_dict()[name]
    ]
    loop = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if "train_config" in meta:
        defaults = dataclasses.asdict(TrainConfig())
        loop = {name: meta["train_config"].get(name, default) for name, default in defaults.items()}
        for name in defaults:
            if name in explicit and getattr(args, name) != loop[name]:
                if name in SAFE_ON_RESUME:
                    loop[name] = getattr(args, name)
                else:
                    refused.append(f"--{name} {getattr(args, name)!r} (the run used {loop[name]!r})")
    else:
        warnings.warn(
            f"the checkpoint in {out} does not record its training settings; using the flags given", stacklevel=2
        )
    data_flags = {"val_fraction": args.val_fraction, "fps": args.fps}
    saved_data = (meta.get("run_info") or {}).get("data") or {}
    for name in data_flags:
        if name in saved_data:
            if name in explicit and data_flags[name] != saved_data[name]:
                refused.append(f"--{name} {data_flags[name]!r} (the run used {saved_data[name]!r})")
            data_flags[name] = saved_data[name]
    if refused:
        _refuse_changes(out, refused)
    return saved_config, loop, data_flags


def _check_distinct_files(sets: Sequence[tuple[str, PoseData]]) -> None:
    """Refuse a data file read twice (given twice, inside a folder given too, or in both --data_dir and --val_dir):
    its frames would be trained on twice, or validated on while trained on."""
    seen: dict[Path, str] = {}
    for flag, data in sets:
        for file in data.source_files:
            key = Path(file).resolve()
            if key in seen:
                where = f"{flag} twice" if seen[key] == flag else f"{seen[key]} and {flag}"
                both = flag.startswith("--val_dir") != seen[key].startswith("--val_dir")
                why = "validated on the frames it trains on" if both else "trained on twice"
                raise ValueError(
                    f"expected every data file once, got {file} in {where}: the run would be {why}; "
                    "pass each file (or a folder holding it) once"
                )
            seen[key] = flag


def _check_can_push(repo_id: str) -> None:
    """Refuse ``--push_to_hub`` before training when it cannot work: huggingface_hub missing or offline mode."""
    try:
        from huggingface_hub import constants
    except ImportError:
        raise ValueError(
            f"--push_to_hub {repo_id} needs huggingface_hub: pip install huggingface_hub (or drop --push_to_hub)"
        ) from None
    if constants.HF_HUB_OFFLINE:
        raise ValueError(
            f"--push_to_hub {repo_id} needs the network, but HF_HUB_OFFLINE is set; unset it, or train without "
            "--push_to_hub and upload later with posepriors.push_to_hub"
        )


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, innermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders a failed run created (innermost first), as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``posepriors-train``; returns the process exit code.

    Exit codes: 0 when the run finished; 2 (with a message, before any training) for bad flags or data (a data file
    given twice included), an ``--out`` that is in use by another run, holds another run (without ``--resume`` /
    ``--overwrite``) or cannot be written, a ``--resume`` without a checkpoint or with changed settings or data, and
    a ``--push_to_hub`` that cannot work (offline mode); 1 when the run stopped later (a non-finite loss or
    validation NLL, a failed write, a failed upload after training: the model stays in ``--out``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    families = available_model_types()
    model_type = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(model_type if model_type in families else None)
    args = parser.parse_args(argv)
    explicit = _explicit_flags(parser, argv, set(vars(args)))
    family = families[args.model]
    config_class = family.config_class
    out = args.out or Path("outputs") / args.model
    lead = int(os.environ.get("RANK", "0")) == 0  # only rank 0 writes, locks and prints

    def fail(err: BaseException | str, code: int = 2) -> NoReturn:
        parser.exit(code, f"posepriors-train: error: {err}\n")

    def say(text: str) -> None:
        if lead:
            print(text, flush=True)

    with contextlib.ExitStack() as stack:
        closed_form = family.model_type if family.closed_form else None
        try:
            if args.resume and args.overwrite:
                raise ValueError("expected --resume (continue the run in --out) or --overwrite (replace it), got both")
            if lead:
                stack.callback(_remove_if_empty, _missing_folders(out))  # runs after the lock is released
                stack.enter_context(folder_lock(out))
                _check_output_folder(out, resume=args.resume, overwrite=args.overwrite, closed_form=closed_form)
        except (ValueError, FolderLockedError) as err:
            fail(err)
        except OSError as err:
            fail(f"expected a writable --out folder, got {out}: {err}")
        try:
            loop_kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
            data_flags: dict[str, Any] = {"val_fraction": args.val_fraction, "fps": args.fps}
            config = None
            if args.resume:
                config, loop_kwargs, data_flags = _resume_settings(out, args, explicit, config_class, closed_form)
            cfg = TrainConfig(**loop_kwargs)
            _check_train_config(cfg)
            if getattr(config if config is not None else args, "use_conditioning", False):
                raise ValueError(
                    "expected no --use_conditioning: posepriors-train reads no contexts from the data files; train "
                    "a conditioned global_flow in your own loop with loss = prior.training_loss(pose, "
                    "context=context) (docs/conventions.md)"
                )
            if resolve_device(cfg.device).type != "cuda" and cfg.amp and lead:
                warnings.warn("--amp (mixed precision) runs on CUDA only: ignored here", stacklevel=1)
            if args.push_to_hub and lead:
                _check_can_push(args.push_to_hub)
            train_sets = [(f"--data_dir {p}", load_poses(p, fps=data_flags["fps"])) for p in args.data_dir]
            val_sets = [(f"--val_dir {p}", load_poses(p, fps=data_flags["fps"])) for p in args.val_dir or []]
            _check_distinct_files(train_sets + val_sets)
            data = PoseData.concat([d for _, d in train_sets])
            if val_sets:
                val_data = PoseData.concat([d for _, d in val_sets])
            else:
                data, val_data = data.split_by_sequence(data_flags["val_fraction"], seed=cfg.seed)
            if config is None:
                config = _model_config(args, config_class, data, say)
            torch.manual_seed(cfg.seed)  # the model's initial weights come from the global RNG
            prior = family(config)
            train = prepare_data(data, prior.joints, "training")
            val = prepare_data(val_data, prior.joints, "validation")
            if len(train) < 2:
                raise ValueError(f"expected at least 2 training poses, got {len(train)}; add training data")
        except (ValueError, TypeError, OSError) as err:
            fail(err)
        say(
            f"training {args.model} ({sum(p.numel() for p in prior.parameters())} parameters, {prior.num_joints} "
            f"joints) on {len(train)} poses, validating on {len(val)}; output: {out}"
        )
        run_info = {
            "command": "posepriors-train " + " ".join(argv),
            "data": {
                "data_dir": [str(p) for p in args.data_dir],
                "val_dir": [str(p) for p in args.val_dir] if args.val_dir else None,
                **data_flags,
            },
        }
        try:
            result = fit(
                prior, train, val, cfg, out=out, resume=args.resume, overwrite=args.overwrite, run_info=run_info
            )
        except FloatingPointError as err:
            fail(err, 1)
        except (ValueError, FolderLockedError) as err:
            fail(err)
        except OSError as err:
            fail(f"could not write the run's files: {err}", 1)
        except KeyboardInterrupt:
            kept = (Path(out) / "last.json").is_file()
            fail(
                f"interrupted; --out {out} keeps the last finished epoch: continue with --resume"
                if kept
                else f"interrupted before the first epoch finished; nothing was kept in --out {out}",
                130,
            )
    if args.push_to_hub and lead:
        from posepriors import hub

        try:
            commit = hub.push_to_hub(prior, args.push_to_hub)
        except (OSError, ValueError, ImportError, RuntimeError) as err:  # offline, no login, no such repo, ...
            fail(
                f"training finished and the model is kept in --out {out}, but --push_to_hub {args.push_to_hub} "
                f"failed ({type(err).__name__}: {err}); upload it later with "
                f"posepriors.push_to_hub(posepriors.load({str(out)!r}), {args.push_to_hub!r})",
                1,
            )
        print(f"pushed to {args.push_to_hub} (commit {commit})")
    return 0 if math.isfinite(result.best_val_nll) else 1


if __name__ == "__main__":
    sys.exit(main())
