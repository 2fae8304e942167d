"""The training loop of every family, and ``posepriors-train`` (plain PyTorch; DDP through ``torchrun``).

``posepriors-train MODEL --data_dir DATA --out DIR`` trains a prior and writes the best model (by validation NLL)
to ``DIR`` as ``config.json`` + ``model.safetensors``, with ``metrics.json`` beside it. ``DIR/checkpoints`` holds
the latest epoch's model and training state (optimizer, scheduler, RNGs: safetensors + JSON, never pickle), and
``DIR/last.json`` points at it; every file is written atomically, so ``--resume`` continues an interrupted run
(even one killed with SIGKILL) from its last completed epoch and gives the same result as an uninterrupted run.

Multi-process: ``torchrun --nproc_per_node 2 -m posepriors.train MODEL ...`` splits every global batch across the
processes (gloo on CPU, nccl on CUDA); only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from posepriors import skeleton
from posepriors.data import PoseData, load_poses
from posepriors.hub import available_model_types, load_pretrained, save_pretrained
from posepriors.priors.base import PosePrior, PriorConfig
from posepriors.utils import atomic_write, resolve_device

__all__ = ["FAMILY_DEFAULTS", "TrainConfig", "TrainResult", "TrainingData", "fit", "main", "prepare_data"]


@dataclass
class TrainConfig:
    """Settings of the training loop (the model's own settings live in its config dataclass).

    Attributes:
        optimizer: ``"adam"`` or ``"adamw"``.
        learning_rate: Initial learning rate.
        weight_decay: Weight decay (decoupled for AdamW).
        scheduler: ``"cosine"`` (to zero over ``max_epochs``), ``"step"`` (x ``gamma`` every ``step_size``
            epochs) or ``"none"``.
        step_size: Epochs between decays of the step scheduler.
        gamma: Decay factor of the step scheduler.
        grad_clip: Max gradient norm (0: off).
        max_epochs: Number of epochs.
        batch_size: Global batch size (split across processes).
        patience: Early-stopping patience in epochs without a better validation NLL (0: off).
        seed: Seed of initialisation, shuffling, pairing and training noise.
        device: ``auto`` (cuda > mps > cpu), ``cpu``, ``cuda``, ``mps``...
        amp: Mixed precision (CUDA only).
        val_batch_size: Batch size of validation passes.
        sample_every: Compute sample statistics every this many epochs (0: only at the end).
        logger: ``tensorboard``, ``csv``, ``wandb`` or ``none``.
        log_dir: Folder of the logs (default ``runs/<model>``).
        progress: Show tqdm progress bars.
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


# The seed's settings, kept as flags; where they are poor on real data the default differs and --help says why.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gaussian": {"learning_rate": 1e-2, "scheduler": "step", "step_size": 30, "max_epochs": 20, "batch_size": 1024},
    "joint_flow": {
        "learning_rate": 1e-3,
        "weight_decay": 1e-5,
        "grad_clip": 1.0,
        "max_epochs": 50,
        "batch_size": 256,
        "scheduler": "cosine",
    },
    "global_flow": {
        "learning_rate": 1e-3,
        "max_epochs": 30,
        "batch_size": 256,
        "scheduler": "cosine",
        "grad_clip": 1.0,
    },
    "hand_vae": {"learning_rate": 3e-4, "max_epochs": 100, "batch_size": 8192, "scheduler": "cosine"},
    "gmm": {"learning_rate": 1e-2, "max_epochs": 20, "batch_size": 1024},
}
SEED_BATCH_SIZES = {"gaussian": 32, "joint_flow": 16, "global_flow": 32}
ALIASES = {"num_layers": "K", "variant": "model_type"}


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


def _load_checkpoint(out: Path) -> tuple[Path, dict[str, Tensor], dict[str, Any]]:
    pointer = out / "last.json"
    if not pointer.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {out} (expected {pointer}); start without --resume")
    folder = out / json.loads(pointer.read_text())["checkpoint"]
    tensors = load_file(str(folder / "training_state.safetensors"))
    meta = json.loads((folder / "training_state.json").read_text())
    return folder, tensors, meta


