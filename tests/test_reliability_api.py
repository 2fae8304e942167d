"""Reliability of the library API: corrupted weights, batch-independent VAE scores, float64 inputs, config types,
projection under ``no_grad`` / ``inference_mode``, clean ``posepriors-eval`` errors and argument checks.

Each test names the case of the issue it covers. Priors are tiny and untrained (or fitted in closed form); data are
small synthetic arrays or ``.npz`` files made in ``tmp_path``.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import posepriors
from posepriors import evaluate, hub
from posepriors.priors import (
    GaussianPrior,
    GlobalFlowConfig,
    HandVAEConfig,
    PriorConfig,
)
from tests.cli import run_cli
from tests.families import make, synthetic_poses

FAMILIES = ("gaussian", "gmm", "joint_flow", "global_flow", "hand_vae", "hand_vae_so3")
"""The families of issue cases 9, 12 and 15 (both VAE variants), built by :func:`tests.families.make`."""

ITERATIVE = {"joint_flow": 3, "global_flow": 3, "hand_vae": 5, "hand_vae_so3": 5}
"""Optimisation steps of the MAP projection for the families that optimise (few, to keep the file fast)."""


@pytest.fixture(scope="module")
def priors():
    """One small float32 prior per family, initialised from synthetic data (ActNorm, normalisation, EM)."""
    out = {}
    for name in FAMILIES:
        torch.manual_seed(0)
        prior = make(name)
        prior.initialize_from_data(synthetic_poses(64, prior.joints, seed=0))
        out[name] = prior.eval()
    return out


def _map_kwargs(name: str) -> dict[str, int]:
    """Keyword arguments of ``project(noise_std=...)`` for ``name``: few steps for the iterative families."""
    return {"steps": ITERATIVE[name]} if name in ITERATIVE else {}


def _hidden_tail_mask(name: str, prior) -> torch.Tensor:
    """Observed-joint mask hiding a trailing part every family can complete (the right hand, or 3 body joints)."""
    mask = torch.ones(prior.num_joints, dtype=torch.bool)
    if name.startswith("hand_vae"):
        mask[15:] = False  # the right hand of the two-hand VAE
    elif prior.num_joints > 21:
        mask[21:] = False  # the right hand of body+right_hand
    else:
        mask[-3:] = False
    return mask


def _fitted_gaussian() -> GaussianPrior:
    return GaussianPrior().fit(torch.randn(64, 21, 3, generator=torch.Generator().manual_seed(0)) * 0.3)


# ---------------------------------------------------------------------------- case 7: corrupted weights
@pytest.fixture
def saved_gaussian(tmp_path):
    prior = _fitted_gaussian()
    return prior, posepriors.save_pretrained(prior, tmp_path / "model")


def test_case7_saved_weights_carry_a_matching_checksum(saved_gaussian):
    _, folder = saved_gaussian
    weights = folder / hub.WEIGHTS_NAME
    raw = weights.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert len(header["__metadata__"][hub.CHECKSUM_KEY]) == 64
    assert hub.verify_weights(weights) is True


def test_case7_flipped_tensor_bytes_fail_the_checksum(saved_gaussian):
    _, folder = saved_gaussian
    weights = folder / hub.WEIGHTS_NAME
    raw = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")  # first byte of the tensor data, past the JSON header
    assert len(raw) - start >= 16
    for offset in (start + 3, start + (len(raw) - start) // 2):
        raw[offset] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum mismatch"):
        hub.verify_weights(weights)
    with pytest.raises(ValueError, match="checksum mismatch"):
        posepriors.load(folder)
    with pytest.raises(ValueError, match="checksum mismatch"):
        posepriors.load_pretrained(folder)


def test_case7_weights_without_a_checksum_load_with_a_warning(saved_gaussian):
    prior, folder = saved_gaussian
    weights = folder / hub.WEIGHTS_NAME
    state = load_file(str(weights))
    save_file(state, str(weights), metadata={"format": "pt"})  # as written before checksums existed
    assert hub.verify_weights(weights) is False
    with pytest.warns(UserWarning, match="records no checksum"):
        loaded = posepriors.load(folder)
    x = torch.randn(4, 21, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded.log_prob(x), prior.log_prob(x).detach())


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("checksum", [True, False])
def test_case7_weights_with_nan_or_inf_are_refused(bad, checksum, tmp_path):
    folder = posepriors.save_pretrained(_fitted_gaussian(), tmp_path / "model")
    weights = folder / hub.WEIGHTS_NAME
    state = load_file(str(weights))
    state["mean"][3, 1] = bad  # save_pretrained refuses such weights: write them as another tool would
    if checksum:  # a consistent checksum over broken values
        weights.write_bytes(hub._weights_bytes(state, {"format": "pt", "model_type": "gaussian"}))
    else:
        save_file(state, str(weights), metadata={"format": "pt"})
    assert hub.verify_weights(folder / hub.WEIGHTS_NAME) is checksum
    if checksum:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a checksummed file loads (or fails) without a warning
            with pytest.raises(ValueError, match="NaN or Inf"):
                posepriors.load(folder)
    else:
        with pytest.warns(UserWarning, match="records no checksum"), pytest.raises(ValueError, match="NaN or Inf"):
            posepriors.load(folder)


# ---------------------------------------------------------------------------- case 9: float64 poses
@pytest.mark.parametrize("name", FAMILIES)
def test_case9_float64_poses_give_float64_results(name, priors):
    prior = priors[name]
    assert prior.dtype == torch.float32
    x = synthetic_poses(3, prior.joints, seed=1).double()
    lp = prior.log_prob(x)
    assert lp.dtype == torch.float64
    torch.testing.assert_close(lp.float(), prior.log_prob(x.float()), atol=1e-3, rtol=1e-4)
    assert prior.nll(x).dtype == torch.float64
    fast = prior.project(x)
    assert fast.dtype == torch.float64 and fast.shape == x.shape
    denoised = prior.project(x, noise_std=0.1, **_map_kwargs(name))
    assert denoised.dtype == torch.float64 and denoised.shape == x.shape and torch.isfinite(denoised).all()
    mask = _hidden_tail_mask(name, prior)
    samples = prior.sample(2, observed=x, mask=mask, generator=torch.Generator().manual_seed(0))
    assert samples.dtype == torch.float64 and samples.shape == (2, *x.shape)
    # observed joints are the float64 inputs themselves, not rounded through float32
    assert torch.equal(samples[:, :, mask], x[:, mask].expand(2, -1, -1, -1))


# ---------------------------------------------------------------------------- case 11: config types on load
_BAD_CONFIGS = [
    ("global_flow", "actnorm", "false"),
    ("hand_vae", "min_std", "0.01"),
    ("hand_vae", "iwae_samples", 1.5),
]


@pytest.mark.parametrize(("name", "field", "value"), _BAD_CONFIGS)
def test_case11_mistyped_config_field_is_refused_on_load(name, field, value, tmp_path):
    folder = posepriors.save_pretrained(make(name), tmp_path / name)
    assert posepriors.load(folder).config == make(name).config  # the untouched folder loads
    path = folder / hub.CONFIG_NAME
    raw = json.loads(path.read_text())
    assert field in raw["config"]
    raw["config"][field] = value
    path.write_text(json.dumps(raw))
    with pytest.raises(TypeError, match=rf"\.{field}\b") as info:
        posepriors.load(folder)
    assert repr(value) in str(info.value)  # and says what came


@pytest.mark.parametrize(
    ("config_class", "field", "value"),
    [
        (GlobalFlowConfig, "actnorm", "false"),
        (GlobalFlowConfig, "actnorm", 0),
        (HandVAEConfig, "min_std", "0.01"),
        (HandVAEConfig, "iwae_samples", 1.5),
        (HandVAEConfig, "iwae_samples", True),
        (PriorConfig, "broad_weight", "0.1"),
        (PriorConfig, "broad_components", 2.0),
    ],
)
def test_case11_from_dict_checks_field_types(config_class, field, value):
    with pytest.raises(TypeError, match=rf"{config_class.__name__}\.{field}\b"):
        config_class.from_dict({field: value})


def test_case11_from_dict_accepts_its_own_output_and_json_numbers():
    config = HandVAEConfig(variant="so3", z_dim=4, hidden=16, iwae_samples=8)
    assert HandVAEConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    converted = HandVAEConfig.from_dict({"min_std": 1})  # a JSON integer is a number
    assert converted.min_std == 1.0 and isinstance(converted.min_std, float)
    assert GlobalFlowConfig.from_dict({"actnorm": False}).actnorm is False


# ---------------------------------------------------------------------------- case 12: project without autograd
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("name", FAMILIES)
def test_case12_map_project_works_without_autograd(name, context, priors):
    prior = priors[name]
    x = synthetic_poses(2, prior.joints, seed=4)
    kwargs = _map_kwargs(name)
    expected = prior.project(x, noise_std=0.1, **kwargs)
    manager = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with manager:
        pose = x.clone()  # created inside the context (an inference tensor under inference_mode)
        got = prior.project(pose, noise_std=0.1, **kwargs)
    assert got.shape == x.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert all(p.grad is None for p in prior.parameters())  # the prior's parameters are never touched


# ---------------------------------------------------------------------------- case 14: posepriors-eval errors
@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    """A tiny saved Gaussian body prior, a valid body file, a single-pose file and a CRC-corrupt file."""
    root = tmp_path_factory.mktemp("eval_cli")
    body = synthetic_poses(40, tuple(range(1, 22)), seed=11).numpy()
    posepriors.save_pretrained(GaussianPrior().fit(torch.from_numpy(body)), root / "gaussian")
    np.savez(root / "body.npz", body_pose=body)
    np.savez(root / "single.npz", body_pose=body[:1])
    np.savez(root / "corrupt.npz", body_pose=body)
    raw = bytearray((root / "corrupt.npz").read_bytes())
    middle = len(raw) // 2  # inside the stored array data (uncompressed): the member's CRC-32 no longer matches
    for offset in range(middle, middle + 8):
        raw[offset] ^= 0xFF
    (root / "corrupt.npz").write_bytes(bytes(raw))
    return root


def _run_eval(argv, capsys) -> tuple[int, str, str]:
    return run_cli(evaluate.main, argv, capsys)


@pytest.mark.parametrize(
    ("flags", "mentions"),
    [
        (["--max_poses", "-5"], "--max_poses"),
        (["--max_poses", "0"], "--max_poses"),
        (["--sigma", "0"], "--sigma"),
        (["--sigma", "nan"], "--sigma"),
        (["--num_samples", "1"], "--num_samples"),
    ],
)
def test_case14_bad_numeric_flags_exit_2_with_a_message(flags, mentions, eval_files, capsys):
    code, _, err = _run_eval([eval_files / "gaussian", "--data", eval_files / "body.npz", *flags], capsys)
    assert code == 2
    assert "error" in err and mentions in err and "Traceback" not in err


def test_case14_missing_data_file_exits_2(eval_files, tmp_path, capsys):
    missing = tmp_path / "absent.npz"
    code, _, err = _run_eval([eval_files / "gaussian", "--data", missing], capsys)
    assert code == 2 and "absent.npz" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: --device cuda is a valid choice")
def test_case14_unavailable_device_exits_2(eval_files, capsys):
    code, _, err = _run_eval([eval_files / "gaussian", "--data", eval_files / "body.npz", "--device", "cuda"], capsys)
    assert code == 2 and "--device" in err and "CUDA" in err and "Traceback" not in err


def test_case14_unknown_model_exits_2(eval_files, capsys):
    code, _, err = _run_eval(["no_such_model", "--data", eval_files / "body.npz"], capsys)
    assert code == 2 and "no_such_model" in err and "Traceback" not in err


def test_case14_crc_corrupt_npz_exits_2(eval_files, capsys):
    with pytest.raises(Exception, match="(?i)crc|corrupt"):  # the file really is damaged
        np.load(eval_files / "corrupt.npz")["body_pose"]
    code, _, err = _run_eval([eval_files / "gaussian", "--data", eval_files / "corrupt.npz"], capsys)
    assert code == 2 and "corrupt.npz" in err and "Traceback" not in err


def test_case14_single_pose_file_evaluates(eval_files, tmp_path, capsys):
    report = tmp_path / "report.json"
    argv = [eval_files / "gaussian", "--data", eval_files / "single.npz", "--num_samples", "8", "--json", report]
    code, out, err = _run_eval(argv, capsys)
    assert code == 0, err
    (entry,) = json.loads(report.read_text())
    assert entry["poses"] == 1 and math.isfinite(entry["nll"]["mean"])
    assert entry["samples"] is None  # one pose cannot serve as a reference and a held-out pose
    assert "| 1 |" in out


# ---------------------------------------------------------------------------- case 15: argument checks
@pytest.mark.parametrize("name", FAMILIES)
def test_case15_sample_count_and_generator_checks(name, priors):
    prior = priors[name]
    samples = prior.sample(np.int64(3), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, prior.num_joints, 3) and torch.isfinite(samples).all()
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        prior.sample(3, generator=0)


@pytest.mark.parametrize("noise_std", [math.inf, -math.inf, math.nan, 0.0, -0.1])
@pytest.mark.parametrize("name", FAMILIES)
def test_case15_non_finite_or_non_positive_noise_std_is_refused(name, noise_std, priors):
    prior = priors[name]
    x = synthetic_poses(2, prior.joints, seed=6)
    with pytest.raises(ValueError, match="noise_std"):
        prior.project(x, noise_std=noise_std)


def test_case15_manifest_file_without_sha256_is_a_value_error(tmp_path):
    path = tmp_path / "manifest.json"
    files = {hub.CONFIG_NAME: {"sha256": "0" * 64, "size": 10}, hub.WEIGHTS_NAME: {"size": 20}}
    path.write_text(json.dumps({"models": {"tiny": {"model_type": "gaussian", "files": files}}}))
    with pytest.raises(ValueError, match=r"tiny.*model\.safetensors.*sha256"):
        hub.read_manifest(path)
    files[hub.WEIGHTS_NAME]["sha256"] = "f" * 64  # with it, the same manifest reads
    path.write_text(json.dumps({"models": {"tiny": {"model_type": "gaussian", "files": files}}}))
    assert hub.read_manifest(path)["tiny"].files[hub.WEIGHTS_NAME]["sha256"] == "f" * 64


@pytest.mark.parametrize("name", ["global_flow", "joint_flow", "hand_vae", "gaussian_full"])
def test_a_shipped_prior_loaded_and_used_in_inference_mode_works_after_it(name):
    """``torch.inference_mode()`` around loading and scoring (a common evaluation pattern) crashed the flows
    ("Inference tensors do not track version counter": the caches' keys read the parameters' versions), and a
    flow scored once inside it could not take a gradient afterwards (its cached folded maps and reordered layers
    were inference tensors). Loading now makes plain tensors, the caches are built as plain tensors, and the
    numbers and gradients equal a fresh prior's."""
    with torch.inference_mode():
        prior = posepriors.load(name)
        pose = prior.sample(40, generator=torch.Generator().manual_seed(0))
        inside = prior.log_prob(pose)
        prior.log_prob(pose[:2])  # the small-batch path's caches too
        if name == "global_flow":
            prior.energy(pose[:2])
    assert not any(t.is_inference() for t in [*prior.parameters(), *prior.buffers()])
    fresh = posepriors.load(name)
    pose = pose.clone()  # a plain tensor
    torch.testing.assert_close(inside, fresh.log_prob(pose))
    torch.testing.assert_close(prior.log_prob(pose), fresh.log_prob(pose))
    for rows in (2, 40):
        grads = []
        for model in (prior, fresh):
            leaf = pose[:rows].clone().requires_grad_(True)
            model.nll(leaf).sum().backward()
            grads.append(leaf.grad)
        torch.testing.assert_close(*grads)


