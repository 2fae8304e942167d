# ruff: noqa: ANN001, ANN202  (Numba infers the types: annotations would not be read)
"""The Numba loops of :mod:`posepriors.flows._numba_spline` (imported only where Numba is installed).

Module-level functions, so that ``cache=True`` keeps their machine code on disk between processes. The work of one
row is written once (``forward_row``, ``backward_row``) and looped over the rows twice: in parallel threads
(``spline_forward``, ``spline_backward``, for large batches) and in the calling thread (``*_serial``, for a few
rows, where starting threads would cost more than the work).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

__all__ = [
    "coupling_backward_serial",
    "coupling_forward_serial",
    "flow_backward_serial",
    "flow_forward_serial",
    "prepare_serial",
    "spline_backward",
    "spline_backward_serial",
    "spline_forward",
    "spline_forward_serial",
    "spline_grad",
    "spline_inverse",
    "spline_inverse_columns",
    "spline_inverse_grad",
    "spline_score",
    "spline_score_columns",
]

jit = numba.njit(parallel=True, cache=True, error_model="numpy", nogil=True)
serial = numba.njit(cache=True, error_model="numpy", nogil=True)
scalar = numba.njit(cache=True, error_model="numpy", inline="always")


@scalar
def softplus(sp, raw, shift, limit):
    """softplus(raw + shift), given sp = log1p(exp(clamp(raw)) exp(shift)), exact unless the clamp was active."""
    if abs(raw) < limit:
        return sp
    u = raw + shift
    return max(u, 0.0) + math.log1p(math.exp(-abs(u)))


@scalar
def sigmoid(exp_u, raw, shift, limit):
    """sigmoid(raw + shift) from exp(raw + shift) (valid unless the clamp was active)."""
    if abs(raw) < limit:
        return exp_u / (1.0 + exp_u)
    u = raw + shift
    return 1.0 / (1.0 + math.exp(-u)) if u >= 0 else math.exp(u) / (1.0 + math.exp(u))


@scalar
def bin_exp(e, r, j, lo, hi):
    """e[r, j] clamped to [lo, hi] = exp(-+limit): the exp of the clamped logit (``_numba_spline._prepare`` leaves
    the clamp to the loops: one pass over memory less)."""
    return min(max(e[r, j], lo), hi)


@scalar
def locate(e, r, b, K, v, bound, sw, ow, sh, oh, lo, hi):
    """The bin k of v in the spline whose bin logits' exps start at e[r, b] (K widths, then K heights; clamped to
    [lo, hi] on reading): k, its left knot (xk, yk), width w and height h, and the softmax scales
    fw = sw / sum(widths' exps), fh likewise."""
    zw, zh = 0.0, 0.0
    for j in range(K):
        zw += bin_exp(e, r, b + j, lo, hi)
        zh += bin_exp(e, r, b + K + j, lo, hi)
    fw, fh = sw / zw, sh / zh
    xk, yk, k = -bound, -bound, 0
    w, h = ow + fw * bin_exp(e, r, b, lo, hi), oh + fh * bin_exp(e, r, b + K, lo, hi)
    while k < K - 1 and v >= xk + w:
        xk += w
        yk += h
        k += 1
        w, h = ow + fw * bin_exp(e, r, b + k, lo, hi), oh + fh * bin_exp(e, r, b + K + k, lo, hi)
    return k, xk, yk, w, h, fw, fh


@scalar
def knot_derivatives(e, sp, raw, r, i, b, K, k, min_d, shift, exp_shift, limit):
    """The derivatives d0, d1 at bin k's knots (1 at the end knots) and exp(raw + shift) of each (0 at the ends)."""
    d0, d1, e0, e1 = 1.0, 1.0, 0.0, 0.0
    if k > 0:
        j = b + 2 * K + k - 1
        d0, e0 = softplus(sp[r, i * (K - 1) + k - 1], raw[r, j], shift, limit) + min_d, e[r, j] * exp_shift
    if k < K - 1:
        j = b + 2 * K + k
        d1, e1 = softplus(sp[r, i * (K - 1) + k], raw[r, j], shift, limit) + min_d, e[r, j] * exp_shift
    return d0, d1, e0, e1


@scalar
def bin_terms(v, xk, w, h, d0, d1):
    """The bin-local terms of the spline at v (module docstring of _numba_spline): s, xi, 1 - xi, t, c, q, p, m."""
    s = h / w
    xi = (v - xk) / w
    return (s, xi, *xi_terms(xi, s, d0, d1))


@scalar
def xi_terms(xi, s, d0, d1):
    """The terms of ``bin_terms`` after s and xi: 1 - xi, t, c, q, p, m."""
    xi_1m = 1.0 - xi
    t = xi * xi_1m
    c = d0 + d1 - 2.0 * s
    return xi_1m, t, c, s + c * t, s * xi * xi + d0 * t, d1 * xi * xi + 2.0 * s * t + d0 * xi_1m * xi_1m


@scalar
def inverse_xi(v, yk, w, h, d0, d1):
    """The inverse of the spline at an output v in the bin with left y knot yk, width w, height h and knot
    derivatives d0, d1: s and xi in [0, 1] (NaN for a NaN v), the root of the bin's quadratic
    ``a xi^2 + b xi + c``, ``c = -s (v - yk)``, in ``RQSplineCoupling._transform``'s cancellation-free form
    ``2c / (-b - sqrt(b^2 - 4ac))``."""
    s = h / w
    dy = v - yk
    d_sum = d0 + d1 - 2.0 * s
    a = h * (s - d0) + dy * d_sum
    b = h * d0 - dy * d_sum
    s_dy = s * dy
    disc = b * b + 4.0 * a * s_dy
    xi = 2.0 * s_dy / (b + math.sqrt(disc if disc > 0.0 else 0.0))
    return s, (0.0 if xi < 0.0 else (1.0 if xi > 1.0 else xi))  # clamped to the bin; NaN stays NaN


@scalar
def spline_partials(g_y, g_ld, s, xi, xi_1m, t, c, q, p, m, w, h, d0, d1):
    """From the gradients of the output (g_y) and of the log-determinant (g_ld) and a value's bin terms
    (``bin_terms``): the gradients w.r.t. xi (the input's), the bin width, the bin height and the two knot
    derivatives: grad_xi, grad_w, grad_h, a_d0, a_d1."""
    g = p / q
    inv_q, inv_m = 1.0 / q, 1.0 / m
    one_2t, one_2xi = 1.0 - 2.0 * t, 1.0 - 2.0 * xi
    # partials w.r.t. (xi, s, d0, d1) of y (times q^2 / h) and of log dy/dx
    coef = g_y * h * inv_q * inv_q
    a_xi = g_ld * (2.0 * (d1 * xi + s * one_2xi - d0 * xi_1m) * inv_m - 2.0 * c * one_2xi * inv_q)
    a_xi += coef * s * m
    a_s = g_ld * (2.0 * t * inv_m - 2.0 * one_2t * inv_q + 2.0 / s) + coef * (xi * xi * q - p * one_2t)
    a_d0 = g_ld * (xi_1m * xi_1m * inv_m - 2.0 * t * inv_q) + coef * t * (q - p)
    a_d1 = g_ld * (xi * xi * inv_m - 2.0 * t * inv_q) - coef * t * p
    grad_xi = a_xi / w
    grad_s = a_s / w
    return grad_xi, -(grad_s * s + xi * grad_xi), grad_s + g_y * g, a_d0, a_d1


@scalar
def prepare_row(raw, K, exp_shift, limit, e, sp, r):
    """What ``_numba_spline._prepare`` makes of row r of the conditioner outputs raw (rows, n * (3K - 1)):
    e = exp(clamp(raw, +-limit)) and, for the knot derivatives, sp = log1p(e exp(shift)) (rows, n * (K - 1))."""
    width = raw.shape[1]
    P = 3 * K - 1
    for j in range(width):
        e[r, j] = math.exp(min(max(raw[r, j], -limit), limit))
    for i in range(width // P):
        for k in range(K - 1):
            sp[r, i * (K - 1) + k] = math.log1p(e[r, i * P + 2 * K + k] * exp_shift)


@serial
def prepare_serial(raw, K, exp_shift, limit, e, sp):
    """:func:`prepare_row` for every row, in the calling thread."""
    for r in range(raw.shape[0]):
        prepare_row(raw, K, exp_shift, limit, e, sp, r)


@scalar
def forward_row(x, e, sp, raw, K, bound, sw, ow, sh, oh, min_d, shift, exp_shift, limit, y, logdet, r):
    """Row r of the spline forward: y[r] and logdet[r]."""
    n = x.shape[1]
    P = 3 * K - 1
    hi = math.exp(limit)
    lo = 1.0 / hi
    product, total = 1.0, 0.0
    for i in range(n):
        v = x[r, i]
        if v <= -bound or v >= bound:  # the ends and beyond: the identity
            y[r, i] = v
            continue
        b = i * P
        k, xk, yk, w, h, fw, fh = locate(e, r, b, K, v, bound, sw, ow, sh, oh, lo, hi)
        d0, d1, _, _ = knot_derivatives(e, sp, raw, r, i, b, K, k, min_d, shift, exp_shift, limit)
        s, xi, xi_1m, t, c, q, p, m = bin_terms(v, xk, w, h, d0, d1)
        y[r, i] = yk + h * p / q
        product *= s * s * m / (q * q)
        if product > 1e100 or product < 1e-100:  # one log per row unless the product would leave range
            total += math.log(product)
            product = 1.0
    logdet[r] = total + math.log(product)


@scalar
def select_bin(e, sp, sig, r, i, K, v, bound, sw, ow, sh, oh, min_d, lo, hi, by_y):
    """Value (r, i) of the param-major loops (``score_rows``, ``grad_rows``, ``inverse_rows``): its bin k, the
    bin's left knot (xk, yk), width w and height h, the softmax scales fw and fh (as ``locate``), the knot
    derivatives d0, d1 and the sigmoids s0, s1 of their logits (from sig; at the end knots the derivative is 1 and
    the sigmoid 0: no logit). The bin is the last whose left knot v reaches, in x (or in y with ``by_y``: the
    inverse's input), taken by selects (K and ``by_y`` compile-time constants: the loops unroll)."""
    zw, zh = 0.0, 0.0
    for j in range(K):
        zw += min(max(e[r, j, i], lo), hi)
        zh += min(max(e[r, K + j, i], lo), hi)
    fw, fh = sw / zw, sh / zh
    w, h = ow + fw * min(max(e[r, 0, i], lo), hi), oh + fh * min(max(e[r, K, i], lo), hi)
    xk, yk, d0, d1, s0, s1, k = -bound, -bound, 1.0, sp[r, 0, i] + min_d, 0.0, sig[r, 0, i], 0
    cx, cy = xk + w, yk + h  # the right knot of the bin so far
    for j in range(1, K):
        wj = ow + fw * min(max(e[r, j, i], lo), hi)
        hj = oh + fh * min(max(e[r, K + j, i], lo), hi)
        right = sp[r, j, i] + min_d if j < K - 1 else 1.0
        right_sig = sig[r, j, i] if j < K - 1 else 0.0
        take = v >= (cy if by_y else cx)
        xk, yk = (cx, cy) if take else (xk, yk)
        w, h = (wj, hj) if take else (w, h)
        d0, d1 = (sp[r, j - 1, i] + min_d, right) if take else (d0, d1)
        s0, s1 = (sig[r, j - 1, i], right_sig) if take else (s0, s1)
        k = j if take else k
        cx += wj
        cy += hj
    return k, xk, yk, w, h, fw, fh, d0, d1, s0, s1


@scalar
def score_rows(x, e, sp, K, bound, sw, ow, sh, oh, min_d, lo, hi, y, logdet, slope, start, stop):
    """Rows start..stop-1 of the spline forward for scoring (nothing saved for a backward), vectorised over each
    row's values: x (R, n), the bin logits' exps e (R, 2K, n) (widths, then heights; clamped here) and the knot
    derivatives sp (R, K - 1, n) (softplus, min_d not added) to y (R, n) and logdet (R,); slope (n,) is scratch.
    Param-major inputs, so that the loads over the values are contiguous; K a compile-time constant (the caller,
    ``spline_score``), so that LLVM unrolls the loops over bins and vectorises the loop over values: a value's bin
    is the last whose left knot it reaches, taken by selects instead of a search. The arithmetic of
    ``forward_row``, to the last bit."""
    n = x.shape[1]
    for r in range(start, stop):
        for i in range(n):
            v = x[r, i]
            # sp twice: no sigmoids here
            bin_ = select_bin(e, sp, sp, r, i, K, v, bound, sw, ow, sh, oh, min_d, lo, hi, False)
            xk, yk, w, h, d0, d1 = bin_[1], bin_[2], bin_[3], bin_[4], bin_[7], bin_[8]
            s, xi, xi_1m, t, c, q, p, m = bin_terms(v, xk, w, h, d0, d1)
            outside = v <= -bound or v >= bound  # the ends and beyond: the identity (NaN is not: NaN out)
            y[r, i] = v if outside else yk + h * p / q
            slope[i] = 1.0 if outside else s * s * m / (q * q)
        logdet[r] = log_product(slope, n)


@scalar
def log_product(slope, n):
    """log(slope[0] * ... * slope[n - 1]): one log per row unless the product would leave range."""
    product, total = 1.0, 0.0
    for i in range(n):
        product *= slope[i]
        if product > 1e100 or product < 1e-100:
            total += math.log(product)
            product = 1.0
    return total + math.log(product)


@scalar
def inverse_rows(z, e, sp, K, bound, sw, ow, sh, oh, min_d, lo, hi, x, logdet, slope, start, stop):
    """``score_rows`` for the inverse: rows start..stop-1 of z (R, n) to x (R, n) and the inverse's
    log-determinant (R,), vectorised over each row's values the same way (the bin taken in y, then the root of its
    quadratic, ``inverse_xi``)."""
    n = z.shape[1]
    for r in range(start, stop):
        for i in range(n):
            v = z[r, i]
            bin_ = select_bin(e, sp, sp, r, i, K, v, bound, sw, ow, sh, oh, min_d, lo, hi, True)
            xk, yk, w, h, d0, d1 = bin_[1], bin_[2], bin_[3], bin_[4], bin_[7], bin_[8]
            s, xi = inverse_xi(v, yk, w, h, d0, d1)
            xi_1m, t, c, q, p, m = xi_terms(xi, s, d0, d1)
            outside = v <= -bound or v >= bound
            x[r, i] = v if outside else xk + xi * w
            slope[i] = 1.0 if outside else s * s * m / (q * q)
        logdet[r] = -log_product(slope, n)


SCORE_CHUNK = 64
"""Rows per task of the scoring loops (each task allocates its scratch once)."""
FOUR, EIGHT = 4, 8  # the bin counts of the vectorised loops, as compile-time constants


@jit
def spline_score(x, e, sp, K, bound, sw, ow, sh, oh, min_d, limit, y, logdet):
    """``score_rows`` for every row, in parallel threads, for K = 4 (global_flow's) or 8 (joint_flow's, the flows'
    default) bins: each a compile-time constant in its own branch."""
    rows, n = x.shape
    hi = math.exp(limit)
    lo = 1.0 / hi
    for c in prange((rows + SCORE_CHUNK - 1) // SCORE_CHUNK):
        slope = np.empty(n, dtype=np.float64)
        start, stop = c * SCORE_CHUNK, min(rows, (c + 1) * SCORE_CHUNK)
        if K == FOUR:
            score_rows(x, e, sp, FOUR, bound, sw, ow, sh, oh, min_d, lo, hi, y, logdet, slope, start, stop)
        else:
            score_rows(x, e, sp, EIGHT, bound, sw, ow, sh, oh, min_d, lo, hi, y, logdet, slope, start, stop)


@jit
def spline_inverse(z, e, sp, K, bound, sw, ow, sh, oh, min_d, limit, x, logdet):
    """``inverse_rows`` for every row, as ``spline_score``. (Its own function, as is ``spline_inverse_grad``: with
    the inverse as a branch of ``spline_score``, LLVM took 3x as long to compile the merged loops on first use.)"""
    rows, n = z.shape
    hi = math.exp(limit)
    lo = 1.0 / hi
    for c in prange((rows + SCORE_CHUNK - 1) // SCORE_CHUNK):
        slope = np.empty(n, dtype=np.float64)
        start, stop = c * SCORE_CHUNK, min(rows, (c + 1) * SCORE_CHUNK)
        if K == FOUR:
            inverse_rows(z, e, sp, FOUR, bound, sw, ow, sh, oh, min_d, lo, hi, x, logdet, slope, start, stop)
        else:
            inverse_rows(z, e, sp, EIGHT, bound, sw, ow, sh, oh, min_d, lo, hi, x, logdet, slope, start, stop)


@scalar
def columns_group(x, e, sp, g, start, stop, K, bound, sw, ow, sh, oh, min_d, lo, hi, y, product, by_y):
    """Columns start..stop-1 of group g of ``score_rows`` (or, with ``by_y``, of ``inverse_rows``) in the column
    layout of grouped couplings (``joint_flow``'s per-joint flows, a few values per row): x (G, n, B), the bin
    logits' exps e (G, 2K, n, B) and the knot derivatives sp (G, K - 1, n, B) to y (G, n, B) and the product of
    each row's slopes (G, B) (float64; the caller takes its log). The loop over the batch is innermost, over
    contiguous memory, so that LLVM vectorises it (in the row layout it would vectorise over the n values of a row:
    1 or 2 here). The arithmetic of ``score_rows`` / ``inverse_rows``, to the last bit."""
    n = x.shape[1]
    for b in range(start, stop):
        product[g, b] = 1.0
    for i in range(n):
        for b in range(start, stop):
            v = x[g, i, b]
            zw, zh = 0.0, 0.0
            for j in range(K):
                zw += min(max(e[g, j, i, b], lo), hi)
                zh += min(max(e[g, K + j, i, b], lo), hi)
            fw, fh = sw / zw, sh / zh
            w, h = ow + fw * min(max(e[g, 0, i, b], lo), hi), oh + fh * min(max(e[g, K, i, b], lo), hi)
            xk, yk, d0, d1 = -bound, -bound, 1.0, sp[g, 0, i, b] + min_d
            cx, cy = xk + w, yk + h  # the right knot of the bin so far
            for j in range(1, K):
                wj = ow + fw * min(max(e[g, j, i, b], lo), hi)
                hj = oh + fh * min(max(e[g, K + j, i, b], lo), hi)
                right = sp[g, j, i, b] + min_d if j < K - 1 else 1.0
                take = v >= (cy if by_y else cx)
                xk, yk = (cx, cy) if take else (xk, yk)
                w, h = (wj, hj) if take else (w, h)
                d0, d1 = (sp[g, j - 1, i, b] + min_d, right) if take else (d0, d1)
                cx += wj
                cy += hj
            outside = v <= -bound or v >= bound  # the ends and beyond: the identity (NaN is not: NaN out)
            if by_y:
                s, xi = inverse_xi(v, yk, w, h, d0, d1)
                xi_1m, t, c, q, p, m = xi_terms(xi, s, d0, d1)
                y[g, i, b] = v if outside else xk + xi * w
            else:
                s, xi, xi_1m, t, c, q, p, m = bin_terms(v, xk, w, h, d0, d1)
                y[g, i, b] = v if outside else yk + h * p / q
            product[g, b] *= 1.0 if outside else s * s * m / (q * q)


COLUMN_CHUNK = 512
"""Columns per task of the column loops: tasks are (group, chunk) pairs, so that a few groups (a tree level of
``joint_flow``'s sampling) still fill every thread."""


@scalar
def column_task(task, B):
    """Task ``task`` of a column loop over G groups of B columns: its group and columns start..stop-1."""
    chunks = (B + COLUMN_CHUNK - 1) // COLUMN_CHUNK
    g, c = task // chunks, task % chunks
    return g, c * COLUMN_CHUNK, min(B, (c + 1) * COLUMN_CHUNK)


@jit
def spline_score_columns(x, e, sp, K, bound, sw, ow, sh, oh, min_d, limit, y, product):
    """``columns_group`` for every group and chunk of columns, in parallel threads, for K = 4 or 8 bins (as
    ``spline_score``)."""
    hi = math.exp(limit)
    lo = 1.0 / hi
    G, B = x.shape[0], x.shape[2]
    for task in prange(G * ((B + COLUMN_CHUNK - 1) // COLUMN_CHUNK)):
        g, start, stop = column_task(task, B)
        if K == FOUR:
            columns_group(x, e, sp, g, start, stop, FOUR, bound, sw, ow, sh, oh, min_d, lo, hi, y, product, False)
        else:
            columns_group(x, e, sp, g, start, stop, EIGHT, bound, sw, ow, sh, oh, min_d, lo, hi, y, product, False)


@jit
def spline_inverse_columns(z, e, sp, K, bound, sw, ow, sh, oh, min_d, limit, x, product):
    """The inverse of ``spline_score_columns`` (its own function: see ``spline_inverse``)."""
    hi = math.exp(limit)
    lo = 1.0 / hi
    G, B = z.shape[0], z.shape[2]
    for task in prange(G * ((B + COLUMN_CHUNK - 1) // COLUMN_CHUNK)):
        g, start, stop = column_task(task, B)
        if K == FOUR:
            columns_group(z, e, sp, g, start, stop, FOUR, bound, sw, ow, sh, oh, min_d, lo, hi, x, product, True)
        else:
            columns_group(z, e, sp, g, start, stop, EIGHT, bound, sw, ow, sh, oh, min_d, lo, hi, x, product, True)


@scalar
def grad_rows(x, e, raw, sp, sig, K, bound, sw, ow, sh, oh, min_d, lo, hi, limit, gy, gl, out, start, stop, inverse):
    """Rows start..stop-1 of the vector-Jacobian product of ``score_rows``' spline (or, with ``inverse``, of
    ``inverse_rows``'), on its param-major inputs and with its selects instead of a bin search: from the gradients
    w.r.t. the outputs gy (R, n) and the log-determinant gl (R,), into one array out (R, 3K, n): the gradients
    w.r.t. the raw bin logits (rows 0..2K-1), the raw knot-derivative logits (2K..3K-2) and the input x (3K-1),
    param-major, so that the conditioner's backward is one GEMM. raw (R, 2K, n): the bin logits (a clamped one gets
    no gradient); sig (R, K - 1, n): the knot-derivative logits' sigmoid, softplus's derivative. The formulas of
    ``backward_row``; beyond the interval (not at its ends) the identity. The inverse x = f^-1(z) with
    log-determinant -log f'(x) has dL/dz = (g_x - g_ld d log f'/dx) / f'(x) =: a and the parameters' gradients of
    the forward spline at x with output gradient -a and log-determinant gradient -g_ld (implicit differentiation
    of f(x) = z), so the same partials serve both. LLVM does not vectorise this loop (it would need more runtime
    alias checks than it allows): it runs about 7x slower per value than ``score_rows``, and still faster than
    ``backward_row``. ``inverse`` is a compile-time constant of the callers."""
    n = x.shape[1]
    for r in range(start, stop):
        g_ld = gl[r]
        for i in range(n):
            v = x[r, i]
            k, xk, yk, w, h, fw, fh, d0, d1, s0, s1 = select_bin(
                e, sp, sig, r, i, K, v, bound, sw, ow, sh, oh, min_d, lo, hi, inverse
            )
            # beyond the ends the identity (selects below); the inverse's ends too, as its tensor ops have them
            inside = not (v <= -bound or v >= bound) if inverse else not (v < -bound or v > bound)
            g_y = gy[r, i]
            grad_in = 0.0
            if inverse:  # the forward spline's partials at x = f^-1(v), for the output gradient -a (docstring)
                s, xi = inverse_xi(v, yk, w, h, d0, d1)
                xi_1m, t, c, q, p, m = xi_terms(xi, s, d0, d1)
                d_log = spline_partials(0.0, 1.0, s, xi, xi_1m, t, c, q, p, m, w, h, d0, d1)[0]
                grad_in = (g_y - g_ld * d_log) * (q * q) / (s * s * m)
                g_y, g_l = -grad_in, -g_ld
            else:
                s, xi, xi_1m, t, c, q, p, m = bin_terms(v, xk, w, h, d0, d1)
                g_l = g_ld
            grad_xi, grad_w, grad_h, a_d0, a_d1 = spline_partials(g_y, g_l, s, xi, xi_1m, t, c, q, p, m, w, h, d0, d1)
            out[r, 3 * K - 1, i] = (grad_in if inverse else grad_xi) if inside else gy[r, i]
            # sizes: a left knot is -bound plus the sizes before it; then the softmax of the clamped logits
            dot_w, dot_h = 0.0, 0.0
            for j in range(K):
                gw = -grad_xi if j < k else (grad_w if j == k else 0.0)
                gh = g_y if j < k else (grad_h if j == k else 0.0)
                dot_w += min(max(e[r, j, i], lo), hi) * fw * gw
                dot_h += min(max(e[r, K + j, i], lo), hi) * fh * gh
            for j in range(K):
                gw = -grad_xi if j < k else (grad_w if j == k else 0.0)
                gh = g_y if j < k else (grad_h if j == k else 0.0)
                # softmax backward: p_j (dp_j - p . dp), p_j = e_j fw / sw, dp_j = sw gw; none where clamped
                free_w = inside and abs(raw[r, j, i]) < limit
                free_h = inside and abs(raw[r, K + j, i]) < limit
                out[r, j, i] = e[r, j, i] * fw * (gw - dot_w / sw) if free_w else 0.0
                out[r, K + j, i] = e[r, K + j, i] * fh * (gh - dot_h / sh) if free_h else 0.0
            for j in range(K - 1):  # inner knot derivatives: softplus(raw + shift) + min_d
                left = a_d0 * s0 if j == k - 1 else 0.0
                out[r, 2 * K + j, i] = (left + (a_d1 * s1 if j == k else 0.0)) if inside else 0.0


@jit
def spline_grad(x, e, raw, sp, sig, K, bound, sw, ow, sh, oh, min_d, limit, gy, gl, out):
    """``grad_rows`` for every row, in parallel threads, for K = 4 or 8 bins (as ``spline_score``)."""
    rows = x.shape[0]
    hi = math.exp(limit)
    lo = 1.0 / hi
    for c in prange((rows + SCORE_CHUNK - 1) // SCORE_CHUNK):
        start, stop = c * SCORE_CHUNK, min(rows, (c + 1) * SCORE_CHUNK)
        if K == FOUR:
            grad_rows(
                x, e, raw, sp, sig, FOUR, bound, sw, ow, sh, oh, min_d, lo, hi, limit, gy, gl, out, start, stop, False
            )
        else:
            grad_rows(
                x, e, raw, sp, sig, EIGHT, bound, sw, ow, sh, oh, min_d, lo, hi, limit, gy, gl, out, start, stop, False
            )


@jit
def spline_inverse_grad(z, e, raw, sp, sig, K, bound, sw, ow, sh, oh, min_d, limit, gx, gl, out):
    """``grad_rows`` of the inverse for every row, as ``spline_grad`` (its own function: see ``spline_inverse``)."""
    rows = z.shape[0]
    hi = math.exp(limit)
    lo = 1.0 / hi
    for c in prange((rows + SCORE_CHUNK - 1) // SCORE_CHUNK):
        start, stop = c * SCORE_CHUNK, min(rows, (c + 1) * SCORE_CHUNK)
        if K == FOUR:
            grad_rows(
                z, e, raw, sp, sig, FOUR, bound, sw, ow, sh, oh, min_d, lo, hi, limit, gx, gl, out, start, stop, True
            )
        else:
            grad_rows(
                z, e, raw, sp, sig, EIGHT, bound, sw, ow, sh, oh, min_d, lo, hi, limit, gx, gl, out, start, stop, True
            )


@jit
def spline_forward(x, e, sp, raw, K, bound, sw, ow, sh, oh, min_d, shift, exp_shift, limit, y, logdet):
    for r in prange(x.shape[0]):
        forward_row(x, e, sp, raw, K, bound, sw, ow, sh, oh, min_d, shift, exp_shift, limit, y, logdet, r)


@serial
def spline_forward_serial(x, e, sp, raw, K, bound, sw, ow, sh, oh, min_d, shift, exp_shift, limit, y, logdet):
    for r in range(x.shape[0]):
        forward_row(x, e, sp, raw, K, bound, sw, ow, sh, oh, min_d, shift, exp_shift, limit, y, logdet, r)


@scalar
def backward_row(x, e, sp, raw, K, bound, sw, ow, sh, oh, min_d, shift, exp_shift, limit, gy, gl, grad_x, grad_p, r):
    """Row r of the spline's vector-Jacobian product: grad_x[r] and grad_p[r]."""
    n = x.shape[1]
    P = 3 * K - 1
    hi = math.exp(limit)
    lo = 1.0 / hi
    g_ld = gl[r]
    for i in range(n):
        v = x[r, i]
        b = i * P
        for j in range(P):
            grad_p[r, b + j] = 0.0
        if v < -bound or v > bound:  # beyond the ends (at an end, the spline's one-sided derivatives)
            grad_x[r, i] = gy[r, i]
            continue
        g_y = gy[r, i]
        k, xk, yk, w, h, fw, fh = locate(e, r, b, K, v, bound, sw, ow, sh, oh, lo, hi)
        d0, d1, e0, e1 = knot_derivatives(e, sp, raw, r, i, b, K, k, min_d, shift, exp_shift, limit)
        s, xi, xi_1m, t, c, q, p, m = bin_terms(v, xk, w, h, d0, d1)
        grad_xi, grad_w, grad_h, a_d0, a_d1 = spline_partials(g_y, g_ld, s, xi, xi_1m, t, c, q, p, m, w, h, d0, d1)
        grad_x[r, i] = grad_xi
        # sizes: a left knot is -bound plus the sizes before it; then the softmax of the clamped logits
        dot_w, dot_h = 0.0, 0.0
        for j in range(K):
            gw = -grad_xi if j < k else (grad_w if j == k else 0.0)
            gh = g_y if j < k else (grad_h if j == k else 0.0)
            dot_w += bin_exp(e, r, b + j, lo, hi) * fw * gw
            dot_h += bin_exp(e, r, b + K + j, lo, hi) * fh * gh
        for j in range(K):
            gw = -grad_xi if j < k else (grad_w if j == k else 0.0)
            gh = g_y if j < k else (grad_h if j == k else 0.0)
            if abs(raw[r, b + j]) < limit:  # softmax backward: p_j (dp_j - p . dp), p_j = e_j fw / sw, dp_j = sw gw
                grad_p[r, b + j] = e[r, b + j] * fw * (gw - dot_w / sw)
            if abs(raw[r, b + K + j]) < limit:
                grad_p[r, b + K + j] = e[r, b + K + j] * fh * (gh - dot_h / sh)
        # inner knot derivatives: softplus(raw + shift) + min_d, whose derivative is the sigmoid
        if k > 0:
            j = b + 2 * K + k - 1
            grad_p[r, j] = a_d0 * sigmoid(e0, raw[r, j], shift, limit)
        if k < K - 1:
            j = b + 2 * K + k
            grad_p[r, j] = a_d1 * sigmoid(e1, raw[r, j], shift, limit)


@jit
def spline_backward(x, e, sp, raw, K, bound, sw, ow, sh, oh, min_d, shift, exp_shift, limit, gy, gl, grad_x, grad_p):
    for r in prange(x.shape[0]):
        backward_row(x, e, sp, raw, K, bound, sw, ow, sh, oh, min_d, shift, exp_shift, limit, gy, gl, grad_x, grad_p, r)


@serial
def spline_backward_serial(
    x, e, sp, raw, K, bound, sw, ow, sh, oh, min_d, shift, exp_shift, limit, gy, gl, grad_x, grad_p
):
    for r in range(x.shape[0]):
        backward_row(x, e, sp, raw, K, bound, sw, ow, sh, oh, min_d, shift, exp_shift, limit, gy, gl, grad_x, grad_p, r)


# ---------------------------------------------------------------------------------------------------- whole couplings
@scalar
def silu_parts(a):
    """silu(a) = a s and its derivative s + a s (1 - s), with s = sigmoid(a) as 1/2 + tanh(a / 2) / 2 (no overflow;
    the NumPy path's formula)."""
    s = 0.5 + 0.5 * math.tanh(0.5 * a)
    h = a * s
    return h, s + h * (1.0 - s)


@serial
def coupling_forward_serial(
    x, ctx, cond, trans, w0, b0, w1, b1, K, bound, sw, ow, sh, oh, min_d, shift, exp_shift, limit, z, logdet, pre,
    x2, raw, e, sp, y, ld,
):  # fmt: skip
    """A spline coupling whose conditioner has one hidden layer (SiLU), for a few rows in the calling thread: x
    (B, G, D) and the context ctx (B, G, C) to z (B, G, D) and logdet (B, G). The conditioning dims ``cond`` of x and
    the context feed the conditioner (weights w0 (G, k + C, H), b0 (G, H), w1 (G, H, n (3K - 1)), b1 (G, n (3K -
    1))); the transformed dims ``trans`` go through the spline. Saves, per row r = b G + g, the hidden
    pre-activations pre (rows, H), the transformed inputs x2 (rows, n), the conditioner outputs raw and what the
    spline needs (e, sp), and fills the scratch y (rows, n), ld (rows,)."""
    B, G, _ = x.shape
    k, n, C, H, width = cond.shape[0], trans.shape[0], ctx.shape[2], w0.shape[2], w1.shape[2]
    hidden = np.empty(H, dtype=pre.dtype)
    for b in range(B):
        for g in range(G):
            r = b * G + g
            for j in range(H):
                pre[r, j] = b0[g, j]
            for i in range(k):
                v = x[b, g, cond[i]]
                for j in range(H):
                    pre[r, j] += v * w0[g, i, j]
            for c in range(C):
                v = ctx[b, g, c]
                for j in range(H):
                    pre[r, j] += v * w0[g, k + c, j]
            for j in range(H):
                hidden[j] = silu_parts(pre[r, j])[0]
            for j in range(width):
                raw[r, j] = b1[g, j]
            for j in range(H):
                v = hidden[j]
                for m in range(width):
                    raw[r, m] += v * w1[g, j, m]
            prepare_row(raw, K, exp_shift, limit, e, sp, r)
            for i in range(n):
                x2[r, i] = x[b, g, trans[i]]
            forward_row(x2, e, sp, raw, K, bound, sw, ow, sh, oh, min_d, shift, exp_shift, limit, y, ld, r)
            for i in range(k):
                z[b, g, cond[i]] = x[b, g, cond[i]]
            for i in range(n):
                z[b, g, trans[i]] = y[r, i]
            logdet[b, g] = ld[r]


@scalar
def flush(v, tiny):
    """v, or 0 where it is subnormal (|v| < tiny, the dtype's smallest normal number)."""
    return 0.0 if abs(v) < tiny else v


@serial
def coupling_backward_serial(
    gz, gl, cond, trans, w0t, w1t, K, bound, sw, ow, sh, oh, min_d, shift, exp_shift, limit, pre, x2, raw, e, sp,
    tiny, gy, gx2, gp, grad_x, grad_ctx,
):  # fmt: skip
    """The vector-Jacobian product of :func:`coupling_forward_serial` from the gradients w.r.t. z (B, G, D) and the
    log-determinant (B, G): grad_x (B, G, D) and grad_ctx (B, G, C), subnormal entries flushed to zero (as are the
    conditioner outputs' gradients on the way). w0t (G, H, k + C) and w1t (G, n (3K - 1), H) are the transposed
    weights; gy (rows, n), gx2 (rows, n) and gp (rows, n (3K - 1)) are scratch."""
    B, G, _ = gz.shape
    k, n, C, H, width = cond.shape[0], trans.shape[0], grad_ctx.shape[2], w1t.shape[2], w1t.shape[1]
    g_hidden = np.empty(H, dtype=pre.dtype)
    g_in = np.empty(k + C, dtype=pre.dtype)
    for b in range(B):
        for g in range(G):
            r = b * G + g
            for i in range(n):
                gy[r, i] = gz[b, g, trans[i]]
            backward_row(x2, e, sp, raw, K, bound, sw, ow, sh, oh, min_d, shift, exp_shift, limit, gy, gl, gx2, gp, r)
            for j in range(H):
                g_hidden[j] = 0.0
            for m in range(width):
                v = flush(gp[r, m], tiny)
                if v != 0.0:
                    for j in range(H):
                        g_hidden[j] += v * w1t[g, m, j]
            for i in range(k + C):
                g_in[i] = 0.0
            for j in range(H):
                v = g_hidden[j] * silu_parts(pre[r, j])[1]
                for i in range(k + C):
                    g_in[i] += v * w0t[g, j, i]
            for i in range(k):
                grad_x[b, g, cond[i]] = flush(gz[b, g, cond[i]] + g_in[i], tiny)
            for i in range(n):
                grad_x[b, g, trans[i]] = flush(gx2[r, i], tiny)
            for c in range(C):
                grad_ctx[b, g, c] = flush(g_in[k + c], tiny)


# ------------------------------------------------------------------------------------------------------- whole flows
# A frozen flow's steps as a table (``_numba_spline.FlowArrays``): one row of ``meta`` per step, its weights as slices
# of one flat array ``weights``, its index arrays as slices of ``index``, its spline constants a row of ``settings``
# (as ``_numba_spline._settings``), and its saved arrays as slices of one flat array per kind, ``rows * (offset ...
# offset + width)`` for a step's per-row offset and width. Column names:
KIND, COND_DIMS, TRANS_DIMS, CONTEXT, HIDDEN, WIDTH = 0, 1, 2, 3, 4, 5
AFFINE, COUPLING = 0, 1  # the kinds
W0, B0, W1, B1, W0T, W1T, COND, TRANS, PRE, X2, RAW, SP = 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17
MATRIX, OFFSET, LOGDET = 6, 7, 8  # a folded linear map's rows: z = x A + c, its log-determinant per group
META_COLUMNS = 18


@scalar
def _part(flat, start, rows, width):
    """The slice of ``flat`` at ``rows * start`` as a C-contiguous (rows, width) array."""
    return flat[rows * start : rows * (start + width)].reshape(rows, width)


@serial
def flow_forward_serial(x, ctx, meta, settings, weights, index, z, logdet, pre, x2, raw, e, sp):
    """A frozen flow of folded linear maps and spline couplings (one hidden layer, SiLU) on x (B, G, D) and the
    context ctx (B, G, C), in the calling thread: z (B, G, D) and the float64 log-determinant (B, G), saving what
    :func:`flow_backward_serial` needs in pre, x2, raw, e and sp (flat, sized by the wrapper)."""
    B, G, D = x.shape
    rows = B * G
    current, following = x.copy(), np.empty_like(x)
    logdet[:] = 0.0
    step_logdet, row_logdet = np.empty((B, G), np.float64), np.empty(rows, np.float64)
    scratch = np.empty(rows * D, x.dtype)
    no_context = np.empty((B, G, 0), x.dtype)
    total = np.empty(D, np.float64)
    for s in range(meta.shape[0]):
        if meta[s, KIND] == AFFINE:
            matrix, offset, ld = meta[s, MATRIX], meta[s, OFFSET], meta[s, LOGDET]
            for b in range(B):
                for g in range(G):
                    for j in range(D):
                        total[j] = weights[offset + g * D + j]
                    for i in range(D):
                        v = current[b, g, i]
                        row = matrix + (g * D + i) * D
                        for j in range(D):
                            total[j] += v * weights[row + j]
                    for j in range(D):
                        following[b, g, j] = total[j]
                    logdet[b, g] += weights[ld + g]
        else:
            k, n, C, H, W = meta[s, COND_DIMS], meta[s, TRANS_DIMS], meta[s, CONTEXT], meta[s, HIDDEN], meta[s, WIDTH]
            K = int(settings[s, 0])
            coupling_forward_serial(
                current, ctx if C > 0 else no_context, index[meta[s, COND] : meta[s, COND] + k],
                index[meta[s, TRANS] : meta[s, TRANS] + n],
                weights[meta[s, W0] : meta[s, W0] + G * (k + C) * H].reshape(G, k + C, H),
                weights[meta[s, B0] : meta[s, B0] + G * H].reshape(G, H),
                weights[meta[s, W1] : meta[s, W1] + G * H * W].reshape(G, H, W),
                weights[meta[s, B1] : meta[s, B1] + G * W].reshape(G, W),
                K, settings[s, 1], settings[s, 2], settings[s, 3], settings[s, 4], settings[s, 5], settings[s, 6],
                settings[s, 7], settings[s, 8], settings[s, 9], following, step_logdet,
                _part(pre, meta[s, PRE], rows, H), _part(x2, meta[s, X2], rows, n), _part(raw, meta[s, RAW], rows, W),
                _part(e, meta[s, RAW], rows, W), _part(sp, meta[s, SP], rows, n * (K - 1)),
                scratch[: rows * n].reshape(rows, n), row_logdet,
            )  # fmt: skip
            for b in range(B):
                for g in range(G):
                    logdet[b, g] += step_logdet[b, g]
        current, following = following, current
    z[:] = current


@serial
def flow_backward_serial(gz, gl, meta, settings, weights, index, pre, x2, raw, e, sp, tiny, grad_x, grad_ctx):
    """The vector-Jacobian product of :func:`flow_forward_serial` from the gradients w.r.t. z (B, G, D) and the
    log-determinant (B, G): grad_x (B, G, D) and grad_ctx (B, G, C) (zeros for a flow without context), subnormal
    entries flushed to zero (``flush``), as the couplings' own backward does."""
    B, G, D = gz.shape
    rows, C_flow = B * G, grad_ctx.shape[2]
    current, following = np.empty_like(gz), np.empty_like(gz)
    for b in range(B):
        for g in range(G):
            for j in range(D):
                current[b, g, j] = flush(gz[b, g, j], tiny)
    g_logdet = np.empty(rows, gz.dtype)
    for b in range(B):
        for g in range(G):
            g_logdet[b * G + g] = flush(gl[b, g], tiny)
    widest = 0
    for s in range(meta.shape[0]):
        if meta[s, KIND] != AFFINE:
            widest = max(widest, meta[s, WIDTH])
    scratch = np.empty(rows * D, gz.dtype), np.empty(rows * D, gz.dtype), np.empty(rows * widest, gz.dtype)
    step_ctx, no_context = np.empty((B, G, C_flow), gz.dtype), np.empty((B, G, 0), gz.dtype)
    grad_ctx[:] = 0.0
    for s in range(meta.shape[0] - 1, -1, -1):
        if meta[s, KIND] == AFFINE:  # dx = dz A^T
            matrix = meta[s, MATRIX]
            for b in range(B):
                for g in range(G):
                    for i in range(D):
                        row = matrix + (g * D + i) * D
                        total = 0.0
                        for j in range(D):
                            total += current[b, g, j] * weights[row + j]
                        following[b, g, i] = total
        else:
            k, n, C, H, W = meta[s, COND_DIMS], meta[s, TRANS_DIMS], meta[s, CONTEXT], meta[s, HIDDEN], meta[s, WIDTH]
            K = int(settings[s, 0])
            coupling_backward_serial(
                current, g_logdet, index[meta[s, COND] : meta[s, COND] + k],
                index[meta[s, TRANS] : meta[s, TRANS] + n],
                weights[meta[s, W0T] : meta[s, W0T] + G * H * (k + C)].reshape(G, H, k + C),
                weights[meta[s, W1T] : meta[s, W1T] + G * W * H].reshape(G, W, H),
                K, settings[s, 1], settings[s, 2], settings[s, 3], settings[s, 4], settings[s, 5], settings[s, 6],
                settings[s, 7], settings[s, 8], settings[s, 9],
                _part(pre, meta[s, PRE], rows, H), _part(x2, meta[s, X2], rows, n), _part(raw, meta[s, RAW], rows, W),
                _part(e, meta[s, RAW], rows, W), _part(sp, meta[s, SP], rows, n * (K - 1)), tiny,
                scratch[0][: rows * n].reshape(rows, n), scratch[1][: rows * n].reshape(rows, n),
                scratch[2][: rows * W].reshape(rows, W), following, step_ctx if C > 0 else no_context,
            )  # fmt: skip
            if C > 0:
                grad_ctx += step_ctx
        current, following = following, current
    grad_x[:] = current
