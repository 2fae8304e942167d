"""The fused Numba kernels of the spline coupling (:mod:`posepriors.flows._numba_spline`): the same numbers as the
tensor ops (values, log-determinants and vector-Jacobian products, tails, interval ends and clamped logits
included), and they run only where no autograd, tracer, dispatch mode or transform needs the tensor ops."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode

import posepriors
from posepriors import flows
from posepriors.flows import _numba_spline, sequence
from posepriors.flows.couplings import RQSplineCoupling
from tests.test_flows import data, perturb

pytest.importorskip("numba", reason="the fused spline kernels need Numba (pip install 'posepriors[fast]')")

LIMIT = RQSplineCoupling._LOGIT_LIMIT
MASKS = {  # conditioning dims (True) of a 7-D coupling: index-gather, prefix and suffix layouts
    "mid": [True, False, True, False, False, True, False],
    "prefix": [True, True, True, False, False, False, False],
    "suffix": [False, False, False, False, True, True, True],
}


@contextlib.contextmanager
def numba_enabled(enabled: bool) -> Iterator[None]:
    """Switch the kernels on or off (``_numba_spline.ENABLED``) and restore the previous setting."""
    previous = _numba_spline.ENABLED
    _numba_spline.ENABLED = enabled
    try:
        yield
    finally:
        _numba_spline.ENABLED = previous


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed the global RNG for building a module (the blocks' initialisation draws from it) and restore its state
    afterwards, so that the weights do not depend on which tests ran before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@pytest.fixture(autouse=True)
def _restore_enabled(monkeypatch) -> Iterator[None]:
    monkeypatch.setattr(_numba_spline, "LOAD_AFTER", 0)  # the kernels from the first call (no warm-up)
    with numba_enabled(_numba_spline.ENABLED):
        yield


@pytest.fixture
def kernel_calls(monkeypatch) -> dict[str, int]:
    """Count the runs of the kernels (the couplings call them through the module): the saving loop's forward and
    backward, and the vectorised loops (forward or inverse) without autograd (score), with it (score_saving) and
    backward."""
    calls = {"forward": 0, "backward": 0, "score": 0, "score_saving": 0, "score_backward": 0}
    for name in (*calls, "score_columns"):  # the scoring loop of grouped couplings counts as "score"
        original = getattr(_numba_spline, name)
        key = "score" if name == "score_columns" else name

        def counted(*args, _name=key, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(_numba_spline, name, counted)
    return calls


def runs(**counts: int) -> dict[str, int]:
    """The ``kernel_calls`` counts: these, and zero for every other kernel."""
    return {"forward": 0, "backward": 0, "score": 0, "score_saving": 0, "score_backward": 0, **counts}


def spline_coupling(mask, bins: int, dtype: torch.dtype, groups: int = 3, context: int = 2, logit_scale: float = 1.0):
    """A frozen perturbed 7-D spline coupling (bound 3); ``logit_scale`` scales its conditioner's last layer, so that
    some outputs go beyond the logit clamp."""
    with seeded(bins):
        coupling = RQSplineCoupling(groups, len(mask), mask, 12, context_features=context, bins=bins, bound=3.0)
    perturb(coupling, scale=1.0, seed=bins)
    with torch.no_grad():
        coupling.conditioner[-1].weight.mul_(logit_scale)
        coupling.conditioner[-1].bias.mul_(logit_scale)
    return coupling.to(dtype).eval().requires_grad_(False)


def spline_inputs(coupling: RQSplineCoupling, batch: int, dtype: torch.dtype, seed: int = 0):
    """Transformed dims (batch, G, n) and raw conditioner outputs (batch, G, n (3K - 1)) with every special case:
    values in both tails, exactly at -bound and +bound, just inside, on inner knots; logits beyond the clamp
    (|raw| > 50), exactly at it, a bin dominated by one clamped logit, all logits clamped, knot-derivative logits
    where ``softplus`` changes formula (20 < raw + shift < 50) and far below zero."""
    g = torch.Generator().manual_seed(seed)
    G, n, K, bound = coupling._groups(), coupling.num_transformed, coupling.bins, coupling.bound
    P = 3 * K - 1
    x = 1.5 * torch.randn(batch, G, n, generator=g, dtype=torch.float64)
    x[0, :, 0], x[0, :, -1] = bound, -bound
    x[1, :, :] = torch.tensor([-10.0, 10.0, -bound, bound])[torch.arange(n) % 4]
    x[2, :, :] = -bound
    x[3, :, :] = bound - 1e-12  # just inside (in float32: the end)
    params = 2.0 * torch.randn(batch, G, n * P, generator=g, dtype=torch.float64)
    raw = params.view(batch, G, n, P)
    raw[4] = 60.0  # every logit clamped: uniform bins, steep inner knots (softplus of a logit beyond the clamp)
    raw[5, ..., 0], raw[5, ..., 1:K] = 70.0, -70.0  # one wide bin; the others at their minimum
    raw[6, ..., K : 2 * K] = LIMIT  # exactly at the clamp
    raw[6, ..., :K] = -LIMIT
    raw[7, ..., 2 * K :] = torch.linspace(19.0, 49.0, K - 1, dtype=torch.float64)  # large derivative logits
    raw[8, ..., 2 * K :] = -80.0  # derivatives at their floor
    raw[9:13] *= 40.0  # a mix: many beyond the clamp
    x[5:13] = torch.linspace(-bound - 0.5, bound + 0.5, n, dtype=torch.float64)  # every bin of those rows
    x[4] = -bound + 2 * bound / K * (1 + torch.arange(n) % (K - 1))  # on the uniform bins' inner knots
    return x.to(dtype), params.to(dtype)


def transform(coupling, x2, params, enabled: bool):
    with numba_enabled(enabled), torch.no_grad():
        return coupling._transform(x2, params, inverse=False)


def transform_saving(coupling, x2, params, enabled: bool):
    with numba_enabled(enabled), torch.no_grad():
        return coupling._transform_saving(x2, params)


# ---------------------------------------------------------------------------------------------------- forward
def exact_softplus(t: torch.Tensor, beta: float = 1.0, threshold: float = 20.0) -> torch.Tensor:
    """softplus without ``F.softplus``'s linear branch above ``threshold`` (which is off by up to exp(-20) = 2e-9)."""
    return torch.logaddexp(t, torch.zeros_like(t))


# tensor-path references: ``F.softplus`` as shipped (its linear branch for knot-derivative logits with
# raw + shift > 20 is off by up to 2e-9, where the kernels compute softplus exactly: 1e-10 to 2e-10 on the
# log-determinants) and with an exact softplus (the same formulas as the kernels: 1e-10)
SOFTPLUS_TOLERANCES = {"exact": dict(atol=1e-10, rtol=1e-12), "stock": dict(atol=1e-9, rtol=1e-11)}