@pytest.mark.parametrize("name", ["global_flow", "joint_flow", "hand_vae", "hand_vae_so3"])
def test_a_shipped_prior_pickles_after_use(name):
    """``torch.save(prior)`` and ``pickle`` failed for the flows and VAEs (their MLPs held a lambda: the in-place
    activation); after a round trip the prior scores as before (found by a new-user review)."""
    import io
    import pickle

    prior = posepriors.load(name)
    pose = prior.sample(8, generator=torch.Generator().manual_seed(0))
    before = prior.log_prob(pose)  # fills the caches, which travel along and are rebuilt
    again = pickle.loads(pickle.dumps(prior))
    buffer = io.BytesIO()
    torch.save(prior, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    for copy in (again, saved):
        torch.testing.assert_close(copy.log_prob(pose), before)


@pytest.mark.parametrize("name", ["global_flow", "joint_flow"])
def test_a_flow_in_half_precision_is_refused_with_a_clear_error(name):
    """A flow converted to float16 or bfloat16 gave inf log-densities or numbers tens of nats off, silently; it is
    refused at load and at every call, and ``.float()`` makes it usable again (found by a new-user review).
    Half-precision poses stay fine with float32 weights, and the Gaussians keep computing in half precision."""
    with pytest.raises(TypeError, match=r"float32 or float64 weights, got torch.float16"):
        posepriors.load(name, dtype=torch.float16)
    prior = posepriors.load(name)
    pose = prior.sample(3, generator=torch.Generator().manual_seed(0))
    expected = prior.log_prob(pose)
    for dtype in (torch.float16, torch.bfloat16):
        prior.to(dtype)
        for call in (lambda: prior.log_prob(pose), lambda: prior.sample(2), lambda: prior.project(pose)):
            with pytest.raises(TypeError, match=rf"got {dtype}: its spline flows overflow"):
                call()
    prior.float()  # usable again (its weights rounded to half precision on the way)
    torch.testing.assert_close(prior.log_prob(pose), expected, atol=5.0, rtol=0)
    assert prior.log_prob(pose.half()).dtype == torch.float32
    gaussian = posepriors.load("gaussian", dtype=torch.float16)
    assert gaussian.log_prob(pose.half()).dtype == torch.float16
