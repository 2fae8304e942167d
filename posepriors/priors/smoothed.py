"""A smoothed body density for posterior-mean denoising: Tweedie's formula instead of MAP on a sharp density.

For poses observed with Gaussian noise of std ``s`` on every axis-angle coordinate, ``y = x + s n``, the posterior
mean (the estimator of least squared error) is Tweedie's formula

    E[x | y] = y + s^2 grad_y log p_s(y),

where ``p_s`` is the density of the *noisy* poses. :class:`SmoothedBody` models ``p_s`` of the 21 body joints
directly: an equally weighted ensemble of spline flows, each trained by maximum likelihood on mirrored training
poses with fresh noise of std ``s`` (:meth:`SmoothedBody.fit`), on coordinates pre-scaled by
``(y - m) / sqrt(v + s^2)`` (m, v: per-coordinate mean and variance of the clean training poses; an exact change of
variables that gives the flows unit-variance input). One gradient per pose, no sampling, no optimisation; exact
only at the noise level it was trained for. A prior with one (``smoothed_noise_std > 0`` in its config) uses it in
:meth:`~posepriors.priors.base.PosePrior.denoise` at that level.

Why not MAP: the shipped flows' densities are sharp, and the MAP of a sharp density sits in a spike near the
noisy pose instead of near the truth (docs/models.md, "Why the flows lose at fitting and denoising").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from posepriors import skeleton
from posepriors.flows import FlowSequence, build_flow
from posepriors.flows.sequence import ensemble_log_prob

__all__ = ["SmoothedBody"]

BODY = skeleton.PARTS["body"]
BODY_DIM = 3 * len(BODY)


class SmoothedBody(nn.Module):
    """``log p_s(y)`` of noisy body poses (B, 63): an ensemble of body flows on pre-scaled coordinates.

    Args:
        noise_std: The noise std ``s`` (radians) that the density includes.
        members: Flows in the ensemble (the density is their equally weighted mixture).
        hidden: Conditioner width of every flow.
        num_layers: Coupling layers of every flow (rational-quadratic splines, 4 bins, LU mixing, ActNorm).
    """

    def __init__(self, noise_std: float, members: int, hidden: int, num_layers: int) -> None:
        super().__init__()
        if not 0 < noise_std < math.inf:
            raise ValueError(f"expected 0 < noise_std < inf, got {noise_std!r}")
        if members < 1:
            raise ValueError(f"expected members >= 1, got {members}")
        self.noise_std = float(noise_std)
        self.flows = nn.ModuleList(
            build_flow(
                1,
                BODY_DIM,
                num_layers=num_layers,
                hidden=hidden,
                coupling="spline",
                bins=4,
                num_hidden_layers=1,
                seed=1000 + k,
            )
            for k in range(members)
        )
        self.register_buffer("mean", torch.zeros(BODY_DIM))
        self.register_buffer("var", torch.ones(BODY_DIM))

    def _scale(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """The flows' input (B, 1, 63) and the pre-scaling's log-determinant ()."""
        std = (self.var.to(y.dtype) + self.noise_std**2).sqrt()
        return ((y - self.mean.to(y.dtype)) / std).unsqueeze(1), -std.log().sum()

    def log_prob(self, y: Tensor, members: int | None = None) -> Tensor:
        """Log-density of noisy body poses, (B, 63) -> (B,): the equal mixture of the first ``members`` flows
        (None: all of them)."""
        if y.dim() != 2 or y.shape[1] != BODY_DIM:
            raise ValueError(f"expected noisy body poses of shape (B, {BODY_DIM}), got {tuple(y.shape)}")
        flows = self.flows[: self._members(members)]
        u, logdet = self._scale(y)
        terms = ensemble_log_prob(list(flows), u)  # (B, members)
        return torch.logsumexp(terms, dim=-1) - math.log(len(flows)) + logdet

    def _members(self, members: int | None) -> int:
        if members is None:
            return len(self.flows)
        if isinstance(members, bool) or not isinstance(members, int) or not 1 <= members <= len(self.flows):
            raise ValueError(f"expected members between 1 and {len(self.flows)} (or None: all), got {members!r}")
        return members

    def posterior_mean(self, y: Tensor, log_prob: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Tweedie's formula ``y + s^2 grad log p_s(y)`` for noisy body poses (B, 63) -> (B, 63).

        Args:
            y: Noisy body poses (noise std :attr:`noise_std`).
            log_prob: The density of noisy poses to differentiate (default: :meth:`log_prob`); a prior passes its
                mixture with the broad component here.
        """
        with torch.enable_grad():
            point = y.detach().clone().requires_grad_(True)
            (score,) = torch.autograd.grad((log_prob or self.log_prob)(point).sum(), point)
        return y + self.noise_std**2 * score

    def fit(
        self,
        pose: Tensor,
        *,
        epochs: int = 60,
        batch_size: int = 512,
        learning_rate: float = 1e-3,
        seed: int = 0,
        progress: Callable[[str], None] | None = None,
    ) -> list[float]:
        """Train every flow of the ensemble on clean body poses with fresh noise of std :attr:`noise_std`.

        Each batch is mirrored left-right with probability 1/2 per pose (:func:`posepriors.skeleton.mirror_pose`);
        Adam with a cosine schedule and gradient clipping at norm 1. Member ``k`` draws from seed ``seed + k``.

        Args:
            pose: Clean training body poses, shape (N, 21, 3), on the module's device.
            epochs: Passes over the data per flow.
            batch_size: Poses per step.
            learning_rate: Adam's initial learning rate.
            seed: Seed of the first member's draws (shuffling, mirroring, noise, ActNorm batch).
            progress: Called with a line every 10 epochs and after the last (e.g. ``print``), or None.

        Returns:
            The last epoch's mean training loss (nats per pose, in pre-scaled coordinates) of every member.
        """
        if pose.dim() != 3 or pose.shape[1:] != (len(BODY), 3):
            raise ValueError(f"expected clean body poses of shape (N, {len(BODY)}, 3), got {tuple(pose.shape)}")
        if epochs < 1 or batch_size < 1 or not learning_rate > 0:
            raise ValueError(
                f"expected epochs >= 1, batch_size >= 1 and learning_rate > 0, got {epochs}, {batch_size}, "
                f"{learning_rate}"
            )
        pose = pose.to(device=self.mean.device, dtype=self.mean.dtype)
        both = torch.cat([pose, skeleton.mirror_pose(pose, BODY)]).flatten(1)
        self.mean.copy_(both.mean(0))
        self.var.copy_(both.var(0))
        losses = []
        for k, flow in enumerate(self.flows):
            losses.append(self._fit_member(k, flow, pose, epochs, batch_size, learning_rate, seed + k, progress))
        return losses

    def _fit_member(
        self,
        k: int,
        flow: FlowSequence,
        pose: Tensor,
        epochs: int,
        batch_size: int,
        learning_rate: float,
        seed: int,
        progress: Callable[[str], None] | None,
    ) -> float:
        generator = torch.Generator().manual_seed(seed)
        device = pose.device

        def noisy(rows: Tensor) -> Tensor:
            x = pose[rows.to(device)]
            flip = (torch.rand(len(rows), generator=generator) < 0.5).to(device)
            x = torch.where(flip[:, None, None], skeleton.mirror_pose(x, BODY), x).flatten(1)
            noise = torch.randn(x.shape, generator=generator).to(device=device, dtype=x.dtype)
            return self._scale(x + self.noise_std * noise)[0]

        flow.train().requires_grad_(True)
        with torch.no_grad():
            flow.initialize(noisy(torch.randperm(len(pose), generator=generator)[: 4 * batch_size]))
        optimizer = torch.optim.Adam(flow.parameters(), lr=learning_rate)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * math.ceil(len(pose) / batch_size))
        mean_loss = math.nan
        for epoch in range(epochs):
            total, count = 0.0, 0
            for rows in torch.randperm(len(pose), generator=generator).split(batch_size):
                loss = -flow.log_prob(noisy(rows)).mean()
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(flow.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                total, count = total + loss.item() * len(rows), count + len(rows)
            mean_loss = total / count
            if progress is not None and ((epoch + 1) % 10 == 0 or epoch + 1 == epochs):
                progress(f"smoothed member {k + 1}/{len(self.flows)}, epoch {epoch + 1}/{epochs}: loss {mean_loss:.3f}")
        flow.eval().requires_grad_(False)
        return mean_loss

    def extra_repr(self) -> str:
        return f"noise_std={self.noise_std}, members={len(self.flows)}"