@pytest.mark.parametrize("layout", list(MASKS))
@pytest.mark.parametrize("bins", [4, 8])
def test_forward_matches_the_tensor_path_float64(bins, layout, kernel_calls, monkeypatch):
    """float64: the kernels' values and log-determinants are the tensor ops', through ``_transform`` and
    ``_transform_saving`` (tails, ends and clamped logits included) and through whole couplings (every mask
    layout, conditioner outputs beyond the clamp): to 1e-10 against the tensor ops with an exact softplus, and to
    1e-9 against ``F.softplus``'s thresholded one."""
    coupling = spline_coupling(MASKS[layout], bins, torch.float64, logit_scale=40.0)
    x2, params = spline_inputs(coupling, 40, torch.float64)
    x, c = data(64, 3, 7, 2, seed=bins)
    x[2, :, :], x[3, :, :] = coupling.bound, -coupling.bound
    with torch.no_grad():
        raw = coupling._params(coupling._split(x)[0], c)
    assert (raw.abs() > LIMIT).float().mean() > 0.05  # whole couplings: many conditioner outputs beyond the clamp

    y, logdet = transform(coupling, x2, params, True)
    assert kernel_calls["forward"] == 1
    assert y.dtype == logdet.dtype == torch.float64 and y.shape == x2.shape and logdet.shape == x2.shape[:2]
    outside = x2.abs() >= coupling.bound  # the identity, exactly, at the ends and beyond
    assert outside.sum() > 4 * x2.shape[1] and torch.equal(y[outside], x2[outside])
    assert torch.equal(logdet[1], torch.zeros_like(logdet[1]))  # row 1 only has tails and ends
    y_saving, logdet_saving, saved = transform_saving(coupling, x2, params, True)
    assert isinstance(saved, _numba_spline.Saved) and kernel_calls["forward"] == 2
    with numba_enabled(True), torch.no_grad():
        z, z_logdet = coupling(x, c)  # a whole coupling without autograd: the scoring loop
    assert kernel_calls["score"] == 1 and kernel_calls["forward"] == 2
    torch.testing.assert_close(z[:, :, coupling.mask], x[:, :, coupling.mask], atol=0, rtol=0)

    for softplus, tol in SOFTPLUS_TOLERANCES.items():
        with monkeypatch.context() as patch:
            if softplus == "exact":
                patch.setattr(torch.nn.functional, "softplus", exact_softplus)
            y_ref, logdet_ref = transform(coupling, x2, params, False)
            y_saving_ref, logdet_saving_ref, saved_ref = transform_saving(coupling, x2, params, False)
            with numba_enabled(False), torch.no_grad():
                z_ref, z_logdet_ref = coupling(x, c)
        assert not isinstance(saved_ref, _numba_spline.Saved) and kernel_calls["forward"] == 2
        assert kernel_calls["score"] == 1
        for got, want in (
            (y, y_ref),
            (logdet, logdet_ref),
            (y_saving, y_saving_ref),
            (logdet_saving, logdet_saving_ref),
            (y_saving, y_ref),
            (logdet_saving, logdet_ref),
            (z, z_ref),
            (z_logdet, z_logdet_ref),
        ):
            torch.testing.assert_close(got, want, **tol, msg=lambda m, softplus=softplus: f"{softplus}: {m}")


@pytest.mark.parametrize("layout", ["mid", "suffix"])
@pytest.mark.parametrize("bins", [4, 8])
def test_forward_matches_the_tensor_path_float32(bins, layout, kernel_calls):
    """float32: the kernels agree with the tensor ops within float32 round-off (values of O(4); log-determinants of
    O(50), sums of logs of extreme slopes), and with the float64 spline of the same float32 inputs."""
    coupling = spline_coupling(MASKS[layout], bins, torch.float32, logit_scale=40.0)
    reference64 = spline_coupling(MASKS[layout], bins, torch.float64, logit_scale=40.0)
    x, c = data(64, 3, 7, 2, dtype=torch.float32, seed=bins)
    with torch.no_grad():
        x1, x2 = coupling._split(x)
        conditioner_inputs = (x2, coupling._params(x1, c))
    for x2, params in (spline_inputs(coupling, 40, torch.float32), conditioner_inputs):
        y, logdet = transform(coupling, x2, params, True)
        y_saving, logdet_saving, saved = transform_saving(coupling, x2, params, True)
        assert isinstance(saved, _numba_spline.Saved)
        y_ref, logdet_ref = transform(coupling, x2, params, False)
        y64, logdet64 = transform(reference64, x2.double(), params.double(), False)
        for got_y, got_logdet in ((y, logdet), (y_saving, logdet_saving)):
            assert got_y.dtype == got_logdet.dtype == torch.float32
            torch.testing.assert_close(got_y, y_ref, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got_logdet, logdet_ref, atol=5e-3, rtol=1e-4)
            torch.testing.assert_close(got_y.double(), y64, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got_logdet.double(), logdet64, atol=1e-3, rtol=1e-5)
        outside = x2.abs() >= coupling.bound
        assert torch.equal(y[outside], x2[outside])
    assert kernel_calls["forward"] == 4
    with numba_enabled(True), torch.no_grad():
        z, logdet = coupling(x, c)  # a whole coupling without autograd: the scoring loop
    assert kernel_calls["forward"] == 4 and kernel_calls["score"] == 1
    with numba_enabled(False), torch.no_grad():
        z_ref, logdet_ref = coupling(x, c)
    torch.testing.assert_close(z, z_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logdet, logdet_ref, atol=5e-3, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- scoring
def coupling_outputs(coupling, x, c, enabled: bool):
    with numba_enabled(enabled), torch.no_grad():
        return coupling(x, c)


def clamping_coupling(bins: int, groups: int) -> RQSplineCoupling:
    """A frozen float64 7-D spline coupling (bound 3, a 2-D context) whose conditioner puts many outputs beyond the
    logit clamp, and for every row value 0's and 1's bin logits exactly at it and one beyond it."""
    with seeded(bins):
        coupling = RQSplineCoupling(groups, 7, MASKS["mid"], 12, context_features=2, bins=bins, bound=3.0)
    perturb(coupling, scale=1.0, seed=bins)
    P = 3 * bins - 1
    with torch.no_grad():
        last = coupling.conditioner[-1]
        last.weight.mul_(40.0)
        for column, value in ((0, LIMIT), (bins + 1, -LIMIT), (P + 1, 70.0)):
            last.weight[..., column] = 0.0
            last.bias[..., column] = value
    return coupling.double().eval().requires_grad_(False)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("bins", [4, 8])
def test_scoring_loop_matches_the_tensor_ops_and_the_saving_loop(bins, groups, kernel_calls):
    """A whole coupling without autograd (the scoring loop, its conditioner's last layer split in two param-major
    GEMMs) gives the tensor ops' outputs and log-determinants (float64, 1e-9) and the saving loop's (1e-12), for one
    group (2-D GEMMs) and several (batched), with conditioner outputs beyond the logit clamp, tails and ends; a NaN
    input makes its row's log-determinant NaN, not a number."""
    coupling = clamping_coupling(bins, groups)
    x, c = data(256, groups, 7, 2, seed=bins)
    x[2, :, :], x[3, :, :] = coupling.bound, -coupling.bound
    x[4, 0, 1] = float("nan")  # a transformed dim
    z, logdet = coupling_outputs(coupling, x, c, True)
    assert kernel_calls == runs(score=1)
    z_ref, logdet_ref = coupling_outputs(coupling, x, c, False)
    with numba_enabled(True), torch.no_grad():
        z_saving, logdet_saving = RQSplineCoupling.__mro__[1]._forward(coupling, x, c)  # the saving loop's forward
    assert kernel_calls["forward"] == 1 and kernel_calls["score"] == 1
    assert torch.isnan(logdet[4, 0]) and torch.isnan(z[4, 0, 1]) and torch.isnan(logdet_ref[4, 0])
    rows = torch.ones(x.shape[:2], dtype=torch.bool)
    rows[4, 0] = False
    tensor_ops = SOFTPLUS_TOLERANCES["stock"]  # the tensor ops' F.softplus is linear above 20 (off by 2e-9)
    torch.testing.assert_close(z[rows], z_ref[rows], **tensor_ops)
    torch.testing.assert_close(logdet[rows], logdet_ref[rows], **tensor_ops)
    torch.testing.assert_close(z[rows], z_saving[rows], atol=1e-12, rtol=0)
    torch.testing.assert_close(logdet[rows], logdet_saving[rows], atol=1e-12, rtol=0)
    assert float((z - x).abs().nan_to_num().max()) > 0.1  # not the identity: the test sees the spline

    # a fitting step through the same loop (one autograd node per coupling) and its vectorised backward: the input
    # and context gradients of the tensor ops' graph, ends, tails and clamped logits included
    x[4, 0, 1] = 0.5
    grads = frozen_step_with_and_without_the_loops(coupling._frozen_forward, x, c, seed=5)
    assert kernel_calls["score_saving"] == kernel_calls["score_backward"] == 1
    scale = float(grads[1][2].abs().max())
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-9 * max(scale, 1.0), rtol=1e-9)


