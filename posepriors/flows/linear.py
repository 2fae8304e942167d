"""Linear flow blocks: ActNorm, fixed permutations and LU-decomposed mixing."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from posepriors.flows.core import _Block, _check_input, _LogDet

__all__ = ["ActNorm", "LULinear", "Permutation"]


def _actnorm_loaded(module: nn.Module, incompatible_keys: object) -> None:
    """State-dict post hook: refresh the Python mirror of the ``initialized`` buffer."""
    module._ready = bool(module.initialized)


class ActNorm(_Block):
    """Per-group, per-dimension affine normalisation ``z = (x - loc) * exp(-log_scale)``.

    ``loc`` and ``log_scale`` are the data's mean and log-std after the data-dependent initialisation: the first
    forward pass in training mode with at least 2 samples (or an explicit :meth:`initialize`) sets them from the
    batch, so that the outputs start with mean 0 and std 1 per group and dim. The ``initialized`` buffer is saved in
    the state dict, so a loaded model is never re-initialised. With data-parallel training, initialise before
    wrapping the model (or broadcast afterwards): each process would otherwise see its own first batch.

    Args:
        groups: Number of groups G.
        dim: Dimension per group D.
    """

    def __init__(self, groups: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.loc = nn.Parameter(torch.zeros(groups, dim))
        self.log_scale = nn.Parameter(torch.zeros(groups, dim))
        self.register_buffer("initialized", torch.tensor(False))
        self._ready = False  # mirror of `initialized` (reading a buffer in the hot path would sync a GPU)
        self.register_load_state_dict_post_hook(_actnorm_loaded)

    def _groups(self) -> int:
        return self.loc.shape[0]

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set ``loc`` and ``log_scale`` to the mean and log-std of a batch (per group and dim).

        Args:
            x: A representative batch, shape (N, G, D) with N >= 2.
        """
        _check_input(x, self._groups(), self.dim)
        if x.shape[0] < 2:
            raise ValueError(f"ActNorm needs a batch of at least 2 samples to initialise, got {x.shape[0]}")
        std, mean = torch.std_mean(x.to(self.loc.dtype), dim=0, correction=0)
        self.loc.copy_(mean)
        self.log_scale.copy_(std.clamp_min(1e-6).log())
        self.initialized.fill_(True)
        self._ready = True

    def _maybe_initialize(self, x: Tensor) -> None:
        if self.training and not self._ready:
            if bool(self.initialized):
                self._ready = True
            elif x.shape[0] >= 2:  # a (near) empty batch has no statistics: wait for a real one
                self.initialize(x.detach())

    def _forward(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, _LogDet]:
        self._maybe_initialize(x)
        neg_log_scale = -self.log_scale
        scale = neg_log_scale.exp()
        # x * scale - loc * scale: one pass over the batch (the (G, D) factors are cheap)
        return torch.addcmul(-self.loc * scale, x, scale), neg_log_scale.sum(-1)

    def _inverse(self, z: Tensor, context: Tensor | None) -> tuple[Tensor, _LogDet]:
        return torch.addcmul(self.loc, z, torch.exp(self.log_scale)), self.log_scale.sum(-1)

    def _affine(self) -> tuple[Tensor, Tensor, Tensor]:
        """The block as ``z = x @ A + c`` on row vectors: A (G, D, D), c (G, D), log-determinant (G,)."""
        scale = torch.exp(-self.log_scale)
        return torch.diag_embed(scale), -self.loc * scale, -self.log_scale.sum(-1)

    def extra_repr(self) -> str:
        return f"groups={self.loc.shape[0]}, dim={self.dim}"


