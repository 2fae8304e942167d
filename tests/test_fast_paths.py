"""The shipped priors' fast paths give the reference numbers: frozen couplings, skipped parts."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import posepriors
from posepriors.flows import _numba_spline, sequence
from posepriors.flows.couplings import _FrozenCoupling
from posepriors.grouped import GroupedMLP
from tests.test_flows import data, perturb


def body_and_hand_poses(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(n, 55, 3, generator=g, dtype=torch.float64)


def test_body_only_input_does_not_run_the_hand_flow():
    """A body-only pose gives global_flow's exact body marginal without running the hands' flow at all; a batch
    where some pose has hands runs it and scores the hands of that pose only."""
    prior = posepriors.load("global_flow").double()
    calls = []
    handle = prior.flows[1].register_forward_hook(lambda *args: calls.append(1))
    try:
        poses = body_and_hand_poses(4)
        body = poses[:, 1:22]
        body_only = prior.log_prob(body)
        assert calls == []
        per_part = prior.log_prob_per_part(poses)  # (4, 2): body, hands | body
        assert calls == [1]
        x, observed, _ = prior._prepare(body, None)
        broad = prior.broad.log_prob(x.flatten(1), observed.repeat_interleave(3, -1))
        w = torch.tensor(prior.config.broad_weight, dtype=torch.float64)
        expected = torch.logaddexp(per_part[:, 0] + torch.log1p(-w), broad + torch.log(w))
        torch.testing.assert_close(body_only, expected, atol=1e-10, rtol=0)
        mask = torch.ones(4, 55, dtype=torch.bool)
        mask[1:, 22:] = False  # only the first pose has hands
        mixed = prior.log_prob(poses, mask)
        assert calls == [1, 1]
        torch.testing.assert_close(mixed[1:], body_only[1:], atol=1e-10, rtol=0)
    finally:
        handle.remove()


def test_joint_flow_body_only_input_runs_the_body_joints_only():
    """joint_flow scores a body-only batch with the flows of the body joints alone (a frozen copy of their rows):
    the same log-densities and pose gradients as the full grouped flow with the hands masked out."""
    prior = posepriors.load("joint_flow").double()
    poses = body_and_hand_poses(3, seed=2)
    mask = torch.ones(4, 55, dtype=torch.bool)
    mask[:3, 22:] = False  # the last pose observes everything: the full flow runs
    with_full = torch.cat([poses, poses[:1]])
    x = with_full.clone().requires_grad_(True)
    reference = prior.log_prob(x, mask)
    (reference_grad,) = torch.autograd.grad(reference[:3].sum(), x)
    body = poses[:, 1:22].clone().requires_grad_(True)
    fast = prior.log_prob(body)
    (fast_grad,) = torch.autograd.grad(fast.sum(), body)
    torch.testing.assert_close(fast, reference[:3], atol=1e-10, rtol=0)
    torch.testing.assert_close(fast_grad, reference_grad[:3, 1:22], atol=1e-9, rtol=1e-9)
    assert any(subset.groups == 21 for _, subset in prior.flow._subsets.values())


def test_shipped_flows_fast_gradients_match_the_recorded_graph(monkeypatch):
    """The fast paths (the NumPy path of small batches, the frozen one-node couplings) give the same NLL gradients
    as the op-by-op autograd graph on the shipped flows (body-only and full poses), in float64."""
    poses = body_and_hand_poses(3, seed=1)
    for name in ("global_flow", "joint_flow"):
        prior = posepriors.load(name).double()
        for pose in (poses, poses[:, 1:22]):
            x = pose.clone().requires_grad_(True)
            (fast,) = torch.autograd.grad(prior.nll(x).sum(), x)
            with monkeypatch.context() as patch:  # both fast paths off: the tensor ops, recorded one by one
                patch.setattr(GroupedMLP, "has_input_vjp", property(lambda self: False))
                patch.setattr(sequence, "NUMPY_MAX_ELEMENTS", 0)
                x = pose.clone().requires_grad_(True)
                (reference,) = torch.autograd.grad(prior.nll(x).sum(), x)
            torch.testing.assert_close(fast, reference, atol=1e-9, rtol=1e-9)
            assert fast.abs().max() > 0


def test_compiled_prior_matches_eager():
    """``prior.compile()`` runs the flows' frozen forward through torch.compile with the eager numbers (float64),
    values and pose gradients, and ``compile(False)`` goes back to eager; priors without flows are unchanged."""
    from posepriors.priors import GlobalFlowConfig, GlobalFlowPrior

    config = GlobalFlowConfig(joints="body", hidden=8, num_layers=2, coupling="spline", bins=3)
    prior = GlobalFlowPrior(config).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    prior.eval().requires_grad_(False)
    pose = 0.4 * torch.randn(3, 21, 3, generator=g, dtype=torch.float64)
    x = pose.clone().requires_grad_(True)
    eager = prior.nll(x)
    (eager_grad,) = torch.autograd.grad(eager.sum(), x)
    assert prior.compile() is prior
    assert prior.flows[0]._compiled is not None
    x = pose.clone().requires_grad_(True)
    compiled = prior.nll(x)
    (compiled_grad,) = torch.autograd.grad(compiled.sum(), x)
    torch.testing.assert_close(compiled, eager, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-9, rtol=1e-9)
    prior.compile(False)
    assert prior.flows[0]._compiled is None
    gaussian = posepriors.load("gaussian")
    assert gaussian.compile() is gaussian


def test_fused_gradient_path_matches_eager():
    """``compile_frozen(gradient=True)``: a log_prob whose input and context need a gradient runs one compiled
    graph that returns the value and both gradients; the numbers are eager's (float64, a non-uniform upstream
    gradient), calls without a gradient and training mode stay on their paths, and new weights retrace."""
    from posepriors.flows import build_flow

    g = torch.Generator().manual_seed(5)
    flow = build_flow(2, 3, num_layers=2, hidden=8, coupling="spline", bins=3, context_features=2).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    flow.eval().requires_grad_(False)
    x0 = 1.5 * torch.randn(4, 2, 3, generator=g, dtype=torch.float64)  # some values beyond the spline's bound
    c0 = torch.randn(4, 2, 2, generator=g, dtype=torch.float64)
    weight = torch.arange(8, dtype=torch.float64).reshape(4, 2)

    def value_and_grads() -> tuple[torch.Tensor, ...]:
        x, c = x0.clone().requires_grad_(True), c0.clone().requires_grad_(True)
        value = flow.log_prob(x, c)
        return (value, *torch.autograd.grad((value * weight).sum(), (x, c)))

    eager = value_and_grads()
    flow.compile_frozen(gradient=True)
    assert flow._fused == {}
    fused = value_and_grads()
    assert len(flow._fused) == 1
    for a, b in zip(fused, eager, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    x = x0.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="first derivatives only"):  # not a Hessian of zeros
        torch.autograd.functional.hessian(lambda v: flow.log_prob(v, c0).sum(), x)
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x0, c0), eager[0], atol=1e-10, rtol=1e-10)
    (signature,) = flow._fused
    before = flow._fused[signature][1]
    with torch.no_grad():
        flow.blocks[-1].conditioner[-1].bias.add_(0.01)  # an in-place update: the cached graph holds old weights
    x = x0.clone().requires_grad_(True)
    assert flow._fused_function(flow._frozen_steps(False), x, c0) is not before
    flow.train()
    assert not flow._frozen()
    flow.compile_frozen(False)
    assert flow._fused_options is None and flow._fused == {}
    plain = build_flow(1, 3, num_layers=2, hidden=8, actnorm=False, mixing="none").double().eval()
    plain.requires_grad_(False).compile_frozen(gradient=True)  # no linear block to fold: the eager path
    x = x0[:, :1].clone().requires_grad_(True)
    torch.autograd.grad(plain.log_prob(x).sum(), x)
    assert plain._fused == {}
    prior = posepriors.load("global_flow")
    prior.compile(gradient=True)
    assert all(f._fused_options == {} for f in prior.flows)
    prior.compile(False)


def test_frozen_coupling_backward_flushes_subnormal_gradients():
    """A gradient below the smallest normal float (a pose the flow gives a negligible share of a mixture) leaves
    the one-node coupling as exact zeros instead of subnormals, which slow a CPU's matrix multiplies; normal
    gradients are untouched."""
    from posepriors.flows.couplings import _flush_subnormal

    tiny = torch.finfo(torch.float32).tiny
    t = torch.tensor([tiny / 4, -tiny / 2, tiny, -1e-3, 2.0])
    assert torch.equal(_flush_subnormal(t), torch.tensor([0.0, 0.0, tiny, -1e-3, 2.0]))
    coupling = posepriors.load("global_flow").flows[0].blocks[2]
    x = (0.3 * torch.randn(2, 1, 63, generator=torch.Generator().manual_seed(3))).requires_grad_(True)
    z, logdet = _FrozenCoupling.apply(coupling, x, None, False)
    weight = torch.full_like(z, tiny / 8)  # subnormal upstream gradients
    weight[:, :, :3] = 1.0
    (grad,) = torch.autograd.grad((z * weight).sum() + logdet.sum() * (tiny / 8), x)
    nonzero = grad[grad != 0].abs()
    assert nonzero.numel() > 0 and bool((nonzero >= tiny).all())


# ---------------------------------------------------------------------------------------------------- NumPy path
def small_flow(groups: int, dim: int, context: int, dtype: torch.dtype, activation: str = "silu", **kwargs):
    """A frozen spline flow (bound 3, like ``data``'s tails) with seeded non-trivial weights (every coupling, ActNorm
    and LU layer perturbed)."""
    from posepriors import flows

    coupling = kwargs.pop("coupling", "spline")
    flow = flows.build_flow(
        groups, dim, num_layers=3, hidden=12, coupling=coupling, context_features=context, bins=5, bound=3.0,
        activation=activation, **kwargs,
    )  # fmt: skip
    return perturb(flow, 0.3, seed=4 + kwargs.get("seed", 0)).to(dtype).eval().requires_grad_(False)


def numpy_calls(monkeypatch) -> list[int]:
    """Record every run of the NumPy path (its batch size)."""
    calls: list[int] = []
    forward = sequence._NumpyFlow.forward
    monkeypatch.setattr(
        sequence._NumpyFlow,
        "forward",
        staticmethod(lambda ctx, plan, x, c, recorded: calls.append(x.shape[0]) or forward(ctx, plan, x, c, recorded)),
    )
    return calls


def value_and_gradients(flow, x, c):
    x = x.clone().requires_grad_(True)
    c = None if c is None else c.clone().requires_grad_(True)
    log_prob = flow.log_prob(x, c)
    g = torch.Generator().manual_seed(8)
    weight = torch.randn(log_prob.shape, generator=g, dtype=log_prob.dtype)
    z, logdet = flow(x, c)  # the latent codes and log-determinant get their own upstream gradients
    total = (log_prob * weight).sum() + (z * z.detach().sin()).sum() + logdet.sum()
    grads = torch.autograd.grad(total, (x,) if c is None else (x, c))
    with torch.no_grad():
        z_plain, logdet_plain = flow(x, c)
    return (log_prob.detach(), z_plain, logdet_plain, *grads)


def fused_spline_calls(monkeypatch, kernels: bool) -> list[str]:
    """Switch the fused spline kernels on or off (skip when Numba is missing) and record their array-level runs:
    ``"parallel"`` or ``"serial"`` for a spline, ``"flow"`` for a whole flow in one loop."""
    if kernels and not _numba_spline.available():
        pytest.skip("Numba is not installed (pip install 'posepriors[fast]'): no fused spline kernels")
    monkeypatch.setattr(_numba_spline, "ENABLED", kernels)
    monkeypatch.setattr(_numba_spline, "LOAD_AFTER", 0)  # from the first call
    calls: list[str] = []
    spline, flow = _numba_spline.forward_arrays, _numba_spline.flow_forward_arrays

    def spline_run(*args, parallel):
        calls.append("parallel" if parallel else "serial")
        return spline(*args, parallel=parallel)

    monkeypatch.setattr(_numba_spline, "forward_arrays", spline_run)
    monkeypatch.setattr(_numba_spline, "flow_forward_arrays", lambda *a: calls.append("flow") or flow(*a))
    return calls


@pytest.mark.parametrize("layers", [1, 2], ids=["one_hidden_layer", "two_hidden_layers"])
@pytest.mark.parametrize("kernels", [False, True], ids=["numpy_ops", "fused_spline"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", [(1, 63, 0), (1, 10, 5), (21, 3, 6), (4, 2, 0)], ids=str)
def test_numpy_path_matches_the_tensor_path(case, dtype, kernels, layers, monkeypatch):
    """A frozen spline flow on a small CPU batch runs in NumPy (one autograd node for the flow), its couplings as
    NumPy ops or (with Numba) as fused loops in the calling thread: the whole flow as one loop where every
    conditioner has one hidden layer (as the shipped flows have), else each spline alone. The same log-densities,
    latent codes, log-determinants and gradients w.r.t. the input and the context as the tensor path (tensor ops),
    to float round-off, with values in both tails and every mask layout (D = 3 cycles through them)."""
    groups, dim, context = case
    flow = small_flow(groups, dim, context, dtype, num_hidden_layers=layers)
    x, c = data(5, groups, dim, context, dtype)
    calls = numpy_calls(monkeypatch)
    fused = fused_spline_calls(monkeypatch, kernels)
    fast = value_and_gradients(flow, x, c)
    assert calls == [5, 5, 5]  # log_prob, forward with gradients, forward without
    runs = ["flow"] * 3 if layers == 1 else ["serial"] * 9  # one loop per run, or one per coupling (three)
    assert fused == (runs if kernels else [])
    with monkeypatch.context() as patch:
        patch.setattr(sequence, "NUMPY_MAX_ELEMENTS", 0)
        patch.setattr(_numba_spline, "ENABLED", False)
        reference = value_and_gradients(flow, x, c)
    assert calls == [5, 5, 5] and fused == (runs if kernels else [])
    # float32: round-off through three spline layers (values in the tails, gradients near bin edges) reaches a few
    # 1e-4 relative, and one gradient near a bin edge of (1, 63, 0) moved by 2.9e-3 (0.19%) in 1 run of 10 with
    # the same seeds (the matrix products' float32 round-off varies between runs); float64 shows that the formulas
    # are the same
    tol = {torch.float32: dict(atol=1e-2, rtol=1e-2), torch.float64: dict(atol=1e-10, rtol=1e-10)}[dtype]
    for got, want in zip(fast, reference, strict=True):
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **tol)
    assert fast[3].abs().max() > 0


def test_numpy_path_scope(monkeypatch):
    """The NumPy path runs frozen flows on small CPU batches only: a batch above ``NUMPY_MAX_ELEMENTS``, a flow
    whose weights need gradients, a dtype other than the flow's, an activation without a NumPy derivative (gelu)
    or affine couplings take the tensor path. An in-place weight update reaches the next call."""
    calls = numpy_calls(monkeypatch)
    flow = small_flow(1, 10, 5, torch.float64)
    x, c = data(3, 1, 10, 5, torch.float64)
    flow.log_prob(x, c)
    assert calls == [3]
    monkeypatch.setattr(sequence, "NUMPY_MAX_ELEMENTS", 29)  # 3 x 10 = 30 entries: above
    flow.log_prob(x, c)
    monkeypatch.setattr(sequence, "NUMPY_MAX_ELEMENTS", 30)
    flow.log_prob(x, c)
    assert calls == [3, 3]
    flow.requires_grad_(True)
    x_grad = x.clone().requires_grad_(True)
    flow.log_prob(x_grad, c).sum().backward()  # training-style: the weights get gradients, block by block
    assert calls == [3, 3] and flow.blocks[2].conditioner[0].weight.grad is not None
    flow.requires_grad_(False)
    with pytest.raises(RuntimeError):  # the float32 input is not silently run in float64 arithmetic
        flow.log_prob(x.float(), c.float())
    assert calls == [3, 3]
    for other in (
        small_flow(1, 10, 5, torch.float64, activation="gelu"),
        small_flow(1, 10, 5, torch.float64, coupling="affine"),
    ):
        other.log_prob(x, c)
        assert calls == [3, 3]
    before = flow.log_prob(x, c)
    with torch.no_grad():
        flow.blocks[2].conditioner[0].weight.mul_(1.5)  # in place: the cached arrays share its memory
        flow.blocks[2].conditioner[-1].bias.add_(0.2)
    after = flow.log_prob(x, c)
    monkeypatch.setattr(sequence, "NUMPY_MAX_ELEMENTS", 0)
    torch.testing.assert_close(after, flow.log_prob(x, c), atol=1e-10, rtol=1e-10)
    assert (after - before).abs().max() > 1e-3 and calls == [3, 3, 3, 3]


def test_kernels_load_after_the_first_calls_or_for_a_large_one(monkeypatch):
    """Before Numba is imported, the splines run as NumPy or tensor ops for the first ``LOAD_AFTER`` calls that
    could run the kernels (a one-off call does not wait for Numba to load) and as the kernels from then on, with
    the same numbers to round-off; a call of ``LOAD_AT_VALUES`` values or more loads them at once, and once loaded,
    every call that can run them does."""
    calls = numpy_calls(monkeypatch)
    fused = fused_spline_calls(monkeypatch, True)
    not_imported = functools.cache(_numba_spline._numba.__wrapped__)  # as in a fresh process
    monkeypatch.setattr(_numba_spline, "_numba", not_imported)
    monkeypatch.setattr(_numba_spline, "LOAD_AFTER", 2)
    monkeypatch.setattr(_numba_spline, "_waiting", 0)
    flow = small_flow(1, 10, 5, torch.float64)
    x, c = data(3, 1, 10, 5, torch.float64)
    first = [flow.log_prob(x, c) for _ in range(2)]
    assert calls == [3, 3] and fused == [] and not_imported.cache_info().currsize == 0  # Numba not even imported
    later = flow.log_prob(x, c)
    assert calls == [3, 3, 3] and fused == ["serial"] * 3  # three couplings (two hidden layers), in this thread
    torch.testing.assert_close(later, first[0], atol=1e-10, rtol=1e-10)
    assert torch.equal(first[0], first[1])
    # a large call loads them at once; the tensor path counts its coupling calls too
    for values, expected in ((10, False), (_numba_spline.LOAD_AT_VALUES, True)):
        monkeypatch.setattr(_numba_spline, "_numba", functools.cache(_numba_spline._numba.__wrapped__))
        monkeypatch.setattr(_numba_spline, "_waiting", 0)
        assert _numba_spline.wanted(values) is expected
    assert _numba_spline.wanted(10) is True  # loaded: every call
    monkeypatch.setattr(_numba_spline, "ENABLED", False)
    assert _numba_spline.wanted(_numba_spline.LOAD_AT_VALUES) is False


def test_a_loop_decides_the_path_once_at_its_start(monkeypatch):
    """``one_path``: a loop of ``LOAD_AFTER`` steps or more (or of unknown length: a MAP) loads the kernels at its
    first call; a shorter one keeps the tensor or NumPy ops to its end even past ``LOAD_AFTER`` calls, without
    counting them; a nested loop keeps the outer loop's decision. So no loop switches arithmetic half-way."""
    wanted = _numba_spline.wanted
    for steps, loads in ((2, False), (3, True), (None, True)):
        not_imported = functools.cache(_numba_spline._numba.__wrapped__)  # as in a fresh process
        monkeypatch.setattr(_numba_spline, "_numba", not_imported)
        monkeypatch.setattr(_numba_spline, "LOAD_AFTER", 3)
        monkeypatch.setattr(_numba_spline, "_waiting", 1)
        with _numba_spline.one_path(steps):
            assert [wanted(10) for _ in range(5)] == [loads] * 5
            with _numba_spline.one_path(100 if steps == 2 else 1):
                assert wanted(10) is loads
        assert (not_imported.cache_info().currsize > 0) is loads
        if not loads:  # held: nothing counted; afterwards the count goes on from where it was
            assert _numba_spline._waiting == 1 and [wanted(10) for _ in range(3)] == [False, False, True]
    with _numba_spline.one_path(2):  # once loaded, every loop runs the kernels
        assert wanted(10) is True
    # a long loop in which nothing could run the kernels (a Gaussian's denoise) leaves the count as it was, and a
    # short loop inside a long one keeps the long one's decision
    monkeypatch.setattr(_numba_spline, "_numba", functools.cache(_numba_spline._numba.__wrapped__))
    monkeypatch.setattr(_numba_spline, "_waiting", 1)
    with _numba_spline.one_path():
        pass
    assert _numba_spline._waiting == 1
    with _numba_spline.one_path(), _numba_spline.one_path(1):
        assert wanted(10) is True


