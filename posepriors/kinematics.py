"""Forward kinematics on an approximate SMPL-X-like skeleton of posepriors' own.

The bone offsets below are hand-made approximations of an adult body (metres, y up, the body facing +z), NOT the
licensed SMPL-X template: they are good enough for stick-figure plots and keypoint-fitting examples, not for
measurements.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posepriors import skeleton
from posepriors.rotations import axis_angle_to_matrix

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
    rot = axis_angle_to_matrix(pose)  # (*, 55, 3, 3)
    world_rot: list[Tensor] = []
    world_pos: list[Tensor] = []
    for j, parent in enumerate(skeleton.SMPLX_PARENTS):  # parents precede children
        if parent < 0:
            world_rot.append(rot[..., j, :, :])
            world_pos.append(torch.zeros_like(pose[..., j, :]))
            continue
        world_rot.append(world_rot[parent] @ rot[..., j, :, :])
        world_pos.append(world_pos[parent] + (world_rot[parent] @ offsets[j].unsqueeze(-1)).squeeze(-1))
    return torch.stack(world_pos, dim=-2)
