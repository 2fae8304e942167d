"""Grouped linear maps and MLPs: G independent networks applied at once, as one batched matrix product.

Inputs have shape (B, G, features); every parameter has the group as its first dim, so the networks of a subset
of groups run by passing the parameters' rows to :func:`torch.func.functional_call`. Used by the flows'
coupling conditioners and by the hand VAE.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "GroupedLinear", "GroupedMLP", "check_grouped"]


def _silu_(h: Tensor) -> Tensor:
    return F.silu(h, inplace=True)


def _elu_(h: Tensor) -> Tensor:
    return F.elu(h, inplace=True)


# module-level functions, not lambdas: a module holding one must pickle (torch.save, spawned workers)
ACTIVATIONS: dict[str, tuple[type[nn.Module], Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "silu": (nn.SiLU, F.silu, _silu_),
    "relu": (nn.ReLU, F.relu, torch.relu_),
    "elu": (nn.ELU, F.elu, _elu_),
    "gelu": (nn.GELU, F.gelu, F.gelu),  # no in-place form
    "tanh": (nn.Tanh, torch.tanh, torch.tanh_),
}
"""name -> (module, function, in-place function). The in-place form runs where autograd does not record
(inference): a large batch then skips allocating (and, on CPU, page-faulting in) a fresh hidden-activation tensor
per layer."""


def check_grouped(x: Tensor, groups: int | None, dim: int, name: str = "input") -> None:
    """Raise unless ``x`` is a Tensor of shape (B, groups, dim) (any G when ``groups`` is None).

    Raises:
        TypeError: When ``x`` is not a Tensor.
        ValueError: On a wrong shape, naming the expected and the given one.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"expected {name} to be a Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[2] != dim or (groups is not None and x.shape[1] != groups):
        expected = f"(B, {'G' if groups is None else groups}, {dim})"
        raise ValueError(f"expected {name} of shape {expected}, got {tuple(x.shape)}")


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
        check_grouped(x, self.weight.shape[0], self.in_features)
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
        if activation not in ACTIVATIONS:
            raise ValueError(f"expected activation in {sorted(ACTIVATIONS)}, got {activation!r}")
        if isinstance(num_hidden_layers, bool) or not isinstance(num_hidden_layers, int) or num_hidden_layers < 1:
            raise ValueError(f"expected num_hidden_layers to be an integer >= 1, got {num_hidden_layers!r}")
        module, function, inplace = ACTIVATIONS[activation]
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
        self.activation = activation
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
        check_grouped(x, self._linears[0].weight.shape[0], self.in_features)
        return self._run(x)

    def _run(self, x: Tensor) -> Tensor:
        """``forward`` without input checks."""
        last = self._linears[-1]
        return self._to_groups(self._apply_last(self._run_hidden(x), last.weight, last.bias))

    def _run_hidden(self, x: Tensor, saved: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """The last hidden layer's activation of :meth:`_run`, in the layout of its GEMMs: (B, hidden) for one group
        (the global flow: plain 2-D GEMMs), (G, B, hidden) for several (one batched GEMM per layer over the groups;
        see :meth:`_apply_last`). With ``saved``, each hidden layer's pre-activation and activation are appended to
        it (for :meth:`input_vjp`); without, an activation that autograd does not record runs in place."""
        *hidden_layers, last = self._linears
        act, act_ = self._activation, self._activation_
        one_group = x.shape[1] == 1 and last.weight.shape[0] == 1
        h = x.squeeze(1) if one_group else x.transpose(0, 1)  # views whose backward is a view too
        for layer in hidden_layers:
            if one_group:
                a = torch.addmm(layer.bias[0], h, layer.weight[0])
            else:
                a = torch.baddbmm(layer.bias.unsqueeze(1), h, layer.weight)
            h = act(a) if saved is not None or a.requires_grad else act_(a)
            if saved is not None:
                saved.append((a, h))
        return h

    @staticmethod
    def _to_groups(out: Tensor) -> Tensor:
        """:meth:`_apply_last`'s output in the (B, G, out) layout."""
        return out.unsqueeze(1) if out.dim() == 2 else out.transpose(0, 1)

    @staticmethod
    def _apply_last(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """A last layer (weight (G, hidden, out), bias (G, out)) on :meth:`_run_hidden`'s output, in its layout:
        (B, out) for one group, (G, B, out) for several."""
        if h.dim() == 2:
            return torch.addmm(bias[0], h, weight[0])
        return torch.baddbmm(bias.unsqueeze(1), h, weight)

    # ------------------------------------------------------------------ frozen fast path (see flows.couplings)
    @property
    def has_input_vjp(self) -> bool:
        """Whether :meth:`run_saving` / :meth:`input_vjp` support this MLP's activation."""
        return self.activation in _DERIVATIVES

    def run_saving(self, x: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """``forward`` without checks that also returns what :meth:`input_vjp` needs (no autograd recording).

        Args:
            x: Inputs, shape (B, G, in_features).

        Returns:
            The outputs (B, G, out_features) and, per hidden layer, its pre-activation and activation.
        """
        h, saved = self.run_saving_hidden(x)
        last = self._linears[-1]
        return self._to_groups(self._apply_last(h, last.weight, last.bias)), saved

    def run_saving_hidden(self, x: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """:meth:`run_saving` up to the last hidden layer: its activation in the GEMMs' layout (as
        :meth:`_run_hidden`) and, per hidden layer, its pre-activation and activation."""
        saved: list[tuple[Tensor, Tensor]] = []
        return self._run_hidden(x, saved), saved

    def input_vjp(
        self, saved: list[tuple[Tensor, Tensor]], grad: Tensor | None, last: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """The gradient w.r.t. the input of ``(outputs * grad).sum()``, for frozen weights.

        Args:
            saved: What :meth:`run_saving` (or :meth:`run_saving_hidden`) returned with the outputs.
            grad: Gradient w.r.t. the outputs, shape (B, G, out_features); None with ``last``.
            last: Instead of ``grad``, the gradient w.r.t. the outputs and the last layer's weight (G, hidden, out)
                in the GEMMs' layout of :meth:`_apply_last` (a spline coupling's reordered last layer).

        Returns:
            Gradient w.r.t. the inputs, shape (B, G, in_features).
        """
        derivative = _DERIVATIVES[self.activation]
        linears = self._linears
        if last is None:
            one_group = grad.shape[1] == 1 and linears[-1].weight.shape[0] == 1
            last = (grad.squeeze(1) if one_group else grad.transpose(0, 1), linears[-1].weight)
        g, weight = last
        one_group = g.dim() == 2  # plain 2-D GEMMs
        g = g @ weight[0].T if one_group else torch.bmm(g, weight.transpose(1, 2))
        a, h = saved[-1]
        g = g * derivative(a, h)
        for layer, (a, h) in zip(reversed(linears[1:-1]), reversed(saved[:-1]), strict=True):
            g = (g @ layer.weight[0].T if one_group else torch.bmm(g, layer.weight.transpose(1, 2))) * derivative(a, h)
        first = linears[0].weight
        return (g @ first[0].T).unsqueeze(1) if one_group else torch.bmm(g, first.transpose(1, 2)).transpose(0, 1)


def _silu_derivative(a: Tensor, h: Tensor) -> Tensor:
    sig = torch.sigmoid(a)  # silu'(a) = sig + silu(a) (1 - sig)
    return torch.addcmul(sig, h, 1 - sig)


_DERIVATIVES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "silu": _silu_derivative,
    "relu": lambda a, h: (a > 0).to(a.dtype),
    "tanh": lambda a, h: 1 - h.square(),
    "elu": lambda a, h: torch.where(a > 0, 1.0, h + 1),
}
"""Activation derivatives from the pre-activation ``a`` and the activation ``h`` (no entry: no fast path)."""
