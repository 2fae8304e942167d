"""Frozen flows in NumPy for small CPU batches: the folded linear maps and the spline couplings, forward and
vector-Jacobian product.

On one pose a coupling layer is a few hundred element-wise operations on arrays of a few dozen numbers, so the time
is the per-call overhead: about 2 us for a PyTorch op (and an autograd node each) against 0.5 us for a NumPy ufunc.
``FlowSequence`` therefore runs a frozen flow whose input is a small float CPU batch through :func:`flow_forward` /
:func:`flow_backward`, one autograd node for the whole flow (see ``flows.sequence._NumpyFlow``). The formulas are
those of ``RQSplineCoupling._transform_saving`` / ``_transform_vjp`` and of the grouped MLP's ``run_saving`` /
``input_vjp``, and ``tests/test_fast_paths.py`` checks that both paths agree to float round-off. Nothing here records
autograd.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from posepriors.flows import _numba_spline
from posepriors.flows.couplings import RQSplineCoupling

if TYPE_CHECKING:
    from posepriors.flows.sequence import _FoldedAffine

__all__ = ["Plan", "affine_arrays", "coupling_step", "flow_backward", "flow_forward", "same_spline", "supports"]


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * a)  # no overflow for any a (exp(-a) overflows below -88 in float32)


_ACTIVATIONS = {  # activation, and its derivative from the pre-activation a and the activation h
    "silu": (lambda a: a * _sigmoid(a), lambda a, h: (s := _sigmoid(a)) + h * (1 - s)),
    "relu": (lambda a: np.maximum(a, 0), lambda a, h: (a > 0).astype(a.dtype)),
    "tanh": (np.tanh, lambda a, h: 1 - h * h),
    "elu": (lambda a: np.where(a > 0, a, np.expm1(np.minimum(a, 0))), lambda a, h: np.where(a > 0, 1.0, h + 1)),
}


def supports(coupling: RQSplineCoupling, dtype: torch.dtype) -> bool:
    """Whether the kernels cover this coupling: its conditioner's activation, biases on every layer, weights on the
    CPU in ``dtype``."""
    mlp = coupling.conditioner
    return mlp.activation in _ACTIVATIONS and all(
        layer.bias is not None and layer.weight.dtype == dtype and layer.weight.device.type == "cpu"
        for layer in mlp._linears
    )


def same_spline(a: RQSplineCoupling, b: RQSplineCoupling) -> bool:
    """Whether two couplings run the same spline on the same dims (their weights may differ), so that their weights
    can be stacked as the groups of one."""
    return (
        (a.dim, a.bins, a.bound, a.min_width, a.min_height, a.min_derivative, a.context_features, a._layout)
        == (b.dim, b.bins, b.bound, b.min_width, b.min_height, b.min_derivative, b.context_features, b._layout)
        and a.conditioner.activation == b.conditioner.activation
        and bool(torch.equal(a.mask, b.mask))
        and [layer.weight.shape for layer in a.conditioner._linears]
        == [layer.weight.shape for layer in b.conditioner._linears]
    )


_add = np.add.reduce  # a sum without ndarray.sum's Python wrapper


def _flush_subnormal(t: np.ndarray, tiny: float) -> np.ndarray:
    """``t`` with its subnormal entries (below ``tiny``, the dtype's smallest normal number) set to zero (see
    ``couplings._flush_subnormal``: subnormal floats make a CPU's arithmetic tens of times slower)."""
    return np.where(np.abs(t) < tiny, 0, t)


_ROWS: dict[tuple[int, int], np.ndarray] = {}


def _row_offsets(rows: int, width: int) -> np.ndarray:
    """``arange(rows) * width``: where each row of a flattened (rows, width) table starts (cached)."""
    key = (rows, width)
    if key not in _ROWS:
        if len(_ROWS) >= 64:
            _ROWS.pop(next(iter(_ROWS)))
        _ROWS[key] = np.arange(rows) * width
    return _ROWS[key]


def coupling_step(coupling: RQSplineCoupling, like: torch.Tensor) -> tuple[RQSplineCoupling, list, tuple]:
    """A spline coupling as a plan step for inputs like ``like``: ``(coupling, weights, constants)``.

    ``weights`` are the conditioner's (weight (G, in, out), bias (G, out), contiguous transposed weight (G, out, in))
    per layer as arrays (the first two share the parameters' memory; the caller rebuilds the step when the weights
    change); ``constants`` are the coupling's own bin-size factors (``_factors``), its table columns (``_columns``)
    shaped (6, 1, 1, 1), and the dtype's smallest normal number.
    """
    layers = [(layer.weight.detach().numpy(), layer.bias.detach().numpy()) for layer in coupling.conditioner._linears]
    weights = [(w, b, np.ascontiguousarray(w.transpose(0, 2, 1))) for w, b in layers]
    scale, offset, _ = coupling._factors(like)
    columns = coupling._columns.cpu().numpy().reshape(6, 1, 1, 1)
    return coupling, weights, (scale.numpy(), offset.numpy(), columns, float(torch.finfo(like.dtype).tiny))


def affine_arrays(step: _FoldedAffine) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """A folded linear map's matrix (G, D, D), offset (G, D), log-determinant (G,) and whether G is 1."""
    return step.matrix.numpy(), step.offset.numpy(), step.logdet.numpy(), step.single


def _mlp_saving(coupling: RQSplineCoupling, weights: list, x: np.ndarray) -> tuple[np.ndarray, list]:
    """The conditioner (the weights of its :func:`coupling_step`) on ``x`` (B, G, in): its outputs (B, G, out) and the
    per-hidden-layer (pre-activation, activation)."""
    act = _ACTIVATIONS[coupling.conditioner.activation][0]
    saved = []
    if x.shape[1] == 1 and weights[-1][0].shape[0] == 1:  # one group: plain 2-D products
        h = x[:, 0]
        for w, b, _ in weights[:-1]:
            a = h @ w[0] + b[0]
            h = act(a)
            saved.append((a, h))
        w, b, _ = weights[-1]
        return (h @ w[0] + b[0])[:, None], saved
    h = x.transpose(1, 0, 2)  # (G, B, in)
    for w, b, _ in weights[:-1]:
        a = np.matmul(h, w) + b[:, None]
        h = act(a)
        saved.append((a, h))
    w, b, _ = weights[-1]
    return (np.matmul(h, w) + b[:, None]).transpose(1, 0, 2), saved


def _mlp_input_vjp(coupling: RQSplineCoupling, weights: list, saved: list, grad: np.ndarray) -> np.ndarray:
    derivative = _ACTIVATIONS[coupling.conditioner.activation][1]
    if grad.shape[1] == 1 and weights[-1][0].shape[0] == 1:
        g = grad[:, 0]
        for (_, _, wt), (a, h) in zip(reversed(weights[1:]), reversed(saved), strict=True):
            g = (g @ wt[0]) * derivative(a, h)
        return (g @ weights[0][2][0])[:, None]
    g = grad.transpose(1, 0, 2)
    for (_, _, wt), (a, h) in zip(reversed(weights[1:]), reversed(saved), strict=True):
        g = np.matmul(g, wt) * derivative(a, h)
    return np.matmul(g, weights[0][2]).transpose(1, 0, 2)


def _split(coupling: RQSplineCoupling, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k = coupling.num_conditioning
    if coupling._layout == 1:
        return x[..., :k], x[..., k:]
    if coupling._layout == 2:
        return x[..., coupling.dim - k :], x[..., : coupling.dim - k]
    return x[..., coupling.conditioning_index.numpy()], x[..., coupling.transformed_index.numpy()]


def _join(coupling: RQSplineCoupling, a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """A (B, G, D) array from its conditioning part ``a1`` and transformed part ``a2``."""
    if coupling._layout == 1:
        return np.concatenate([a1, a2], -1)
    if coupling._layout == 2:
        return np.concatenate([a2, a1], -1)
    out = np.empty((*a1.shape[:-1], coupling.dim), a1.dtype)
    out[..., coupling.conditioning_index.numpy()] = a1
    out[..., coupling.transformed_index.numpy()] = a2
    return out


def coupling_forward(
    coupling: RQSplineCoupling,
    weights: list,
    constants: tuple,
    x: np.ndarray,
    context: np.ndarray | None,
    fused: bool = False,
) -> tuple[np.ndarray, np.ndarray, tuple]:
    """``(z, log |det dz/dx| (B, G), saved)`` of the coupling (with the weights and constants of its
    :func:`coupling_step`) on ``x`` (B, G, D) and ``context`` (B, G, C); ``fused`` (Numba installed and switched
    on): the spline as one Numba loop (the conditioner in NumPy), otherwise NumPy ops. (A flow whose couplings the
    whole-flow loop covers runs as that loop instead: :func:`flow_forward`.)"""
    x1, x2 = _split(coupling, x)
    h = x1 if not coupling.context_features else np.concatenate([x1, context], -1)
    params, hidden = _mlp_saving(coupling, weights, h)
    K, bound, shape = coupling.bins, coupling.bound, x2.shape
    if fused:  # the spline as one fused loop in this thread (a few rows: no thread pool)
        rows = x2.size // shape[-1]
        x2_rows = np.ascontiguousarray(x2.reshape(rows, shape[-1]))
        raw_rows = np.ascontiguousarray(params.reshape(rows, -1))
        y, logdet, state = _numba_spline.forward_arrays(coupling, x2_rows, raw_rows, parallel=False)
        y2, logdet = y.reshape(shape), logdet.astype(x.dtype).reshape(shape[:-1])
        return _join(coupling, x1, y2), logdet, (state, None, weights, constants, hidden)
    raw = params.reshape(*shape, 3 * K - 1)
    raw_sizes, raw_derivs = raw[..., : 2 * K].reshape(*shape, 2, K), raw[..., 2 * K :]
    scale, offset, columns_k, _ = constants
    limit = coupling._LOGIT_LIMIT
    unclamped = np.abs(raw_sizes) < limit
    weights_k = np.exp(np.minimum(np.maximum(raw_sizes, -limit), limit))
    probs = weights_k / _add(weights_k, -1, keepdims=True)
    sizes = probs * scale + offset
    left = sizes.cumsum(-1) - sizes - bound
    shifted = raw_derivs + coupling._derivative_shift
    derivs = np.ones((*shape, K + 1), x.dtype)
    derivs[..., 1:K] = np.logaddexp(0, shifted) + coupling.min_derivative
    table = np.concatenate([left.reshape(*shape, 2 * K), sizes.reshape(*shape, 2 * K), derivs], -1)
    v = np.minimum(np.maximum(x2, -bound), bound)
    # each value's bin (how many inner x knots are <= v) and the flat table indices of its six entries (6, ...)
    bins = _add(v[..., None] >= left[..., 0, 1:], -1)
    index = (_row_offsets(v.size, 5 * K + 1).reshape(shape) + bins) + columns_k
    x_k, y_k, w_k, h_k, d_k, d_k1 = table.ravel()[index]
    s_k = h_k / w_k
    xi = (v - x_k) / w_k
    xi_1m = 1 - xi
    t = xi * xi_1m
    c = d_k + d_k1 - 2 * s_k
    q = s_k + c * t
    xi_sq = xi * xi
    p = d_k * t + s_k * xi_sq
    g = p / q
    m = d_k1 * xi_sq + 2 * s_k * t + d_k * (xi_1m * xi_1m)
    outside = v != x2  # the ends and beyond: the identity
    y2 = np.where(outside, x2, y_k + h_k * g)
    logdet = _add(np.where(outside, 0, np.log(m * (s_k * s_k)) - 2 * np.log(q)), -1)
    spline = (probs, unclamped, shifted, index)
    elements = (xi, xi_1m, xi_sq, t, s_k, c, q, p, g, m, w_k, h_k, d_k, d_k1, outside)
    return _join(coupling, x1, y2), logdet, (spline, elements, weights, constants, hidden)


def coupling_backward(
    coupling: RQSplineCoupling, saved: tuple, grad_z: np.ndarray, grad_logdet: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """Gradients w.r.t. ``x`` (B, G, D) and the context (B, G, C) or None, given those w.r.t. ``z`` and the
    log-determinant (the vector-Jacobian product of :func:`coupling_forward`), which hold no subnormal numbers;
    neither do the results."""
    spline, elements, weights, (scale, _, _, tiny), hidden = saved
    grad_z1, grad_y = _split(coupling, grad_z)
    if isinstance(spline, _numba_spline.Saved):  # the spline as the fused kernels
        rows = grad_y.size // grad_y.shape[-1]
        gy = np.ascontiguousarray(grad_y.reshape(rows, -1))
        gl = np.ascontiguousarray(grad_logdet.reshape(rows), dtype=gy.dtype)
        grad_x2, grad_params = _numba_spline.backward_arrays(coupling, spline, gy, gl, parallel=False)
        grad_x2 = grad_x2.reshape(grad_y.shape)
        grad_params = _flush_subnormal(grad_params.reshape(*grad_y.shape[:-1], -1), tiny)
    else:
        grad_x2, grad_params = _spline_vjp(coupling, spline, elements, scale, tiny, grad_y, grad_logdet)
    grad_h = _mlp_input_vjp(coupling, weights, hidden, grad_params)
    grad_context = None
    if coupling.context_features:
        k = coupling.num_conditioning
        grad_h, grad_context = grad_h[..., :k], _flush_subnormal(grad_h[..., k:], tiny)
    grad_x = _flush_subnormal(_join(coupling, grad_z1 + grad_h, grad_x2), tiny)
    return grad_x, grad_context


def _spline_vjp(
    coupling: RQSplineCoupling,
    spline: tuple,
    elements: tuple,
    scale: np.ndarray,
    tiny: float,
    grad_y: np.ndarray,
    grad_logdet: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The spline's gradients w.r.t. the transformed dims (B, G, n) and the conditioner outputs (B, G, n * P), in
    NumPy ops, from what :func:`coupling_forward` saved."""
    probs, unclamped, shifted, index = spline
    xi, xi_1m, xi_sq, t, s_k, c, q, p, g, m, w_k, h_k, d_k, d_k1, outside = elements
    K = coupling.bins
    gy = np.where(outside, 0, grad_y)  # the tails are the identity: no gradient to the spline's parameters there
    gl = np.where(outside, 0, grad_logdet[..., None])
    inv_q, inv_m = 1 / q, 1 / m
    one_2t = 1 - 2 * t
    one_2xi = 1 - 2 * xi
    # partials w.r.t. (xi, s, d_k, d_k1) of y = y_k + h_k P / Q (times Q^2 / h_k) and of the log-determinant
    # log(s^2 M / Q^2), combined as gl * d(ld) + gy * h_k / Q^2 * d(P / Q) Q^2
    gq = gy * h_k * (inv_q * inv_q)
    gm, gq2 = gl * inv_m, 2 * gl * inv_q
    a_xi = gm * (2 * (d_k1 * xi + s_k * one_2xi - d_k * xi_1m)) - gq2 * (c * one_2xi) + gq * (s_k * m)
    a_s = gm * (2 * t) - gq2 * one_2t + 2 * gl / s_k + gq * (xi_sq * q - p * one_2t)
    a_d0 = gm * (xi_1m * xi_1m) - gq2 * t + gq * (t * (q - p))
    a_d1 = gm * xi_sq - gq2 * t - gq * (t * p)
    # through xi = (x - x_k) / w_k and s = h_k / w_k to the table entries (x_k, y_k, w_k, h_k, d_k, d_k1)
    inv_w = 1 / w_k
    grad_xi = a_xi * inv_w
    grad_x2 = np.where(outside, grad_y, grad_xi)
    grad_s = a_s * inv_w
    table = np.zeros((*xi.shape, 5 * K + 1), grad_y.dtype)
    flat = table.ravel()  # the six entries of a bin are distinct columns: putting is summing
    flat[index[0]], flat[index[1]], flat[index[4]], flat[index[5]] = -grad_xi, gy, a_d0, a_d1
    flat[index[2]] = -(grad_s * s_k + xi * grad_xi)
    flat[index[3]] = grad_s + gy * g
    grad_left = table[..., : 2 * K].reshape(*xi.shape, 2, K)
    # a left knot is the sum of the sizes before it: sizes get the sum of the left-knot gradients after them
    grad_sizes = table[..., 2 * K : 4 * K].reshape(grad_left.shape) + _add(grad_left, -1, keepdims=True)
    grad_probs = (grad_sizes - grad_left.cumsum(-1)) * scale
    grad_raw_sizes = probs * (grad_probs - _add(probs * grad_probs, -1, keepdims=True)) * unclamped
    grad_raw_derivs = table[..., 4 * K + 1 : 5 * K] * _sigmoid(shifted)
    grad_params = np.concatenate([grad_raw_sizes.reshape(*xi.shape, 2 * K), grad_raw_derivs], -1)
    return grad_x2, _flush_subnormal(grad_params.reshape(*xi.shape[:-1], -1), tiny)


class Plan(list):
    """A frozen flow's forward steps: :func:`coupling_step` or :func:`affine_arrays` (a folded linear map), in order.
    With Numba, :meth:`arrays` packs them for the whole-flow loop (once per plan)."""

    _arrays: _numba_spline.FlowArrays | None | bool = False  # False: not built yet

    def arrays(self, dtype: np.dtype) -> _numba_spline.FlowArrays | None:
        """The steps as one table for ``_numba_spline.flow_forward_arrays``, or None where it does not cover them
        (a coupling whose conditioner is not one hidden layer with SiLU)."""
        if self._arrays is False:
            self._arrays = _numba_spline.FlowArrays.build(self, dtype)
        return self._arrays


def flow_forward(plan: Plan, x: np.ndarray, context: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, object]:
    """Run the frozen steps ``plan`` (data to latent) on ``x`` (B, G, D) and ``context`` (B, G, C) or None.

    With Numba (after the first runs of a process: ``_numba_spline.LOAD_AFTER``) a flow whose couplings have one
    hidden layer with SiLU, as every shipped flow's, runs as one loop in the calling thread
    (``_numba_kernels.flow_forward_serial``); other flows run step by step, their splines as loops or NumPy ops.

    Returns:
        The latent codes (B, G, D), ``log |det dz/dx|`` (B, G) and what :func:`flow_backward` needs.
    """
    fused = _numba_spline.wanted(x.size)
    if fused and (arrays := plan.arrays(x.dtype)) is not None:
        return _numba_spline.flow_forward_arrays(arrays, x, context)
    logdet = np.zeros(x.shape[:2], x.dtype)
    saved = []
    with np.errstate(all="ignore"):  # np.where evaluates the branch it discards (e.g. the spline beyond its ends)
        for step in plan:
            if isinstance(step[0], RQSplineCoupling):
                x, ld, keep = coupling_forward(*step, x, context, fused)
                saved.append(keep)
            else:  # z = x A + c
                matrix, offset, ld, single = step
                if single and x.shape[1] == 1:
                    x = (x[:, 0] @ matrix[0] + offset[0])[:, None]
                else:
                    x = (np.matmul(x.transpose(1, 0, 2), matrix) + offset[:, None]).transpose(1, 0, 2)
                saved.append(None)
            logdet = logdet + ld
    return x, logdet, saved


def flow_backward(
    plan: Plan, saved: object, grad_z: np.ndarray, grad_logdet: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """Gradients w.r.t. the input and the context (None without one) of :func:`flow_forward`, given those w.r.t.
    its latent codes and log-determinant."""
    if isinstance(saved, _numba_spline.FlowState):  # the whole flow in one loop
        return _numba_spline.flow_backward_arrays(plan.arrays(grad_z.dtype), saved, grad_z, grad_logdet)
    tiny = float(np.finfo(grad_z.dtype).tiny)
    grad, grad_logdet, grad_context = _flush_subnormal(grad_z, tiny), _flush_subnormal(grad_logdet, tiny), None
    with np.errstate(all="ignore"):  # as in flow_forward
        for step, keep in zip(reversed(plan), reversed(saved), strict=True):
            if keep is None:  # z = x A + c: dx = dz A^T
                matrix, single = step[0], step[3]
                if single and grad.shape[1] == 1:
                    grad = (grad[:, 0] @ matrix[0].T)[:, None]
                else:
                    grad = np.matmul(grad.transpose(1, 0, 2), matrix.transpose(0, 2, 1)).transpose(1, 0, 2)
            else:
                grad, grad_c = coupling_backward(step[0], keep, grad, grad_logdet)
                if grad_c is not None:
                    grad_context = grad_c if grad_context is None else grad_context + grad_c
    return grad, grad_context
