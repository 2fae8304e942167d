"""Flow building blocks: exact inverses, log-determinants, gradients, grouped = per-group loop."""

from __future__ import annotations

import pytest
import torch

from posepriors import flows

CASES = [(1, 63, 0), (1, 10, 5), (55, 3, 6), (4, 2, 0)]


def _perturb(module, scale=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _blocks(groups, dim, context):
    split = (dim + 1) // 3 if dim <= 3 else None
    return {
        "actnorm": flows.ActNorm(groups, dim),
        "lu": flows.LULinear(groups, dim, seed=1),
        "permutation": flows.Permutation(dim, torch.randperm(dim, generator=torch.Generator().manual_seed(0))),
        "affine": flows.AffineCoupling(groups, dim, 16, context_features=context, split=split),
        "spline": flows.RQSplineCoupling(groups, dim, 16, context_features=context, split=split, bound=3.0),
    }


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block", ["actnorm", "lu", "permutation", "affine", "spline"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_round_trip(case, block, dtype):
    groups, dim, context = case
    module = _perturb(_blocks(groups, dim, context)[block], 0.1).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(17, groups, dim, generator=g, dtype=dtype)
    c = torch.randn(17, groups, context, generator=g, dtype=dtype) if context else None
    z, logdet = module(x, c)
    back, inv_logdet = module.inverse(z, c)
    assert z.shape == x.shape and logdet.shape == (17, groups)
    tol = 1e-4 if dtype == torch.float32 else 1e-8
    assert (back - x).abs().max() < tol
    assert (logdet + inv_logdet).abs().max() < tol


@pytest.mark.parametrize("block", ["actnorm", "lu", "affine", "spline"])
def test_logdet_matches_autograd_jacobian(block):
    groups, dim, context = 2, 4, 3
    module = _perturb(_blocks(groups, dim, context)[block], 0.3).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, groups, dim, generator=g, dtype=torch.float64)
    c = torch.randn(1, groups, context, generator=g, dtype=torch.float64)
    _, logdet = module(x, c)
    for k in range(groups):

        def f(v, k=k):
            xk = x.clone()
            xk[0, k] = v
            return module(xk, c)[0][0, k]

        J = torch.autograd.functional.jacobian(f, x[0, k])
        torch.testing.assert_close(logdet[0, k], torch.linalg.slogdet(J)[1], atol=1e-8, rtol=1e-8)


def test_spline_far_outside_its_interval_is_the_identity():
    module = _perturb(flows.RQSplineCoupling(1, 4, 8, bound=2.0)).double()
    x = torch.tensor([[[0.1, -0.3, 9.0, -10.0]]], dtype=torch.float64)
    z, logdet = module(x)
    torch.testing.assert_close(z[..., 2:], x[..., 2:])
    back, _ = module.inverse(z)
    torch.testing.assert_close(back, x, atol=1e-10, rtol=0)


@pytest.mark.parametrize("coupling", ["affine", "spline"])
def test_grouped_equals_loop_over_groups(coupling):
    G, D, C = 5, 3, 6
    flow = _perturb(flows.build_flow(G, D, num_layers=2, hidden=8, coupling=coupling, context_features=C))
    x, c = torch.randn(9, G, D), torch.randn(9, G, C)
    z, logdet = flow(x, c)
    for k in range(G):
        single = flows.build_flow(1, D, num_layers=2, hidden=8, coupling=coupling, context_features=C)
        state = {}
        for name, value in flow.state_dict().items():
            state[name] = value[k : k + 1] if value.dim() > 0 and value.shape[0] == G else value
        single.load_state_dict(state)
        zk, ldk = single(x[:, k : k + 1], c[:, k : k + 1])
        torch.testing.assert_close(zk[:, 0], z[:, k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ldk[:, 0], logdet[:, k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("coupling", ["affine", "spline"])
def test_build_flow_round_trip_and_gradients(coupling):
    flow = _perturb(flows.build_flow(1, 12, num_layers=3, hidden=16, coupling=coupling, context_features=2))
    x, c = torch.randn(8, 1, 12), torch.randn(8, 1, 2)
    z, _ = flow(x, c)
    back, _ = flow.inverse(z, c)
    assert (back - x).abs().max() < 1e-4
    flow.zero_grad()
    (flow.log_prob(x, c).sum()).backward()
    missing = [n for n, p in flow.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient reaches {missing}"


def test_actnorm_data_init_and_state_dict():
    norm = flows.ActNorm(2, 3)
    x = torch.randn(500, 2, 3) * torch.tensor([1.0, 2.0, 3.0]) + 5
    z, _ = norm(x)  # training mode: initialises on the first batch
    torch.testing.assert_close(z.mean(0), torch.zeros(2, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(2, 3), atol=1e-4, rtol=0)
    other = flows.ActNorm(2, 3)
    other.load_state_dict(norm.state_dict())
    assert bool(other.initialized)
    z2, _ = other(x * 10)  # a loaded ActNorm does not re-initialise
    torch.testing.assert_close(z2, (x * 10 - norm.loc) * torch.exp(-norm.log_scale))


def test_zero_batch_and_shape_errors():
    flow = flows.build_flow(3, 3, num_layers=2, hidden=8, context_features=6)
    z, logdet = flow(torch.zeros(0, 3, 3), torch.zeros(0, 3, 6))
    assert z.shape == (0, 3, 3) and logdet.shape == (0, 3)
    with pytest.raises(ValueError, match=r"expected flow input of shape \(B, 3, 3\), got \(4, 3\)"):
        flow(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="needs a context of 6 features"):
        flow(torch.zeros(4, 3, 3))
    for kwargs, match in [
        ({"coupling": "maf"}, "coupling"),
        ({"mixing": "glow"}, "mixing"),
        ({"num_layers": 0}, "num_layers"),
    ]:
        with pytest.raises(ValueError, match=match):
            flows.build_flow(1, 4, **{"num_layers": 2, "hidden": 4, **kwargs})


@pytest.mark.parametrize("coupling", ["affine", "spline"])
def test_a_short_fit_learns_a_banana(coupling):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(512, generator=g)
    b = 0.5 * a.square() + 0.3 * torch.randn(512, generator=g)
    data = torch.stack([a, b], -1).unsqueeze(1)
    flow = flows.build_flow(1, 2, num_layers=4, hidden=32, coupling=coupling, mixing="permutation")
    flow.initialize(data)
    before = flow.log_prob(data).mean().item()
    opt = torch.optim.Adam(flow.parameters(), lr=5e-3)
    for _ in range(120):
        opt.zero_grad()
        loss = -flow.log_prob(data).mean()
        loss.backward()
        opt.step()
    assert flow.log_prob(data).mean().item() > before + 0.3  # a Gaussian fit cannot bend: the flow must
