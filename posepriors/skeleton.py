"""The SMPL-X skeleton: joint names, kinematic tree, parts, and conversions between pose layouts.

Every layout is a list of SMPL-X joint indices (:class:`Layout`), so every conversion is one gather or scatter and
exact in both directions.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from posepriors.utils import from_numpy

__all__ = [
    "DICT_KEYS",
    "LAYOUTS",
    "LAYOUT_ALIASES",
    "Layout",
    "MIRROR_JOINTS",
    "NUM_JOINTS",
    "PARTS",
    "SMPLX_JOINT_NAMES",
    "SMPLX_PARENTS",
    "describe_joints",
    "from_smplx",
    "hand_pose_from_pca",
    "layouts_with",
    "mirror_index",
    "mirror_pose",
    "modelled_descendants",
    "modelled_parents",
    "pose_mapping",
    "resolve_joints",
    "resolve_layout",
    "to_smplx",
    "to_smplx_dict",
    "unknown_pose_keys",
]

_FINGERS = ("index", "middle", "pinky", "ring", "thumb")
SMPLX_JOINT_NAMES: tuple[str, ...] = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2", "left_ankle",
    "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar", "right_collar", "head",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "jaw", "left_eye_smplhf", "right_eye_smplhf",
    *(f"left_{f}{k}" for f in _FINGERS for k in (1, 2, 3)),
    *(f"right_{f}{k}" for f in _FINGERS for k in (1, 2, 3)),
)  # fmt: skip
"""The 55 SMPL-X joints in model order."""

SMPLX_PARENTS: tuple[int, ...] = (
    -1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 15, 15, 15,
    *(p for f in range(5) for p in (20, 25 + 3 * f, 26 + 3 * f)),
    *(p for f in range(5) for p in (21, 40 + 3 * f, 41 + 3 * f)),
)  # fmt: skip
"""Parent of every SMPL-X joint in the kinematic tree (-1 for the pelvis); parents precede children."""

NUM_JOINTS = 55

PARTS: dict[str, tuple[int, ...]] = {
    "root": (0,),
    "body": tuple(range(1, 22)),
    "jaw": (22,),
    "eyes": (23, 24),
    "left_hand": tuple(range(25, 40)),
    "right_hand": tuple(range(40, 55)),
}
"""SMPL-X joint indices of each body part."""

_ALIASES = {"hands": ("left_hand", "right_hand"), "all": tuple(PARTS)}


def _mirror_name(name: str) -> str:
    for a, b in (("left_", "right_"), ("right_", "left_")):
        if name.startswith(a):
            return b + name[len(a) :]
    return name


MIRROR_JOINTS: tuple[int, ...] = tuple(SMPLX_JOINT_NAMES.index(_mirror_name(n)) for n in SMPLX_JOINT_NAMES)
"""The left-right counterpart of every SMPL-X joint (itself for pelvis, spine, neck, head and jaw)."""


def resolve_joints(spec: str | Sequence[int]) -> tuple[int, ...]:
    """Turn a part spec into sorted SMPL-X joint indices.

    Args:
        spec: A part name (``"body"``), a ``+``-joined combination (``"body+left_hand+right_hand"``), an alias
            (``"hands"``, ``"all"``), or SMPL-X indices.

    Returns:
        Sorted, unique joint indices.
    """
    if isinstance(spec, str):
        joints: set[int] = set()
        for name in spec.split("+"):
            name = name.strip()
            if name in PARTS:
                joints.update(PARTS[name])
            elif name in _ALIASES:
                joints.update(j for part in _ALIASES[name] for j in PARTS[part])
            else:
                raise ValueError(
                    f"unknown part {name!r} in {spec!r}; expected '+'-joined names from "
                    f"{sorted(PARTS) + sorted(_ALIASES)}"
                )
        return tuple(sorted(joints))
    try:
        joints_list = [int(j) for j in spec]
        exact = all(j == int(j) for j in spec)
    except (TypeError, ValueError):
        raise ValueError(f"expected a part spec string or a sequence of joint indices, got {spec!r}") from None
    if not exact:
        raise ValueError(f"expected integer joint indices, got {spec!r}")
    if any(isinstance(j, bool) for j in spec):
        raise ValueError(f"expected joint indices, got booleans in {spec!r}")
    if not joints_list or min(joints_list) < 0 or max(joints_list) >= NUM_JOINTS:
        raise ValueError(f"expected a non-empty set of SMPL-X joint indices in [0, 54], got {joints_list}")
    if len(set(joints_list)) != len(joints_list) or joints_list != sorted(joints_list):
        raise ValueError(f"expected sorted unique joint indices, got {joints_list}")
    return tuple(joints_list)


@dataclass(frozen=True)
class Layout:
    """A pose layout as the SMPL-X index of each of its joints (-1: no SMPL-X equivalent, e.g. SMPL's hands).

    Attributes:
        name: Layout name (a key of :data:`LAYOUTS`).
        smplx_index: SMPL-X index of each joint of the layout.
        description: One line.
    """

    name: str
    smplx_index: tuple[int, ...]
    description: str

    @property
    def num_joints(self) -> int:
        return len(self.smplx_index)


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("smplx", tuple(range(55)), "SMPL-X: root, 21 body, jaw, 2 eyes, 15 left hand, 15 right hand"),
        Layout(
            "smplx_no_eyes",
            (*range(23), *range(25, 55)),
            "SMPL-X without the eyes: root, 21 body, jaw, 15 left hand, 15 right hand (the seed's 53 joints)",
        ),
        Layout("smplh", (*range(22), *range(25, 55)), "SMPL-H: root, 21 body, 15 left hand, 15 right hand"),
        Layout("smpl", (*range(22), -1, -1), "SMPL: root, 21 body, one joint per hand (not in SMPL-X)"),
        Layout("smpl_body", (*range(1, 22), -1, -1), "SMPL body_pose: 21 body joints + SMPL's two hand joints"),
        Layout("root_body", tuple(range(22)), "global_orient and the 21 body joints (AMASS poses[:, :66])"),
        Layout("body", tuple(range(1, 22)), "SMPL-X body_pose: the 21 body joints"),
        Layout("mano_left", PARTS["left_hand"], "MANO left hand, 15 joints"),
        Layout("mano_right", PARTS["right_hand"], "MANO right hand, 15 joints"),
    )
}
"""Every supported layout by its name (aliases of old names: :data:`LAYOUT_ALIASES`)."""

LAYOUT_ALIASES: dict[str, str] = {"seed53": "smplx_no_eyes"}
"""Old layout names that still work everywhere a layout name is taken: ``"seed53"`` (the seed code base's
53-joint layout) is ``"smplx_no_eyes"``."""


def resolve_layout(name: str) -> Layout:
    """The :class:`Layout` of a layout name or of an alias (:data:`LAYOUT_ALIASES`).

    Raises:
        ValueError: On an unknown name, listing the known ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"expected a layout name (a string), got {name!r} ({type(name).__name__})")
    canonical = LAYOUT_ALIASES.get(name, name)
    if canonical not in LAYOUTS:
        raise ValueError(
            f"unknown layout {name!r}; expected one of {sorted(LAYOUTS)} (or an alias {sorted(LAYOUT_ALIASES)})"
        )
    return LAYOUTS[canonical]


