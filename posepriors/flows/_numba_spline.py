"""The rational-quadratic spline of ``RQSplineCoupling`` as fused CPU kernels, JIT-compiled by Numba (optional).

On a large CPU batch the spline costs several times the coupling's matrix multiplies: about 60 element-wise tensor
ops forward (as many backward), each a pass over memory. Here the element-wise work after the conditioner is one
vectorised tensor op (``exp`` of the outputs, on contiguous memory; the loops clamp it) and one Numba loop over the
rows that finds each value's bin and evaluates the knot derivatives, the spline, its log-determinant and, in the
backward, the partial derivatives, with every intermediate in registers. Numba compiles the loops on first use
(a few seconds; cached on disk) from the Python below: no build step, nothing compiled ships. Without Numba
installed (``pip install "posepriors[fast]"``), or with ``POSEPRIORS_NUMBA=0`` in the environment, the couplings keep
their tensor ops, and so does a process forked after its parent ran the kernels (Numba's OpenMP thread pool is not
fork-safe); ``tests/test_numba_spline.py`` checks both give the same numbers (float64 to 1e-9: PyTorch's
``softplus`` returns its input above 20, where the kernels' is exact). For the few rows of the NumPy flows of small
batches (``posepriors.flows._numpy_spline``) the same loops run in the calling thread (:func:`forward_arrays` with
``parallel=False``), and a flow whose every conditioner has one hidden SiLU layer (every shipped flow) runs whole,
folded linear maps and conditioners included, as one loop forward and one backward (:func:`flow_forward_arrays`).
Numba loads only once a process has made :data:`LOAD_AFTER` calls that could use it (:func:`wanted`), except that an
iterative routine (a fit, a MAP projection) decides for its whole loop at its start (:func:`one_path`).

A grouped coupling (``joint_flow``'s per-joint flows, one or two values a row) scores in a column layout instead
(:func:`score_columns`): its loop runs down the batch, which LLVM vectorises, where the row loop would run over a
row's one or two values.

The inverse (latent to data) of a coupling with :data:`SCORING_BINS` bins runs the same way (:func:`score` and
:func:`score_saving` with ``inverse=True``, the latter for a frozen coupling's autograd node); its backward is the
forward spline's at the inverse, by implicit differentiation (``_numba_kernels.grad_rows``).

The formulas are those of ``RQSplineCoupling._transform_saving`` / ``_transform_vjp``: in a bin with left knot
``(x_k, y_k)``, width ``w``, height ``h`` and knot derivatives ``d0, d1``, with ``xi = (x - x_k) / w``,
``s = h / w``, ``t = xi (1 - xi)``, ``q = s + (d0 + d1 - 2 s) t`` and ``p = s xi^2 + d0 t``, the value is
``y_k + h p / q`` and ``dy/dx = s^2 m / q^2`` with ``m = d1 xi^2 + 2 s t + d0 (1 - xi)^2``; outside
``[-bound, bound]`` the identity.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from torch.autograd import forward_ad

from posepriors.utils import in_transform

if TYPE_CHECKING:
    from posepriors.flows.couplings import RQSplineCoupling

__all__ = [
    "LOAD_AFTER",
    "LOAD_AT_VALUES",
    "SCORING_BINS",
    "FlowArrays",
    "FlowState",
    "Saved",
    "ScoringState",
    "available",
    "backward",
    "backward_arrays",
    "forward",
    "flow_backward_arrays",
    "flow_forward_arrays",
    "forward_arrays",
    "one_path",
    "plain_cpu",
    "score",
    "score_backward",
    "score_columns",
    "score_saving",
    "untouched",
    "usable",
    "wanted",
]

ENABLED = os.environ.get("POSEPRIORS_NUMBA", "1") != "0"
"""Whether the couplings may use these kernels (where Numba is installed); tests and benchmarks switch it."""


@cache
def _numba() -> ModuleType | None:
    try:
        import numba
    except ImportError:
        return None
    return numba


def available() -> bool:
    """Whether Numba is installed and the kernels are switched on (:data:`ENABLED`)."""
    return ENABLED and _numba() is not None


LOAD_AFTER = 32
"""Numba and the kernels load (the import, then the compiled code from the disk cache: about 0.5 s; seconds to
compile on a machine's first use) at the first spline call that could run them after this many such calls in the
process, or at once for a call of at least :data:`LOAD_AT_VALUES` values, which repays the load by itself. So a
one-off call of a script never waits for Numba, and a loop switches within its first steps; once loaded, every call
that can run them does. 0: from the first call."""

LOAD_AT_VALUES = 1 << 18

_waiting = 0
_held = 0  # loops running (one_path) that keep the tensor ops to their end
_loading = 0  # loops running that load the kernels at their first call


def wanted(values: int) -> bool:
    """Whether a spline call of ``values`` transformed values that could run the kernels should (see
    :data:`LOAD_AFTER` and :func:`one_path`); imports Numba only when the answer may be yes."""
    global _waiting
    if not ENABLED:
        return False
    if _numba.cache_info().currsize == 0:  # Numba not imported yet
        if _held:
            return False
        _waiting += 1
        if _waiting <= LOAD_AFTER and values < LOAD_AT_VALUES:
            return False
    return available()


@contextlib.contextmanager
def one_path(steps: int | None = None) -> Iterator[None]:
    """Run an iterative routine of ``steps`` steps (a fit, a MAP projection) on one arithmetic throughout.

    Without it, Numba would load in the middle of a process's first loop (after :data:`LOAD_AFTER` calls), and from
    that step on the round-off changes; on a sharp density a MAP or a fit may then end somewhere else, so the first
    call of a process would differ from the next ones with the same input. A loop of at least :data:`LOAD_AFTER`
    steps, which would load Numba anyway, loads it at its first call; a shorter one keeps the tensor ops to its end
    (if Numba was not loaded before); ``None`` stands for a long loop (the MAP projections run 50 to 200 steps).
    Nested loops keep the outer loop's decision.
    """
    global _waiting, _held, _loading
    if _numba.cache_info().currsize or _held or _loading:  # decided before: loaded, or by an outer loop
        yield
        return
    if steps is None or steps >= LOAD_AFTER:
        before, _waiting = _waiting, max(_waiting, LOAD_AFTER)  # the loop's first call that could run them loads
        _loading += 1
        try:
            yield
        finally:
            _loading -= 1
            if _numba.cache_info().currsize == 0:  # nothing in the loop could run them: count as before
                _waiting = before
        return
    _held += 1
    try:
        yield
    finally:
        _held -= 1


def usable(x2: Tensor, params: Tensor) -> bool:
    """Whether a spline on these tensors can run here: both are plain CPU tensors of one float dtype, not empty, no
    tracer, dispatch mode or transform (``torch.compile``, ``make_fx``, fake tensors, ``torch.func``, forward-mode
    tangents) is watching, for which the work must stay in tensor ops, and the kernels are available and
    :func:`wanted`."""
    return params.dtype == x2.dtype and plain_cpu(x2, params) and wanted(x2.numel())  # last: it counts calls


def plain_cpu(*tensors: Tensor) -> bool:
    """Whether these are plain, non-empty CPU tensors of float32 or float64 that a NumPy or Numba loop may read:
    no tracer, dispatch mode or transform (``torch.compile``, ``make_fx``, fake tensors, ``torch.func``,
    forward-mode tangents) is watching, for which the work must stay in tensor ops."""
    if torch.compiler.is_compiling():  # first: under torch.compile nothing else here is traced
        return False
    return (
        all(type(t) is Tensor and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors)
        and torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is None
        and torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None
        and not torch._C._is_torch_function_mode_enabled()
        and not in_transform()  # no torch.func transform (grad, vmap)
        and all(t.numel() > 0 and _no_tangent(t) for t in tensors)
    )


def untouched(t: Tensor) -> bool:
    """Whether a weight (a Parameter or a tensor) carries no forward-mode tangent and is no tracer's or transform's
    wrapper: a plain CPU tensor once its Parameter class is set aside."""
    return t.device.type == "cpu" and (type(t) is Tensor or type(t) is torch.nn.Parameter) and _no_tangent(t)


def _no_tangent(t: Tensor) -> bool:
    """Whether ``t`` carries no forward-mode tangent (``torch.autograd.forward_ad``), which the kernels would drop."""
    return forward_ad._current_level < 0 or forward_ad.unpack_dual(t).tangent is None


def _settings(coupling: RQSplineCoupling) -> tuple[int | float, ...]:
    """The spline's constants: bins, bound, the widths' and heights' scale and offset, the derivative floor, shift
    and exp(shift), and the logit clamp (as ``RQSplineCoupling._factors`` makes them, in float64)."""
    K, bound = coupling.bins, coupling.bound
    return (
        K,
        bound,
        2 * bound * (1 - coupling.min_width * K),
        2 * bound * coupling.min_width,
        2 * bound * (1 - coupling.min_height * K),
        2 * bound * coupling.min_height,
        coupling.min_derivative,
        coupling._derivative_shift,
        math.exp(coupling._derivative_shift),
        coupling._LOGIT_LIMIT,
    )


@cache
def _kernels() -> ModuleType:
    """The loops (:mod:`posepriors.flows._numba_kernels`), compiled or read from the disk cache on first use."""
    from posepriors.flows import _numba_kernels

    return _numba_kernels


_STARTED = False
"""Whether this process has run a parallel loop (and so started Numba's thread pool)."""


def _after_fork_in_child() -> None:
    """A child forked after the parent ran the kernels keeps the tensor ops: Numba's default thread pool (GNU
    OpenMP) is not fork-safe, and a parallel loop in such a child can hang."""
    global ENABLED
    if _STARTED:
        ENABLED = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _prepare(coupling: RQSplineCoupling, params: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The vectorised tensor ops, from the raw conditioner outputs (rows, n * (3K - 1)): their ``exp`` (the bins'
    unnormalised softmax; the loops clamp it to exp(+-limit) on reading, as the tensor ops clamp the logits), and the
    knot derivatives' ``softplus(raw + shift)`` as ``log1p(exp(raw) exp(shift))``, (rows, n * (K - 1)) (the loops
    redo the rare entries beyond the clamp, where this overflows)."""
    K = coupling.bins
    e = params.exp()
    derivs = e.view(e.shape[0], -1, 3 * K - 1)[..., 2 * K :]
    sp = torch.mul(derivs, math.exp(coupling._derivative_shift)).log1p_()
    return e.numpy(), sp.reshape(e.shape[0], -1).numpy()


def _threads() -> None:
    """Before a parallel loop: as many threads as PyTorch's (Numba's pool starts with the first such loop). Numba's
    OpenMP pool shares the process's OpenMP settings, and starting it raises them to ``NUMBA_NUM_THREADS``: PyTorch's
    thread count (what the user set) is put back."""
    global _STARTED
    _STARTED = True
    numba = _numba()
    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


class Saved:
    """What :func:`backward` needs: the transformed inputs (rows, n), the raw conditioner outputs and what
    :func:`_prepare` made of them, as arrays, and the batch shape."""

    __slots__ = ("e", "params", "shape", "sp", "x")

    def __init__(self, x: np.ndarray, params: np.ndarray, e: np.ndarray, sp: np.ndarray, shape: torch.Size) -> None:
        self.x, self.params, self.e, self.sp, self.shape = x, params, e, sp, shape


def forward(coupling: RQSplineCoupling, x2: Tensor, params: Tensor) -> tuple[Tensor, Tensor, Saved]:
    """The spline forward: ``x2`` (*, n) and the conditioner outputs ``params`` (*, n * (3K - 1)) to the outputs
    (*, n), the log-determinant (*,) (summed over the n dims) and what :func:`backward` needs. No autograd."""
    shape = x2.shape
    x = x2.detach().reshape(-1, shape[-1]).contiguous().numpy()
    raw = params.detach().reshape(x.shape[0], -1).contiguous().numpy()
    y, logdet, saved = forward_arrays(coupling, x, raw, parallel=True)
    saved.shape = shape
    out = torch.from_numpy(y).reshape(shape)
    return out, torch.from_numpy(logdet).to(x2.dtype).reshape(shape[:-1]), saved


SCORING_BINS = (4, 8)
"""Bin counts that :func:`score` has a loop for (4: global_flow's; 8: joint_flow's and the flows' default)."""


def score(
    coupling: RQSplineCoupling, x: Tensor, bins: Tensor, derivatives: Tensor, *, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    """The spline forward for scoring (no autograd, nothing saved) in the loop vectorised over values
    (``_numba_kernels.score_rows``; a coupling with :data:`SCORING_BINS` bins), or its inverse with ``inverse``
    (``inverse_rows``): rows of values ``x`` (..., n) and their conditioner outputs param-major, the bin logits
    ``bins`` (..., 2Kn: the K width logits of every value, then the K height logits) and the knot-derivative logits
    plus the shift, ``raw + shift`` (..., (K - 1) n) (``RQSplineCoupling._scoring_weights`` writes them so; ``bins``
    is overwritten), to the outputs (..., n) and the log-determinant (...). Two vectorised ops on contiguous memory:
    ``exp`` of the bin logits, in place (clamped in the loop), and ``softplus`` of the shifted knot-derivative
    logits (threshold 40: exact in float64, as the other kernels compute it)."""
    sp = torch.nn.functional.softplus(derivatives, threshold=40.0)
    y, logdet, _ = _score_loop(coupling, x, bins.exp_(), sp, inverse)
    return y, logdet


def score_columns(
    coupling: RQSplineCoupling, x: Tensor, bins: Tensor, derivatives: Tensor, *, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    """:func:`score` in the column layout of a grouped coupling (``_numba_kernels.spline_score_columns``; the
    per-joint flows, whose rows hold one or two values): the values ``x`` (G, n, B), the bin logits
    ``bins`` (G, 2Kn, B) and the shifted knot-derivative logits ``derivatives`` (G, (K - 1) n, B), both contiguous
    and param-major down their second dimension (``bins`` is overwritten), to the outputs (G, n, B) and the
    log-determinant (G, B). The loop runs over the batch, on contiguous memory; the log of each row's product of
    slopes is one vectorised op after it. Where a product leaves [1e-300, 1e300] (or is NaN), the whole call runs
    again in the row layout, whose loop takes the log in steps (:func:`score`; a knot derivative's logit is not
    clamped, so a slope can be extreme)."""
    G, n, B = x.shape
    K = coupling.bins
    sp = torch.nn.functional.softplus(derivatives, threshold=40.0)
    # contiguous in and out: strided loads and stores (the coupling's (B, G, n) order) keep LLVM from vectorising
    # the loop, which then runs 4x slower
    values = x.detach().contiguous().numpy()
    y = np.empty_like(values)
    product = np.empty((G, B), dtype=np.float64)
    _threads()
    _, bound, sw, ow, sh, oh, min_d, *_ = _settings(coupling)
    arrays = (values, bins.exp_().view(G, 2 * K, n, B).numpy(), sp.view(G, K - 1, n, B).numpy())
    loop = _kernels().spline_inverse_columns if inverse else _kernels().spline_score_columns
    loop(*arrays, K, bound, sw, ow, sh, oh, min_d, coupling._LOGIT_LIMIT, y, product)
    if not (np.all(product > 1e-300) and np.all(product < 1e300)):
        e, sp = (torch.from_numpy(a).permute(0, 3, 1, 2).contiguous() for a in arrays[1:])
        y_rows, logdet, _ = _score_loop(coupling, x.permute(0, 2, 1), e, sp, inverse)
        return y_rows.permute(0, 2, 1), logdet
    logdet = torch.from_numpy(product).log_()
    return torch.from_numpy(y), (logdet.neg_() if inverse else logdet).to(x.dtype)


def _score_loop(
    coupling: RQSplineCoupling, x: Tensor, e: Tensor, sp: Tensor, inverse: bool
) -> tuple[Tensor, Tensor, np.ndarray]:
    """The scoring loop (or its inverse) on the values ``x`` (..., n), the bin logits' exps ``e`` (..., 2Kn) and the
    knot derivatives' softplus ``sp`` (..., (K - 1) n): the outputs, the log-determinant and the values' rows as an
    array."""
    shape, K = x.shape, coupling.bins
    n = shape[-1]
    values = x.detach().reshape(-1, n).contiguous().numpy()
    y = np.empty_like(values)
    logdet = np.empty(values.shape[0], dtype=values.dtype)  # summed in float64, rounded once on writing
    _threads()
    _, bound, sw, ow, sh, oh, min_d, *_ = _settings(coupling)
    arrays = (values, e.view(-1, 2 * K, n).numpy(), sp.view(-1, K - 1, n).numpy())
    loop = _kernels().spline_inverse if inverse else _kernels().spline_score
    loop(*arrays, K, bound, sw, ow, sh, oh, min_d, coupling._LOGIT_LIMIT, y, logdet)
    return torch.from_numpy(y).view(shape), torch.from_numpy(logdet).view(shape[:-1]), values


class ScoringState:
    """What :func:`score_backward` needs from :func:`score_saving`: the values' rows (R, n), the bin logits and
    their exps (R, 2K, n), the knot derivatives' softplus and sigmoid (R, K - 1, n), as arrays, the shape and
    whether the loop ran the inverse."""

    __slots__ = ("e", "inverse", "raw", "shape", "sig", "sp", "x")

    def __init__(self, *arrays: np.ndarray, shape: torch.Size, inverse: bool) -> None:
        """``arrays``: x, raw, e, sp, sig, in this order."""
        self.x, self.raw, self.e, self.sp, self.sig = arrays
        self.shape, self.inverse = shape, inverse


def score_saving(
    coupling: RQSplineCoupling, x: Tensor, bins: Tensor, derivatives: Tensor, *, inverse: bool = False
) -> tuple[Tensor, Tensor, ScoringState]:
    """:func:`score` (forward or inverse) that also returns what :func:`score_backward` needs (a fitting step
    through the same loop; the arguments as for :func:`score`, both kept)."""
    K, n = coupling.bins, x.shape[-1]
    e = bins.exp()
    sp, sig = torch.nn.functional.softplus(derivatives, threshold=40.0), torch.sigmoid(derivatives)
    y, logdet, values = _score_loop(coupling, x, e, sp, inverse)
    arrays = (t.view(-1, m, n).numpy() for t, m in ((bins, 2 * K), (e, 2 * K), (sp, K - 1), (sig, K - 1)))
    return y, logdet, ScoringState(values, *arrays, shape=x.shape, inverse=inverse)


def score_backward(
    coupling: RQSplineCoupling, state: ScoringState, grad_y: Tensor, grad_logdet: Tensor
) -> tuple[Tensor, Tensor]:
    """The vector-Jacobian product of :func:`score_saving` (of the forward or the inverse, as it ran): from the
    gradients w.r.t. its outputs (shape of ``x``) and log-determinant, those w.r.t. ``x`` and the conditioner
    outputs (..., (3K - 1) n), param-major as :meth:`RQSplineCoupling._scoring_weights` orders them (bin logits,
    then knot-derivative logits; ``_numba_kernels.grad_rows``). Both are views of one array."""
    K, (rows, n) = coupling.bins, state.x.shape
    gy, gl = _gradient_arrays(state.x, grad_y, grad_logdet)
    out = np.empty((rows, 3 * K, n), dtype=state.x.dtype)
    _threads()
    _, bound, sw, ow, sh, oh, min_d, *_ = _settings(coupling)
    arrays = (state.x, state.e, state.raw, state.sp, state.sig)
    loop = _kernels().spline_inverse_grad if state.inverse else _kernels().spline_grad
    loop(*arrays, K, bound, sw, ow, sh, oh, min_d, coupling._LOGIT_LIMIT, gy, gl, out)
    grads = torch.from_numpy(out)
    batch = state.shape[:-1]
    return grads[:, -1].view(state.shape), grads[:, :-1].reshape(rows, -1).view(*batch, (3 * K - 1) * n)


def _gradient_arrays(x: np.ndarray, grad_y: Tensor, grad_logdet: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The gradients w.r.t. a loop's outputs and log-determinant as C-contiguous arrays in the dtype of its values'
    rows ``x`` (R, n): (R, n) and (R,)."""
    dtype = torch.float64 if x.dtype == np.float64 else torch.float32
    gy = grad_y.detach().to(dtype).reshape(x.shape).contiguous().numpy()
    return gy, grad_logdet.detach().to(dtype).reshape(x.shape[0]).contiguous().numpy()


def backward(coupling: RQSplineCoupling, saved: Saved, grad_y: Tensor, grad_logdet: Tensor) -> tuple[Tensor, Tensor]:
    """The spline's vector-Jacobian product: gradients w.r.t. ``x2`` (*, n) and ``params`` (*, n * (3K - 1)) from
    those w.r.t. the outputs (*, n) and the log-determinant (*,)."""
    grad_x, grad_p = backward_arrays(coupling, saved, *_gradient_arrays(saved.x, grad_y, grad_logdet), parallel=True)
    return (
        torch.from_numpy(grad_x).reshape(saved.shape),
        torch.from_numpy(grad_p).reshape(*saved.shape[:-1], saved.params.shape[-1]),
    )


def forward_arrays(
    coupling: RQSplineCoupling, x: np.ndarray, raw: np.ndarray, *, parallel: bool
) -> tuple[np.ndarray, np.ndarray, Saved]:
    """:func:`forward` on C-contiguous arrays of one float dtype: ``x`` (rows, n) and ``raw`` (rows, n * (3K - 1))
    to the outputs (rows, n), the float64 log-determinant (rows,) and what :func:`backward_arrays` needs. The rows
    run in parallel threads, or in the calling thread (``parallel=False``: a few rows, as the NumPy flows of small
    batches have them, ``posepriors.flows._numpy_spline``)."""
    settings = _settings(coupling)
    if parallel:
        e, sp = _prepare(coupling, torch.from_numpy(raw))
        _threads()
        forward_kernel = _kernels().spline_forward
    else:  # the same arrays from one loop: a few rows cost more in op calls than in arithmetic
        forward_kernel = _kernels().spline_forward_serial
        K, *_, exp_shift, limit = settings
        e, sp = np.empty_like(raw), np.empty((raw.shape[0], raw.shape[1] // (3 * K - 1) * (K - 1)), raw.dtype)
        _kernels().prepare_serial(raw, K, exp_shift, limit, e, sp)
    y = np.empty_like(x)
    logdet = np.empty(x.shape[0], dtype=np.float64)
    forward_kernel(x, e, sp, raw, *settings, y, logdet)
    return y, logdet, Saved(x, raw, e, sp, torch.Size(x.shape))


def backward_arrays(
    coupling: RQSplineCoupling, saved: Saved, gy: np.ndarray, gl: np.ndarray, *, parallel: bool
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`backward` on arrays: the gradients w.r.t. ``x`` (rows, n) and ``raw`` (rows, n * (3K - 1)) of
    :func:`forward_arrays` from the C-contiguous gradients ``gy`` (rows, n) and ``gl`` (rows,) in the inputs' dtype."""
    grad_x = np.empty_like(saved.x)
    grad_p = np.empty_like(saved.params)
    if parallel:
        _threads()
    kernel = _kernels().spline_backward if parallel else _kernels().spline_backward_serial
    kernel(saved.x, saved.e, saved.sp, saved.params, *_settings(coupling), gy, gl, grad_x, grad_p)
    return grad_x, grad_p


class FlowArrays:
    """A frozen flow's NumPy plan (``posepriors.flows._numpy_spline.Plan``) as the table that
    ``_numba_kernels.flow_forward_serial`` runs in one call: per step a row of ``meta`` (its kind, sizes and where
    its weights, indices and saved arrays start; the column names are the kernel module's), its spline constants
    (``settings``), and every weight and index in one flat array each, copied once. ``per_row`` holds the saved
    arrays' widths per row of (B x G): hidden pre-activations, transformed inputs, conditioner outputs (also their
    exps), knot-derivative softplus. Built where every coupling has one hidden layer with SiLU (as every shipped flow
    has: :meth:`build` returns None otherwise)."""

    __slots__ = ("context", "dim", "groups", "index", "meta", "per_row", "settings", "weights")

    @classmethod
    def build(cls, plan: list, dtype: np.dtype) -> FlowArrays | None:
        from posepriors.flows.couplings import RQSplineCoupling

        steps = [step for step in plan if isinstance(step[0], RQSplineCoupling)]
        couplings = [step[0] for step in steps]
        groups = {step[1][0][0].shape[0] for step in steps}  # the first weight's groups (stacked plans: members)
        if (
            not couplings
            or any(len(c.conditioner._linears) != 2 or c.conditioner.activation != "silu" for c in couplings)
            or len({c.context_features for c in couplings} - {0}) > 1
            or len(groups) > 1
        ):
            return None
        (groups,) = groups
        self = cls()
        names = _kernels()
        weights: list[np.ndarray] = []
        indices: list[np.ndarray] = []
        sizes = [0, 0]  # entries in weights, in indices
        per_row = {"pre": 0, "x2": 0, "raw": 0, "sp": 0}

        def put(parts: list[np.ndarray], array: np.ndarray, which: int) -> int:
            start = sizes[which]
            parts.append(np.ascontiguousarray(array, dtype=dtype if which == 0 else np.int64).reshape(-1))
            sizes[which] += parts[-1].size
            return start

        meta = np.zeros((len(plan), names.META_COLUMNS), np.int64)
        settings = np.zeros((len(plan), 10), np.float64)
        for s, step in enumerate(plan):
            if isinstance(step[0], RQSplineCoupling):
                coupling, ((w0, b0, w0t), (w1, b1, w1t)), _ = step
                n, K, H, W = coupling.num_transformed, coupling.bins, w0.shape[2], w1.shape[2]
                row = meta[s]
                row[names.KIND] = names.COUPLING
                row[[names.COND_DIMS, names.TRANS_DIMS, names.CONTEXT, names.HIDDEN, names.WIDTH]] = (
                    coupling.num_conditioning, n, coupling.context_features, H, W,
                )  # fmt: skip
                for column, array in ((names.W0, w0), (names.B0, b0), (names.W1, w1), (names.B1, b1)):
                    row[column] = put(weights, array, 0)
                row[names.W0T], row[names.W1T] = put(weights, w0t, 0), put(weights, w1t, 0)
                row[names.COND] = put(indices, coupling.conditioning_index.cpu().numpy(), 1)
                row[names.TRANS] = put(indices, coupling.transformed_index.cpu().numpy(), 1)
                for column, kind, width in (
                    (names.PRE, "pre", H), (names.X2, "x2", n), (names.RAW, "raw", W), (names.SP, "sp", n * (K - 1))
                ):  # fmt: skip
                    row[column] = per_row[kind]
                    per_row[kind] += width
                settings[s] = _settings(coupling)
            else:
                matrix, offset, logdet = (  # a map shared by the groups (one of them) is repeated per group
                    np.broadcast_to(a, (groups, *a.shape[1:])) for a in step[:3]
                )
                meta[s, names.KIND] = names.AFFINE
                meta[s, names.MATRIX] = put(weights, matrix, 0)
                meta[s, names.OFFSET], meta[s, names.LOGDET] = put(weights, offset, 0), put(weights, logdet, 0)
        self.meta, self.settings, self.per_row = meta, settings, per_row
        self.weights, self.index = np.concatenate(weights), np.concatenate(indices)
        self.groups, self.dim = groups, couplings[0].dim
        self.context = max(c.context_features for c in couplings)
        return self


class FlowState:
    """What :func:`flow_backward_arrays` needs from :func:`flow_forward_arrays`: the saved arrays, flat."""

    __slots__ = ("e", "pre", "raw", "sp", "x2")

    def __init__(self, pre: np.ndarray, x2: np.ndarray, raw: np.ndarray, e: np.ndarray, sp: np.ndarray) -> None:
        self.pre, self.x2, self.raw, self.e, self.sp = pre, x2, raw, e, sp


def flow_forward_arrays(
    arrays: FlowArrays, x: np.ndarray, context: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, FlowState]:
    """A whole frozen flow (:class:`FlowArrays`) on a few rows in one loop in the calling thread: ``x`` (B, G, D) and
    ``context`` (B, G, C) or None to the latent codes (B, G, D), the log-determinant (B, G) in x's dtype (summed in
    float64) and what :func:`flow_backward_arrays` needs."""
    B, G, D = x.shape
    C = arrays.context
    if (G, D) != (arrays.groups, arrays.dim) or (C and (context is None or context.shape != (B, G, C))):
        # the loop does not check its indices: a mismatch would read past the arrays
        raise ValueError(
            f"expected inputs (B, {arrays.groups}, {arrays.dim})"
            + (f" and a context (B, {arrays.groups}, {C})" if C else "")
            + f" for this flow, got {x.shape}"
            + (f" and {None if context is None else context.shape}" if C else "")
        )
    rows = B * G
    ctx = np.ascontiguousarray(context) if C else np.empty((B, G, 0), x.dtype)
    z, logdet = np.empty_like(x), np.empty((B, G), np.float64)
    per_row = arrays.per_row
    saved = [np.empty(rows * per_row[kind], x.dtype) for kind in ("pre", "x2", "raw", "raw", "sp")]
    _kernels().flow_forward_serial(
        np.ascontiguousarray(x), ctx, arrays.meta, arrays.settings, arrays.weights, arrays.index, z, logdet, *saved
    )
    return z, logdet.astype(x.dtype), FlowState(*saved)


def flow_backward_arrays(
    arrays: FlowArrays, state: FlowState, grad_z: np.ndarray, grad_logdet: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """The gradients w.r.t. x (B, G, D) and the context (B, G, C), or None for a flow without one, of
    :func:`flow_forward_arrays`, given those w.r.t. its latent codes and log-determinant; entries below the dtype's
    smallest normal number come out as zeros."""
    dtype = state.pre.dtype
    gz = np.ascontiguousarray(grad_z, dtype=dtype)
    gl = np.ascontiguousarray(grad_logdet, dtype=dtype)
    grad_x, grad_ctx = np.empty_like(gz), np.empty((*gz.shape[:2], arrays.context), dtype)
    _kernels().flow_backward_serial(
        gz, gl, arrays.meta, arrays.settings, arrays.weights, arrays.index, state.pre, state.x2, state.raw, state.e,
        state.sp, float(np.finfo(dtype).tiny), grad_x, grad_ctx,
    )  # fmt: skip
    return grad_x, grad_ctx if arrays.context else None
