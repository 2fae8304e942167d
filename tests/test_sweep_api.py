"""Bad input to the Python API found by a fault-injection sweep: each ends in a clear error, nothing silently wrong."""

from __future__ import annotations

import math

import pytest
import torch

import posepriors
from posepriors.priors import GaussianConfig, GaussianPrior, HandVAEConfig, PriorConfig
from tests.families import make, synthetic_poses


@pytest.mark.parametrize("config_class", [GaussianConfig, HandVAEConfig])
def test_an_infinite_min_std_is_refused(config_class):
    kwargs = {"joints": "right_hand"} if config_class is HandVAEConfig else {}
    with pytest.raises(ValueError, match="finite min_std"):
        config_class(min_std=math.inf, **kwargs)


def test_gaussian_fit_refuses_non_finite_poses():
    prior = GaussianPrior(GaussianConfig(joints="body"))
    x = synthetic_poses(10, prior.joints)
    x[3, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="finite training poses"):
        prior.fit(x)
    assert torch.isfinite(prior.mean).all() and torch.isfinite(prior.log_std).all()


def test_a_float64_prior_loads_back_in_float64(tmp_path):
    prior = make("gaussian").double()
    x = synthetic_poses(3, prior.joints, seed=4).double()
    posepriors.save_pretrained(prior, tmp_path / "f64")
    loaded = posepriors.load(tmp_path / "f64")
    assert loaded.dtype == torch.float64
    torch.testing.assert_close(loaded.log_prob(x), prior.eval().log_prob(x), rtol=0, atol=0)
    assert posepriors.load(tmp_path / "f64", dtype=torch.float32).dtype == torch.float32


def test_saving_nan_weights_or_into_a_file_is_refused(tmp_path):
    prior = make("gaussian")
    with torch.no_grad():
        prior.mean[0, 0] = float("nan")
    with pytest.raises(ValueError, match="expected finite weights"):
        posepriors.save_pretrained(prior, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()
    target = tmp_path / "a_file"
    target.write_text("keep me")
    with pytest.raises(ValueError, match="which is a file"):
        posepriors.save_pretrained(make("gaussian"), target)
    assert target.read_text() == "keep me"


def test_an_input_without_the_priors_joints_says_so():
    body = make("gaussian")  # body + right hand
    with pytest.raises(ValueError, match="none of the joints this prior models"):
        body.log_prob({"global_orient": torch.zeros(2, 3)})
    hands = make("hand_vae")
    with pytest.raises(ValueError, match="none of the joints this prior models"):
        hands.log_prob(torch.zeros(2, 21, 3))  # a body_pose: no hand joint


@pytest.mark.parametrize("temperature", ["0.5", None, torch.ones(2)])
def test_a_temperature_that_is_no_number_is_a_type_error_naming_it(temperature):
    with pytest.raises(TypeError, match="temperature"):
        make("gaussian").sample(2, temperature=temperature)


@pytest.mark.parametrize(
    ("name", "options", "error"),
    [
        ("global_flow", {"noise_std": 0.1, "steps": -5}, ValueError),
        ("global_flow", {"noise_std": 0.1, "steps": 2.5}, ValueError),
        ("global_flow", {"noise_std": 0.1, "steps": True}, TypeError),
        ("global_flow", {"noise_std": 0.1, "lr": 0.0}, ValueError),
        ("global_flow", {"noise_std": 0.1, "lr": "fast"}, TypeError),
        ("hand_vae", {"steps": -1}, ValueError),
        ("gaussian", {"max_sigma": "2"}, TypeError),
        ("gmm", {"max_sigma": -1.0}, ValueError),
    ],
)
def test_projection_option_values_are_checked(name, options, error):
    prior = make(name).eval()
    option = next(k for k in options if k != "noise_std")
    with pytest.raises(error, match=f"expected {option} to be"):
        prior.project(synthetic_poses(2, prior.joints), **options)


@pytest.mark.parametrize(
    ("config_class", "kwargs", "field"),
    [
        (GaussianConfig, {"min_std": "0.1"}, "GaussianConfig.min_std"),
        (PriorConfig, {"broad_weight": "0.5"}, "PriorConfig.broad_weight"),
        (HandVAEConfig, {"iwae_samples": 1.5}, "HandVAEConfig.iwae_samples"),
    ],
)
def test_configs_built_directly_check_their_field_types(config_class, kwargs, field):
    with pytest.raises(TypeError, match=field):
        config_class(**kwargs)


def test_configs_built_directly_still_take_python_values():
    assert GaussianConfig(min_std=1).min_std == 1.0 and isinstance(GaussianConfig(min_std=1).min_std, float)
    assert GaussianConfig(joints=[1, 2, 3]).joints == (1, 2, 3)
    assert GaussianConfig(joints="body").joints == tuple(range(1, 22))
