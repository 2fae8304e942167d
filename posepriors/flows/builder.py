"""``build_flow``: the standard coupling flow of the flow priors, and the settings their configs carry."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from posepriors.flows.couplings import AffineCoupling, RQSplineCoupling
from posepriors.flows.linear import ActNorm, LULinear, Permutation
from posepriors.flows.sequence import FlowSequence

__all__ = ["FLOW_SETTINGS", "build_flow", "check_flow_settings", "flow_settings"]


def _coupling_masks(dim: int, num_layers: int) -> list[Tensor]:
    """Per-layer conditioning masks: single dims in turn for D <= 3, else the first and second half alternately."""
    dims = torch.arange(dim)
    if dim <= 3:
        return [dims == layer % dim for layer in range(num_layers)]
    half = dims < dim // 2
    return [half if layer % 2 == 0 else ~half for layer in range(num_layers)]


FLOW_SETTINGS = ("hidden", "num_layers", "num_hidden_layers", "coupling", "mixing", "bins", "bound")
"""The :func:`build_flow` settings that the flow priors' configs carry under the same names."""


def flow_settings(config: object) -> dict[str, object]:
    """The :data:`FLOW_SETTINGS` of a config object, as keyword arguments of :func:`build_flow`."""
    return {name: getattr(config, name) for name in FLOW_SETTINGS}


def check_flow_settings(
    *, hidden: int, num_layers: int, num_hidden_layers: int, coupling: str, mixing: str, bins: int, bound: float
) -> None:
    """Raise ``ValueError`` naming the first setting of :func:`build_flow` that is out of range.

    The priors' config dataclasses call this at construction, so a bad flag fails before any model is built.
    """
    for name, value in (("hidden", hidden), ("num_layers", num_layers), ("num_hidden_layers", num_hidden_layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"expected {name} to be an integer >= 1, got {value!r}")
    if coupling not in ("affine", "spline"):
        raise ValueError(f"expected coupling 'affine' or 'spline', got {coupling!r}")
    if mixing not in ("lu", "permutation", "none"):
        raise ValueError(f"expected mixing 'lu', 'permutation' or 'none', got {mixing!r}")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"expected bins to be an integer >= 2, got {bins!r}")
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"expected a finite bound > 0, got {bound!r}")


def build_flow(
    groups: int,
    dim: int,
    *,
    num_layers: int,
    hidden: int,
    coupling: str = "affine",
    context_features: int = 0,
    actnorm: bool = True,
    mixing: str = "lu",
    num_hidden_layers: int = 2,
    bins: int = 8,
    bound: float = 4.0,
    activation: str = "silu",
    seed: int = 0,
) -> FlowSequence:
    """A standard coupling flow: ``num_layers`` x ([ActNorm] -> mixing -> coupling).

    Masks: for D <= 3 the couplings condition on one dim in turn (``[T,F,F]``, ``[F,T,F]``, ``[F,F,T]``, ...), which
    visits every split of the dims; for D > 3 on the first half and the second half alternately, so each pair of
    layers transforms every dim. Mixing: ``"lu"`` a learned :class:`LULinear` before every coupling (starting at a
    random permutation from ``seed + layer``); ``"permutation"`` a fixed random :class:`Permutation` before every
    second coupling for D > 3 (the next coupling then conditions on the other half, so each pair of layers still
    transforms every dim), and none for D <= 3, whose mask cycle already visits every split; ``"none"`` just the
    alternating masks.

    Args:
        groups: Number of groups G.
        dim: Dimension per group D (>= 2).
        num_layers: Number of coupling layers (>= 1).
        hidden: Conditioner width.
        coupling: ``"affine"`` or ``"spline"`` (rational-quadratic).
        context_features: Context features per group (0: none).
        actnorm: Put an :class:`ActNorm` before each layer.
        mixing: ``"lu"``, ``"permutation"`` or ``"none"``.
        num_hidden_layers: Conditioner depth.
        bins: Spline bins.
        bound: Spline interval half-width.
        activation: Conditioner activation.
        seed: Seed of the fixed permutations.

    Returns:
        The flow.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"expected dim to be an integer >= 2 for a coupling flow, got {dim!r}")
    check_flow_settings(
        hidden=hidden,
        num_layers=num_layers,
        num_hidden_layers=num_hidden_layers,
        coupling=coupling,
        mixing=mixing,
        bins=bins,
        bound=bound,
    )
    blocks: list[nn.Module] = []
    for layer, mask in enumerate(_coupling_masks(dim, num_layers)):
        if actnorm:
            blocks.append(ActNorm(groups, dim))
        if mixing == "lu":
            blocks.append(LULinear(groups, dim, seed=seed + layer))
        elif mixing == "permutation" and dim > 3 and layer % 2 == 0:
            blocks.append(Permutation(dim, seed=seed + layer))
        if coupling == "affine":
            block: nn.Module = AffineCoupling(
                groups, dim, mask, hidden, num_hidden_layers, context_features, activation=activation
            )
        else:
            block = RQSplineCoupling(
                groups, dim, mask, hidden, num_hidden_layers, context_features, bins, bound, activation
            )
        blocks.append(block)
    return FlowSequence(blocks, groups, dim)
