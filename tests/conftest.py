"""Shared fixtures. The Hub environment is set here, before anything imports huggingface_hub."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Point the Hub at a closed local port and a private cache before huggingface_hub is imported anywhere,
# so that no test can reach the network or touch the user's cache.
_HF_HOME = tempfile.mkdtemp(prefix="posepriors-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_CACHE"] = os.path.join(_HF_HOME, "hub")
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_BASELINES = SHARED_DATA.parent / "baselines"


@pytest.fixture
def shared_data() -> Path:
    """The research data folder ``../shared/data``; skips the test when it is absent."""
    if not (SHARED_DATA / "body_train.npz").is_file():
        pytest.skip(f"research data not found at {SHARED_DATA} (only present on development machines and CI)")
    return SHARED_DATA


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded CPU generator, so tests are deterministic."""
    return torch.Generator().manual_seed(0)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("posepriors")
    group.addoption(
        "--device",
        default="cpu",
        help="device of the family tests that take the `device` fixture: cpu (default), cuda, cuda:N or mps; "
        "they skip when it is not available",
    )
    group.addoption(
        "--dtype",
        default="float32",
        choices=("float32", "float64"),
        help="dtype of the family tests that take the `dtype` fixture (default float32)",
    )


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device of ``--device`` (default cpu); skips the test when it is not available on this machine."""
    name = request.config.getoption("--device")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise pytest.UsageError(f"--device: expected a torch device such as cpu, cuda or cuda:1, got {name!r}") from err
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        pytest.skip(f"--device {name}: CUDA device not available on this machine")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        pytest.skip(f"--device {name}: MPS not available on this machine")
    return dev


@pytest.fixture(scope="session")
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """The dtype of ``--dtype`` (default float32)."""
    return getattr(torch, request.config.getoption("--dtype"))
