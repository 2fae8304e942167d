"""The :class:`PosePrior` interface that every model family implements.

Density convention
------------------
``log_prob`` is the log-density of the modelled joints' axis-angle coordinates with respect to the **Lebesgue
measure on R^{3J}** (J = number of modelled joints, or of the observed ones under a mask), in nats. NLLs of
different families on the same joints are therefore directly comparable. ``log_prob(pose, measure="so3")``
converts to a density on SO(3)^J with respect to the normalised Haar measure (uniform rotations have log-density
0) through the Jacobian of the exponential map; that conversion is exact for canonical poses (angles <= pi) and
for densities whose mass lies inside the pi-ball.

Masks
-----
``mask`` marks **observed** joints (``True`` = observed, ``False`` = missing). It has shape ``(J,)`` or
``(*, J)`` over the prior's joints, or ``(55,)`` / ``(*, 55)`` over SMPL-X joints. ``log_prob`` under a mask is
the marginal density of the observed joints; ``project`` and ``sample`` complete the missing ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import numbers
import operator
import types
import typing
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from posepriors import skeleton
from posepriors.flows import FlowSequence, _numba_spline
from posepriors.priors import sure
from posepriors.priors.broad import MarginalMixture
from posepriors.priors.draws import rand
from posepriors.priors.energy import BodyGaussian
from posepriors.priors.smoothed import BODY, SmoothedBody
from posepriors.rotations import LOG_SO3_VOLUME, exp_map_log_abs_det
from posepriors.utils import from_numpy, in_transform, version_key

__all__ = [
    "MODEL_TYPES",
    "PRIOR_LAYOUT",
    "PoseInput",
    "PosePrior",
    "PriorConfig",
    "get_validation",
    "latent_map",
    "register_model",
    "set_validation",
    "validation",
]

PoseInput = Tensor | np.ndarray | Mapping[str, Any]

PRIOR_LAYOUT = "prior"
"""``layout=`` value of a pose tensor in the prior's own joints, in :attr:`PosePrior.joints` order."""
"""Anything a prior accepts as a pose: a tensor or array in any supported layout, or an smplx-style dict."""

_VALIDATE = True


def set_validation(enabled: bool) -> None:
    """Turn the data-dependent input checks (finite values) on or off for all priors.

    The checks cost a device synchronisation per call; shape and dtype checks always run.
    """
    global _VALIDATE
    if not isinstance(enabled, bool | np.bool_):
        raise TypeError(f"expected enabled to be True or False, got {enabled!r} ({type(enabled).__name__})")
    _VALIDATE = bool(enabled)


def get_validation() -> bool:
    """Whether data-dependent input checks are on (default: on)."""
    return _VALIDATE


@contextlib.contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Turn the data-dependent input checks on or off inside a ``with`` block (see :func:`set_validation`).

    The previous setting comes back when the block ends, also when it ends with an exception.

    Example:
        >>> import posepriors
        >>> with posepriors.validation(False):
        ...     posepriors.get_validation()
        False
        >>> posepriors.get_validation()
        True
    """
    previous = _VALIDATE
    set_validation(enabled)
    try:
        yield
    finally:
        set_validation(previous)


@dataclass(frozen=True)
class PriorConfig:
    """Settings shared by every family. Each family subclasses this with its own frozen dataclass.

    Attributes:
        joints: The SMPL-X joints the prior models, as sorted indices into the 55-joint layout. A part spec
            string (``"body"``, ``"body+left_hand+right_hand"``, ``"hands"``, ``"all"``) is accepted and
            resolved on construction.
        broad_weight: Weight ``w`` of the broad component (:mod:`posepriors.priors.broad`): the prior's density is
            the exact mixture ``(1 - w) p + w b`` of the family's density ``p`` and a product of per-coordinate
            Gaussian mixtures ``b`` fitted to the training data. 0 (the default) turns it off.
        broad_components: Gaussian components per coordinate in ``b``.
        broad_min_std: Floor on the std of every component of ``b`` (radians).
        smoothed_noise_std: Noise level ``s`` (radians) of the prior's smoothed body density
            (:class:`~posepriors.priors.smoothed.SmoothedBody`), which :meth:`PosePrior.denoise` uses for the
            posterior mean at that level; 0 (the default): none. Needs the 21 body joints among ``joints``.
        smoothed_members: Flows in the smoothed density's ensemble.
        smoothed_hidden: Conditioner width of those flows.
        smoothed_num_layers: Coupling layers of those flows.
        smoothed_epochs: Training epochs of each of those flows (:meth:`PosePrior.fit_smoothed`).
        energy_gaussian_weight: Weight ``lam`` of the full-covariance body Gaussian in the prior's fitting energy
            (:mod:`posepriors.priors.energy`, :meth:`PosePrior.energy`); 0 (the default): no fitting energy, and
            :meth:`PosePrior.energy` is the NLL. Needs the 21 body joints among ``joints``.
        energy_min_std: Floor on that Gaussian's standard deviations (radians; its covariance is at least
            ``energy_min_std^2 I``).
        energy_members: Flows of the smoothed body density that the fitting energy uses (its first ones; 0: all).
            Fewer flows make a fitting step cheaper.
    """

    joints: tuple[int, ...] = skeleton.PARTS["body"]
    broad_weight: float = 0.0
    broad_components: int = 2
    broad_min_std: float = 0.02
    smoothed_noise_std: float = 0.0
    smoothed_members: int = 4
    smoothed_hidden: int = 128
    smoothed_num_layers: int = 6
    smoothed_epochs: int = 60
    energy_gaussian_weight: float = 0.0
    energy_min_std: float = 0.01
    energy_members: int = 0

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise fields in place through object.__setattr__. Every field is checked against
        # its annotation first, so a wrong type names its field instead of failing later.
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            checked = _check_field(type(self).__name__, f.name, hints.get(f.name, Any), value)
            if checked is not value:
                object.__setattr__(self, f.name, checked)
        object.__setattr__(self, "joints", skeleton.resolve_joints(self.joints))
        if not 0 <= self.broad_weight < 1:
            raise ValueError(f"expected 0 <= broad_weight < 1, got {self.broad_weight!r}")
        if isinstance(self.broad_components, bool) or not isinstance(self.broad_components, int):
            raise TypeError(f"expected an integer broad_components, got {self.broad_components!r}")
        if self.broad_components < 1:
            raise ValueError(f"expected broad_components >= 1, got {self.broad_components}")
        if not 0 < self.broad_min_std < math.inf:
            raise ValueError(f"expected 0 < broad_min_std < inf, got {self.broad_min_std!r}")
        if not 0 <= self.smoothed_noise_std < math.inf:
            raise ValueError(f"expected 0 <= smoothed_noise_std < inf, got {self.smoothed_noise_std!r}")
        for name in ("smoothed_members", "smoothed_hidden", "smoothed_num_layers", "smoothed_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")
        if not 0 <= self.energy_gaussian_weight <= 1:
            raise ValueError(f"expected 0 <= energy_gaussian_weight <= 1, got {self.energy_gaussian_weight!r}")
        if not 0 < self.energy_min_std < math.inf:
            raise ValueError(f"expected 0 < energy_min_std < inf, got {self.energy_min_std!r}")
        if not 0 <= self.energy_members <= (self.smoothed_members if self.smoothed_noise_std else 0):
            raise ValueError(
                f"expected 0 <= energy_members <= the smoothed density's members "
                f"({self.smoothed_members if self.smoothed_noise_std else 0}; 0: all), got {self.energy_members}"
            )
        for needs_body, what in (
            (self.smoothed_noise_std, f"a smoothed body density (smoothed_noise_std={self.smoothed_noise_std})"),
            (self.energy_gaussian_weight, f"a fitting energy (energy_gaussian_weight={self.energy_gaussian_weight})"),
        ):
            if needs_body and not set(skeleton.PARTS["body"]) <= set(self.joints):
                raise ValueError(
                    f"{what} needs the 21 body joints (SMPL-X 1..21) among the prior's joints, got joints {self.joints}"
                )

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON types (tuples become lists)."""
        return {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PriorConfig:
        """Build the config from :meth:`to_dict` output (e.g. the ``config`` object of a ``config.json``).

        Every value is checked against its field's annotation on construction (``__post_init__``), as JSON types:
        ``bool`` fields take ``true`` / ``false`` only, ``int`` fields integers, ``float`` fields numbers, ``str``
        fields strings and tuple fields lists (``joints`` also takes a part spec string).

        Raises:
            ValueError: On unknown keys.
            TypeError: On a value of the wrong type, naming the field, what it expects and what came.
        """
        if not isinstance(values, Mapping):
            raise TypeError(f"expected a mapping of {cls.__name__} fields, got {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; expected a subset of {sorted(names)}")
        return cls(**values)


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_to_json(v) for v in value]
    return value


def _check_field(owner: str, name: str, annotation: Any, value: Any) -> Any:
    """``value`` checked against a config field's annotation (JSON types) and converted (lists to tuples, integers to
    floats for float fields); a ``TypeError`` names the field otherwise."""

    def check(annotation: Any, item: Any, where: str) -> Any:
        def fail(expected: str) -> TypeError:
            return TypeError(f"expected {where} to be {expected}, got {item!r} ({type(item).__name__})")

        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin in (typing.Union, types.UnionType):
            if item is None and type(None) in args:
                return None
            errors = []
            for arg in (a for a in args if a is not type(None)):
                try:
                    return check(arg, item, where)
                except TypeError as err:
                    errors.append(err)
            raise errors[0] if errors else fail(str(annotation))
        if origin is tuple:
            if where == f"{owner}.joints" and isinstance(item, str):
                return item  # a part spec, resolved by PriorConfig
            if not isinstance(item, list | tuple):
                raise fail("a list")
            if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]
                return tuple(check(args[0], v, f"every item of {where}") for v in item)
            if args:  # tuple[X, Y]
                if len(item) != len(args):
                    raise fail(f"a list of {len(args)} items")
                return tuple(check(a, v, f"every item of {where}") for a, v in zip(args, item, strict=True))
            return tuple(item)
        if annotation is bool:
            if not isinstance(item, bool):
                raise fail("a bool (true or false)")
            return item
        if annotation is int:
            if isinstance(item, bool) or not isinstance(item, int):
                raise fail("an integer")
            return item
        if annotation is float:
            if isinstance(item, bool) or not isinstance(item, int | float):
                raise fail("a number")
            return float(item)
        if annotation is str:
            if not isinstance(item, str):
                raise fail("a string")
            return item
        return item  # other annotations (Any, ...): left to the config's own checks

    return check(annotation, value, f"{owner}.{name}")


