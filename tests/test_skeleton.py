"""Joint tables and exact layout conversions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from posepriors import kinematics, skeleton


def test_tree_and_parts():
    assert len(skeleton.SMPLX_JOINT_NAMES) == len(set(skeleton.SMPLX_JOINT_NAMES)) == 55
    assert skeleton.SMPLX_PARENTS[0] == -1
    assert all(0 <= p < j for j, p in enumerate(skeleton.SMPLX_PARENTS) if j > 0)
    names = skeleton.SMPLX_JOINT_NAMES
    assert names[skeleton.SMPLX_PARENTS[names.index("left_index1")]] == "left_wrist"
    assert names[skeleton.SMPLX_PARENTS[names.index("right_thumb3")]] == "right_thumb2"
    assert names[skeleton.SMPLX_PARENTS[names.index("jaw")]] == "head"
    flat = sorted(j for part in skeleton.PARTS.values() for j in part)
    assert flat == list(range(55))


@pytest.mark.parametrize("layout", sorted(skeleton.LAYOUTS))
def test_every_layout_round_trips(layout):
    lay = skeleton.LAYOUTS[layout]
    pose = torch.randn(4, 2, lay.num_joints, 3, dtype=torch.float64)
    pose[..., [i for i, j in enumerate(lay.smplx_index) if j < 0], :] = 0  # joints with no SMPL-X equivalent
    full, observed = skeleton.to_smplx(pose, layout=layout)
    assert full.shape == (4, 2, 55, 3) and full.dtype == torch.float64
    assert observed.sum() == sum(j >= 0 for j in lay.smplx_index)
    torch.testing.assert_close(skeleton.from_smplx(full, layout), pose, rtol=0, atol=0)
    flat, _ = skeleton.to_smplx(pose.reshape(4, 2, -1), layout=layout)
    torch.testing.assert_close(flat, full, rtol=0, atol=0)
    assert torch.all(full[..., ~observed, :] == 0)


@pytest.mark.parametrize(
    ("J", "layout"),
    [
        (55, "smplx"),
        (53, "smplx_no_eyes"),
        (52, "smplh"),
        (24, "smpl"),
        (23, "smpl_body"),
        (22, "root_body"),
        (21, "body"),
    ],
)
def test_detection_by_joint_count(J, layout):
    pose = torch.randn(3, J, 3)
    full, observed = skeleton.to_smplx(pose)
    expected, _ = skeleton.to_smplx(pose, layout=layout)
    torch.testing.assert_close(full, expected)
    torch.testing.assert_close(skeleton.to_smplx(pose.reshape(3, 3 * J))[0], expected)


def test_seed53_puts_zeros_at_the_eyes_and_keeps_the_rest():
    seed = torch.randn(5, 53, 3)
    full, observed = skeleton.to_smplx(seed)
    assert torch.all(full[:, 23:25] == 0) and not observed[23] and not observed[24]
    torch.testing.assert_close(full[:, :23], seed[:, :23])
    torch.testing.assert_close(full[:, 25:], seed[:, 23:])


def test_the_old_layout_name_seed53_is_an_alias_that_works_everywhere():
    assert skeleton.LAYOUT_ALIASES["seed53"] == "smplx_no_eyes" and "seed53" not in skeleton.LAYOUTS
    assert skeleton.resolve_layout("seed53") is skeleton.LAYOUTS["smplx_no_eyes"]
    pose55 = torch.randn(4, 55, 3)
    old, new = skeleton.from_smplx(pose55, "seed53"), skeleton.from_smplx(pose55, "smplx_no_eyes")
    assert old.shape == (4, 53, 3) and torch.equal(old, new)
    assert torch.equal(skeleton.to_smplx(old, layout="seed53")[0], skeleton.to_smplx(new, layout="smplx_no_eyes")[0])
    with pytest.raises(ValueError, match="expected a smplx_no_eyes pose of shape"):
        skeleton.to_smplx(torch.zeros(2, 52, 3), layout="seed53")
    with pytest.raises(ValueError, match=r"unknown layout 'seed54'.*alias \['seed53'\]"):
        skeleton.resolve_layout("seed54")
    with pytest.raises(TypeError, match="expected a layout name"):
        skeleton.resolve_layout(53)


def test_mano_hand_choice():
    hand = torch.randn(2, 15, 3)
    right, observed = skeleton.to_smplx(hand)
    torch.testing.assert_close(right[:, 40:], hand)
    assert observed.sum() == 15 and observed[40]
    left, _ = skeleton.to_smplx(hand.reshape(2, 45), hand="left")
    torch.testing.assert_close(left[:, 25:40], hand)
    with pytest.raises(ValueError, match="hand 'left' or 'right'"):
        skeleton.to_smplx(hand, hand="middle")


def test_dict_round_trip_and_numpy():
    pose = torch.randn(3, 55, 3)
    as_dict = skeleton.to_smplx_dict(pose)
    assert as_dict["body_pose"].shape == (3, 63) and as_dict["left_hand_pose"].shape == (3, 45)
    back, observed = skeleton.to_smplx({**as_dict, "transl": torch.zeros(3, 3), "betas": torch.zeros(3, 10)})
    torch.testing.assert_close(back, pose)
    assert observed.all()
    part, observed = skeleton.to_smplx({"body_pose": pose[:, 1:22].numpy(), "global_orient": pose[:, 0].numpy()})
    torch.testing.assert_close(part[:, :22], pose[:, :22])
    assert observed.sum() == 22
    single, _ = skeleton.to_smplx({"global_orient": torch.ones(1, 3), "jaw_pose": torch.ones(1, 3)})
    assert single.shape == (1, 55, 3)
    from_numpy, _ = skeleton.to_smplx(np.zeros((2, 165), dtype=np.float32))
    assert from_numpy.shape == (2, 55, 3) and from_numpy.dtype == torch.float32


def test_dict_parts_of_mixed_dtypes_are_promoted_and_single_joints_may_carry_a_joint_axis():
    pose = torch.randn(4, 55, 3, dtype=torch.float64)
    parts = skeleton.to_smplx_dict(pose)
    mixed = {**parts, "body_pose": parts["body_pose"].half(), "jaw_pose": parts["jaw_pose"].float()}
    full, _ = skeleton.to_smplx(mixed)
    assert full.dtype == torch.float64  # not the first key's half precision: the hands keep their float64 values
    torch.testing.assert_close(full[:, 25:], pose[:, 25:], atol=0, rtol=0)
    stored = {"global_orient": pose[:, :1], "body_pose": pose[:, 1:22]}  # (B, 1, 3), as some pipelines store it
    full, observed = skeleton.to_smplx(stored)
    torch.testing.assert_close(full[:, :22], pose[:, :22], atol=0, rtol=0)
    assert observed.sum() == 22
    alone, _ = skeleton.to_smplx({"global_orient": pose[:, :1]})  # alone, (*, 3): a batch (B, 1)
    assert alone.shape == (4, 1, 55, 3)


def test_gradient_flows_through_conversion():
    pose = torch.randn(2, 53, 3, requires_grad=True)
    full, _ = skeleton.to_smplx(pose)
    (full * torch.arange(55.0)[:, None]).sum().backward()
    assert torch.all(pose.grad[:, 0] == 0) and torch.all(pose.grad[:, 23] == 25)


def test_resolve_joints():
    assert skeleton.resolve_joints("body") == tuple(range(1, 22))
    assert skeleton.resolve_joints("body+left_hand+right_hand") == (*range(1, 22), *range(25, 55))
    assert skeleton.resolve_joints("hands") == tuple(range(25, 55))
    assert skeleton.resolve_joints("all") == tuple(range(55))
    assert skeleton.resolve_joints([1, 2, 5]) == (1, 2, 5)
    for bad, match in [
        ("torso", "unknown part 'torso'"),
        ([3, 1], "sorted unique"),
        ([], "non-empty"),
        ([60], r"\[0, 54\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            skeleton.resolve_joints(bad)


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (torch.zeros(2, 20, 3), ValueError, r"J in \(55, 53, 52, 24, 23, 22, 21, 15\), got \(2, 20, 3\)"),
        (torch.zeros(2, 55, 3, dtype=torch.int32), TypeError, "floating-point"),
        ({"body_pose": torch.zeros(2, 62)}, ValueError, r"body_pose of shape \(\*, 63\)"),
        ({"body_pose": torch.zeros(2, 63), "jaw_pose": torch.zeros(3, 3)}, ValueError, "batch shapes"),
        ({"head_pose": torch.zeros(2, 3)}, ValueError, "unknown pose keys"),
        (
            {"body_pose": torch.zeros(2, 63), "left_hand": torch.zeros(2, 45)},
            ValueError,
            r"unknown pose keys \['left_hand'\]",
        ),
        ({"body_pose": torch.zeros(2, 63), "lhand": torch.zeros(2, 45)}, ValueError, "unknown pose keys"),
        ({"body_pose": torch.zeros(2, 63), 3: torch.zeros(2, 3)}, TypeError, "keys to be strings"),
        ({"body_pose": torch.zeros(2, 63), "global_orient": torch.zeros(2, 4)}, ValueError, r"\(\*, 1, 3\) next"),
        ({}, ValueError, "at least one of"),
        ([1.0, 2.0], TypeError, "tensor or numpy"),
    ],
)
def test_bad_input(bad, error, match):
    with pytest.raises(error, match=match):
        skeleton.to_smplx(bad)


def test_from_smplx_errors():
    with pytest.raises(ValueError, match="unknown layout"):
        skeleton.from_smplx(torch.zeros(55, 3), "vposer")
    with pytest.raises(ValueError, match=r"\(\*, 55, 3\)"):
        skeleton.from_smplx(torch.zeros(53, 3), "body")


def test_modelled_parents_skip_unmodelled_ancestors():
    assert skeleton.modelled_parents(range(55)) == tuple(skeleton.SMPLX_PARENTS)
    body = skeleton.PARTS["body"]  # no root: hips and spine1 have no modelled parent
    parents = skeleton.modelled_parents(body)
    names = skeleton.SMPLX_JOINT_NAMES
    for i, j in enumerate(body):
        if names[j] in ("left_hip", "right_hip", "spine1"):
            assert parents[i] == -1
        else:
            assert body[parents[i]] == skeleton.SMPLX_PARENTS[j]
    hands = skeleton.resolve_joints("body+right_hand")  # the right wrist (20 -> 21) parents the fingers
    index1 = hands.index(names.index("right_index1"))
    assert hands[skeleton.modelled_parents(hands)[index1]] == names.index("right_wrist")
    fingers = skeleton.PARTS["right_hand"]  # without the wrist, every finger chain starts a tree
    assert sum(p < 0 for p in skeleton.modelled_parents(fingers)) == 5


def test_modelled_descendants_are_the_subtrees():
    everything = skeleton.modelled_descendants(range(55))
    names = skeleton.SMPLX_JOINT_NAMES
    assert set(everything[0]) == set(range(55))
    arm = {names[j] for j in everything[names.index("left_shoulder")]}
    assert {"left_shoulder", "left_elbow", "left_wrist", "left_thumb3"} <= arm and len(arm) == 18
    assert everything[names.index("left_thumb3")] == (names.index("left_thumb3"),)
    body = skeleton.PARTS["body"]
    sub = skeleton.modelled_descendants(body)
    for i in range(len(body)):  # i's subtree: i itself and every joint whose parent chain reaches i
        for k in sub[i]:
            chain, p = [k], skeleton.modelled_parents(body)[k]
            while p >= 0:
                chain.append(p)
                p = skeleton.modelled_parents(body)[p]
            assert i in chain


def test_numpy_poses_and_fractional_indices():
    pose = np.random.default_rng(0).normal(scale=0.3, size=(2, 55, 3))
    torch_pose = torch.from_numpy(pose)
    assert torch.equal(skeleton.from_smplx(pose, "smplh"), skeleton.from_smplx(torch_pose, "smplh"))
    assert torch.equal(skeleton.to_smplx_dict(pose)["body_pose"], skeleton.to_smplx_dict(torch_pose)["body_pose"])
    assert torch.equal(skeleton.mirror_pose(pose), skeleton.mirror_pose(torch_pose))
    assert torch.equal(kinematics.forward_kinematics(pose), kinematics.forward_kinematics(torch_pose))
    with pytest.raises(TypeError, match="SMPL-X poses as a tensor or numpy array, got list"):
        kinematics.forward_kinematics(pose.tolist())
    with pytest.raises(ValueError, match=r"integer joint indices, got \[0, 1.5\]"):
        skeleton.resolve_joints([0, 1.5])
    assert skeleton.resolve_joints([1.0, 2]) == (1, 2)


def test_rotation_matrices_get_a_hint():
    with pytest.raises(ValueError, match=r"got \(2, 55, 3, 3\) \(rotation matrices\? .*matrix_to_axis_angle"):
        skeleton.to_smplx(torch.eye(3).expand(2, 55, 3, 3))


def test_hand_pose_from_pca_is_smplx_projection_plus_mean():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(45, 45, dtype=torch.float64, generator=g))[0].T  # rows: components
    mean = 0.1 * torch.randn(45, dtype=torch.float64, generator=g)
    coefficients = torch.randn(2, 3, 6, dtype=torch.float64, generator=g)
    pose = skeleton.hand_pose_from_pca(coefficients, basis, mean.reshape(15, 3))
    assert pose.shape == (2, 3, 45) and pose.dtype == torch.float64
    torch.testing.assert_close(pose, torch.einsum("...p,pj->...j", coefficients, basis[:6]) + mean)
    # orthonormal rows: the coefficients come back; all 45 components reproduce any pose exactly
    torch.testing.assert_close((pose - mean) @ basis[:6].T, coefficients)
    full = torch.randn(4, 45, dtype=torch.float64, generator=g)
    torch.testing.assert_close(skeleton.hand_pose_from_pca(full @ basis.T, basis.numpy()), full)
    # the result is a hand pose every prior accepts in a dict, and gradients reach the coefficients
    coefficients = coefficients[0].float().requires_grad_(True)
    hands = skeleton.hand_pose_from_pca(coefficients, basis.float(), mean.float())
    pose55, observed = skeleton.to_smplx({"left_hand_pose": hands})
    assert observed.sum() == 15
    pose55.square().sum().backward()
    assert coefficients.grad is not None and torch.isfinite(coefficients.grad).all()


@pytest.mark.parametrize(
    ("coefficients", "components", "mean", "match"),
    [
        (torch.zeros(2, 6), torch.zeros(6, 15, 3), None, r"components of shape \(Q, 45\).*got \(6, 15, 3\)"),
        (torch.zeros(2, 12), torch.zeros(6, 45), None, r"1 <= P <= 6.*got \(2, 12\)"),
        (torch.zeros(()), torch.zeros(6, 45), None, r"coefficients of shape \(\*, P\).*got \(\)"),
        (torch.zeros(2, 6), torch.zeros(6, 45), torch.zeros(44), r"mean hand pose of shape \(45,\).*got \(44,\)"),
    ],
)
def test_hand_pose_from_pca_errors(coefficients, components, mean, match):
    with pytest.raises(ValueError, match=match):
        skeleton.hand_pose_from_pca(coefficients, components, mean)


def test_pca_hand_poses_in_a_dict_get_a_hint():
    with pytest.raises(ValueError, match=r"got \(2, 6\); PCA coefficients.*hand_pose_from_pca\(right_hand_pose, "):
        skeleton.to_smplx({"body_pose": torch.zeros(2, 63), "right_hand_pose": torch.zeros(2, 6)})
    with pytest.raises(ValueError, match=r"got \(2, 14, 3\)$"):  # joints, not coefficients: no hint
        skeleton.to_smplx({"left_hand_pose": torch.zeros(2, 14, 3)})


def _smplx_output(absolute: torch.Tensor, mean_hand: torch.Tensor):
    """A stand-in for smplx's SMPLXOutput of a flat_hand_mean=False model with return_full_pose=True: hand parts
    relative to the mean hand, full_pose (B, 165) absolute; no eye keys (smplx's output has none)."""
    from tests.test_api_checks import FakeSMPLXOutput

    parts = skeleton.to_smplx_dict(absolute)
    return FakeSMPLXOutput(
        global_orient=parts["global_orient"],
        body_pose=parts["body_pose"],
        jaw_pose=parts["jaw_pose"],
        left_hand_pose=parts["left_hand_pose"] - mean_hand,
        right_hand_pose=parts["right_hand_pose"] - mean_hand,
        full_pose=absolute.reshape(-1, 165),
    )


def test_full_pose_of_an_smplx_output_gives_the_absolute_hands():
    g = torch.Generator().manual_seed(0)
    absolute = 0.3 * torch.randn(2, 55, 3, generator=g)
    mean_hand = 0.15 * torch.ones(45)
    output = _smplx_output(absolute, mean_hand)
    pose, observed = skeleton.to_smplx(output)
    torch.testing.assert_close(pose, absolute)
    assert observed.all()  # the eyes come from full_pose
    # without full_pose the parts are all there is (relative hands: the caller must add the mean)
    without, observed = skeleton.to_smplx({**vars(output), "full_pose": None})
    torch.testing.assert_close(without[:, 25:40], absolute[:, 25:40] - mean_hand.reshape(15, 3))
    assert not observed[23:25].any()
    # full_pose alone, and a full_pose that agrees with the parts: the same pose
    torch.testing.assert_close(skeleton.to_smplx({"full_pose": output.full_pose})[0], absolute)
    flat = _smplx_output(absolute, torch.zeros(45))
    torch.testing.assert_close(skeleton.to_smplx(flat)[0], absolute)
    # an SMPL-H full_pose (no jaw, no eyes) next to a jaw part: the jaw from the part
    smplh = {"full_pose": skeleton.from_smplx(absolute, "smplh"), "jaw_pose": absolute[:, 22]}
    pose, observed = skeleton.to_smplx(smplh)
    torch.testing.assert_close(pose[:, :23], absolute[:, :23])
    assert observed.sum() == 53 and not observed[23:25].any()
    # MANO's full_pose (16 joints: no whole-body layout) is left alone, as before
    hand = {"right_hand_pose": absolute[:, 40:].reshape(2, 45), "full_pose": torch.zeros(2, 48)}
    torch.testing.assert_close(skeleton.to_smplx(hand)[0][:, 40:], absolute[:, 40:])


def test_full_pose_that_disagrees_with_the_body_parts_is_refused():
    absolute = 0.3 * torch.randn(2, 55, 3, generator=torch.Generator().manual_seed(1))
    output = _smplx_output(absolute, torch.zeros(45))
    output.body_pose = output.body_pose.clone()
    output.body_pose[:, 3 * 17 : 3 * 18] += 0.2  # joint 18, the left elbow, edited after the forward pass
    with pytest.raises(ValueError, match=r"full_pose disagrees with its part keys at left_elbow \(by up to 0\.2"):
        skeleton.to_smplx(output)
    with pytest.raises(ValueError, match=r"batch shapes of the pose dict disagree: full_pose has \(3,\)"):
        skeleton.to_smplx({"body_pose": absolute[:, 1:22], "full_pose": torch.zeros(3, 165)})


def test_amass_root_and_body_slice_is_the_root_and_body_of_its_smplh_pose():
    poses = torch.randn(3, 156)  # AMASS "poses": SMPL-H
    full, _ = skeleton.to_smplx(poses)
    part, observed = skeleton.to_smplx(poses[:, :66])
    torch.testing.assert_close(part[:, :22], full[:, :22])
    assert observed.tolist() == [j < 22 for j in range(55)]


def test_a_mano_outputs_hand_pose_gets_a_hint():
    with pytest.raises(ValueError, match=r"unknown pose keys \['hand_pose'\].*pass the tensor itself.*mano_left"):
        skeleton.to_smplx({"global_orient": torch.zeros(2, 3), "hand_pose": torch.zeros(2, 45)})