@pytest.mark.parametrize("layers", [1, 2], ids=["one_hidden_layer", "two_hidden_layers"])
@pytest.mark.parametrize("kernels", [False, True], ids=["numpy_ops", "fused_spline"])
def test_numpy_path_flushes_subnormal_gradients(kernels, layers, monkeypatch):
    """Upstream gradients below the smallest normal float leave the NumPy path as exact zeros (subnormal floats
    make a CPU's arithmetic tens of times slower), never as subnormals; normal gradients get through."""
    calls = numpy_calls(monkeypatch)
    fused_spline_calls(monkeypatch, kernels)
    flow = small_flow(1, 63, 0, torch.float32, num_hidden_layers=layers)
    tiny = torch.finfo(torch.float32).tiny
    x = data(2, 1, 63, 0, torch.float32)[0].requires_grad_(True)
    z, logdet = flow(x)
    weight = torch.full_like(z, tiny / 8)
    weight[:, :, :3] = 1.0
    (grad,) = torch.autograd.grad((z * weight).sum() + logdet.sum() * (tiny / 8), x)
    nonzero = grad[grad != 0].abs()
    assert calls == [2] and nonzero.numel() > 0 and bool((nonzero >= tiny).all())


def test_ensemble_of_flows_runs_as_one_numpy_flow(monkeypatch):
    """``ensemble_log_prob`` runs one-group flows of one architecture (different weights and LU permutations) as
    the groups of one NumPy flow: the same log-densities and input gradients as each flow on its own; flows that
    do not stack (another width), a batch too large for the NumPy path or unfrozen flows run one by one."""
    from posepriors import flows

    members = [small_flow(1, 10, 0, torch.float64, seed=k) for k in range(3)]
    x = data(4, 1, 10, 0, torch.float64)[0]

    def run(ensemble):
        point = x.clone().requires_grad_(True)
        out = sequence.ensemble_log_prob(ensemble, point)
        (grad,) = torch.autograd.grad((out * torch.arange(1.0, 1 + out.shape[1], dtype=out.dtype)).sum(), point)
        return out.detach(), grad

    calls = numpy_calls(monkeypatch)
    fast = run(members)
    assert calls == [4]  # one NumPy flow for the three members
    with monkeypatch.context() as patch:
        patch.setattr(sequence, "NUMPY_MAX_ELEMENTS", 0)
        reference = run(members)
    assert calls == [4] and fast[0].shape == (4, 3)
    for got, want in zip(fast, reference, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    wider = flows.build_flow(1, 10, num_layers=3, hidden=20, coupling="spline", bins=5, bound=3.0)
    wider.double().eval().requires_grad_(False)
    mixed = [*members[:2], wider]
    calls.clear()
    out, _ = run(mixed)
    assert calls == [4, 4, 4]  # each member on its own NumPy path
    torch.testing.assert_close(out, torch.cat([m.log_prob(x) for m in mixed], -1), atol=1e-10, rtol=1e-10)
    calls.clear()
    monkeypatch.setattr(sequence, "NUMPY_MAX_ELEMENTS", 100)  # 4 x 10 per member fits, 3 x 40 do not
    run(members)
    assert calls == [4, 4, 4]
    members[0].requires_grad_(True)
    calls.clear()
    run(members)
    assert calls == [4, 4]  # the unfrozen member runs block by block


def test_numpy_path_refuses_a_backward_after_an_in_place_change(monkeypatch):
    """The NumPy path keeps views of its input for the backward: like any autograd node it refuses to run the
    backward once that input has been changed in place, instead of returning a gradient of other numbers."""
    calls = numpy_calls(monkeypatch)
    flow = small_flow(1, 10, 0, torch.float64)
    leaf = data(2, 1, 10, 0, torch.float64)[0].requires_grad_(True)
    x = leaf * 1.0
    log_prob = flow.log_prob(x)
    assert calls == [2]
    with torch.no_grad():
        x.add_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        log_prob.sum().backward()


def test_whole_flow_loop_refuses_arrays_that_do_not_match_its_plan():
    """The whole-flow loop does not check its indices, so its wrapper does: inputs or a context whose groups or
    widths do not match the flow raise (naming both) instead of reading past the arrays. A flow with a conditioner
    the loop does not cover (two hidden layers) gets no table and runs coupling by coupling."""
    if not _numba_spline.available():
        pytest.skip("Numba is not installed (pip install 'posepriors[fast]'): no fused spline kernels")
    flow = small_flow(2, 10, 5, torch.float64, num_hidden_layers=1)
    x, c = data(3, 2, 10, 5, torch.float64)
    flow.log_prob(x, c)  # builds the frozen steps
    arrays = flow._numpy_plan(x, c).arrays(np.float64)
    z, logdet, _ = _numba_spline.flow_forward_arrays(arrays, x.numpy(), c.numpy())
    assert z.shape == (3, 2, 10) and logdet.shape == (3, 2)
    for bad_x, bad_c in ((x[:, :1], c[:, :1]), (x, c[..., :4]), (x[..., :9], c), (x, None)):
        with pytest.raises(ValueError, match=r"expected inputs \(B, 2, 10\) and a context \(B, 2, 5\)"):
            _numba_spline.flow_forward_arrays(arrays, bad_x.numpy(), None if bad_c is None else bad_c.numpy())
    deep = small_flow(1, 10, 0, torch.float64, num_hidden_layers=2)
    x1 = data(3, 1, 10, 0, torch.float64)[0]
    deep.log_prob(x1)
    assert deep._numpy_plan(x1, None).arrays(np.float64) is None


@pytest.mark.parametrize("kernels", [False, True])
def test_the_numpy_path_raises_no_floating_point_warnings_far_beyond_the_splines(kernels, monkeypatch):
    """np.where evaluates the branch it discards: a pose far outside every spline's interval must not warn."""
    import warnings

    monkeypatch.setattr(_numba_spline, "ENABLED", kernels)
    prior = _perturbed_flow_prior()
    x = torch.zeros(1, prior.num_joints, 3)
    x[0, 2] = 1e6
    x.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nll = prior.nll(x)
        nll.sum().backward()
    assert torch.isfinite(nll).all() and torch.isfinite(x.grad).all()


def _perturbed_flow_prior():
    from tests.families import make

    return perturb(make("global_flow"), scale=3.0).eval().requires_grad_(False)  # splines far from the identity


@pytest.mark.parametrize("kernels", [False, True], ids=["numpy_ops", "whole_flow_loop"])
def test_a_linear_map_shared_by_the_groups_is_applied_to_every_group(kernels, monkeypatch):
    """A permutation alone folds to one map for all groups: the NumPy path applies it to every group (before: the
    NumPy ops ran group 0 alone, and the whole-flow loop read past the map for the others). Values and input
    gradients equal the flow run block by block."""
    if kernels and not _numba_spline.available():
        pytest.skip("Numba is not installed (pip install 'posepriors[fast]'): no fused spline kernels")
    from posepriors.flows import FlowSequence
    from posepriors.flows.couplings import RQSplineCoupling
    from posepriors.flows.linear import Permutation

    monkeypatch.setattr(_numba_spline, "ENABLED", kernels)
    monkeypatch.setattr(_numba_spline, "LOAD_AFTER", 0)
    coupling = RQSplineCoupling(8, 6, torch.arange(6) < 3, 8, 1, 0, 4, 3.0, "silu")
    flow = perturb(FlowSequence([coupling, Permutation(6, seed=1)], 8, 6), 0.3, seed=2).double().eval()
    flow.requires_grad_(False)
    calls = numpy_calls(monkeypatch)
    x = data(2, 8, 6, 0, torch.float64)[0].requires_grad_(True)

    def run() -> tuple[torch.Tensor, ...]:
        z, logdet = flow(x)
        return z, logdet, *torch.autograd.grad(z.sin().sum() + logdet.sum(), x)

    fast = run()
    assert calls == [2]
    flow.requires_grad_(True)  # block by block
    for got, want in zip(fast, run(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