class PosePrior(nn.Module, ABC):
    """A density over SMPL-X joint rotations (axis-angle), with sampling and projection.

    Subclasses set ``model_type`` and ``config_class`` and implement :meth:`_log_prob`, :meth:`_sample`,
    :meth:`_project` and :meth:`_map_project` on normalised inputs of shape ``(B, J, 3)`` in the prior's own joint
    order, and declare what they can do in the capability attributes below. This class turns
    every supported input (see :func:`posepriors.skeleton.to_smplx`) into that shape, checks it, and puts the
    batch shape back.

    A prior returned by :func:`posepriors.load` is in eval mode with frozen parameters (``requires_grad=False``),
    so that ``prior.nll(pose).backward()`` computes gradients for the pose only. Call ``prior.train()`` and
    ``prior.requires_grad_(True)`` to fine-tune it.

    Dtypes: the computation runs in the prior's dtype (:attr:`dtype`, float32 unless converted with
    ``prior.double()`` or ``load(..., dtype=...)``); results of :meth:`log_prob`, :meth:`nll`, :meth:`project` and
    :meth:`sample` (with ``observed``) come back in ``torch.promote_types(pose.dtype, prior.dtype)``, so float64
    poses give float64 results. For float64 *accuracy*, convert the prior too.
    """

    model_type: ClassVar[str]
    config_class: ClassVar[type[PriorConfig]]

    # Capabilities and training defaults: generic code (training, evaluation, fitting, tests) reads these instead of
    # naming families.
    exact_log_prob: ClassVar[bool] = True
    """Whether :meth:`log_prob` is the exact log-density (False: a lower bound, e.g. ``hand_vae``'s IWAE bound)."""
    mask_marginals: ClassVar[str] = "any"
    """Which masks :meth:`log_prob` marginalises exactly: ``"any"``; ``"descendant_closed"`` (missing joints take
    their modelled descendants along); ``"trailing_parts"`` (whole trailing parts missing); ``"whole_hands"`` (whole
    hands missing; partly observed hands get a bound); ``"none"`` (a mask with missing joints is an error)."""
    per_joint_log_prob: ClassVar[bool] = False
    """Whether :meth:`log_prob_per_joint` gives a per-joint breakdown (families whose density factorises over
    joints); else it raises ``NotImplementedError``."""
    reconstructs: ClassVar[bool] = False
    """Whether the family is an auto-encoder with a :meth:`reconstruction_error`."""
    closed_form: ClassVar[bool] = False
    """``posepriors-train`` fits the family once with ``fit(poses, observed, generator=...)`` instead of SGD."""
    exact_posterior_mean: ClassVar[bool] = False
    """The family's MAP denoiser (``project(noise_std=...)``) is its exact posterior mean (the Gaussian families)."""
    posterior_mean_with_broad: ClassVar[bool] = False
    """With a broad component too, ``project(noise_std=...)`` is the exact mixture's posterior mean (``gmm``)."""
    training_defaults: ClassVar[Mapping[str, Any]] = types.MappingProxyType({})
    """Defaults of ``posepriors-train``'s loop flags for this family (:class:`posepriors.train.TrainConfig` fields)."""
    seed_batch_size: ClassVar[int | None] = None
    """The batch size the seed code base used, when the default differs (``--help`` says why)."""
    flag_aliases: ClassVar[Mapping[str, str]] = types.MappingProxyType({})
    """Old ``posepriors-train`` flag names that still work: config field -> old name (``num_layers`` -> ``K``)."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} expects a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config
        self.register_buffer("joint_index", torch.tensor(config.joints, dtype=torch.long), persistent=False)
        self.broad = MarginalMixture(3 * len(config.joints), config.broad_components) if config.broad_weight else None
        self.smoothed = (
            SmoothedBody(
                config.smoothed_noise_std, config.smoothed_members, config.smoothed_hidden, config.smoothed_num_layers
            )
            if config.smoothed_noise_std
            else None
        )
        if self.smoothed is not None:  # trained on its own (fit_smoothed), never by the family's loss
            self.smoothed.requires_grad_(False)
        self.energy_gaussian = BodyGaussian(3 * len(BODY)) if config.energy_gaussian_weight else None
        if self.smoothed is not None or self.energy_gaussian is not None:
            position = {j: i for i, j in enumerate(config.joints)}
            body = [position[j] for j in skeleton.PARTS["body"]]  # the config checked they are all modelled
            self.register_buffer("body_index", torch.tensor(body), persistent=False)
        # Standard layouts with the prior's joint count but other joints: an input of that count is ambiguous
        # between them and the prior's own order (layout= decides). MANO's two hands count as one layout whose
        # hand the prior picks (_default_hand).
        same_count = skeleton.layouts_with(self.num_joints)
        if any(lay.smplx_index == self.joints for lay in same_count if lay.name.startswith("mano_")):
            same_count = []
        self._clashing_layouts = tuple(lay.name for lay in same_count if lay.smplx_index != self.joints)

    # ------------------------------------------------------------------ properties
    @property
    def supports_mask(self) -> bool:
        """Whether :meth:`log_prob` accepts masks with missing joints (``mask_marginals != "none"``)."""
        return self.mask_marginals != "none"

    @property
    def joints(self) -> tuple[int, ...]:
        """SMPL-X indices (into the 55-joint layout) of the joints this prior models, in its own order."""
        return self.config.joints

    @property
    def joint_names(self) -> tuple[str, ...]:
        """Names of the modelled joints."""
        return tuple(skeleton.SMPLX_JOINT_NAMES[j] for j in self.joints)

    @property
    def num_joints(self) -> int:
        """Number of modelled joints J."""
        return len(self.config.joints)

    @property
    def dim(self) -> int:
        """Dimension 3J of the density's domain."""
        return 3 * self.num_joints

    @property
    def device(self) -> torch.device:
        """Device of the prior's parameters and buffers."""
        return self.joint_index.device

    half_precision: bool = True
    """Whether the prior computes in float16 / bfloat16 (``.half()``) at all: the flows do not (their spline
    log-determinants overflow), and refuse such weights with a clear error."""

    def _check_precision(self) -> None:
        """A clear error for a prior converted to a half-precision dtype it cannot compute in."""
        if not self.half_precision and self.dtype in (torch.float16, torch.bfloat16):
            raise TypeError(
                f"expected a {type(self).__name__} with float32 or float64 weights, got {self.dtype}: its spline "
                "flows overflow in half precision (inf or NaN log-densities); convert it with .float() "
                "(half-precision poses are fine: a float32 prior scores them in float32)"
            )

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the prior's parameters (float32 unless converted)."""
        dtype = self.__dict__.get("_dtype")  # walking the modules costs more than a single pose's Gaussian term
        if dtype is None:
            dtype = next((t.dtype for t in self.parameters()), None)
            if dtype is None:
                dtype = next((t.dtype for t in self.buffers() if t.is_floating_point()), torch.get_default_dtype())
            self.__dict__["_dtype"] = dtype
        return dtype

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> PosePrior:
        self.__dict__.pop("_dtype", None)  # .to(), .double(), .half() ... may change it
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"model_type={self.model_type!r}, joints={self.num_joints}"

    # ------------------------------------------------------------------ public API
    def log_prob(
        self,
        pose: PoseInput,
        mask: Tensor | np.ndarray | None = None,
        *,
        measure: Literal["lebesgue", "so3"] = "lebesgue",
        layout: str | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """Log-density of poses.

        Args:
            pose: Axis-angle rotations in any supported layout: shape (*, J, 3) or (*, 3J) for J in
                (55, 53, 52, 24, 23, 22, 21, 15) or the prior's own joints, or an smplx-style dict.
            mask: Optional observed-joint mask, shape (J,), (*, J), (55,) or (*, 55); ``True`` = observed. Joints
                the input does not carry (e.g. hands of a body-only pose) count as missing.
            measure: ``"lebesgue"`` (default) for the density of the axis-angle coordinates, ``"so3"`` for the
                density on SO(3)^J relative to the normalised Haar measure.
            layout: The layout of a tensor ``pose``: a name of :data:`posepriors.skeleton.LAYOUTS`, or
                ``"prior"`` for the prior's own joints in :attr:`joints` order. Default: from the joint count; a
                count that fits both the prior's own joints and a standard layout of other joints (e.g. 21 joints
                for a prior of SMPL-X joints 0-20, or the ``body`` layout 1-21) is an error that asks for it.
            context: For a conditioned prior (:attr:`conditioning_features` > 0, e.g. ``global_flow`` with
                ``use_conditioning``), the context vector of every pose, shape (B, C), (*, C) or (1, C) (shared by the
                batch), B the number of poses; required there, and an error for priors that are not conditioned.

        Returns:
            Log-density per pose in nats, shape (*,), in the promoted dtype of the pose and the prior.
        """
        if measure not in ("lebesgue", "so3"):  # checked before any work
            raise ValueError(f"expected measure 'lebesgue' or 'so3', got {measure!r}")
        x, m, batch_shape, out_dtype, _ = self._prepare_full(pose, mask, layout)
        ctx = self._check_context(context, x.shape[0], batch_shape)
        out = self._marginal_density(x, m, ctx)
        if measure == "so3":
            out = out + self._so3_correction(x, m)
        return out.reshape(batch_shape).to(out_dtype)

    def log_prob_per_joint(
        self,
        pose: PoseInput,
        mask: Tensor | np.ndarray | None = None,
        *,
        layout: str | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """Log-density of each joint's term, for families whose density factorises over joints
        (:attr:`per_joint_log_prob`): which joint makes a pose implausible?

        The terms are the family's own density (the broad component, when there is one, mixes whole poses and has
        no per-joint split); without it they sum to ``log_prob(pose, mask)``.

        Args:
            pose: Any input :meth:`log_prob` accepts, batch shape (*).
            mask: Optional observed-joint mask, as in :meth:`log_prob`; joints the input does not carry count as
                missing.
            layout: The layout of a pose tensor, as in :meth:`log_prob`.
            context: The context of a conditioned prior, as in :meth:`log_prob`.

        Returns:
            Per-joint log-densities in the prior's joint order, shape (*, J), 0 at missing joints, in the promoted
            dtype of the pose and the prior.

        Raises:
            NotImplementedError: For a family without a per-joint breakdown, naming it.
        """
        if not self.per_joint_log_prob:
            per_joint = sorted(name for name, cls in MODEL_TYPES.items() if cls.per_joint_log_prob)
            raise NotImplementedError(
                f"{type(self).__name__} ({self.model_type!r}) has no per-joint breakdown of its log-density "
                f"(per_joint_log_prob=False); expected a family that factorises over joints, such as {per_joint}"
            )
        x, m, batch_shape, out_dtype, _ = self._prepare_full(pose, mask, layout)
        ctx = self._check_context(context, x.shape[0], batch_shape)
        return self._log_prob_per_joint(x, m, **ctx).reshape(*batch_shape, self.num_joints).to(out_dtype)

    def nll(
        self,
        pose: PoseInput,
        mask: Tensor | np.ndarray | None = None,
        *,
        layout: str | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """Negative log-likelihood, ``-log_prob(pose, mask)``: differentiable w.r.t. the pose, for fitting.

        Typical use: ``loss = data_term + w * prior.nll(pose).sum()``.

        Args:
            pose: As in :meth:`log_prob`.
            mask: As in :meth:`log_prob`.
            layout: As in :meth:`log_prob`.
            context: As in :meth:`log_prob`.

        Returns:
            NLL per pose in nats, shape (*,).
        """
        return -self.log_prob(pose, mask, layout=layout, context=context)

    def energy(
        self,
        pose: PoseInput,
        mask: Tensor | np.ndarray | None = None,
        *,
        layout: str | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """The fitting energy: the regulariser this prior recommends for fits, ``loss = data + w * prior.energy(pose)``.

        For a prior with a fitting energy (``energy_gaussian_weight > 0`` in its config; the shipped
        ``global_flow``), an unnormalised negative log-density of the pose (:mod:`posepriors.priors.energy`):
        ``-(1 - lam) log p_s(body) - lam log N(body)`` plus the exact conditional NLL of the other observed
        joints given the body. It is smooth where :meth:`nll` is spiky, and fits better (docs/models.md); it is not
        a likelihood (compare poses with :meth:`log_prob`). A pose whose mask hides body joints gets :meth:`nll`,
        as does every prior without a fitting energy, where the family has that marginal (``global_flow`` has none
        for hidden body joints: a ``ValueError`` naming the poses); each pose is routed by its own mask, whatever
        the rest of the batch hides. :func:`posepriors.fitting.fit_keypoints` minimises it.

        Args:
            pose: As in :meth:`log_prob`.
            mask: As in :meth:`log_prob`.
            layout: As in :meth:`log_prob`.
            context: As in :meth:`log_prob`; the fitting energy's body terms do not use it.

        Returns:
            Energy per pose (nats, up to a constant), shape (*,).
        """
        if self.energy_gaussian is None:
            return self.nll(pose, mask, layout=layout, context=context)
        x, m, batch_shape, out_dtype, _ = self._prepare_full(pose, mask, layout)
        ctx = self._check_context(context, x.shape[0], batch_shape)
        whole = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if m is None else m[:, self.body_index].all(1)
        out = split_batch(  # each pose by its own mask, whatever the rest of the batch hides
            whole,
            lambda r: self._energy(select_rows(x, r), select_rows(m, r), _rows_of(ctx, r)),
            lambda r: self._partial_body_nll(select_rows(x, r), select_rows(m, r), _rows_of(ctx, r), r),
        )
        return out.reshape(batch_shape).to(out_dtype)

    def _energy(self, x: Tensor, m: Tensor | None, ctx: dict[str, Tensor]) -> Tensor:
        """:meth:`energy` of poses (B, J, 3) that observe every body joint (``m``: their mask or None)."""
        body = self.body_index
        v = x[:, body].flatten(1)
        if self.smoothed is not None:
            smooth = self._smoothed_log_prob(self.config.energy_members or None)(v)
        else:  # the exact body marginal
            smooth = self._density(x, self._body_only(x), **ctx)
        lam = self.config.energy_gaussian_weight
        out = -(1 - lam) * smooth - lam * self.energy_gaussian.log_prob(v)
        rest = torch.ones(self.num_joints, dtype=torch.bool, device=x.device)
        rest[body] = False
        if bool(rest.any()) and (m is None or bool(m[:, rest].any())):  # observed joints beyond the body
            out = out - (self._density(x, m, **ctx) - self._density(x, self._body_only(x), **ctx))
        return out

    def _partial_body_nll(self, x: Tensor, m: Tensor, ctx: dict[str, Tensor], rows: Tensor | None) -> Tensor:
        """:meth:`energy` of poses (B, J, 3) that hide body joints: the NLL of what they observe (``rows``: their
        places in the caller's batch, for the error message; None: all of it)."""
        try:
            return -self._marginal_density(x, m, ctx)
        except ValueError as error:  # no exact marginal for this mask: say what energy() needs
            which = "every pose" if rows is None else f"poses {rows.tolist()[:8]}"
            raise ValueError(
                f"{type(self).__name__}.energy with hidden body joints ({which}) is the NLL of the observed ones, "
                f"which this prior cannot give for this mask ({error}). Fits optimise every body joint: pass no "
                "mask (or hide only joints beyond the body), complete the pose first with project(pose, mask), or "
                "score partial bodies with gaussian_full"
            ) from None

    def _body_only(self, x: Tensor) -> Tensor:
        """The mask (B, J) that observes the 21 body joints only."""
        mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        mask[:, self.body_index] = True
        return mask

    def compile(self, enabled: bool = True, *, gradient: bool = False, **options: Any) -> PosePrior:
        """Opt in to compiled inference: the flows' frozen forward runs through :func:`torch.compile`.

        For long fitting loops with frozen weights (as :func:`posepriors.load` returns them): every normalizing
        flow inside the prior (see :meth:`posepriors.flows.FlowSequence.compile_frozen`) is traced once per input
        shape, and TorchInductor fuses its element-wise work, forward and backward. The first call of each batch
        shape compiles (tens of seconds on a CPU; a warm inductor cache makes it several times shorter), so it
        pays for loops of thousands of calls at a fixed batch size; ``docs/benchmarks.md`` has the figures.
        Numbers match eager within float round-off. Families without a flow (``gaussian``, ``gmm``, the VAEs)
        are left as they are. On the CPU with Numba installed (``posepriors[fast]``) the eager couplings run fused
        kernels that compiled graphs cannot call, and compiling measured 0.8x to 1.1x the eager step: keep eager
        there (``docs/benchmarks.md``). Unlike :meth:`torch.nn.Module.compile`, the prior's methods keep their
        signatures.

        Args:
            enabled: ``False`` returns to eager execution.
            gradient: Compile each flow's log-density *and* its gradient w.r.t. the pose as one graph, used when
                the pose needs a gradient (``loss = w * prior.nll(pose)`` in a fit): fewer calls per step, the
                fastest fitting step, at a longer first call (minutes on 2 CPU cores for the shipped ``global_flow``).
            options: Passed on to :func:`torch.compile`, e.g. ``options={"cpp_wrapper": True}`` (less overhead per
                call for a single pose).

        Returns:
            The prior itself.
        """
        for module in self.modules():
            if isinstance(module, FlowSequence):
                module.compile_frozen(enabled, gradient=gradient, **options)
        return self

    def clear_caches(self) -> PosePrior:
        """Forget everything derived from the weights, after changing them through ``.data``.

        A frozen prior caches what it derives from its weights (folded flow layers, the loops' copies of the last
        layers, covariance factors), keyed on each parameter's storage and version counter: in-place changes
        (``copy_``, an optimiser step, ``load_state_dict``, ``.to``) rebuild them by themselves. A write through
        ``.data`` (``p.data.mul_(...)``, as some weight-averaging code does) bumps no version and would go unseen:
        call this after it. It also drops the graphs of :meth:`compile`, which then compile again on first use.

        Returns:
            The prior itself.
        """
        for module in self.modules():
            clear = getattr(module, "_clear_caches", None)
            if clear is not None:
                clear()
        self.__dict__.pop("_dtype", None)
        return self

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        observed: PoseInput | None = None,
        mask: Tensor | np.ndarray | None = None,
        layout: str | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """Draw poses from the prior.

        Args:
            n: Number of samples (>= 1; a Python or NumPy integer).
            generator: Optional ``torch.Generator`` for reproducible draws; the global RNG is never reseeded.
            temperature: Scale of the latent noise; ``< 1`` concentrates samples on typical poses. A broad
                component's weight is tempered with it (:func:`tempered_weight`: 0.1 at 1, 1.5e-4 at 0.5, none at
                0), so that at 0 the draws are the family's deterministic mode.
            observed: Optional poses to complete (any supported layout), batch shape (*). Observed joints are
                copied exactly; missing ones (``mask == False``) are drawn from the prior's conditional.
            mask: Observed-joint mask for ``observed`` (see :meth:`log_prob`).
            layout: The layout of a tensor ``observed``, as in :meth:`log_prob`.
            context: For a conditioned prior, the context of every draw, shape (n, C) or (1, C); with ``observed``,
                of every observed pose, shape (B, C), (*, C) or (1, C), shared by its n completions.

        Returns:
            Samples in the prior's joint order, shape (n, J, 3) in the prior's dtype, or (n, *, J, 3) when
            ``observed`` is given, in the promoted dtype of ``observed`` and the prior.
        """
        self._check_precision()
        n = _check_count(n)
        _check_generator(generator)
        temperature = _check_temperature(temperature)
        if observed is None:
            if mask is not None:
                raise ValueError("a mask needs the observed poses it refers to: pass observed=pose")
            ctx = self._check_context(context, n)
            out = self._sample(n, generator, temperature, None, None, **ctx)
            if self.broad is not None:  # each draw comes from the broad component with its (tempered) weight
                pick = rand((n,), generator, out.device, torch.float32) < tempered_weight(
                    self.config.broad_weight, temperature
                )
                broad = self.broad.sample(n, generator, temperature, out.dtype).reshape(out.shape)
                out = torch.where(pick.to(out.device)[:, None, None], broad, out)
            return out
        x, m, batch_shape, out_dtype, original = self._prepare_full(observed, mask, layout)
        ctx = self._check_context(context, x.shape[0], batch_shape)
        if m is None:
            m = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        with contextlib.ExitStack() as stack:  # a family's conditional draws may fit latent codes (the VAE)
            x, m = _autograd_copies(stack, x, m)
            out = self._sample(n, generator, temperature, x, m, **ctx).to(out_dtype)  # (n, B, J, 3)
        out = torch.where(m[..., None], original.to(out_dtype), out)  # observed joints are kept exactly
        return out.reshape(n, *batch_shape, self.num_joints, 3)

    def project(
        self,
        pose: PoseInput,
        mask: Tensor | np.ndarray | None = None,
        *,
        noise_std: float | None = None,
        layout: str | None = None,
        context: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Move poses to nearby plausible ones; with a mask, complete the missing joints.

        Two modes:

        - ``noise_std=None`` (default): the family's fast projection (latent shrinkage for flows, encode-decode
          for the VAE, clamping for the Gaussian); family keyword arguments tune it.
        - ``noise_std=s``: the MAP denoiser for poses observed with Gaussian noise of std ``s`` radians per
          axis-angle coordinate, ``argmax_x' log p(x') - |x' - x|^2 / (2 s^2)`` over the observed joints (missing
          joints are free). Closed form where the family allows it (``gaussian``, ``gmm``), else Adam in the
          family's latent space from the fast projection (the flows: :func:`latent_map`, ``steps``/``lr``; the
          VAE: the latent code that best explains the noisy hand). To fill in an occluded limb, prefer this mode with a
          small ``noise_std`` (e.g. 0.05): for the shipped ``global_flow`` it is far closer to the truth than the
          fast mode (docs/models.md).

        Projections that optimise (the MAP mode of every family but the Gaussian and the mixture, the masked
        completion of ``hand_vae``) need autograd on the pose; they work inside ``torch.no_grad()`` and
        ``torch.inference_mode()`` too (on a copy of the input, with autograd switched back on locally), and
        never touch the prior's parameters. The same input gives the same output in every call of a process, but
        an optimised MAP on a sharp density amplifies float32 round-off, so a pose's result depends on the batch
        it comes in: ``global_flow``'s MAP of 32 noisy full poses (body and hands) moved 6 to 7 of them by over
        0.01 rad (up to 0.19 and 0.25 in two runs) when run one at a time instead of as a batch, at the same mean
        error. A prior loaded with ``dtype=torch.float64`` gives the same result in any batch to about 2e-5 rad.

        Args:
            pose: As in :meth:`log_prob`.
            mask: As in :meth:`log_prob`.
            noise_std: Noise level of the MAP denoiser (finite, > 0), or None for the fast projection.
            layout: As in :meth:`log_prob`.
            context: As in :meth:`log_prob`.
            **kwargs: Family-specific settings of the mode that runs (:meth:`project_options` lists them); an
                option of the other mode, or an unknown one, is a ``TypeError`` before any work.

        Returns:
            Projected poses in the prior's joint order, shape (*, J, 3), in the promoted dtype of the pose and the
            prior.
        """
        if noise_std is not None:
            noise_std = _check_noise_std(noise_std)
        self._check_project_options(noise_std is not None, kwargs)
        x, m, batch_shape, out_dtype, original = self._prepare_full(pose, mask, layout)
        ctx = self._check_context(context, x.shape[0], batch_shape)
        with contextlib.ExitStack() as stack:
            x, m = _autograd_copies(stack, x, m)
            if noise_std is None:
                out = self._project(x, m, **kwargs, **ctx)
            else:
                with _numba_spline.one_path():  # the MAP's encoding, loop and decoding on one arithmetic
                    out = self._map_project(x, m, noise_std, **kwargs, **ctx)
        out = out.to(out_dtype)
        if kwargs.get("keep_observed") and m is not None:  # exactly as given, not through the prior's dtype
            out = torch.where(m[..., None], original.to(out_dtype), out)
        return out.reshape(*batch_shape, self.num_joints, 3)

    def denoise(
        self,
        pose: PoseInput,
        mask: Tensor | np.ndarray | None = None,
        *,
        noise_std: float,
        layout: str | None = None,
        context: Tensor | None = None,
        adaptive: bool = False,
    ) -> Tensor:
        """The posterior mean ``E[x | y]`` of poses ``y`` observed with Gaussian noise of std ``noise_std`` radians
        per axis-angle coordinate: the denoiser of least squared error under the prior.

        Which estimator runs (:meth:`denoise_estimator` says it):

        - ``gaussian`` and ``gmm`` (``gaussian_full``, SMPLify's GMM): the exact posterior mean in closed form, the
          same as ``project(noise_std=...)``.
        - A prior with a smoothed body density at this noise level (``smoothed_noise_std`` in its config; the
          shipped ``global_flow`` at 0.1): the body joints by Tweedie's formula ``y + s^2 grad log p_s(y)``
          (:mod:`posepriors.priors.smoothed`, mixed with the convolved broad component when the prior has one),
          every other joint as ``project(noise_std=...)`` gives it.
        - Otherwise (another noise level, or a mask that hides body joints) the MAP denoiser
          ``project(pose, mask, noise_std=...)``, with a ``UserWarning``: a flow's MAP is no posterior mean, and on
          the shipped flows it denoises worse (docs/models.md).

        ``adaptive=True`` (Tweedie's formula only) treats the poses of the call as one set from one source (a clip,
        a capture session, the output of one pipeline) and returns ``f + t (g - f)``: the flow's posterior mean
        ``f`` blended towards the broad component's ``g`` (the per-coordinate mixture, closed form; without a broad
        component the smoothed density's per-coordinate Gaussian) by the weight ``t`` in [0, 1] that minimises
        Stein's unbiased risk estimate of the squared error summed over the set (:mod:`posepriors.priors.sure`).
        SURE needs only the noisy poses, so the set itself says how far the flow's correlations hold for it: ``t``
        stays near 0 on AMASS-like poses and grows on poses from other pipelines (dance, A-poses). It costs
        ``2 k`` more gradients per pose for the divergence (``k`` probes, 1 for sets of 256 poses or more, up to 64
        for a single pose). Give it dozens of poses or more: on a single pose the weight is noisy and can cost
        accuracy (docs/models.md, "Remedy 4"); below :data:`ADAPTIVE_MIN_POSES` (16) it warns.

        Args:
            pose: As in :meth:`log_prob`.
            mask: As in :meth:`log_prob`; Tweedie's formula needs every body joint observed (else: the MAP fallback).
            noise_std: The noise level (finite, > 0).
            layout: As in :meth:`log_prob`.
            context: As in :meth:`log_prob`.
            adaptive: Blend the posterior mean towards the broad component's by the SURE-optimal weight for the
                call's poses (Tweedie's formula only).

        Returns:
            Denoised poses in the prior's joint order, shape (*, J, 3), in the promoted dtype of the pose and the
            prior.

        Raises:
            ValueError: As :meth:`project`; ``adaptive=True`` where the estimator is not Tweedie's formula.
        """
        noise_std = _check_noise_std(noise_std)
        if not isinstance(adaptive, bool):
            raise TypeError(f"expected adaptive to be a bool, got {type(adaptive).__name__}")
        x, m, batch_shape, out_dtype, _ = self._prepare_full(pose, mask, layout)
        estimator, why = self._estimator(noise_std, m)
        seen = None  # with a per-pose mask, the poses that show the whole body still get Tweedie's formula
        if estimator == "map" and m is not None and self._estimator(noise_std, None)[0] == "tweedie":
            seen = m[:, self.body_index].all(-1)
            if bool(seen.any()):
                why += f" ({int((~seen).sum())} of {seen.numel()} poses; the others get Tweedie's formula)"
            else:
                seen = None
        if adaptive and estimator != "tweedie":
            raise ValueError(
                f"adaptive=True blends Tweedie's posterior mean of a smoothed body density, but "
                f"{type(self).__name__}.denoise runs the {estimator!r} estimator at noise_std={noise_std}"
                + (f" ({why})" if why else "")
            )
        if adaptive and x.shape[0] < ADAPTIVE_MIN_POSES:
            warnings.warn(
                f"{type(self).__name__}.denoise(adaptive=True) on {x.shape[0]} pose(s): the SURE weight is noisy on "
                f"small sets and can cost accuracy; it helps from about {ADAPTIVE_MIN_POSES} poses of one source "
                "(docs/models.md)",
                UserWarning,
                stacklevel=2,
            )
        if estimator == "map":
            warnings.warn(
                f"{type(self).__name__}.denoise: no posterior mean at noise_std={noise_std} ({why}); "
                f"returning the MAP project(noise_std={noise_std})",
                UserWarning,
                stacklevel=2,
            )
        ctx = self._check_context(context, x.shape[0], batch_shape)
        with contextlib.ExitStack() as stack:
            x, m = _autograd_copies(stack, x, m)
            stack.enter_context(_numba_spline.one_path())  # MAP loops (and the rest) on one arithmetic
            if estimator == "tweedie":
                out = self._denoise_tweedie(x, m, noise_std, ctx, adaptive)
            else:  # each pose by its own estimator: the MAP (what project(noise_std=...) runs) unless it is `seen`
                out = split_batch(
                    seen if seen is not None else torch.zeros(x.shape[0], dtype=torch.bool, device=x.device),
                    lambda r: self._denoise_tweedie(select_rows(x, r), select_rows(m, r), noise_std, _rows_of(ctx, r)),
                    lambda r: self._map_project(select_rows(x, r), select_rows(m, r), noise_std, **_rows_of(ctx, r)),
                )
        return out.reshape(*batch_shape, self.num_joints, 3).to(out_dtype)

    def denoise_estimator(self, noise_std: float, mask: Tensor | np.ndarray | None = None) -> str:
        """Which estimator :meth:`denoise` runs at ``noise_std`` (for poses observed as ``mask`` says, as in
        :meth:`log_prob`; None: every joint): ``"closed_form"`` (the Gaussian families' exact posterior mean),
        ``"tweedie"`` (the smoothed body density, at its level with the whole body observed) or ``"map"`` (the MAP
        fallback, for every pose or, with a per-pose mask, for the poses that hide body joints)."""
        noise_std = _check_noise_std(noise_std)
        m = None
        if mask is not None:
            mask = from_numpy(mask) if isinstance(mask, np.ndarray) else mask
            shape = mask.shape[:-1] if isinstance(mask, Tensor) and mask.dim() else torch.Size()
            m = self._prepare_mask(mask, shape, math.prod(shape))
        return self._estimator(noise_std, m)[0]

    def _estimator(self, noise_std: float, mask: Tensor | None) -> tuple[str, str]:
        """The estimator of :meth:`denoise_estimator` and, for the MAP fallback, why there is no posterior mean."""
        if self.exact_posterior_mean and (self.broad is None or self.posterior_mean_with_broad):
            return "closed_form", ""
        if self.smoothed is None:
            models_body = set(skeleton.PARTS["body"]) <= set(self.joints)
            return "map", "no smoothed body density" if models_body else "no closed-form posterior mean for this family"
        if not math.isclose(noise_std, self.smoothed.noise_std, rel_tol=1e-6):
            return "map", f"smoothed body density: noise_std={self.smoothed.noise_std} only"
        if mask is not None and not bool(mask[:, self.body_index].all()):
            return "map", "the mask hides body joints, and Tweedie's formula needs the whole body"
        return "tweedie", ""

    def _smoothed_log_prob(self, members: int | None = None) -> Callable[[Tensor], Tensor]:
        """The density of noisy body poses that :meth:`denoise` differentiates: (B, 63) -> (B,).

        The smoothed body density (:attr:`smoothed`, at its noise level; its first ``members`` flows, None: all),
        mixed with the broad component convolved with the same noise when the prior has one (exact: each Gaussian's
        variance grows by the noise variance).

        Raises:
            ValueError: For a prior without a smoothed body density.
        """
        if self.smoothed is None:
            raise ValueError(f"{self.model_type} has no smoothed body density (smoothed_noise_std=0 in its config)")
        self.smoothed._members(members)  # checked now, not at the first call

        def smooth(v: Tensor) -> Tensor:
            return self.smoothed.log_prob(v, members)

        broad = self.broad
        if broad is None:
            return smooth
        w, noise_std, dims = self.config.broad_weight, self.smoothed.noise_std, self._body_dims()

        def log_prob(v: Tensor) -> Tensor:
            b = broad.log_prob(v, dims=dims, noise_std=noise_std).to(v.dtype)
            return torch.logaddexp(smooth(v) + math.log1p(-w), b + math.log(w))

        return log_prob

    def _body_dims(self) -> Tensor:
        """The body joints' coordinates among the prior's flattened coordinates, (63,) long (the same tensor while
        ``body_index`` is unchanged: the broad component caches its coefficients per tensor)."""
        body = self.body_index
        key = version_key((body,))
        cached = self.__dict__.get("_body_dims_cache")
        if key is not None and cached is not None and cached[0] is body and cached[1] == key:
            return cached[2]
        dims = (body[:, None] * 3 + torch.arange(3, device=body.device)).flatten()
        if key is not None:
            self.__dict__["_body_dims_cache"] = (body, key, dims)
        return dims

    def _denoise_tweedie(
        self, x: Tensor, mask: Tensor | None, noise_std: float, ctx: Mapping[str, Tensor], adaptive: bool = False
    ) -> Tensor:
        """Body joints by Tweedie's formula (blended by SURE with ``adaptive``), the other joints by the MAP
        denoiser given the noisy pose."""
        body = self.body_index
        y = x[:, body].flatten(1)
        log_prob = self._smoothed_log_prob()
        est = self.smoothed.posterior_mean(y, log_prob)
        if adaptive:
            est = self._sure_blend(y, est, log_prob)
        est = est.reshape(-1, len(body), 3).to(x.dtype)
        out = x.clone()
        out[:, body] = est
        if self.num_joints == len(body):
            return out
        others = torch.ones(self.num_joints, dtype=torch.bool, device=x.device)
        others[body] = False
        # poses with nothing but the body observed (body-only inputs): the rest filled in given the denoised body;
        # the other poses' other joints by the MAP denoiser given the noisy pose
        if mask is not None and "keep_observed" in self.project_options():
            alone = ~mask[:, others].any(-1)
        else:
            alone = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

        def fill(r: Tensor | None) -> Tensor:
            rows = select_rows(out, r), select_rows(mask, r)
            return self._project(*rows, keep_observed=True, **_rows_of(ctx, r)).detach()

        def mapped(r: Tensor | None) -> Tensor:
            estimate = self._map_project(select_rows(x, r), select_rows(mask, r), noise_std, **_rows_of(ctx, r))
            return torch.where(others[:, None], estimate.detach(), select_rows(out, r))

        return split_batch(alone, fill, mapped)

    def _broad_posterior_mean(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """The body's posterior mean under the broad component (without one: the smoothed density's per-coordinate
        Gaussian) at the smoothed density's noise level, and its divergence: (B, 63) -> (B, 63), (B,)."""
        noise_std = self.smoothed.noise_std
        if self.broad is not None:
            return self.broad.posterior_mean(y, dims=self._body_dims(), noise_std=noise_std)
        diagonal = MarginalMixture(y.shape[1], 1).to(self.smoothed.mean)
        diagonal.means.copy_(self.smoothed.mean)
        diagonal.stds.copy_(self.smoothed.var.sqrt())
        return diagonal.posterior_mean(y, noise_std=noise_std)

    def _sure_blend(self, y: Tensor, tweedie: Tensor, log_prob: Callable[[Tensor], Tensor]) -> Tensor:
        """Tweedie's estimate blended towards the broad posterior mean by the weight that minimises the set's SURE
        (:func:`sure.blend_weight`), (B, 63).

        Args:
            y: The noisy body poses of the set, (B, 63).
            tweedie: Their posterior mean under ``log_prob``, (B, 63).
            log_prob: The density of noisy poses that Tweedie's formula differentiates.
        """
        noise_std = self.smoothed.noise_std
        broad, broad_div = self._broad_posterior_mean(y)
        div = sure.divergence(
            lambda v: self.smoothed.posterior_mean(v, log_prob).detach(),
            y.detach(),
            step=0.01 * noise_std,
            probes=sure.probes_for(len(y)),
        )
        weight = sure.blend_weight(y, tweedie, div, broad, broad_div, noise_std)
        return tweedie + weight * (broad - tweedie)

    def project_options(self, map_mode: bool = False) -> tuple[str, ...]:
        """The keyword options :meth:`project` takes in the fast mode (``map_mode=False``) or the MAP mode
        (``noise_std`` given), with the family's defaults in the signatures of ``_project`` / ``_map_project``."""
        method = self._map_project if map_mode else self._project
        skip = {"x", "mask", "noise_std", "context"}
        return tuple(
            name
            for name, param in inspect.signature(method).parameters.items()
            if name not in skip and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
        )

    def _check_project_options(self, map_mode: bool, options: Mapping[str, Any]) -> None:
        allowed = self.project_options(map_mode)
        unknown = sorted(set(options) - set(allowed))
        if not unknown:
            for name, value in options.items():
                if name in _OPTION_CHECKS:
                    expected, test = _OPTION_CHECKS[name]
                    try:
                        ok = bool(test(value))
                    except TypeError:
                        ok = False
                    if not ok:
                        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
                        raise (ValueError if number else TypeError)(
                            f"{type(self).__name__}.project: expected {name} to be {expected}, got {value!r}"
                        )
            return
        other = set(self.project_options(not map_mode))
        mode = "the MAP mode (noise_std given)" if map_mode else "the fast mode (noise_std=None)"
        hint = ""
        if set(unknown) <= other:
            hint = (
                "; they belong to the fast mode: drop noise_std"
                if map_mode
                else "; they belong to the MAP mode: pass noise_std=..."
            )
        raise TypeError(
            f"{type(self).__name__}.project: expected options of {mode} from {list(allowed)}, got {unknown}{hint}"
        )

    @abstractmethod
    def _map_project(self, x: Tensor, mask: Tensor | None, noise_std: float) -> Tensor:
        """MAP estimate of ``x`` (B, J, 3) observed with Gaussian noise of std ``noise_std`` on the joints of ``mask``
        (B, J) (None: all), returns (B, J, 3); the prior's parameters are not touched.

        Families add their options as keyword arguments with defaults (:meth:`project_options` lists them): closed
        form where the family has one, else :func:`latent_map` (the flows, the VAE's latent fit)."""

    def to_smplx(self, pose: Tensor) -> Tensor:
        """Place poses in this prior's joint order into the SMPL-X layout (other joints zero).

        Args:
            pose: Poses from :meth:`sample` or :meth:`project`, shape (*, J, 3) or flat (*, 3J) (a tensor or
                NumPy array).

        Returns:
            SMPL-X poses, shape (*, 55, 3).
        """
        J = self.num_joints
        pose = skeleton.as_float_tensor(pose, f"poses of shape (*, {J}, 3) or (*, {3 * J})")
        if pose.dim() >= 1 and pose.shape[-1] == 3 * J and not (pose.dim() >= 2 and pose.shape[-2:] == (J, 3)):
            pose = pose.reshape(*pose.shape[:-1], J, 3)
        if pose.dim() < 2 or pose.shape[-2:] != (J, 3):
            raise ValueError(f"expected pose of shape (*, {J}, 3) or (*, {3 * J}), got {tuple(pose.shape)}")
        out = pose.new_zeros(*pose.shape[:-2], skeleton.NUM_JOINTS, 3)
        out[..., self.joint_index.to(pose.device), :] = pose
        return out

    def reconstruction_error(self, pose: Tensor) -> Tensor:
        """Mean geodesic error (degrees) of encoding and decoding poses, for auto-encoders (:attr:`reconstructs`).

        Args:
            pose: Poses in the prior's joint order, shape (B, J, 3).

        Returns:
            The error, shape ().

        Raises:
            NotImplementedError: For a family that is no auto-encoder, naming it.
        """
        raise NotImplementedError(
            f"{type(self).__name__} ({self.model_type!r}) is no auto-encoder (reconstructs=False): "
            "it has no reconstruction error"
        )

    def diagnostics(self, pose: Tensor) -> dict[str, float]:
        """Numerical health metrics that ``posepriors-train`` logs at every validation (none by default; the flows
        give their inversion error, the VAE its reconstruction error).

        Args:
            pose: Validation poses in the prior's joint order, shape (B, J, 3).

        Returns:
            Metric name -> value.
        """
        return {}

    # ------------------------------------------------------------------ training hooks
    def training_loss(
        self, pose: Tensor, generator: torch.Generator | None = None, *, context: Tensor | None = None
    ) -> Tensor:
        """Scalar loss for one training batch (maximum likelihood by default; families override
        :meth:`_training_loss`).

        Args:
            pose: Training poses in the prior's joint order, shape (B, J, 3).
            generator: Optional generator for stochastic objectives (masks, VAE noise).
            context: The contexts of a conditioned prior, shape (B, C) or (1, C) (see :meth:`log_prob`).

        Returns:
            The mean loss, shape ().
        """
        return self._training_loss(pose, generator, **self._check_context(context, pose.shape[0]))

    def validation_nll(self, pose: Tensor, *, context: Tensor | None = None) -> Tensor:
        """Per-pose NLL used for validation and early stopping: the exact NLL by default, that is, the prior's
        density mixed with its broad component when it has one, as :meth:`nll` scores (families override
        :meth:`_validation_nll`, the family's own term).

        Families whose exact NLL is expensive (the VAE's importance-weighted bound) may use a cheaper estimate
        here and say so; mixed with the broad component, a bound stays a bound.

        Args:
            pose: Validation poses in the prior's joint order, shape (B, J, 3).
            context: The contexts of a conditioned prior, shape (B, C) or (1, C) (see :meth:`log_prob`).

        Returns:
            NLL per pose, shape (B,).
        """
        nll = self._validation_nll(pose, **self._check_context(context, pose.shape[0]))
        return -self._with_broad(-nll, pose, None)

    def _training_loss(self, pose: Tensor, generator: torch.Generator | None, **context: Tensor) -> Tensor:
        """The loss of :meth:`training_loss` (``context``: the checked ``context=`` of a conditioned prior)."""
        return -self._log_prob(pose, None, **context).mean()

    def _validation_nll(self, pose: Tensor, **context: Tensor) -> Tensor:
        """The NLL of :meth:`validation_nll` (``context``: the checked ``context=`` of a conditioned prior)."""
        return -self._log_prob(pose, None, **context)

    @torch.no_grad()
    def initialize_from_data(self, pose: Tensor) -> None:
        """Data-dependent initialisation before training (closed-form fits, ActNorm statistics).

        Args:
            pose: A representative batch of training poses in the prior's joint order, shape (N, J, 3).
        """

    @torch.no_grad()
    def fit_broad(self, pose: Tensor, observed: Tensor | None = None) -> None:
        """Fit the broad component (closed-form EM) to training poses; the family's own parameters are untouched.

        Args:
            pose: Training poses in the prior's joint order, shape (N, J, 3).
            observed: Observed joints, shape (N, J) bool (None: all); each coordinate is fitted on the poses that
                observe it.

        Raises:
            ValueError: When the prior has no broad component (``broad_weight == 0``) or on wrong shapes.
        """
        if self.broad is None:
            raise ValueError(f"{type(self).__name__} has broad_weight 0: there is no broad component to fit")
        if pose.dim() != 3 or pose.shape[1:] != (self.num_joints, 3):
            raise ValueError(f"expected poses of shape (N, {self.num_joints}, 3), got {tuple(pose.shape)}")
        dims = None if observed is None else observed.repeat_interleave(3, dim=-1)
        self.broad.fit(pose.flatten(1), dims, min_std=self.config.broad_min_std)

    def fit_energy(self, pose: Tensor, observed: Tensor | None = None) -> None:
        """Fit the fitting energy's full-covariance body Gaussian (:class:`~posepriors.priors.energy.BodyGaussian`)
        in closed form on the training poses that observe every body joint; nothing else is touched.

        Args:
            pose: Training poses in the prior's joint order, shape (N, J, 3).
            observed: Observed joints, shape (N, J) bool (None: all).

        Raises:
            ValueError: When the prior has no fitting energy, on wrong shapes, or when fewer than 2 poses observe
                the body.
        """
        if self.energy_gaussian is None:
            raise ValueError(f"{type(self).__name__} has energy_gaussian_weight 0: there is no fitting energy to fit")
        poses = self._body_training_poses(pose, observed)
        self.energy_gaussian.fit(poses.flatten(1), min_std=self.config.energy_min_std)

    def _body_training_poses(self, pose: Tensor, observed: Tensor | None) -> Tensor:
        """The body joints (N', 21, 3) of the training poses that observe all of them."""
        if pose.dim() != 3 or pose.shape[1:] != (self.num_joints, 3):
            raise ValueError(f"expected poses of shape (N, {self.num_joints}, 3), got {tuple(pose.shape)}")
        body = self.body_index.to(pose.device)
        rows = slice(None) if observed is None else observed[:, body].all(-1)
        poses = pose[rows][:, body]
        if len(poses) < 2:
            raise ValueError(f"expected at least 2 training poses that observe every body joint, got {len(poses)}")
        return poses

    def fit_smoothed(
        self,
        pose: Tensor,
        observed: Tensor | None = None,
        *,
        seed: int = 0,
        progress: Callable[[str], None] | None = None,
    ) -> list[float]:
        """Train the smoothed body density (:class:`~posepriors.priors.smoothed.SmoothedBody`) on the training poses
        that observe every body joint; the family's own parameters are untouched.

        Args:
            pose: Training poses in the prior's joint order, shape (N, J, 3).
            observed: Observed joints, shape (N, J) bool (None: all).
            seed: Seed of the first flow's draws.
            progress: Called with a line every 10 epochs and after the last, or None.

        Returns:
            Every flow's last-epoch training loss.

        Raises:
            ValueError: When the prior has no smoothed density, on wrong shapes, or when fewer than 2 poses observe
                the body.
        """
        if self.smoothed is None:
            raise ValueError(f"{type(self).__name__} has smoothed_noise_std 0: there is no smoothed density to fit")
        poses = self._body_training_poses(pose, observed)
        return self.smoothed.fit(poses, epochs=self.config.smoothed_epochs, seed=seed, progress=progress)

    def _marginal_density(self, x: Tensor, m: Tensor | None, ctx: dict[str, Tensor]) -> Tensor:
        """:meth:`_density` of what ``m`` observes; a ``ValueError`` for a family without marginals."""
        if m is not None and not self.supports_mask:
            raise ValueError(
                f"{type(self).__name__} has no marginal for missing joints (mask_marginals='none'; "
                f"{int((~m).sum())} missing entries); pass all of its {self.num_joints} joints"
            )
        return self._density(x, m, **ctx)

    def _density(self, x: Tensor, mask: Tensor | None, **context: Tensor) -> Tensor:
        """The prior's log-density: the family's, mixed with the broad component when there is one."""
        return self._with_broad(self._log_prob(x, mask, **context), x, mask)

    def _with_broad(self, out: Tensor, x: Tensor, mask: Tensor | None) -> Tensor:
        """The family's log-density ``out`` (B,) of ``x`` mixed with the broad component, when there is one."""
        if self.broad is None:
            return out
        w = self.config.broad_weight
        broad = self.broad.log_prob(x.flatten(1), None if mask is None else mask.repeat_interleave(3, dim=-1))
        return torch.logaddexp(out + math.log1p(-w), broad.to(out.dtype) + math.log(w))

    # ------------------------------------------------------------------ for subclasses
    @abstractmethod
    def _log_prob(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Log-density of ``x`` (B, J, 3) with optional observed mask (B, J); returns (B,)."""

    def _log_prob_per_joint(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Per-joint terms of ``x`` (B, J, 3) with optional observed mask (B, J), 0 where missing; returns (B, J).
        Families with ``per_joint_log_prob = True`` implement it."""
        raise NotImplementedError(f"{type(self).__name__} sets per_joint_log_prob but has no _log_prob_per_joint")

    @abstractmethod
    def _sample(
        self,
        n: int,
        generator: torch.Generator | None,
        temperature: float,
        observed: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        """Samples (n, J, 3), or completions (n, B, J, 3) of ``observed`` (B, J, 3) where ``mask`` (B, J)."""

    @abstractmethod
    def _project(self, x: Tensor, mask: Tensor | None, **kwargs: Any) -> Tensor:
        """Projection of ``x`` (B, J, 3) with optional observed mask (B, J); returns (B, J, 3)."""

    # ------------------------------------------------------------------ context
    @property
    def conditioning_features(self) -> int:
        """Size C of the context vector the prior is conditioned on; 0 (the default) for priors that take none."""
        return 0

    def _check_context(
        self, context: Tensor | None, batch: int, batch_shape: torch.Size | None = None
    ) -> dict[str, Tensor]:
        """The one check of every method's ``context=``: ``{}`` for an unconditioned prior without one, else
        ``{"context": (batch, C) tensor}`` in the prior's dtype, for the family's hooks.

        Args:
            context: What the caller passed.
            batch: Number of poses (or draws) B.
            batch_shape: Their batch shape, when a (*, C) context may match it.

        Raises:
            ValueError: A context for a prior that takes none, none for a conditioned prior, or a wrong shape or
                device.
            TypeError: A context that is no floating-point tensor.
        """
        features = self.conditioning_features
        if context is None:
            if features:
                raise ValueError(
                    f"this {self.model_type} is conditioned on a context of {features} features: pass "
                    f"context= of shape ({batch}, {features}) or (1, {features})"
                )
            return {}
        if not features:
            shape = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(
                f"{type(self).__name__} ({self.model_type!r}) is not conditioned on a context "
                f"(conditioning_features=0), got context= {shape}; drop context= (only a global_flow built with "
                "use_conditioning takes one)"
            )
        if not isinstance(context, Tensor) or not context.is_floating_point():
            got = f"dtype {context.dtype}" if isinstance(context, Tensor) else type(context).__name__
            raise TypeError(f"expected context to be a floating-point tensor, got {got}")
        shape = tuple(context.shape)
        if batch_shape is not None and len(batch_shape) != 1 and shape == (*batch_shape, features):
            context = context.reshape(batch, features)
        elif context.dim() != 2 or shape[1] != features or shape[0] not in (1, batch):
            raise ValueError(
                f"expected context of shape ({batch}, {features}) or (1, {features}) for {batch} poses, got {shape}"
            )
        if context.device != self.device:
            raise ValueError(f"context is on {context.device} but the prior is on {self.device}; move one of them")
        return {"context": context.to(self.dtype).expand(batch, features)}

    # ------------------------------------------------------------------ input handling
    def _prepare(
        self, pose: PoseInput, mask: Tensor | np.ndarray | None, layout: str | None = None
    ) -> tuple[Tensor, Tensor | None, torch.Size]:
        """Normalise any supported input to ``(B, J, 3)`` in the prior's joint order.

        Returns:
            ``(x, mask, batch_shape)``: poses (B, J, 3) in the prior's dtype and device, the observed mask
            (B, J) or ``None`` when every joint is observed, and the input's batch shape.
        """
        x, m, batch_shape, _, _ = self._prepare_full(pose, mask, layout)
        return x, m, batch_shape

    def _own_order(self, pose: Tensor, layout: str | None) -> Tensor | None:
        """``pose`` as (*, J, 3) when it is in the prior's own joint order, else None (see ``layout`` of
        :meth:`log_prob`)."""
        J = self.num_joints
        if layout is not None and layout != PRIOR_LAYOUT:
            try:
                skeleton.resolve_layout(layout)
            except ValueError:
                raise ValueError(
                    f"unknown layout {layout!r}; expected {PRIOR_LAYOUT!r} or one of {sorted(skeleton.LAYOUTS)} "
                    f"(or an alias {sorted(skeleton.LAYOUT_ALIASES)})"
                ) from None
            return None
        if pose.dim() >= 2 and pose.shape[-2:] == (J, 3):
            own = pose
        elif pose.dim() >= 1 and pose.shape[-1] == 3 * J:
            own = pose.reshape(*pose.shape[:-1], J, 3)
        elif layout == PRIOR_LAYOUT:
            raise ValueError(
                f"expected a pose in the prior's own layout of shape (*, {J}, 3) or (*, {3 * J}), "
                f"got {tuple(pose.shape)}"
            )
        else:
            return None
        if layout is None and self._clashing_layouts:
            raise ValueError(
                f"a pose of {J} joints could be in this prior's own joint order (SMPL-X joints {list(self.joints)}) "
                f"or in the layout {list(self._clashing_layouts)} of other joints; pass layout={PRIOR_LAYOUT!r} or "
                f"layout={self._clashing_layouts[0]!r}"
            )
        return own

    def _prepare_full(
        self, pose: PoseInput, mask: Tensor | np.ndarray | None, layout: str | None = None
    ) -> tuple[Tensor, Tensor | None, torch.Size, torch.dtype, Tensor]:
        """:meth:`_prepare`, plus the dtype of results and the poses before the cast to the prior's dtype.

        Returns:
            ``(x, mask, batch_shape, out_dtype, original)``: as :meth:`_prepare`; ``out_dtype`` is
            ``torch.promote_types(input dtype, prior dtype)``, the dtype public methods return; ``original`` is
            ``x`` in the input's own dtype, shape (B, J, 3).
        """
        self._check_precision()
        J = self.num_joints
        if isinstance(pose, np.ndarray):
            pose = from_numpy(pose)
        own = self._own_order(pose, layout) if isinstance(pose, Tensor) else None
        if own is not None:
            x, observed = own, None
        elif isinstance(pose, Tensor) or skeleton.pose_mapping(pose) is not None:
            if layout is not None and not isinstance(pose, Tensor):
                raise ValueError(f"layout= applies to pose tensors, not to a {type(pose).__name__} of pose keys")
            full, observed55 = skeleton.to_smplx(pose, layout=layout, hand=self._default_hand())
            x = full.index_select(-2, self.joint_index.to(full.device))
            observed = observed55.to(self.joint_index.device)[self.joint_index]
            observed = None if bool(observed.all()) else observed
        else:
            raise TypeError(
                f"expected a pose tensor, numpy array, smplx-style dict or smplx ModelOutput, got {type(pose).__name__}"
            )
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point pose tensor, got dtype {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"pose is on {x.device} but the prior is on {self.device}; move one of them")
        batch_shape = x.shape[:-2]
        x = x.reshape(-1, J, 3)
        if x.shape[0] == 0:
            raise ValueError(f"expected at least one pose, got an empty batch of shape {tuple(batch_shape)}")
        original, out_dtype = x, torch.promote_types(x.dtype, self.dtype)
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        m = self._prepare_mask(mask, batch_shape, x.shape[0]) if mask is not None else None
        if observed is not None:
            observed = observed.expand(x.shape[0], J)
            m = observed if m is None else (m & observed)
        if mask is not None:  # the values of missing joints are never read (they may be NaN or anything)
            x = torch.where(m[..., None], x, 0.0)
        # a data-dependent check; skipped under torch.func transforms (vmap, grad), which cannot branch on values
        if _VALIDATE and not in_transform() and not bool(torch.isfinite(x).all()):
            raise ValueError("expected finite pose values (of the observed joints), got NaN or Inf")
        if m is not None and not bool(m.any(-1).all()):
            if mask is None:
                raise ValueError(
                    f"the input has none of the joints this prior models ({self.num_joints} joints: "
                    f"{skeleton.describe_joints(self.joints)}); pass poses that include them"
                )
            raise ValueError("every pose needs at least one observed joint; got a mask that hides all of them")
        return x, m, batch_shape, out_dtype, original

    def _prepare_mask(self, mask: Tensor | np.ndarray, batch_shape: torch.Size, batch: int) -> Tensor:
        if isinstance(mask, np.ndarray):
            mask = from_numpy(mask)
        if not isinstance(mask, Tensor):
            raise TypeError(f"expected a boolean mask tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"expected a boolean mask (True = observed), got dtype {mask.dtype}")
        mask = mask.to(self.device)
        given = tuple(mask.shape)
        J = self.num_joints
        if mask.dim() >= 1 and mask.shape[-1] == skeleton.NUM_JOINTS and J != skeleton.NUM_JOINTS:
            mask = mask.index_select(-1, self.joint_index)
        if mask.dim() == 0 or mask.shape[-1] != J:
            raise ValueError(
                f"expected a mask of shape (J,), (*, J), (55,) or (*, 55) with J={J}, got {tuple(mask.shape)}"
            )
        try:
            mask = mask.expand(*batch_shape, J)
        except RuntimeError:
            raise ValueError(
                f"expected a mask that broadcasts to the pose batch shape {tuple(batch_shape)} (joints last: {J}, or "
                f"55), got shape {given}"
            ) from None
        return mask.reshape(batch, J)

    def _default_hand(self) -> str:
        """Which hand a bare MANO (15-joint) input is taken to be."""
        joints = set(self.joints)
        if joints and joints <= set(skeleton.PARTS["left_hand"]):
            return "left"
        return "right"

    def _so3_correction(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Log-density change from Lebesgue on axis-angle to normalised Haar on SO(3), per pose (B,)."""
        per_joint = LOG_SO3_VOLUME - exp_map_log_abs_det(x)  # (B, J)
        if mask is not None:
            per_joint = per_joint * mask
        return per_joint.sum(-1)


MODEL_TYPES: dict[str, type[PosePrior]] = {}
"""Registered families, ``model_type -> class`` (see :func:`register_model`)."""


def register_model(cls: type[PosePrior]) -> type[PosePrior]:
    """Make a :class:`PosePrior` family loadable by its ``model_type`` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, PosePrior)):
        raise TypeError(f"expected a PosePrior subclass, got {cls!r}")
    MODEL_TYPES[cls.model_type] = cls
    return cls


HAND_PRIOR_HINT = "; for hands without a body, use a hand prior (posepriors.load('hands'))"
"""The end of a body prior's mask error for a pose that observes hands and no body joint."""

ADAPTIVE_MIN_POSES = 16
"""``denoise(adaptive=True)`` warns below this many poses: from 16 poses of one source the SURE blend was never
worse than the plain posterior mean (docs/models.md, "Remedy 4"); on single poses it can be."""


def latent_map(
    decode: Any,
    z0: Tensor,
    target: Tensor,
    mask: Tensor | None,
    noise_std: float,
    steps: int,
    lr: float,
) -> Tensor:
    """MAP in a latent space: minimise ``|decode(z) - target|^2 / (2 s^2)`` (observed joints) ``+ |z|^2 / 2`` by Adam.

    Used by the flows, whose exact densities are too spiky for a robust pose-space MAP: the latent Gaussian is the
    smoother prior. Parameters of the model are not touched (gradients w.r.t. ``z`` only).

    Args:
        decode: Maps latents shaped like ``z0`` to poses (B, J, 3).
        z0: Starting latents.
        target: Observed poses (B, J, 3).
        mask: Observed joints (B, J) or None.
        noise_std: Observation noise (radians).
        steps: Adam steps.
        lr: Adam learning rate.

    Returns:
        The decoded estimate (B, J, 3).
    """
    weight = 1.0 / (2 * noise_std**2)
    observed = mask[..., None].to(target.dtype) if mask is not None else 1.0
    target = target.detach()

    def objective(z: Tensor) -> Tensor:
        return weight * ((decode(z) - target).square() * observed).sum() + 0.5 * z.square().sum()

    z = _adam_argmin(objective, z0, steps, lr)
    with torch.no_grad():
        return decode(z)


def _autograd_copies(stack: contextlib.ExitStack, x: Tensor, m: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Inside ``torch.inference_mode()``: switch it off for the rest of ``stack`` and return copies of the poses and
    the mask (inference tensors cannot enter autograd, which the latent-space loops need); else them as they are."""
    if not torch.is_inference_mode_enabled():
        return x, m
    stack.enter_context(torch.inference_mode(False))
    return x.clone(), (m.clone() if m is not None else None)


def _adam_argmin(objective: Callable[[Tensor], Tensor], start: Tensor, steps: int, lr: float) -> Tensor:
    """The MAP optimiser loop that every latent-space MAP shares: ``steps`` Adam steps on ``objective(z)`` (a scalar)
    from ``start``.

    Gradients are taken w.r.t. ``z`` only (``torch.autograd.grad``), so the model's parameters are neither changed
    nor given ``.grad``; autograd is switched on locally, so it works inside ``torch.no_grad()`` too.

    Returns:
        The final ``z``, detached, shaped like ``start``.
    """
    with torch.enable_grad(), _numba_spline.one_path(steps):
        z = start.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            (z.grad,) = torch.autograd.grad(objective(z), [z])
            optimizer.step()
    return z.detach()


def _check_count(n: Any) -> int:
    """A number of samples: a Python or NumPy integer >= 1 (not a bool)."""
    if not isinstance(n, bool | np.bool_):
        try:
            count = operator.index(n)
        except TypeError:
            count = None
        if count is not None and count >= 1:
            return count
    raise ValueError(f"expected a number of samples n >= 1 (an integer), got {n!r}")


def _check_generator(generator: Any) -> None:
    """``generator`` must be None or a ``torch.Generator``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"expected generator to be None or a torch.Generator (e.g. torch.Generator().manual_seed(0)), "
            f"got {generator!r} ({type(generator).__name__})"
        )


def _check_noise_std(noise_std: Any) -> float:
    """The MAP denoiser's noise level: a finite real number > 0."""
    value = _real("noise_std", noise_std)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"expected a finite noise_std > 0 (radians), got {noise_std!r}")
    return value


def _check_temperature(temperature: Any) -> float:
    """The sampling temperature: a finite real number >= 0."""
    t = _real("temperature", temperature)
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"expected a finite temperature >= 0, got {temperature!r}")
    return t


def select_rows(t: Tensor | None, rows: Tensor | None) -> Tensor | None:
    """The rows ``rows`` of a per-pose tensor ``t`` (all of them for None; a one-row context is shared and kept)."""
    if t is None or rows is None or t.shape[0] == 1:
        return t
    return t.index_select(0, rows)


def _rows_of(ctx: Mapping[str, Tensor], rows: Tensor | None) -> dict[str, Tensor]:
    """The context keyword arguments of the poses ``rows`` (all of them for None)."""
    return {k: select_rows(v, rows) for k, v in ctx.items()}


def split_batch(
    flags: Tensor, when_set: Callable[[Tensor | None], Tensor], when_clear: Callable[[Tensor | None], Tensor]
) -> Tensor:
    """``when_set(rows)`` on the poses whose flag (B,) is set and ``when_clear(rows)`` on the others, merged in the
    batch's order (B, ...): each pose's result from its own route, whatever the rest of the batch. ``rows`` is None
    when one route takes the whole batch (read it with :func:`select_rows`)."""
    if bool(flags.all()):
        return when_set(None)
    if not bool(flags.any()):
        return when_clear(None)
    set_rows, clear_rows = flags.nonzero().squeeze(-1), (~flags).nonzero().squeeze(-1)
    first, second = when_set(set_rows), when_clear(clear_rows)
    out = first.new_zeros(flags.shape[0], *first.shape[1:])
    return out.index_copy(0, set_rows, first).index_copy(0, clear_rows, second)


def body_latent_input(value: Any, code: bool, prior: PosePrior) -> tuple[Tensor, torch.dtype]:
    """The argument of a ``body_latent()`` map checked and cast: body poses (B, 21, 3) or (B, 63) as (B, 21, 3)
    (``code=False``), or body codes (B, 63) (``code=True``), in the prior's dtype; and the argument's own dtype, in
    which the map returns its result."""
    what, shapes = ("body codes", "(B, 63)") if code else ("body poses", "(B, 21, 3) or (B, 63)")
    value = float_tensor(value, f"{what} of shape {shapes}", prior)
    if value.dim() == 2 and value.shape[1] == 63:
        value = value if code else value.reshape(-1, 21, 3)
    elif code or value.dim() != 3 or value.shape[1:] != (21, 3):
        raise ValueError(f"expected {what} of shape {shapes}, got {tuple(value.shape)}")
    return value.to(prior.dtype), value.dtype


def float_tensor(value: Any, what: str, prior: PosePrior) -> Tensor:
    """``value``, a float tensor or NumPy array on the prior's device, as a tensor; else a clear error naming
    ``what`` (for the arguments of the public methods that do not take every pose format)."""
    value = skeleton.as_float_tensor(value, what)
    if value.device != prior.device:
        raise ValueError(f"expected {what} on the prior's device {prior.device}, got {value.device}")
    return value


def tempered_weight(w: float, temperature: float) -> float:
    """The weight of a mixture component of weight ``w`` (against ``1 - w``) at a sampling temperature:
    ``w^b / (w^b + (1 - w)^b)`` with ``b = 1 / temperature^2``; ``w`` at 1, the heavier component alone at 0."""
    if w <= 0 or w >= 1:
        return float(w)
    if temperature == 0:
        return 0.0 if w < 0.5 else (1.0 if w > 0.5 else 0.5)
    d = (math.log1p(-w) - math.log(w)) / temperature**2  # log((1 - w)^b / w^b)
    return 0.0 if d > 700 else 1.0 / (1.0 + math.exp(d))


def _real(name: str, value: Any) -> float:
    """``value`` as a float when it is a real number (or a one-element tensor), else a TypeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real | Tensor):
        raise TypeError(f"expected {name} to be a number, got {value!r} ({type(value).__name__})")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as err:  # e.g. a tensor of several values
        raise TypeError(f"expected {name} to be a number, got {value!r}") from err


_OPTION_CHECKS: dict[str, tuple[str, Any]] = {
    "steps": ("an integer >= 0", lambda v: not isinstance(v, bool) and isinstance(v, numbers.Integral) and v >= 0),
    "lr": ("a finite number > 0", lambda v: math.isfinite(_real("lr", v)) and _real("lr", v) > 0),
    "max_sigma": ("a finite number > 0", lambda v: math.isfinite(_real("max_sigma", v)) and _real("max_sigma", v) > 0),
    "shrink": ("a number in [0, 1]", lambda v: 0 <= _real("shrink", v) <= 1),
    "keep_observed": ("True or False", lambda v: isinstance(v, bool | np.bool_)),
}
"""Checks of the projection options that several families share: what each must be, and the test."""
