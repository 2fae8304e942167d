"""Saving and loading priors: ``config.json`` + ``model.safetensors``, the weights manifest, the Hub.

A saved prior is a folder with two files:

- ``config.json``: ``{"format_version": 1, "model_type": ..., "config": {...}, "posepriors_version": ...}``,
  keys sorted;
- ``model.safetensors``: the ``state_dict``, loaded back with ``strict=True``. Its header metadata records
  ``data_sha256``, the SHA-256 of the tensor data (every byte after the header), so the file carries its own
  checksum wherever it is copied (a folder, the Hub) and older readers simply ignore it.

:func:`load` resolves a name or a path in this order: a local folder, weights bundled inside the package, the
Hugging Face Hub (``hf_hub_download`` at the manifest's pinned revision). Every file that comes from the bundle or
the Hub is checked against the SHA-256 in ``weights_manifest.json`` before it is read. Every weights file with a
``data_sha256`` is checked against it on load (a mismatch is an error); a local folder written before checksums
existed loads with a warning that suggests re-saving it. Weights with NaN or Inf values are refused in any case.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from posepriors.priors.base import MODEL_TYPES, PosePrior, register_model
from posepriors.utils import atomic_write, resolve_device, sha256_file

__all__ = [
    "CHECKSUM_KEY",
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "MANIFEST_PATH",
    "WEIGHTS_NAME",
    "ManifestEntry",
    "available_model_types",
    "list_models",
    "load",
    "load_pretrained",
    "push_to_hub",
    "read_manifest",
    "register_model",
    "save_pretrained",
    "verify_files",
    "verify_weights",
]

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CHECKSUM_KEY = "data_sha256"
"""Key of the tensor data's SHA-256 in the safetensors header metadata."""
PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_DIR = PACKAGE_DIR / "weights"
MANIFEST_PATH = PACKAGE_DIR / "weights_manifest.json"


def available_model_types() -> dict[str, type[PosePrior]]:
    """The registered families, ``model_type -> class``."""
    import posepriors.priors  # noqa: F401  (registers the built-in families)

    return dict(MODEL_TYPES)