# ---------------------------------------------------------------------------------------------------- mixing
class Permutation(_Block):
    """A fixed permutation of the D dims, the same in every group: ``z = x[..., permutation]``.

    One permutation for all groups keeps this a single ``index_select`` and lets the flows of any subset of groups
    run with the same block. The log-determinant is 0.

    Args:
        dim: Dimension per group D.
        permutation: The permutation, a sequence of ``range(dim)``; default: reversed order (or random with ``seed``).
        seed: When given (and ``permutation`` is None), a random permutation drawn from this seed.
    """

    def __init__(self, dim: int, permutation: Tensor | Iterable[int] | None = None, seed: int | None = None) -> None:
        super().__init__()
        self.dim = dim
        if permutation is not None:
            perm = torch.as_tensor(permutation, dtype=torch.long).flatten()
        elif seed is not None:
            perm = torch.randperm(dim, generator=torch.Generator().manual_seed(seed))
        else:
            perm = torch.arange(dim - 1, -1, -1)
        if sorted(perm.tolist()) != list(range(dim)):
            raise ValueError(f"expected a permutation of range({dim}), got {perm.tolist()}")
        self.register_buffer("permutation", perm, persistent=False)
        self.register_buffer("inverse_permutation", torch.argsort(perm), persistent=False)

    def _forward(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, _LogDet]:
        return x.index_select(-1, self.permutation), None

    def _inverse(self, z: Tensor, context: Tensor | None) -> tuple[Tensor, _LogDet]:
        return z.index_select(-1, self.inverse_permutation), None

    def _affine(self) -> tuple[Tensor, Tensor, Tensor]:
        """The block as ``z = x @ A + c`` on row vectors: A (1, D, D), c (1, D), log-determinant (1,)."""
        eye = torch.eye(self.dim, device=self.permutation.device)
        return eye[:, self.permutation].unsqueeze(0), eye.new_zeros(1, self.dim), eye.new_zeros(1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, permutation={self.permutation.tolist()}"


class LULinear(_Block):
    """Invertible per-group linear map ``z = W x + b`` with ``W = P L U``.

    P is a fixed permutation (random from ``seed``, shared by the groups), L unit lower triangular and U upper
    triangular with positive diagonal ``exp(log_diag)``, so ``log |det W| = sum(log_diag)``. ``W`` starts as P.
    Nothing is cached (nothing goes stale after an optimiser step): the factors are rebuilt from the parameters on
    every call with one ``addcmul`` each; a batch larger than D gets the product ``W`` and one matrix product, a
    smaller one (a fitting loop's single pose) the factors one after the other, ``z = (P L) (U x) + b``, which
    avoids the O(D^3) product. The inverse solves the two triangular systems with
    :func:`torch.linalg.solve_triangular`.

    Storage: ``lower`` holds the strictly lower part of ``P L`` directly (the rows of L already permuted), so that
    ``P L`` is a single ``addcmul`` with a fixed mask; entries outside the masks are unused.

    Args:
        groups: Number of groups G.
        dim: Dimension per group D.
        seed: Seed of the fixed permutation P (None: identity).
    """

    def __init__(self, groups: int, dim: int, seed: int | None = 0) -> None:
        super().__init__()
        self.dim = dim
        if seed is None:
            perm = torch.arange(dim)
        else:
            perm = torch.randperm(dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("permutation", perm, persistent=False)
        self.register_buffer("inverse_permutation", torch.argsort(perm), persistent=False)
        # (P L)[i] = L[perm[i]]: the permuted identity and the permuted strictly-lower mask
        self.register_buffer("_perm_eye", torch.eye(dim)[perm], persistent=False)
        self.register_buffer("_lower_mask", torch.ones(dim, dim).tril(-1)[perm], persistent=False)
        self.register_buffer("_upper_mask", torch.ones(dim, dim).triu(1), persistent=False)
        self.lower = nn.Parameter(torch.zeros(groups, dim, dim))
        self.upper = nn.Parameter(torch.zeros(groups, dim, dim))
        self.log_diag = nn.Parameter(torch.zeros(groups, dim))
        self.bias = nn.Parameter(torch.zeros(groups, dim))

    def _groups(self) -> int:
        return self.log_diag.shape[0]

    def _factors(self) -> tuple[Tensor, Tensor]:
        """``P L`` and ``U``, each (G, D, D)."""
        perm_lower = torch.addcmul(self._perm_eye, self.lower, self._lower_mask)
        upper = torch.addcmul(torch.diag_embed(self.log_diag.exp()), self.upper, self._upper_mask)
        return perm_lower, upper

    def weight(self) -> Tensor:
        """The matrices ``W = P L U``, shape (G, D, D), acting on column vectors."""
        perm_lower, upper = self._factors()
        return perm_lower @ upper

    def _forward(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, _LogDet]:
        perm_lower, upper = self._factors()
        # row vectors in the (G, B, D) layout: z^T = x^T U^T (P L)^T + b^T. For more samples than dims, form
        # W^T = U^T (P L)^T (O(D^3)) and apply it once; for fewer, apply the factors one after the other (O(B D^2)).
        h, bias = x.transpose(0, 1), self.bias.unsqueeze(1)
        if x.shape[0] > self.dim:
            z = torch.baddbmm(bias, h, torch.bmm(upper.transpose(1, 2), perm_lower.transpose(1, 2)))
        else:
            z = torch.baddbmm(bias, torch.bmm(h, upper.transpose(1, 2)), perm_lower.transpose(1, 2))
        return z.transpose(0, 1), self.log_diag.sum(-1)

    def _inverse(self, z: Tensor, context: Tensor | None) -> tuple[Tensor, _LogDet]:
        perm_lower, upper = self._factors()
        lower = perm_lower.index_select(-2, self.inverse_permutation)  # L itself: unit lower triangular
        # P L U x = z - b  <=>  L U x = P^T (z - b); the right-hand sides as (G, D, B)
        rhs = (z - self.bias).index_select(-1, self.inverse_permutation).permute(1, 2, 0)
        y = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
        x = torch.linalg.solve_triangular(upper, y, upper=True)
        return x.permute(2, 0, 1), -self.log_diag.sum(-1)

    def _affine(self) -> tuple[Tensor, Tensor, Tensor]:
        """The block as ``z = x @ A + c`` on row vectors: A = W^T (G, D, D), c (G, D), log-determinant (G,)."""
        return self.weight().transpose(1, 2), self.bias, self.log_diag.sum(-1)

    def extra_repr(self) -> str:
        return f"groups={self.log_diag.shape[0]}, dim={self.dim}"
