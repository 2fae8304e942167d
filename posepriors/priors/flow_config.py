"""The settings that both flow families (``joint_flow``, ``global_flow``) share: :class:`FlowConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from posepriors.flows import check_flow_settings, flow_settings
from posepriors.priors.base import PriorConfig

__all__ = ["FlowConfig"]


@dataclass(frozen=True)
class FlowConfig(PriorConfig):
    """Settings of a coupling flow (:func:`posepriors.flows.build_flow`), shared by the flow families' configs.

    Each family subclasses it and sets its own defaults (``joint_flow``: small spline flows per joint;
    ``global_flow``: one wide affine flow); the values here are the ones the families have in common.

    Attributes:
        hidden: Width of the coupling conditioners.
        num_layers: Coupling layers (per joint for ``joint_flow``, per part for ``global_flow``; the seed's K).
        num_hidden_layers: Hidden layers per conditioner.
        coupling: ``"affine"`` or ``"spline"`` (rational-quadratic).
        mixing: ``"lu"`` (learned LU-decomposed linear), ``"permutation"`` or ``"none"``.
        actnorm: ActNorm before every layer (initialised from data).
        bins: Spline bins.
        bound: Spline interval half-width, in ActNorm-standardised units (identity outside).
    """

    hidden: int = 128
    num_layers: int = 4
    num_hidden_layers: int = 1
    coupling: str = "spline"
    mixing: str = "lu"
    actnorm: bool = True
    bins: int = 8
    bound: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_flow_settings(**flow_settings(self))
