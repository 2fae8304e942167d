"""Per-joint diagonal Gaussian prior: the baseline every other family must beat."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor, nn

from posepriors.priors.base import PosePrior, PriorConfig
from posepriors.priors.draws import randn
from posepriors.utils import LOG_2PI, float64_device

__all__ = ["GaussianConfig", "GaussianPrior"]


@dataclass(frozen=True)
class GaussianConfig(PriorConfig):
    """Settings of :class:`GaussianPrior`.

    Attributes:
        joints: Modelled SMPL-X joints (see :class:`~posepriors.priors.base.PriorConfig`).
        min_std: Floor on every standard deviation (radians), so that joints that never move in the data
            (eyes, static jaws) do not get infinite densities.
    """

    min_std: float = 1e-2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.min_std) and self.min_std > 0):
            raise ValueError(f"expected a finite min_std > 0, got {self.min_std}")


class GaussianPrior(PosePrior):
    """Independent Gaussian over every axis-angle coordinate of every modelled joint.

    ``log_prob`` is exact, masks give exact marginals (missing joints are dropped), ``sample`` draws
    ``mean + temperature * std * eps`` and ``project`` clamps each coordinate to ``mean ± max_sigma * std``
    (missing joints take the mean, their conditional mean under independence). Parameters: ``mean`` and
    ``log_std`` of shape (J, 3).
    """

    model_type = "gaussian"
    config_class = GaussianConfig
    per_joint_log_prob = True
    exact_posterior_mean = True
    training_defaults = MappingProxyType(
        {"learning_rate": 1e-2, "scheduler": "step", "step_size": 30, "max_epochs": 20, "batch_size": 1024}
    )
    seed_batch_size = 32

    def __init__(self, config: GaussianConfig | None = None) -> None:
        super().__init__(config if config is not None else GaussianConfig())
        self.mean = nn.Parameter(torch.zeros(self.num_joints, 3))
        self.log_std = nn.Parameter(torch.full((self.num_joints, 3), math.log(0.2)))

    @property
    def std(self) -> Tensor:
        """Standard deviations with the floor applied, shape (J, 3)."""
        return self.log_std.exp().clamp_min(self.config.min_std)

    @torch.no_grad()
    def fit(self, pose: Tensor, observed: Tensor | None = None) -> GaussianPrior:
        """Closed-form maximum-likelihood fit (per-coordinate mean and std, std floored).

        Args:
            pose: Training poses in the prior's joint order, shape (N, J, 3).
            observed: Optional mask of the joints each pose observes, shape (N, J); each joint's statistics use
                only the poses that observe it (body and hand data sets can be combined this way).

        Returns:
            ``self``, for chaining.
        """
        if pose.dim() != 3 or pose.shape[1:] != (self.num_joints, 3):
            raise ValueError(f"expected poses of shape (N, {self.num_joints}, 3), got {tuple(pose.shape)}")
        pose = pose.to(device=float64_device(self.mean.device), dtype=torch.float64)
        if not bool(torch.isfinite(pose).all()):
            raise ValueError("expected finite training poses, got NaN or Inf values; drop those frames first")
        if observed is None:
            observed = torch.ones(pose.shape[:2], dtype=torch.bool, device=pose.device)
        elif observed.shape != pose.shape[:2] or observed.dtype != torch.bool:
            raise ValueError(
                f"expected a boolean observed mask of shape {tuple(pose.shape[:2])}, "
                f"got {observed.dtype} {tuple(observed.shape)}"
            )
        weight = observed.to(device=pose.device, dtype=torch.float64)[..., None]  # (N, J, 1)
        count = weight.sum(0)
        if bool((count < 2).any()):
            names = [self.joint_names[j] for j in torch.nonzero(count[:, 0] < 2).flatten().tolist()]
            raise ValueError(f"expected at least 2 poses observing every joint to fit a Gaussian; too few for {names}")
        mean = (pose * weight).sum(0) / count
        var = ((pose - mean).square() * weight).sum(0) / count
        self.mean.copy_(mean.to(self.mean.dtype))
        self.log_std.copy_(var.sqrt().clamp_min(self.config.min_std).log().to(self.log_std.dtype))
        return self

    initialize_from_data = fit

    def _log_prob(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return self._log_prob_per_joint(x, mask).sum(-1)

    def _log_prob_per_joint(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Per-joint log-density (B, J) (the Gaussian factorises over joints); missing joints get 0."""
        std = self.std
        lp = (-0.5 * (((x - self.mean) / std).square() + LOG_2PI) - std.log()).sum(-1)
        return lp if mask is None else lp * mask.to(lp.dtype)

    def _sample(
        self,
        n: int,
        generator: torch.Generator | None,
        temperature: float,
        observed: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        shape = (n, self.num_joints, 3) if observed is None else (n, *observed.shape)
        eps = randn(shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + temperature * self.std * eps

    def _map_project(self, x: Tensor, mask: Tensor | None, noise_std: float) -> Tensor:
        """Closed-form MAP (the Wiener filter per coordinate); missing joints take the mean."""
        var = self.std.square()
        out = (x * var + self.mean * noise_std**2) / (var + noise_std**2)
        if mask is not None:
            out = torch.where(mask[..., None], out, self.mean.expand_as(out))
        return out

    def _project(self, x: Tensor, mask: Tensor | None, max_sigma: float = 2.0) -> Tensor:
        """Clamp to ``mean ± max_sigma * std``; missing joints take the mean."""
        if not max_sigma >= 0:
            raise ValueError(f"expected max_sigma >= 0, got {max_sigma}")
        std = self.std
        out = torch.minimum(torch.maximum(x, self.mean - max_sigma * std), self.mean + max_sigma * std)
        if mask is not None:
            out = torch.where(mask[..., None], out, self.mean.expand_as(out))
        return out