# ---------------------------------------------------------------------------- loggers
class _Logger:
    def __init__(self, kind: str, log_dir: Path, run_config: dict[str, Any]) -> None:
        self.kind, self.writer, self.csv_path = kind, None, None
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("--logger tensorboard needs tensorboard: pip install 'posepriors[train]'") from err
            self.writer = SummaryWriter(log_dir=str(log_dir))
        elif kind == "wandb":
            try:
                import wandb
            except ImportError as err:
                raise ImportError("--logger wandb needs wandb: pip install 'posepriors[wandb]'") from err
            self.writer = wandb.init(project="posepriors", dir=str(log_dir), config=run_config)
        elif kind == "csv":
            log_dir.mkdir(parents=True, exist_ok=True)
            self.csv_path = log_dir / "metrics.csv"

    def log(self, metrics: dict[str, float], epoch: int) -> None:
        if self.kind == "tensorboard":
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, epoch)
            self.writer.flush()
        elif self.kind == "wandb":
            self.writer.log(metrics, step=epoch)
        elif self.kind == "csv":
            new = not self.csv_path.exists()
            with open(self.csv_path, "a", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=["epoch", *metrics])
                if new:
                    writer.writeheader()
                writer.writerow({"epoch": epoch, **metrics})

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
    round_trip = getattr(prior, "round_trip_error", None)
    if round_trip is not None:
        metrics["round_trip_error"] = round_trip(val[:batch_size]).item()
    recon = getattr(prior, "reconstruction_error", None)
    if recon is not None:
        metrics["reconstruction_deg"] = recon(val[:batch_size]).item()
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
    run_info: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``prior`` by minimising ``prior.training_loss`` and keep the epoch with the best validation NLL.

    Args:
        prior: The prior to train (modified in place; ends with the best epoch's weights).
        train: Training poses (see :func:`prepare_data`).
        val: Validation poses.
        cfg: Loop settings.
        out: Folder for the best model, checkpoints and ``metrics.json`` (None: write nothing).
        resume: Continue from ``out``'s last checkpoint.
        run_info: Extra entries for ``metrics.json`` (e.g. the command line).

    Returns:
        What happened.
    """
    _check_train_config(cfg)
    device = resolve_device(cfg.device)
    distributed = _init_distributed(device)
    rank, world = _dist_info()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    out_path = Path(out) if out is not None else None
    torch.manual_seed(cfg.seed)
    prior.to(device).train()
    shuffle = torch.Generator().manual_seed(cfg.seed)
    noise = torch.Generator().manual_seed(cfg.seed + 1)
    sampling = torch.Generator().manual_seed(cfg.seed + 2)
    val_poses = val.complete(torch.Generator().manual_seed(cfg.seed + 3)).to(device)
    params = [p for p in prior.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the prior has no trainable parameters; call prior.requires_grad_(True) to train it")
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.scheduler == "cosine":
        scheduler: Any = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.max_epochs)
    elif cfg.scheduler == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    else:
        scheduler = None

    start_epoch, history, since_best = 0, [], 0
    best = {"val_nll": math.inf, "epoch": 0}
    if resume:
        if out_path is None:
            raise ValueError("resume needs the output folder of the interrupted run")
        folder, tensors, meta = _load_checkpoint(out_path)
        state = load_pretrained(folder, device=device, frozen=False).state_dict()
        prior.load_state_dict(state, strict=True)
        _optimizer_from_files(optimizer, tensors, meta)
        if scheduler is not None and meta.get("scheduler"):
            scheduler.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        for name, gen in (("shuffle", shuffle), ("noise", noise), ("sampling", sampling)):
            gen.set_state(tensors[f"rng.{name}"])
        start_epoch, history, best = meta["epoch"], meta["history"], meta["best"]
        since_best = start_epoch - best["epoch"]
    else:
        init = train.complete(torch.Generator().manual_seed(cfg.seed + 4))
        pick = torch.randperm(len(init), generator=torch.Generator().manual_seed(cfg.seed + 5))[:20000]
        prior.initialize_from_data(init[pick].to(device))

    model: nn.Module = _LossModule(prior)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    writer = rank == 0 and out_path is not None
    logger = None
    if rank == 0 and cfg.logger != "none":
        log_dir = Path(cfg.log_dir) if cfg.log_dir else Path("runs") / prior.model_type
        logger = _Logger(cfg.logger, log_dir, {**dataclasses.asdict(cfg), **prior.config.to_dict()})
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    progress = _progress_factory(cfg.progress and rank == 0)
    global_batch = min(cfg.batch_size, len(train))
    if global_batch < cfg.batch_size and rank == 0:
        warnings.warn(
            f"batch_size {cfg.batch_size} exceeds the {len(train)} training poses; using {global_batch}", stacklevel=2
        )
    epoch = start_epoch
    for epoch in range(start_epoch + 1, cfg.max_epochs + 1):
        tic = time.perf_counter()
        poses = train.complete(torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        order = torch.randperm(len(poses), generator=shuffle)
        total, count = 0.0, 0
        bar = progress(range(0, len(order) - global_batch + 1, global_batch), f"epoch {epoch}/{cfg.max_epochs}")
        for start in bar:
            batch_index = order[start : start + global_batch][rank::world]
            batch = poses[batch_index].to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=use_amp):
                loss = model(batch, noise)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(
                    f"training loss became {loss.item()} at epoch {epoch}; lower the learning rate or set --grad_clip"
                )
            total, count = total + loss.item(), count + 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if scheduler is not None:
            scheduler.step()
        prior.eval()
        metrics = {"train_loss": total / max(count, 1), **_validate(prior, val_poses, cfg.val_batch_size)}
        if (cfg.sample_every and epoch % cfg.sample_every == 0) or epoch == cfg.max_epochs:
            metrics.update(_sample_metrics(prior, val_poses, sampling))
        prior.train()
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        metrics["epoch_seconds"] = time.perf_counter() - tic
        history.append({"epoch": epoch, **metrics})
        improved = metrics["val_nll"] < best["val_nll"]
        if improved:
            best = {"val_nll": metrics["val_nll"], "epoch": epoch}
            since_best = 0
            if writer:
                save_pretrained(prior, out_path)
        else:
            since_best += 1
        if rank == 0:
            flag = " *" if improved else ""
            print(
                f"epoch {epoch:>3}: train {metrics['train_loss']:.3f}  val NLL {metrics['val_nll']:.3f}  "
                f"bits/dim {metrics['val_bits_per_dim']:.3f}{flag}",
                flush=True,
            )
            if logger is not None:
                logger.log(metrics, epoch)
        if writer:
            info = {"epoch": epoch, "history": history, "best": best}
            _save_checkpoint(
                out_path, prior, optimizer, scheduler, info, {"shuffle": shuffle, "noise": noise, "sampling": sampling}
            )
        if cfg.patience and since_best >= cfg.patience:
            if rank == 0:
                print(f"early stop: no better validation NLL for {cfg.patience} epochs")
            break
    if logger is not None:
        logger.close()
    if out_path is not None and (out_path / "model.safetensors").is_file():
        prior.load_state_dict(load_pretrained(out_path, device=device, frozen=False).state_dict())
    result = TrainResult(best["epoch"], best["val_nll"], epoch, history, out_path if writer else None)
    if writer:
        summary = {
            "model_type": prior.model_type,
            "best_epoch": best["epoch"],
            "val_nll": best["val_nll"],
            "val_bits_per_dim": best["val_nll"] / (prior.dim * math.log(2)),
            "dims": prior.dim,
            "parameters": sum(p.numel() for p in prior.parameters()),
            "train_poses": len(train),
            "val_poses": len(val),
            "train_config": dataclasses.asdict(cfg),
            "model_config": prior.config.to_dict(),
            "history": history,
            **(run_info or {}),
        }
        with atomic_write(out_path / "metrics.json", "w") as handle:
            handle.write(json.dumps(summary, indent=2, sort_keys=True, default=float) + "\n")
        _print_summary(history, best)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return result


def _check_train_config(cfg: TrainConfig) -> None:
    checks = {
        "optimizer": (cfg.optimizer in ("adam", "adamw"), "'adam' or 'adamw'"),
        "scheduler": (cfg.scheduler in ("cosine", "step", "none"), "'cosine', 'step' or 'none'"),
        "logger": (cfg.logger in ("tensorboard", "csv", "wandb", "none"), "'tensorboard', 'csv', 'wandb' or 'none'"),
        "learning_rate": (cfg.learning_rate > 0, "> 0"),
        "batch_size": (cfg.batch_size >= 1, ">= 1"),
        "max_epochs": (cfg.max_epochs >= 1, ">= 1"),
        "grad_clip": (cfg.grad_clip >= 0, ">= 0"),
        "weight_decay": (cfg.weight_decay >= 0, ">= 0"),
    }
    for name, (ok, expected) in checks.items():
        if not ok:
            raise ValueError(f"expected {name} {expected}, got {getattr(cfg, name)!r}")


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
    data.add_argument(
        "--num_workers",
        type=int,
        default=0,
        help="data loading workers (data is held in memory; kept for compatibility, 0 is fastest)",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path, default=None, help="output folder (default: outputs/<model>)")
    run.add_argument("--resume", action="store_true", help="continue from --out's last checkpoint")
    run.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help="upload the best model to this Hub repo")
    defaults = {**dataclasses.asdict(TrainConfig()), **FAMILY_DEFAULTS.get(model_type or "", {})}
    loop = parser.add_argument_group("training loop")
    helps = {
        "batch_size": "global batch size"
        + (
            f" (the seed used {SEED_BATCH_SIZES[model_type]}: too small for ~10k-100k poses on CPU, slow and noisy; "
            "the default is larger with the same learning rate)"
            if model_type in SEED_BATCH_SIZES
            else ""
        ),
        "logger": "tensorboard, csv, wandb or none",
        "device": "auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps",
    }
    for f in dataclasses.fields(TrainConfig):
        _add_flag(loop, f.name, defaults[f.name], helps.get(f.name, f.name.replace("_", " ")), f.type)
    if model_type is not None:
        group = parser.add_argument_group(f"{model_type} model")
        config_class = families[model_type].config_class
        for f in _config_fields(config_class):
            default = getattr(config_class(), f.name)
            if f.name == "joints":
                group.add_argument(
                    "--joints",
                    default=None,
                    help="modelled joints: a part spec such as 'body', "
                    "'body+left_hand+right_hand', 'hands' (default: the family's)",
                )
                continue
            names = [f"--{f.name}"] + ([f"--{ALIASES[f.name]}"] if f.name in ALIASES else [])
            _add_flag(group, f.name, default, f.name.replace("_", " "), f.type, names)
    return parser


def _add_flag(
    group: Any, name: str, default: Any, help_text: str, annotation: Any, names: list[str] | None = None
) -> None:
    names = names or [f"--{name}"]
    if isinstance(default, bool):
        group.add_argument(*names, dest=name, default=default, action=argparse.BooleanOptionalAction, help=help_text)
    elif isinstance(default, tuple):
        group.add_argument(*names, dest=name, default=default, nargs="*", help=help_text)
    elif default is None:
        group.add_argument(*names, dest=name, default=None, help=help_text)
    else:
        group.add_argument(*names, dest=name, default=default, type=type(default), help=help_text)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``posepriors-train``; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    families = available_model_types()
    model_type = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(model_type if model_type in families else None)
    args = parser.parse_args(argv)
    config_class = families[args.model].config_class
    model_kwargs = {}
    for f in _config_fields(config_class):
        value = getattr(args, f.name, None)
        if f.name == "joints":
            if value is not None:
                model_kwargs["joints"] = value
            continue
        model_kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    loop_kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    try:
        config = config_class(**model_kwargs)
        cfg = TrainConfig(**loop_kwargs)
        _check_train_config(cfg)
        torch.manual_seed(cfg.seed)  # the model's initial weights come from the global RNG
        prior = families[args.model](config)
        data = PoseData.concat([load_poses(p, fps=args.fps) for p in args.data_dir])
        if args.val_dir:
            val_data = PoseData.concat([load_poses(p, fps=args.fps) for p in args.val_dir])
        else:
            data, val_data = data.split_by_sequence(args.val_fraction, seed=cfg.seed)
        train = prepare_data(data, prior.joints, "training")
        val = prepare_data(val_data, prior.joints, "validation")
    except (ValueError, FileNotFoundError, TypeError) as err:
        parser.exit(2, f"posepriors-train: error: {err}\n")
    out = args.out or Path("outputs") / args.model
    rank, _ = _dist_info()
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"training {args.model} ({sum(p.numel() for p in prior.parameters())} parameters, {prior.num_joints} "
            f"joints) on {len(train)} poses, validating on {len(val)}; output: {out}"
        )
    result = fit(
        prior, train, val, cfg, out=out, resume=args.resume, run_info={"command": "posepriors-train " + " ".join(argv)}
    )
    if args.push_to_hub and int(os.environ.get("RANK", "0")) == 0:
        from posepriors.hub import push_to_hub

        commit = push_to_hub(prior, args.push_to_hub)
        print(f"pushed to {args.push_to_hub} (commit {commit})")
    return 0 if math.isfinite(result.best_val_nll) else 1


if __name__ == "__main__":
    sys.exit(main())
