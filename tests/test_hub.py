"""Saving, loading, the manifest and the Hub path (against a local HTTP server, never the network)."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

import posepriors
from posepriors import hub
from posepriors.priors import GaussianPrior
from posepriors.utils import sha256_file
from tests.hub_server import HubServer

REPO = "posepriors/test-models"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def saved(tmp_path):
    prior = GaussianPrior().fit(torch.randn(64, 21, 3, generator=torch.Generator().manual_seed(0)) * 0.3)
    return prior, posepriors.save_pretrained(prior, tmp_path / "model")


def _manifest(tmp_path, folder, *, sha_override=None, revision=REVISION, model_type="gaussian"):
    files = {
        name: {"sha256": sha_override or sha256_file(folder / name), "size": (folder / name).stat().st_size}
        for name in (hub.CONFIG_NAME, hub.WEIGHTS_NAME)
    }
    manifest = {
        "format_version": 1,
        "hub": {"repo_id": REPO, "revision": revision},
        "models": {"tiny": {"model_type": model_type, "description": "a test model", "files": files}},
    }
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


@contextlib.contextmanager
def _served(tmp_path, folder, cache="cache"):
    """A Hub server holding ``folder`` as model 'tiny' at the pinned revision, and load()'s keyword arguments for
    it (the manifest, the endpoint and a cache folder)."""
    with HubServer() as server:
        server.add_folder(REPO, REVISION, "tiny", folder)
        yield (
            server,
            {"manifest": _manifest(tmp_path, folder), "endpoint": server.endpoint, "cache_dir": tmp_path / cache},
        )


def test_save_writes_sorted_config_and_safetensors(saved):
    _, folder = saved
    text = (folder / "config.json").read_text()
    raw = json.loads(text)
    assert raw["model_type"] == "gaussian" and raw["format_version"] == 1
    assert list(raw) == sorted(raw) and list(raw["config"]) == sorted(raw["config"])
    assert (folder / "model.safetensors").stat().st_size > 0
    assert not list(folder.glob("*.tmp"))


def test_round_trip_is_identical_and_frozen(saved):
    prior, folder = saved
    loaded = posepriors.load(folder)
    x = torch.randn(5, 21, 3)
    assert torch.equal(loaded.log_prob(x), prior.log_prob(x))
    assert not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    unfrozen = posepriors.load(folder, frozen=False)
    assert all(p.requires_grad for p in unfrozen.parameters())
    assert posepriors.load(folder, dtype=torch.float64).dtype == torch.float64


def test_unknown_model_type_and_keys_are_rejected(saved):
    _, folder = saved
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "model_type": "vposer"}))
    with pytest.raises(ValueError, match=r"unknown model_type 'vposer'.*gaussian"):
        posepriors.load(folder)
    raw["config"]["secret_knob"] = 3
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"unknown GaussianConfig keys \['secret_knob'\]"):
        posepriors.load(folder)
    (folder / "config.json").write_text(json.dumps({**raw, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version"):
        posepriors.load(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        posepriors.load(folder)


def test_missing_and_corrupted_files(saved, tmp_path):
    _, folder = saved
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        posepriors.load(tmp_path / "nowhere" / "model")
    with pytest.raises(ValueError, match="unknown model 'nowhere'"):
        posepriors.load("nowhere")
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        posepriors.load(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        posepriors.load(folder)


def test_weights_that_do_not_match_the_config(saved, tmp_path):
    _, folder = saved
    other = posepriors.save_pretrained(GaussianPrior(posepriors.GaussianConfig(joints="all")), tmp_path / "b")
    (folder / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="do not match the config") as info:
        posepriors.load(folder)
    assert "\n" not in str(info.value)  # one line, however many tensors differ


def test_hub_download_then_cache_hit(saved, tmp_path):
    prior, folder = saved
    with _served(tmp_path, folder) as (server, kwargs):
        loaded = posepriors.load("tiny", **kwargs)
        assert any(method == "GET" for method, _ in server.requests)
        first = len(server.requests)
        again = posepriors.load("tiny", **kwargs)
        assert len(server.requests) == first  # pinned revision in the cache: zero requests
    x = torch.randn(3, 21, 3)
    assert torch.equal(loaded.log_prob(x), prior.log_prob(x))
    assert torch.equal(again.log_prob(x), prior.log_prob(x))


def test_hub_sha_mismatch_is_an_error(saved, tmp_path):
    _, folder = saved
    manifest = _manifest(tmp_path, folder, sha_override="f" * 64)
    with HubServer() as server:
        server.add_folder(REPO, REVISION, "tiny", folder)
        with pytest.raises(ValueError, match="SHA-256 mismatch"):
            posepriors.load("tiny", manifest=manifest, endpoint=server.endpoint, cache_dir=tmp_path / "c")


def test_a_damaged_file_in_the_hub_cache_is_downloaded_again(saved, tmp_path):
    prior, folder = saved
    with _served(tmp_path, folder) as (_, kwargs):
        posepriors.load("tiny", **kwargs)
        cached = next((tmp_path / "cache").rglob("snapshots/*/tiny/model.safetensors")).resolve()
        cached.chmod(0o644)
        cached.write_bytes(cached.read_bytes()[:-1] + b"\0")  # the cache's blob, not only the snapshot's link
        with pytest.raises(ValueError, match="SHA-256 mismatch.*without local_files_only"):
            posepriors.load("tiny", **kwargs, local_files_only=True)
        loaded = posepriors.load("tiny", **kwargs)  # fetched once more, then verified
    x = torch.randn(3, 21, 3)
    assert torch.equal(loaded.log_prob(x), prior.log_prob(x))
    with pytest.raises(ValueError, match="SHA-256 mismatch"):  # the file on the Hub itself differs: no loop
        with HubServer() as server:
            server.add_folder(REPO, REVISION, "tiny", folder)
            bad = _manifest(tmp_path, folder, sha_override="f" * 64)
            posepriors.load("tiny", manifest=bad, endpoint=server.endpoint, cache_dir=tmp_path / "c2")
    assert sum(method == "GET" and path.endswith("config.json") for method, path in server.requests) == 2


def _damage_cached_weights(tmp_path, cache="cache"):
    """Flip the last byte of the cached weights (the cache's blob, not only the snapshot's link); returns the blob
    and its SHA-256 after the damage."""
    cached = next((tmp_path / cache).rglob("snapshots/*/tiny/model.safetensors")).resolve()
    cached.chmod(0o644)
    data = cached.read_bytes()
    cached.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    return cached, sha256_file(cached)


def test_a_damaged_cached_file_in_offline_mode_says_what_to_do(saved, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and a damaged file in the Hub cache: not huggingface_hub's "Cannot pass
    'force_download=True' when offline mode is enabled" but which file, both SHA-256, why, and the ways out."""
    import huggingface_hub.constants

    prior, folder = saved
    expected = sha256_file(folder / hub.WEIGHTS_NAME)
    with _served(tmp_path, folder) as (_, kwargs):
        posepriors.load("tiny", **kwargs)
        blob, found = _damage_cached_weights(tmp_path)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        for local_files_only in (False, True):
            with pytest.raises(ValueError) as info:
                posepriors.load("tiny", **kwargs, local_files_only=local_files_only)
            message = str(info.value)
            assert f"copy of model.safetensors of model 'tiny' is damaged: expected SHA-256 {expected}" in message
            assert f"found {found}" in message and "offline mode (HF_HUB_OFFLINE) prevents a fresh download" in message
            assert "unset HF_HUB_OFFLINE" in message and f"delete the cached file {blob} " in message
        blob.unlink()  # the advice holds: without the damaged file, the next load online fetches it again
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        loaded = posepriors.load("tiny", **kwargs)
    x = torch.randn(3, 21, 3)
    assert torch.equal(loaded.log_prob(x), prior.log_prob(x))


