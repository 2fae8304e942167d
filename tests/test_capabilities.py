"""What a family can do lives on its class (capabilities, training defaults, flag aliases); generic code reads it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from posepriors import fitting, skeleton
from posepriors import train as train_module
from posepriors.hub import available_model_types
from posepriors.priors import GaussianConfig, GaussianPrior, GlobalFlowConfig, JointFlowConfig, PosePrior
from posepriors.priors.base import _adam_argmin
from posepriors.priors.flow_config import FlowConfig
from tests.families import NAMES, make, synthetic_poses

FAMILIES = available_model_types()
MASK_KINDS = {"any", "descendant_closed", "trailing_parts", "whole_hands", "none"}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_declares_its_capabilities_with_the_right_types(model_type):
    cls = FAMILIES[model_type]
    assert isinstance(cls.exact_log_prob, bool) and isinstance(cls.per_joint_log_prob, bool)
    assert isinstance(cls.closed_form, bool) and isinstance(cls.reconstructs, bool)
    assert cls.mask_marginals in MASK_KINDS
    loop_fields = {f.name for f in dataclasses.fields(train_module.TrainConfig)}
    assert set(cls.training_defaults) <= loop_fields, "training defaults name TrainConfig fields"
    config_fields = {f.name for f in dataclasses.fields(cls.config_class)}
    assert set(cls.flag_aliases) <= config_fields, "aliases are old names of config fields"
    assert cls.seed_batch_size is None or cls.seed_batch_size >= 1


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_the_train_parser_takes_its_defaults_and_aliases_from_the_family(model_type):
    cls = FAMILIES[model_type]
    parser = train_module.build_parser(model_type)
    args = parser.parse_args([model_type, "--data_dir", "x.npz"])
    for name, value in cls.training_defaults.items():
        assert getattr(args, name) == value, name
    for name in set(dataclasses.asdict(train_module.TrainConfig())) - set(cls.training_defaults):
        assert getattr(args, name) == getattr(train_module.TrainConfig(), name), name
    for field_name, old in cls.flag_aliases.items():
        default = getattr(cls.config_class(), field_name)
        value = "so3" if isinstance(default, str) else str(default + 1)
        if isinstance(default, str):
            value = next(v for v in train_module.MODEL_CHOICES[field_name] if v != default)
        parsed = parser.parse_args([model_type, "--data_dir", "x.npz", f"--{old}", value])
        assert str(getattr(parsed, field_name)) == value
    # the deprecated module-level table is the families' own
    assert train_module.FAMILY_DEFAULTS[model_type] == cls.training_defaults


def test_the_old_flag_names_still_work():
    parser = train_module.build_parser("joint_flow")
    assert parser.parse_args(["joint_flow", "--data_dir", "x", "--K", "3"]).num_layers == 3
    assert parser.parse_args(["joint_flow", "--data_dir", "x", "--num_layers", "5"]).num_layers == 5
    parser = train_module.build_parser("hand_vae")
    assert parser.parse_args(["hand_vae", "--data_dir", "x", "--model_type", "so3"]).variant == "so3"
    with pytest.raises(SystemExit):
        train_module.build_parser("gaussian").parse_args(["gaussian", "--data_dir", "x", "--num_workers", "0"])


@pytest.mark.parametrize("name", NAMES)
def test_log_prob_per_joint_takes_the_same_inputs_in_every_family(name):
    torch.manual_seed(0)
    prior = make(name).eval()
    x = synthetic_poses(5, prior.joints, seed=1)
    if not prior.per_joint_log_prob:
        with pytest.raises(NotImplementedError, match=rf"{type(prior).__name__} \('{prior.model_type}'\).*per-joint"):
            prior.log_prob_per_joint(x)
        return
    terms = prior.log_prob_per_joint(x)
    assert terms.shape == (5, prior.num_joints)
    torch.testing.assert_close(terms.sum(-1), prior.log_prob(x), atol=1e-4, rtol=1e-5)
    full = prior.to_smplx(x)
    for other in (full, full.reshape(5, 165), skeleton.to_smplx_dict(full)):  # any layout
        torch.testing.assert_close(prior.log_prob_per_joint(other), terms, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prior.log_prob_per_joint(x, layout="prior"), terms)
    assert prior.log_prob_per_joint(x.double()).dtype == torch.float64
    mask = torch.tensor([j not in skeleton.PARTS["right_hand"] for j in prior.joints])
    masked = prior.log_prob_per_joint(x, mask)
    assert torch.all(masked[:, ~mask] == 0)
    torch.testing.assert_close(masked.sum(-1), prior.log_prob(x, mask), atol=1e-4, rtol=1e-5)
    body_only = {"body_pose": full[:, 1:22]}  # the hands count as missing
    torch.testing.assert_close(prior.log_prob_per_joint(body_only)[:, mask], terms[:, mask], atol=1e-5, rtol=1e-5)


class _NoMaskGaussian(GaussianPrior):
    model_type = "test_no_mask_gaussian"
    mask_marginals = "none"


def test_a_family_without_marginals_refuses_missing_joints():
    prior = _NoMaskGaussian(GaussianConfig(joints="body+right_hand"))
    assert not prior.supports_mask and GaussianPrior(GaussianConfig()).supports_mask
    x = synthetic_poses(3, prior.joints)
    prior.log_prob(x)  # all joints: fine
    mask = torch.ones(prior.num_joints, dtype=torch.bool)
    mask[-1] = False
    with pytest.raises(ValueError, match=r"_NoMaskGaussian has no marginal for missing joints \(mask_marginals='none'"):
        prior.log_prob(x, mask)
    with pytest.raises(ValueError, match="has no marginal for missing joints"):
        prior.log_prob({"body_pose": torch.zeros(3, 63)})  # the hand is missing
    with pytest.raises(ValueError, match="mask_marginals='none'"):  # a body fit cannot marginalise the hand
        fitting._prior_scorer(prior, prior.device)


def test_map_project_is_abstract():
    class Incomplete(PosePrior):
        model_type = "incomplete"
        config_class = GaussianConfig

        def _log_prob(self, x, mask):
            return x.sum((-1, -2))

        def _sample(self, n, generator, temperature, observed, mask):
            return torch.zeros(n, self.num_joints, 3)

        def _project(self, x, mask):
            return x

    with pytest.raises(TypeError, match="_map_project"):
        Incomplete(GaussianConfig())


@pytest.mark.parametrize("name", NAMES)
def test_diagnostics_are_finite_numbers(name):
    torch.manual_seed(0)
    prior = make(name)
    x = synthetic_poses(16, prior.joints)
    prior.initialize_from_data(synthetic_poses(64, prior.joints))
    with torch.no_grad():
        out = prior.diagnostics(x)
    assert all(isinstance(v, float) and v == v for v in out.values())
    assert ("reconstruction_deg" in out) == prior.reconstructs
    if prior.reconstructs:
        assert prior.reconstruction_error(x).shape == ()
    else:
        with pytest.raises(NotImplementedError, match=rf"{type(prior).__name__} \('{prior.model_type}'\)"):
            prior.reconstruction_error(x)


def test_the_flow_configs_share_their_flow_settings_and_keep_their_defaults():
    shared = {f.name for f in dataclasses.fields(FlowConfig)}
    assert {"hidden", "num_layers", "num_hidden_layers", "coupling", "mixing", "bins", "bound", "actnorm"} <= shared
    for config_class in (JointFlowConfig, GlobalFlowConfig):
        assert issubclass(config_class, FlowConfig)
        with pytest.raises(ValueError, match="expected hidden to be an integer >= 1"):
            config_class(hidden=0)
        with pytest.raises(ValueError, match="expected bins to be an integer >= 2"):
            config_class(bins=1)
    j, g = JointFlowConfig(), GlobalFlowConfig()
    assert (j.hidden, j.num_layers, j.coupling) == (128, 4, "spline")
    assert (g.hidden, g.num_layers, g.coupling) == (512, 6, "affine")
    for name in ("num_hidden_layers", "mixing", "bins", "bound", "actnorm"):
        assert getattr(j, name) == getattr(g, name) == getattr(FlowConfig(), name)


def test_adam_argmin_minimises_and_leaves_parameters_alone():
    weight = torch.nn.Parameter(torch.tensor([2.0, -1.0]))

    def objective(z):
        return ((z - weight) ** 2).sum()

    with torch.no_grad():
        z = _adam_argmin(objective, torch.zeros(2), steps=300, lr=0.05)
    torch.testing.assert_close(z, weight.detach(), atol=1e-2, rtol=0)
    assert weight.grad is None and not z.requires_grad
    assert torch.equal(_adam_argmin(objective, torch.ones(2), steps=0, lr=0.1), torch.ones(2))
