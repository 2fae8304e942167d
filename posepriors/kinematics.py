"""Forward kinematics on an approximate SMPL-X-like skeleton of posepriors' own.

The bone offsets below are hand-made approximations of an adult body (metres, y up, the body facing +z), NOT the
licensed SMPL-X template: they are good enough for stick-figure plots and keypoint-fitting examples, not for
measurements.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch
from torch import Tensor

from posepriors import skeleton
from posepriors.flows import _numba_spline
from posepriors.rotations import axis_angle_to_matrix
from posepriors.utils import recorded_vjp

__all__ = ["BONES", "REST_JOINTS", "forward_kinematics", "rest_offsets"]

# Rest-pose joint positions (metres) of a T-posed adult, by SMPL-X joint name.
REST_JOINTS: dict[str, tuple[float, float, float]] = {
    "pelvis": (0.0, 0.0, 0.0),
    "left_hip": (0.06, -0.09, 0.0),
    "right_hip": (-0.06, -0.09, 0.0),
    "spine1": (0.0, 0.11, -0.01),
    "left_knee": (0.1, -0.47, 0.0),
    "right_knee": (-0.1, -0.47, 0.0),
    "spine2": (0.0, 0.24, 0.0),
    "left_ankle": (0.09, -0.87, -0.04),
    "right_ankle": (-0.09, -0.87, -0.04),
    "spine3": (0.0, 0.3, 0.01),
    "left_foot": (0.11, -0.93, 0.09),
    "right_foot": (-0.11, -0.93, 0.09),
    "neck": (0.0, 0.5, -0.01),
    "left_collar": (0.07, 0.42, 0.0),
    "right_collar": (-0.07, 0.42, 0.0),
    "head": (0.0, 0.58, 0.04),
    "left_shoulder": (0.17, 0.45, -0.01),
    "right_shoulder": (-0.17, 0.45, -0.01),
    "left_elbow": (0.42, 0.45, -0.03),
    "right_elbow": (-0.42, 0.45, -0.03),
    "left_wrist": (0.67, 0.45, -0.02),
    "right_wrist": (-0.67, 0.45, -0.02),
    "jaw": (0.0, 0.55, 0.06),
    "left_eye_smplhf": (0.03, 0.64, 0.1),
    "right_eye_smplhf": (-0.03, 0.64, 0.1),
}
_FINGERS = {"index": (0.09, 0.02), "middle": (0.095, 0.0), "pinky": (0.08, -0.04), "ring": (0.09, -0.02)}
for _side, _sign in (("left", 1.0), ("right", -1.0)):
    _wx = REST_JOINTS[f"{_side}_wrist"][0]
    for _finger, (_x, _z) in _FINGERS.items():
        for _k in range(3):
            REST_JOINTS[f"{_side}_{_finger}{_k + 1}"] = (
                _sign * (abs(_wx) + _x + 0.03 * _k),
                0.45,
                -0.02 + _z,
            )
    for _k in range(3):
        REST_JOINTS[f"{_side}_thumb{_k + 1}"] = (
            _sign * (abs(_wx) + 0.03 + 0.025 * _k),
            0.43,
            0.03 + 0.02 * _k,
        )

BONES: tuple[tuple[int, int], ...] = tuple((p, j) for j, p in enumerate(skeleton.SMPLX_PARENTS) if p >= 0)
"""(parent, child) index pairs of the 54 bones, for drawing."""


def rest_offsets(dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
    """Offsets of every joint from its parent in the rest pose (the root's from the origin), shape (55, 3)."""
    rest = torch.tensor([REST_JOINTS[n] for n in skeleton.SMPLX_JOINT_NAMES], dtype=dtype, device=device)
    parents = torch.tensor([max(p, 0) for p in skeleton.SMPLX_PARENTS], device=device)
    offsets = rest - rest[parents]
    offsets[0] = rest[0]
    return offsets


def forward_kinematics(pose: Tensor, offsets: Tensor | None = None) -> Tensor:
    """Joint positions of SMPL-X poses on the approximate skeleton (differentiable).

    Args:
        pose: Axis-angle rotations in the SMPL-X layout, shape (*, 55, 3) (a tensor or NumPy array); joint 0 is
            the global orientation.
        offsets: Bone offsets, shape (55, 3); default :func:`rest_offsets`.

    Returns:
        Joint positions in metres, shape (*, 55, 3), with the pelvis at the origin.
    """
    pose = skeleton.as_float_tensor(pose, "SMPL-X poses")
    if pose.dim() < 2 or pose.shape[-2:] != (skeleton.NUM_JOINTS, 3):
        raise ValueError(f"expected SMPL-X poses of shape (*, 55, 3), got {tuple(pose.shape)}")
    if offsets is None:
        offsets = rest_offsets(pose.dtype, pose.device)
    elif not isinstance(offsets, Tensor) or offsets.shape != (skeleton.NUM_JOINTS, 3):
        shape = tuple(offsets.shape) if isinstance(offsets, Tensor) else type(offsets).__name__
        raise ValueError(f"expected offsets as a tensor of shape (55, 3), got {shape}")
    else:
        offsets = offsets.to(device=pose.device, dtype=pose.dtype)
    return _joint_positions(pose, skeleton.SMPLX_PARENTS, offsets)


def _joint_positions(pose: Tensor, parents: tuple[int, ...], offsets: Tensor) -> Tensor:
    """Joint positions of a kinematic tree (differentiable): ``forward_kinematics`` for any tree.

    Args:
        pose: Axis-angle rotations of the J joints, shape (*, J, 3).
        parents: Each joint's parent index (-1 for a root, whose position is the origin); parents precede children.
        offsets: Each joint's offset from its parent in the rest pose, shape (J, 3), in the pose's dtype and device.

    Returns:
        Joint positions, shape (*, J, 3).
    """
    jumps, parent_slots, ancestors = _tree_tables(tuple(parents), pose.device)  # checks the parents, once
    J = len(parents)
    if pose.dim() < 2 or pose.shape[-2:] != (J, 3) or offsets.shape != (J, 3):  # the loop reads unchecked
        raise ValueError(
            f"expected poses (*, {J}, 3) and offsets ({J}, 3), got {tuple(pose.shape)} and {tuple(offsets.shape)}"
        )
    if _fast_path(pose, offsets):
        batch = pose.shape[:-2]
        return _Chain.apply(pose.reshape(-1, J, 3), tuple(parents), offsets).reshape(*batch, J, 3)
    return _tensor_positions(pose, jumps, parent_slots, ancestors, offsets)


def _tensor_positions(
    pose: Tensor, jumps: list[Tensor], parent_slots: Tensor, ancestors: Tensor, offsets: Tensor
) -> Tensor:
    """:func:`_joint_positions` as tensor ops, from :func:`_tree_tables`."""
    rot = axis_angle_to_matrix(pose)  # (*, J, 3, 3)
    # world rotations by pointer jumping: world_j = rot of j's root ... rot_j, in log2(depth) batched products
    # (slot J is the identity, every root's "parent")
    world = torch.cat([rot, torch.eye(3, dtype=rot.dtype, device=rot.device).expand(*rot.shape[:-3], 1, 3, 3)], -3)
    for jump in jumps:
        world = world.index_select(-3, jump) @ world
    # position_j = sum over j's non-root ancestors a (and j) of world_parent(a) offsets_a
    steps = (world.index_select(-3, parent_slots) @ offsets.unsqueeze(-1)).squeeze(-1)  # (*, J, 3)
    return ancestors.to(pose.dtype) @ steps


@cache
def _tree_tables(parents: tuple[int, ...], device: torch.device) -> tuple[list[Tensor], Tensor, Tensor]:
    """For :func:`_joint_positions`' tensor path: the pointer-jumping index lists over the J joints and an identity
    slot J, each joint's parent slot, and the (J, J) indicator of the non-root ancestors-or-self of each joint."""
    J = len(parents)
    if any(not -1 <= p < j for j, p in enumerate(parents)):
        raise ValueError(f"expected parents that precede their children (or -1 for a root), got {parents}")
    slots = [p if p >= 0 else J for p in parents] + [J]
    depth = 0
    for j in range(J):
        d, k = 0, j
        while parents[k] >= 0:
            d, k = d + 1, parents[k]
        depth = max(depth, d)
    jumps = []
    for _ in range(math.ceil(math.log2(depth + 1))):
        jumps.append(torch.tensor(slots, device=device))
        slots = [slots[k] for k in slots]
    ancestors = torch.zeros(J, J, device=device)  # zeros and ones: exact in any dtype (and MPS has no float64)
    for j in range(J):
        k = j
        while parents[k] >= 0:
            ancestors[j, k] = 1.0
            k = parents[k]
    return jumps, torch.tensor([p if p >= 0 else J for p in parents], device=device), ancestors


@cache
def _parent_array(parents: tuple[int, ...]) -> np.ndarray:
    return np.asarray(parents, dtype=np.int64)


PARALLEL_POSES = 64
"""From this many poses, the fast path's loops run in parallel threads."""


def _fast_path(pose: Tensor, offsets: Tensor) -> bool:
    """Whether :func:`_joint_positions` runs the Numba loops (:mod:`posepriors._numba_kinematics`): a plain CPU pose
    (see ``_numba_spline.plain_cpu``), offsets that need no gradient, and the kernels available and wanted."""
    return (
        not (offsets.requires_grad and torch.is_grad_enabled())
        and _numba_spline.plain_cpu(pose, offsets)
        and _numba_spline.wanted(pose.numel())
    )


@cache
def _kernels():  # noqa: ANN202
    from posepriors import _numba_kinematics

    return _numba_kinematics


class _Chain(torch.autograd.Function):
    """:func:`_joint_positions` on the CPU as one autograd node: Rodrigues' formula and the chain per pose in a Numba
    loop (float64 inside), whose backward is the written-out vector-Jacobian product. Gradients reach the pose only
    (the caller checks that the offsets need none). A backward with ``create_graph=True`` (second derivatives)
    runs through the tensor ops instead, so that it is differentiable too."""

    @staticmethod
    def forward(ctx, pose: Tensor, parents: tuple[int, ...], offsets: Tensor) -> Tensor:  # noqa: ANN001
        aa = pose.detach().to(torch.float64).contiguous().numpy()
        B, J = aa.shape[:2]
        parent_array = _parent_array(parents)
        off = offsets.detach().to(torch.float64).contiguous().numpy()
        rot, world, pos = np.empty((B, J, 3, 3)), np.empty((B, J, 3, 3)), np.empty((B, J, 3))
        kernels = _kernels()
        if B >= PARALLEL_POSES:
            _numba_spline._threads()
            kernels.chain_forward(aa, parent_array, off, rot, world, pos)
        else:
            kernels.chain_forward_serial(aa, parent_array, off, rot, world, pos)
        ctx.arrays = aa, parent_array, off, rot, world
        ctx.parents = parents
        # autograd then refuses a backward after an in-place change of either (the arrays may share their memory)
        ctx.save_for_backward(pose, offsets)
        return torch.from_numpy(pos).to(pose.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: ANN001
        pose, offsets = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the tensor ops' backward, itself differentiable
            tables = _tree_tables(ctx.parents, pose.device)

            def positions(p: Tensor) -> Tensor:
                return _tensor_positions(p, *tables, offsets.detach())

            return *recorded_vjp(positions, (pose,), (grad,)), None, None
        aa, parent_array, off, rot, world = ctx.arrays
        grad_pos = grad.to(torch.float64).contiguous().numpy().copy()  # the loop accumulates into it
        grad_world, grad_rot, grad_aa = np.empty_like(world), np.empty_like(rot), np.empty_like(aa)
        kernels = _kernels()
        if aa.shape[0] >= PARALLEL_POSES:
            _numba_spline._threads()
            kernels.chain_backward(aa, parent_array, off, rot, world, grad_pos, grad_world, grad_rot, grad_aa)
        else:
            kernels.chain_backward_serial(aa, parent_array, off, rot, world, grad_pos, grad_world, grad_rot, grad_aa)
        return torch.from_numpy(grad_aa).to(pose.dtype), None, None