@pytest.mark.parametrize("layout", list(MASKS))
@pytest.mark.parametrize("bins", [4, 8])
def test_column_loop_of_grouped_couplings_matches_the_tensor_ops(bins, layout, kernel_calls, monkeypatch):
    """Several groups score (and invert) in the column layout (the loop runs down the batch, as for
    ``joint_flow``): the tensor ops' outputs and log-determinants, forward and inverse, in float64 and float32, for
    every split of the dims, over more columns than one task of the loop takes (``COLUMN_CHUNK``); the row layout's
    loop is not run (its fallback is for extreme slopes only), and the column loop gives the row loop's numbers to
    the last bit."""
    rows_run = []
    score_loop = _numba_spline._score_loop
    monkeypatch.setattr(_numba_spline, "_score_loop", lambda *a: rows_run.append(1) or score_loop(*a))
    reference = None
    for dtype in (torch.float64, torch.float32):
        coupling = spline_coupling(MASKS[layout], bins, dtype, groups=4)
        x, c = (t.to(dtype) for t in data(1100, 4, 7, 2, seed=bins))
        z, logdet = coupling_outputs(coupling, x, c, True)
        z_ref, logdet_ref = coupling_outputs(coupling, x, c, False)
        with torch.no_grad():
            back, back_logdet = coupling._inverse(z, c)
            with numba_enabled(False):
                back_ref, back_logdet_ref = coupling._inverse(z, c)
        got, tensor_ops = (z, logdet, back, back_logdet), (z_ref, logdet_ref, back_ref, back_logdet_ref)
        if reference is None:  # float64: the tensor ops' numbers
            for a, b in zip(got[:2], tensor_ops[:2], strict=True):
                torch.testing.assert_close(a, b, **SOFTPLUS_TOLERANCES["stock"])
            for a, b in zip(got[2:], tensor_ops[2:], strict=True):  # the inverse of a flat bin magnifies round-off
                torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-7)
            torch.testing.assert_close(back, x, atol=1e-8, rtol=0)
            assert float((z - x).abs().max()) > 0.1  # not the identity
            reference = got
        else:  # float32: as close to the float64 numbers as the tensor ops are (the GEMMs round differently)
            for a, b, want in zip(got, tensor_ops, reference, strict=True):
                error, error_ref = ((t.double() - want).abs().max().item() for t in (a, b))
                assert error <= 2 * error_ref + 1e-4, (error, error_ref)
    assert kernel_calls == runs(score=4) and not rows_run
    # the row layout's loop on the same numbers (float64): the same outputs to the last bit, the same
    # log-determinants but for the last bit of their log (the column loop's is PyTorch's, the row loop's libm's)
    coupling = spline_coupling(MASKS[layout], bins, torch.float64, groups=4)
    x, c = data(1100, 4, 7, 2, seed=bins)
    x1, x2 = coupling._split(x)
    with torch.no_grad():
        hidden = coupling.conditioner._run_hidden(coupling._conditioner_input(x1, c))
        columns = coupling._last_columns(hidden)  # (G, outputs, B): the same numbers for both loops
        y_rows, logdet_rows = _numba_spline.score(
            coupling, x2.transpose(0, 1), *(t.transpose(1, 2).contiguous() for t in columns)
        )
        y_columns, logdet_columns = _numba_spline.score_columns(coupling, x2.permute(1, 2, 0), *columns)
    assert torch.equal(y_rows, y_columns.transpose(1, 2))
    torch.testing.assert_close(logdet_rows, logdet_columns, atol=1e-13, rtol=1e-15)


def test_column_loop_falls_back_to_the_row_loop_for_extreme_slopes(kernel_calls, monkeypatch):
    """Where a row's product of slopes would leave float64's safe range (knot-derivative logits far beyond the
    clamp), the column loop's call runs again in the row layout, whose loop takes the log in steps: the tensor
    ops' numbers, not an overflow."""
    rows_run = []
    score_loop = _numba_spline._score_loop
    monkeypatch.setattr(_numba_spline, "_score_loop", lambda *a: rows_run.append(1) or score_loop(*a))
    with seeded(0):
        coupling = RQSplineCoupling(3, 40, torch.arange(40) < 4, 8, context_features=2, bins=8, bound=3.0)
    coupling = perturb(coupling, scale=1.0).double().eval().requires_grad_(False)
    with torch.no_grad():
        last = coupling.conditioner[-1]
        derivative_columns = (torch.arange(last.bias.shape[-1]) % 23) >= 16  # every value's K - 1 derivative logits
        last.weight[..., derivative_columns] = 0.0
        last.bias[..., derivative_columns] = 1e10  # inner knots this steep: slopes of about 1e-10 between them
    x, c = data(64, 3, 40, 2, seed=1)
    z, logdet = coupling_outputs(coupling, x, c, True)
    assert rows_run and kernel_calls == runs(score=1)
    z_ref, logdet_ref = coupling_outputs(coupling, x, c, False)
    assert bool(torch.isfinite(logdet).all()) and float(logdet.abs().max()) > 700  # the product would overflow
    torch.testing.assert_close(z, z_ref, **SOFTPLUS_TOLERANCES["stock"])
    torch.testing.assert_close(logdet, logdet_ref, **SOFTPLUS_TOLERANCES["stock"])