_COUNTS = tuple(sorted({lay.num_joints for lay in LAYOUTS.values()}, reverse=True))
"""Joint counts of the layouts in :data:`LAYOUTS` (an input's count picks its layout)."""


def layouts_with(count: int) -> list[Layout]:
    """The layouts of :data:`LAYOUTS` with ``count`` joints."""
    return [lay for lay in LAYOUTS.values() if lay.num_joints == count]


def _layout_by_count(count: int, hand: str) -> Layout:
    """The layout an input of ``count`` joints is in: the only one with that count, or for MANO's 15 joints the
    ``hand`` one; any other tie is an error that asks for ``layout=``."""
    candidates = layouts_with(count)
    if len(candidates) > 1 and all(lay.name.startswith("mano_") for lay in candidates):
        candidates = [lay for lay in candidates if lay.name == f"mano_{hand}"]
    if len(candidates) != 1:
        raise ValueError(
            f"a pose of {count} joints could be any of the layouts {[lay.name for lay in candidates]}; "
            "pass layout= to say which"
        )
    return candidates[0]


DICT_KEYS: dict[str, tuple[int, ...]] = {
    "global_orient": PARTS["root"],
    "body_pose": PARTS["body"],
    "jaw_pose": PARTS["jaw"],
    "leye_pose": (23,),
    "reye_pose": (24,),
    "left_hand_pose": PARTS["left_hand"],
    "right_hand_pose": PARTS["right_hand"],
}
"""smplx-style keyword names and the SMPL-X joints each holds."""


