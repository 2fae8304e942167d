"""Small helpers shared across modules: device selection, atomic file writes and output-folder locks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "LOCK_NAME",
    "LOG_2PI",
    "FolderLockedError",
    "atomic_write",
    "floor_eigenvalues",
    "folder_lock",
    "from_numpy",
    "recorded_vjp",
    "resolve_device",
    "sha256_file",
    "storage_key",
    "version_key",
]

LOG_2PI = math.log(2 * math.pi)
"""``log(2 pi)``, the constant of every Gaussian log-density."""


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` for any array a user may pass: sharing its memory where PyTorch can, a copy where it
    cannot (negative strides, as of a reversed clip ``poses[::-1]``, and big-endian data, which ``torch.from_numpy``
    refuses; read-only memory, on which it warns)."""
    if not array.dtype.isnative:  # big-endian data, as some files hold it
        array = array.astype(array.dtype.newbyteorder("="))
    if not array.flags.writeable or any(stride < 0 for stride in array.strides):
        array = np.array(array)  # a writable copy in C order
    return torch.from_numpy(array)


def version_key(tensors: Iterable[torch.Tensor]) -> tuple | None:
    """:func:`storage_key` for a cache whose results are built in the caller's mode: also None in inference mode (the
    result would be an inference tensor, which later autograd refuses) and while a graph to the tensors is recorded
    (grad mode on and one of them requires grad)."""
    tensors = tuple(tensors)
    if torch.is_inference_mode_enabled() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return None
    return storage_key(tensors)


def storage_key(tensors: Iterable[torch.Tensor]) -> tuple | None:
    """A cache key for what is computed from frozen ``tensors``, in or out of inference mode: each one's storage
    address, version counter, dtype and device (``.to`` and ``.double`` swap a parameter's storage and keep its
    version). None (do not cache) when one is an inference tensor (a prior moved or built inside
    ``torch.inference_mode``): it has no version counter, so an in-place change (``load_state_dict`` in inference
    mode) could not be seen. A cache should hold the tensors too, so that a freed tensor's address cannot come back
    with another one's data; what it caches must be built as plain tensors (``torch.inference_mode(False)``), so
    that a later call may record a graph through it."""
    tensors = tuple(tensors)
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


def float64_device(device: torch.device) -> torch.device:
    """Where float64 work for tensors on ``device`` runs: ``device`` itself, or the CPU for MPS, which has no
    float64 (a prior's closed-form fits and folded linear maps; the results are cast before they go back)."""
    return torch.device("cpu") if device.type == "mps" else device


def to_float64(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64 where float64 work runs (:func:`float64_device`): moved there first, then cast."""
    return t.to(float64_device(t.device)).to(torch.float64)


def cast_back(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A result ``t`` of float64 work in ``like``'s dtype on ``like``'s device: cast first (MPS cannot hold float64),
    then moved."""
    return t.to(like.dtype).to(like.device)


def floor_eigenvalues(cov: torch.Tensor, floor: float) -> torch.Tensor:
    """The symmetric matrices (*, D, D) with eigenvalues below ``floor`` raised to it (the nearest such matrices in
    Frobenius norm): the covariance floor of the Gaussian families."""
    eigval, eigvec = torch.linalg.eigh(0.5 * (cov + cov.transpose(-1, -2)))
    out = (eigvec * eigval.clamp_min(floor).unsqueeze(-2)) @ eigvec.transpose(-1, -2)
    return 0.5 * (out + out.transpose(-1, -2))


LOCK_NAME = ".posepriors.lock"
"""Name of the lock file that :func:`folder_lock` creates inside the locked folder."""


def in_transform() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ...) is running: no branching on tensor values there,
    and no ``torch.autograd.Function`` without functorch rules."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def recorded_vjp(
    run: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    inputs: tuple[torch.Tensor | None, ...],
    grads: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor | None, ...]:
    """For a fast path's backward with ``create_graph=True`` (an autograd function whose written-out backward is
    not differentiable again): the vector-Jacobian product with ``grads`` of ``run(*inputs)`` as recorded tensor
    ops, with a graph of its own, so that second derivatives are right instead of silently zero. One gradient per
    input: None for an input that is None or needs no gradient."""
    with torch.enable_grad():
        outputs = run(*inputs)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        found = iter(torch.autograd.grad(outputs, wanted, grads, create_graph=True))
    return tuple(next(found) if t is not None and t.requires_grad else None for t in inputs)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Turn a device spec into a ``torch.device``.

    Args:
        device: ``None`` or ``"auto"`` picks the best available accelerator (cuda > mps > cpu); anything else is
            passed to ``torch.device``.

    Returns:
        The device.
    """
    mps = getattr(torch.backends, "mps", None)
    mps_available = mps is not None and mps.is_available()
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available:
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"expected a device such as 'auto', 'cpu', 'cuda', 'cuda:1' or 'mps', got {device!r}") from err
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"expected an available device ('auto' or 'cpu' here), got {device!r}: CUDA is not available"
            )
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"expected a CUDA device index below {count}, got {device!r}")
    elif resolved.type == "mps" and not mps_available:
        raise ValueError(f"expected an available device ('auto' or 'cpu' here), got {device!r}: MPS is not available")
    return resolved


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Write a file atomically: to a temporary file in the same folder, fsync, then ``os.replace``.

    A crash (even SIGKILL) leaves either the old file or the new one, never a torn file. The file gets the
    permissions of an ordinary new file (``0o666`` minus the process umask), not the ``0o600`` of a temporary file.

    Args:
        path: Destination file.
        mode: ``"wb"`` or ``"w"``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
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


def _umask() -> int:
    """The process umask: from ``/proc/self/status`` on Linux, else by setting it and putting it back (POSIX has no
    read-only call; another thread creating a file in between would see ``0o022``)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------- output-folder locks