def frozen_step_with_and_without_the_loops(step, x, c, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """A fitting step through a frozen coupling's ``step`` (``_frozen_forward`` or ``_frozen_inverse``) with the
    loops on, then off: per run the outputs, log-determinants and the gradients w.r.t. x and the context of a
    random weighting of both (the same weights for both runs). With the loops the step is one autograd node; without
    them the forward is one too (the tensor ops' saving path), the inverse the op-by-op graph."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(x.shape, generator=g, dtype=torch.float64), torch.randn(x.shape[:2], generator=g)
    grads = []
    for enabled in (True, False):
        leaf, context = x.clone().requires_grad_(True), c.clone().requires_grad_(True)
        with numba_enabled(enabled):
            out, out_logdet = step(leaf, context)
            one_node = enabled or step.__name__ == "_frozen_forward"
            assert ("_FrozenCoupling" in type(out.grad_fn).__name__) == one_node
            ((out * weights[0]).sum() + (out_logdet * weights[1]).sum()).backward()
        grads.append((out.detach(), out_logdet.detach(), leaf.grad, context.grad))
    return grads


def test_scoring_loop_sees_changed_weights_and_other_bin_counts_keep_the_saving_loop(kernel_calls):
    """The scoring loop's reordered last layer follows in-place changes of the weights (a cache keyed on their
    version, not a stale copy); bin counts without a scoring loop run the saving loop without autograd."""
    with seeded(0):
        coupling = RQSplineCoupling(2, 5, [True, False, True, False, False], 8, bins=4, bound=3.0)
    coupling = perturb(coupling, scale=1.0).double().eval().requires_grad_(False)
    x, _ = data(64, 2, 5, 0)
    first = coupling_outputs(coupling, x, None, True)
    with torch.no_grad():
        coupling.conditioner[-1].weight.mul_(-2.0)
        coupling.conditioner[-1].bias.add_(0.5)
    second = coupling_outputs(coupling, x, None, True)
    reference = coupling_outputs(coupling, x, None, False)
    assert kernel_calls["score"] == 2
    assert not torch.allclose(first[1], second[1])
    for got, want in zip(second, reference, strict=True):
        torch.testing.assert_close(got, want, **SOFTPLUS_TOLERANCES["stock"])
    with seeded(1):
        six = RQSplineCoupling(2, 5, [True, False, True, False, False], 8, bins=6, bound=3.0)
    six = perturb(six, scale=1.0).double().eval().requires_grad_(False)
    got = coupling_outputs(six, x, None, True)
    assert kernel_calls["score"] == 2 and kernel_calls["forward"] == 1
    for a, b in zip(got, coupling_outputs(six, x, None, False), strict=True):
        torch.testing.assert_close(a, b, **SOFTPLUS_TOLERANCES["stock"])


@pytest.mark.parametrize("groups", [1, 3])
def test_scoring_loop_follows_a_dtype_move(groups, kernel_calls):
    """``.double()`` (or ``.to``) swaps a parameter's data and keeps the object and its version: the scoring loop's
    reordered last layer is rebuilt in the new dtype, not reused (which raised on the GEMM's mixed dtypes)."""
    coupling = spline_coupling(MASKS["mid"], 8, torch.float32, groups=groups)
    x, c = data(64, groups, 7, 2, seed=2)
    coupling_outputs(coupling, x.float(), c.float(), True)  # fills the cache in float32
    coupling.double()
    got = coupling_outputs(coupling, x, c, True)
    assert kernel_calls["score"] == 2 and got[0].dtype == torch.float64
    for a, b in zip(got, coupling_outputs(coupling, x, c, False), strict=True):
        torch.testing.assert_close(a, b, **SOFTPLUS_TOLERANCES["stock"])


@pytest.mark.parametrize("groups", [1, 3])
def test_a_flow_built_in_inference_mode_scores_in_and_out_of_it(groups, kernel_calls):
    """A coupling built inside ``torch.inference_mode()`` has inference tensors as weights, without version
    counters: the scoring loop no longer reads them for its cache key (it raised "Inference tensors do not track
    version counter") and caches nothing of them, so an in-place change made in inference mode is seen (found by a
    new-user review)."""
    with torch.inference_mode():
        coupling = spline_coupling(MASKS["mid"], 8, torch.float64, groups=groups)
    assert coupling.conditioner[-1].weight.is_inference()
    x, c = data(64, groups, 7, 2, seed=3)
    with torch.inference_mode():
        inside = coupling_outputs(coupling, x, c, True)
    outside = coupling_outputs(coupling, x, c, True)
    assert kernel_calls["score"] == 2
    reference = coupling_outputs(coupling, x, c, False)
    for got in (inside, outside):
        for a, b in zip(got, reference, strict=True):
            torch.testing.assert_close(a, b, **SOFTPLUS_TOLERANCES["stock"])
    # an in-place change inside inference mode bumps no version: nothing of such weights is cached, so it is seen
    with torch.inference_mode():
        coupling.conditioner[-1].bias.add_(0.5)
        changed = coupling_outputs(coupling, x, c, True)
    assert not torch.allclose(changed[1], outside[1])
    for a, b in zip(changed, coupling_outputs(coupling, x, c, False), strict=True):
        torch.testing.assert_close(a, b, **SOFTPLUS_TOLERANCES["stock"])


def test_scoring_loop_with_fresh_weights_every_call(kernel_calls):
    """A flow that is not frozen (its weights need gradients) scoring subsets of its groups without autograd: every
    call passes new rows of the weights (``run_groups`` through ``functional_call``), possibly at a freed tensor's
    address; the reordered last layer must be that call's, never a cached one of other groups. (Eval mode: in train
    mode the first call would initialise the ActNorms.)"""
    with seeded(3):
        flow = flows.build_flow(6, 5, num_layers=2, hidden=8, coupling="spline", bins=4, bound=3.0)
    flow = perturb(flow, 1.0, seed=3).double().eval()
    assert not flow._frozen()
    x, _ = data(300, 2, 5, 0, seed=3)
    for index in ([0, 1], [2, 3], [4, 5], [1, 0], [0, 1]):
        rows = torch.tensor(index)
        with torch.no_grad():
            fast = [flow.run_groups(rows, x)[1] for _ in range(2)]
            with numba_enabled(False):
                reference = flow.run_groups(rows, x)[1]
        for got in fast:
            torch.testing.assert_close(got, reference, **SOFTPLUS_TOLERANCES["stock"])
    assert kernel_calls["score"] > 0


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside forward_ad
def test_scoring_loop_keeps_the_tensor_ops_for_tangents_on_the_context_or_the_weights(kernel_calls):
    """Forward-mode AD with a tangent on the conditioner's context, or on a weight (``functional_call``), gives the
    tensor ops' tangent: the vectorised loops would drop it."""
    import torch.autograd.forward_ad as fwAD

    flow = frozen_flow(1, 6, 4, torch.float64, context=3)
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(300, 1, 6, generator=g, dtype=torch.float64), torch.randn(300, 1, 3, dtype=torch.float64)
    tangent = torch.randn_like(c)
    name, weight = next((n, p) for n, p in flow.named_parameters() if n.endswith("conditioner.2.weight"))
    results = {}
    for enabled in (True, False):
        with numba_enabled(enabled), fwAD.dual_level():
            out = flow.log_prob(x, fwAD.make_dual(c, tangent))
            results["context", enabled] = fwAD.unpack_dual(out).tangent
            dual = {name: fwAD.make_dual(weight.detach(), torch.ones_like(weight))}
            out = torch.func.functional_call(flow, dual, (x,), {"context": c}, strict=False)
            results["weight", enabled] = fwAD.unpack_dual(out[1]).tangent
    for kind in ("context", "weight"):
        assert results[kind, False] is not None, kind
        assert results[kind, True] is not None, kind
        torch.testing.assert_close(results[kind, True], results[kind, False], atol=1e-9, rtol=1e-9)
    assert kernel_calls["score"] == 0


# ---------------------------------------------------------------------------------------------------- VJP
@pytest.mark.parametrize("layout", ["mid", "prefix"])
@pytest.mark.parametrize("bins", [4, 8])
def test_vjp_matches_the_tensor_path(bins, layout, kernel_calls):
    """``_transform_vjp`` from the kernels' saved state equals the tensor ops' (float64, rtol 1e-9) for random
    upstream gradients, tails, ends and clamped logits included; the ends take the spline's one-sided derivatives
    (finite differences from inside the interval)."""
    coupling = spline_coupling(MASKS[layout], bins, torch.float64)
    x2, params = spline_inputs(coupling, 40, torch.float64, seed=bins)
    g = torch.Generator().manual_seed(3)
    grad_y = torch.randn(x2.shape, generator=g, dtype=torch.float64)
    grad_logdet = torch.randn(x2.shape[:2], generator=g, dtype=torch.float64)
    *_, saved = transform_saving(coupling, x2, params, True)
    *_, saved_ref = transform_saving(coupling, x2, params, False)
    grad_x, grad_params = coupling._transform_vjp(saved, grad_y, grad_logdet)
    assert kernel_calls == runs(forward=1, backward=1)
    grad_x_ref, grad_params_ref = coupling._transform_vjp(saved_ref, grad_y, grad_logdet)
    assert kernel_calls == runs(forward=1, backward=1)
    assert grad_x.shape == x2.shape and grad_params.shape == params.shape
    scale = grad_params_ref.abs().max()
    torch.testing.assert_close(grad_x, grad_x_ref, atol=1e-12 * grad_x_ref.abs().max(), rtol=1e-9)
    torch.testing.assert_close(grad_params, grad_params_ref, atol=1e-12 * scale, rtol=1e-9)
    beyond = x2.abs() > coupling.bound  # the tails: the identity, no gradient to the spline's parameters
    assert torch.equal(grad_x[beyond], grad_y[beyond])
    unclamped = params.abs() < LIMIT
    assert (grad_params[unclamped] != 0).float().mean() > 0.5
    sizes = torch.zeros(params.shape[-1] // coupling.num_transformed, dtype=torch.bool)
    sizes[: 2 * coupling.bins] = True  # clamped bin logits get no gradient (the knot derivatives' logits do)
    clamped_sizes = ~unclamped & sizes.repeat(coupling.num_transformed)
    assert clamped_sizes.any() and not grad_params[clamped_sizes].any()

    # the ends (row 0 has +bound in its first transformed dim, -bound in its last): the one-sided derivative of
    # y . grad_y + logdet . grad_logdet from inside the interval, by finite differences of the tensor path
    def objective(v):
        y, logdet = transform(coupling, v, params[:1], False)
        return (y * grad_y[:1]).sum() + (logdet * grad_logdet[:1]).sum()

    n, h = coupling.num_transformed, 1e-6
    for group in range(x2.shape[1]):
        for dim, inward in ((0, -h), (n - 1, h)):
            assert x2[0, group, dim].abs() == coupling.bound
            step = torch.zeros_like(x2[:1])
            step[0, group, dim] = inward
            f0, f1, f2 = (objective(x2[:1] + k * step) for k in range(3))
            one_sided = (4 * f1 - 3 * f0 - f2) / (2 * inward)  # second-order one-sided difference
            torch.testing.assert_close(grad_x[0, group, dim], one_sided, atol=1e-4, rtol=1e-4)
            assert (grad_x[0, group, dim] - grad_y[0, group, dim]).abs() > 1e-3  # not the tails' identity


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("bins", [4, 8])
def test_serial_loop_matches_the_parallel_one(bins, dtype):
    """The kernels looped in the calling thread with their own preparation loop (``parallel=False``: the NumPy
    flows of small batches) give the parallel loops' outputs, log-determinants and vector-Jacobian products on
    the special inputs (tails, ends, clamped logits), to float round-off: only ``exp`` and ``log1p`` differ
    (Numba's against PyTorch's vectorised ones)."""
    coupling = spline_coupling(MASKS["mid"], bins, dtype)
    x2, params = spline_inputs(coupling, 16, dtype, seed=bins)
    x = x2.reshape(-1, x2.shape[-1]).contiguous().numpy()
    raw = params.reshape(x.shape[0], -1).contiguous().numpy()
    g = torch.Generator().manual_seed(5)
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype).numpy()
    gl = torch.randn(x.shape[0], generator=g, dtype=torch.float64).to(dtype).numpy()
    results = {}
    for parallel in (False, True):
        y, logdet, saved = _numba_spline.forward_arrays(coupling, x, raw, parallel=parallel)
        grads = _numba_spline.backward_arrays(coupling, saved, gy, gl, parallel=parallel)
        e, sp = torch.from_numpy(saved.e), torch.from_numpy(saved.sp)
        # what the loops read of them: the parallel path leaves the clamp of e to the loops, which recompute the
        # knot derivatives beyond it
        e = e.clamp(math.exp(-LIMIT), math.exp(LIMIT))
        sp = sp.masked_fill(
            params.reshape(sp.shape[0], -1, 3 * bins - 1)[..., 2 * bins :].abs().reshape(sp.shape) >= LIMIT, 0
        )
        results[parallel] = [*(torch.from_numpy(a) for a in (y, logdet)), e, sp, *map(torch.from_numpy, grads)]
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    for got, want in zip(results[False], results[True], strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=tol["atol"] * max(want.abs().max().item(), 1), rtol=tol["rtol"])
    y, logdet, e, sp, grad_x, grad_p = results[False]
    assert torch.isfinite(logdet).all() and (grad_p != 0).any()
    assert (e >= 0.999 * math.exp(LIMIT)).any()  # clamped logits were there


# ---------------------------------------------------------------------------------------------------- whole flows
def test_gradcheck_of_a_frozen_conditional_flow(monkeypatch, kernel_calls):
    """``gradcheck`` (float64) of a frozen conditional spline flow's log_prob w.r.t. its input and its context, with
    the kernels doing the couplings' forward and backward (the NumPy small-batch path is off)."""
    monkeypatch.setattr(sequence, "NUMPY_MAX_ELEMENTS", 0)
    with seeded(1):
        flow = flows.build_flow(2, 3, num_layers=3, hidden=8, coupling="spline", bins=4, bound=2.0, context_features=2)
    flow = perturb(flow, 0.5, seed=1).eval().requires_grad_(False).double()
    x, c = data(6, 2, 3, 2, seed=4)
    x.requires_grad_(True)
    c.requires_grad_(True)
    with numba_enabled(True):
        assert torch.autograd.gradcheck(lambda x, c: flow.log_prob(x, c), (x, c))
    assert kernel_calls["score_saving"] > 0 and kernel_calls["score_backward"] > 0  # 4 bins: the vectorised loops


def frozen_flow(groups: int, dim: int, bins: int, dtype: torch.dtype, context: int = 0):
    with seeded(groups * dim):
        flow = flows.build_flow(
            groups, dim, num_layers=4, hidden=32, coupling="spline", bins=bins, bound=3.0, context_features=context
        )
    return perturb(flow, 0.3, seed=2).to(dtype).eval().requires_grad_(False)


def log_prob_and_input_gradient(flow, x, enabled: bool):
    with numba_enabled(enabled):
        leaf = x.clone().requires_grad_(True)
        log_prob = flow.log_prob(leaf)
        log_prob.sum().backward()
        with torch.no_grad():
            plain = flow.log_prob(x)
    return log_prob.detach(), leaf.grad, plain


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", [(1, 63, 4), (5, 3, 8)], ids=["global", "joints"])
def test_frozen_flow_log_prob_and_input_gradient(case, dtype, kernel_calls):
    """A frozen flow on 3000 poses (the global flow's shape, G=1 x 63-D, and grouped per-joint flows, G=5 x 3-D):
    log_prob with and without autograd, and its input gradient, are the same with and without the kernels."""
    groups, dim, bins = case
    flow = frozen_flow(groups, dim, bins, dtype)
    x, _ = data(3000, groups, dim, 0, dtype=dtype, seed=7)
    fast = log_prob_and_input_gradient(flow, x, True)
    calls = dict(kernel_calls)
    # 4 couplings (4 or 8 bins): with autograd the vectorised loop and its backward, without it the scoring loop
    # (per chunk of rows)
    assert calls["score_saving"] == 4 and calls["score_backward"] == 4 and calls["score"] >= 4
    assert calls["forward"] == calls["backward"] == 0
    reference = log_prob_and_input_gradient(flow, x, False)
    assert kernel_calls == calls
    grad_scale = float(reference[1].abs().max())
    if dtype == torch.float64:
        value_tol, grad_tol = dict(atol=1e-10, rtol=1e-10), dict(atol=1e-9 * grad_scale, rtol=1e-9)
    else:  # float32 round-off through four spline layers
        value_tol, grad_tol = dict(atol=1e-3, rtol=1e-4), dict(atol=1e-4 * grad_scale, rtol=1e-3)
    for got, want, tol in zip(fast, reference, (value_tol, grad_tol, value_tol), strict=True):
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **tol)
    assert reference[1].abs().max() > 0


