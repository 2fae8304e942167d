"""Maintainer tool: the smoothing probes of issue 10 (why the flows lose at fitting and denoising), reproducible.

    python tools/smoothing_probes.py tweedie DIR [DIR ...] [--sigma 0.1] [--broad_weight 0.1]
    python tools/smoothing_probes.py train_nc OUT [--epochs 60] [--hidden 128] [--prescale] [--levels 0 0.01 ...]
    python tools/smoothing_probes.py eval_nc DIR [--broad_weight 0.1]

- ``tweedie``: posterior-mean denoising of body poses by Tweedie's formula ``E[x | y] = y + s^2 grad log p_s(y)``,
  where ``p_s`` is the density of poses with Gaussian noise of std ``s`` on every axis-angle coordinate. A flow
  trained with ``posepriors-train global_flow --input_noise s`` models ``p_s``; with ``--broad_weight w`` it is mixed
  with the shipped ``global_flow``'s broad component convolved with the same noise (exact: each per-coordinate
  Gaussian's variance grows by ``s^2``). Errors (mean geodesic degrees) on ``body_val`` and on every source of
  ``body_ood_val``, next to the MAP ``project(noise_std=s)`` of ``gaussian`` and ``gaussian_full``.
- ``train_nc``: a body-only spline ``global_flow`` conditioned on the noise level (a noise-conditional flow): every
  training pose gets noise of std ``s`` (0 with probability 1/4, else log-uniform in [0.005, 0.15]) and the context
  ``(s / 0.1, log(s + 0.01))``; mirroring as augmentation. ``s = 0`` is the sharp density for likelihoods, larger
  ``s`` a smoothed one for fitting and denoising, from one set of weights. ``--levels`` draws ``s`` uniformly from
  a few values instead (``--levels 0.1``: a flow for a single noise level); ``--prescale`` standardises every
  coordinate by ``(x - m) / sqrt(v + s^2)`` before the flow (m, v: per-coordinate mean and variance of the mirrored
  training poses; an exact change of variables, saved as ``prescale.npz`` next to the weights).
- ``eval_nc``: its NLL at ``s = 0`` (alone and mixed with the broad component) and its Tweedie denoising at 0.1.

Training data: ``body_train.npz`` only; ``body_val`` and ``body_ood_val`` are only measured. Results of the runs of
2026-12-02 are in docs/models.md ("Why the flows lose at fitting").
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

import posepriors
from posepriors import skeleton
from posepriors.hub import save_pretrained
from posepriors.priors.broad import MarginalMixture
from posepriors.priors.global_flow import GlobalFlowConfig, GlobalFlowPrior
from posepriors.rotations import axis_angle_geodesic

BODY_DIMS = 63  # the body joints come first in the shipped global_flow's joint order
MAX_NOISE = 0.15


def noise_context(sigma: torch.Tensor) -> torch.Tensor:
    """The noise-conditional flow's context (B, 2) for noise stds (B,)."""
    return torch.stack([sigma / 0.1, torch.log(sigma + 0.01)], -1)


def body_sets(data: Path) -> dict[str, torch.Tensor]:
    """``body_val`` and each source of ``body_ood_val`` as (N, 21, 3) float32 poses."""
    ood = np.load(data / "body_ood_val.npz")
    sets = {"body_val": torch.from_numpy(np.load(data / "body_val.npz")["body_pose"]).float()}
    for source in sorted(set(ood["source"].tolist())):
        sets[source] = torch.from_numpy(ood["body_pose"][ood["source"] == source]).float()
    return sets


