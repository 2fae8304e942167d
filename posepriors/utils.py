"""Small helpers shared across modules: device selection and atomic file writes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["atomic_write", "resolve_device", "sha256_file"]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Turn a device spec into a ``torch.device``.

    Args:
        device: ``None`` or ``"auto"`` picks the best available accelerator (cuda > mps > cpu); anything else is
            passed to ``torch.device``.

    Returns:
        The device.
    """
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"expected a device such as 'auto', 'cpu', 'cuda', 'cuda:1' or 'mps', got {device!r}") from err


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Write a file atomically: to a temporary file in the same folder, fsync, then ``os.replace``.

    A crash (even SIGKILL) leaves either the old file or the new one, never a torn file.

    Args:
        path: Destination file.
        mode: ``"wb"`` or ``"w"``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