def test_training_keeps_the_tensor_ops(kernel_calls):
    """With parameters that need gradients (training), the couplings record their tensor ops: the kernels never
    run, and the loss's gradients reach every conditioner parameter (the same as with the kernels off)."""
    with seeded(0):
        flow = flows.build_flow(2, 5, num_layers=2, hidden=8, coupling="spline", bins=4, context_features=3)
    flow = perturb(flow).double()
    x, c = data(300, 2, 5, 3)
    grads = []
    for training in (True, False):  # eval mode with parameters that need gradients: not frozen either
        flow.train(training)
        for enabled in (True, False):
            flow.zero_grad()
            with numba_enabled(enabled):
                (-flow.log_prob(x, c).mean()).backward()
            grads.append([p.grad.clone() for p in flow.parameters()])
    assert kernel_calls == runs()
    couplings = [b for b in flow.blocks if isinstance(b, RQSplineCoupling)]
    assert len(couplings) == 2
    for coupling in couplings:
        for p in coupling.conditioner.parameters():
            assert p.grad is not None and p.grad.abs().max() > 0
    for with_kernels, without in ((grads[0], grads[1]), (grads[2], grads[3])):
        for got, want in zip(with_kernels, without, strict=True):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    # one coupling: any autograd to record keeps the tensor ops; without grad mode the kernels may run
    coupling = spline_coupling(MASKS["mid"], 4, torch.float64)
    x2, params = spline_inputs(coupling, 16, torch.float64)
    with numba_enabled(True):
        for v, p in ((x2.clone().requires_grad_(True), params), (x2, params.clone().requires_grad_(True))):
            y, logdet = coupling._transform(v, p, inverse=False)
            assert y.requires_grad and logdet.requires_grad
        assert kernel_calls["forward"] == 0
        with torch.no_grad():
            coupling._transform(x2, params, inverse=False)
        assert kernel_calls["forward"] == 1


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("bins", [4, 8])
def test_inverse_loops_match_the_tensor_ops(bins, groups, kernel_calls, monkeypatch):
    """The inverse (latent to data) of a coupling with a vectorised loop: without autograd the inverse loop, with it
    one autograd node whose backward takes the forward spline's partials at the inverse (implicit differentiation).
    Both give the tensor ops' outputs, log-determinants and input and context gradients (float64; the tensor ops
    with an exact softplus: ``F.softplus``'s linear branch above 20 is off by 2e-9, which the inverse of a nearly
    flat bin magnifies), with tails, the interval's ends and clamped logits; the loop inverts the scoring loop; a
    NaN input gives NaN."""
    coupling = clamping_coupling(bins, groups)
    x, c = data(256, groups, 7, 2, seed=bins)
    z, logdet = coupling_outputs(coupling, x, c, True)
    z[2, :, :], z[3, :, :] = coupling.bound, -coupling.bound
    z[5, :, :] = torch.tensor([-10.0, 10.0, 2.9, -2.9, 0.0, 1.0, -1.0])  # tails and inside
    z[4, 0, 1] = float("nan")  # a transformed dim
    with numba_enabled(True), torch.no_grad():
        back, inverse_logdet = coupling._inverse(z, c)
    assert kernel_calls == runs(score=2)  # the forward, then the inverse
    monkeypatch.setattr(torch.nn.functional, "softplus", exact_softplus)  # for the tensor ops, below
    with numba_enabled(False), torch.no_grad():
        back_ref, inverse_logdet_ref = coupling._inverse(z, c)
    assert torch.isnan(back[4, 0, 1]) and torch.isnan(inverse_logdet[4, 0]) and torch.isnan(inverse_logdet_ref[4, 0])
    # the inverse of a nearly flat bin magnifies round-off (the loop and the tensor ops differ by up to 1e-7 here),
    # so both are checked through the forward, which is well conditioned: f(x) = z and the log-determinants cancel
    rows = torch.ones(z.shape[:2], dtype=torch.bool)
    rows[4, 0] = False
    for inverted, inverted_logdet in ((back, inverse_logdet), (back_ref, inverse_logdet_ref)):
        again, again_logdet = coupling_outputs(coupling, inverted, c, False)
        torch.testing.assert_close(again[rows], z[rows], atol=1e-11, rtol=0)
        torch.testing.assert_close(inverted_logdet[rows], -again_logdet[rows], atol=1e-8, rtol=1e-9)
    kept = torch.ones(z.shape[0], dtype=torch.bool)
    kept[2:6] = False  # the rows of z left as the forward gave them: the loop as close to x as the tensor ops
    assert (back[kept] - x[kept]).abs().max() <= 1.5 * (back_ref[kept] - x[kept]).abs().max() + 1e-12
    outside = z.abs() >= coupling.bound  # the interval's ends and beyond: the identity, exactly
    assert outside[2:4].all() and torch.equal(back[outside], z[outside])
    assert torch.equal(inverse_logdet[2:4], torch.zeros_like(inverse_logdet[2:4]))
    assert float((back - z).abs().nan_to_num().max()) > 0.1  # not the identity

    # gradients: on a coupling whose bins are not at their floors (there the tensor ops' clamp of a root that
    # round-off put past its bin's end zeroes a gradient that is 1 / f'(x), as the loop gives it)
    mild = spline_coupling(MASKS["mid"], bins, torch.float64, groups=groups)
    z = coupling_outputs(mild, x, c, True)[0]
    z[2, :, :], z[3, :, :] = mild.bound, -mild.bound
    z[5, :, :] = torch.tensor([-10.0, 10.0, 2.9, -2.9, 0.0, 1.0, -1.0])
    grads = frozen_step_with_and_without_the_loops(mild._frozen_inverse, z, c, seed=6)
    assert kernel_calls["score_saving"] == kernel_calls["score_backward"] == 1
    for got, want in zip(*grads, strict=True):  # gradients up to 1e5 (1 / f' in steep bins)
        torch.testing.assert_close(got, want, atol=1e-10 * max(1.0, float(want.abs().max())), rtol=1e-8)


