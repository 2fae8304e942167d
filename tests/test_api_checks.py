"""Arguments are checked before any work, smplx outputs are read as they are, and no call touches the global RNG."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import posepriors
from posepriors import skeleton
from posepriors import train as train_module
from posepriors.data import PoseData
from posepriors.priors import GaussianConfig, GaussianPrior
from tests.families import NAMES, make, synthetic_poses


@dataclasses.dataclass
class FakeSMPLXOutput:
    """The fields of ``smplx.utils.SMPLXOutput`` (a dataclass), with what a forward pass fills in."""

    vertices: torch.Tensor | None = None
    joints: torch.Tensor | None = None
    full_pose: torch.Tensor | None = None
    global_orient: torch.Tensor | None = None
    transl: torch.Tensor | None = None
    v_shaped: torch.Tensor | None = None
    betas: torch.Tensor | None = None
    body_pose: torch.Tensor | None = None
    left_hand_pose: torch.Tensor | None = None
    right_hand_pose: torch.Tensor | None = None
    expression: torch.Tensor | None = None
    jaw_pose: torch.Tensor | None = None


def _smplx_outputs(pose55: torch.Tensor) -> dict[str, torch.Tensor]:
    n = pose55.shape[0]
    out = {k: v for k, v in skeleton.to_smplx_dict(pose55).items() if k not in ("leye_pose", "reye_pose")}
    extra = {
        "vertices": torch.zeros(n, 10475, 3),
        "joints": torch.zeros(n, 127, 3),
        "full_pose": pose55.reshape(n, 165),
        "transl": torch.zeros(n, 3),
        "v_shaped": torch.zeros(n, 10475, 3),
        "betas": torch.zeros(n, 10),
        "expression": torch.zeros(n, 10),
    }
    return {**out, **extra}


# ---------------------------------------------------------------------------- smplx outputs (issue 14, point 2)
@pytest.mark.parametrize("name", ["gaussian", "global_flow", "hand_vae"])
def test_smplx_output_dicts_and_objects_are_read_as_they_are(name):
    prior = make(name)
    pose55 = torch.zeros(3, 55, 3)
    pose55[:, prior.joints] = 0.1 * synthetic_poses(3, prior.joints, seed=2)
    expected = prior.log_prob(pose55)
    as_dict = _smplx_outputs(pose55)
    torch.testing.assert_close(prior.log_prob(as_dict), expected)
    torch.testing.assert_close(prior.log_prob(FakeSMPLXOutput(**as_dict)), expected)


def test_a_pose_key_of_the_wrong_size_or_an_unknown_pose_key_is_still_refused():
    prior = make("gaussian")
    bad = {**_smplx_outputs(torch.zeros(2, 55, 3)), "body_pose": torch.zeros(2, 60)}
    with pytest.raises(ValueError, match=r"body_pose of shape \(\*, 63\)"):
        prior.log_prob(bad)
    with pytest.raises(ValueError, match="unknown pose keys"):
        prior.log_prob({"body_pose": torch.zeros(2, 63), "left_hand_poses": torch.zeros(2, 45)})
    with pytest.raises(TypeError, match="smplx ModelOutput"):
        prior.log_prob([torch.zeros(2, 63)])


# ---------------------------------------------------------------------------- project options (point 4)
@pytest.mark.parametrize("name", NAMES)
def test_project_options_are_checked_against_the_mode_that_runs(name):
    prior = make(name).eval()
    x = synthetic_poses(2, prior.joints, seed=1)
    fast, slow = set(prior.project_options()), set(prior.project_options(map_mode=True))
    for option in sorted(slow - fast):  # a MAP option without noise_std
        with pytest.raises(TypeError, match="MAP mode: pass noise_std"):
            prior.project(x, **{option: 1})
    for option in sorted(fast - slow):  # a fast-mode option with noise_std
        with pytest.raises(TypeError, match="fast mode: drop noise_std"):
            prior.project(x, noise_std=0.1, **{option: 1})
    with pytest.raises(TypeError, match="bogus_option"):
        prior.project(x, bogus_option=1)
    with pytest.raises(TypeError, match="bogus_option"):
        prior.project(x, noise_std=0.1, bogus_option=1)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"keep_observed": "no"}, TypeError, "expected keep_observed to be True or False, got 'no'"),
        ({"shrink": "a"}, TypeError, r"expected shrink to be a number in \[0, 1\], got 'a'"),
        ({"shrink": None}, TypeError, r"expected shrink to be a number in \[0, 1\], got None"),
        ({"shrink": 1.5}, ValueError, r"expected shrink to be a number in \[0, 1\], got 1.5"),
    ],
)
def test_shared_fast_mode_options_name_what_they_expect(options, error, match):
    prior = make("joint_flow").eval()
    with pytest.raises(error, match=match):
        prior.project(synthetic_poses(2, prior.joints, seed=1), **options)


def test_switches_and_dtypes_are_checked():
    import posepriors

    with pytest.raises(TypeError, match="expected enabled to be True or False, got 'False'"):
        posepriors.set_validation("False")
    assert posepriors.get_validation()
    for bad in (torch.int32, "float64"):
        with pytest.raises(TypeError, match="expected dtype to be None or a floating torch.dtype"):
            posepriors.load("gaussian", dtype=bad)


def test_map_options_work_in_the_map_mode():
    prior = make("global_flow").eval()
    x = synthetic_poses(2, prior.joints, seed=1)
    assert "steps" in prior.project_options(map_mode=True)
    assert prior.project(x, noise_std=0.1, steps=2).shape == x.shape


# ---------------------------------------------------------------------------- argument checks first (point 5)
def test_a_bad_measure_is_refused_before_the_forward_pass(monkeypatch):
    prior = make("global_flow")

    def forbidden(*args, **kwargs):
        raise AssertionError("the density was computed before the measure was checked")

    monkeypatch.setattr(prior, "_density", forbidden)
    with pytest.raises(ValueError, match="expected measure 'lebesgue' or 'so3', got 'bogus'"):
        prior.log_prob(synthetic_poses(2, prior.joints), measure="bogus")


# ---------------------------------------------------------------------------- global RNG (point 6)
def test_training_leaves_the_callers_global_rng_as_it_was(tmp_path):
    prior = make("gaussian")
    poses = torch.zeros(40, 55, 3)
    poses[:, prior.joints] = synthetic_poses(40, prior.joints)
    data = PoseData(
        poses, torch.ones(40, 55, dtype=torch.bool), torch.arange(40) // 10, [f"s{i}" for i in range(4)], ["x.npz"]
    )
    train = train_module.prepare_data(data.subset(slice(0, 30)), prior.joints)
    val = train_module.prepare_data(data.subset(slice(30, 40)), prior.joints)
    cfg = train_module.TrainConfig(max_epochs=1, batch_size=16, logger="none", progress=False)
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    train_module.fit(prior, train, val, cfg)
    assert torch.equal(torch.rand(3), expected), "fit reseeded or advanced the caller's global RNG"


# ---------------------------------------------------------------------------- layouts (point 1)
def test_a_count_shared_by_the_priors_joints_and_another_layout_is_ambiguous():
    from posepriors.priors import GaussianConfig, GaussianPrior

    prior = GaussianPrior(GaussianConfig(joints=tuple(range(21))))  # SMPL-X 0-20: 21 joints, as the body layout
    x = synthetic_poses(2, prior.joints, seed=3)
    with pytest.raises(ValueError, match=r"layout='prior' or layout='body'"):
        prior.log_prob(x)
    own = prior.log_prob(x, layout="prior")
    full = torch.zeros(2, 55, 3)
    full[:, prior.joints] = x
    torch.testing.assert_close(own, prior.log_prob(full))  # the same joints through the SMPL-X layout
    as_body = prior.log_prob(x, layout="body")  # joints 1-21: joints 1-20 of the prior observed, the root missing
    as_smplx, seen = skeleton.to_smplx(x, layout="body")
    torch.testing.assert_close(as_body, prior.log_prob(as_smplx, seen))
    assert not torch.allclose(as_body, own)
    assert prior.project(x, layout="prior").shape == x.shape
    assert prior.nll(x, layout="prior").shape == (2,)
    assert prior.sample(2, observed=x, layout="prior", generator=torch.Generator().manual_seed(0)).shape == (
        2,
        2,
        21,
        3,
    )


def test_an_unambiguous_own_count_needs_no_layout_and_bad_layouts_are_refused():
    prior = make("gaussian")  # body + right hand: 36 joints, no standard layout has 36
    x = synthetic_poses(2, prior.joints, seed=3)
    torch.testing.assert_close(prior.log_prob(x), prior.log_prob(x, layout="prior"))
    with pytest.raises(ValueError, match="unknown layout 'bogus'"):
        prior.log_prob(x, layout="bogus")
    with pytest.raises(ValueError, match="own layout of shape"):
        prior.log_prob(torch.zeros(2, 55, 3), layout="prior")
    with pytest.raises(ValueError, match="expected a smplh pose"):
        prior.log_prob(x, layout="smplh")
    with pytest.raises(ValueError, match="layout= applies to pose tensors"):
        prior.log_prob({"body_pose": torch.zeros(2, 63)}, layout="body")


def test_layout_tables_come_from_the_layouts():
    counts = {lay.num_joints for lay in skeleton.LAYOUTS.values()}
    for count in counts:
        names = [lay.name for lay in skeleton.layouts_with(count)]
        pose = torch.zeros(1, count, 3)
        if len(names) == 1:
            assert skeleton.to_smplx(pose)[1].sum() == sum(j >= 0 for j in skeleton.LAYOUTS[names[0]].smplx_index)
        else:  # MANO's two hands: the hand argument decides
            assert set(names) == {"mano_left", "mano_right"}
            left = skeleton.to_smplx(pose, hand="left")[1]
            assert left[list(skeleton.PARTS["left_hand"])].all() and not left[list(skeleton.PARTS["right_hand"])].any()


def test_layout_aliases_work_in_prior_methods():
    from posepriors.priors import GaussianConfig, GaussianPrior

    prior = GaussianPrior(GaussianConfig(joints="body"))
    pose53 = skeleton.from_smplx(torch.randn(3, 55, 3) * 0.1, "smplx_no_eyes")
    torch.testing.assert_close(prior.log_prob(pose53, layout="seed53"), prior.log_prob(pose53, layout="smplx_no_eyes"))
    with pytest.raises(ValueError, match=r"unknown layout 'seed'; expected 'prior' or one of .*alias \['seed53'\]"):
        prior.log_prob(pose53, layout="seed")


def test_validation_context_manager_restores_the_previous_setting_even_on_errors():
    import posepriors
    from posepriors.priors import GaussianConfig, GaussianPrior

    prior = GaussianPrior(GaussianConfig(joints="body"))
    bad = torch.full((1, 21, 3), float("nan"))
    assert posepriors.get_validation()
    with pytest.raises(ValueError, match="expected finite pose values"):
        prior.log_prob(bad)
    with posepriors.validation(False):
        assert not posepriors.get_validation()
        assert torch.isnan(prior.log_prob(bad)).all()  # no check inside the block
        with posepriors.validation(True):  # nests
            assert posepriors.get_validation()
        assert not posepriors.get_validation()
    assert posepriors.get_validation()
    with pytest.raises(RuntimeError, match="boom"), posepriors.validation(False):
        raise RuntimeError("boom")
    assert posepriors.get_validation()  # restored after the exception
    posepriors.set_validation(False)
    try:
        with posepriors.validation(True):
            assert posepriors.get_validation()
        assert not posepriors.get_validation()  # the previous state, not the default
    finally:
        posepriors.set_validation(True)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("filler", [1e20, float("nan")])
def test_the_values_of_missing_joints_are_never_read(name, filler):
    """A mask's missing joints may hold anything, NaN included: the marginal and the completion ignore them."""
    torch.manual_seed(0)
    prior = make(name).eval()
    x = synthetic_poses(3, prior.joints, seed=1)
    joints = torch.tensor(prior.joints)
    missing = joints >= 40 if (joints >= 40).any() else joints == joints[-1]  # the right hand, or the right wrist
    mask = ~missing
    junk = x.clone()
    junk[:, missing] = filler
    with torch.no_grad():
        if name != "global_flow_conditional":  # one part: no exact marginal of a partial part, only completion
            expected = prior.log_prob(x, mask)
            assert torch.isfinite(expected).all()
            torch.testing.assert_close(prior.log_prob(junk, mask), expected)
        fast = {"steps": 5} if "steps" in prior.project_options() else {}  # the VAE's completion fits a latent code
        torch.testing.assert_close(prior.project(junk, mask, **fast), prior.project(x, mask, **fast))


