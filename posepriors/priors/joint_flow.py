"""``joint_flow``: one small conditional normalizing flow per joint, each conditioned on its kinematic parent.

The density factorises along the kinematic tree,

    p(pose) = prod_j p(x_j | x_parent(j)),

where ``parent(j)`` is the nearest *modelled* ancestor of joint ``j`` in :data:`posepriors.skeleton.SMPLX_PARENTS`
(joints without one, e.g. the hips and spine of a body prior, are conditioned on a zero context). Each factor is a
3-D coupling flow whose conditioners see the parent's rotation. All joints' flows are **one** grouped flow
(:func:`posepriors.flows.build_flow` with ``groups = J``: stacked per-joint weights, batched matrix products), so a
log-density is a handful of batched ops whatever the number of joints. Sampling and projection walk down the tree
one depth level at a time (a loop over tree depth, about 10 levels for body and hands, never over joints), running
only that level's slice of the grouped weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

import torch
from einops import repeat
from torch import Tensor

from posepriors import skeleton
from posepriors.flows import build_flow, flow_settings, standard_normal_log_prob
from posepriors.priors.base import HAND_PRIOR_HINT, PosePrior, body_latent_input, latent_map
from posepriors.priors.draws import randn
from posepriors.priors.flow_config import FlowConfig
from posepriors.rotations import axis_angle_to_rotation_6d

__all__ = ["JointFlowConfig", "JointFlowPrior"]

_CONTEXT_FEATURES = {"6d": 6, "axis_angle": 3}


@dataclass(frozen=True)
class JointFlowConfig(FlowConfig):
    """Settings of :class:`JointFlowPrior`; flow settings from :class:`~posepriors.priors.flow_config.FlowConfig`.

    Attributes:
        joints: Modelled SMPL-X joints (default: body and both hands, 51 joints); any joint set works.
        hidden: Width of each joint's coupling conditioners.
        num_layers: Coupling layers per joint (the seed's K).
        num_hidden_layers: Hidden layers per conditioner.
        coupling: ``"spline"`` (rational-quadratic) or ``"affine"``.
        mixing: ``"lu"`` (a learned 3x3 map per joint and layer), ``"permutation"`` or ``"none"``.
        actnorm: ActNorm before every layer (initialised from data, see
            :meth:`JointFlowPrior.initialize_from_data`).
        bins: Spline bins.
        bound: Spline interval half-width, in ActNorm-standardised units (identity outside).
        context: How the parent's rotation is fed to the conditioners: ``"6d"`` (continuous 6D representation,
            6 features) or ``"axis_angle"`` (3 features).
    """

    joints: tuple[int, ...] = skeleton.resolve_joints("body+left_hand+right_hand")
    hidden: int = 128
    num_layers: int = 4
    coupling: str = "spline"
    context: str = "6d"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.context not in _CONTEXT_FEATURES:
            raise ValueError(f"expected context '6d' or 'axis_angle', got {self.context!r}")


class JointFlowPrior(PosePrior):
    """Per-joint conditional flows along the kinematic tree.

    - ``log_prob`` is exact: the sum over joints of ``log N(z_j) + log|det dz_j/dx_j|`` with
      ``z_j = f_j(x_j | x_parent(j))``. The Jacobian of the whole map is block lower-triangular (a joint's code
      depends on the joint and its parent only), so the per-joint log-determinants add up to the exact one.
      :meth:`log_prob_per_joint` gives the terms: which joint makes a pose implausible?
    - Masks give **exact marginals** when the missing joints are closed under descendants (every missing joint's
      modelled descendants are missing too: missing hands, a missing forearm and hand, a body-only pose given to a
      body-and-hands prior). The missing factors then integrate to one and ``log_prob`` is the sum over the
      observed joints. Other masks (an observed joint below a missing one) have no closed-form marginal and raise
      ``ValueError``.
    - ``sample`` walks down the tree, inverting each level's flows given the parents drawn before;
      ``temperature`` scales the base noise. With ``observed`` and a mask, observed joints are kept and missing
      ones are drawn level by level given their (observed or already drawn) parents: the exact conditional for
      descendant-closed missing sets; otherwise an ancestral approximation that ignores what the observed
      descendants of a missing joint say about it.
    - ``project(pose, mask, shrink=0.5, keep_observed=False)`` shrinks every joint's latent code,
      ``z' = shrink * f_j(x_j | x_parent)``, and decodes level by level given the *projected* parents, so the
      pose moves towards the conditional modes while keeping its character. Missing joints get ``z = 0`` given
      their parents (a mode-like completion). ``keep_observed=True`` only fills the missing joints.

    Parameters: one grouped flow ``flow`` (``num_layers`` x [ActNorm, LU mixing, coupling]) with J groups of
    dimension 3 and a context of 6 (``"6d"``) or 3 (``"axis_angle"``) features.
    """

    model_type = "joint_flow"
    config_class = JointFlowConfig
    mask_marginals = "descendant_closed"
    half_precision = False
    per_joint_log_prob = True
    training_defaults = MappingProxyType(
        {
            "learning_rate": 1e-3,
            "weight_decay": 1e-5,
            "grad_clip": 1.0,
            "max_epochs": 50,
            "batch_size": 256,
            "scheduler": "cosine",
        }
    )
    seed_batch_size = 16
    flag_aliases = MappingProxyType({"num_layers": "K"})

    def __init__(self, config: JointFlowConfig | None = None) -> None:
        super().__init__(config if config is not None else JointFlowConfig())
        cfg: JointFlowConfig = self.config
        parents = skeleton.modelled_parents(cfg.joints)
        depths: list[int] = []
        for i in range(len(parents)):  # SMPL-X parents precede children, so parent depths are known
            depths.append(0 if parents[i] < 0 else depths[parents[i]] + 1)
        self.parents: tuple[int, ...] = parents
        """Position of each joint's nearest modelled ancestor in the prior's joint order (-1: none)."""
        self.depths: tuple[int, ...] = tuple(depths)
        """Depth of each joint in the forest of modelled joints (0: no modelled ancestor)."""
        self.num_levels = max(depths) + 1
        self.register_buffer("parent_index", torch.tensor([max(p, 0) for p in parents]), persistent=False)
        self.register_buffer("has_parent", torch.tensor([p >= 0 for p in parents]), persistent=False)
        for level in range(self.num_levels):
            index = torch.tensor([i for i, d in enumerate(depths) if d == level])
            self.register_buffer(f"level_{level}", index, persistent=False)
        self.context_features = _CONTEXT_FEATURES[cfg.context]
        self.flow = build_flow(
            self.num_joints, 3, **flow_settings(cfg), context_features=self.context_features, actnorm=cfg.actnorm
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, levels={self.num_levels}"

    # ------------------------------------------------------------------ public extras
    def _log_prob_per_joint(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Conditional log-densities ``log p(x_j | x_parent(j))`` (B, J) (:meth:`log_prob_per_joint`); the mask must
        leave the missing joints closed under descendants."""
        return self._per_joint(x, mask)

    def _map_project(
        self, x: Tensor, mask: Tensor | None, noise_std: float, steps: int = 50, lr: float = 0.05
    ) -> Tensor:
        """MAP in the latent space (see :func:`~posepriors.priors.base.latent_map`) from the encoded pose, missing
        joints first completed at latent zero."""
        start = x if mask is None else self._project(x, mask, keep_observed=True)
        z0, _ = self.flow(start, self._context(start))
        return latent_map(lambda z: self._decode(z, start), z0, x, mask, noise_std, steps, lr)

    def round_trip_error(self, pose: Tensor) -> Tensor:
        """Largest absolute error of decoding (tree walk) the latent codes of ``pose``: a numerical health check.

        Args:
            pose: Poses in the prior's joint order, shape (B, J, 3).

        Returns:
            The max abs error in radians, shape ().
        """
        x = self._check_own(pose)
        z, _ = self.flow(x, self._context(x))
        return (self._decode(z, x) - x).abs().max()

    def diagnostics(self, pose: Tensor) -> dict[str, float]:
        """The inversion error of the tree walk, ``{"round_trip_error": ...}`` (:meth:`round_trip_error`)."""
        return {"round_trip_error": self.round_trip_error(pose).item()}

    @torch.no_grad()
    def initialize_from_data(self, pose: Tensor) -> None:
        """ActNorm data initialisation: every ActNorm standardises its input over ``pose`` (per joint and dim).

        Args:
            pose: A representative batch of training poses in the prior's joint order, shape (N, J, 3).
        """
        x = self._check_own(pose)
        self.flow.initialize(x, self._context(x))

    # ------------------------------------------------------------------ PosePrior
    def _log_prob(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return self._per_joint(x, mask).sum(-1)

    def _sample(
        self,
        n: int,
        generator: torch.Generator | None,
        temperature: float,
        observed: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        J, device, dtype = self.num_joints, self.parent_index.device, self.dtype
        if observed is None:
            z = randn((n, J, 3), generator=generator, device=device, dtype=dtype)
            return self._decode(temperature * z, z.new_zeros(n, J, 3))
        B = observed.shape[0]
        z = randn((n, B, J, 3), generator=generator, device=device, dtype=dtype).reshape(n * B, J, 3)
        x = repeat(observed, "b j c -> (n b) j c", n=n)  # sample-major, as z
        keep = None if mask is None else repeat(mask, "b j -> (n b) j", n=n)
        return self._decode(temperature * z, x, keep=keep).reshape(n, B, J, 3)

    def _project(
        self,
        x: Tensor,
        mask: Tensor | None,
        shrink: float = 0.5,
        keep_observed: bool = False,
    ) -> Tensor:
        """Latent shrinkage along the tree (see the class docstring).

        Args:
            x: Poses (B, J, 3).
            mask: Observed joints (B, J) or None.
            shrink: Factor in [0, 1] on every observed joint's latent code: 1 keeps the pose, 0 moves every joint
                to its conditional mode-like point ``f_j^{-1}(0 | parent)``.
            keep_observed: Keep the observed joints exactly and only fill the missing ones.
        """
        shrink = float(shrink)
        if not 0 <= shrink <= 1:
            raise ValueError(f"expected 0 <= shrink <= 1, got {shrink}")
        if keep_observed and mask is None:
            return x.clone()
        z, _ = self.flow(x, self._context(x))
        z = shrink * z
        if mask is None:
            return self._decode(z, x)
        z = torch.where(mask[..., None], z, torch.zeros_like(z))
        if keep_observed:
            return self._decode(z, x, keep=mask)
        # an observed joint below a missing one: its code is taken relative to the completed parent
        orphan = mask & ~self._parent_observed(mask)
        return self._decode(z, x, reencode=orphan if bool(orphan.any()) else None, shrink=shrink)

    def body_latent(self) -> tuple[int, Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
        """The latent space of the body alone, for fitting a body in latent space (``fit_keypoints(space="latent")``).

        The code of a body pose is every body joint's code given its parent (3 per joint); decoding walks down the
        tree over the body joints only (the hands' flows are not run).

        Returns:
            ``(d, encode, decode)``: the body code's size (63), body pose (B, 21, 3) -> code (B, d) and back.

        Raises:
            ValueError: When the prior does not model all 21 body joints.
        """
        body = list(skeleton.PARTS["body"])
        position = {j: i for i, j in enumerate(self.joints)}
        if not set(body) <= set(position):
            raise ValueError(f"fitting a body in latent space needs all 21 body joints, got joints {self.joints}")
        body_index = torch.tensor([position[j] for j in body], device=self.parent_index.device)
        slot = {position[j]: k for k, j in enumerate(body)}  # position in the prior -> position in the body
        levels = []
        for index in self._levels():
            rows = [i for i in index.tolist() if i in slot]
            if rows:
                slots = [slot[i] for i in rows]
                levels.append((torch.tensor(rows, device=index.device), torch.tensor(slots, device=index.device)))
        J, dim = self.num_joints, 3 * len(body)

        def encode(pose: Tensor) -> Tensor:
            pose, dtype = body_latent_input(pose, False, self)
            x = pose.new_zeros(pose.shape[0], J, 3).index_copy(1, body_index, pose)
            return self._run(body_index, pose, self._context(x, body_index), reverse=False).flatten(1).to(dtype)

        def decode(z: Tensor) -> Tensor:
            z, dtype = body_latent_input(z, True, self)
            code = z.reshape(z.shape[0], len(body), 3)
            out = z.new_zeros(z.shape[0], J, 3)
            for index, rows in levels:
                new = self._run(index, code.index_select(1, rows), self._context(out, index), reverse=True)
                out = out.index_copy(1, index, new)
            return out.index_select(1, body_index).to(dtype)

        return dim, encode, decode

    # ------------------------------------------------------------------ internals
    def _check_own(self, pose: Tensor) -> Tensor:
        if not isinstance(pose, Tensor):
            raise TypeError(f"expected a pose tensor, got {type(pose).__name__}")
        if pose.dim() != 3 or pose.shape[1:] != (self.num_joints, 3):
            raise ValueError(
                f"expected poses in the prior's joint order of shape (B, {self.num_joints}, 3), got {tuple(pose.shape)}"
            )
        return pose.to(device=self.device, dtype=self.dtype)

    def _levels(self) -> list[Tensor]:
        return [getattr(self, f"level_{level}") for level in range(self.num_levels)]

    def _context(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """Parent rotations as conditioner inputs (zero without a parent): (B, J, C), or (B, len(index), C)."""
        parent_index, has_parent = self.parent_index, self.has_parent
        if index is not None:
            parent_index, has_parent = parent_index[index], has_parent[index]
        parent = x.index_select(1, parent_index)
        feats = axis_angle_to_rotation_6d(parent) if self.context_features == 6 else parent
        return feats * has_parent[:, None].to(feats.dtype)

    def _per_joint(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Per-joint conditional log-densities (B, J); with a (checked) mask, missing joints get 0."""
        if mask is None:
            z, logdet = self.flow(x, self._context(x))
            return standard_normal_log_prob(z) + logdet
        self._check_mask(mask)
        used = mask.any(0)
        if bool(used.all()):
            z, logdet = self.flow(x, self._context(x))
            per_joint = standard_normal_log_prob(z) + logdet
        else:  # joints that no pose of the batch observes are not run (a body-only input skips the hands)
            index = used.nonzero().flatten()
            z, logdet = self.flow.run_groups(index, x.index_select(1, index), self._context(x, index))
            per_joint = x.new_zeros(mask.shape).index_copy(1, index, standard_normal_log_prob(z) + logdet)
        return torch.where(mask, per_joint, torch.zeros_like(per_joint))

    def _parent_observed(self, mask: Tensor) -> Tensor:
        """Whether each joint's parent is observed (True for joints without a parent): (B, J)."""
        return mask.index_select(1, self.parent_index) | ~self.has_parent

    def _check_mask(self, mask: Tensor) -> None:
        bad = mask & ~self._parent_observed(mask)
        if bool(bad.any()):
            j = int(torch.nonzero(bad.any(0)).flatten()[0])
            name, parent = self.joint_names[j], self.joint_names[self.parents[j]]
            raise ValueError(
                "joint_flow has an exact marginal only when the missing joints are closed under descendants "
                "(every missing joint's modelled descendants missing too, e.g. missing hands or a missing forearm "
                f"and hand); got observed {name!r} below missing {parent!r}. Pass the missing joint, hide its "
                "descendants too, or use sample/project to complete it"
                + (
                    HAND_PRIOR_HINT
                    if not any(bool(mask[:, i].any()) for i, j in enumerate(self.joints) if j in skeleton.PARTS["body"])
                    else ""
                )
            )

    def _run(self, index: Tensor, x: Tensor, context: Tensor, reverse: bool) -> Tensor:
        """Run the flows of the joints ``index`` only (one tree level): x (B, L, 3), context (B, L, C)."""
        return self.flow.run_groups(index, x, context, inverse=reverse)[0]

    def _decode(
        self,
        z: Tensor,
        x: Tensor,
        *,
        keep: Tensor | None = None,
        reencode: Tensor | None = None,
        shrink: float = 1.0,
    ) -> Tensor:
        """Walk down the tree, inverting each level's flows given the already decoded parents.

        Args:
            z: Latent codes (B, J, 3).
            x: Starting poses (B, J, 3): joints flagged in ``keep`` keep these values, ``reencode`` reads them.
            keep: Joints to keep as they are (B, J), or None.
            reencode: Joints whose code is recomputed as ``shrink * f_j(x_j | decoded parent)`` (B, J), or None.
            shrink: Factor on re-encoded codes.

        Returns:
            Decoded poses (B, J, 3).
        """
        out = x
        for index in self._levels():
            context = self._context(out, index)
            code = z.index_select(1, index)
            if reencode is not None:
                again = reencode.index_select(1, index)
                if bool(again.any()):
                    fresh = shrink * self._run(index, out.index_select(1, index), context, reverse=False)
                    code = torch.where(again[..., None], fresh, code)
            new = self._run(index, code, context, reverse=True)
            if keep is not None:
                new = torch.where(keep.index_select(1, index)[..., None], out.index_select(1, index), new)
            out = out.index_copy(1, index, new)
        return out
