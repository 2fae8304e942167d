"""Validation NLL of global_flow against a zuko neural spline flow trained for the same wall time.

    python benchmarks/nll_vs_zuko.py [--data ../shared/data] [--seconds 300] [--threads 2]

Both flows model the 63-D body pose (21 joints, axis-angle; density w.r.t. Lebesgue measure on those
coordinates, nats per pose) of ``body_train.npz`` and are scored on ``body_val.npz``. Same optimiser (Adam, lr
1e-3, cosine decay over the budget), same batch size, same wall-clock budget, same threads; the zuko flow gets the
data standardised per coordinate (its NLL is mapped back to the raw coordinates by adding ``sum(log std)``), the
same help that global_flow's ActNorm initialisation gives. The Gaussian and SMPLify's GMM (``--gmm``) are printed
for reference. Needs ``pip install zuko`` (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from posepriors.data import load_poses
from posepriors.priors import GaussianConfig, GaussianPrior, GlobalFlowConfig, GlobalFlowPrior, GMMPrior


def train_for(
    loss_fn: Callable[[Tensor], Tensor], params: list[nn.Parameter], data: Tensor, seconds: float, batch: int
) -> int:
    """Adam + cosine learning-rate decay over a wall-clock budget; returns the number of steps taken."""
    optimizer = torch.optim.Adam(params, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    start, steps = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < seconds:
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * min(elapsed / seconds, 1.0)))
        idx = torch.randint(len(data), (batch,), generator=g)
        loss = loss_fn(data[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        steps += 1
    return steps


@torch.no_grad()
def mean_nll(log_prob: Callable[[Tensor], Tensor], data: Tensor) -> float:
    return -torch.cat([log_prob(chunk) for chunk in data.split(4096)]).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--gmm", type=Path, default=Path("../shared/baselines/smplify_gmm_08.npz"))
    parser.add_argument("--seconds", type=float, default=300.0, help="training wall time per flow")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import zuko

    body = "body"
    train = load_poses(args.data / "body_train.npz").poses[:, 1:22]
    val = load_poses(args.data / "body_val.npz").poses[:, 1:22]
    print(f"body_train {tuple(train.shape)}, body_val {tuple(val.shape)}; {args.seconds:.0f} s per flow\n")
    rows = []

    gaussian = GaussianPrior(GaussianConfig(joints=body)).fit(train)
    params = sum(p.numel() for p in gaussian.parameters())
    rows.append(("gaussian (closed form)", params, 0, mean_nll(gaussian.log_prob, val)))
    if args.gmm.exists():
        gmm = GMMPrior.from_smplify(args.gmm)
        rows.append(("SMPLify GMM (8 components)", 0, 0, mean_nll(gmm.log_prob, val)))

    ours = GlobalFlowPrior(
        GlobalFlowConfig(joints=body, hidden=args.hidden, num_layers=args.layers, coupling="spline", bins=8)
    )
    ours.initialize_from_data(train)
    flat_train = train.reshape(len(train), -1)
    steps = train_for(ours.training_loss, list(ours.parameters()), train, args.seconds, args.batch)
    ours.eval()
    params = sum(p.numel() for p in ours.parameters())
    rows.append(
        (
            f"posepriors global_flow (spline, hidden {args.hidden}, K {args.layers})",
            params,
            steps,
            mean_nll(ours.log_prob, val),
        )
    )

    mean, std = flat_train.mean(0), flat_train.std(0)
    peer = zuko.flows.NSF(63, transforms=args.layers, bins=8, hidden_features=(args.hidden,))
    steps = train_for(
        lambda b: -peer().log_prob((b - mean) / std).mean(),
        list(peer.parameters()),
        flat_train,
        args.seconds,
        args.batch,
    )
    peer.eval()
    shift = std.log().sum().item()
    nll = mean_nll(lambda b: peer().log_prob((b.reshape(len(b), -1) - mean) / std), val) + shift
    params = sum(p.numel() for p in peer.parameters())
    rows.append((f"zuko NSF (hidden {args.hidden}, {args.layers} transforms)", params, steps, nll))

    print(f"{'model':<52}{'params':>10}{'steps':>8}{'val NLL (nats, 63-D)':>22}")
    for name, params, steps, nll in rows:
        print(f"{name:<52}{params or '-':>10}{steps or '-':>8}{nll:>22.2f}")
    zuko_nll, ours_nll = rows[-1][3], rows[-2][3]
    print(f"\nglobal_flow - zuko NSF: {ours_nll - zuko_nll:+.2f} nats per pose (negative favours posepriors)")


if __name__ == "__main__":
    main()