@pytest.mark.parametrize("bins", [4, 8])
def test_gradcheck_of_a_frozen_flows_inverse(bins, kernel_calls):
    """A frozen conditional flow's inverse with gradients w.r.t. the latent and the context (a latent-space fit)
    runs each spline coupling as one node through the inverse loops, passes ``gradcheck`` and matches the tensor
    ops (float32 within its round-off)."""
    flow = frozen_flow(2, 5, bins, torch.float64, context=3)
    g = torch.Generator().manual_seed(bins)
    z = torch.randn(6, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(6, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: flow.inverse(a, b), (z, c))
    assert kernel_calls["score_saving"] > 0 and kernel_calls["score_backward"] > 0
    flow32 = copy.deepcopy(flow).float()
    outs = []
    for enabled in (True, False):
        a, b = z.detach().float().requires_grad_(True), c.detach().float().requires_grad_(True)
        with numba_enabled(enabled):
            x, logdet = flow32.inverse(a, b)
            (x.square().sum() + logdet.sum()).backward()
        outs.append((x.detach(), logdet.detach(), a.grad, b.grad))
    for got, want in zip(*outs, strict=True):
        torch.testing.assert_close(got, want, atol=2e-4 * max(1.0, float(want.abs().max())), rtol=1e-4)


@pytest.mark.parametrize("direction", ["forward small batch", "forward", "inverse", "ensemble"])
def test_second_derivatives_through_the_fast_paths_are_the_tensor_ops(direction, kernel_calls, monkeypatch):
    """A Hessian through a frozen flow's fast paths (the NumPy flow of a small batch, the one-node couplings, the
    inverse loops, a stacked ensemble) equals the unfrozen flow's, whose every op is recorded: their backward with
    ``create_graph=True`` differentiates the tensor ops instead of returning zeros."""
    if direction == "forward":
        monkeypatch.setattr(sequence, "NUMPY_MAX_ELEMENTS", 0)  # the one-node couplings, not the NumPy flow
    flow = frozen_flow(2, 5, 4, torch.float64, context=3)
    g = torch.Generator().manual_seed(9)
    v0 = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    c0 = torch.randn(3, 2, 3, generator=g, dtype=torch.float64)
    if direction == "ensemble":
        members = [frozen_flow(1, 5, 4, torch.float64) for _ in range(2)]
        members[1] = perturb(copy.deepcopy(members[1]).requires_grad_(True), 0.2, seed=3).requires_grad_(False)

        def function(v):
            return flows.sequence.ensemble_log_prob(members, v[:, :1]).sum()

        unfreeze = members
    else:

        def function(v):
            if direction == "inverse":
                x, logdet = flow.inverse(v, c0)
                return x.square().sum() + logdet.sum()
            return flow.log_prob(v, c0).sum()

        unfreeze = [flow]
    numpy_flows = []
    original = sequence._NumpyFlow.apply
    monkeypatch.setattr(sequence._NumpyFlow, "apply", lambda *args: numpy_flows.append(1) or original(*args))
    hessian = torch.autograd.functional.hessian(function, v0)
    one_node = kernel_calls["score_saving"]
    for f in unfreeze:
        f.requires_grad_(True)  # not frozen: every op recorded
    reference = torch.autograd.functional.hessian(function, v0)
    torch.testing.assert_close(hessian, reference, atol=1e-9, rtol=1e-9)
    assert reference.abs().max() > 1e-2
    assert (len(numpy_flows) > 0) == (direction in ("forward small batch", "ensemble"))  # the fast path ran
    assert (one_node > 0) == (direction in ("forward", "inverse"))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside forward_ad
def test_inverse_keeps_the_tensor_ops_under_transforms_and_training(kernel_calls):
    """The inverse loops run neither under ``torch.func`` transforms, forward-mode AD nor in training (where the
    weights need gradients): those keep the tensor ops, with the same numbers."""
    flow = frozen_flow(2, 5, 8, torch.float64, context=3)
    g = torch.Generator().manual_seed(10)
    z = torch.randn(4, 2, 5, generator=g, dtype=torch.float64)
    c = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        reference = flow.inverse(z, c)
    assert kernel_calls["score"] > 0
    kernel_calls.update(dict.fromkeys(kernel_calls, 0))
    jacobian = torch.func.jacrev(lambda v: flow.inverse(v, c)[0])(z)
    assert jacobian.shape == (4, 2, 5, 4, 2, 5)
    mapped = torch.func.vmap(lambda v, w: flow.inverse(v[None], w[None]))(z, c)
    torch.testing.assert_close(mapped[0][:, 0], reference[0], atol=1e-10, rtol=1e-10)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(z, torch.ones_like(z))
        x, _ = flow.inverse(dual, c)
        tangent = torch.autograd.forward_ad.unpack_dual(x).tangent
    torch.testing.assert_close(tangent, jacobian.flatten(3).sum(-1), atol=1e-9, rtol=1e-9)
    flow.train().requires_grad_(True)
    x, logdet = flow.inverse(z, c)
    (x.sum() + logdet.sum()).backward()
    assert all(p.grad is not None for p in flow.parameters() if p.requires_grad)
    torch.testing.assert_close(x.detach(), reference[0], atol=1e-10, rtol=1e-10)
    assert kernel_calls == runs()


def test_inverse_of_other_bin_counts_keeps_the_tensor_ops(kernel_calls):
    """Bin counts without a vectorised loop (5) invert with the tensor ops, and ``_transform(inverse=True)`` always
    does (the loops run from the coupling's ``_inverse``); either inverts the forward kernels."""
    flow = frozen_flow(2, 4, 5, torch.float64)
    z = torch.randn(500, 2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with numba_enabled(True), torch.no_grad():
        x, inverse_logdet = flow.inverse(z)
        assert kernel_calls["forward"] == kernel_calls["score"] == 0
        back, logdet = flow(x)
        assert kernel_calls["forward"] > 0
    torch.testing.assert_close(back, z, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(logdet, -inverse_logdet, atol=1e-8, rtol=1e-8)
    coupling = spline_coupling(MASKS["suffix"], 8, torch.float64)
    x2, params = spline_inputs(coupling, 32, torch.float64)
    calls = kernel_calls["forward"]
    with numba_enabled(True), torch.no_grad():
        y, logdet = coupling._transform(x2, params, inverse=False)
        calls += 1
        x_back, inverse_logdet = coupling._transform(y, params, inverse=True)
    assert kernel_calls["forward"] == calls and kernel_calls["backward"] == kernel_calls["score"] == 0
    torch.testing.assert_close(x_back, x2, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(inverse_logdet, -logdet, atol=1e-7, rtol=1e-8)


# ---------------------------------------------------------------------------------------------------- scope
def test_usable_only_on_plain_cpu_float_tensors_without_tracers(monkeypatch, kernel_calls):
    """``usable``: plain CPU float32/float64 tensors of one dtype with the kernels on; never for other dtypes, mixed
    dtypes, inside ``torch.func`` transforms, under fake tensors, ``make_fx`` tracing, a torch function mode or
    ``torch.compile`` (where the spline must stay tensor ops, with the same numbers)."""
    usable = _numba_spline.usable
    coupling = spline_coupling(MASKS["mid"], 4, torch.float64)
    x2, params = spline_inputs(coupling, 16, torch.float64)
    y_ref, logdet_ref = transform(coupling, x2, params, False)
    with numba_enabled(False):
        assert not _numba_spline.available() and not usable(x2, params)
    with numba_enabled(True):
        assert _numba_spline.available()
        assert usable(x2, params) and usable(x2.float(), params.float())
        assert usable(x2[:, :1], params[:, :1])  # non-contiguous views are fine
        for dtype in (torch.float16, torch.bfloat16, torch.int32, torch.int64):
            assert not usable(x2.to(dtype), params.to(dtype)), dtype
        assert not usable(x2.float(), params) and not usable(x2, params.float())
        assert not usable(torch.nn.Parameter(x2), params)

        # torch.func: the transforms' wrapped tensors must see tensor ops
        seen = []

        def logdet_sum(v):
            seen.append(usable(v, params))
            return coupling._transform(v, params, inverse=False)[1].sum()

        grad = torch.func.grad(logdet_sum)(x2)
        leaf = x2.clone().requires_grad_(True)
        (grad_ref,) = torch.autograd.grad(coupling._transform(leaf, params, inverse=False)[1].sum(), leaf)
        torch.testing.assert_close(grad, grad_ref, atol=1e-12, rtol=1e-12)

        def per_row(v, p):
            seen.append(usable(v, p))
            return coupling._transform(v, p, inverse=False)

        y, logdet = torch.func.vmap(per_row)(x2, params)
        torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(logdet, logdet_ref, atol=1e-12, rtol=0)
        assert seen == [False, False]

        # fake tensors (shape propagation): tensor ops on fake tensors, no NumPy (on a copy of the coupling, which
        # may cache fake size factors; its buffers are real)
        fresh = copy.deepcopy(coupling)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_x, fake_params = mode.from_tensor(x2), mode.from_tensor(params)
            assert not usable(fake_x, fake_params) and not usable(x2, params)  # the mode, even on real tensors
            y, logdet = fresh._transform(fake_x, fake_params, inverse=False)
            assert y.shape == x2.shape and logdet.shape == x2.shape[:2]
        assert kernel_calls["forward"] == 0

        # make_fx: the traced graph holds the spline's ops and gives the eager numbers
        def traced_transform(v, p):
            seen.append(usable(v, p))
            with torch._C.DisableTorchFunction():  # the proxy dispatch mode alone (make_fx also sets a function mode)
                seen.append(usable(v, p))
            return coupling._transform(v, p, inverse=False)

        traced = make_fx(traced_transform)(x2, params)
        assert kernel_calls["forward"] == 0 and seen == [False] * 4
        targets = [str(node.target) for node in traced.graph.nodes]
        assert "aten.exp.default" in targets and "aten.gather.default" in targets and len(targets) > 30
        y, logdet = traced(x2, params)
        torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(logdet, logdet_ref, atol=1e-12, rtol=0)

        class Watching(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))

        with Watching():
            assert not usable(x2, params)
            y, _ = coupling._transform(x2, params, inverse=False)
        torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
        assert kernel_calls["forward"] == 0
        with monkeypatch.context() as patch:
            patch.setattr(torch.compiler, "is_compiling", lambda: True)
            assert not usable(x2, params)
        assert usable(x2, params)


def test_environment_switch_turns_the_kernels_off():
    """``POSEPRIORS_NUMBA=0`` switches the kernels off at import (and Numba is then not even imported)."""
    env = {**os.environ, "POSEPRIORS_NUMBA": "0"}
    code = "from posepriors.flows import _numba_spline as n; print(n.available())"
    code += "; import sys; print('numba' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------------------------------------------- shipped
@pytest.mark.parametrize("name", ["global_flow", "joint_flow"])
def test_shipped_priors_agree_with_and_without_the_kernels(name, kernel_calls):
    """The shipped flows (float32) sample (the inverse loops) and score 2048 of their own samples (the scoring
    loops) the same with and without the kernels, within float32 round-off."""
    prior = posepriors.load(name)
    with numba_enabled(True):
        samples = prior.sample(2048, generator=torch.Generator().manual_seed(0))
    assert kernel_calls["score"] > 0 and kernel_calls["forward"] == 0
    with numba_enabled(False):
        reference_samples = prior.sample(2048, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(samples, reference_samples, rtol=1e-4, atol=1e-4)
    kernel_calls.update(dict.fromkeys(kernel_calls, 0))
    with torch.no_grad():
        with numba_enabled(True):
            fast = prior.log_prob(samples)
        calls = dict(kernel_calls)
        assert calls["score"] > 0 and calls["forward"] == 0  # 4 and 8 bins: the scoring loop
        with numba_enabled(False):
            reference = prior.log_prob(samples)
    assert kernel_calls == calls
    assert torch.isfinite(reference).all() and reference.abs().mean() > 1
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-2)


# ---------------------------------------------------------------------------------------------------- edge cases
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside forward_ad
def test_forward_mode_ad_keeps_the_tensor_ops(kernel_calls):
    """Forward-mode AD (``torch.autograd.forward_ad`` dual tensors) through a frozen flow gives the tensor path's
    tangent: the kernels return plain tensors, so they must not run on dual tensors."""
    import torch.autograd.forward_ad as fwAD

    flow = frozen_flow(1, 6, 4, torch.float64)
    g = torch.Generator().manual_seed(0)
    x, tangent = torch.randn(2, 300, 1, 6, generator=g, dtype=torch.float64)  # 1800 entries: not the NumPy path
    results = []
    for enabled in (False, True):
        with numba_enabled(enabled), fwAD.dual_level():
            results.append(fwAD.unpack_dual(flow.log_prob(fwAD.make_dual(x, tangent))).tangent)
    reference, fast = results
    assert reference is not None and fast is not None
    torch.testing.assert_close(fast, reference, atol=1e-10, rtol=1e-10)


def test_empty_batch_without_autograd():
    """An empty batch through a spline coupling without autograd gives empty outputs, as the tensor path does."""
    coupling = spline_coupling(MASKS["mid"], 4, torch.float64)
    x, c = torch.zeros(0, 3, 7, dtype=torch.float64), torch.zeros(0, 3, 2, dtype=torch.float64)
    with numba_enabled(True), torch.no_grad():
        z, logdet = coupling(x, c)
    assert z.shape == (0, 3, 7) and logdet.shape == (0, 3)


def _report_in_child(queue) -> None:
    queue.put(_numba_spline.available())


def test_a_child_forked_after_the_kernels_ran_keeps_the_tensor_ops():
    """Numba's OpenMP pool is not fork-safe: a child forked after the parent ran the kernels must not use them."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork start method on this platform")
    coupling = spline_coupling(MASKS["mid"], 4, torch.float64)
    with numba_enabled(True), torch.no_grad():
        coupling(torch.randn(64, 3, 7, dtype=torch.float64), torch.randn(64, 3, 2, dtype=torch.float64))
        assert _numba_spline._STARTED and _numba_spline.available()
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_report_in_child, args=(queue,))
        child.start()
        in_child = queue.get(timeout=60)
        child.join(timeout=60)
        assert child.exitcode == 0 and in_child is False
        assert _numba_spline.available()  # the parent keeps them


def test_the_kernels_keep_the_users_thread_count():
    """Starting Numba's OpenMP pool raised PyTorch's thread count to NUMBA_NUM_THREADS (a fresh process: the
    setting is process-wide)."""
    script = (
        "import torch, posepriors\n"
        "from posepriors.flows import _numba_spline\n"
        "_numba_spline.LOAD_AFTER = 0\n"
        "torch.set_num_threads(1)\n"
        "prior = posepriors.load('global_flow')\n"
        "x = (0.2 * torch.randn(256, 21, 3)).requires_grad_()\n"
        "prior.nll({'body_pose': x}).sum().backward()\n"
        "assert _numba_spline._STARTED, 'the kernels did not run'\n"
        "print(torch.get_num_threads())\n"
    )
    env = {**os.environ, "NUMBA_NUM_THREADS": "2", "POSEPRIORS_NUMBA": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "1"


@pytest.mark.parametrize("loop", ["map", "fit"])
def test_a_process_first_loop_equals_its_later_ones(loop):
    """In a fresh process (Numba not loaded, the default ``LOAD_AFTER``), the first MAP projection or keypoint fit
    runs on the kernels from its first step, as every later one does: the same input gives the same output bit for
    bit. Before, the kernels loaded half-way through the first loop, and on a sharp density the MAP ended up to
    0.12 rad elsewhere."""
    code = f"""
import torch, posepriors
from posepriors.fitting import body_keypoints, fit_keypoints
from posepriors.flows import _numba_spline
torch.set_num_threads(1)
prior = posepriors.load("global_flow")
noisy = prior.sample(4, generator=torch.Generator().manual_seed(0), temperature=0.7)
noisy = noisy + 0.1 * torch.randn(noisy.shape, generator=torch.Generator().manual_seed(5))
keypoints = body_keypoints(0.2 * torch.randn(2, 21, 3, generator=torch.Generator().manual_seed(1)))
assert _numba_spline._numba.cache_info().currsize == 0, "Numba loaded before the loops"
if {loop!r} == "map":
    runs = [prior.project(noisy, noise_std=0.1, steps=40) for _ in range(2)]
else:
    runs = [fit_keypoints(keypoints, prior=prior, weight=2e-5, steps=40).pose for _ in range(2)]
print(torch.equal(*runs), _numba_spline._numba.cache_info().currsize > 0)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]