class FolderLockedError(RuntimeError):
    """Raised by :func:`folder_lock` when another live process holds the folder's lock."""


_HELD: dict[Path, int] = {}  # lock files this process holds -> nesting depth


def _lock_owner_alive(info: dict) -> bool:
    """Whether the process recorded in a lock file may still run (unknown hosts count as alive)."""
    if info.get("host") != socket.gethostname():
        return True
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return True
    return True


def _read_lock(lock: Path) -> dict | None:
    """The lock file's record; None when it is gone."""
    try:
        text = lock.read_text()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        info = None
    if not isinstance(info, dict):  # being written right now, or torn by a crash: judge by age
        with contextlib.suppress(FileNotFoundError):
            if time.time() - lock.stat().st_mtime > 60:
                return {"pid": -1, "host": socket.gethostname(), "unreadable": True}
        return {"pid": None, "host": None, "unreadable": True}
    return info


def _create_lock(lock: Path) -> bool:
    """Create ``lock`` exclusively with this process's record; False when it exists already."""
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
    return True


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if needed) for the duration of the ``with`` block.

    The lock is a file :data:`LOCK_NAME` inside the folder, created with ``O_EXCL`` and holding this process's pid
    and host; it is removed when the block ends (also on an exception). A lock left behind by a process that died
    (SIGKILL, power loss) is taken over when its pid no longer runs on this host. Nesting in one process is allowed.

    Args:
        folder: The folder to lock.

    Yields:
        The lock file.

    Raises:
        FolderLockedError: When another live process holds the lock.
        OSError: When the folder cannot be created or written (e.g. read-only).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = (folder / LOCK_NAME).resolve()
    if lock in _HELD:
        _HELD[lock] += 1
        try:
            yield lock
        finally:
            _HELD[lock] -= 1
        return
    _acquire(lock)
    _HELD[lock] = 1
    try:
        yield lock
    finally:
        del _HELD[lock]
        with contextlib.suppress(FileNotFoundError):
            info = _read_lock(lock)
            if info is not None and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
                lock.unlink()


def _acquire(lock: Path) -> None:
    for _ in range(3):
        if _create_lock(lock):
            return
        info = _read_lock(lock)
        if info is None:  # released between our two calls
            continue
        if _lock_owner_alive(info):
            since = info.get("since")
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, float) else "?"
            raise FolderLockedError(
                f"{lock.parent} is in use by another run (pid {info.get('pid')} on {info.get('host')}, since "
                f"{when}); expected a folder no other run writes to: wait for that run to end or choose another "
                f"folder (if no such run exists, delete {lock})"
            )
        # A stale lock: take it over. A second file serialises concurrent take-overs, so that two processes that
        # both saw the same stale lock cannot both remove it and each believe it holds a fresh one.
        guard = lock.with_name(lock.name + ".takeover")
        try:
            fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - guard.stat().st_mtime > 60:  # left by a process that died mid take-over
                    guard.unlink()
            time.sleep(0.05)
            continue
        os.close(fd)
        try:
            if _read_lock(lock) == info:
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
            if _create_lock(lock):
                return
        finally:
            with contextlib.suppress(FileNotFoundError):
                guard.unlink()
    info = _read_lock(lock) or {}
    raise FolderLockedError(
        f"{lock.parent} is in use by another run (pid {info.get('pid')} on {info.get('host')}); expected a folder "
        f"no other run writes to: wait for that run to end or choose another folder (if no such run exists, "
        f"delete {lock})"
    )