_POSE_WORDS = ("pose", "orient", "hand", "jaw", "eye")


_IGNORED_POSE_KEYS = frozenset({"full_pose"})  # smplx outputs: see _with_full_pose


def unknown_pose_keys(keys: Iterable[Any]) -> list[str]:
    """The keys that look like joint rotations (with ``pose``, ``orient``, ``hand``, ``jaw`` or ``eye`` in them, as
    in ``left_hand`` or ``lhand``) but are none of :data:`DICT_KEYS`: likely typos, sorted."""
    return sorted(
        k
        for k in keys
        if isinstance(k, str)
        and any(word in k.lower() for word in _POSE_WORDS)
        and k not in DICT_KEYS
        and k not in _IGNORED_POSE_KEYS
    )


def pose_mapping(pose: Any) -> Mapping[str, Any] | None:
    """The pose dict of ``pose`` when it is one: a mapping, or an object such as ``smplx``'s ``ModelOutput`` (a
    dataclass) whose fields include smplx-style pose keys; None otherwise (tensors, arrays)."""
    if isinstance(pose, Mapping):
        return pose
    if dataclasses.is_dataclass(pose) and not isinstance(pose, type):
        return {f.name: getattr(pose, f.name) for f in dataclasses.fields(pose)}
    return None


def as_float_tensor(pose: Any, what: str) -> Tensor:
    """``pose``, a floating-point tensor or NumPy array, as a tensor; else a ``TypeError`` naming ``what``."""
    if isinstance(pose, np.ndarray):
        pose = from_numpy(pose)
    if not isinstance(pose, Tensor):
        raise TypeError(f"expected {what} as a tensor or numpy array, got {type(pose).__name__}")
    if not pose.is_floating_point():
        raise TypeError(f"expected {what} as floating-point values, got dtype {pose.dtype}")
    return pose


def _layout_for(pose: Tensor, layout: str | None, hand: str) -> tuple[Layout, Tensor]:
    """Pick the layout of ``pose`` and reshape it to (*, J, 3)."""
    if hand not in ("left", "right"):
        raise ValueError(f"expected hand 'left' or 'right', got {hand!r}")
    shape = tuple(pose.shape)
    if layout is not None:
        lay = resolve_layout(layout)
        J = lay.num_joints
        if pose.dim() >= 2 and shape[-2:] == (J, 3):
            return lay, pose
        if pose.dim() >= 1 and shape[-1] == 3 * J:
            return lay, pose.reshape(*shape[:-1], J, 3)
        raise ValueError(f"expected a {lay.name} pose of shape (*, {J}, 3) or (*, {3 * J}), got {shape}")
    if pose.dim() >= 2 and shape[-1] == 3 and shape[-2] in _COUNTS:
        J = shape[-2]
    elif pose.dim() >= 1 and shape[-1] % 3 == 0 and shape[-1] // 3 in _COUNTS:
        J = shape[-1] // 3
        pose = pose.reshape(*shape[:-1], J, 3)
    else:
        hint = (
            " (rotation matrices? convert them with posepriors.rotations.matrix_to_axis_angle)"
            if pose.dim() >= 3 and shape[-2:] == (3, 3)
            else ""
        )
        raise ValueError(f"expected a pose of shape (*, J, 3) or (*, 3J) with J in {_COUNTS}, got {shape}{hint}")
    return _layout_by_count(J, hand), pose


def _scatter(pose: Tensor, index: Sequence[int]) -> Tensor:
    """Place (*, J, 3) joints at SMPL-X ``index`` positions (entries -1 dropped) of a zero (*, 55, 3) tensor."""
    keep = [i for i, j in enumerate(index) if j >= 0]
    target = torch.tensor([index[i] for i in keep], device=pose.device)
    src = pose if len(keep) == pose.shape[-2] else pose[..., keep, :]
    out = pose.new_zeros(*pose.shape[:-2], NUM_JOINTS, 3)
    return out.index_copy(-2, target, src)  # out-of-place: differentiable w.r.t. pose


