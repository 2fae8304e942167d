"""Speed of posepriors' priors, with peers measured in the same run.

    python benchmarks/benchmark.py [--threads 2] [--rounds 7] [--repeat 20]

Prints, for body-sized models (21 joints, 63-D) built with the seed's settings and for the bundled models:
log_prob throughput at batch 4096, batch-1 ``nll`` forward + backward latency (w.r.t. the pose, frozen weights),
sampling time, and load time; next to a zuko coupling flow of the same depth and width (``pip install zuko``) and a
naive per-joint Python loop for joint_flow. Ratios > 1 favour posepriors.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import posepriors
from posepriors.priors import GaussianPrior, GlobalFlowConfig, GlobalFlowPrior, JointFlowConfig, JointFlowPrior

JOINT = "joint_flow (seed: hidden 128, K 4)"
GLOBAL = "global_flow (seed: hidden 512, K 6)"
LOOP = "joint_flow as a per-joint Python loop"
ZUKO = "zuko RealNVP (hidden 512, 6 transforms)"


def timed(fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def spread(values: list[float]) -> str:
    """``median [min, max]`` of per-round figures."""
    return f"{statistics.median(values):.2f}x [{min(values):.2f}, {max(values):.2f}]"


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
    parser.add_argument("--repeat", type=int, default=20, help="batch-1 calls per round (median)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile(prior.nll) of the bundled flows at batch 1"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = 0.3 * torch.randn(args.batch, 21, 3, generator=g)
    x1 = x[:1]

    models = {
        "gaussian": GaussianPrior(),
        JOINT: JointFlowPrior(JointFlowConfig(joints="body", hidden=128, num_layers=4, coupling="affine")),
        GLOBAL: GlobalFlowPrior(GlobalFlowConfig(joints="body", hidden=512, num_layers=6)),
    }
    for prior in models.values():
        prior.initialize_from_data(x)
        prior.eval().requires_grad_(False)
    posepriors.set_validation(False)  # the finite-value check is a sync per call; fitting loops turn it off

    # contenders: name -> (log_prob of (B, 21, 3) poses, batch-1 loss step)
    contenders: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[], None]]] = {
        name: (prior.log_prob, nll_step(prior.log_prob, x1)) for name, prior in models.items()
    }
    naive = naive_joint_loop(models[JOINT])
    contenders[LOOP] = (naive, nll_step(naive, x1))
    try:
        import zuko
    except ImportError:
        zuko = None
        print("zuko not installed (pip install zuko): no peer flow\n")
    if zuko is not None:
        peer = zuko.flows.RealNVP(63, transforms=6, hidden_features=(512,))
        peer.eval().requires_grad_(False)

        def peer_log_prob(pose: torch.Tensor) -> torch.Tensor:
            return peer().log_prob(pose.reshape(pose.shape[0], 63))

        contenders[ZUKO] = (peer_log_prob, nll_step(peer_log_prob, x1))

    # Interleaved rounds: every contender once per round, so that the machine's drift hits all of them alike; the
    # ratios are taken within each round and summarised over the rounds.
    throughput: dict[str, list[float]] = {name: [] for name in contenders}
    latency: dict[str, list[float]] = {name: [] for name in contenders}
    with torch.no_grad():
        for log_prob, _ in contenders.values():
            log_prob(x)  # warm-up (and the frozen flows' folding)
    for _ in range(args.rounds):
        for name, (log_prob, step) in contenders.items():
            with torch.no_grad():
                throughput[name].append(args.batch / timed(lambda f=log_prob: f(x), 3, warmup=0))
            latency[name].append(timed(step, args.repeat))

    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.rounds} interleaved rounds")
    print("(medians over the rounds)\n")
    print(f"{'model':<40}{'params':>9}{'log_prob poses/s':>18}{'nll fwd+bwd b=1 ms':>20}{'sample 1024 ms':>16}")
    for name in contenders:
        prior = models.get(name)
        module = prior if prior is not None else peer if name == ZUKO else None
        params = f"{sum(p.numel() for p in module.parameters())}" if module is not None else ""
        sample = ""
        if prior is not None:
            ts = timed(lambda p=prior: p.sample(1024, generator=torch.Generator().manual_seed(0)), 5)
            sample = f"{1000 * ts:.1f}"
        rate, lat = statistics.median(throughput[name]), statistics.median(latency[name])
        print(f"{name:<40}{params:>9}{rate:>18.0f}{1000 * lat:>20.3f}{sample:>16}")

    def ratios(a: dict[str, list[float]], num: str, den: str) -> list[float]:
        return [p / q for p, q in zip(a[num], a[den], strict=True)]

    print("\nratios: median [min, max] over the rounds")
    if zuko is not None:
        print(
            f"  global_flow / zuko RealNVP log_prob throughput: {spread(ratios(throughput, GLOBAL, ZUKO))}"
            " (target >= 1.5)"
        )
        print(f"  zuko / global_flow batch-1 nll fwd+bwd latency: {spread(ratios(latency, ZUKO, GLOBAL))}")
    gl = [1000 * t for t in latency[GLOBAL]]
    print(
        f"  global_flow batch-1 nll fwd+bwd: {statistics.median(gl):.3f} ms [{min(gl):.3f}, {max(gl):.3f}]"
        " (target <= 0.5 ms)"
    )
    gs = [1000 * t for t in latency["gaussian"]]
    print(f"  gaussian batch-1 nll fwd+bwd (the per-call floor): {statistics.median(gs):.3f} ms")
    print(f"  joint_flow cost per pose / global_flow: {spread(ratios(throughput, GLOBAL, JOINT))} (target <= 2)")
    print(f"  joint_flow batched / per-joint loop, batch {args.batch}: {spread(ratios(throughput, JOINT, LOOP))}")
    print(
        f"  joint_flow batched / per-joint loop, batch-1 nll fwd+bwd: {spread(ratios(latency, LOOP, JOINT))}"
        " (target >= 10)"
    )

    print("\nbundled models")
    print(f"{'name':<16}{'params':>10}{'load ms':>10}{'log_prob poses/s':>18}{'nll fwd+bwd b=1 ms':>20}")
    for name in posepriors.list_models():
        start = time.perf_counter()
        prior = posepriors.load(name)
        load_ms = 1000 * (time.perf_counter() - start)
        pose = prior.sample(args.batch, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            t = timed(lambda p=prior, q=pose: p.log_prob(q), 3, warmup=1)
        t1 = timed(nll_step(prior.log_prob, pose[:1]), 3 * args.repeat)
        params = sum(p.numel() for p in prior.parameters())
        print(f"{name:<16}{params:>10}{load_ms:>10.1f}{args.batch / t:>18.0f}{1000 * t1:>20.3f}")
        if args.compile and name in ("global_flow", "joint_flow"):
            compiled_nll = torch.compile(prior.nll, dynamic=False)
            compiled_step = nll_step(lambda p, f=compiled_nll: -f(p), pose[:1])
            start = time.perf_counter()
            compiled_step()  # compiles
            compile_s = time.perf_counter() - start
            tc = timed(compiled_step, 3 * args.repeat)
            print(
                f"  torch.compile(prior.nll): {1000 * tc:.3f} ms ({t1 / tc:.1f}x eager), {compile_s:.0f} s to compile"
            )
    posepriors.set_validation(True)


if __name__ == "__main__":
    main()
