"""Speed of posepriors' priors, with peers measured in the same run.

    python benchmarks/benchmark.py [--threads 2] [--repeat 5]

Prints, for body-sized models (21 joints, 63-D) built with the seed's settings and for the bundled models:
log_prob throughput at batch 4096, batch-1 ``nll`` forward + backward latency (w.r.t. the pose, frozen weights),
sampling time, and load time; next to a zuko coupling flow of the same depth and width (``pip install zuko``) and a
naive per-joint Python loop for joint_flow. Ratios > 1 favour posepriors.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import posepriors
from posepriors.priors import GaussianPrior, GlobalFlowConfig, GlobalFlowPrior, JointFlowConfig, JointFlowPrior


def timed(fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def nll_step(log_prob: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        pose = x.clone().requires_grad_(True)
        (-log_prob(pose)).sum().backward()

    return step


def naive_joint_loop(prior: JointFlowPrior) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same per-joint flows evaluated one joint at a time (what a per-joint Python loop costs)."""
    from posepriors.flows import build_flow, flow_settings

    cfg = prior.config
    singles = []
    state = prior.flow.state_dict()
    G = prior.num_joints
    for j in range(G):
        flow = build_flow(1, 3, **flow_settings(cfg), context_features=prior.context_features, actnorm=cfg.actnorm)
        flow.load_state_dict({k: v[j : j + 1] if v.dim() and v.shape[0] == G else v for k, v in state.items()})
        singles.append(flow.eval().requires_grad_(False))

    def log_prob(x: torch.Tensor) -> torch.Tensor:
        context = prior._context(x)
        total = x.new_zeros(x.shape[0])
        for j, flow in enumerate(singles):
            total = total + flow.log_prob(x[:, j : j + 1], context[:, j : j + 1])[:, 0]
        return total

    return log_prob


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = 0.3 * torch.randn(args.batch, 21, 3, generator=g)
    x1 = x[:1]

    models = {
        "gaussian": GaussianPrior(),
        "joint_flow (seed: hidden 128, K 4)": JointFlowPrior(
            JointFlowConfig(joints="body", hidden=128, num_layers=4, coupling="affine")
        ),
        "global_flow (seed: hidden 512, K 6)": GlobalFlowPrior(
            GlobalFlowConfig(joints="body", hidden=512, num_layers=6)
        ),
    }
    for prior in models.values():
        prior.initialize_from_data(x)
        prior.eval().requires_grad_(False)
    posepriors.set_validation(False)  # the finite-value check is a sync per call; fitting loops turn it off
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}\n")
    print(f"{'model':<38}{'params':>9}{'log_prob poses/s':>18}{'nll fwd+bwd b=1 ms':>20}{'sample 1024 ms':>16}")
    results = {}
    for name, prior in models.items():
        with torch.no_grad():
            t = timed(lambda p=prior: p.log_prob(x), args.repeat)
        t1 = timed(nll_step(prior.log_prob, x1), args.repeat * 20)
        ts = timed(lambda p=prior: p.sample(1024, generator=torch.Generator().manual_seed(0)), args.repeat)
        results[name] = (args.batch / t, t1)
        params = sum(p.numel() for p in prior.parameters())
        print(f"{name:<38}{params:>9}{args.batch / t:>18.0f}{1000 * t1:>20.3f}{1000 * ts:>16.1f}")

    joint = models["joint_flow (seed: hidden 128, K 4)"]
    naive = naive_joint_loop(joint)
    with torch.no_grad():
        t_naive = timed(lambda: naive(x), max(1, args.repeat // 2))
    t_naive1 = timed(nll_step(naive, x1), args.repeat * 20)
    print(f"{'joint_flow as a per-joint Python loop':<38}{'':>9}{args.batch / t_naive:>18.0f}{1000 * t_naive1:>20.3f}")

    try:
        import zuko
    except ImportError:
        zuko = None
        print("\nzuko not installed (pip install zuko): no peer flow")
    if zuko is not None:
        peer = zuko.flows.RealNVP(63, transforms=6, hidden_features=(512,))
        peer.eval().requires_grad_(False)
        flat, flat1 = x.reshape(args.batch, 63), x1.reshape(1, 63)
        with torch.no_grad():
            tz = timed(lambda: peer().log_prob(flat), args.repeat)
        tz1 = timed(nll_step(lambda p: peer().log_prob(p), flat1), args.repeat * 20)
        params = sum(p.numel() for p in peer.parameters())
        print(f"{'zuko RealNVP (hidden 512, 6 transforms)':<38}{params:>9}{args.batch / tz:>18.0f}{1000 * tz1:>20.3f}")

    gf_rate, gf_lat = results["global_flow (seed: hidden 512, K 6)"]
    jf_rate, _ = results["joint_flow (seed: hidden 128, K 4)"]
    print("\nratios")
    if zuko is not None:
        print(f"  global_flow / zuko RealNVP log_prob throughput: {gf_rate / (args.batch / tz):.2f}x (target >= 1.5)")
        print(f"  zuko / global_flow batch-1 nll fwd+bwd latency: {tz1 / gf_lat:.2f}x")
    print(f"  global_flow batch-1 nll fwd+bwd: {1000 * gf_lat:.3f} ms (target <= 0.5 ms)")
    print(f"  joint_flow cost per pose / global_flow: {gf_rate / jf_rate:.2f}x (target <= 2)")
    jf_lat = results["joint_flow (seed: hidden 128, K 4)"][1]
    print(f"  joint_flow batched / per-joint loop, batch {args.batch}: {jf_rate / (args.batch / t_naive):.1f}x")
    print(f"  joint_flow batched / per-joint loop, batch-1 nll fwd+bwd: {t_naive1 / jf_lat:.1f}x (target >= 10)")

    print("\nbundled models")
    print(f"{'name':<16}{'params':>10}{'load ms':>10}{'log_prob poses/s':>18}{'nll fwd+bwd b=1 ms':>20}")
    for name in posepriors.list_models():
        start = time.perf_counter()
        prior = posepriors.load(name)
        load_ms = 1000 * (time.perf_counter() - start)
        pose = prior.sample(args.batch, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            t = timed(lambda p=prior, q=pose: p.log_prob(q), max(1, args.repeat // 2), warmup=1)
        t1 = timed(nll_step(prior.log_prob, pose[:1]), args.repeat * 4)
        params = sum(p.numel() for p in prior.parameters())
        print(f"{name:<16}{params:>10}{load_ms:>10.1f}{args.batch / t:>18.0f}{1000 * t1:>20.3f}")
    posepriors.set_validation(True)


if __name__ == "__main__":
    main()