def to_smplx(
    pose: Tensor | np.ndarray | Mapping[str, Any], *, layout: str | None = None, hand: str = "right"
) -> tuple[Tensor, Tensor]:
    """Convert any supported pose to the SMPL-X 55-joint layout (differentiable).

    Args:
        pose: Axis-angle rotations of shape (*, J, 3) or (*, 3J) with J in (55, 53, 52, 24, 23, 22, 21, 15), or an
            smplx-style dict (keys of :data:`DICT_KEYS`, each (*, 3k) or (*, k, 3); other keys such as
            ``transl``, ``betas``, ``expression``, ``vertices`` and ``joints`` are ignored), or an ``smplx``
            ``ModelOutput`` (read as the dict of its fields). A whole-body ``full_pose`` (an smplx output with
            ``return_full_pose=True``) is read first: it includes the mean hand that the hand parts of a
            ``flat_hand_mean=False`` model leave out; the part keys must agree with it elsewhere.
        layout: Force a layout name from :data:`LAYOUTS` (or an alias, :data:`LAYOUT_ALIASES`) instead of detecting
            it from J.
        hand: Which hand a 15-joint (MANO) pose is: ``"left"`` or ``"right"``.

    Returns:
        ``(pose55, observed)``: the pose, shape (*, 55, 3), zeros at joints the input lacks; and which SMPL-X
        joints the input provided, shape (55,) bool.
    """
    values = pose_mapping(pose)
    if values is not None:
        return _dict_to_smplx(values)
    pose = as_float_tensor(pose, "pose")
    lay, pose = _layout_for(pose, layout, hand)
    observed = torch.zeros(NUM_JOINTS, dtype=torch.bool, device=pose.device)
    observed[[j for j in lay.smplx_index if j >= 0]] = True
    if lay.name == "smplx":
        return pose, observed
    return _scatter(pose, lay.smplx_index), observed