# ---------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class ManifestEntry:
    """One named model in ``weights_manifest.json``.

    Attributes:
        name: The name passed to :func:`load`.
        model_type: The family (``gaussian``, ``joint_flow``, ...).
        description: One line for :func:`list_models`.
        files: ``filename -> {"sha256": ..., "size": ...}``.
        repo_id: Hub repository that hosts the files.
        revision: Pinned 40-hex commit of that repository, or ``None`` while unpublished.
        subfolder: Folder of the files inside the repository (and inside the package's ``weights/``).
        bundled: Whether the files ship inside the package.
        extra: The remaining fields (licence, training data and command, metrics).
    """

    name: str
    model_type: str
    description: str
    files: dict[str, dict[str, Any]]
    repo_id: str | None = None
    revision: str | None = None
    subfolder: str | None = None
    bundled: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def read_manifest(path: str | os.PathLike | None = None) -> dict[str, ManifestEntry]:
    """Read a weights manifest (the package's own by default).

    Args:
        path: A manifest JSON file; ``None`` for the bundled ``weights_manifest.json``.

    Returns:
        ``name -> ManifestEntry``.
    """
    path = Path(path) if path is not None else MANIFEST_PATH
    if not path.is_file():
        raise FileNotFoundError(f"weights manifest not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"weights manifest {path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict):
        got = f"keys {sorted(raw)}" if isinstance(raw, dict) else f"a JSON {type(raw).__name__}"
        raise ValueError(f"expected a manifest with a 'models' object, got {got} in {path}")
    hub = raw.get("hub", {})
    if not isinstance(hub, dict):
        raise ValueError(f"expected the manifest's 'hub' to be an object (repo_id, revision), got {hub!r} in {path}")
    entries = {}
    known = {"model_type", "description", "files", "repo_id", "revision", "subfolder", "bundled"}
    for name, item in raw["models"].items():
        if not isinstance(item, dict):
            raise ValueError(f"expected manifest entry {name!r} in {path} to be an object, got {type(item).__name__}")
        missing = {"model_type", "files"} - set(item)
        if missing:
            raise ValueError(f"manifest entry {name!r} in {path} lacks {sorted(missing)}")
        _check_manifest_files(name, item["files"], path)
        revision = item.get("revision", hub.get("revision"))
        if revision is not None and not (isinstance(revision, str) and re.fullmatch(r"[0-9a-f]{40}", revision)):
            raise ValueError(
                f"manifest entry {name!r} in {path}: expected its Hub revision to be a pinned commit (40 lowercase "
                f"hex digits) or null, got {revision!r} (a branch or tag moves, and the SHA-256 values would not hold)"
            )
        entries[name] = ManifestEntry(
            name=name,
            model_type=item["model_type"],
            description=item.get("description", ""),
            files=item["files"],
            repo_id=item.get("repo_id", hub.get("repo_id")),
            revision=revision,
            subfolder=item.get("subfolder", name),
            bundled=bool(item.get("bundled", False)),
            extra={k: v for k, v in item.items() if k not in known},
        )
    return entries


def _check_manifest_files(name: str, files: Any, path: Path) -> None:
    """Every file of a manifest entry needs a 64-hex ``sha256`` (and, optionally, an integer ``size``)."""
    if not isinstance(files, dict) or not files:
        raise ValueError(
            f"expected manifest entry {name!r} in {path} to list its files as "
            f'{{"<filename>": {{"sha256": ..., "size": ...}}}}, got {files!r}'
        )
    for filename, info in files.items():
        digest = info.get("sha256") if isinstance(info, dict) else None
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(
                f"manifest entry {name!r} in {path}: expected file {filename!r} to have a 'sha256' of 64 lowercase "
                f"hex digits, got {info!r}"
            )
        size = info.get("size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ValueError(
                f"manifest entry {name!r} in {path}: expected file {filename!r} to have an integer 'size' >= 0, "
                f"got {size!r}"
            )


def list_models() -> dict[str, str]:
    """Names that :func:`load` accepts, each with a one-line description."""
    return {name: entry.description for name, entry in read_manifest().items()}


# ---------------------------------------------------------------------------- save / load a folder
def save_pretrained(prior: PosePrior, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for ``prior`` into ``directory``.

    Both files are written atomically (temporary file, then rename), so an interrupted save never leaves a torn
    file behind. The weights file records the SHA-256 of its tensor data in its header metadata
    (:data:`CHECKSUM_KEY`), which :func:`load_pretrained` checks.

    Args:
        prior: The prior to save.
        directory: Destination folder (created if needed).

    Returns:
        The folder.
    """
    if not isinstance(prior, PosePrior):
        raise TypeError(f"expected a PosePrior, got {type(prior).__name__}")
    from posepriors import __version__

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"expected a folder to save the prior into, got {directory}, which is a file")
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in prior.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"expected finite weights, but {bad[:5]} hold NaN or Inf values (a diverged training run?); "
            "not saving a prior that cannot score poses"
        )
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format_version": FORMAT_VERSION,
        "model_type": prior.model_type,
        "config": prior.config.to_dict(),
        "posepriors_version": __version__,
    }
    with atomic_write(directory / WEIGHTS_NAME, "wb") as handle:
        handle.write(_weights_bytes(state, {"format": "pt", "model_type": prior.model_type}))
    with atomic_write(directory / CONFIG_NAME, "w") as handle:
        handle.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def _weights_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialise ``state`` as safetensors with the SHA-256 of the tensor data in the header metadata."""
    plain = safetensors_bytes(state, metadata=metadata)
    data = plain[8 + int.from_bytes(plain[:8], "little") :]
    out = safetensors_bytes(state, metadata={**metadata, CHECKSUM_KEY: hashlib.sha256(data).hexdigest()})
    if out[8 + int.from_bytes(out[:8], "little") :] != data:  # pragma: no cover - the layout ignores metadata
        raise RuntimeError("safetensors laid out the same tensors differently; cannot record their checksum")
    return out


def verify_weights(path: str | os.PathLike) -> bool:
    """Check a safetensors file against the SHA-256 of its tensor data recorded by :func:`save_pretrained`.

    Args:
        path: A ``model.safetensors`` file.

    Returns:
        ``True`` when the file records a checksum and it matches; ``False`` when it records none (written before
        checksums existed, or by another tool).

    Raises:
        ValueError: When the header cannot be read or the tensor data does not match the recorded checksum.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= size - 8:
            raise ValueError(f"could not read {path}: not a valid safetensors file (header length {length})")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"could not read {path}: not a valid safetensors file (header: {err})") from err
        metadata = header.get("__metadata__") if isinstance(header, dict) else None
        expected = metadata.get(CHECKSUM_KEY) if isinstance(metadata, dict) else None
        if expected is None:
            return False
        digest = hashlib.sha256()
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise ValueError(
            f"checksum mismatch for {path}: its header records tensor data with SHA-256 {expected}, the file holds "
            f"{digest.hexdigest()}; the file is corrupted (or was edited): restore it from where it came from "
            "or save the model again"
        )
    return True


def load_pretrained(
    directory: str | os.PathLike,
    *,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
    frozen: bool = True,
) -> PosePrior:
    """Build a prior from a folder written by :func:`save_pretrained` (strict: unknown keys are errors).

    The weights are checked against the checksum in their header (:func:`verify_weights`); a file without one
    (saved before checksums existed) loads with a warning. Weights with NaN or Inf values are refused.

    Args:
        directory: Folder holding ``config.json`` and ``model.safetensors``.
        device: Where to put the prior (``"auto"`` picks cuda > mps > cpu).
        dtype: Optional floating dtype to convert the parameters to (default: the dtype they were saved in).
        frozen: Return the prior in eval mode with ``requires_grad=False`` on every parameter.

    Returns:
        The prior.
    """
    _check_dtype(dtype)
    return _load_folder(Path(directory), device=device, dtype=dtype, frozen=frozen, verified=False)


def _check_dtype(dtype: Any) -> None:
    """A clear error for a ``dtype=`` that is not a floating torch dtype (before any file is read or fetched)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"expected dtype to be None or a floating torch.dtype such as torch.float64, got {dtype!r}")


@torch.inference_mode(False)  # plain tensors even when called inside inference mode: they may take part in autograd
def _load_folder(
    directory: Path,
    *,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    frozen: bool,
    verified: bool,
    entry: ManifestEntry | None = None,
) -> PosePrior:
    """:func:`load_pretrained`; ``verified``: the files were already checked against a manifest (no warning for a
    weights file without its own checksum); ``entry``: the manifest entry the files were resolved from, whose
    ``model_type`` the config must name."""
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"expected {CONFIG_NAME} and {WEIGHTS_NAME} in {directory}, but {path.name} is missing"
            )
    raw = _read_config(config_path)
    if entry is not None and raw["model_type"] != entry.model_type:
        raise ValueError(
            f"manifest entry {entry.name!r} declares model_type {entry.model_type!r}, but {config_path} holds a "
            f"{raw['model_type']!r} prior: the manifest and the model's files disagree; correct the entry's "
            "model_type, or its files and their sha256"
        )
    try:
        prior = build_from_config(raw)
    except (TypeError, ValueError) as err:
        raise type(err)(f"invalid {config_path}: {err}") from err
    if not verify_weights(weights_path) and not verified:
        warnings.warn(
            f"{weights_path} records no checksum (saved before posepriors wrote one), so corruption cannot be "
            "detected; add one by saving it again: posepriors.save_pretrained(posepriors.load(folder), folder)",
            stacklevel=3,
        )
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"could not read {weights_path}: not a valid safetensors file ({err})") from err
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"weights in {weights_path} hold NaN or Inf values (in {bad[:5]}); the file is corrupted")
    try:
        prior.load_state_dict(state, strict=True)
    except RuntimeError as err:  # torch lists every mismatch on a line of its own: the first few, on one line
        lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        detail = "; ".join(lines[:3]) + (f"; and {len(lines) - 3} more" if len(lines) > 3 else "")
        raise ValueError(
            f"weights in {weights_path} do not match the config in {config_path} (edited, or from another model): "
            f"{detail or err}"
        ) from err
    device = resolve_device(device)
    if device.type == "mps" and dtype == torch.float64:
        raise ValueError("expected a dtype that MPS supports, got torch.float64: load on device='cpu' for float64")
    if dtype is None:  # keep the saved precision (a float64 prior comes back in float64)
        saved = {v.dtype for v in state.values() if v.is_floating_point()}
        dtype = saved.pop() if len(saved) == 1 else None
        if dtype == torch.float64 and device.type == "mps":
            warnings.warn(
                f"{weights_path} holds float64 weights; MPS has no float64, so they load as float32", stacklevel=3
            )
            dtype = torch.float32
    if dtype is not None:  # cast first: MPS cannot hold the float64 a prior may have been saved in
        prior = prior.to(dtype=dtype)
        prior._check_precision()  # a flow in float16: refused here rather than at its first call
    prior = prior.to(device=device)
    if frozen:
        prior.eval()
        prior.requires_grad_(False)
    return prior


