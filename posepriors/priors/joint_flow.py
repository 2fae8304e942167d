"""``joint_flow``: one small conditional normalizing flow per joint, each conditioned on its kinematic parent.

``p(pose) = prod_j p(x_j | x_parent(j))``. All joints' flows are one grouped flow (stacked per-joint weights,
batched matrix products), so a log-density costs a handful of batched ops whatever the number of joints; sampling
walks down the tree level by level (a loop over tree depth, not over joints).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from posepriors import skeleton
from posepriors.flows import build_flow, standard_normal_log_prob
from posepriors.priors.base import PosePrior, PriorConfig, randn
from posepriors.rotations import axis_angle_to_rotation_6d

__all__ = ["JointFlowConfig", "JointFlowPrior"]


@dataclass(frozen=True)
class JointFlowConfig(PriorConfig):
    """Settings of :class:`JointFlowPrior`.

    Attributes:
        joints: Modelled SMPL-X joints (default: body and both hands).
        hidden: Width of each joint's coupling conditioners.
        num_layers: Coupling layers per joint (the seed's K).
        num_hidden_layers: Hidden layers per conditioner.
        coupling: ``"spline"`` (rational-quadratic) or ``"affine"``.
        mixing: ``"lu"`` (learned 3x3 per joint) or ``"permutation"``.
        actnorm: ActNorm before every layer.
        bins: Spline bins.
        bound: Spline interval half-width (ActNorm-standardised units).
        context: How the parent rotation is fed to the conditioners: ``"6d"`` or ``"axis_angle"``.
    """

    joints: tuple[int, ...] = skeleton.resolve_joints("body+left_hand+right_hand")
    hidden: int = 64
    num_layers: int = 4
    num_hidden_layers: int = 1
    coupling: str = "spline"
    mixing: str = "lu"
    actnorm: bool = True
    bins: int = 8
    bound: float = 4.0
    context: str = "6d"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.context not in ("6d", "axis_angle"):
            raise ValueError(f"expected context '6d' or 'axis_angle', got {self.context!r}")


class JointFlowPrior(PosePrior):
    """Per-joint conditional flows along the kinematic tree.

    - ``log_prob`` is exact; :meth:`log_prob_per_joint` says which joint is implausible.
    - Masks give exact marginals when every missing joint's modelled descendants are missing too (missing hands,
      a missing forearm and hand, ...): the factors of the observed joints do not involve the missing ones. Other
      masks raise ``ValueError``.
    - ``sample`` and ``project`` walk down the tree; ``project`` shrinks each joint's latent code given its
      (projected) parent, and completes missing joints at latent zero given their parents.
    """

    model_type = "joint_flow"
    config_class = JointFlowConfig

    def __init__(self, config: JointFlowConfig | None = None) -> None:
        super().__init__(config if config is not None else JointFlowConfig())
        cfg: JointFlowConfig = self.config
        position = {j: i for i, j in enumerate(cfg.joints)}
        parents, depth = [], []
        for j in cfg.joints:  # nearest modelled ancestor, -1 if none
            p = skeleton.SMPLX_PARENTS[j]
            while p >= 0 and p not in position:
                p = skeleton.SMPLX_PARENTS[p]
            parents.append(position[p] if p >= 0 else -1)
            depth.append(0 if parents[-1] < 0 else depth[parents[-1]] + 1)
        self.parents = tuple(parents)
        self.register_buffer("parent_index", torch.tensor([max(p, 0) for p in parents]), persistent=False)
        self.register_buffer("has_parent", torch.tensor([p >= 0 for p in parents]), persistent=False)
        levels = [torch.tensor([i for i, d in enumerate(depth) if d == level]) for level in range(max(depth) + 1)]
        self.num_levels = len(levels)
        for level, index in enumerate(levels):
            self.register_buffer(f"level_{level}", index, persistent=False)
        self.context_features = 6 if cfg.context == "6d" else 3
        self.flow = build_flow(
            self.num_joints,
            3,
            num_layers=cfg.num_layers,
            hidden=cfg.hidden,
            coupling=cfg.coupling,
            context_features=self.context_features,
            actnorm=cfg.actnorm,
            mixing=cfg.mixing,
            num_hidden_layers=cfg.num_hidden_layers,
            bins=cfg.bins,
            bound=cfg.bound,
        )

    def _context(self, x: Tensor) -> Tensor:
        """Each joint's parent rotation as conditioner input, zero for joints without one: (B, J, C)."""
        parent = x.index_select(1, self.parent_index)
        feats = axis_angle_to_rotation_6d(parent) if self.context_features == 6 else parent
        return feats * self.has_parent[:, None].to(feats.dtype)

    def _per_joint(self, x: Tensor) -> Tensor:
        z, logdet = self.flow(x, self._context(x))
        return standard_normal_log_prob(z) + logdet

    def _check_mask(self, mask: Tensor) -> None:
        parent_observed = mask.index_select(1, self.parent_index) | ~self.has_parent
        if bool((mask & ~parent_observed).any()):
            raise ValueError(
                "joint_flow gives exact marginals only when every missing joint's descendants are missing too "
                "(e.g. missing hands or a missing arm); got an observed joint whose parent is missing"
            )

    def _log_prob(self, x: Tensor, mask: Tensor | None) -> Tensor:
        per_joint = self._per_joint(x)
        if mask is None:
            return per_joint.sum(-1)
        self._check_mask(mask)
        return (per_joint * mask).sum(-1)

    def log_prob_per_joint(self, pose: Any) -> Tensor:
        """Log-density of each joint's rotation given its parent's: which joint makes a pose implausible?

        Args:
            pose: Any supported pose input, batch shape (*).

        Returns:
            Per-joint conditional log-densities in the prior's joint order, shape (*, J); they sum to ``log_prob``.
        """
        x, _, batch_shape = self._prepare(pose, None)
        return self._per_joint(x).reshape(*batch_shape, self.num_joints)

    def _decode(self, z: Tensor, x: Tensor, keep: Tensor | None) -> Tensor:
        """Walk down the tree: at each level invert the flows given the already decoded parents.

        Args:
            z: Latent codes (B, J, 3).
            x: Starting poses (B, J, 3): values of joints flagged in ``keep`` are kept.
            keep: Joints to keep as they are (B, J), or None.
        """
        out = x.clone()
        for level in range(self.num_levels):
            index = getattr(self, f"level_{level}")
            decoded, _ = self.flow.inverse(z, self._context(out))
            new = decoded.index_select(1, index)
            if keep is not None:
                new = torch.where(keep.index_select(1, index)[..., None], out.index_select(1, index), new)
            out = out.index_copy(1, index, new)
        return out

    def _sample(
        self,
        n: int,
        generator: torch.Generator | None,
        temperature: float,
        observed: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        device, dtype = self.parent_index.device, self.dtype
        if observed is None:
            z = temperature * randn((n, self.num_joints, 3), generator=generator, device=device, dtype=dtype)
            return self._decode(z, torch.zeros_like(z), None)
        B = observed.shape[0]
        x = observed.unsqueeze(0).expand(n, -1, -1, -1).reshape(n * B, self.num_joints, 3)
        keep = mask.unsqueeze(0).expand(n, -1, -1).reshape(n * B, self.num_joints)
        z = temperature * randn(x.shape, generator=generator, device=device, dtype=dtype)
        return self._decode(z, x, keep).reshape(n, B, self.num_joints, 3)

    def _project(
        self, x: Tensor, mask: Tensor | None, shrink: float = 0.5, keep_observed: bool = False, **kwargs: Any
    ) -> Tensor:
        """Shrink every joint's latent code given its projected parent; missing joints at latent zero."""
        if kwargs:
            raise TypeError(f"unexpected keyword arguments for JointFlowPrior.project: {sorted(kwargs)}")
        if not 0 <= shrink <= 1:
            raise ValueError(f"expected 0 <= shrink <= 1, got {shrink}")
        z, _ = self.flow(x, self._context(x))
        if mask is not None:
            z = torch.where(mask[..., None], z, torch.zeros_like(z))
        if keep_observed:
            return self._decode(z, x, mask)
        return self._decode(shrink * z, x, None)

    def round_trip_error(self, pose: Tensor) -> Tensor:
        """Max abs error of decoding the encoded poses (B, J, 3) -> ()."""
        z, _ = self.flow(pose, self._context(pose))
        return (self._decode(z, torch.zeros_like(pose), None) - pose).abs().max()

    @torch.no_grad()
    def initialize_from_data(self, pose: Tensor) -> None:
        """ActNorm data initialisation of every joint's flow."""
        self.flow.initialize(pose, self._context(pose))