def test_a_damaged_cached_file_and_an_unreachable_hub_says_what_to_do(saved, tmp_path):
    _, folder = saved
    with _served(tmp_path, folder) as (_, kwargs):
        posepriors.load("tiny", **kwargs)
    blob, found = _damage_cached_weights(tmp_path)
    closed = {**kwargs, "endpoint": "http://127.0.0.1:9"}  # nothing listens: the fresh download fails
    with pytest.raises(ValueError) as info:
        posepriors.load("tiny", **closed)
    message = str(info.value)
    assert "model.safetensors of model 'tiny' is damaged" in message and f"found {found}" in message
    assert "downloading it anew failed (" in message and "once the Hub can be reached" in message
    assert f"delete the cached file {blob} " in message


def test_the_manifest_model_type_must_match_the_config(saved, tmp_path):
    _, folder = saved  # a gaussian, declared joint_flow
    with HubServer() as server:
        server.add_folder(REPO, REVISION, "tiny", folder)
        manifest = _manifest(tmp_path, folder, model_type="joint_flow")
        with pytest.raises(
            ValueError, match=r"manifest entry 'tiny' declares model_type 'joint_flow', but .*config.json holds a "
            r"'gaussian' prior"
        ):  # fmt: skip
            posepriors.load("tiny", manifest=manifest, endpoint=server.endpoint, cache_dir=tmp_path / "c")
    raw = json.loads(hub.MANIFEST_PATH.read_text())  # the bundled gaussian, declared joint_flow
    raw["models"]["gaussian"]["model_type"] = "joint_flow"
    (tmp_path / "bundled.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"'gaussian' declares model_type 'joint_flow', but .* 'gaussian' prior"):
        posepriors.load("gaussian", manifest=tmp_path / "bundled.json")


def test_bundled_file_damaged_says_reinstall(monkeypatch, tmp_path):
    import shutil

    copy = tmp_path / "weights"
    shutil.copytree(hub.BUNDLED_DIR / "gaussian", copy / "gaussian")
    data = (copy / "gaussian" / hub.WEIGHTS_NAME).read_bytes()
    (copy / "gaussian" / hub.WEIGHTS_NAME).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    monkeypatch.setattr(hub, "BUNDLED_DIR", copy)
    with pytest.raises(ValueError, match="SHA-256 mismatch.*pip install --force-reinstall posepriors"):
        posepriors.load("gaussian")


def test_interrupted_download_and_gated_repo_are_clear_errors(saved, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DOWNLOAD_TIMEOUT", 2)
    _, folder = saved
    with _served(tmp_path, folder) as (server, kwargs):
        server.truncated.add(f"tiny/{hub.WEIGHTS_NAME}")
        with pytest.raises(OSError, match=r"downloading model.safetensors of 'tiny' .* failed .*load it again"):
            posepriors.load("tiny", **kwargs)
        server.truncated.clear()
        posepriors.load("tiny", **kwargs)  # and the next load completes it
        server.gated.add(REPO)
        with pytest.raises(PermissionError, match="refused access.*log in"):
            posepriors.load("tiny", **{**kwargs, "cache_dir": tmp_path / "c2"})


def test_a_folder_named_like_a_model(tmp_path, monkeypatch, saved):
    _, folder = saved
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gaussian").mkdir()  # not a prior: the bundled model of that name loads
    assert posepriors.load("gaussian").model_type == "gaussian"
    (tmp_path / "gaussian").rmdir()
    (tmp_path / "gaussian").symlink_to(folder)
    with pytest.warns(UserWarning, match=r"local folder 'gaussian'.*'\./gaussian'"):
        posepriors.load("gaussian")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        posepriors.load("./gaussian")


def test_hub_404_is_an_error(saved, tmp_path):
    _, folder = saved
    manifest = _manifest(tmp_path, folder)
    with HubServer() as server, pytest.raises(FileNotFoundError, match="the Hub has no tiny/config.json"):
        posepriors.load("tiny", manifest=manifest, endpoint=server.endpoint, cache_dir=tmp_path / "c")


def test_offline_with_empty_cache_says_what_to_do(saved, tmp_path, monkeypatch):
    _, folder = saved
    manifest = _manifest(tmp_path, folder)
    with pytest.raises(FileNotFoundError, match="not in the Hub cache"):
        posepriors.load("tiny", manifest=manifest, cache_dir=tmp_path / "c", local_files_only=True)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="unset HF_HUB_OFFLINE"):
        posepriors.load("tiny", manifest=manifest, cache_dir=tmp_path / "c")


def test_unpublished_model_says_so(saved, tmp_path):
    _, folder = saved
    manifest = _manifest(tmp_path, folder, revision=None)
    with pytest.raises(FileNotFoundError, match="no published Hub revision"):
        posepriors.load("tiny", manifest=manifest)


def test_bad_manifest(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"models": {"x": {"description": "no files"}}}))
    with pytest.raises(ValueError, match=r"lacks \['files', 'model_type'\]"):
        hub.read_manifest(path)
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        hub.read_manifest(tmp_path / "absent.json")
    files = {"config.json": {"sha256": "0" * 64}}
    for raw, match in [
        (5, "got a JSON int"),
        (None, "got a JSON NoneType"),
        ({"hub": None, "models": {}}, "'hub' to be an object"),
        ({"models": {"x": {"model_type": "gaussian", "files": files, "revision": "main"}}}, "pinned commit.*'main'"),
    ]:
        path.write_text(json.dumps(raw))
        with pytest.raises(ValueError, match=match):
            hub.read_manifest(path)


