"""Coupling blocks: affine (RealNVP) and rational-quadratic spline couplings."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from posepriors.flows import _numba_spline
from posepriors.flows.core import _Block, _LogDet
from posepriors.grouped import GroupedMLP
from posepriors.utils import recorded_vjp, storage_key

__all__ = ["AffineCoupling", "RQSplineCoupling"]


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

    def _conditioner_input(self, x1: Tensor, context: Tensor | None) -> Tensor:
        """The conditioning dims, with the context appended when the coupling takes one."""
        return x1 if not self.context_features else torch.cat([x1, context], dim=-1)

    def _params(self, x1: Tensor, context: Tensor | None) -> Tensor:
        """Conditioner outputs (B, G, transformed * params_per_dim)."""
        return self.conditioner._run(self._conditioner_input(x1, context))

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

    # ------------------------------------------------------------------ frozen fast path
    def _frozen_forward(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, _LogDet]:
        """``_forward`` for frozen weights (no parameter needs a gradient; the caller checks).

        When a gradient w.r.t. the input or the context is needed, the whole layer is one autograd node whose
        backward is written out (:class:`_FrozenCoupling`): a fitting step then records one node per coupling
        instead of one per tensor op. Otherwise it is the plain forward.
        """
        if torch.is_grad_enabled() and (x.requires_grad or (context is not None and context.requires_grad)):
            if self.conditioner.has_input_vjp:
                return _FrozenCoupling.apply(self, x, context, False)
        return self._forward(x, context)

    def _frozen_inverse(self, z: Tensor, context: Tensor | None) -> tuple[Tensor, _LogDet]:
        """``_inverse`` for frozen weights: one autograd node (:class:`_FrozenCoupling`) where the coupling has a
        saving inverse for these inputs (:meth:`_saving_inverse`; a spline coupling on the CPU with Numba), else
        the plain inverse."""
        if torch.is_grad_enabled() and (z.requires_grad or (context is not None and context.requires_grad)):
            if self.conditioner.has_input_vjp and self._has_saving_inverse(z, context):
                return _FrozenCoupling.apply(self, z, context, True)
        return self._inverse(z, context)

    def _has_saving_inverse(self, z: Tensor, context: Tensor | None) -> bool:
        """Whether :meth:`_saving_inverse` runs on these inputs (none by default)."""
        return False

    def _saving_inverse(self, h: Tensor, z2: Tensor) -> tuple[Tensor, Tensor, object]:
        """:meth:`_saving_forward` for the inverse: the conditioner on ``h`` and the inverse transform of ``z2``,
        with what :meth:`_saving_backward` needs (where :meth:`_has_saving_inverse`)."""
        raise NotImplementedError

    def _join(self, a1: Tensor, a2: Tensor) -> Tensor:
        """A (B, G, D) tensor from its conditioning part ``a1`` and transformed part ``a2``."""
        if self._layout == 1:
            return torch.cat([a1, a2], dim=-1)
        if self._layout == 2:
            return torch.cat([a2, a1], dim=-1)
        out = a1.new_empty(*a1.shape[:-1], self.dim)
        return out.index_copy_(-1, self.conditioning_index, a1).index_copy_(-1, self.transformed_index, a2)

    def _saving_forward(self, h: Tensor, x2: Tensor) -> tuple[Tensor, Tensor, object]:
        """For :class:`_FrozenCoupling`: the conditioner on its inputs ``h`` (B, G, k + C) and the transform of the
        transformed dims ``x2`` (B, G, n): the outputs, the log-determinant (B, G) and what
        :meth:`_saving_backward` needs."""
        params, hidden = self.conditioner.run_saving(h)
        y2, logdet, saved = self._transform_saving(x2, params)
        return y2, logdet, (hidden, saved)

    def _saving_backward(self, state: object, grad_y2: Tensor, grad_logdet: Tensor) -> tuple[Tensor, Tensor]:
        """The gradients w.r.t. ``x2`` and ``h`` of :meth:`_saving_forward`, from those w.r.t. its outputs and
        log-determinant (the conditioner's subnormal gradients flushed to zero)."""
        hidden, saved = state
        grad_x2, grad_params = self._transform_vjp(saved, grad_y2, grad_logdet)
        return grad_x2, self.conditioner.input_vjp(hidden, _flush_subnormal(grad_params))

    def _transform_saving(self, x2: Tensor, params: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """The forward transform, its log-determinant (B, G) and what :meth:`_transform_vjp` needs."""
        raise NotImplementedError

    def _transform_vjp(self, saved: tuple[Tensor, ...], grad_y: Tensor, grad_logdet: Tensor) -> tuple[Tensor, Tensor]:
        """Gradients w.r.t. the transformed inputs (B, G, n) and the conditioner outputs (B, G, n * P), given those
        w.r.t. the outputs (B, G, n) and the log-determinant (B, G)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"mask={self.mask.int().tolist()}, context_features={self.context_features}"


def _flush_subnormal(t: Tensor) -> Tensor:
    """``t`` with its subnormal entries (below the dtype's smallest normal number) set to zero.

    A pose that the flow finds very unlikely gets a tiny share of a mixture's gradient (the broad component takes
    the rest); carried through a coupling's backward, such gradients become subnormal floats, on which a CPU's
    matrix multiplies run tens of times slower. Dropping them changes no value by more than that smallest normal.
    """
    info = torch.finfo(t.dtype)
    return F.hardshrink(t, info.tiny * (1 - info.eps))  # one op: 0 where |t| <= the largest subnormal


class _FrozenCoupling(torch.autograd.Function):
    """A coupling layer with frozen weights as one autograd node: ``(x, context) -> (z, log |det dz/dx|)``, or the
    inverse ``(z, context) -> (x, log |det dx/dz|)`` (``inverse=True``; the couplings with a saving inverse).

    The forward runs without recording; the backward is the layer's vector-Jacobian product written out (the
    element-wise transform's partial derivatives, then the conditioner's input VJP), so a fitting step's backward
    costs a few dozen small ops per layer instead of an autograd node per forward op. Gradients flow to ``x`` and
    ``context`` only; the weights get none (the caller uses this only when no weight requires grad). A backward
    with ``create_graph=True`` (second derivatives: a Hessian) runs the layer's tensor ops instead, whose graph is
    differentiable again.
    """

    @staticmethod
    def forward(
        ctx,  # noqa: ANN001
        coupling: _Coupling,
        x: Tensor,
        context: Tensor | None,
        inverse: bool,
    ) -> tuple[Tensor, Tensor]:
        x1, x2 = coupling._split(x)
        h = coupling._conditioner_input(x1, context)
        y2, logdet, ctx.state = (coupling._saving_inverse if inverse else coupling._saving_forward)(h, x2)
        ctx.coupling, ctx.inverse = coupling, inverse
        ctx.context_shape = None if h is x1 else context.shape
        ctx.save_for_backward(x, context)  # for a create_graph backward (and an in-place change raises)
        return coupling._merge(x, x1, y2), logdet

    @staticmethod
    def backward(ctx, grad_z: Tensor, grad_logdet: Tensor) -> tuple[None, Tensor, Tensor | None, None]:  # noqa: ANN001
        coupling: _Coupling = ctx.coupling
        if torch.is_grad_enabled():  # create_graph: the tensor ops' backward, itself differentiable
            run = coupling._inverse if ctx.inverse else coupling._forward
            return (None, *recorded_vjp(run, ctx.saved_tensors, (grad_z, grad_logdet)), None)
        grad_z, grad_logdet = _flush_subnormal(grad_z), _flush_subnormal(grad_logdet)
        grad_z1, grad_z2 = coupling._split(grad_z)
        grad_x2, grad_h = coupling._saving_backward(ctx.state, grad_z2, grad_logdet)
        grad_context = None
        if ctx.context_shape is not None:
            grad_h, grad_context = grad_h.split((coupling.num_conditioning, ctx.context_shape[-1]), dim=-1)
        grad_x = _flush_subnormal(coupling._join(grad_z1 + grad_h, grad_x2))
        return None, grad_x, None if grad_context is None else _flush_subnormal(grad_context), None


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

    def _transform_saving(self, x2: Tensor, params: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        raw, shift = params.chunk(2, dim=-1)
        if self.scale_fn == "softclamp":
            bounded = torch.tanh(raw * (1 / self.clamp))
            s, ds_draw = bounded * self.clamp, 1 - bounded.square()
        else:
            s, ds_draw = raw, None
        scale = torch.exp(s)
        return torch.addcmul(shift, x2, scale), s.sum(-1), (x2, scale, ds_draw)

    def _transform_vjp(self, saved: tuple[Tensor, ...], grad_y: Tensor, grad_logdet: Tensor) -> tuple[Tensor, Tensor]:
        x2, scale, ds_draw = saved
        grad_x2 = grad_y * scale
        grad_s = torch.addcmul(grad_logdet.unsqueeze(-1), grad_x2, x2)  # d/ds: grad_y * x2 * e^s + grad_logdet
        grad_raw = grad_s if ds_draw is None else grad_s * ds_draw
        return grad_x2, torch.cat([grad_raw, grad_y], dim=-1)

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
        self._size_factors: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor, Tensor]] = {}
        # columns of a bin's left x knot, left y knot, width, height, left and right derivative in the table
        # [x knots (K) | y knots (K) | widths (K) | heights (K) | derivatives (K + 1)] built by _transform
        K = bins
        self.register_buffer("_columns", torch.tensor([0, K, 2 * K, 3 * K, 4 * K, 4 * K + 1]), persistent=False)

    def _forward(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, _LogDet]:
        if not self._scoring_kernel(x, context):
            return super()._forward(x, context)
        return self._scored(x, context, inverse=False)

    def _inverse(self, z: Tensor, context: Tensor | None) -> tuple[Tensor, _LogDet]:
        if not self._scoring_kernel(z, context):
            return super()._inverse(z, context)
        return self._scored(z, context, inverse=True)

    def _scored(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, _LogDet]:
        """The coupling (or its inverse) with nothing to record: the conditioner's last layer runs as two GEMMs whose
        outputs are the bin logits and the knot-derivative logits, each contiguous and param-major, for one
        vectorised op each and the vectorised loop (posepriors.flows._numba_spline.score)."""
        x1, x2 = self._split(x)
        hidden = self.conditioner._run_hidden(self._conditioner_input(x1, context))
        if hidden.dim() == 3:  # several groups, a few values each: the loop runs down the batch (column layout)
            y2, logdet = _numba_spline.score_columns(
                self, x2.permute(1, 2, 0), *self._last_columns(hidden), inverse=inverse
            )
            return self._merge(x, x1, y2.permute(2, 0, 1)), logdet.t()
        y2, logdet = _numba_spline.score(self, x2.squeeze(1), *self._last_parts(hidden), inverse=inverse)
        return self._merge(x, x1, y2.unsqueeze(1)), logdet.unsqueeze(1)

    def _has_saving_inverse(self, z: Tensor, context: Tensor | None) -> bool:
        return self._vectorised(z, context)

    def _saving_forward(self, h: Tensor, x2: Tensor) -> tuple[Tensor, Tensor, object]:
        if not self._vectorised(x2, h):  # a fitting step through the same loop, and its backward
            return super()._saving_forward(h, x2)
        return self._saving_loop(h, x2, inverse=False)

    def _saving_inverse(self, h: Tensor, z2: Tensor) -> tuple[Tensor, Tensor, object]:
        return self._saving_loop(h, z2, inverse=True)

    def _saving_loop(self, h: Tensor, x2: Tensor, inverse: bool) -> tuple[Tensor, Tensor, object]:
        """:meth:`_saving_forward` (or :meth:`_saving_inverse`) through the vectorised loop: what
        :meth:`_saving_backward` needs is the conditioner's saved activations and the loop's state."""
        hidden, saved = self.conditioner.run_saving_hidden(h)
        y2, logdet, state = _numba_spline.score_saving(
            self, self._rows(x2, hidden), *self._last_parts(hidden), inverse=inverse
        )
        grouped = hidden.dim() == 3
        return self._unrows(y2, grouped), self._unrows(logdet, grouped), (saved, state)

    def _saving_backward(self, state: object, grad_y2: Tensor, grad_logdet: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(state[1], _numba_spline.ScoringState):
            return super()._saving_backward(state, grad_y2, grad_logdet)
        saved, scoring = state
        grouped = len(scoring.shape) == 3
        grad_x2, grad_params = _numba_spline.score_backward(
            self, scoring, grad_y2.transpose(0, 1) if grouped else grad_y2.squeeze(1),
            grad_logdet.transpose(0, 1) if grouped else grad_logdet.squeeze(1),
        )  # fmt: skip
        weight = self._scoring_weights()[2]  # the whole last layer, param-major
        return self._unrows(grad_x2, grouped), self.conditioner.input_vjp(
            saved, None, last=(_flush_subnormal(grad_params), weight)
        )

    def _last_parts(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """The bin logits (rows, 2Kn) and knot-derivative logits (rows, (K - 1) n), param-major, from the
        conditioner's last hidden activation in its GEMMs' layout (:meth:`_scoring_weights`)."""
        (bin_weight, bin_bias), (derivative_weight, derivative_bias), *_ = self._scoring_weights()
        apply = self.conditioner._apply_last
        return apply(hidden, bin_weight, bin_bias), apply(hidden, derivative_weight, derivative_bias)

    def _last_columns(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`_last_parts` in the column layout, from a grouped conditioner's last hidden activation (G, B,
        hidden): the bin logits (G, 2Kn, B) and the knot-derivative logits (G, (K - 1) n, B), param-major down
        the second dimension."""
        (bin_weight, bin_bias), (derivative_weight, derivative_bias) = self._scoring_weights()[3]
        columns = hidden.transpose(1, 2)
        return torch.baddbmm(bin_bias, bin_weight, columns), torch.baddbmm(derivative_bias, derivative_weight, columns)

    @staticmethod
    def _rows(t: Tensor, hidden: Tensor) -> Tensor:
        """A (B, G, ...) tensor in the conditioner GEMMs' row order: (B, ...) for one group, (G, B, ...) else."""
        return t.transpose(0, 1) if hidden.dim() == 3 else t.squeeze(1)

    @staticmethod
    def _unrows(t: Tensor, grouped: bool) -> Tensor:
        """:meth:`_rows` undone: (G, B, ...) to (B, G, ...) for several groups, (B, ...) to (B, 1, ...) for one."""
        return t.transpose(0, 1) if grouped else t.unsqueeze(1)

    def _scoring_kernel(self, x: Tensor, context: Tensor | None) -> bool:
        """Whether :meth:`_forward` scores with the vectorised loop: no autograd to record, and
        :meth:`_vectorised`."""
        recording = torch.is_grad_enabled() and (
            x.requires_grad
            or (context is not None and context.requires_grad)
            or any(p.requires_grad for p in self.conditioner.parameters())
        )
        return not recording and self._vectorised(x, context)

    def _vectorised(self, x: Tensor, context: Tensor | None = None) -> bool:
        """Whether the vectorised loops (``_numba_spline.score``, ``score_saving``) cover this coupling on ``x`` and
        the conditioner's other inputs ``context``: a bin count they have a loop for (``_numba_spline.SCORING_BINS``),
        the kernels usable on ``x`` and the weights (``_numba_spline.usable``), and nothing watching the context or
        the weights either (no forward-mode tangent, tracer or transform: the loops would drop it)."""
        weight = self.conditioner._linears[-1].weight
        return (
            self.bins in _numba_spline.SCORING_BINS
            and (context is None or _numba_spline.plain_cpu(context))
            and all(_numba_spline.untouched(p) for p in self.conditioner.parameters())
            and _numba_spline.usable(x, weight.detach())  # detach: a plain tensor (a Parameter is not)
        )

    def _clear_caches(self) -> None:
        """Forget the scoring loop's copy of the last layer (:meth:`_scoring_weights`)."""
        self.__dict__.pop("_scoring_cache", None)

    def _scoring_weights(
        self,
    ) -> tuple[
        tuple[Tensor, Tensor],
        tuple[Tensor, Tensor],
        Tensor,
        tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]] | None,
    ]:
        """The conditioner's last layer, param-major, for the vectorised loops: (weight, bias) of the 2K bin logits
        and of the K - 1 knot-derivative logits of every transformed value (outputs that reshape to (rows, 2K, n)
        and (rows, K - 1, n); the last layer writes them value-major, value i's 3K - 1 parameters together; the
        derivatives' bias includes the shift ``_derivative_shift``), the two weights side by side (for the
        backward's one GEMM), and the first two transposed (for :meth:`_last_columns`; None for one group, which
        never runs in the column layout). Cached, and rebuilt when the weights change."""
        last = self.conditioner._linears[-1]
        # keyed on the tensors themselves (held, so that a new tensor at a freed address cannot match) and
        # ``storage_key`` (None for inference tensors: not cached); a change through .data (no version bump) is not
        # seen, as for every cache of frozen weights here (PosePrior.clear_caches forgets them)
        key = (last.weight, last.bias, storage_key((last.weight, last.bias)))
        cached = self.__dict__.get("_scoring_cache")
        if (
            cached is None
            or key[2] is None
            or not (cached[0][0] is key[0] and cached[0][1] is key[1] and cached[0][2] == key[2])
        ):
            n, K = self.num_transformed, self.bins
            # plain tensors even inside inference mode: a later fitting step's backward uses them
            with torch.inference_mode(False), torch.no_grad():
                order = torch.arange(n * (3 * K - 1), device=last.weight.device).view(n, 3 * K - 1).t().flatten()
                weight, bias = last.weight[..., order].contiguous(), last.bias[..., order].contiguous()
                split = 2 * K * n
                # the knot-derivative logits come out shifted (the loops take softplus(raw + shift)): one op less
                shifted = bias[..., split:] + self._derivative_shift
                columns = None  # the same, transposed, for _last_columns (several groups only): (G, outputs, hidden)
                if weight.shape[0] > 1:
                    columns = tuple(
                        (w.transpose(-1, -2).contiguous(), b.unsqueeze(-1))
                        for w, b in ((weight[..., :split], bias[..., :split]), (weight[..., split:], shifted))
                    )
            parts = ((weight[..., :split], bias[..., :split]), (weight[..., split:], shifted), weight, columns)
            cached = (key, parts)
            if key[2] is not None:
                self.__dict__["_scoring_cache"] = cached
        return cached[1]

    def _factors(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The bin sizes' (2, 1) scale and offset, and a (K, K) matrix of ones, in ``like``'s dtype and device."""
        key = (like.dtype, like.device)
        if key not in self._size_factors:
            minimum = torch.tensor([[self.min_width], [self.min_height]], dtype=torch.float64)
            scale, offset = 2 * self.bound * (1 - minimum * self.bins), 2 * self.bound * minimum
            ones = torch.ones(self.bins, self.bins, dtype=like.dtype, device=like.device)
            self._size_factors[key] = (scale.to(like.device, like.dtype), offset.to(like.device, like.dtype), ones)
        return self._size_factors[key]

    _LOGIT_LIMIT = 50.0
    """Bin logits are clamped to +-this before the softmax: exp cannot overflow, and the sizes' floor makes the
    clamp invisible (beyond it a bin is already at its minimum or holds all the rest)."""

    def _bin_probabilities(self, raw_sizes: Tensor) -> tuple[Tensor, Tensor]:
        """Softmax over the K bins of the (..., 2, K) width and height logits, and where the clamp is inactive.

        Written as exp / (exp @ ones) on a contiguous copy: PyTorch's CPU softmax over a last dim of a few bins,
        and any element-wise op on the strided slice of the conditioner outputs, are an order of magnitude slower.
        """
        limit = self._LOGIT_LIMIT
        logits = raw_sizes.clamp(-limit, limit)
        weights = logits.exp()
        probs = weights / (weights @ self._factors(raw_sizes)[2])
        return probs, raw_sizes.abs() < limit

    def _spline_table(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The knot table of every transformed dim from the conditioner outputs (B, G, n * (3K - 1)).

        Returns:
            The bin probabilities (B, G, n, 2, K) and where their logits are unclamped, the shifted derivative
            logits (B, G, n, K - 1), the left knots (B, G, n, 2, K; x in row 0, y in row 1, the first exactly
            -bound) and the table ``[x knots | y knots | widths | heights | derivatives]`` (B, G, n, 5K + 1).
        """
        K = self.bins
        raw_sizes, raw_derivs = params.unflatten(-1, (self.num_transformed, 3 * K - 1)).split((2 * K, K - 1), -1)
        scale, offset, _ = self._factors(params)
        probs, unclamped = self._bin_probabilities(raw_sizes.unflatten(-1, (2, K)))
        sizes = torch.addcmul(offset, probs, scale)
        left = torch.cumsum(sizes, -1).sub(sizes).sub_(self.bound)
        shifted = raw_derivs + self._derivative_shift
        derivs = F.pad(F.softplus(shifted) + self.min_derivative, (1, 1), value=1.0)
        table = torch.cat([left.flatten(-2), sizes.flatten(-2), derivs], -1)
        return probs, unclamped, shifted, left, table

    def _bin_entries(self, table: Tensor, left: Tensor, v: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """The table columns of each value's bin (B, G, n, 6) and its six entries (6, B, G, n): left x and y knot,
        width, height, left and right derivative. The bin is how many inner knots are <= v (in y for the
        inverse); each entry is its own contiguous tensor (element-wise ops on a stride-6 view are several
        times slower)."""
        columns = (v.unsqueeze(-1) >= left[..., int(inverse), 1:]).sum(-1, keepdim=True) + self._columns
        return columns, table.gather(-1, columns).movedim(-1, 0).contiguous()

    def _transform(self, x2: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        if (
            not inverse
            and not (torch.is_grad_enabled() and (x2.requires_grad or params.requires_grad))
            and _numba_spline.usable(x2, params)
        ):  # no autograd to record: the fused CPU kernel (posepriors.flows._numba_spline), where Numba is installed
            out, logdet, _ = _numba_spline.forward(self, x2, params)
            return out, logdet
        # Written for few tensor ops (each op costs microseconds of overhead on a single pose, forward and
        # backward): one softmax and one cumsum for widths and heights together, one table, one gather.
        B = self.bound
        _, _, _, left, table = self._spline_table(params)
        # the spline is evaluated on the clamped value and the tails are put back at the end (hardtanh is a clamp
        # whose backward is one op; its zero gradient at +-B does not matter, the ends go to the identity branch)
        v = F.hardtanh(x2, -B, B)
        _, (x_k, y_k, w_k, h_k, d_k, d_k1) = self._bin_entries(table, left, v, inverse)
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

    def _transform_saving(self, x2: Tensor, params: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        # The forward spline of _transform in the bin-local form that _transform_vjp differentiates:
        # xi = (x - x_k) / w_k, s = h_k / w_k, t = xi (1 - xi), y = y_k + h_k P / Q with P = s xi^2 + d_k t and
        # Q = s + c t, c = d_k + d_k1 - 2 s; dy/dx = s^2 M / Q^2 with M = d_k1 xi^2 + 2 s t + d_k (1 - xi)^2.
        # On the CPU with Numba installed, the same formulas run as one fused kernel (posepriors.flows._numba_spline).
        if _numba_spline.usable(x2, params):
            return _numba_spline.forward(self, x2, params)
        probs, unclamped, shifted, left, table = self._spline_table(params)
        v = F.hardtanh(x2, -self.bound, self.bound)
        columns, (x_k, y_k, w_k, h_k, d_k, d_k1) = self._bin_entries(table, left, v, inverse=False)
        s_k = h_k / w_k
        xi = (v - x_k).div_(w_k)
        xi_1m = 1 - xi
        t = xi * xi_1m
        c = (d_k + d_k1).sub_(s_k, alpha=2)
        q = torch.addcmul(s_k, c, t)
        xi_sq = xi.square()
        p = torch.addcmul(d_k * t, s_k, xi_sq)
        g = p / q
        m = torch.addcmul(torch.addcmul(d_k1 * xi_sq, s_k, t, value=2), d_k, xi_1m.square())
        outside = v != x2  # the ends and beyond: the identity (the spline's value and slope there)
        out = torch.where(outside, x2, torch.addcmul(y_k, h_k, g))
        logdet = torch.log(m * s_k.square()).sub_(torch.log(q), alpha=2).masked_fill_(outside, 0.0).sum(-1)
        bins = (probs, unclamped, shifted, columns)
        return out, logdet, (bins, (xi, xi_1m, xi_sq, t, s_k, c, q, p, g, m, w_k, h_k, d_k, d_k1, outside))

    def _transform_vjp(self, saved: tuple[Tensor, ...], grad_y: Tensor, grad_logdet: Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(saved, _numba_spline.Saved):
            return _numba_spline.backward(self, saved, grad_y, grad_logdet)
        (probs, unclamped, shifted, columns), elements = saved
        xi, xi_1m, xi_sq, t, s_k, c, q, p, g, m, w_k, h_k, d_k, d_k1, outside = elements
        K = self.bins
        inside = (~outside).to(grad_y.dtype)
        gy = grad_y * inside  # the tails are the identity: no gradient to the spline's parameters there
        gl = grad_logdet.unsqueeze(-1) * inside
        inv_q, inv_m = q.reciprocal(), m.reciprocal()
        one_2t = 1 - 2 * t
        one_2xi = 1 - 2 * xi
        # partials w.r.t. (xi, s, d_k, d_k1): of P / Q times Q^2, and of the log-determinant ld = log(s^2 M / Q^2)
        # (stacked in front, so that every slice stays contiguous)
        dy = torch.stack([s_k * m, xi_sq * q - p * one_2t, t * (q - p), -t * p])
        dm = torch.stack([2 * (d_k1 * xi + s_k * one_2xi - d_k * xi_1m), 2 * t, xi_1m.square(), xi_sq])
        dq = torch.stack([c * one_2xi, one_2t, t, t])
        dld = torch.addcmul(dm * inv_m, dq, inv_q, value=-2)
        dld[1] += 2 / s_k
        a_xi, a_s, a_d0, a_d1 = torch.addcmul(gl * dld, dy, gy * h_k * inv_q.square())
        # through xi = (x - x_k) / w_k and s = h_k / w_k to the table entries (x_k, y_k, w_k, h_k, d_k, d_k1)
        inv_w = w_k.reciprocal()
        grad_xi = a_xi * inv_w
        grad_x2 = torch.where(outside, grad_y, grad_xi)
        grad_s = a_s * inv_w
        grad_w = torch.addcmul(grad_s * s_k, xi, grad_xi).neg_()
        grad_h = torch.addcmul(grad_s, gy, g)
        entries = torch.stack([-grad_xi, gy, grad_w, grad_h, a_d0, a_d1], -1)
        table = entries.new_zeros(*entries.shape[:-1], 5 * K + 1).scatter_add_(-1, columns, entries)
        grad_left, grad_sizes, grad_derivs = table.split((2 * K, 2 * K, K + 1), -1)
        grad_left = grad_left.unflatten(-1, (2, K))
        # a left knot is the sum of the sizes before it: sizes get the sum of the left-knot gradients after them
        grad_sizes = grad_sizes.unflatten(-1, (2, K)) + grad_left.sum(-1, keepdim=True) - grad_left.cumsum(-1)
        grad_probs = grad_sizes * self._factors(grad_y)[0]
        grad_raw_sizes = probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True)) * unclamped
        grad_raw_derivs = grad_derivs[..., 1:K] * torch.sigmoid(shifted)
        return grad_x2, torch.cat([grad_raw_sizes.flatten(-2), grad_raw_derivs], -1).flatten(-2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bins={self.bins}, bound={self.bound}"
