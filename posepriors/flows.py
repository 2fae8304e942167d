"""Normalizing-flow building blocks shared by ``joint_flow`` and ``global_flow``.

Every block works on **grouped** inputs ``x`` of shape (B, G, D): G independent groups, each with its own parameters
(a global flow has G = 1 and D = the pose dimension; the per-joint flows have G = J joints and D = 3), and an
optional context of shape (B, G, C) that is fed to the coupling conditioners (ActNorm, LU and permutations ignore it).
Every parameter has the group as its first dim, so the flows of a subset of groups run by passing the parameters'
rows to :func:`torch.func.functional_call`.

The block protocol:

- ``forward(x, context=None) -> (z, logabsdet)`` maps data to latent (the direction used by ``log_prob``);
  ``logabsdet`` is ``log |det dz/dx|`` per group, shape (B, G), so a per-joint flow can report a per-joint breakdown.
- ``inverse(z, context=None) -> (x, logabsdet)`` maps latent to data (sampling) and returns the inverse's
  log-determinant, the negative of the forward one at the same point.

Speed: these blocks sit inside fitting loops, so a layer is a handful of tensor ops. Conditioners run the groups as
one batched matrix product (:func:`torch.baddbmm` over stacked weights, never a Python loop over groups), couplings
split their inputs with precomputed index buffers (or views when the split is contiguous) instead of multiplying by
masks, and :class:`FlowSequence` validates its input once and then runs its blocks' unchecked ``_forward`` /
``_inverse`` directly (so hooks registered on the blocks inside a sequence do not fire; hooks on the sequence do).
Parameter-only log-determinants (ActNorm, LU) are summed as (G,) vectors and broadcast to (B, G) once. Frozen
inference (eval mode, no parameter gradients) folds ActNorm and mixing into one cached affine map per layer, runs the
conditioners' activations in place wherever autograd records nothing, and splits large CPU batches into chunks that
keep each layer's hidden activations in cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from posepriors.utils import LOG_2PI

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
    "FLOW_SETTINGS",
    "check_flow_settings",
    "flow_settings",
    "standard_normal_log_prob",
]

# name -> (module, function, in-place function). The in-place form runs where autograd does not record (inference):
# a large batch then skips allocating (and, on CPU, page-faulting in) a fresh hidden-activation tensor per layer.
_ACTIVATIONS: dict[str, tuple[type[nn.Module], Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "silu": (nn.SiLU, F.silu, lambda h: F.silu(h, inplace=True)),
    "relu": (nn.ReLU, F.relu, torch.relu_),
    "elu": (nn.ELU, F.elu, lambda h: F.elu(h, inplace=True)),
    "gelu": (nn.GELU, F.gelu, F.gelu),  # no in-place form
    "tanh": (nn.Tanh, torch.tanh, torch.tanh_),
}

# A block's internal log-determinant: (B, G) when it depends on the input, (G,) when it depends on the parameters
# only (broadcast later), None when it is zero.
_LogDet = Tensor | None


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """Log-density of a standard normal, summed over the last dim.

    Args:
        z: Latent codes, shape (B, G, D) (any leading dims).

    Returns:
        Log-densities, shape (B, G).
    """
    return z.square().sum(-1).mul(-0.5).sub(0.5 * z.shape[-1] * LOG_2PI)


def _check_input(x: Tensor, groups: int | None, dim: int, name: str = "input") -> None:
    """Raise ``ValueError`` unless ``x`` has shape (B, groups, dim) (any G when ``groups`` is None)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected {name} to be a Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[2] != dim or (groups is not None and x.shape[1] != groups):
        expected = f"(B, {'G' if groups is None else groups}, {dim})"
        raise ValueError(f"expected {name} of shape {expected}, got {tuple(x.shape)}")