def test_a_revision_without_a_repository(saved, tmp_path):
    _, folder = saved
    manifest = _manifest(tmp_path, folder, revision=None)
    raw = json.loads(manifest.read_text())
    raw["hub"]["repo_id"] = None
    manifest.write_text(json.dumps(raw))
    with pytest.raises(FileNotFoundError, match="no Hub repository in the manifest, so revision 'abc'"):
        posepriors.load("tiny", manifest=manifest, revision="abc")


def test_every_manifest_entry_is_bundled_and_verified():
    entries = hub.read_manifest()
    assert entries, "the package ships at least one model"
    for name, entry in entries.items():
        assert entry.bundled, f"{name} must ship inside the package"
        assert entry.revision is None or len(entry.revision) == 40
        hub.verify_files(hub.BUNDLED_DIR / entry.subfolder, entry)
        assert entry.extra.get("license"), f"{name} needs a licence note"
        prior = posepriors.load(name)
        assert prior.model_type == entry.model_type
        assert name in posepriors.list_models()


def test_float64_work_leaves_mps(saved, monkeypatch):
    from posepriors.utils import float64_device

    assert float64_device(torch.device("mps")) == torch.device("cpu")
    assert float64_device(torch.device("cpu")) == torch.device("cpu")
    _, folder = saved
    monkeypatch.setattr(hub, "resolve_device", lambda device: torch.device("mps"))
    with pytest.raises(ValueError, match="MPS supports, got torch.float64"):
        posepriors.load(folder, device="mps", dtype=torch.float64)
