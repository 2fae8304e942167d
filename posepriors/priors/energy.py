"""The fitting energy: the regulariser a prior recommends for fits, next to its exact density.

A prior's NLL is the right score of a pose, and not always the right regulariser of a fit: the shipped flows'
densities are sharp (docs/models.md, "Why the flows lose at fitting and denoising"), so a fit regularised by them
settles into spikes near wherever it starts. A prior that carries a *fitting energy* (``energy_gaussian_weight > 0``
in its config) offers :meth:`~posepriors.priors.base.PosePrior.energy`, an unnormalised negative log-density of
the body made of two experts,

    E(x) = -(1 - lam) log p_s(b) - lam log N(b; mu, Sigma)  -  log p(rest | b),

with ``b`` the 21 body joints (63-D), ``p_s`` the prior's smoothed body density (mixed with its broad component,
as :meth:`~posepriors.priors.base.PosePrior.denoise` uses it; the exact body marginal for a prior without one),
``N`` a full-covariance Gaussian of the body (:class:`BodyGaussian`, fitted in closed form on the training poses),
and ``lam = energy_gaussian_weight``. The last term is the exact conditional NLL of the other observed joints
(hands) given the body, absent for a body-only input. The product of the two experts is smooth where ``p_s`` is
(no spikes) and as correlated as the Gaussian (a hidden limb follows the rest); their weights sum to one, so the
usual MAP weight of the prior term still applies. Measured in ``benchmarks/fitting.py``: docs/models.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from posepriors.utils import LOG_2PI, floor_eigenvalues, to_float64

__all__ = ["BodyGaussian"]


class BodyGaussian(nn.Module):
    """A full-covariance Gaussian ``N(mu, Sigma)`` over ``dim`` coordinates, held as buffers (no parameters).

    Stored as the mean and the whitening matrix ``A`` (upper triangular, ``A A^T = Sigma^-1``), so that
    ``log N(v) = -|(v - mu) A|^2 / 2 + log |det A| - dim log(2 pi) / 2`` is one matrix product.

    Args:
        dim: Number of coordinates (63 for the body).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"expected an integer dim >= 1, got {dim!r}")
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("whiten", torch.eye(dim))

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    @torch.no_grad()
    def fit(self, x: Tensor, *, min_std: float) -> BodyGaussian:
        """Closed-form maximum-likelihood fit under the floor ``Sigma >= min_std^2 I``: the data's mean and
        covariance (1/N) with the eigenvalues below ``min_std^2`` raised to it, as ``gaussian_full`` fits.

        Args:
            x: Training coordinates, shape (N, dim), N >= 2.
            min_std: The floor (radians, > 0).

        Returns:
            ``self``, for chaining.
        """
        if x.dim() != 2 or x.shape[1] != self.dim or x.shape[0] < 2:
            raise ValueError(f"expected at least 2 training rows of shape (N, {self.dim}), got {tuple(x.shape)}")
        if not (math.isfinite(min_std) and min_std > 0):
            raise ValueError(f"expected a finite min_std > 0, got {min_std!r}")
        x = to_float64(x)  # on the CPU for MPS, which has no float64
        mean = x.mean(0)
        cov = floor_eigenvalues((x - mean).transpose(0, 1) @ (x - mean) / x.shape[0], min_std**2)
        eye = torch.eye(self.dim, dtype=torch.float64, device=x.device)
        # Sigma = L L^T  ->  Sigma^-1 = L^-T L^-1, so A = L^-T (upper triangular) whitens: (v - mu) A ~ N(0, I)
        inverse = torch.linalg.solve_triangular(torch.linalg.cholesky(cov), eye, upper=False)
        self.mean.copy_(mean.to(self.mean.dtype))
        self.whiten.copy_(inverse.transpose(0, 1).to(self.whiten.dtype))
        return self

    def log_prob(self, v: Tensor) -> Tensor:
        """Log-density of rows, shape (B, dim) -> (B,), in the input's dtype."""
        if v.dim() != 2 or v.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape (B, {self.dim}), got {tuple(v.shape)}")
        whiten = self.whiten.to(v.dtype)
        z = (v - self.mean.to(v.dtype)) @ whiten
        log_det = whiten.diagonal().abs().log().sum()
        return -0.5 * z.square().sum(-1) + log_det - 0.5 * self.dim * LOG_2PI

    def conditional(self, v: Tensor, observed: Tensor) -> tuple[Tensor, Tensor]:
        """The Gaussian of the missing coordinates given the observed ones, in float64 (on the CPU for MPS).

        Args:
            v: Rows, shape (B, dim) (values at missing coordinates are not read).
            observed: Which coordinates are observed, shape (dim,) bool, the same for every row.

        Returns:
            The conditional means (B, m) and the upper triangular ``U`` (m, m) with ``U^T U`` the conditional
            precision, so that ``mean + solve(U, eps)`` with ``eps ~ N(0, I)`` draws from the conditional.
        """
        whiten, mean = to_float64(self.whiten), to_float64(self.mean)
        precision = whiten @ whiten.transpose(0, 1)
        obs = observed.to(whiten.device)
        mis = ~obs
        upper = torch.linalg.cholesky(precision[mis][:, mis], upper=True)
        diff = to_float64(v)[:, obs] - mean[obs]
        shift = torch.cholesky_solve(precision[mis][:, obs] @ diff.transpose(0, 1), upper, upper=True)
        return mean[mis] - shift.transpose(0, 1), upper

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
