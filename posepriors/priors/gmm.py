"""Gaussian-mixture pose prior, the format of SMPLify's classic fitting prior (the baseline to beat).

posepriors does not ship SMPLify's mixture (it is under a non-commercial MPI licence); users who have the file load
it with :meth:`GMMPrior.from_smplify`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from posepriors import skeleton
from posepriors.priors.base import PosePrior, PriorConfig, randn

__all__ = ["GMMConfig", "GMMPrior"]


@dataclass(frozen=True)
class GMMConfig(PriorConfig):
    """Settings of :class:`GMMPrior`.

    Attributes:
        joints: Modelled SMPL-X joints.
        num_components: Number of mixture components.
        min_std: Isotropic floor added to every covariance (``+ min_std^2 I``), so that a component cannot
            collapse onto a few training poses (the classic degeneracy of mixture likelihoods).
    """

    num_components: int = 8
    min_std: float = 1e-2


class GMMPrior(PosePrior):
    """Mixture of full-covariance Gaussians over the axis-angle coordinates of the modelled joints.

    ``log_prob`` is exact and masks give exact marginals (Gaussian marginals of each component). ``project`` is
    the per-component Wiener filter ``mu + S (S + s^2 I)^-1 (x - mu)`` of the most responsible component, the
    posterior mean under Gaussian noise of std ``noise_std`` (missing joints take the conditional mean).
    """

    model_type = "gmm"
    config_class = GMMConfig

    def __init__(self, config: GMMConfig | None = None) -> None:
        super().__init__(config if config is not None else GMMConfig())
        K, D = self.config.num_components, self.dim
        self.means = nn.Parameter(torch.zeros(K, D))
        self.tril_lower = nn.Parameter(torch.zeros(K, D, D))  # strictly lower part of the Cholesky factors
        self.log_diag = nn.Parameter(torch.zeros(K, D))  # log of their diagonals: always a valid factor
        self.logits = nn.Parameter(torch.zeros(K))

    @property
    def scale_tril(self) -> Tensor:
        """The learned factors ``L`` (K, D, D); the covariances are ``L L^T + min_std^2 I``."""
        return self.tril_lower.tril(-1) + torch.diag_embed(self.log_diag.exp())

    def covariance(self) -> Tensor:
        """Component covariances in float64, shape (K, D, D)."""
        tril = self.scale_tril.double()
        eye = torch.eye(self.dim, dtype=torch.float64, device=tril.device)
        return tril @ tril.transpose(-1, -2) + self.config.min_std**2 * eye

    @torch.no_grad()
    def _set_covariances(self, cov: Tensor) -> None:
        tril = torch.linalg.cholesky(cov)
        self.tril_lower.copy_(tril.tril(-1))
        self.log_diag.copy_(tril.diagonal(dim1=-2, dim2=-1).log())

    @torch.no_grad()
    def initialize_from_data(self, pose: Tensor) -> None:
        """Means at random data poses (fixed seed), every covariance the data's (regularised)."""
        flat = pose.reshape(pose.shape[0], -1).to(self.means.dtype)
        pick = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(0))[: self.config.num_components]
        self.means.copy_(flat[pick.to(flat.device)])
        cov = torch.cov(flat.T) + 1e-4 * torch.eye(flat.shape[1], device=flat.device, dtype=flat.dtype)
        self._set_covariances(cov.expand(self.config.num_components, -1, -1))
        self.logits.zero_()

    @classmethod
    def from_smplify(cls, path: str | os.PathLike, joints: str = "body") -> GMMPrior:
        """Load SMPLify's mixture (``means`` (K, 69), ``covars`` (K, 69, 69), ``weights`` (K,)) over SMPL joints
        1..23, marginalised to the requested SMPL-X joints (a subset of the body joints 1..21).

        Args:
            path: The ``.npz`` file (e.g. ``gmm_08.npz`` converted from SMPLify's pickle).
            joints: Part spec of the modelled joints; must lie within the 21 body joints.

        Returns:
            The prior (float32, eval mode).
        """
        data = np.load(path, allow_pickle=False)
        missing = {"means", "covars", "weights"} - set(data.files)
        if missing:
            raise ValueError(f"expected keys means, covars, weights in {path}, missing {sorted(missing)}")
        means, covars, weights = data["means"], data["covars"], data["weights"]
        K, D = means.shape
        if D != 69 or covars.shape != (K, 69, 69) or weights.shape != (K,):
            raise ValueError(
                f"expected SMPLify's GMM with means (K, 69), covars (K, 69, 69), weights (K,) in {path}, "
                f"got {means.shape}, {covars.shape}, {weights.shape}"
            )
        config = GMMConfig(joints=joints, num_components=K, min_std=0.0)
        if not set(config.joints) <= set(skeleton.PARTS["body"]):
            raise ValueError(f"SMPLify's GMM covers the body joints 1..21 only, got joints {config.joints}")
        dims = torch.tensor([3 * (j - 1) + c for j in config.joints for c in range(3)])
        prior = cls(config)
        cov = torch.from_numpy(covars)[:, dims][:, :, dims]
        with torch.no_grad():
            prior.means.copy_(torch.from_numpy(means)[:, dims])
            prior._set_covariances(cov.float())
            prior.logits.copy_(torch.from_numpy(weights).log())
        return prior.eval().requires_grad_(False)

    def _components(self, dims: Tensor | None) -> tuple[Tensor, Tensor]:
        """Means (K, d) and Cholesky factors (K, d, d) of the marginal over ``dims`` (all when None)."""
        cov = self.covariance()  # float64: a float32 Cholesky of an ill-conditioned block can fail
        if dims is None:
            return self.means, torch.linalg.cholesky(cov).to(self.means.dtype)
        return self.means[:, dims], torch.linalg.cholesky(cov[:, dims][:, :, dims]).to(self.means.dtype)

    def _component_log_prob(self, x: Tensor, dims: Tensor | None) -> Tensor:
        """Per-component joint log-densities ``log w_k + log N(x; mu_k, S_k)``, shape (B, K)."""
        mean, tril = self._components(dims)
        diff = (x[:, None, :] - mean).unsqueeze(-1)  # (B, K, d, 1)
        sol = torch.linalg.solve_triangular(tril, diff, upper=False).squeeze(-1)
        d = mean.shape[-1]
        log_det = tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        log_norm = -0.5 * sol.square().sum(-1) - log_det - 0.5 * d * math.log(2 * math.pi)
        return log_norm + torch.log_softmax(self.logits, -1)

    def _log_prob(self, x: Tensor, mask: Tensor | None) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        if mask is None:
            return torch.logsumexp(self._component_log_prob(flat, None), -1)
        out = flat.new_empty(flat.shape[0])
        dim_mask = mask.repeat_interleave(3, dim=-1)
        patterns, inverse = torch.unique(dim_mask, dim=0, return_inverse=True)
        for p, pattern in enumerate(patterns):  # one marginal per distinct mask in the batch
            rows = inverse == p
            dims = torch.nonzero(pattern).flatten()
            out[rows] = torch.logsumexp(self._component_log_prob(flat[rows][:, dims], dims), -1)
        return out

    def _sample(
        self,
        n: int,
        generator: torch.Generator | None,
        temperature: float,
        observed: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        batch = (n,) if observed is None else (n, observed.shape[0])
        probs = torch.softmax(self.logits.detach(), -1)
        k = torch.multinomial(probs.to("cpu"), math.prod(batch), replacement=True, generator=generator)
        k = k.to(self.means.device).reshape(batch)
        eps = randn((*batch, self.dim), generator=generator, device=self.means.device, dtype=self.means.dtype)
        tril = torch.linalg.cholesky(self.covariance()).to(self.means.dtype)
        x = self.means[k] + temperature * (tril[k] @ eps.unsqueeze(-1)).squeeze(-1)
        return x.reshape(*batch, self.num_joints, 3)

    def _map_project(self, x: Tensor, mask: Tensor | None, noise_std: float, **kwargs: Any) -> Tensor:
        """Posterior mean of the most responsible component under N(0, noise_std^2) noise on observed dims."""
        return self._project(x, mask, noise_std=noise_std, **kwargs)

    def _project(self, x: Tensor, mask: Tensor | None, noise_std: float = 0.1, **kwargs: Any) -> Tensor:
        """Posterior mean of the most responsible component under N(0, noise_std^2) noise on observed dims."""
        if kwargs:
            raise TypeError(f"unexpected keyword arguments for GMMPrior.project: {sorted(kwargs)}")
        flat = x.reshape(x.shape[0], -1)
        B, D = flat.shape
        obs = torch.ones(B, D, dtype=torch.bool, device=x.device) if mask is None else mask.repeat_interleave(3, -1)
        cov = self.covariance()  # (K, D, D), float64 for the solves below
        out = torch.empty_like(flat)
        patterns, inverse = torch.unique(obs, dim=0, return_inverse=True)
        for p, pattern in enumerate(patterns):
            rows = inverse == p
            dims = torch.nonzero(pattern).flatten()
            y = flat[rows][:, dims]
            k = self._component_log_prob(y, dims).argmax(-1)  # (b,)
            s_od = cov[k][:, :, dims]  # (b, D, d): covariance of all dims with the observed ones
            s_oo = s_od[:, dims, :] + noise_std**2 * torch.eye(len(dims), device=x.device, dtype=cov.dtype)
            gain = torch.linalg.solve(s_oo, (y - self.means[k][:, dims]).unsqueeze(-1).double())
            out[rows] = self.means[k] + (s_od @ gain).squeeze(-1).to(x.dtype)
        return out.reshape(B, self.num_joints, 3)