def _check_context(context: Tensor | None, x: Tensor, features: int) -> None:
    """Raise ``ValueError`` unless ``context`` fits a block or flow with ``features`` context features."""
    if features == 0:
        if context is not None and context.shape[-1] != 0:
            raise ValueError(f"this flow takes no context, got a context of shape {tuple(context.shape)}")
        return
    if context is None:
        raise ValueError(f"this flow needs a context of shape (B, G, {features}), got None")
    B, G = x.shape[0], x.shape[1]
    if context.dim() != 3 or context.shape != (B, G, features):
        raise ValueError(f"expected context of shape ({B}, {G}, {features}), got {tuple(context.shape)}")


def _full_logdet(logdet: _LogDet, x: Tensor) -> Tensor:
    """An internal log-determinant as a (B, G) tensor."""
    if logdet is None:
        return x.new_zeros(x.shape[:2])
    return logdet.expand(x.shape[0], x.shape[1]) if logdet.dim() < 2 else logdet


class _Block(nn.Module):
    """Base of the flow blocks: checked public ``forward``/``inverse`` around unchecked ``_forward``/``_inverse``.

    ``_forward`` and ``_inverse`` return the output and a log-determinant of shape (B, G), (G,) or None (zero);
    :class:`FlowSequence` calls them directly and broadcasts once.
    """

    dim: int
    context_features: int = 0

    def _groups(self) -> int | None:
        """The number of groups the parameters hold (None: any)."""
        return None

    def _forward(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, _LogDet]:
        raise NotImplementedError

    def _inverse(self, z: Tensor, context: Tensor | None) -> tuple[Tensor, _LogDet]:
        raise NotImplementedError

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data to latent.

        Args:
            x: Inputs, shape (B, G, D).
            context: Conditioner inputs, shape (B, G, C), or None (ignored by blocks without a conditioner).

        Returns:
            The outputs, shape (B, G, D), and ``log |det dz/dx|`` per group, shape (B, G).
        """
        _check_input(x, self._groups(), self.dim)
        if self.context_features:
            _check_context(context, x, self.context_features)
        z, logdet = self._forward(x, context)
        return z, _full_logdet(logdet, x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Latent to data.

        Args:
            z: Latent codes, shape (B, G, D).
            context: Conditioner inputs, shape (B, G, C), or None.

        Returns:
            The inputs that map to ``z``, shape (B, G, D), and ``log |det dx/dz|`` per group, shape (B, G).
        """
        _check_input(z, self._groups(), self.dim)
        if self.context_features:
            _check_context(context, z, self.context_features)
        x, logdet = self._inverse(z, context)
        return x, _full_logdet(logdet, z)