def broad_log_prob(sigma: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Log-density of the shipped global_flow's broad component over the body, convolved with noise ``sigma``."""
    broad = posepriors.load("global_flow").broad
    means, log_w = broad.means[:, :BODY_DIMS], broad.log_weights[:, :BODY_DIMS]
    stds = (broad.stds[:, :BODY_DIMS].square() + sigma**2).sqrt()
    return lambda x: torch.logsumexp(MarginalMixture._terms(x.flatten(1), means, stds, log_w), 1).sum(-1)


def mixed(
    log_prob: Callable[[torch.Tensor], torch.Tensor], sigma: float, weight: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``log((1 - w) p + w b_sigma)``, or ``log p`` for w = 0."""
    if weight == 0:
        return log_prob
    broad = broad_log_prob(sigma)
    return lambda x: torch.logaddexp(log_prob(x) + math.log1p(-weight), broad(x) + math.log(weight))


def degrees(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    return torch.rad2deg(axis_angle_geodesic(estimate, truth)).mean().item()


def tweedie(log_prob: Callable[[torch.Tensor], torch.Tensor], noisy: torch.Tensor, sigma: float) -> torch.Tensor:
    y = noisy.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(log_prob(y).sum(), y)
    return y.detach() + sigma**2 * score


def noisy_sets(sets: dict[str, torch.Tensor], sigma: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + sigma * torch.randn(v.shape, generator=g) for k, v in sets.items()}


def run_tweedie(args: argparse.Namespace) -> None:
    sets = body_sets(args.data)
    noisy = noisy_sets(sets, args.sigma)
    print("noisy", {k: round(degrees(noisy[k], v), 2) for k, v in sets.items()})
    for name in ("gaussian", "gaussian_full"):
        prior = posepriors.load(name)
        out = {
            k: degrees(prior.project({"body_pose": noisy[k]}, noise_std=args.sigma)[:, :21], v) for k, v in sets.items()
        }
        print(f"{name} MAP", {k: round(v, 2) for k, v in out.items()})
    for folder in args.dirs:
        flow = posepriors.load(folder)
        log_prob = mixed(lambda x, flow=flow: flow.log_prob({"body_pose": x}), args.sigma, args.broad_weight)
        out = {k: degrees(tweedie(log_prob, noisy[k], args.sigma), v) for k, v in sets.items()}
        print(f"{folder} Tweedie (broad weight {args.broad_weight})", {k: round(v, 2) for k, v in out.items()})


def draw_noise(n: int, generator: torch.Generator) -> torch.Tensor:
    """Noise stds: 0 with probability 1/4, else log-uniform in [0.005, MAX_NOISE]."""
    sigma = torch.empty(n).uniform_(math.log(0.005), math.log(MAX_NOISE), generator=generator).exp()
    return torch.where(torch.rand(n, generator=generator) < 0.25, torch.zeros(n), sigma)


class NoiseConditional:
    """``log p(x | s)`` of a noise-conditional flow, with the optional per-coordinate pre-scaling."""

    def __init__(
        self, flow: GlobalFlowPrior, mean: torch.Tensor | None = None, var: torch.Tensor | None = None
    ) -> None:
        self.flow, self.mean, self.var = flow, mean, var

    @classmethod
    def load(cls, folder: Path) -> NoiseConditional:
        flow = posepriors.load(folder)
        if not (folder / "prescale.npz").exists():
            return cls(flow)
        stats = np.load(folder / "prescale.npz")
        return cls(flow, torch.from_numpy(stats["mean"]), torch.from_numpy(stats["var"]))

    def scale(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The flow's input and the log-determinant of the pre-scaling (0 without one)."""
        if self.mean is None:
            return x, x.new_zeros(len(x))
        std = (self.var + sigma[:, None, None] ** 2).sqrt()
        return (x - self.mean) / std, -std.log().flatten(1).sum(-1)

    def log_prob(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        z, logdet = self.scale(x, sigma)
        return self.flow.log_prob(z, context=noise_context(sigma)) + logdet

    def at(self, sigma: float) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: self.log_prob(x, torch.full((len(x),), sigma))


def run_train_nc(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    config = GlobalFlowConfig(
        joints="body", coupling="spline", bins=4, hidden=args.hidden, use_conditioning=True, context_features=2
    )
    prior = GlobalFlowPrior(config)
    train = torch.from_numpy(np.load(args.data / "body_train.npz")["body_pose"]).float()
    model = NoiseConditional(prior)
    if args.prescale:
        both = torch.cat([train, skeleton.mirror_pose(train, prior.joints)])
        model.mean, model.var = both.mean(0), both.var(0)
    levels = None if args.levels is None else torch.tensor(args.levels)

    def draw(n: int) -> torch.Tensor:
        if levels is None:
            return draw_noise(n, g)
        return levels[torch.randint(0, len(levels), (n,), generator=g)]

    sigma = draw(len(train))
    prior.initialize_from_data(
        model.scale(train + sigma[:, None, None] * torch.randn(train.shape, generator=g), sigma)[0],
        context=noise_context(sigma),
    )
    optimizer = torch.optim.Adam(prior.parameters(), lr=1e-3)
    steps = args.epochs * math.ceil(len(train) / args.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    tic = time.perf_counter()
    for epoch in range(args.epochs):
        prior.train()
        for rows in torch.randperm(len(train), generator=g).split(args.batch_size):
            x = train[rows]
            flip = torch.rand(len(x), generator=g) < 0.5
            x = torch.where(flip[:, None, None], skeleton.mirror_pose(x, prior.joints), x)
            sigma = draw(len(x))
            x = x + sigma[:, None, None] * torch.randn(x.shape, generator=g)
            loss = -model.log_prob(x, sigma).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}: train {loss.item():.2f} ({time.perf_counter() - tic:.0f} s)", flush=True)
    save_pretrained(prior.eval(), args.out)
    if model.mean is not None:
        np.savez(args.out / "prescale.npz", mean=model.mean.numpy(), var=model.var.numpy())
    print(f"saved {args.out}")


def run_eval_nc(args: argparse.Namespace) -> None:
    model = NoiseConditional.load(args.dirs[0])
    sets = body_sets(args.data)
    at = model.at

    with torch.no_grad():
        for w in (0.0, args.broad_weight):
            nll = {k: round(-mixed(at(0.0), 0.0, w)(v).mean().item(), 1) for k, v in sets.items()}
            print(f"NLL at noise 0, broad weight {w}", nll)
    noisy = noisy_sets(sets, args.sigma)
    for w in (0.0, args.broad_weight):
        out = {
            k: round(degrees(tweedie(mixed(at(args.sigma), args.sigma, w), noisy[k], args.sigma), v), 2)
            for k, v in sets.items()
        }
        print(f"Tweedie at {args.sigma}, broad weight {w}", out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=("tweedie", "train_nc", "eval_nc"))
    parser.add_argument("dirs", nargs="+", type=Path, help="model folders (train_nc: the output folder)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--sigma", type=float, default=0.1, help="denoising noise std (radians)")
    parser.add_argument("--broad_weight", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--prescale", action="store_true", help="train_nc: per-coordinate pre-scaling")
    parser.add_argument("--levels", type=float, nargs="+", default=None, help="train_nc: noise stds to draw from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.task == "train_nc":
        args.out = args.dirs[0]
    {"tweedie": run_tweedie, "train_nc": run_train_nc, "eval_nc": run_eval_nc}[args.task](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
