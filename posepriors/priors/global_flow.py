"""``global_flow``: a normalizing flow over the whole pose.

The density can be split into parts (block-autoregressive): with ``parts=("body", "left_hand+right_hand")`` it is
``p(body) p(hands | body)``, each factor a coupling flow whose conditioners also see the previous parts, so a pose
without hands gets the exact marginal ``p(body)``. An optional completion flow, trained with random joint masks,
gives ``p(missing | observed)`` for any mask.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from einops import repeat
from torch import Tensor, nn

from posepriors import skeleton
from posepriors.flows import FlowSequence, build_flow, flow_settings
from posepriors.priors.base import (
    HAND_PRIOR_HINT,
    PoseInput,
    PosePrior,
    body_latent_input,
    latent_map,
    select_rows,
    split_batch,
)
from posepriors.priors.draws import categorical, randn
from posepriors.priors.energy import BodyGaussian
from posepriors.priors.flow_config import FlowConfig
from posepriors.utils import LOG_2PI, cast_back, storage_key, to_float64

__all__ = ["ContextBound", "GlobalFlowConfig", "GlobalFlowPrior", "random_joint_mask"]


@dataclass(frozen=True)
class GlobalFlowConfig(FlowConfig):
    """Settings of :class:`GlobalFlowPrior`; flow settings from :class:`~posepriors.priors.flow_config.FlowConfig`.

    Attributes:
        joints: Modelled SMPL-X joints.
        hidden: Width of the coupling conditioners.
        num_layers: Coupling layers per part (the seed's K).
        num_hidden_layers: Hidden layers per conditioner.
        coupling: ``"affine"`` or ``"spline"`` (rational-quadratic).
        mixing: ``"lu"`` (learned LU-decomposed linear), ``"permutation"`` or ``"none"``.
        actnorm: ActNorm before every layer.
        bins: Spline bins.
        bound: Spline interval half-width (in ActNorm-standardised units).
        parts: Part specs that split the joints into autoregressive factors (empty: one flow over all joints).
        use_conditioning: Condition every factor on an external context vector (``context=`` of the methods).
        context_features: Size of that context vector.
        conditional: Train a completion flow for arbitrary masks (``sample``/``project`` with masks).
        mask_probability: Probability that a training pose gets a random mask in the completion objective.
    """

    hidden: int = 512
    num_layers: int = 6
    coupling: str = "affine"
    parts: tuple[str, ...] = ()
    use_conditioning: bool = False
    context_features: int = 0
    conditional: bool = False
    mask_probability: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_conditioning and not self.context_features > 0:
            raise ValueError(f"use_conditioning=True needs context_features > 0, got {self.context_features!r}")
        if not self.use_conditioning and self.context_features:
            raise ValueError(
                f"expected context_features=0 without use_conditioning, got {self.context_features!r} (pass "
                "use_conditioning=True for a conditioned flow)"
            )
        if self.parts:
            resolved = [skeleton.resolve_joints(p) for p in self.parts]
            flat = [j for part in resolved for j in part]
            if len(set(flat)) != len(flat) or set(flat) != set(self.joints):
                raise ValueError(
                    f"expected parts {self.parts} to split the joints {self.joints} into disjoint groups, "
                    f"got joints {sorted(flat)}"
                )
        if not 0 <= self.mask_probability <= 1:
            raise ValueError(f"expected 0 <= mask_probability <= 1, got {self.mask_probability}")


class GlobalFlowPrior(PosePrior):
    """A coupling flow (ActNorm, LU mixing, affine or spline couplings) over all modelled joints at once.

    - ``log_prob`` is exact. Masks that hide whole trailing parts (e.g. the hands, with
      ``parts=("body", "left_hand+right_hand")``) give exact marginals; other masks raise, except in ``sample``
      and ``project`` with a completion flow (``conditional=True``).
    - ``sample`` draws the parts in order; with ``temperature`` scaling the latent noise. Given observed joints,
      hidden body joints of a prior with a fitting energy are drawn from its own conditional by importance
      resampling (:meth:`_complete_by_resampling`); other missing joints come from the exact decoding of whole
      trailing parts, or the completion flow.
    - ``project`` shrinks the latent code, ``x' = f^-1(shrink * f(x))``, part by part; missing joints are first
      completed as ``sample`` completes them at temperature 0.
    """

    model_type = "global_flow"
    config_class = GlobalFlowConfig
    mask_marginals = "trailing_parts"
    half_precision = False
    training_defaults = MappingProxyType(
        {"learning_rate": 1e-3, "max_epochs": 30, "batch_size": 256, "scheduler": "cosine", "grad_clip": 1.0}
    )
    seed_batch_size = 32
    flag_aliases = MappingProxyType({"num_layers": "K"})

    def __init__(self, config: GlobalFlowConfig | None = None) -> None:
        super().__init__(config if config is not None else GlobalFlowConfig())
        cfg: GlobalFlowConfig = self.config
        part_specs = cfg.parts or (cfg.joints,)
        position = {j: i for i, j in enumerate(cfg.joints)}
        part_index = [[position[j] for j in skeleton.resolve_joints(p)] for p in part_specs]
        self._part_index = part_index
        for k, idx in enumerate(part_index):
            self.register_buffer(f"part_index_{k}", torch.tensor(idx), persistent=False)
        flows = []
        previous = 0
        for k, idx in enumerate(part_index):
            flows.append(self._build(3 * len(idx), 3 * previous + cfg.context_features, seed=k))
            previous += len(idx)
        self.flows = nn.ModuleList(flows)
        self.completion = (
            self._build(self.dim, 2 * self.dim + cfg.context_features, seed=99) if cfg.conditional else None
        )

    def _build(self, dim: int, context: int, seed: int) -> FlowSequence:
        cfg: GlobalFlowConfig = self.config
        return build_flow(1, dim, **flow_settings(cfg), context_features=context, actnorm=cfg.actnorm, seed=seed)

    @property
    def num_parts(self) -> int:
        return len(self.flows)

    @property
    def _part_sizes(self) -> list[int]:
        """Coordinates per part (3 per joint), in part order: how a whole-pose latent code splits."""
        return [3 * len(idx) for idx in self._part_index]

    # ------------------------------------------------------------------ context
    @property
    def conditioning_features(self) -> int:
        """Size C of the context vector the prior is conditioned on (``use_conditioning``), 0 without one."""
        cfg: GlobalFlowConfig = self.config
        return cfg.context_features if cfg.use_conditioning else 0

    def with_context(self, context: Tensor) -> ContextBound:
        """Deprecated: pass ``context=`` to the methods instead. A thin wrapper whose methods pass ``context`` on.

        The prior stores nothing (the context is an argument, never module state), so ``prior.nll(pose)`` inside a
        ``with prior.with_context(c):`` block no longer sees ``c``; use the object the block binds::

            with prior.with_context(shape_features) as conditioned:   # same as prior.nll(pose, context=...)
                nll = conditioned.nll(pose)

        Args:
            context: Context vectors, shape (B, context_features) or (1, context_features).

        Returns:
            A :class:`ContextBound` with ``log_prob``, ``nll``, ``sample``, ``project``, ``log_prob_per_part``,
            ``training_loss`` and ``validation_nll``.
        """
        warnings.warn(
            "GlobalFlowPrior.with_context is deprecated: pass context= to log_prob, nll, sample, project, ...",
            DeprecationWarning,
            stacklevel=2,
        )
        self._check_context(context, context.shape[0] if isinstance(context, Tensor) and context.dim() else 1)
        return ContextBound(self, context)

    # ------------------------------------------------------------------ core maps
    def _part_context(self, x: Tensor, k: int, ctx: Tensor | None) -> Tensor | None:
        """Conditioner input of part k: previous parts' coordinates (B, 3 * previous) and the external context."""
        pieces = [x.index_select(1, getattr(self, f"part_index_{i}")).flatten(1) for i in range(k)]
        if ctx is not None:
            pieces.append(ctx)
        if not pieces:
            return None
        return torch.cat(pieces, dim=-1).unsqueeze(1)

    def _part_log_probs(self, x: Tensor, ctx: Tensor | None, num_parts: int | None = None) -> Tensor:
        """Log-density of the first ``num_parts`` parts (default: all), each given the previous ones and the context
        ``ctx`` (B, C) or None, (B, P)."""
        out = []
        for k, flow in enumerate(self.flows[:num_parts]):
            xk = x.index_select(1, getattr(self, f"part_index_{k}")).reshape(x.shape[0], 1, -1)
            out.append(flow.log_prob(xk, self._part_context(x, k, ctx)))  # (B, 1)
        return torch.cat(out, dim=-1)

    def _part_states(self, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(B, J) joint mask -> which parts each pose observes whole, and which not at all, each (B, P)."""
        uniform = self._uniform_states(mask)
        if uniform is not None:
            states = torch.tensor(uniform, dtype=torch.bool, device=mask.device)[:, None]
            return states[0].expand(mask.shape[0], -1), states[1].expand(mask.shape[0], -1)
        parts = [mask[:, getattr(self, f"part_index_{k}")] for k in range(self.num_parts)]
        return torch.stack([m.all(-1) for m in parts], dim=-1), torch.stack([~m.any(-1) for m in parts], dim=-1)

    def _uniform_states(self, mask: Tensor) -> tuple[list[bool], list[bool]] | None:
        """:meth:`_part_states` of a mask of one pose, or whose rows are one row repeated (a stride of 0 across poses,
        as a layout's missing joints or a (J,) mask give it), read once in Python: a few ops instead of a dozen, which
        a one-pose fitting step feels. None for any other mask."""
        if mask.dim() != 2 or mask.shape[0] == 0 or (mask.shape[0] > 1 and mask.stride(0) != 0):
            return None
        row = mask[0].tolist()
        return (
            [all(row[i] for i in index) for index in self._part_index],
            [not any(row[i] for i in index) for index in self._part_index],
        )

    def _part_mask(self, mask: Tensor) -> Tensor:
        """(B, J) joint mask -> (B, P) part-observed flags; raises unless it hides whole trailing parts."""
        uniform = self._uniform_states(mask)
        if uniform is not None:  # checked once, in Python
            full, empty = uniform
            partial = not all(f or e for f, e in zip(full, empty, strict=True))
            gap = any(after and not before for before, after in zip(full, full[1:], strict=False))
            if not (partial or gap):
                return torch.tensor(full, dtype=torch.bool, device=mask.device).expand(mask.shape[0], -1)
        full, empty = self._part_states(mask)
        partial = ~(full | empty).all(-1)
        gap = (full[:, 1:] & ~full[:, :-1]).any(-1)
        for bad, why in ((partial, "partially observed part"), (gap, "a missing part before an observed one")):
            if bool(bad.any()):
                raise ValueError(self._mask_error(why, self._pattern(full, empty, int(bad.nonzero()[0, 0]))))
        return full

    def _pattern(self, full: Tensor, empty: Tensor, row: int) -> str:
        """What pose ``row`` observes, part by part (for the error message)."""
        parts = self.config.parts or ("all joints",)
        states = [
            "observed" if bool(full[row, k]) else ("missing" if bool(empty[row, k]) else "partly observed")
            for k in range(len(parts))
        ]
        return ", ".join(f"{part} {state}" for part, state in zip(parts, states, strict=True))

    def _mask_error(self, why: str, pattern: str = "") -> str:
        parts = self.config.parts or ("all joints",)
        other = (
            "sample() and project() complete other masks"
            if self.completion is not None
            else "a prior built with conditional=True completes other masks in sample() and project()"
        )
        hands = ""
        if pattern.startswith("body missing"):
            hands = HAND_PRIOR_HINT
        return (
            f"global_flow with parts {parts} has exact densities only for masks that hide whole trailing parts "
            f"(got {why}{': ' + pattern if pattern else ''}): score poses that observe the first part; {other}{hands}"
        )

    def _log_prob(self, x: Tensor, mask: Tensor | None, context: Tensor | None = None) -> Tensor:
        if mask is None:
            return self._part_log_probs(x, context).sum(-1)
        observed_parts = self._part_mask(mask)
        # trailing parts that no pose of the batch observes are not run at all (a body-only input skips the hands)
        needed = int(observed_parts.any(0).sum())
        parts = self._part_log_probs(x, context, needed)
        return (parts * observed_parts[:, :needed]).sum(-1)

    def log_prob_per_part(self, pose: Any, *, layout: str | None = None, context: Tensor | None = None) -> Tensor:
        """Log-density of every part given the previous ones.

        The terms are the flows' own density (the broad component, when there is one, mixes whole poses and has no
        per-part split); without it they sum to ``log_prob(pose)``.

        Args:
            pose: Any supported pose input with every joint of the prior, batch shape (*).
            layout: The layout of a pose tensor, as in :meth:`log_prob`.
            context: The context of a conditioned prior, as in :meth:`log_prob`.

        Returns:
            Per-part log-densities, shape (*, P), in the promoted dtype of the pose and the prior.

        Raises:
            ValueError: If the input lacks joints of the prior (a body-only pose for a body-and-hands prior): a
                missing part has no term, and the parts after it are conditioned on it. ``log_prob`` gives the
                marginal of the observed parts.
        """
        x, observed, batch_shape, out_dtype, _ = self._prepare_full(pose, None, layout)
        if observed is not None:
            missing = [j for j, seen in zip(self.joints, observed[0].tolist(), strict=True) if not seen]
            raise ValueError(
                f"log_prob_per_part needs every joint of the prior; the input lacks "
                f"{skeleton.describe_joints(tuple(missing))} (use log_prob for the marginal of the observed parts)"
            )
        ctx = self._check_context(context, x.shape[0], batch_shape).get("context")
        return self._part_log_probs(x, ctx).reshape(*batch_shape, self.num_parts).to(out_dtype)

    def _decode(
        self, z_parts: list[Tensor | None], x: Tensor, observed_parts: Tensor | None, ctx: Tensor | None
    ) -> Tensor:
        """Invert the parts in order: part k from latent ``z_parts[k]`` (B, 1, D_k) given the already decoded
        previous parts and the context ``ctx`` (B, C) or None; parts flagged observed keep ``x``'s values."""
        out = x.clone()
        for k, flow in enumerate(self.flows):
            idx = getattr(self, f"part_index_{k}")
            z = z_parts[k]
            decoded, _ = flow.inverse(z, self._part_context(out, k, ctx))
            decoded = decoded.reshape(x.shape[0], len(idx), 3)
            if observed_parts is not None:
                decoded = torch.where(observed_parts[:, k, None, None], x[:, idx], decoded)
            out[:, idx] = decoded
        return out

    def _encode(self, x: Tensor, ctx: Tensor | None) -> list[Tensor]:
        zs = []
        for k, flow in enumerate(self.flows):
            xk = x.index_select(1, getattr(self, f"part_index_{k}")).reshape(x.shape[0], 1, -1)
            zs.append(flow(xk, self._part_context(x, k, ctx))[0])
        return zs

    # ------------------------------------------------------------------ latent space
    @property
    def latent_dim(self) -> int:
        """Size D of the latent code (3 per modelled joint)."""
        return self.dim

    def encode(self, pose: PoseInput, *, layout: str | None = None, context: Tensor | None = None) -> Tensor:
        """The latent code ``z = f(x)`` of poses (all parts; the base density is a standard normal).

        Args:
            pose: Any supported pose input observing every modelled joint, batch shape (*).
            layout: The layout of a pose tensor, as in :meth:`log_prob`.
            context: The context of a conditioned prior, as in :meth:`log_prob`.

        Returns:
            Latent codes, shape (*, D) with D = :attr:`latent_dim` (the parts' codes one after the other).

        Raises:
            ValueError: When the pose misses modelled joints (encode observes everything; use ``project`` with a
                mask to complete them first).
        """
        x, mask, batch_shape, out_dtype, _ = self._prepare_full(pose, None, layout)
        if mask is not None:
            missing = [self.joint_names[j] for j in torch.nonzero(~mask.all(0)).flatten().tolist()]
            raise ValueError(f"encode needs every modelled joint; the pose misses {missing}")
        ctx = self._check_context(context, x.shape[0], batch_shape).get("context")
        z = torch.cat(self._encode(x, ctx), dim=-1).flatten(1)
        return z.reshape(*batch_shape, self.dim).to(out_dtype)

    def decode(self, z: Tensor, *, context: Tensor | None = None) -> Tensor:
        """Poses ``x = f^-1(z)`` of latent codes, differentiable in ``z`` (fitting in latent space).

        Args:
            z: Latent codes, shape (*, D) with D = :attr:`latent_dim`.
            context: The context of a conditioned prior, as in :meth:`log_prob`.

        Returns:
            Poses in the prior's joint order, shape (*, J, 3), in the promoted dtype of ``z`` and the prior (as
            :meth:`encode` returns codes), on the prior's device.
        """
        z = skeleton.as_float_tensor(z, f"latent codes of shape (*, {self.dim})")
        if z.dim() < 1 or z.shape[-1] != self.dim:
            raise ValueError(f"expected latent codes of shape (*, {self.dim}), got {tuple(z.shape)}")
        batch_shape, out_dtype = z.shape[:-1], torch.promote_types(z.dtype, self.dtype)
        flat = z.reshape(-1, self.dim).to(device=self.device, dtype=self.dtype)
        ctx = self._check_context(context, flat.shape[0], batch_shape).get("context")
        zs = [c.unsqueeze(1) for c in flat.split(self._part_sizes, dim=-1)]
        start = flat.new_zeros(flat.shape[0], self.num_joints, 3)
        return self._decode(zs, start, None, ctx).reshape(*batch_shape, self.num_joints, 3).to(out_dtype)

    def body_latent(self) -> tuple[int, Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
        """The latent space of the body alone, for fitting a body in latent space (``fit_keypoints(space="latent")``).

        Needs the 21 body joints (SMPL-X 1..21) to be the first part (or all of the joints) and no context; then the
        body's code and pose map to each other without the later parts (the hands).

        Returns:
            ``(d, encode, decode)``: the body code's size (63), body pose (B, 21, 3) -> code (B, d) and back.

        Raises:
            ValueError: When the body is not the first part, or the prior is conditioned on a context.
        """
        body = list(skeleton.PARTS["body"])
        first = [self.joints[i] for i in self._part_index[0]]
        if first != body:
            raise ValueError(
                f"fitting a body in latent space needs the 21 body joints as the first part of the flow, "
                f"got the first part's joints {first}"
            )
        if self.conditioning_features:
            raise ValueError("fitting in latent space is not supported for a global_flow conditioned on a context")
        flow = self.flows[0]
        dim = 3 * len(body)

        def encode(pose: Tensor) -> Tensor:
            pose, dtype = body_latent_input(pose, False, self)
            return flow(pose.reshape(pose.shape[0], 1, dim), None)[0].flatten(1).to(dtype)

        def decode(z: Tensor) -> Tensor:
            z, dtype = body_latent_input(z, True, self)
            return flow.inverse(z.reshape(z.shape[0], 1, dim), None)[0].reshape(z.shape[0], len(body), 3).to(dtype)

        return dim, encode, decode

    # ------------------------------------------------------------------ completion flow
    def _completion_context(self, x: Tensor, mask: Tensor, ctx: Tensor | None) -> Tensor:
        m = mask.repeat_interleave(3, dim=-1).to(x.dtype)  # (B, D)
        flat = x.flatten(1) * m
        pieces = [flat, m]
        if ctx is not None:
            pieces.append(ctx)
        return torch.cat(pieces, dim=-1).unsqueeze(1)

    def completion_log_prob(self, x: Tensor, mask: Tensor, noise: Tensor, *, context: Tensor | None = None) -> Tensor:
        """Log-density of the missing coordinates given the observed ones under the completion flow.

        Args:
            x: Poses, shape (B, J, 3).
            mask: Observed joints, shape (B, J).
            noise: Standard-normal noise standing in for the observed coordinates, shape (B, 3J).
            context: The context of a conditioned prior, shape (B, C) or (1, C).

        Returns:
            ``log q(x_missing | x_observed)``, shape (B,).
        """
        if self.completion is None:
            raise ValueError("this global_flow has no completion flow: build it with conditional=True")
        ctx = self._check_context(context, x.shape[0]).get("context")
        return self._completion_log_prob(x, mask, noise, ctx)

    def _completion_log_prob(self, x: Tensor, mask: Tensor, noise: Tensor, ctx: Tensor | None) -> Tensor:
        m = mask.repeat_interleave(3, dim=-1)
        u = torch.where(m, noise, x.flatten(1)).unsqueeze(1)
        joint = self.completion.log_prob(u, self._completion_context(x, mask, ctx))[:, 0]
        return joint - (-0.5 * (noise.square() + LOG_2PI) * m).sum(-1)

    def _complete(self, x: Tensor, mask: Tensor, z: Tensor, ctx: Tensor | None) -> Tensor:
        """Missing joints from the completion flow at latent ``z`` (B, 1, 3J); observed joints kept."""
        u, _ = self.completion.inverse(z, self._completion_context(x, mask, ctx))
        return torch.where(mask[..., None], x, u.reshape(x.shape))

    def _trailing_rows(self, mask: Tensor) -> Tensor:
        """(B, J) joint mask -> (B,) flags: the poses whose mask hides whole trailing parts (the exact marginals)."""
        full, empty = self._part_states(mask)
        return (full | empty).all(-1) & ~(full[:, 1:] & ~full[:, :-1]).any(-1)

    def _per_pose_route(self, mask: Tensor, run: Callable[[Tensor | None, bool], Tensor]) -> Tensor:
        """``run(rows, trailing)`` on the poses (B,) whose mask hides whole trailing parts (``trailing=True``: the
        exact decoding) and on the others (the completion flow), each pose's result from its own pose and mask
        alone; ``rows`` is None for the whole batch. Results (B, ...) in the batch's order."""
        trailing = self._trailing_rows(mask)
        if self.completion is None and not bool(trailing.all()):
            raise ValueError(self._mask_error("a mask that is not a trailing-part pattern"))
        return split_batch(trailing, lambda rows: run(rows, True), lambda rows: run(rows, False))

    # ------------------------------------------------------------------ sampling and projection
    def _sample(
        self,
        n: int,
        generator: torch.Generator | None,
        temperature: float,
        observed: Tensor | None,
        mask: Tensor | None,
        context: Tensor | None = None,
    ) -> Tensor:
        """Samples given the context (n, C) without ``observed``, (B, C) with it (the same for all n draws)."""
        if observed is None:
            x = torch.zeros(n, self.num_joints, 3, device=self.joint_index.device, dtype=self.dtype)
            return self._decode(self._part_latents(temperature, generator, x), x, None, context)
        B = observed.shape[0]
        x = repeat(observed, "b j c -> (n b) j c", n=n)  # sample-major: out.reshape(n, B, ...) below
        m = repeat(mask, "b j -> (n b) j", n=n)
        ctx = None if context is None else repeat(context, "b c -> (n b) c", n=n)

        def run(rows: Tensor | None, trailing: bool) -> Tensor:
            xs, ms, cs = (select_rows(t, rows) for t in (x, m, ctx))
            if trailing:
                return self._decode(self._part_latents(temperature, generator, xs), xs, self._part_mask(ms), cs)
            return self._draw_missing(xs, ms, cs, temperature, generator)

        return self._per_pose_route(m, run).reshape(n, B, self.num_joints, 3)

    def _draw_missing(
        self, x: Tensor, mask: Tensor, ctx: Tensor | None, temperature: float, generator: torch.Generator | None
    ) -> Tensor:
        """Missing joints of poses whose masks are not trailing-part patterns, for an unconditioned prior: a partly
        observed last part (a hidden hand, some fingers) after whole earlier parts by
        :meth:`_complete_last_part_by_resampling`; body joints by :meth:`_complete_by_resampling` where it applies
        (a prior with a fitting energy, each hand whole or missing); every other missing joint, and every one of a
        conditioned prior, from the completion flow (at latent zero for temperature 0)."""

        def by_flow(xs: Tensor, ms: Tensor, cs: Tensor | None) -> Tensor:
            z = self._latent((xs.shape[0], 1, self.dim), temperature, generator, xs)
            return self._complete(xs, ms, z, cs)

        if ctx is not None:
            return by_flow(x, mask, ctx)

        def last_part(rows: Tensor | None) -> Tensor:
            xs, ms = select_rows(x, rows), select_rows(mask, rows)
            return self._complete_last_part_by_resampling(xs, ms, temperature, generator)

        def others(rows: Tensor | None) -> Tensor:
            xs, ms = select_rows(x, rows), select_rows(mask, rows)
            if self.energy_gaussian is None:
                return by_flow(xs, ms, None)
            return split_batch(
                self._resampled_rows(ms),
                lambda r: self._complete_by_resampling(select_rows(xs, r), select_rows(ms, r), temperature, generator),
                lambda r: by_flow(select_rows(xs, r), select_rows(ms, r), None),
            )

        return split_batch(self._last_part_rows(mask), last_part, others)

    @staticmethod
    def _latent(shape: tuple[int, ...], temperature: float, generator: torch.Generator | None, like: Tensor) -> Tensor:
        """Latent draws ``temperature * N(0, I)``; zeros at temperature 0 (no draw: the RNG is not touched)."""
        if temperature == 0:
            return like.new_zeros(shape)
        return temperature * randn(shape, generator=generator, device=like.device, dtype=like.dtype)

    def _part_latents(self, temperature: float, generator: torch.Generator | None, x: Tensor) -> list[Tensor]:
        """:meth:`_latent` draws for every part of the poses ``x`` (B, J, 3), each (B, 1, D_k)."""
        return [self._latent((x.shape[0], 1, 3 * len(idx)), temperature, generator, x) for idx in self._part_index]

    RESAMPLED_PROPOSALS = 32
    """Proposals per draw of :meth:`_complete_by_resampling`."""

    LAST_PART_PROPOSALS = 64
    """Proposals per draw of :meth:`_complete_last_part_by_resampling`."""

    LAST_PART_DRAWS = 4096
    """The prior's own draws that :meth:`_last_part_gaussian` is fitted to."""

    def _last_part_rows(self, mask: Tensor) -> Tensor:
        """(B, J) -> (B,): the poses that observe every part before the last whole and the last part in part (a
        hidden hand or fingers after the body), for a prior of several parts."""
        full, empty = self._part_states(mask)
        if self.num_parts < 2:
            return torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
        return full[:, :-1].all(-1) & ~full[:, -1] & ~empty[:, -1]

    def _last_part_gaussian(self) -> BodyGaussian:
        """A full-covariance Gaussian of the last part's coordinates fitted to :attr:`LAST_PART_DRAWS` of the prior's
        own draws (a fixed seed, temperature 1; eigenvalue floor 0.01 rad, as ``gaussian_full``'s), in float64: the
        proposal of :meth:`_complete_last_part_by_resampling`. Cached, and drawn again when a parameter changes."""
        params = tuple(self.flows.parameters())
        # built outside inference mode (plain tensors, usable anywhere), also for a prior built inside it
        key = storage_key(params)  # None for inference tensors: drawn again every time
        cached = self.__dict__.get("_last_part_cache")
        if key is not None and cached is not None and cached[1] == key:
            return cached[2]
        generator = torch.Generator(device=self.joint_index.device).manual_seed(0)
        with torch.inference_mode(False), torch.no_grad():
            draws = self._sample(self.LAST_PART_DRAWS, generator, 1.0, None, None)
            v = to_float64(draws[:, getattr(self, f"part_index_{self.num_parts - 1}")].flatten(1))
            gaussian = BodyGaussian(v.shape[1]).to(v.device, torch.float64).fit(v, min_std=0.01)
        if key is not None:
            self.__dict__["_last_part_cache"] = (params, key, gaussian)  # held: no freed address comes back
        return gaussian

    def _complete_last_part_by_resampling(
        self, x: Tensor, mask: Tensor, temperature: float, generator: torch.Generator | None
    ) -> Tensor:
        """Draws of the missing joints of a partly observed last part (a hidden hand given the body and the other
        hand, hidden fingers) from the prior's own conditional by importance resampling (:meth:`_resample_joints`).

        The completion flow's draws of them were far too spread (a hidden left hand 91 deg from the truth, the
        completed poses scoring -407 nats against +184 for the truth: found by a new-user review). Proposals come
        from a Gaussian fitted to the prior's own draws of the part (:meth:`_last_part_gaussian`), each draw one of
        :attr:`LAST_PART_PROPOSALS`, weighted by the prior's exact density of the whole pose (broad component
        included).
        """
        last, gaussian = getattr(self, f"part_index_{self.num_parts - 1}"), self._last_part_gaussian()
        return self._resample_joints(x, mask, last, gaussian, self.LAST_PART_PROPOSALS, None, temperature, generator)

    def _resample_joints(
        self,
        x: Tensor,
        mask: Tensor,
        joints: Tensor,
        gaussian: BodyGaussian,
        proposals: int,
        scored: Tensor | None,
        temperature: float,
        generator: torch.Generator | None,
    ) -> Tensor:
        """The poses ``x`` (B, J, 3) with their missing coordinates among ``joints`` drawn from the prior's own
        conditional by importance resampling: each draw one of ``proposals`` draws from ``gaussian``'s conditional
        given the observed coordinates (its covariance scaled by ``T^2``), picked with weights
        ``p(x)^(1 / T^2) / q_T(x_m)``, ``p`` the prior's exact density of what ``scored`` (B, J) observes (None: the
        whole pose). At temperature 0, the Gaussian's conditional mean."""
        v = x[:, joints].flatten(1)
        observed = mask[:, joints].repeat_interleave(3, dim=-1)
        out = x.clone()
        patterns, inverse = torch.unique(observed.cpu(), dim=0, return_inverse=True)
        for p, pattern in enumerate(patterns):
            rows = (inverse == p).nonzero().squeeze(-1).to(x.device)
            mean, upper = gaussian.conditional(v[rows], pattern)
            missing = ~pattern.to(mean.device)
            chosen = to_float64(v[rows])
            if temperature == 0:
                chosen[:, missing] = mean
            else:
                K, b, m = proposals, len(rows), mean.shape[1]
                eps = randn((K, b, m), generator=generator, device=mean.device, dtype=torch.float64)
                step = torch.linalg.solve_triangular(upper, eps.reshape(-1, m).T, upper=True)
                cand = chosen.expand(K, -1, -1).clone()
                cand[..., missing] = mean + temperature * step.T.reshape(K, b, -1)
                poses = out[rows].repeat(K, 1, 1)
                poses[:, joints] = cast_back(cand.reshape(K * b, len(joints), 3), x)
                log_p = self._density(poses, None if scored is None else scored[rows].repeat(K, 1))
                weights = to_float64(log_p.reshape(K, b)).to(eps.device) / temperature**2 + 0.5 * eps.square().sum(-1)
                pick = categorical(torch.softmax(weights, 0).T, generator)  # (rows,)
                chosen = cand[pick, torch.arange(b, device=cand.device)]
            block = out[rows]
            block[:, joints] = cast_back(chosen.reshape(len(rows), len(joints), 3), x)
            out[rows] = block
        return out

    def _resampled_rows(self, mask: Tensor) -> Tensor:
        """(B, J) -> (B,): the poses whose missing body joints :meth:`_complete_by_resampling` draws (each hand
        observed whole or missing whole, so that the hands then follow exactly)."""
        full, empty = self._part_states(mask)
        return (full | empty)[:, 1:].all(-1)

    def _complete_by_resampling(
        self, x: Tensor, mask: Tensor, temperature: float, generator: torch.Generator | None
    ) -> Tensor:
        """Draws of missing body joints from the prior's own conditional by importance resampling, then of missing
        hands by exact decoding given the body.

        The completion flow's draws of body joints are far too spread (median errors near 90 deg for a hidden head
        on ``body_val``, and their NLL worse than the truth's by 30 to 90 nats), so the body joints are drawn
        instead from proposals of the fitting energy's Gaussian's conditional ``N(x_m | x_o)``, each draw one of
        :attr:`RESAMPLED_PROPOSALS` proposals picked with weights ``p(x)^(1 / T^2) / q_T(x_m)`` (``p`` the prior's
        exact density of the observed parts; ``q_T`` the proposal with its covariance scaled by ``T^2``).
        At temperature 0, the body joints are the Gaussian's conditional mean.
        """
        done = mask.clone()
        done[:, self.body_index] = True
        gaussian, K = self.energy_gaussian, self.RESAMPLED_PROPOSALS
        out = self._resample_joints(x, mask, self.body_index, gaussian, K, done, temperature, generator)
        if bool(done.all()):
            return out
        return self._decode(self._part_latents(temperature, generator, out), out, self._part_mask(done), None)

    def _project(
        self,
        x: Tensor,
        mask: Tensor | None,
        shrink: float = 0.5,
        keep_observed: bool = False,
        context: Tensor | None = None,
    ) -> Tensor:
        """Latent shrinkage ``x' = f^-1(shrink * f(x))``; missing joints completed as ``sample`` at temperature 0
        completes them (per pose: the exact decoding of missing trailing parts at latent zero, else
        :meth:`_draw_missing`)."""
        if not 0 <= shrink <= 1:
            raise ValueError(f"expected 0 <= shrink <= 1, got {shrink}")
        if mask is None:
            return self._project_poses(x, None, shrink, keep_observed, context, True)

        def run(rows: Tensor | None, trailing: bool) -> Tensor:
            xs, ms, cs = (select_rows(t, rows) for t in (x, mask, context))
            return self._project_poses(xs, ms, shrink, keep_observed, cs, trailing)

        return self._per_pose_route(mask, run)

    def _project_poses(
        self,
        x: Tensor,
        mask: Tensor | None,
        shrink: float,
        keep_observed: bool,
        context: Tensor | None,
        trailing: bool,
    ) -> Tensor:
        """:meth:`_project` of poses whose masks all hide whole trailing parts (``trailing``), or none of which do."""
        observed_parts = None
        if mask is not None:
            if trailing:
                observed_parts = self._part_mask(mask)
            else:  # the deterministic completion: sample()'s at temperature 0
                x = self._draw_missing(x, mask, context, 0.0, None)
                if keep_observed:
                    return x
        zs = self._encode(x, context)
        if observed_parts is not None:  # missing parts go to latent zero, given the parts before them
            zs = [torch.where(observed_parts[:, k, None, None], z, torch.zeros_like(z)) for k, z in enumerate(zs)]
        if keep_observed:
            return self._decode(zs, x, observed_parts, context)
        return self._decode([shrink * z for z in zs], x, None, context)

    def _map_project(
        self,
        x: Tensor,
        mask: Tensor | None,
        noise_std: float,
        steps: int = 200,
        lr: float = 0.05,
        context: Tensor | None = None,
    ) -> Tensor:
        """MAP in the latent space (see :func:`~posepriors.priors.base.latent_map`), from the encoded pose with
        missing joints first completed by :meth:`_project`."""
        if mask is not None:
            completed = self._project(x, mask, keep_observed=True, context=context)
            start = torch.where(mask[..., None], x, completed)
        else:
            start = x
        sizes = self._part_sizes
        z0 = torch.cat(self._encode(start, context), dim=-1)

        def decode(z: Tensor) -> Tensor:
            return self._decode(list(z.split(sizes, dim=-1)), start, None, context)

        return latent_map(decode, z0, x, mask, noise_std, steps, lr)

    # ------------------------------------------------------------------ training
    def _training_loss(self, pose: Tensor, generator: torch.Generator | None, context: Tensor | None = None) -> Tensor:
        """Maximum likelihood; plus the completion flow's NLL on randomly masked poses when ``conditional``."""
        loss = -self._log_prob(pose, None, context).mean()
        if self.completion is not None:
            mask = random_joint_mask(pose.shape[0], self.joints, self.config.mask_probability, generator, pose.device)
            noise = randn(pose.flatten(1).shape, generator=generator, device=pose.device, dtype=pose.dtype)
            hidden = (~mask).sum(-1).clamp_min(1)
            loss = loss - (self._completion_log_prob(pose, mask, noise, context) / hidden).mean()
        return loss

    def round_trip_error(self, pose: Tensor, *, context: Tensor | None = None) -> Tensor:
        """Max abs error of ``f^-1(f(x))`` over the batch (B, J, 3) -> () (``context``: as in :meth:`log_prob`)."""
        ctx = self._check_context(context, pose.shape[0]).get("context")
        back = self._decode(self._encode(pose, ctx), torch.zeros_like(pose), None, ctx)
        return (back - pose).abs().max()

    def diagnostics(self, pose: Tensor) -> dict[str, float]:
        """The inversion error of the flow, ``{"round_trip_error": ...}`` (:meth:`round_trip_error`)."""
        return {"round_trip_error": self.round_trip_error(pose).item()}

    @torch.no_grad()
    def initialize_from_data(self, pose: Tensor, *, context: Tensor | None = None) -> None:
        """ActNorm data initialisation of every part (and of the completion flow).

        Args:
            pose: Training poses in the prior's joint order, shape (N, J, 3).
            context: Their contexts (N, C) or (1, C) for a conditioned prior; without them ActNorm initialises on
                the first training batch instead.
        """
        if self.conditioning_features and context is None:
            return
        ctx = self._check_context(context, pose.shape[0]).get("context")
        for k, flow in enumerate(self.flows):
            xk = pose[:, getattr(self, f"part_index_{k}")].reshape(pose.shape[0], 1, -1)
            flow.initialize(xk, self._part_context(pose, k, ctx))
        if self.completion is not None:
            mask = torch.ones(pose.shape[:2], dtype=torch.bool, device=pose.device)
            mask[: pose.shape[0] // 2] = False
            flat = pose.flatten(1)
            noise = randn(flat.shape, generator=torch.Generator().manual_seed(0), device=flat.device, dtype=flat.dtype)
            u = torch.where(mask.repeat_interleave(3, -1), noise, flat)
            self.completion.initialize(u.unsqueeze(1), self._completion_context(pose, mask, ctx))


class ContextBound:
    """A conditioned :class:`GlobalFlowPrior` with its context bound (from the deprecated
    :meth:`GlobalFlowPrior.with_context`): every method passes ``context=`` on; nothing is stored on the prior.

    Usable directly (``prior.with_context(c).nll(pose)``) or as a context manager that binds itself.
    """

    def __init__(self, prior: GlobalFlowPrior, context: Tensor) -> None:
        self.prior, self.context = prior, context

    def __enter__(self) -> ContextBound:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def log_prob(self, pose: Any, mask: Any = None, **kwargs: Any) -> Tensor:
        return self.prior.log_prob(pose, mask, context=self.context, **kwargs)

    def nll(self, pose: Any, mask: Any = None, **kwargs: Any) -> Tensor:
        return self.prior.nll(pose, mask, context=self.context, **kwargs)

    def sample(self, n: int, **kwargs: Any) -> Tensor:
        return self.prior.sample(n, context=self.context, **kwargs)

    def project(self, pose: Any, mask: Any = None, **kwargs: Any) -> Tensor:
        return self.prior.project(pose, mask, context=self.context, **kwargs)

    def log_prob_per_part(self, pose: Any, **kwargs: Any) -> Tensor:
        return self.prior.log_prob_per_part(pose, context=self.context, **kwargs)

    def training_loss(self, pose: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.prior.training_loss(pose, generator, context=self.context)

    def validation_nll(self, pose: Tensor) -> Tensor:
        return self.prior.validation_nll(pose, context=self.context)


def random_joint_mask(
    batch: int,
    joints: tuple[int, ...],
    probability: float,
    generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    """Random observed-joint masks for completion training: per pose, with ``probability``, hide one of: a whole
    subtree (a limb, a hand, a finger chain) rooted at a random modelled joint or a whole part (the body, a hand:
    when the prior models more than one part, or a part that is no single subtree, such as the hands without their
    wrists), or independent random joints.

    Returns:
        Masks (B, J) bool, True = observed, with at least one joint hidden and one observed where masked.
    """
    J = len(joints)
    subtree = torch.zeros(J, J, dtype=torch.bool)  # subtree[i] = modelled descendants of joint i (itself included)
    for i, members in enumerate(skeleton.modelled_descendants(joints)):
        subtree[i, list(members)] = True
    whole_parts = [
        torch.tensor([j in members for j in joints])
        for members in (set(skeleton.PARTS[name]) for name in ("body", "left_hand", "right_hand"))
        if members & set(joints)
    ]
    seed = torch.randint(2**31, (1,), generator=generator, device=None if generator is None else generator.device)
    cpu = torch.Generator().manual_seed(int(seed))
    use = torch.rand(batch, generator=cpu) < probability
    roots = torch.randint(J, (batch,), generator=cpu)
    hide = subtree[roots]
    if len(whole_parts) > 1:  # 30% of the structured masks hide a whole part
        part = torch.stack(whole_parts)[torch.randint(len(whole_parts), (batch,), generator=cpu)]
        hide = torch.where((torch.rand(batch, generator=cpu) < 0.3)[:, None], part, hide)
    scattered = torch.rand(batch, J, generator=cpu) < torch.rand(batch, 1, generator=cpu) * 0.5
    kind = torch.rand(batch, generator=cpu) < 0.5
    hide = torch.where(kind[:, None], hide, scattered)
    hide[hide.all(-1)] = False  # keep something observed
    empty = ~hide.any(-1)
    hide[torch.arange(batch)[empty], roots[empty]] = True
    hide[hide.all(-1)] = False
    mask = ~(hide & use[:, None])
    return mask.to(device)