# ---------------------------------------------------------------------------------------------------- conditioners
class GroupedLinear(nn.Module):
    """G independent linear maps applied at once: (B, G, in) -> (B, G, out).

    The weights are stacked as (G, in, out) so that the grouped product is a single :func:`torch.baddbmm` over
    the groups; the bias is (G, out). Initialised like :class:`torch.nn.Linear`: uniform in
    ``+-1 / sqrt(in_features)`` (from the global RNG, like every torch layer).

    Args:
        groups: Number of groups G.
        in_features: Input features per group.
        out_features: Output features per group.
        bias: Whether to add a bias.
    """

    def __init__(self, groups: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        for name, value in (("groups", groups), ("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "in_features" else 1):
                raise ValueError(f"expected {name} to be a positive integer, got {value!r}")
        self.groups, self.in_features, self.out_features = groups, in_features, out_features
        bound = 1 / math.sqrt(in_features) if in_features > 0 else 0.0
        self.weight = nn.Parameter(torch.empty(groups, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(groups, out_features).uniform_(-bound, bound)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        """Apply each group's map.

        Args:
            x: Inputs, shape (B, G, in_features).

        Returns:
            Outputs, shape (B, G, out_features).
        """
        _check_input(x, self.weight.shape[0], self.in_features)
        weight, bias = self.weight, self.bias
        if weight.shape[0] == 1:  # one group: a plain GEMM (the global flow's case)
            return F.linear(x, weight[0].T, None if bias is None else bias[0])
        h = x.transpose(0, 1)  # (G, B, in): one batched GEMM over the groups
        h = torch.bmm(h, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), h, weight)
        return h.transpose(0, 1)

    def extra_repr(self) -> str:
        return (
            f"groups={self.groups}, in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


class GroupedMLP(nn.Sequential):
    """Per-group MLP: ``num_hidden_layers`` hidden layers of width ``hidden`` between grouped linear maps.

    The layers are held as an :class:`torch.nn.Sequential` (``0`` linear, ``1`` activation, ``2`` linear, ...), but
    ``forward`` runs them as one :func:`torch.baddbmm` per layer in a (G, B, features) layout, without a module call
    per layer. With ``zero_init_last`` the last layer starts at zero, so couplings start as the identity.

    Args:
        groups: Number of groups G.
        in_features: Inputs per group.
        out_features: Outputs per group.
        hidden: Hidden width.
        num_hidden_layers: Number of hidden layers (>= 1).
        activation: ``"silu"``, ``"relu"``, ``"elu"``, ``"gelu"`` or ``"tanh"``.
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
            raise ValueError(f"expected activation in {sorted(_ACTIVATIONS)}, got {activation!r}")
        if isinstance(num_hidden_layers, bool) or not isinstance(num_hidden_layers, int) or num_hidden_layers < 1:
            raise ValueError(f"expected num_hidden_layers to be an integer >= 1, got {num_hidden_layers!r}")
        module, function, inplace = _ACTIVATIONS[activation]
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(num_hidden_layers):
            layers += [GroupedLinear(groups, width, hidden), module()]
            width = hidden
        last = GroupedLinear(groups, width, out_features)
        if zero_init_last:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        super().__init__(*layers, last)
        self.in_features, self.out_features = in_features, out_features
        self._activation, self._activation_ = function, inplace
        # the linear layers, read at call time (so torch.func.functional_call can swap their parameters)
        self._linears: tuple[GroupedLinear, ...] = tuple(layers[::2]) + (last,)

    def forward(self, x: Tensor) -> Tensor:
        """Apply each group's MLP.

        Args:
            x: Inputs, shape (B, G, in_features).

        Returns:
            Outputs, shape (B, G, out_features).
        """
        _check_input(x, self._linears[0].weight.shape[0], self.in_features)
        return self._run(x)

    def _run(self, x: Tensor) -> Tensor:
        """``forward`` without input checks."""
        *hidden_layers, last = self._linears
        act, act_ = self._activation, self._activation_
        # Each hidden output is a fresh tensor: when autograd does not record it, the activation runs in place.
        if x.shape[1] == 1 and last.weight.shape[0] == 1:  # one group (the global flow): plain 2-D GEMMs
            h = x.squeeze(1)  # a view whose backward is a view too (a select's backward allocates)
            for layer in hidden_layers:
                h = torch.addmm(layer.bias[0], h, layer.weight[0])
                h = act(h) if h.requires_grad else act_(h)
            return torch.addmm(last.bias[0], h, last.weight[0]).unsqueeze(1)
        h = x.transpose(0, 1)  # (G, B, in): one batched GEMM per layer over the groups
        for layer in hidden_layers:
            h = torch.baddbmm(layer.bias.unsqueeze(1), h, layer.weight)
            h = act(h) if h.requires_grad else act_(h)
        return torch.baddbmm(last.bias.unsqueeze(1), h, last.weight).transpose(0, 1)


# ---------------------------------------------------------------------------------------------------- ActNorm
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


# ---------------------------------------------------------------------------------------------------- couplings
class _Coupling(_Block):
    """Coupling skeleton: the dims where ``mask`` is True (plus the context) condition a transform of the others.

    The split uses contiguous views when the conditioning dims form a prefix or a suffix of the D dims (halves), and
    precomputed index buffers otherwise; the outputs are merged with one ``cat`` or ``index_copy``.
    """

    def __init__(
        self,
        groups: int,
        dim: int,
        mask: Tensor | Iterable[bool],
        params_per_dim: int,
        hidden: int,
        num_hidden_layers: int,
        context_features: int,
        activation: str,
    ) -> None:
        super().__init__()
        mask = torch.as_tensor(mask, dtype=torch.bool).flatten()
        if mask.shape != (dim,):
            raise ValueError(f"expected a mask of shape ({dim},), got {tuple(mask.shape)}")
        if bool(mask.all()) or not bool(mask.any()):
            raise ValueError(f"expected a mask with both True (conditioning) and False dims, got {mask.tolist()}")
        if isinstance(context_features, bool) or not isinstance(context_features, int) or context_features < 0:
            raise ValueError(f"expected context_features to be an integer >= 0, got {context_features!r}")
        self.dim, self.context_features, self.params_per_dim = dim, context_features, params_per_dim
        cond, trans = mask.nonzero().flatten(), (~mask).nonzero().flatten()
        self.num_conditioning, self.num_transformed = cond.numel(), trans.numel()
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("conditioning_index", cond, persistent=False)
        self.register_buffer("transformed_index", trans, persistent=False)
        k = self.num_conditioning
        # 1: conditioning dims first ([T..T F..F]), 2: transformed dims first ([F..F T..T]), 0: any other mask
        self._layout = 1 if bool(mask[:k].all()) else 2 if bool(mask[dim - k :].all()) else 0
        self._sizes = (k, dim - k) if self._layout == 1 else (dim - k, k)
        self.conditioner = GroupedMLP(
            groups, k + context_features, self.num_transformed * params_per_dim, hidden, num_hidden_layers, activation
        )

    def _groups(self) -> int:
        return self.conditioner[0].weight.shape[0]

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(conditioning dims, transformed dims) of x."""
        if self._layout == 1:
            x1, x2 = x.split(self._sizes, dim=-1)  # one op, and one node in the backward graph
            return x1, x2
        if self._layout == 2:
            x2, x1 = x.split(self._sizes, dim=-1)
            return x1, x2
        return x.index_select(-1, self.conditioning_index), x.index_select(-1, self.transformed_index)

    def _merge(self, x: Tensor, x1: Tensor, y2: Tensor) -> Tensor:
        """x with its transformed dims replaced by y2."""
        if self._layout == 1:
            return torch.cat([x1, y2], dim=-1)
        if self._layout == 2:
            return torch.cat([y2, x1], dim=-1)
        return x.index_copy(-1, self.transformed_index, y2)

    def _params(self, x1: Tensor, context: Tensor | None) -> Tensor:
        """Conditioner outputs (B, G, transformed * params_per_dim)."""
        h = x1 if not self.context_features else torch.cat([x1, context], dim=-1)
        return self.conditioner._run(h)

    def _transform(self, x2: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """The element-wise transform of the transformed dims and its log-determinant (B, G)."""
        raise NotImplementedError

    def _forward(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, _LogDet]:
        x1, x2 = self._split(x)
        y2, logdet = self._transform(x2, self._params(x1, context), inverse=False)
        return self._merge(x, x1, y2), logdet

    def _inverse(self, z: Tensor, context: Tensor | None) -> tuple[Tensor, _LogDet]:
        z1, z2 = self._split(z)
        x2, logdet = self._transform(z2, self._params(z1, context), inverse=True)
        return self._merge(z, z1, x2), logdet

    def extra_repr(self) -> str:
        return f"mask={self.mask.int().tolist()}, context_features={self.context_features}"


class AffineCoupling(_Coupling):
    """Affine coupling (RealNVP): ``z_b = x_b * exp(s) + t`` with ``(s, t)`` from a conditioner of ``x_a``.

    ``x_a`` are the dims where ``mask`` is True (they pass through unchanged and, with the context, condition the
    transform), ``x_b`` the others. The conditioner's last layer starts at zero, so the coupling starts as the
    identity.

    Args:
        groups: Number of groups G.
        dim: Dimension per group D.
        mask: Bool (D,): True for the dims that pass through and condition.
        hidden: Conditioner width.
        num_hidden_layers: Conditioner depth.
        context_features: Context features per group (0: none).
        scale_fn: How the raw log-scale is bounded: ``"softclamp"`` (``s = clamp * tanh(raw / clamp)``, smooth
            and bounded: stable training) or ``"exp"`` (``s = raw``, unbounded).
        clamp: Bound of the soft-clamped log-scale.
        activation: Conditioner activation.
    """

    def __init__(
        self,
        groups: int,
        dim: int,
        mask: Tensor | Iterable[bool],
        hidden: int,
        num_hidden_layers: int = 2,
        context_features: int = 0,
        scale_fn: str = "softclamp",
        clamp: float = 3.0,
        activation: str = "silu",
    ) -> None:
        if scale_fn not in ("softclamp", "exp"):
            raise ValueError(f"expected scale_fn 'softclamp' or 'exp', got {scale_fn!r}")
        if not clamp > 0:
            raise ValueError(f"expected clamp > 0, got {clamp!r}")
        super().__init__(groups, dim, mask, 2, hidden, num_hidden_layers, context_features, activation)
        self.scale_fn, self.clamp = scale_fn, float(clamp)

    def _transform(self, x2: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        raw, shift = params.chunk(2, dim=-1)  # the first half of the outputs are log-scales, the second shifts
        s = torch.tanh(raw * (1 / self.clamp)) * self.clamp if self.scale_fn == "softclamp" else raw
        if inverse:
            return (x2 - shift) * torch.exp(-s), -s.sum(-1)
        return torch.addcmul(shift, x2, torch.exp(s)), s.sum(-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale_fn={self.scale_fn!r}, clamp={self.clamp}"


class RQSplineCoupling(_Coupling):
    """Rational-quadratic spline coupling (Durkan et al. 2019, "Neural Spline Flows").

    Each transformed dim goes through a monotonic rational-quadratic spline on ``[-bound, bound]`` with ``bins``
    bins whose widths, heights and inner knot derivatives come from the conditioner; outside the interval it is the
    identity (linear tails, slope 1 at the end knots, so the map is C1). Bin widths and heights are at least
    ``min_width`` / ``min_height`` of the interval and derivatives at least ``min_derivative``; a zero conditioner
    output gives the identity. The inverse is exact: the root of the bin's quadratic, in the cancellation-free form
    ``2c / (-b - sqrt(b^2 - 4ac))``.

    Args:
        groups: Number of groups G.
        dim: Dimension per group D.
        mask: Bool (D,): True for the dims that pass through and condition.
        hidden: Conditioner width.
        num_hidden_layers: Conditioner depth.
        context_features: Context features per group (0: none).
        bins: Number of spline bins K (>= 2).
        bound: Half-width of the spline's interval.
        activation: Conditioner activation.
    """

    min_width: float = 1e-3
    min_height: float = 1e-3
    min_derivative: float = 1e-3

    def __init__(
        self,
        groups: int,
        dim: int,
        mask: Tensor | Iterable[bool],
        hidden: int,
        num_hidden_layers: int = 2,
        context_features: int = 0,
        bins: int = 8,
        bound: float = 4.0,
        activation: str = "silu",
    ) -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise ValueError(f"expected bins to be an integer >= 2, got {bins!r}")
        if not (math.isfinite(bound) and bound > 0):
            raise ValueError(f"expected a finite bound > 0, got {bound!r}")
        super().__init__(groups, dim, mask, 3 * bins - 1, hidden, num_hidden_layers, context_features, activation)
        self.bins, self.bound = bins, float(bound)
        # softplus(shift) = 1 - min_derivative: a zero conditioner output gives slope 1 everywhere (the identity)
        self._derivative_shift = math.log(math.expm1(1 - self.min_derivative))
        # bin widths (row 0) and heights (row 1) in data units are softmax * scale + offset (summing to 2 * bound);
        # the (2, 1) factors per dtype and device, made from the Python floats (a buffer would round them once)
        self._size_factors: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}
        # columns of a bin's left x knot, left y knot, width, height, left and right derivative in the table
        # [x knots (K) | y knots (K) | widths (K) | heights (K) | derivatives (K + 1)] built by _transform
        K = bins
        self.register_buffer("_columns", torch.tensor([0, K, 2 * K, 3 * K, 4 * K, 4 * K + 1]), persistent=False)

    def _factors(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The bin sizes' (2, 1) scale and offset in ``like``'s dtype and device."""
        key = (like.dtype, like.device)
        if key not in self._size_factors:
            minimum = torch.tensor([[self.min_width], [self.min_height]], dtype=torch.float64)
            scale, offset = 2 * self.bound * (1 - minimum * self.bins), 2 * self.bound * minimum
            self._size_factors[key] = (scale.to(like.device, like.dtype), offset.to(like.device, like.dtype))
        return self._size_factors[key]

    def _transform(self, x2: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        # Written for few tensor ops (each op costs microseconds of overhead on a single pose, forward and
        # backward): one softmax and one cumsum for widths and heights together, one table, one gather.
        K, B = self.bins, self.bound
        raw_sizes, raw_derivs = params.unflatten(-1, (self.num_transformed, 3 * K - 1)).split((2 * K, K - 1), -1)
        scale, offset = self._factors(params)
        sizes = torch.addcmul(offset, torch.softmax(raw_sizes.unflatten(-1, (2, K)), -1), scale)
        left = torch.cumsum(sizes, -1).sub(sizes).sub(B)  # (B, G, n, 2, K): left knots; the first is exactly -B
        derivs = F.pad(F.softplus(raw_derivs + self._derivative_shift) + self.min_derivative, (1, 1), value=1.0)
        table = torch.cat([left.flatten(-2), sizes.flatten(-2), derivs], -1)  # (B, G, n, 5K + 1)

        # the spline is evaluated on the clamped value and the tails are put back at the end (hardtanh is a clamp
        # whose backward is one op; its zero gradient at +-B does not matter, the ends go to the identity branch)
        v = F.hardtanh(x2, -B, B)
        # bin of each value, in [0, K - 1]: how many inner knots are <= v (in y for the inverse)
        bin_index = (v.unsqueeze(-1) >= left[..., int(inverse), 1:]).sum(-1, keepdim=True)
        x_k, y_k, w_k, h_k, d_k, d_k1 = table.gather(-1, bin_index + self._columns).unbind(-1)
        s_k = h_k / w_k
        d_sum = (d_k + d_k1).sub(s_k, alpha=2)
        if inverse:  # the root in [0, 1] of the bin's quadratic a xi^2 + b xi + c, with c = -s dy
            dy = v - y_k
            a = torch.addcmul(h_k * (s_k - d_k), dy, d_sum)
            b = torch.addcmul(h_k * d_k, dy, d_sum, value=-1)
            s_dy = s_k * dy
            root = torch.addcmul(b.square(), a, s_dy, value=4).clamp_min(0).sqrt()
            xi = F.hardtanh(2 * s_dy / (b + root), 0.0, 1.0)  # = 2c / (-b - root), clamped to the bin
            out = torch.addcmul(x_k, xi, w_k)
        else:
            xi = (v - x_k) / w_k
        xi_1m = 1 - xi
        t = xi * xi_1m
        denom = torch.addcmul(s_k, d_sum, t)
        xi_sq = xi.square()
        if not inverse:
            out = torch.addcmul(y_k, h_k, torch.addcmul(d_k * t, s_k, xi_sq) / denom)
        numer = torch.addcmul(torch.addcmul(d_k1 * xi_sq, s_k, t, value=2), d_k, xi_1m.square()) * s_k.square()
        logdet = torch.log(numer).sub(torch.log(denom), alpha=2)  # log dy/dx inside the interval
        outside = x2.abs() >= B  # the ends and beyond: the identity (the spline's value and slope there)
        out = torch.where(outside, x2, out)
        logdet = logdet.masked_fill(outside, 0.0).sum(-1)
        return out, (-logdet if inverse else logdet)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bins={self.bins}, bound={self.bound}"


# ---------------------------------------------------------------------------------------------------- composition
_LINEAR_BLOCKS = (ActNorm, LULinear, Permutation)


class _FoldedAffine:
    """A run of linear blocks as one precomputed map ``z = x @ A + c`` (or its inverse), for frozen inference."""

    def __init__(self, matrix: Tensor, offset: Tensor, logdet: Tensor) -> None:
        self.matrix, self.offset, self.logdet = matrix, offset, logdet  # (G, D, D), (G, D), (G,)
        self.single = matrix.shape[0] == 1
        if self.single:  # one group: the 2-D factors of a plain GEMM, taken once
            self.matrix_2d, self.offset_2d = matrix[0], offset[0]

    @classmethod
    def from_blocks(cls, blocks: list[nn.Module], inverse: bool, dtype: torch.dtype) -> _FoldedAffine:
        """Compose the blocks' affine maps in float64 and cast to ``dtype``; the inverse map when ``inverse``."""
        matrix = offset = logdet = None
        for block in blocks:
            a, c, ld = (t.double() for t in block._affine())
            if matrix is None:
                matrix, offset, logdet = a, c, ld
            else:
                matrix = matrix @ a
                offset = (offset.unsqueeze(-2) @ a).squeeze(-2) + c
                logdet = logdet + ld
        if inverse:  # x = (z - c) A^-1
            matrix = torch.linalg.inv(matrix)
            offset = -(offset.unsqueeze(-2) @ matrix).squeeze(-2)
            logdet = -logdet
        groups = max(matrix.shape[0], offset.shape[0])
        matrix = matrix.expand(groups, -1, -1)
        offset = offset.expand(groups, -1)
        return cls(matrix.to(dtype).contiguous(), offset.to(dtype).contiguous(), logdet.to(dtype).expand(groups))

    def __call__(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.single:  # one group: a plain GEMM
            return torch.addmm(self.offset_2d, x.squeeze(1), self.matrix_2d).unsqueeze(1), self.logdet
        z = torch.baddbmm(self.offset.unsqueeze(1), x.transpose(0, 1), self.matrix)
        return z.transpose(0, 1), self.logdet


class FlowSequence(nn.Module):
    """A composition of blocks: ``forward`` runs them in order (data -> latent) and sums their log-determinants,
    ``inverse`` runs their inverses in reverse order.

    The input (and context) shapes are checked once here; the blocks then run unchecked.

    Args:
        blocks: The blocks (:class:`ActNorm`, :class:`LULinear`, :class:`Permutation`, the couplings, or any module
            with ``forward``/``inverse`` returning ``(tensor, logabsdet (B, G))``).
        groups: Number of groups G.
        dim: Dimension per group D.
    """

    def __init__(self, blocks: Iterable[nn.Module], groups: int, dim: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.groups, self.dim = groups, dim
        self.context_features = max((getattr(b, "context_features", 0) for b in self.blocks), default=0)
        # frozen inference runs batches larger than this in chunks of about 2^20 hidden activations (see _run)
        hidden = [b.conditioner._linears[0].out_features for b in self.blocks if isinstance(b, _Coupling)]
        widest = max(hidden, default=1)
        self._chunk_rows = max(64, 2**20 // (groups * widest))
        # inference cache of folded linear blocks, {inverse: (key, steps)}; see _frozen_steps
        self._folded: dict[bool, tuple[tuple[tuple[int, int], ...], list[Callable[..., tuple[Tensor, _LogDet]]]]] = {}

    def _check(self, x: Tensor, context: Tensor | None) -> None:
        _check_input(x, self.groups, self.dim)
        _check_context(context, x, self.context_features)

    @staticmethod
    def _steps(blocks: Iterable[nn.Module], inverse: bool) -> list[Callable[..., tuple[Tensor, _LogDet]]]:
        out = []
        for block in blocks:
            if isinstance(block, _Block):
                out.append(block._inverse if inverse else block._forward)
            else:
                out.append(block.inverse if inverse else block)
        return out

    def _frozen_steps(self, inverse: bool) -> list[Callable[..., tuple[Tensor, _LogDet]]] | None:
        """The steps with every run of linear blocks (ActNorm, LU, permutations) folded into one affine map.

        Only for inference: in eval mode, and when no gradient can reach the folded parameters (they do not
        require grad, or grad mode is off). The folded maps are computed once (in float64) and cached, keyed by
        the parameters' storage and version counters, so an in-place update, ``load_state_dict`` or ``.to()``
        rebuilds them. Returns None when the flow must run block by block.
        """
        if self.training:
            return None
        linear = [b for b in self.blocks if isinstance(b, _LINEAR_BLOCKS)]
        if not linear:
            return None
        params = [p for b in linear for p in b._parameters.values()]  # leaf blocks: no recursion needed
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return None
        try:
            key = tuple((p.data_ptr(), p._version) for p in params)
        except RuntimeError:  # inference tensors have no version counter: do not cache
            return None
        cached = self._folded.get(inverse)
        if cached is not None and cached[0] == key:
            return cached[1]
        dtype = next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.get_default_dtype())
        with torch.no_grad():
            forward_steps: list[Callable[..., tuple[Tensor, _LogDet]]] = []
            run: list[nn.Module] = []
            for block in self.blocks:
                if isinstance(block, _LINEAR_BLOCKS):
                    run.append(block)
                    continue
                if run:
                    forward_steps.append(_FoldedAffine.from_blocks(run, inverse, dtype))
                    run = []
                forward_steps.extend(self._steps([block], inverse))
            if run:
                forward_steps.append(_FoldedAffine.from_blocks(run, inverse, dtype))
        steps = forward_steps[::-1] if inverse else forward_steps
        self._folded[inverse] = (key, steps)
        return steps

    def _run(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        steps = self._frozen_steps(inverse)
        if steps is None:
            steps = self._steps(reversed(self.blocks) if inverse else self.blocks, inverse)
        elif (
            x.shape[0] > self._chunk_rows
            and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or (context is not None and context.requires_grad)))
        ):
            # Frozen inference on a large CPU batch: run it in chunks, so that each layer's hidden activations stay
            # in cache (up to ~2x faster for the per-joint flows, whose layers are memory-bound). A GPU gets the
            # whole batch at once.
            n = self._chunk_rows
            chunks = [
                self._run_steps(steps, x[i : i + n], None if context is None else context[i : i + n])
                for i in range(0, x.shape[0], n)
            ]
            return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
        return self._run_steps(steps, x, context)

    @staticmethod
    def _run_steps(
        steps: list[Callable[..., tuple[Tensor, _LogDet]]], x: Tensor, context: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        total: Tensor | None = None
        for step in steps:
            x, logdet = step(x, context)
            if logdet is not None:
                total = logdet if total is None else total + logdet
        return x, _full_logdet(total, x)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data to latent.

        Args:
            x: Inputs, shape (B, G, D).
            context: Conditioner inputs, shape (B, G, C), or None for a flow without context.

        Returns:
            The latent codes, shape (B, G, D), and ``log |det dz/dx|`` per group, shape (B, G).
        """
        self._check(x, context)
        return self._run(x, context, inverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Latent to data.

        Args:
            z: Latent codes, shape (B, G, D).
            context: Conditioner inputs, shape (B, G, C), or None for a flow without context.

        Returns:
            The data, shape (B, G, D), and ``log |det dx/dz|`` per group, shape (B, G).
        """
        self._check(z, context)
        return self._run(z, context, inverse=True)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Log-density under a standard-normal base.

        Args:
            x: Inputs, shape (B, G, D).
            context: Conditioner inputs, shape (B, G, C), or None.

        Returns:
            Log-density per group, shape (B, G).
        """
        z, logdet = self(x, context)
        return standard_normal_log_prob(z) + logdet

    @torch.no_grad()
    def initialize(self, x: Tensor, context: Tensor | None = None) -> None:
        """Data-dependent initialisation: run ``x`` through, initialising every ActNorm on its own input.

        Args:
            x: A representative batch, shape (N, G, D) with N >= 2.
            context: Its conditioner inputs, shape (N, G, C), or None.
        """
        self._check(x, context)
        for block, step in zip(self.blocks, self._steps(self.blocks, inverse=False), strict=True):
            if isinstance(block, ActNorm):
                block.initialize(x)
            x, _ = step(x, context)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, dim={self.dim}, context_features={self.context_features}"


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
