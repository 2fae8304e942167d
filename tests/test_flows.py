"""Flow building blocks: exact inverses and log-determinants, gradients, grouped = a loop over groups, ActNorm state,
shape errors, and a short fit. Properties, not magic numbers: every block starts as (near) the identity, so the
parameters are perturbed with seeded noise before each check."""

from __future__ import annotations

import math

import pytest
import torch

from posepriors import flows
from posepriors.flows.couplings import _FrozenCoupling
from posepriors.flows.sequence import _FoldedAffine

# (groups, dim, context features): the global flow's body (63-D), a conditional global flow, the per-joint flows
CASES = [(1, 63, 0), (1, 10, 5), (55, 3, 6), (4, 2, 0)]
BLOCKS = ["actnorm", "lu", "permutation", "affine", "affine_mid", "spline", "spline_mid"]
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-4, torch.float64: 1e-8}


def perturb(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Add seeded noise to every parameter: std ``scale / sqrt(fan_in)`` for matrices (G, in, out) / (G, D, D),
    ``scale`` otherwise, so that deep and wide blocks stay well conditioned."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            std = scale / math.sqrt(p.shape[-2]) if p.dim() == 3 else scale
            p.add_(std * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return module


def make_block(name: str, groups: int, dim: int, context: int, hidden: int = 16) -> torch.nn.Module:
    """One block; the ``*_mid`` couplings use a non-contiguous mask (the index-gather path)."""
    half = torch.arange(dim) < max(dim // 2, 1)
    middle = torch.zeros(dim, dtype=torch.bool)
    middle[dim // 2] = True  # conditions on the middle dim: transformed dims on both sides
    if dim == 2:
        middle = torch.tensor([False, True])
    if name == "actnorm":
        return flows.ActNorm(groups, dim)
    if name == "lu":
        return flows.LULinear(groups, dim, seed=1)
    if name == "permutation":
        return flows.Permutation(dim, seed=3)
    mask = middle if name.endswith("_mid") else half
    if name.startswith("affine"):
        return flows.AffineCoupling(groups, dim, mask, hidden, context_features=context)
    return flows.RQSplineCoupling(groups, dim, mask, hidden, context_features=context, bound=3.0)


def data(batch: int, groups: int, dim: int, context: int, dtype=torch.float64, seed: int = 1):
    """Inputs with |x| up to 10 (beyond the spline interval) and a context (or None)."""
    g = torch.Generator().manual_seed(seed)
    x = 2.5 * torch.randn(batch, groups, dim, generator=g, dtype=torch.float64)
    x[0, :, 0], x[1, :, -1] = 10.0, -10.0
    c = torch.randn(batch, groups, context, generator=g, dtype=torch.float64) if context else None
    return x.to(dtype), (None if c is None else c.to(dtype))


# ---------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("name", BLOCKS)
def test_inverse_round_trip(name, case, dtype):
    groups, dim, context = case
    block = perturb(make_block(name, groups, dim, context)).to(dtype)
    x, c = data(33, groups, dim, context, dtype)
    z, logdet = block(x, c)
    assert z.shape == x.shape and z.dtype == dtype and logdet.shape == (33, groups)
    back, inverse_logdet = block.inverse(z, c)
    assert (back - x).abs().max() < TOL[dtype]
    torch.testing.assert_close(inverse_logdet, -logdet, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("case", [(1, 63, 0), (1, 10, 5), (6, 3, 6), (4, 2, 0)], ids=str)
@pytest.mark.parametrize("name", BLOCKS)
def test_logdet_matches_autograd_jacobian(name, case):
    """log|det| per sample and group equals slogdet of the autograd Jacobian; across groups the Jacobian is 0."""
    groups, dim, context = case
    block = perturb(make_block(name, groups, dim, context), scale=0.3).double()
    x, c = data(3, groups, dim, context)
    x = x.clamp(-2.5, 2.5)  # keep some inside the spline interval
    _, logdet = block(x, c)
    for b in range(x.shape[0]):

        def f(v, b=b):
            return block(v.reshape(1, groups, dim), None if c is None else c[b : b + 1])[0].reshape(-1)

        J = torch.autograd.functional.jacobian(f, x[b].reshape(-1), vectorize=True).reshape(groups, dim, groups, dim)
        for g in range(groups):
            torch.testing.assert_close(logdet[b, g], torch.linalg.slogdet(J[g, :, g])[1], atol=1e-8, rtol=1e-8)
        off_diagonal = J.clone()
        off_diagonal[range(groups), :, range(groups)] = 0
        assert off_diagonal.abs().max() == 0  # groups are independent


@pytest.mark.parametrize("name", ["affine", "spline_mid"])
def test_gradcheck_float64(name):
    block = perturb(make_block(name, 2, 3, 2, hidden=4), scale=0.3).double()
    x, c = data(2, 2, 3, 2)
    x = x.clamp(-2.5, 2.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: block(v, c), (x,))
    assert torch.autograd.gradcheck(lambda v: block.inverse(v, c), (x,))


def test_couplings_start_as_the_identity():
    x, c = data(9, 55, 3, 6)
    for name in ("affine", "affine_mid", "spline", "spline_mid"):
        z, logdet = make_block(name, 55, 3, 6).double()(x, c)
        torch.testing.assert_close(z, x, atol=1e-6, rtol=0)
        torch.testing.assert_close(logdet, torch.zeros_like(logdet), atol=1e-6, rtol=0)


def test_spline_is_the_identity_outside_its_interval():
    block = perturb(flows.RQSplineCoupling(1, 4, [True, True, False, False], 8, bound=2.0), 0.3).double()
    x = torch.tensor([[[0.1, -0.3, 9.0, -2.5]], [[0.1, -0.3, 1.0, -1.5]]], dtype=torch.float64)
    z, logdet = block(x)
    torch.testing.assert_close(z[0], x[0])
    assert logdet[0, 0] == 0 and logdet[1, 0] != 0 and not torch.equal(z[1], x[1])
    torch.testing.assert_close(block.inverse(z)[0], x, atol=1e-12, rtol=0)


def _reference_spline(x: torch.Tensor, params: torch.Tensor, bins: int, bound: float) -> tuple:
    """Durkan et al.'s rational-quadratic spline for one value per row, written out plainly (float64)."""
    K, B, m = bins, bound, 1e-3
    out, logdet = [], []
    for v, p in zip(x.tolist(), params.tolist(), strict=True):

        def knots(raw):
            size = torch.softmax(torch.tensor(raw, dtype=torch.float64), 0) * (1 - m * K) + m
            return torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(size, 0)]) * 2 * B - B

        kx, ky = knots(p[:K]), knots(p[K : 2 * K])
        d = torch.ones(K + 1, dtype=torch.float64)
        shift = math.log(math.expm1(1 - m))
        d[1:-1] = torch.nn.functional.softplus(torch.tensor(p[2 * K :], dtype=torch.float64) + shift) + m
        if not -B < v < B:
            out.append(v)
            logdet.append(0.0)
            continue
        k = min(int((kx[1:] <= v).sum()), K - 1)
        w, h = kx[k + 1] - kx[k], ky[k + 1] - ky[k]
        s, xi = h / w, (v - kx[k]) / w
        denom = s + (d[k + 1] + d[k] - 2 * s) * xi * (1 - xi)
        out.append(float(ky[k] + h * (s * xi**2 + d[k] * xi * (1 - xi)) / denom))
        slope = s**2 * (d[k + 1] * xi**2 + 2 * s * xi * (1 - xi) + d[k] * (1 - xi) ** 2) / denom**2
        logdet.append(float(torch.log(slope)))
    return torch.tensor(out, dtype=torch.float64), torch.tensor(logdet, dtype=torch.float64)


@pytest.mark.parametrize("bins", [2, 5])
def test_spline_matches_the_papers_formulas(bins):
    """The coupling's spline (written for few tensor ops) against a plain per-value transcription of the paper."""
    block = perturb(flows.RQSplineCoupling(1, 2, [True, False], 8, bins=bins, bound=2.0), 1.0).double()
    g = torch.Generator().manual_seed(4)
    x = torch.cat([3 * torch.rand(200, 1, 2, generator=g, dtype=torch.float64) - 1.5, torch.tensor([[[0.3, 2.5]]])])
    x[:5, 0, 1] = torch.tensor([-2.0, 2.0, -2.1, 1.999, -1.999])  # the interval's ends and just beyond
    z, logdet = block(x)
    params = block.conditioner(x[:, :, :1])[:, 0]
    expected, expected_logdet = _reference_spline(x[:, 0, 1], params, bins, 2.0)
    torch.testing.assert_close(z[:, 0, 1], expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(z[:, 0, 0], x[:, 0, 0], atol=0, rtol=0)
    torch.testing.assert_close(logdet[:, 0], expected_logdet, atol=1e-10, rtol=0)
    back, inverse_logdet = block.inverse(z)
    torch.testing.assert_close(back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(inverse_logdet, -logdet, atol=1e-10, rtol=0)
    x_grad = x.clone().requires_grad_(True)  # the slope, at the ends of the interval too, is exp(logdet)
    (grad,) = torch.autograd.grad(block(x_grad)[0][:, 0, 1].sum(), x_grad)
    torch.testing.assert_close(grad[:, 0, 1], logdet[:, 0].exp(), atol=1e-9, rtol=0)


def test_spline_propagates_nan_without_failing():
    block = perturb(flows.RQSplineCoupling(2, 3, [True, False, False], 8), 0.3)
    x = torch.randn(4, 2, 3)
    x[1, 0, 2] = float("nan")
    z, logdet = block(x)
    log_prob = flows.standard_normal_log_prob(z) + logdet
    assert torch.isnan(z[1, 0, 2]) and torch.isnan(log_prob[1, 0])
    assert torch.isfinite(z[[0, 2, 3]]).all() and torch.isfinite(log_prob[[0, 2, 3]]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spline_round_trip_is_tight_for_moderate_parameters(dtype):
    """Far from the degenerate (near-flat) regime the inverse is accurate to a few ulps of the data."""
    block = perturb(flows.RQSplineCoupling(8, 5, [True, False, True, False, False], 16, context_features=2), 0.1)
    block = block.to(dtype)
    x, c = data(2000, 8, 5, 2, dtype)
    back = block.inverse(block(x, c)[0], c)[0]
    assert (back - x).abs().max() < (1e-5 if dtype == torch.float32 else 1e-12)


# ---------------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("name", ["actnorm", "lu", "affine", "affine_mid", "spline", "spline_mid"])
def test_gradients_reach_every_parameter(name, case):
    groups, dim, context = case
    block = perturb(make_block(name, groups, dim, context))
    x, c = data(16, groups, dim, context, torch.float32)
    x.requires_grad_(True)
    z, logdet = block(x, c)
    (z.square().sum() + logdet.sum()).backward()
    missing = [n for n, p in block.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient reaches {missing}"
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------------- grouping
def _slice_state(module: torch.nn.Module, k: int) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    return {n: params[n][k : k + 1] if n in params else v for n, v in module.state_dict().items()}


@pytest.mark.parametrize("name", ["actnorm", "lu", "affine", "affine_mid", "spline", "spline_mid"])
def test_grouped_block_equals_a_loop_over_groups(name):
    """The batched implementation equals each group's own one-group block on its slice of the parameters."""
    G, D, C = 5, 4, 3
    block = perturb(make_block(name, G, D, C), 0.3).double()
    x, c = data(11, G, D, C)
    z, logdet = block(x, c)
    x_back, inverse_logdet = block.inverse(z, c)
    for k in range(G):
        single = make_block(name, 1, D, C).double()
        single.load_state_dict(_slice_state(block, k))
        zk, ldk = single(x[:, k : k + 1], c[:, k : k + 1])
        torch.testing.assert_close(zk[:, 0], z[:, k], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(ldk[:, 0], logdet[:, k], atol=1e-12, rtol=1e-12)
        xk, ildk = single.inverse(z[:, k : k + 1], c[:, k : k + 1])
        torch.testing.assert_close(xk[:, 0], x_back[:, k], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(ildk[:, 0], inverse_logdet[:, k], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("coupling", ["affine", "spline"])
def test_a_subset_of_groups_runs_through_functional_call(coupling):
    """joint_flow runs one tree level at a time: the rows of every parameter for a subset of groups."""
    G, D, C = 7, 3, 6
    flow = perturb(flows.build_flow(G, D, num_layers=3, hidden=8, coupling=coupling, context_features=C)).double()
    flow.eval()
    x, c = data(5, G, D, C)
    z, logdet = flow(x, c)
    index = torch.tensor([1, 4, 6])
    params = {f"flow.{n}": p.index_select(0, index) for n, p in flow.named_parameters()}
    zs, lds = torch.func.functional_call(_Runner(flow), params, (x[:, index], c[:, index]))
    torch.testing.assert_close(zs, z[:, index], atol=1e-12, rtol=0)
    torch.testing.assert_close(lds, logdet[:, index], atol=1e-12, rtol=0)


class _Runner(torch.nn.Module):
    """Runs a flow's blocks one by one (through their checked public ``forward``), like joint_flow's runner."""

    def __init__(self, flow: flows.FlowSequence) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x, context):
        total = 0
        for block in self.flow.blocks:
            x, logdet = block(x, context)
            total = total + logdet
        return x, total


# ---------------------------------------------------------------------------------------------------- ActNorm
def test_actnorm_data_init_and_state_dict_round_trip():
    norm = flows.ActNorm(2, 3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 2, 3, generator=g) * torch.tensor([1.0, 2.0, 3.0]) + 5
    assert not bool(norm.initialized)
    z, logdet = norm(x)  # training mode: initialises on this first batch
    assert bool(norm.initialized)
    torch.testing.assert_close(z.mean(0), torch.zeros(2, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(2, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(logdet[0], -x.std(0, unbiased=False).log().sum(-1), atol=1e-5, rtol=0)
    z_again, _ = norm(x * 10)  # initialised: a later batch does not re-initialise
    torch.testing.assert_close(z_again, (x * 10 - norm.loc) * torch.exp(-norm.log_scale))

    other = flows.ActNorm(2, 3)
    other.load_state_dict(norm.state_dict())
    assert bool(other.initialized) and "initialized" in norm.state_dict()
    z2, _ = other.train()(x * 10)  # a loaded ActNorm does not re-initialise, even in training mode
    torch.testing.assert_close(z2, z_again)
    # and loading a fresh state re-arms the initialisation
    other.load_state_dict(flows.ActNorm(2, 3).state_dict())
    z3, _ = other(x)
    torch.testing.assert_close(z3, z, atol=1e-5, rtol=0)


def test_actnorm_initialisation_rules():
    norm = flows.ActNorm(1, 2)
    norm.eval()(torch.randn(10, 1, 2))  # eval mode never initialises
    assert not bool(norm.initialized)
    norm.train()(torch.zeros(1, 1, 2))  # one sample has no spread: wait for a real batch
    norm(torch.zeros(0, 1, 2))
    assert not bool(norm.initialized)
    with pytest.raises(ValueError, match="at least 2 samples"):
        norm.initialize(torch.zeros(1, 1, 2))
    flow = flows.build_flow(3, 3, num_layers=2, hidden=8, context_features=2)
    x = torch.randn(300, 3, 3) * 4 - 1
    flow.initialize(x, torch.randn(300, 3, 2))
    assert all(bool(b.initialized) for b in flow.blocks if isinstance(b, flows.ActNorm))
    z, _ = flow.blocks[0](x)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(3, 3), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------- build_flow
@pytest.mark.parametrize("mixing", ["lu", "permutation", "none"])
@pytest.mark.parametrize("coupling", ["affine", "spline"])
@pytest.mark.parametrize("case", [(1, 63, 0), (1, 10, 5), (55, 3, 6)], ids=str)
def test_build_flow_round_trip_and_gradients(case, coupling, mixing):
    groups, dim, context = case
    flow = flows.build_flow(
        groups, dim, num_layers=3, hidden=16, coupling=coupling, context_features=context, mixing=mixing, bound=3.0
    )
    perturb(flow).double()
    x, c = data(9, groups, dim, context)
    z, logdet = flow(x, c)
    back, inverse_logdet = flow.inverse(z, c)
    assert (back - x).abs().max() < 1e-8
    torch.testing.assert_close(inverse_logdet, -logdet, atol=1e-8, rtol=0)
    torch.testing.assert_close(flow.log_prob(x, c), flows.standard_normal_log_prob(z) + logdet)
    flow.zero_grad()
    flow.log_prob(x, c).sum().backward()
    missing = [n for n, p in flow.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("mixing", ["lu", "permutation"])
@pytest.mark.parametrize("case", [(1, 63, 0), (55, 3, 6)], ids=str)
def test_frozen_inference_folds_linear_blocks_exactly(case, mixing):
    """A frozen flow in eval mode runs ActNorm + mixing as one cached affine map: same numbers, both directions,
    gradients w.r.t. the input; an in-place parameter update invalidates the cache."""
    groups, dim, context = case
    flow = flows.build_flow(
        groups, dim, num_layers=3, hidden=16, coupling="spline", context_features=context, mixing=mixing
    )
    perturb(flow).double().eval()
    x, c = data(9, groups, dim, context)
    z_ref, logdet_ref = flow(x, c)
    back_ref, _ = flow.inverse(z_ref, c)
    assert flow._frozen_steps(False) is None  # parameters require grad: block by block
    flow.requires_grad_(False)
    steps = flow._frozen_steps(False)
    assert steps is not None and any(isinstance(s, _FoldedAffine) for s in steps)
    z, logdet = flow(x, c)
    torch.testing.assert_close(z, z_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(logdet, logdet_ref, atol=1e-10, rtol=0)
    back, inverse_logdet = flow.inverse(z, c)
    torch.testing.assert_close(back, back_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(inverse_logdet, -logdet, atol=1e-10, rtol=0)
    c2 = None if c is None else c[:2]
    x2 = x[:2].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(flow.log_prob(x2, c2).sum(), x2)
    flow.requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(flow.log_prob(x2, c2).sum(), x2)
    flow.requires_grad_(False)
    torch.testing.assert_close(grad, grad_ref, atol=1e-10, rtol=0)  # gradients w.r.t. the input match
    with torch.no_grad():
        flow.blocks[0].loc.add_(0.5) if hasattr(flow.blocks[0], "loc") else None
    flow.requires_grad_(True)
    expected = flow.log_prob(x, c)
    flow.requires_grad_(False)
    torch.testing.assert_close(flow.log_prob(x, c), expected, atol=1e-10, rtol=0)
    flow.train()
    assert flow._frozen_steps(False) is None  # training mode (ActNorm initialisation): block by block


@pytest.mark.parametrize("case", [(1, 63, 0), (55, 3, 6)], ids=str)
def test_frozen_inference_runs_large_batches_in_chunks(case, monkeypatch):
    """Without autograd, a frozen flow splits a large CPU batch into chunks: the same numbers, both directions; an
    input that needs gradients runs whole."""
    groups, dim, context = case
    monkeypatch.setattr(flows.sequence, "NUMPY_MAX_ELEMENTS", 0)  # the tensor path (small batches run in NumPy)
    flow = flows.build_flow(groups, dim, num_layers=2, hidden=16, coupling="spline", context_features=context)
    perturb(flow).double().eval().requires_grad_(False)
    x, c = data(11, groups, dim, context)
    z_ref, logdet_ref = flow(x, c)  # whole: 11 rows are below the default chunk size
    back_ref, inverse_logdet_ref = flow.inverse(z_ref, c)
    calls = []
    run_steps = flows.FlowSequence._run_steps
    counted = staticmethod(lambda steps, x, c: calls.append(x.shape[0]) or run_steps(steps, x, c))
    monkeypatch.setattr(flows.FlowSequence, "_run_steps", counted)
    flow._chunk_rows = 4
    with torch.no_grad():
        z, logdet = flow(x, c)
        back, inverse_logdet = flow.inverse(z, c)
    assert calls == [4, 4, 3, 4, 4, 3]
    torch.testing.assert_close(z, z_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(logdet, logdet_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(back, back_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(inverse_logdet, inverse_logdet_ref, atol=1e-12, rtol=0)
    calls.clear()
    x_grad = x.clone().requires_grad_(True)
    flow.log_prob(x_grad, c).sum().backward()
    assert calls == [11] and torch.isfinite(x_grad.grad).all()


@pytest.mark.parametrize("mixing", ["permutation", "none"])
@pytest.mark.parametrize("dim", [2, 3, 4, 7, 63])
def test_build_flow_transforms_every_dim(dim, mixing):
    """Follow each original dim through the fixed permutations: every coupling pair (D > 3) or mask cycle (D <= 3)
    transforms each of them at least once."""
    num_layers = 6
    flow = flows.build_flow(1, dim, num_layers=num_layers, hidden=4, mixing=mixing, actnorm=False)
    where = torch.arange(dim)  # original dim held at each position
    transformed = []
    for block in flow.blocks:
        if isinstance(block, flows.Permutation):
            where = where[block.permutation]
        elif isinstance(block, flows.AffineCoupling):
            transformed.append(set(where[block.transformed_index].tolist()))
    window = dim if dim <= 3 else 2
    for start in range(0, num_layers - window + 1, window):
        assert set().union(*transformed[start : start + window]) == set(range(dim))


def test_build_flow_starts_as_the_identity_and_is_standard_normal():
    flow = flows.build_flow(2, 5, num_layers=3, hidden=8, mixing="none", actnorm=False)
    x = torch.randn(4, 2, 5)
    z, logdet = flow(x)
    torch.testing.assert_close(z, x)
    torch.testing.assert_close(flow.log_prob(x), torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1))


def test_standard_normal_log_prob():
    z = torch.randn(6, 4, 3, dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(flows.standard_normal_log_prob(z), expected)


# ---------------------------------------------------------------------------------------------------- conditioners
def test_grouped_linear_equals_per_group_linear_maps():
    layer = flows.GroupedLinear(4, 5, 7).double()
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    y = layer(x)
    for k in range(4):
        torch.testing.assert_close(y[:, k], x[:, k] @ layer.weight[k] + layer.bias[k])
    single = flows.GroupedLinear(1, 5, 7).double()
    single.load_state_dict(_slice_state(layer, 2))
    torch.testing.assert_close(single(x[:, 2:3]), y[:, 2:3])  # the one-group fast path agrees
    assert layer.weight.abs().max() <= 1 / math.sqrt(5) and layer.bias.abs().max() <= 1 / math.sqrt(5)
    assert flows.GroupedLinear(2, 3, 4, bias=False)(torch.randn(1, 2, 3)).shape == (1, 2, 4)


@pytest.mark.parametrize("activation", ["silu", "relu", "elu", "gelu"])
def test_grouped_mlp(activation):
    mlp = flows.GroupedMLP(3, 4, 2, hidden=8, num_hidden_layers=2, activation=activation)
    x = torch.randn(5, 3, 4)
    assert torch.equal(mlp(x), torch.zeros(5, 3, 2))  # zero-initialised last layer
    perturb(mlp, 1.0)
    y = mlp(x)
    for k in range(3):  # the same MLP run one group at a time with torch.nn.functional
        h = x[:, k]
        for i, layer in enumerate(mlp._linears):
            h = h @ layer.weight[k] + layer.bias[k]
            if i < 2:
                h = getattr(torch.nn.functional, activation)(h)
        torch.testing.assert_close(y[:, k], h)
    assert [n for n, _ in mlp.named_parameters()][:2] == ["0.weight", "0.bias"]  # nn.Sequential layout
    assert not torch.equal(flows.GroupedMLP(1, 4, 2, 8, zero_init_last=False)(x[:, :1]), torch.zeros(5, 1, 2))


@pytest.mark.parametrize("activation", ["silu", "relu", "elu", "gelu", "tanh"])
@pytest.mark.parametrize("groups", [1, 3])
def test_grouped_mlp_inference_and_partial_freezing(groups, activation):
    """Without autograd the activations run in place: the same outputs; a partly frozen MLP still trains."""
    mlp = perturb(flows.GroupedMLP(groups, 4, 2, hidden=8, num_hidden_layers=2, activation=activation), 1.0)
    x = torch.randn(5, groups, 4)
    expected = mlp(x)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected, atol=0, rtol=0)
    mlp.requires_grad_(False)
    torch.testing.assert_close(mlp(x), expected, atol=0, rtol=0)
    mlp[0].requires_grad_(True)  # only the first layer trains
    mlp(x).square().sum().backward()
    assert mlp[0].weight.grad is not None and mlp[0].weight.grad.abs().sum() > 0
    x_grad = x.clone().requires_grad_(True)  # frozen weights, gradients w.r.t. the input
    mlp.requires_grad_(False)
    (grad,) = torch.autograd.grad(mlp(x_grad).sum(), x_grad)
    mlp.requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(mlp(x_grad).sum(), x_grad)
    torch.testing.assert_close(grad, grad_ref)


# ---------------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("name", BLOCKS)
def test_zero_size_batch(name):
    block = perturb(make_block(name, 55, 3, 6))
    x, c = torch.zeros(0, 55, 3), torch.zeros(0, 55, 6)
    for fn in (block, block.inverse):
        z, logdet = fn(x, c)
        assert z.shape == (0, 55, 3) and logdet.shape == (0, 55)
    flow = flows.build_flow(55, 3, num_layers=2, hidden=8, coupling="spline", context_features=6)
    assert flow.log_prob(x, c).shape == (0, 55) and flow.inverse(x, c)[0].shape == (0, 55, 3)


@pytest.mark.parametrize("name", BLOCKS)
def test_wrong_shapes_raise(name):
    block = make_block(name, 3, 4, 2)
    c = torch.zeros(5, 3, 2)
    for bad in (torch.zeros(5, 12), torch.zeros(5, 3, 5), torch.zeros(1, 5, 3, 4)):
        with pytest.raises(ValueError, match=r"expected input of shape \(B, (3|G), 4\), got"):
            block(bad, c)
        with pytest.raises(ValueError, match=r"expected input of shape \(B, (3|G), 4\), got"):
            block.inverse(bad, c)
    if name != "permutation":
        with pytest.raises(ValueError, match=r"expected input of shape \(B, 3, 4\), got \(5, 2, 4\)"):
            block(torch.zeros(5, 2, 4), c[:, :2])


def test_flow_shape_and_context_errors():
    flow = flows.build_flow(3, 3, num_layers=2, hidden=8, context_features=6)
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 3, 3\), got \(4, 9\)"):
        flow(torch.zeros(4, 9), torch.zeros(4, 3, 6))
    with pytest.raises(ValueError, match=r"needs a context of shape \(B, G, 6\), got None"):
        flow(torch.zeros(4, 3, 3))
    with pytest.raises(ValueError, match=r"expected context of shape \(4, 3, 6\), got \(4, 3, 5\)"):
        flow.inverse(torch.zeros(4, 3, 3), torch.zeros(4, 3, 5))
    with pytest.raises(ValueError, match="takes no context"):
        flows.build_flow(1, 4, num_layers=1, hidden=4)(torch.zeros(2, 1, 4), torch.zeros(2, 1, 3))
    with pytest.raises(TypeError, match="Tensor"):
        flow([[0.0]])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"coupling": "maf"}, "coupling"),
        ({"mixing": "glow"}, "mixing"),
        ({"num_layers": 0}, "num_layers"),
        ({"dim": 1}, "dim"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"activation": "swish"}, "activation"),
        ({"coupling": "spline", "bins": 1}, "bins"),
        ({"coupling": "spline", "bound": float("inf")}, "bound"),
        ({"context_features": -1}, "context_features"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    settings = {"groups": 1, "dim": 4, "num_layers": 2, "hidden": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        flows.build_flow(settings.pop("groups"), settings.pop("dim"), **settings)


def test_bad_block_arguments_raise():
    with pytest.raises(ValueError, match=r"mask of shape \(3,\)"):
        flows.AffineCoupling(1, 3, [True, False], 4)
    with pytest.raises(ValueError, match="both True"):
        flows.AffineCoupling(1, 3, [True, True, True], 4)
    with pytest.raises(ValueError, match="scale_fn"):
        flows.AffineCoupling(1, 3, [True, False, False], 4, scale_fn="sigmoid")
    with pytest.raises(ValueError, match="permutation of range"):
        flows.Permutation(3, [0, 0, 1])


def test_meta_device_and_dtype_follow_the_inputs():
    """Nothing is created on a hard-coded device or dtype: the whole flow runs on the meta device."""
    for coupling in ("affine",):
        flow = flows.build_flow(4, 3, num_layers=2, hidden=8, coupling=coupling, context_features=2).to("meta")
        flow.eval()
        x, c = torch.empty(5, 4, 3, device="meta"), torch.empty(5, 4, 2, device="meta")
        z, logdet = flow(x, c)
        assert z.device.type == "meta" and logdet.shape == (5, 4)
        assert flow.inverse(z, c)[0].device.type == "meta"
    flow = flows.build_flow(2, 3, num_layers=2, hidden=8, coupling="spline").double()
    assert flow.log_prob(torch.randn(3, 2, 3, dtype=torch.float64)).dtype == torch.float64


# ---------------------------------------------------------------------------------------------------- a short fit
def _banana(n: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(n, generator=g)
    return torch.stack([a, 0.6 * a.square() - 0.6 + 0.35 * torch.randn(n, generator=g)], -1).unsqueeze(1)


def _correlated(n: int, g: torch.Generator) -> torch.Tensor:
    cov = torch.tensor([[1.0, 0.9], [0.9, 1.0]])
    return (torch.randn(n, 2, generator=g) @ torch.linalg.cholesky(cov).T).unsqueeze(1)


@pytest.mark.parametrize("target", ["banana", "correlated"])
@pytest.mark.parametrize("coupling", ["affine", "spline"])
def test_a_short_fit_beats_the_initial_model(coupling, target):
    g = torch.Generator().manual_seed(0)
    x = (_banana if target == "banana" else _correlated)(512, g)
    torch.manual_seed(0)  # the conditioners' initialisation
    flow = flows.build_flow(1, 2, num_layers=3, hidden=32, coupling=coupling, mixing="lu", actnorm=False)
    before = flow.log_prob(x).mean().item()  # the identity: a standard normal
    optimiser = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(200):
        optimiser.zero_grad()
        (-flow.log_prob(x).mean()).backward()
        optimiser.step()
    after = flow.log_prob(x).mean().item()
    # the best Gaussian's average log-likelihood (its MLE), the same for both targets' second moments
    gaussian = torch.distributions.MultivariateNormal(x[:, 0].mean(0), torch.cov(x[:, 0].T, correction=0))
    best_gaussian = gaussian.log_prob(x[:, 0]).mean().item()
    assert after > before + 0.5, (before, after)
    if target == "banana":  # a Gaussian cannot bend: the flow must
        assert after > best_gaussian + 0.15, (best_gaussian, after)
    else:
        assert after > best_gaussian - 0.05, (best_gaussian, after)


# ---------------------------------------------------------------------------------------------------- frozen fast path
COUPLINGS = ["affine", "affine_mid", "spline", "spline_mid", "spline_suffix"]


def frozen_coupling(name: str, groups: int, dim: int, context: int, activation: str = "silu") -> torch.nn.Module:
    """A perturbed float64 coupling with frozen weights; ``spline_suffix`` conditions on the last dims."""
    if name == "spline_suffix":
        mask = torch.arange(dim) >= dim // 2
        block = flows.RQSplineCoupling(groups, dim, mask, 16, 2, context, bins=5, bound=3.0, activation=activation)
    else:
        block = make_block(name, groups, dim, context)
    return perturb(block, scale=1.0).double().requires_grad_(False)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("name", COUPLINGS)
def test_frozen_coupling_backward_matches_autograd(name, case):
    """The one-node coupling of frozen weights: same outputs and log-determinants as the recorded forward, and the
    written-out backward gives autograd's gradients w.r.t. the input and the context (tails included)."""
    groups, dim, context = case
    block = frozen_coupling(name, groups, dim, context)
    x, c = data(7, groups, dim, context)
    x.requires_grad_(True)
    if c is not None:
        c.requires_grad_(True)
    z, logdet = _FrozenCoupling.apply(block, x, c, False)
    assert z.grad_fn is not None and "_FrozenCoupling" in type(z.grad_fn).__name__
    z_ref, logdet_ref = block._forward(x, c)
    torch.testing.assert_close(z, z_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(logdet, logdet_ref, atol=1e-12, rtol=0)
    g = torch.Generator().manual_seed(5)
    weight_z = torch.randn(z.shape, generator=g, dtype=z.dtype)
    weight_logdet = torch.randn(logdet.shape, generator=g, dtype=z.dtype)
    inputs = (x,) if c is None else (x, c)
    grads = torch.autograd.grad((z * weight_z).sum() + (logdet * weight_logdet).sum(), inputs)
    grads_ref = torch.autograd.grad((z_ref * weight_z).sum() + (logdet_ref * weight_logdet).sum(), inputs)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("activation", ["silu", "relu", "tanh", "elu", "gelu"])
def test_frozen_coupling_activations(activation):
    """Every activation with a written-out derivative takes the fast path with autograd's gradients; the others
    (gelu) fall back to the recorded forward."""
    block = frozen_coupling("spline_suffix", 1, 6, 3, activation=activation)
    x, c = data(5, 1, 6, 3)
    x.requires_grad_(True)
    z, logdet = block._frozen_forward(x, c)
    fast = "_FrozenCoupling" in type(z.grad_fn).__name__
    assert fast == (activation != "gelu")
    z_ref, logdet_ref = block._forward(x, c)
    (grad,) = torch.autograd.grad(z.sum() + logdet.sum(), x)
    (grad_ref,) = torch.autograd.grad(z_ref.sum() + logdet_ref.sum(), x)
    torch.testing.assert_close(grad, grad_ref, atol=1e-9, rtol=1e-9)


def test_frozen_flow_records_one_node_per_coupling(monkeypatch):
    """A frozen flow's fitting step on tensors goes through the one-node couplings (matching the block-by-block
    flow), a double backward gives the block-by-block flow's second derivatives, and an unfrozen flow still trains
    (its weights get gradients)."""
    monkeypatch.setattr(flows.sequence, "NUMPY_MAX_ELEMENTS", 0)  # the tensor path (small batches run in NumPy)
    flow = flows.build_flow(1, 10, num_layers=4, hidden=16, coupling="spline", context_features=5)
    perturb(flow).double().eval().requires_grad_(False)
    x, c = data(6, 1, 10, 5)
    x.requires_grad_(True)
    calls = []
    original = _FrozenCoupling.apply
    try:
        _FrozenCoupling.apply = lambda *args: calls.append(1) or original(*args)  # type: ignore[method-assign]
        log_prob = flow.log_prob(x, c)
    finally:
        _FrozenCoupling.apply = original  # type: ignore[method-assign]
    assert len(calls) == 4
    (grad,) = torch.autograd.grad(log_prob.sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad.square().sum(), x)  # through the couplings' recorded ops
    flow.requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(flow.log_prob(x, c).sum(), x, create_graph=True)
    (second_ref,) = torch.autograd.grad(grad_ref.square().sum(), x)
    torch.testing.assert_close(grad.detach(), grad_ref.detach(), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(second, second_ref, atol=1e-9, rtol=1e-9)
    assert second.abs().max() > 1e-3
    flow.zero_grad()
    flow.log_prob(x, c).sum().backward()
    assert all(p.grad is not None for p in flow.parameters())


def test_run_groups_equals_the_full_flow_on_those_groups():
    """``run_groups`` runs a subset of a grouped flow's groups (forward and inverse) with the full flow's numbers,
    and refuses bad indices and shapes."""
    flow = perturb(flows.build_flow(5, 3, num_layers=3, hidden=8, coupling="spline", context_features=2)).double()
    x, c = data(4, 5, 3, 2)
    z, logdet = flow(x, c)
    index = torch.tensor([3, 0])
    z_sub, logdet_sub = flow.run_groups(index, x[:, index], c[:, index])
    torch.testing.assert_close(z_sub, z[:, index], atol=1e-12, rtol=0)
    torch.testing.assert_close(logdet_sub, logdet[:, index], atol=1e-12, rtol=0)
    back, inverse_logdet = flow.run_groups(index, z_sub, c[:, index], inverse=True)
    torch.testing.assert_close(back, x[:, index], atol=1e-8, rtol=0)
    torch.testing.assert_close(inverse_logdet, -logdet_sub, atol=1e-8, rtol=0)
    everything = flow.run_groups(torch.arange(5), x, c)
    torch.testing.assert_close(everything[0], z, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match=r"group indices in \[0, 5\)"):
        flow.run_groups(torch.tensor([5]), x[:, :1], c[:, :1])
    with pytest.raises(ValueError, match="1-D integer tensor"):
        flow.run_groups(torch.tensor([0.0]), x[:, :1], c[:, :1])
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 2, 3\)"):
        flow.run_groups(index, x[:, :3], c[:, :3])


def test_run_groups_of_a_frozen_flow_uses_a_cached_copy():
    """A frozen flow runs a group subset as a cached frozen copy of those rows (same numbers and input gradients
    as the parameter-row path), reused across calls and rebuilt after an in-place parameter update."""
    flow = perturb(flows.build_flow(5, 3, num_layers=3, hidden=8, coupling="spline", context_features=2))
    flow.double().eval()  # (in training mode the first call would initialise ActNorm)
    x, c = data(4, 5, 3, 2)
    index = torch.tensor([4, 1, 2])
    xs = x[:, index].clone().requires_grad_(True)
    z_ref, logdet_ref = flow.run_groups(index, xs, c[:, index])  # parameters require grad: functional path
    (grad_ref,) = torch.autograd.grad(logdet_ref.sum() + z_ref.square().sum(), xs)
    flow.eval().requires_grad_(False)
    z, logdet = flow.run_groups(index, xs, c[:, index])
    (grad,) = torch.autograd.grad(logdet.sum() + z.square().sum(), xs)
    torch.testing.assert_close(z, z_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(logdet, logdet_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad, grad_ref, atol=1e-9, rtol=0)
    subset = flow._frozen_subset(index)
    assert subset is flow._frozen_subset(index) and subset.groups == 3
    with torch.no_grad():
        flow.blocks[0].loc.add_(0.25)
    assert flow._frozen_subset(index) is not subset
    z_new, _ = flow.run_groups(index, x[:, index], c[:, index])
    torch.testing.assert_close(z_new, flow(x, c)[0][:, index], atol=1e-10, rtol=0)