@pytest.mark.parametrize("name", ["joint_flow", "global_flow"])
def test_body_latent_maps_check_their_argument_and_keep_its_dtype(name):
    from posepriors.priors import GlobalFlowConfig, GlobalFlowPrior

    if name == "global_flow":  # the test prior's first part must be the body
        prior = GlobalFlowPrior(GlobalFlowConfig(joints="body", hidden=16, num_layers=2)).eval()
    else:
        prior = make(name).eval()
    _, encode, decode = prior.body_latent()
    pose = synthetic_poses(3, skeleton.PARTS["body"], seed=2)
    with torch.no_grad():
        code = encode(pose)
        torch.testing.assert_close(encode(pose.reshape(3, 63)), code)  # flat poses too
        assert encode(pose.double()).dtype == torch.float64 and decode(code.double()).dtype == torch.float64
        torch.testing.assert_close(encode(pose.numpy()), code)
    for bad, error, match in [
        (torch.zeros(3, 55, 3), ValueError, r"body poses of shape \(B, 21, 3\) or \(B, 63\), got \(3, 55, 3\)"),
        (torch.zeros(21, 3), ValueError, r"got \(21, 3\)"),
        (torch.zeros(3, 21, 3, dtype=torch.int64), TypeError, r"body poses of shape .* as floating-point values"),
        ([0.0] * 63, TypeError, "got list"),
    ]:
        with pytest.raises(error, match=match):
            encode(bad)
    with pytest.raises(ValueError, match=r"body codes of shape \(B, 63\), got \(3, 21, 3\)"):
        decode(pose)