def _dict_to_smplx(values: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    """The pose keys of ``values`` (:data:`DICT_KEYS`), and smplx's ``full_pose`` where present (see
    :func:`_with_full_pose`); other keys of smplx inputs and outputs (``vertices``, ``joints``, ``betas``,
    ``transl``, ``expression``, ...) are ignored, unknown rotation keys (with ``pose`` or ``orient`` in them:
    likely typos) refused."""
    odd = [k for k in values if not isinstance(k, str)]
    if odd:
        raise TypeError(f"expected the pose dict's keys to be strings such as {list(DICT_KEYS)}, got {odd!r}")
    unknown = unknown_pose_keys(values)
    if unknown:
        hint = ""
        if "hand_pose" in unknown:  # smplx's MANO output: one hand, and the output does not say which
            hint = (
                "; a MANO pose (hand_pose of smplx's MANO) is one hand: pass the tensor itself, a right hand unless "
                "layout='mano_left' says otherwise, or as left_hand_pose / right_hand_pose"
            )
        raise ValueError(f"unknown pose keys {unknown}; expected keys from {list(DICT_KEYS)}{hint}")
    present = [k for k in DICT_KEYS if k in values and values[k] is not None]
    if not present:
        if values.get("full_pose") is not None:  # an smplx output of only its full_pose, or a dict of it
            return to_smplx(values["full_pose"])
        raise ValueError(f"expected at least one of {list(DICT_KEYS)} in the pose dict, got {sorted(values)}")
    # the parts of several joints first: their batch shape tells whether a single joint's (B, 1, 3) is one joint of
    # each of B poses (as some pipelines store global_orient) or a batch (B, 1) of (3,) rotations
    present.sort(key=lambda key: len(DICT_KEYS[key]) == 1)
    parts: list[tuple[tuple[int, ...], Tensor]] = []
    batch_shape = None
    for key in present:
        index = DICT_KEYS[key]
        t = as_float_tensor(values[key], key)
        k = len(index)
        if k == 1 and t.dim() >= 2 and t.shape[-2:] == (1, 3) and batch_shape == t.shape[:-2]:
            pass
        elif k > 1 and t.dim() >= 2 and t.shape[-2:] == (k, 3):
            pass
        elif t.dim() >= 1 and t.shape[-1] == 3 * k:
            t = t.reshape(*t.shape[:-1], k, 3)
        else:
            if k == 1:
                shapes = "(*, 3) (or (*, 1, 3) next to other keys of batch shape (*))"
            else:
                shapes = f"(*, {3 * k}) or (*, {k}, 3)"
            hint = ""
            if key.endswith("hand_pose") and t.dim() >= 1 and 3 != t.shape[-1] < 3 * k:
                hint = (
                    "; PCA coefficients (smplx's use_pca=True) need converting first: "
                    f"posepriors.skeleton.hand_pose_from_pca({key}, model.{key[:-5]}_components, "
                    f"model.{key[:-5]}_mean)"
                )
            raise ValueError(f"expected {key} of shape {shapes}, got {tuple(t.shape)}{hint}")
        if batch_shape is None:
            batch_shape = t.shape[:-2]
        elif t.shape[:-2] != batch_shape:
            raise ValueError(
                f"batch shapes of the pose dict disagree: {present[0]} has {tuple(batch_shape)}, "
                f"{key} has {tuple(t.shape[:-2])}"
            )
        parts.append((index, t))
    dtype = functools.reduce(torch.promote_types, [t.dtype for _, t in parts])  # as torch.cat would promote them
    index = [j for idx, _ in parts for j in idx]
    joined = torch.cat([t.to(dtype) for _, t in parts], dim=-2)
    observed = torch.zeros(NUM_JOINTS, dtype=torch.bool, device=joined.device)
    observed[index] = True
    return _with_full_pose(_scatter(joined, index), observed, values.get("full_pose"))


def _with_full_pose(pose: Tensor, observed: Tensor, full: Any) -> tuple[Tensor, Tensor]:
    """The pose of a dict that also carries smplx's ``full_pose`` (an output with ``return_full_pose=True``).

    smplx builds ``full_pose`` from the parts and adds the model's mean pose: the mean hand of a model made with
    ``flat_hand_mean=False`` (smplx's default), whose ``left_hand_pose`` / ``right_hand_pose`` outputs are relative
    to it. The priors score hands as absolute rotations (zero: a flat hand), so ``full_pose`` is the pose to read
    when it is there; the part keys must agree with it elsewhere, else the dict is ambiguous. A ``full_pose`` of no
    supported layout (MANO's 16 joints) is ignored, as before."""
    if full is None:
        return pose, observed
    full = as_float_tensor(full, "full_pose")
    try:
        lay, full = _layout_for(full, None, "right")
    except ValueError:  # no layout of ours (MANO's 16 joints)
        return pose, observed
    if not set(PARTS["body"]) <= set(lay.smplx_index):  # not a whole body
        return pose, observed
    full55, full_observed = to_smplx(full, layout=lay.name)
    if full55.shape[:-2] != pose.shape[:-2]:
        raise ValueError(
            f"batch shapes of the pose dict disagree: full_pose has {tuple(full55.shape[:-2])}, the part keys "
            f"{tuple(pose.shape[:-2])}"
        )
    both = (observed & full_observed).nonzero().flatten().tolist()
    hands = set(PARTS["left_hand"]) | set(PARTS["right_hand"])
    outside = [j for j in both if j not in hands]
    with torch.no_grad():
        gap = (pose[..., outside, :] - full55[..., outside, :]).abs()
        tolerance = 1e-5 * (1 + full55[..., outside, :].abs())
    if bool((gap > tolerance).any()):
        worst = outside[int(gap.reshape(-1, len(outside), 3).amax((0, 2)).argmax())]
        raise ValueError(
            f"the pose dict's full_pose disagrees with its part keys at {SMPLX_JOINT_NAMES[worst]} (by up to "
            f"{gap.max().item():.3g} rad): pass one or the other (full_pose is read first: it includes smplx's mean "
            "hand pose, which the hand parts of a flat_hand_mean=False model leave out)"
        )
    dtype = torch.promote_types(full55.dtype, pose.dtype)
    merged = torch.where(full_observed[:, None], full55.to(dtype), pose.to(dtype))  # parts only where full has none
    return merged, observed | full_observed


def from_smplx(pose55: Tensor, layout: str) -> Tensor:
    """Convert SMPL-X poses to another layout (joints without an SMPL-X equivalent become zeros).

    Args:
        pose55: Axis-angle rotations, shape (*, 55, 3) (a tensor or NumPy array).
        layout: A name from :data:`LAYOUTS` (or an alias, :data:`LAYOUT_ALIASES`).

    Returns:
        Poses in ``layout``, shape (*, J, 3).
    """
    lay = resolve_layout(layout)
    pose55 = as_float_tensor(pose55, "SMPL-X poses")
    if pose55.dim() < 2 or pose55.shape[-2:] != (NUM_JOINTS, 3):
        raise ValueError(f"expected SMPL-X poses of shape (*, 55, 3), got {tuple(pose55.shape)}")
    index = lay.smplx_index
    gather = torch.tensor([max(j, 0) for j in index], device=pose55.device)
    out = pose55.index_select(-2, gather)
    if -1 in index:
        keep = torch.tensor([j >= 0 for j in index], device=pose55.device)
        out = out * keep[:, None].to(out.dtype)
    return out


def to_smplx_dict(pose55: Tensor) -> dict[str, Tensor]:
    """Split SMPL-X poses into smplx keyword arguments, flat as smplx expects them.

    Args:
        pose55: Axis-angle rotations, shape (*, 55, 3) (a tensor or NumPy array).

    Returns:
        ``global_orient`` (*, 3), ``body_pose`` (*, 63), ``jaw_pose``, ``leye_pose``, ``reye_pose`` (*, 3),
        ``left_hand_pose``, ``right_hand_pose`` (*, 45).
    """
    pose55 = as_float_tensor(pose55, "SMPL-X poses")
    if pose55.dim() < 2 or pose55.shape[-2:] != (NUM_JOINTS, 3):
        raise ValueError(f"expected SMPL-X poses of shape (*, 55, 3), got {tuple(pose55.shape)}")
    return {
        key: pose55[..., list(index), :].reshape(*pose55.shape[:-2], 3 * len(index)) for key, index in DICT_KEYS.items()
    }


def hand_pose_from_pca(coefficients: Any, components: Any, mean: Any | None = None) -> Tensor:
    """MANO hand poses from PCA coefficients (smplx's ``use_pca=True``, its default): ``coefficients @
    components[:P] + mean``, for ``left_hand_pose`` / ``right_hand_pose`` or a MANO pose.

    smplx keeps the basis on the body model (``model.left_hand_components``, ``model.right_hand_components``: the
    MANO file's ``hands_components`` cut to P rows) and adds the mean hand (``model.left_hand_mean``) unless the
    model was built with ``flat_hand_mean=True``. The priors score hands with zero as a flat hand, so pass ``mean``
    exactly when smplx would add it; each hand has its own basis and mean.

    Args:
        coefficients: PCA coefficients, shape (*, P) (a tensor or NumPy array).
        components: Basis, one component per row, shape (Q, 45) with Q >= P.
        mean: Optional mean hand pose, shape (45,) or (15, 3), added after the projection.

    Returns:
        Axis-angle hand poses, shape (*, 45), in the promoted dtype of the inputs.
    """
    coefficients = as_float_tensor(coefficients, "PCA coefficients")
    components = as_float_tensor(components, "PCA components").to(coefficients.device)
    if components.dim() != 2 or components.shape[1] != 45:
        raise ValueError(f"expected PCA components of shape (Q, 45), one per row, got {tuple(components.shape)}")
    if coefficients.dim() < 1 or not 1 <= coefficients.shape[-1] <= components.shape[0]:
        raise ValueError(
            f"expected PCA coefficients of shape (*, P) with 1 <= P <= {components.shape[0]} (the components' rows), "
            f"got {tuple(coefficients.shape)}"
        )
    dtype = torch.promote_types(coefficients.dtype, components.dtype)
    pose = coefficients.to(dtype) @ components[: coefficients.shape[-1]].to(dtype)
    if mean is not None:
        mean = as_float_tensor(mean, "mean hand pose").to(pose.device)
        if mean.numel() != 45:
            raise ValueError(f"expected a mean hand pose of shape (45,) or (15, 3), got {tuple(mean.shape)}")
        pose = pose + mean.reshape(45).to(dtype)
    return pose


def mirror_index(joints: Sequence[int]) -> list[int]:
    """Positions that mirror a pose given in ``joints`` order: ``pose[..., mirror_index(joints), :]`` holds the
    left-right counterpart of each joint.

    Args:
        joints: SMPL-X joint indices (a prior's ``joints``).

    Returns:
        One position in ``joints`` per joint.

    Raises:
        ValueError: When a joint's counterpart is not among ``joints`` (e.g. only the left hand).
    """
    position = {j: i for i, j in enumerate(joints)}
    missing = [SMPLX_JOINT_NAMES[MIRROR_JOINTS[j]] for j in joints if MIRROR_JOINTS[j] not in position]
    if missing:
        raise ValueError(
            f"expected joints closed under left-right mirroring, but their counterparts {missing[:4]} "
            f"are missing from joints {tuple(joints)}"
        )
    return [position[MIRROR_JOINTS[j]] for j in joints]


def mirror_pose(pose: Tensor, joints: Sequence[int] = tuple(range(NUM_JOINTS))) -> Tensor:
    """Mirror poses left-right across the sagittal plane: swap every left joint with its right counterpart and
    mirror each rotation, ``(x, y, z) -> (x, -y, -z)``. An involution that preserves volume (|det| = 1).

    Args:
        pose: Axis-angle rotations, shape (*, J, 3), in ``joints`` order (a tensor or NumPy array).
        joints: The SMPL-X joints of ``pose`` (default: all 55), closed under mirroring.

    Returns:
        Mirrored poses, shape (*, J, 3).
    """
    pose = as_float_tensor(pose, "poses")
    if pose.dim() < 2 or pose.shape[-1] != 3 or pose.shape[-2] != len(joints):
        raise ValueError(f"expected pose of shape (*, {len(joints)}, 3), got {tuple(pose.shape)}")
    index = torch.tensor(mirror_index(joints), device=pose.device)
    swapped = pose.index_select(-2, index)
    sign = pose.new_tensor([1.0, -1.0, -1.0])
    return swapped * sign


def modelled_parents(joints: Sequence[int]) -> tuple[int, ...]:
    """The nearest *modelled* ancestor of every joint of a joint subset, as a position in ``joints``.

    Args:
        joints: SMPL-X joint indices in increasing order (a prior's ``joints``).

    Returns:
        For each joint, the position in ``joints`` of its nearest ancestor in :data:`SMPLX_PARENTS` that is among
        ``joints``, or -1 when it has none (e.g. the hips of a body prior without the root).

    Example:
        >>> modelled_parents((0, 4, 7))  # pelvis, left knee, left ankle: the hip is not modelled
        (-1, 0, 1)
    """
    position = {j: i for i, j in enumerate(joints)}
    out = []
    for j in joints:
        parent = SMPLX_PARENTS[j]
        while parent >= 0 and parent not in position:
            parent = SMPLX_PARENTS[parent]
        out.append(position[parent] if parent >= 0 else -1)
    return tuple(out)


def modelled_descendants(joints: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """The modelled subtree of every joint of a joint subset: itself and its descendants among ``joints``.

    Args:
        joints: SMPL-X joint indices in increasing order (a prior's ``joints``).

    Returns:
        For each joint, the sorted positions in ``joints`` of the joint and of every joint whose chain of
        :func:`modelled_parents` passes through it.

    Example:
        >>> modelled_descendants((0, 4, 7))
        ((0, 1, 2), (1, 2), (2,))
    """
    parents = modelled_parents(joints)
    subtree = [{i} for i in range(len(joints))]
    for i in reversed(range(len(joints))):  # parents precede children
        if parents[i] >= 0:
            subtree[parents[i]] |= subtree[i]
    return tuple(tuple(sorted(s)) for s in subtree)


def describe_joints(joints: Sequence[int]) -> str:
    """A part spec for a joint set: whole parts by name, other joints by joint name (``"body+jaw"``)."""
    rest, names = set(joints), []
    for part, index in PARTS.items():
        if set(index) <= rest:
            names.append(part)
            rest -= set(index)
    names += [SMPLX_JOINT_NAMES[j] for j in sorted(rest)]
    return "+".join(names) or "none"
