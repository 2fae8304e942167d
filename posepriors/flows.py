"""Normalizing-flow building blocks shared by ``joint_flow`` and ``global_flow``.

Every block works on **grouped** inputs ``x`` of shape (B, G, D): G independent groups with their own parameters
(a global flow has G = 1 and D = 3J; the per-joint flows have G = J and D = 3) and an optional context (B, G, C)
fed to the coupling conditioners. ``forward`` maps data to latent and returns ``(z, logabsdet)`` with the
log-determinant per group, shape (B, G); ``inverse`` maps latent to data and returns the inverse's
log-determinant (the negative of the forward one at the same point).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "FlowSequence",
    "GroupedLinear",
    "GroupedMLP",
    "LULinear",
    "Permutation",
    "RQSplineCoupling",
    "build_flow",
    "standard_normal_log_prob",
]

_LOG_2PI = math.log(2 * math.pi)
_ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "tanh": nn.Tanh}


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """Log-density of a standard normal, summed over the last dim: (B, G, D) -> (B, G)."""
    return -0.5 * (z.square().sum(-1) + z.shape[-1] * _LOG_2PI)


class GroupedLinear(nn.Module):
    """G independent linear maps applied at once: (B, G, in) -> (B, G, out).

    Args:
        groups: Number of groups G.
        in_features: Input features per group.
        out_features: Output features per group.
        bias: Whether to add a bias.
    """

    def __init__(self, groups: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.groups, self.in_features, self.out_features = groups, in_features, out_features
        bound = 1 / math.sqrt(in_features) if in_features > 0 else 0.0
        self.weight = nn.Parameter(torch.empty(groups, out_features, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(groups, out_features).uniform_(-bound, bound)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.groups == 1:  # plain GEMM: the global flow's fast path
            return F.linear(x, self.weight[0], None if self.bias is None else self.bias[0])
        # (B, G, in) x (G, out, in) -> (B, G, out) as one batched GEMM over groups
        y = torch.bmm(x.transpose(0, 1), self.weight.transpose(1, 2)).transpose(0, 1)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"groups={self.groups}, in_features={self.in_features}, out_features={self.out_features}"


class GroupedMLP(nn.Sequential):
    """Per-group MLP: ``num_hidden_layers`` hidden layers of width ``hidden``; the last layer starts at zero so
    that couplings start as the identity.

    Args:
        groups: Number of groups.
        in_features: Inputs per group.
        out_features: Outputs per group.
        hidden: Hidden width.
        num_hidden_layers: Number of hidden layers (>= 1).
        activation: ``silu``, ``relu``, ``elu``, ``gelu`` or ``tanh``.
        zero_init_last: Zero the last layer's weights and bias.
    """

    def __init__(
        self,
        groups: int,
        in_features: int,
        out_features: int,
        hidden: int,
        num_hidden_layers: int = 2,
        activation: str = "silu",
        zero_init_last: bool = True,
    ) -> None:
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(_ACTIVATIONS)}")
        if num_hidden_layers < 1:
            raise ValueError(f"expected num_hidden_layers >= 1, got {num_hidden_layers}")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(num_hidden_layers):
            layers += [GroupedLinear(groups, width, hidden), _ACTIVATIONS[activation]()]
            width = hidden
        last = GroupedLinear(groups, width, out_features)
        if zero_init_last:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        super().__init__(*layers, last)


class ActNorm(nn.Module):
    """Per-group, per-dimension affine normalisation ``z = (x - loc) * exp(-log_scale)``.

    The first forward pass in training mode (or :meth:`initialize`) sets ``loc`` and ``log_scale`` to the batch's
    mean and log-std, so that the outputs start standardised. The ``initialized`` buffer is saved with the state
    dict, so a loaded model is never re-initialised.

    Args:
        groups: Number of groups.
        dim: Dimension per group.
    """

    def __init__(self, groups: int, dim: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(groups, dim))
        self.log_scale = nn.Parameter(torch.zeros(groups, dim))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set the statistics from a batch ``x`` (B, G, D)."""
        x = x.reshape(-1, *self.loc.shape)
        self.loc.copy_(x.mean(0))
        self.log_scale.copy_(x.std(0, unbiased=False).clamp_min(1e-3).log() if x.shape[0] > 1 else 0.0)
        self.initialized.fill_(True)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.training and not bool(self.initialized):
            self.initialize(x.detach())
        z = (x - self.loc) * torch.exp(-self.log_scale)
        return z, (-self.log_scale.sum(-1)).expand(x.shape[0], -1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = z * torch.exp(self.log_scale) + self.loc
        return x, self.log_scale.sum(-1).expand(z.shape[0], -1)


class Permutation(nn.Module):
    """A fixed permutation of the D dims (the same in every group).

    Args:
        dim: Dimension per group.
        permutation: The permutation; default: reversed order.
    """

    def __init__(self, dim: int, permutation: Tensor | None = None) -> None:
        super().__init__()
        perm = torch.arange(dim - 1, -1, -1) if permutation is None else torch.as_tensor(permutation).long()
        if sorted(perm.tolist()) != list(range(dim)):
            raise ValueError(f"expected a permutation of range({dim}), got {perm.tolist()}")
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("inverse_perm", torch.argsort(perm), persistent=False)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x[..., self.perm], x.new_zeros(x.shape[:2])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z[..., self.inverse_perm], z.new_zeros(z.shape[:2])


class LULinear(nn.Module):
    """Invertible per-group linear map ``z = W x + b`` with ``W = P L U`` (P a fixed permutation, L unit lower
    triangular, U upper triangular with positive diagonal ``exp(log_diag)``); starts at ``W = P``.

    Args:
        groups: Number of groups.
        dim: Dimension per group.
        seed: Seed of the fixed permutation.
    """

    def __init__(self, groups: int, dim: int, seed: int = 0) -> None:
        super().__init__()
        perm = torch.randperm(dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("inverse_perm", torch.argsort(perm), persistent=False)
        self.lower = nn.Parameter(torch.zeros(groups, dim, dim))
        self.upper = nn.Parameter(torch.zeros(groups, dim, dim))
        self.log_diag = nn.Parameter(torch.zeros(groups, dim))
        self.bias = nn.Parameter(torch.zeros(groups, dim))
        self.register_buffer("_eye", torch.eye(dim), persistent=False)

    def _factors(self) -> tuple[Tensor, Tensor]:
        L = self.lower.tril(-1) + self._eye
        U = self.upper.triu(1) + torch.diag_embed(self.log_diag.exp())
        return L, U

    def weight(self) -> Tensor:
        """The matrices ``W`` (G, D, D) (rows permuted by P)."""
        L, U = self._factors()
        return (L @ U)[:, self.inverse_perm]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        W = self.weight()
        if W.shape[0] == 1:
            z = F.linear(x, W[0], self.bias[0])
        else:
            z = torch.bmm(x.transpose(0, 1), W.transpose(1, 2)).transpose(0, 1) + self.bias
        return z, self.log_diag.sum(-1).expand(x.shape[0], -1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        L, U = self._factors()
        # W = P L U (rows of LU permuted); solve L U x = P^T (z - b) group by group: (G, D, B) right-hand sides
        rhs = (z - self.bias)[..., self.perm].permute(1, 2, 0)
        y = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)
        x = torch.linalg.solve_triangular(U, y, upper=True).permute(2, 0, 1)
        return x, (-self.log_diag.sum(-1)).expand(z.shape[0], -1)


class _Coupling(nn.Module):
    """Coupling skeleton: the first ``split`` dims (plus context) condition a transform of the remaining dims."""

    def __init__(
        self,
        groups: int,
        dim: int,
        params_per_dim: int,
        hidden: int,
        num_hidden_layers: int,
        context_features: int,
        split: int | None,
        activation: str,
    ) -> None:
        super().__init__()
        self.split = dim // 2 if split is None else split
        if not 0 < self.split < dim:
            raise ValueError(f"expected 0 < split < dim={dim}, got {self.split}")
        self.dim, self.context_features = dim, context_features
        self.params_per_dim = params_per_dim
        self.conditioner = GroupedMLP(
            groups,
            self.split + context_features,
            (dim - self.split) * params_per_dim,
            hidden,
            num_hidden_layers,
            activation,
        )

    def _params(self, x1: Tensor, context: Tensor | None) -> Tensor:
        if self.context_features:
            if context is None:
                raise ValueError(f"this coupling needs a context of {self.context_features} features, got None")
            x1 = torch.cat([x1, context], dim=-1)
        params = self.conditioner(x1)
        return params.unflatten(-1, (self.dim - self.split, self.params_per_dim))

    def _transform(self, x2: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x1, x2 = x[..., : self.split], x[..., self.split :]
        y2, logdet = self._transform(x2, self._params(x1, context), inverse=False)
        return torch.cat([x1, y2], dim=-1), logdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z1, z2 = z[..., : self.split], z[..., self.split :]
        x2, logdet = self._transform(z2, self._params(z1, context), inverse=True)
        return torch.cat([z1, x2], dim=-1), logdet


class AffineCoupling(_Coupling):
    """Affine coupling (RealNVP): ``z2 = x2 * exp(s) + t`` with ``(s, t)`` from the conditioner; the log-scale is
    soft-clamped to ``(-clamp, clamp)`` for stability.

    Args:
        groups: Number of groups.
        dim: Dimension per group.
        hidden: Conditioner width.
        num_hidden_layers: Conditioner depth.
        context_features: Context features per group (0: none).
        split: Number of conditioning dims (default ``dim // 2``).
        clamp: Bound of the log-scale.
        activation: Conditioner activation.
    """

    def __init__(
        self,
        groups: int,
        dim: int,
        hidden: int,
        num_hidden_layers: int = 2,
        context_features: int = 0,
        split: int | None = None,
        clamp: float = 3.0,
        activation: str = "silu",
    ) -> None:
        super().__init__(groups, dim, 2, hidden, num_hidden_layers, context_features, split, activation)
        self.clamp = clamp

    def _transform(self, x2: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        raw, shift = params.unbind(-1)
        log_scale = self.clamp * torch.tanh(raw / self.clamp)
        if inverse:
            return (x2 - shift) * torch.exp(-log_scale), -log_scale.sum(-1)
        return x2 * torch.exp(log_scale) + shift, log_scale.sum(-1)


class RQSplineCoupling(_Coupling):
    """Rational-quadratic spline coupling (Durkan et al. 2019) on ``[-bound, bound]``, identity outside.

    Args:
        groups: Number of groups.
        dim: Dimension per group.
        hidden: Conditioner width.
        num_hidden_layers: Conditioner depth.
        context_features: Context features per group (0: none).
        split: Number of conditioning dims (default ``dim // 2``).
        bins: Number of spline bins.
        bound: Half-width of the spline's interval.
        activation: Conditioner activation.
    """

    min_width = 1e-3
    min_height = 1e-3
    min_derivative = 1e-3

    def __init__(
        self,
        groups: int,
        dim: int,
        hidden: int,
        num_hidden_layers: int = 2,
        context_features: int = 0,
        split: int | None = None,
        bins: int = 8,
        bound: float = 4.0,
        activation: str = "silu",
    ) -> None:
        super().__init__(groups, dim, 3 * bins - 1, hidden, num_hidden_layers, context_features, split, activation)
        self.bins, self.bound = bins, bound
        # softplus(shift) = 1 - min_derivative, so a zero conditioner output gives the identity map
        self._derivative_shift = math.log(math.expm1(1 - self.min_derivative))

    def _knots(self, raw: Tensor, minimum: float) -> tuple[Tensor, Tensor]:
        """Bin sizes and knot positions on [-bound, bound] from unnormalised sizes (..., K)."""
        K = self.bins
        size = minimum + (1 - minimum * K) * torch.softmax(raw, dim=-1)
        inner = 2 * self.bound * torch.cumsum(size, dim=-1)[..., :-1] - self.bound
        ends = inner.new_full((*inner.shape[:-1], 1), self.bound)
        knots = torch.cat([-ends, inner, ends], dim=-1)  # exact end knots, whatever the rounding of cumsum
        return knots[..., 1:] - knots[..., :-1], knots

    def _transform(self, x2: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        K, B = self.bins, self.bound
        widths, cum_w = self._knots(params[..., :K], self.min_width)
        heights, cum_h = self._knots(params[..., K : 2 * K], self.min_height)
        d_inner = self.min_derivative + F.softplus(params[..., 2 * K :] + self._derivative_shift)
        derivs = F.pad(d_inner, (1, 1), value=1.0)  # slope 1 at the ends: continuous with the identity tails

        inside = (x2 > -B) & (x2 < B)
        v = x2.clamp(-B, B)
        knots = cum_h if inverse else cum_w
        idx = (v.unsqueeze(-1) >= knots[..., 1:-1]).sum(-1, keepdim=True)  # bin of each value, in [0, K-1]

        def pick(t: Tensor) -> Tensor:
            return t.gather(-1, idx).squeeze(-1)

        x_k, w_k, y_k, h_k = pick(cum_w), pick(widths), pick(cum_h), pick(heights)
        d_k, d_k1 = pick(derivs), derivs[..., 1:].gather(-1, idx).squeeze(-1)
        s_k = h_k / w_k
        if inverse:
            dy = v - y_k
            a = h_k * (s_k - d_k) + dy * (d_k1 + d_k - 2 * s_k)
            b = h_k * d_k - dy * (d_k1 + d_k - 2 * s_k)
            c = -s_k * dy
            disc = (b.square() - 4 * a * c).clamp_min(0)
            xi = (2 * c) / (-b - disc.sqrt())
            out = xi * w_k + x_k
        else:
            xi = (v - x_k) / w_k
            out = y_k + h_k * (s_k * xi.square() + d_k * xi * (1 - xi)) / (s_k + (d_k1 + d_k - 2 * s_k) * xi * (1 - xi))
        one_minus = 1 - xi
        denom = s_k + (d_k1 + d_k - 2 * s_k) * xi * one_minus
        deriv = s_k.square() * (d_k1 * xi.square() + 2 * s_k * xi * one_minus + d_k * one_minus.square())
        logdet = torch.log(deriv) - 2 * torch.log(denom)
        if inverse:
            logdet = -logdet
        out = torch.where(inside, out, x2)
        logdet = torch.where(inside, logdet, torch.zeros_like(logdet))
        return out, logdet.sum(-1)


class FlowSequence(nn.Module):
    """A composition of blocks; ``forward`` runs them in order (data -> latent), ``inverse`` in reverse.

    Args:
        blocks: The blocks, each with ``forward``/``inverse`` returning ``(tensor, logabsdet (B, G))``.
        groups: Number of groups G (for input checks).
        dim: Dimension per group D (for input checks).
    """

    def __init__(self, blocks: list[nn.Module], groups: int, dim: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.groups, self.dim = groups, dim

    def _check(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[1:] != (self.groups, self.dim):
            raise ValueError(f"expected flow input of shape (B, {self.groups}, {self.dim}), got {tuple(x.shape)}")

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        total = x.new_zeros(x.shape[:2])
        for block in self.blocks:
            x, logdet = block(x, context)
            total = total + logdet
        return x, total

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z)
        total = z.new_zeros(z.shape[:2])
        for block in reversed(self.blocks):
            z, logdet = block.inverse(z, context)
            total = total + logdet
        return z, total

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Log-density under a standard-normal base: (B, G, D) -> (B, G)."""
        z, logdet = self(x, context)
        return standard_normal_log_prob(z) + logdet

    @torch.no_grad()
    def initialize(self, x: Tensor, context: Tensor | None = None) -> None:
        """Data-dependent initialisation: run ``x`` through, initialising every ActNorm on its input."""
        for block in self.blocks:
            if isinstance(block, ActNorm):
                block.initialize(x)
            x, _ = block(x, context)


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
    """A standard flow: ``num_layers`` x ([ActNorm] -> mixing -> coupling).

    Mixing ``"lu"`` is a learned :class:`LULinear` (starting at a random permutation), ``"permutation"`` a fixed
    one (random for dim > 3; a cyclic shift for dim <= 3 so that every dim is transformed in turn), ``"none"``
    alternates which half is transformed by reversing.

    Args:
        groups: Number of groups G.
        dim: Dimension per group D (>= 2).
        num_layers: Number of coupling layers.
        hidden: Conditioner width.
        coupling: ``"affine"`` or ``"spline"``.
        context_features: Context features per group.
        actnorm: Whether to put an ActNorm before each layer.
        mixing: ``"lu"``, ``"permutation"`` or ``"none"``.
        num_hidden_layers: Conditioner depth.
        bins: Spline bins.
        bound: Spline interval half-width.
        activation: Conditioner activation.
        seed: Seed of the fixed permutations.

    Returns:
        The flow.
    """
    if dim < 2:
        raise ValueError(f"expected dim >= 2 for a coupling flow, got {dim}")
    if num_layers < 1:
        raise ValueError(f"expected num_layers >= 1, got {num_layers}")
    if coupling not in ("affine", "spline"):
        raise ValueError(f"expected coupling 'affine' or 'spline', got {coupling!r}")
    if mixing not in ("lu", "permutation", "none"):
        raise ValueError(f"expected mixing 'lu', 'permutation' or 'none', got {mixing!r}")
    generator = torch.Generator().manual_seed(seed)
    blocks: list[nn.Module] = []
    for layer in range(num_layers):
        if actnorm:
            blocks.append(ActNorm(groups, dim))
        if mixing == "lu":
            blocks.append(LULinear(groups, dim, seed=seed + layer))
        elif mixing == "permutation":
            perm = torch.roll(torch.arange(dim), 1) if dim <= 3 else torch.randperm(dim, generator=generator)
            blocks.append(Permutation(dim, perm))
        elif layer > 0:
            blocks.append(Permutation(dim))
        kwargs = {"context_features": context_features, "split": (dim + 1) // 3 if dim <= 3 else None}
        if coupling == "affine":
            blocks.append(AffineCoupling(groups, dim, hidden, num_hidden_layers, activation=activation, **kwargs))
        else:
            blocks.append(
                RQSplineCoupling(
                    groups, dim, hidden, num_hidden_layers, bins=bins, bound=bound, activation=activation, **kwargs
                )
            )
    return FlowSequence(blocks, groups, dim)