def _read_config(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"expected a JSON object in {path}, got {type(raw).__name__}")
    expected = {"format_version", "model_type", "config"}
    missing, unknown = expected - set(raw), set(raw) - expected - {"posepriors_version"}
    if missing or unknown:
        raise ValueError(
            f"expected {path.name} with keys {sorted(expected)} (+ posepriors_version), "
            f"missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    if raw["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {raw['format_version']!r}; this posepriors reads {FORMAT_VERSION}")
    return raw


def build_from_config(raw: Mapping[str, Any]) -> PosePrior:
    """Construct an untrained prior from a parsed ``config.json``."""
    families = available_model_types()
    model_type = raw["model_type"]
    if model_type not in families:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {sorted(families)}")
    cls = families[model_type]
    return cls(cls.config_class.from_dict(raw["config"]))


# ---------------------------------------------------------------------------- load by name
def load(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    frozen: bool = True,
    manifest: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    endpoint: str | None = None,
    local_files_only: bool = False,
) -> PosePrior:
    """Load a pretrained prior by name or from a folder.

    Resolution order: an existing local folder; a name from :func:`list_models` whose weights are bundled in the
    package; the same name on the Hugging Face Hub at the manifest's pinned revision (downloaded once into the
    Hub cache). Bundled and downloaded files are checked against the manifest's SHA-256.

    The returned prior is ready for inference: eval mode and frozen parameters, so that in a fitting loop
    ``prior.nll(pose).backward()`` only computes gradients for the pose. Pass ``frozen=False`` (or call
    ``.train()`` and ``.requires_grad_(True)``) to fine-tune.

    Args:
        name_or_path: A manifest name (e.g. ``"global_flow"``) or a folder with ``config.json`` and
            ``model.safetensors``.
        device: Device of the returned prior (``"auto"``: cuda > mps > cpu).
        dtype: Optional floating dtype (e.g. ``torch.float64``).
        revision: Hub revision to load instead of the pinned one (skips the bundled copy; the SHA-256 check is
            skipped too, with a warning, since the manifest's hashes describe the pinned revision).
        frozen: See above.
        manifest: Another manifest file to resolve names with (for private model collections).
        cache_dir: Hub cache folder (default: the Hub's own, ``HF_HUB_CACHE``).
        endpoint: Hub endpoint (default: the Hub's own, ``HF_ENDPOINT``).
        local_files_only: Never touch the network; use the bundle or the Hub cache only.

    Returns:
        The prior.
    """
    _check_dtype(dtype)
    kwargs = {"device": device, "dtype": dtype, "frozen": frozen}
    path = Path(name_or_path)
    name = str(name_or_path)
    entries = read_manifest(manifest)
    if path.is_dir() and (name not in entries or (path / CONFIG_NAME).is_file()):
        if name in entries:
            warnings.warn(
                f"loading the local folder {name!r}, not the model of that name in the manifest; pass "
                f"{'./' + name!r} to load the folder without this warning, or load from another directory",
                stacklevel=2,
            )
        return _load_folder(path, **kwargs, verified=False)
    if name not in entries:
        if path.suffix or os.sep in name or "/" in name:
            raise FileNotFoundError(
                f"{name!r} is neither a folder with {CONFIG_NAME} and {WEIGHTS_NAME} nor a model name; "
                f"known names: {sorted(entries)}"
            )
        raise ValueError(f"unknown model {name!r}; expected a folder or one of {sorted(entries)}")
    entry = entries[name]
    if revision is None and entry.bundled:
        folder = BUNDLED_DIR / (entry.subfolder or name)
        if all((folder / f).is_file() for f in entry.files):
            verify_files(
                folder, entry, remedy="the installation is damaged: `pip install --force-reinstall posepriors`"
            )
            return _load_folder(folder, **kwargs, verified=True, entry=entry)
    download = dict(cache_dir=cache_dir, endpoint=endpoint, local_files_only=local_files_only)
    folder = _download(entry, revision, **download)
    if revision is None or revision == entry.revision:
        try:
            verify_files(folder, entry)
        except _DamagedFile as err:  # a damaged file in the Hub cache: fetch the pinned files again, once
            if _hub_offline():  # huggingface_hub refuses force_download in offline mode
                _raise_damaged_cache(
                    err,
                    err,
                    entry,
                    "offline mode (HF_HUB_OFFLINE) prevents a fresh download",
                    "go online once (unset HF_HUB_OFFLINE) and load it again, which downloads the file anew",
                )
            if local_files_only:
                raise
            try:
                fresh = _download(entry, revision, **download, force_download=True)
            except ValueError as retry:  # huggingface_hub's "Force download failed due to the above error."
                if retry.__cause__ is None:  # not a failed request
                    raise
                cause = retry.__cause__
                _raise_damaged_cache(
                    err,
                    retry,
                    entry,
                    f"downloading it anew failed ({type(cause).__name__}: {cause})",
                    "load it again once the Hub can be reached, which downloads the file anew",
                )
            folder = fresh
            verify_files(folder, entry, remedy="the Hub serves other files than the manifest pins")
        return _load_folder(folder, **kwargs, verified=True, entry=entry)
    warnings.warn(
        f"loading {name!r} at revision {revision!r} instead of the pinned {entry.revision!r}: "
        "the manifest's SHA-256 values do not apply, files are not verified against the manifest",
        stacklevel=2,
    )
    return _load_folder(folder, **kwargs, verified=False, entry=entry)


def _hub_offline() -> bool:
    """Whether huggingface_hub runs in offline mode (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _raise_damaged_cache(damage: _DamagedFile, error: Exception, entry: ManifestEntry, why: str, fix: str) -> NoReturn:
    """Raise the error for the file of the Hub cache that :func:`verify_files` found damaged (``damage``), when it
    cannot be downloaded again (``why``), with the ways out (``fix``, or deleting the cached file), from ``error``."""
    blob = damage.path.resolve()  # the Hub cache's blob, which the snapshot's entry links to
    raise ValueError(
        f"the Hub cache's copy of {damage.path.name} of model {entry.name!r} is damaged: expected SHA-256 "
        f"{damage.expected} from the manifest, found {damage.found} ({damage.path}); {why}. To fix it, {fix}, or "
        f"delete the cached file {blob} so that the next load that reaches the Hub fetches it"
    ) from error


class _DamagedFile(ValueError):
    """:func:`verify_files`'s error: the file ``path`` whose SHA-256 ``found`` is not the manifest's ``expected``."""

    def __init__(self, message: str, path: Path, expected: str, found: str) -> None:
        super().__init__(message)
        self.path, self.expected, self.found = path, expected, found


def verify_files(folder: Path, entry: ManifestEntry, remedy: str | None = None) -> None:
    """Check every file of ``entry`` in ``folder`` against the manifest's size and SHA-256; the error ends with
    ``remedy`` (default: how to fetch a file of the Hub cache again)."""
    if remedy is None:
        remedy = (
            f"load it again without local_files_only (posepriors downloads a damaged file once more), or delete the "
            f"model's files from the Hub cache (`hf cache delete`, repository {entry.repo_id})"
        )
    for filename, info in entry.files.items():
        path = folder / filename
        size = path.stat().st_size
        if "size" in info and size != info["size"]:
            raise _DamagedFile(
                f"{path} has {size} bytes, expected {info['size']} from the manifest entry {entry.name!r}: "
                f"the file is truncated or replaced; {remedy}",
                path,
                info.get("sha256"),
                sha256_file(path),
            )
        digest = sha256_file(path)
        if digest != info.get("sha256"):
            raise _DamagedFile(
                f"SHA-256 mismatch for {path}: expected {info['sha256']} from the manifest entry "
                f"{entry.name!r}, got {digest}; the file is corrupted or was replaced; {remedy}",
                path,
                info.get("sha256"),
                digest,
            )


def _download(
    entry: ManifestEntry,
    revision: str | None,
    *,
    cache_dir: str | os.PathLike | None,
    endpoint: str | None,
    local_files_only: bool,
    force_download: bool = False,
) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from posepriors import __version__

    if entry.repo_id is None and revision is not None:
        raise FileNotFoundError(
            f"model {entry.name!r} has no Hub repository in the manifest, so revision {revision!r} cannot be "
            "downloaded; load a local folder or pass a manifest that names the repository"
        )
    revision = revision or entry.revision
    if entry.repo_id is None or revision is None:
        raise FileNotFoundError(
            f"model {entry.name!r} is not bundled with this installation and has no published Hub revision "
            "in the manifest; train it with `posepriors-train` or load a local folder"
        )
    paths = []
    for filename in entry.files:
        try:
            local = hf_hub_download(
                entry.repo_id,
                filename,
                subfolder=entry.subfolder or None,
                revision=revision,
                cache_dir=cache_dir,
                endpoint=endpoint,
                local_files_only=local_files_only,
                force_download=force_download,
                library_name="posepriors",
                library_version=__version__,
            )
        except GatedRepoError as err:
            detail = " ".join(str(err).split())
            raise PermissionError(
                f"the Hub refused access to {entry.repo_id} ({detail}); log in (`hf auth login` or HF_TOKEN) with an "
                "account that accepted the repository's terms"
            ) from err
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
            raise FileNotFoundError(
                f"model {entry.name!r} is not bundled and {filename} is not in the Hub cache, and the Hub cannot "
                f"be reached or did not answer ({type(err).__name__}: {err}). Connect to the internet once (unset "
                "HF_HUB_OFFLINE), or "
                f"download it elsewhere with `hf download {entry.repo_id} --revision {revision} "
                f"--include '{entry.subfolder}/*'` and copy the Hub cache, or pass a local folder to load()"
            ) from err
        except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as err:
            raise FileNotFoundError(
                f"the Hub has no {entry.subfolder}/{filename} in {entry.repo_id} at revision {revision} "
                f"({type(err).__name__}: {err})"
            ) from err
        except HfHubHTTPError as err:
            raise OSError(f"downloading {filename} of {entry.name!r} from {entry.repo_id} failed: {err}") from err
        except (ValueError, TypeError):  # invalid arguments (a malformed repo id): as they are
            raise
        except Exception as err:  # the HTTP client's own errors (an interrupted transfer): name the model
            raise OSError(
                f"downloading {filename} of {entry.name!r} from {entry.repo_id} failed ({type(err).__name__}: {err}); "
                "load it again to resume the download"
            ) from err
        paths.append(Path(local))
    folders = {p.parent for p in paths}
    if len(folders) != 1:  # pragma: no cover - the Hub cache keeps one snapshot folder per revision
        raise OSError(f"downloaded files of {entry.name!r} landed in different folders: {sorted(folders)}")
    return folders.pop()


# ---------------------------------------------------------------------------- publish
def push_to_hub(
    prior: PosePrior,
    repo_id: str,
    *,
    subfolder: str | None = None,
    branch: str | None = None,
    commit_message: str | None = None,
    private: bool = False,
    token: str | None = None,
    api: Any = None,
) -> str | None:
    """Upload a prior (``config.json`` + ``model.safetensors``) to a Hub model repository.

    The repository is created if needed. Record the returned commit in a manifest entry (``revision``) so that
    :func:`load` pins it.

    Args:
        prior: The prior to upload.
        repo_id: ``"user/name"`` of the model repository.
        subfolder: Folder inside the repository (default: the repository root).
        branch: Branch to commit to (default: the main branch).
        commit_message: Commit message.
        private: Create the repository as private.
        token: Hub token (default: the logged-in user's).
        api: An ``huggingface_hub.HfApi`` instance (for custom endpoints; tests pass a recorder).

    Returns:
        The commit's 40-hex id, when the Hub reports it.
    """
    import tempfile

    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token, library_name="posepriors")
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="posepriors-push-") as tmp:
        save_pretrained(prior, tmp)
        info = api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=tmp,
            path_in_repo=subfolder or "",
            revision=branch,
            commit_message=commit_message or f"Upload {prior.model_type} prior with posepriors",
        )
    return getattr(info, "oid", None)