@pytest.mark.parametrize("name", ["gaussian", "gmm", "global_flow", "joint_flow"])
def test_torch_func_transforms_work_on_frozen_priors(name):
    """vmap and grad over nll: the frozen flows run block by block there, the finite check is skipped."""
    from torch.func import grad, vmap

    prior = make(name).eval().requires_grad_(False)
    x = synthetic_poses(3, prior.joints, seed=5).double()
    prior.double()
    expected = prior.nll(x)
    torch.testing.assert_close(vmap(prior.nll)(x[:, None])[:, 0], expected)
    leaf = x.clone().requires_grad_(True)
    prior.nll(leaf).sum().backward()
    torch.testing.assert_close(grad(lambda q: prior.nll(q).sum())(x), leaf.grad)


def test_whole_body_flows_point_a_bare_hand_to_a_hand_prior():
    """A MANO hand alone (15 joints) has no exact density under the whole-body flows: the error says what the
    pose observes and where hands alone are scored; a mask that hides a body joint gets no such hint."""
    hand = torch.zeros(2, 15, 3)
    wrist = torch.ones(55, dtype=torch.bool)
    wrist[20] = False
    for name, pattern in (
        ("global_flow", r"body missing, left_hand\+right_hand partly observed\).*load\('hands'\)"),
        ("joint_flow", r"observed 'right_index1' below missing 'right_wrist'.*load\('hands'\)"),
    ):
        prior = posepriors.load(name)
        with pytest.raises(ValueError, match=pattern):
            prior.nll(hand)
        with pytest.raises(ValueError) as error:
            prior.nll(torch.zeros(2, 55, 3), wrist)
        assert "load('hands')" not in str(error.value)


def test_denoise_fallback_warning_names_the_reason_of_the_family():
    with pytest.warns(UserWarning, match=r"HandVAE\.denoise: .*\(no closed-form posterior mean for this family\)"):
        posepriors.load("hand_vae").denoise(torch.zeros(2, 30, 3), noise_std=0.1)
    with pytest.warns(UserWarning, match=r"JointFlowPrior\.denoise: .*\(no smoothed body density\)"):
        posepriors.load("joint_flow").denoise({"body_pose": torch.zeros(2, 63)}, noise_std=0.1)


def test_a_mask_of_another_batch_is_named_in_the_shape_it_was_given():
    """The message used to show the mask after its conversion to the prior's joints ((2, 51) for a (2, 55) mask)."""
    prior = GaussianPrior(GaussianConfig(joints="body+left_hand+right_hand"))
    with pytest.raises(ValueError, match=r"broadcasts to the pose batch shape \(3,\) .*got shape \(2, 55\)"):
        prior.log_prob(torch.zeros(3, 55, 3), torch.ones(2, 55, dtype=torch.bool))


def test_reversed_and_read_only_numpy_inputs_are_read_like_any_array():
    """A reversed clip (``poses[::-1]``: negative strides, which ``torch.from_numpy`` refuses) and read-only arrays
    (which it warns about) are read as copies: the same numbers as the array itself, no error, no warning."""
    import warnings

    import numpy as np

    prior = posepriors.load("gaussian")
    poses = np.random.default_rng(0).normal(scale=0.2, size=(4, 21, 3)).astype(np.float32)
    expected = prior.log_prob(poses)
    frozen = poses.copy()
    frozen.setflags(write=False)
    mask = np.ones(55, dtype=bool)
    mask.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(prior.log_prob(poses[::-1]), expected.flip(0))
        torch.testing.assert_close(prior.log_prob(frozen, mask), expected)
        torch.testing.assert_close(prior.log_prob({"body_pose": frozen[::-1].reshape(4, 63)}), expected.flip(0))
