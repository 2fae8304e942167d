"""Speed of the shipped priors where users feel it, against the physical limit measured in the same run.

    python benchmarks/speed.py [--threads 2] [--rounds 5] [--steps 300] [--compile]

Three measurements, each in interleaved rounds (every contender once per round, so that the machine's drift hits
all of them alike), reported as medians and as per-round ratios ``median [min, max]``:

1. **Scoring at batch 4096** (``log_prob``, no gradient) of every shipped model, against **its own matrix
   multiplies alone**: the GEMMs (``mm``, ``addmm``, ``bmm``, ``baddbmm``) a call runs are recorded with a
   :class:`~torch.utils._python_dispatch.TorchDispatchMode` and replayed on random operands of the same shapes and
   strides. Their time is what these cores need for the model's arithmetic; the ratio is the overhead on top. With
   Numba installed (``posepriors[fast]``) the spline couplings run as fused kernels
   (:mod:`posepriors.flows._numba_spline`); the flows are also timed with them switched off (tensor ops).
2. **A fitting step's prior term**: ``nll`` forward + backward w.r.t. a body-only pose at batch 1 and 256 (and
   ``energy``, the fitting energy that :func:`posepriors.fitting.fit_keypoints` minimises, for a prior that has
   one: ``global_flow.energy``), next to the Gaussian, and for the
   flows also at batch 1 as tensor ops (the NumPy path of small CPU batches and the fused kernels switched off)
   and on the op-by-op autograd graph (every fast path switched off), and at batch 256 against the GEMMs of the
   same forward + backward, with and without the fused kernels.
3. **Keypoint fits** (:func:`posepriors.fitting.fit_keypoints`, ``--steps`` Adam steps, all 22 keypoints seen) of 1
   pose and of 256 poses per shipped body prior, next to the Gaussian and SMPLify's GMM (when
   ``../shared/baselines/smplify_gmm_08.npz`` is there): wall time per step, and with Numba the same fits with the
   forward kinematics' Numba loops switched off (:mod:`posepriors.kinematics`); then the flows' latent-space fits
   (``space="latent"``: each step decodes the body's latent code through the flow's inverse), with Numba with and
   without the spline couplings' vectorised loops (the inverse's).
4. With ``--compile``: :meth:`~posepriors.priors.base.PosePrior.compile` of the default body prior, warm-up with a
   cold and with a warm inductor cache, and its step time against eager.

Only ratios from one run are comparable: the machine matters, and a shared VM's timings drift within minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from benchmark import spread, timed  # the sibling script (run as python benchmarks/speed.py)
from torch.utils._python_dispatch import TorchDispatchMode

import posepriors
from posepriors import kinematics
from posepriors.fitting import body_keypoints, fit_keypoints
from posepriors.flows import _numba_spline, sequence
from posepriors.flows.couplings import RQSplineCoupling
from posepriors.grouped import GroupedMLP
from posepriors.priors import GMMPrior, PosePrior

ROOT = Path(__file__).resolve().parents[1]
GMM_FILE = ROOT.parent / "shared" / "baselines" / "smplify_gmm_08.npz"
BODY_PRIORS = ("gaussian", "gaussian_full", "joint_flow", "global_flow")
DEFAULT_BODY_PRIOR = "global_flow"
_GEMMS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
}


class GemmRecorder(TorchDispatchMode):
    """Records the matrix multiplies that run inside the mode (forward and backward) as replayable calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[object, tuple[object, ...], dict[str, object]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in _GEMMS:
            self.calls.append((func, tuple(_operand(a) for a in args), dict(kwargs)))
        return func(*args, **kwargs)

    def replay(self) -> Callable[[], None]:
        """A function that runs the recorded GEMMs again on fresh random operands of the same shapes and strides."""
        calls = [(func, tuple(_materialise(a) for a in args), kwargs) for func, args, kwargs in self.calls]

        def run() -> None:
            for func, args, kwargs in calls:
                func(*args, **kwargs)

        return run

    @property
    def flops(self) -> float:
        total = 0.0
        for _, args, _ in self.calls:
            a, b = args[-2], args[-1]  # the two matrix operands come last (after the bias of addmm / baddbmm)
            (a_shape, _, _), (b_shape, _, _) = a, b
            batch = a_shape[0] if len(a_shape) == 3 else 1
            total += 2.0 * batch * a_shape[-2] * a_shape[-1] * b_shape[-1]
        return total


def _operand(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), tuple(value.stride()), value.dtype)
    return value


def _materialise(value: object) -> object:
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[2], torch.dtype):
        shape, stride, dtype = value
        size = 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) if all(shape) else 0
        return torch.randn(max(size, 1), dtype=dtype).as_strided(shape, stride)
    return value


def nll_step(prior: PosePrior, pose: torch.Tensor, method: str = "nll") -> Callable[[], None]:
    """One fitting step's prior term: ``nll`` (or ``energy``, the fitting energy) forward + backward w.r.t. the
    pose."""

    def step() -> None:
        x = pose.clone().requires_grad_(True)
        getattr(prior, method)(x).sum().backward()

    return step


@contextlib.contextmanager
def no_kernels() -> Iterator[None]:
    """Switch off the fused Numba spline kernels (``flows._numba_spline.ENABLED``): the couplings run tensor ops,
    the NumPy flows of small batches NumPy ops."""
    original = _numba_spline.ENABLED
    _numba_spline.ENABLED = False
    try:
        yield
    finally:
        _numba_spline.ENABLED = original


@contextlib.contextmanager
def tensor_path() -> Iterator[None]:
    """Switch off the NumPy path of small frozen CPU batches (``flows.sequence.NUMPY_MAX_ELEMENTS``) and the fused
    kernels: the flows run as tensor ops, each coupling one autograd node."""
    original = sequence.NUMPY_MAX_ELEMENTS
    sequence.NUMPY_MAX_ELEMENTS = 0
    try:
        with no_kernels():
            yield
    finally:
        sequence.NUMPY_MAX_ELEMENTS = original


@contextlib.contextmanager
def autograd_reference() -> Iterator[None]:
    """Switch off both fast paths (the NumPy path and the couplings' one-node backward): every op is recorded by
    autograd."""
    original = GroupedMLP.has_input_vjp
    GroupedMLP.has_input_vjp = property(lambda self: False)  # type: ignore[method-assign, assignment]
    try:
        with tensor_path():
            yield
    finally:
        GroupedMLP.has_input_vjp = original  # type: ignore[method-assign]


@contextlib.contextmanager
def no_spline_loops() -> Iterator[None]:
    """Switch off the spline couplings' vectorised loops alone (``RQSplineCoupling._vectorised``): their forward and
    inverse run tensor ops, everything else (the kinematics' loop) stays as it is."""
    original = RQSplineCoupling._vectorised
    RQSplineCoupling._vectorised = lambda self, x, context=None: False
    try:
        yield
    finally:
        RQSplineCoupling._vectorised = original


@contextlib.contextmanager
def kinematics_tensor_path() -> Iterator[None]:
    """Switch off the Numba loops of the forward kinematics (:func:`posepriors.kinematics._fast_path`) alone: the
    keypoints of a fit come from the pointer-jumping tensor ops."""
    original = kinematics._fast_path
    kinematics._fast_path = lambda pose, offsets: False
    try:
        yield
    finally:
        kinematics._fast_path = original


def recorded(fn: Callable[[], object]) -> GemmRecorder:
    recorder = GemmRecorder()
    with recorder:
        fn()
    return recorder


def scoring(args: argparse.Namespace, names: list[str]) -> None:
    print(f"\n1. log_prob at batch {args.batch} (no gradient), against the model's own GEMMs replayed alone")
    contenders: dict[str, tuple[Callable[[], object], Callable[[], None], float]] = {}
    for name in names:
        prior = posepriors.load(name)
        pose = prior.sample(args.batch, generator=torch.Generator().manual_seed(0))

        def score(p: PosePrior = prior, q: torch.Tensor = pose) -> None:
            with torch.no_grad():
                p.log_prob(q)

        score()  # warm-up (the frozen flows fold their linear blocks once)
        gemms = recorded(score)
        contenders[name] = (score, gemms.replay(), gemms.flops)
    model_s: dict[str, list[float]] = {n: [] for n in contenders}
    tensor_s: dict[str, list[float]] = {n: [] for n in contenders}
    gemm_s: dict[str, list[float]] = {n: [] for n in contenders}
    kernels = _numba_spline.available()
    for _ in range(args.rounds):
        for name, (score, gemm, _) in contenders.items():
            model_s[name].append(timed(score, 3))
            if kernels:
                with no_kernels():
                    tensor_s[name].append(timed(score, 3))
            gemm_s[name].append(timed(gemm, 3))
    print(f"fused spline kernels (Numba): {'on' if kernels else 'not available: tensor ops only'}")
    header = f"{'model':<16}{'poses/s':>12}{'GEMM GFLOP':>12}{'GEMMs alone ms':>16}{'model ms':>10}  model / GEMMs"
    print(header + ("            tensor ops / GEMMs (kernels off)" if kernels else ""))
    for name, (_, _, flops) in contenders.items():
        m, g = statistics.median(model_s[name]), statistics.median(gemm_s[name])
        ratios = [a / b for a, b in zip(model_s[name], gemm_s[name], strict=True)]
        line = f"{name:<16}{args.batch / m:>12.0f}{flops / 1e9:>12.2f}{1000 * g:>16.1f}{1000 * m:>10.1f}"
        line += f"  {spread(ratios)}"
        if kernels:
            off = [a / b for a, b in zip(tensor_s[name], gemm_s[name], strict=True)]
            line += f"   {spread(off)}"
        print(line)


def fitting_terms(args: argparse.Namespace, names: list[str]) -> None:
    print("\n2. nll forward + backward w.r.t. a body-only pose (a fitting step's prior term)")
    g = torch.Generator().manual_seed(1)
    body = 0.2 * torch.randn(256, 21, 3, generator=g)
    priors = {name: posepriors.load(name) for name in names}
    flows = [n for n in names if n in ("global_flow", "joint_flow")]
    results: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)

    steps: dict[str, Callable[[], None]] = {}
    for name, prior in priors.items():
        for batch in (1, 256):
            steps[f"{name} b{batch}"] = nll_step(prior, body[:batch])
            if prior.energy_gaussian is not None:  # the fitting energy, which fit_keypoints minimises
                steps[f"{name}.energy b{batch}"] = nll_step(prior, body[:batch], "energy")
    gemms = {}
    for name in flows:
        step = steps[f"{name} b256"]
        step()
        gemms[name] = recorded(step).replay()
    for _ in range(args.rounds):
        for key, step in steps.items():
            add(key, timed(step, args.repeat if key.endswith("b1") else 5))
        for name in flows:
            with tensor_path():
                add(f"{name} b1 tensor", timed(steps[f"{name} b1"], args.repeat))
            with autograd_reference():
                for batch in (1, 256):
                    key = f"{name} b{batch}"
                    add(f"{key} autograd", timed(steps[key], args.repeat if batch == 1 else 5))
            add(f"{name} gemms", timed(gemms[name], 5))
            with no_kernels():
                add(f"{name} b256 no kernels", timed(steps[f"{name} b256"], 5))
                add(f"{name} b1 no kernels", timed(steps[f"{name} b1"], args.repeat))
    med = {k: 1000 * statistics.median(v) for k, v in results.items()}
    print(f"{'model':<20}{'b=1 ms':>10}{'b=256 ms':>10}   b=1 / gaussian")
    for name in [key[: -len(" b1")] for key in steps if key.endswith(" b1")]:
        ratio = [a / b for a, b in zip(results[f"{name} b1"], results["gaussian b1"], strict=True)]
        print(f"{name:<20}{med[f'{name} b1']:>10.3f}{med[f'{name} b256']:>10.2f}   {spread(ratio)}")
    for name in flows:
        numpy1 = [a / b for a, b in zip(results[f"{name} b1 tensor"], results[f"{name} b1"], strict=True)]
        speedup1 = [a / b for a, b in zip(results[f"{name} b1 autograd"], results[f"{name} b1"], strict=True)]
        speedup256 = [a / b for a, b in zip(results[f"{name} b256 autograd"], results[f"{name} b256"], strict=True)]
        over = [a / b for a, b in zip(results[f"{name} b256"], results[f"{name} gemms"], strict=True)]
        off = [a / b for a, b in zip(results[f"{name} b256 no kernels"], results[f"{name} gemms"], strict=True)]
        print(
            f"  {name}: op-by-op autograd {med[f'{name} b1 autograd']:.3f} ms at b=1 (fast path {spread(speedup1)} "
            f"faster), {med[f'{name} b256 autograd']:.2f} ms at b=256 (fast path {spread(speedup256)} faster)"
        )
        fused1 = [a / b for a, b in zip(results[f"{name} b1 no kernels"], results[f"{name} b1"], strict=True)]
        print(
            f"  {name}: b=1 as tensor ops (the NumPy path off) {med[f'{name} b1 tensor']:.3f} ms "
            f"(NumPy path {spread(numpy1)} faster); the NumPy path with its splines as NumPy ops (the fused kernels "
            f"off) {med[f'{name} b1 no kernels']:.3f} ms (kernels {spread(fused1)} faster)"
        )
        print(f"  {name}: b=256 forward + backward / its GEMMs alone ({med[f'{name} gemms']:.2f} ms): {spread(over)}")
        print(f"  {name}: the same with the fused kernels off ({med[f'{name} b256 no kernels']:.2f} ms): {spread(off)}")


def keypoint_fits(args: argparse.Namespace, names: list[str]) -> None:
    print(f"\n3. keypoint fits, {args.steps} Adam steps, all 22 keypoints seen: ms per step")
    g = torch.Generator().manual_seed(2)
    truth = 0.2 * torch.randn(256, 21, 3, generator=g)
    keypoints = body_keypoints(truth)
    priors: dict[str, PosePrior | None] = {"none": None}
    priors.update({name: posepriors.load(name) for name in names if name in BODY_PRIORS})
    if GMM_FILE.is_file():
        priors["smplify_gmm"] = GMMPrior.from_smplify(GMM_FILE).eval().requires_grad_(False)
    else:
        print(f"  ({GMM_FILE} not found: no SMPLify GMM)")
    per_step: dict[str, list[float]] = {}
    kernels = _numba_spline.available()
    for _ in range(args.rounds):
        for name, prior in priors.items():
            for batch in (1, 256):
                for suffix in ("", " tensor kinematics") if kernels else ("",):
                    with kinematics_tensor_path() if suffix else contextlib.nullcontext():
                        start = time.perf_counter()
                        fit_keypoints(keypoints[:batch], prior=prior, weight=2e-5, steps=args.steps)
                    per_step.setdefault(f"{name} b{batch}{suffix}", []).append(
                        (time.perf_counter() - start) / args.steps
                    )
    print(f"{'prior':<16}{'1 pose ms':>11}{'256 poses ms':>14}   1 pose / gaussian   256 poses / gaussian", end="")
    print("   kinematics' fast path: 1 pose, 256 poses faster" if kernels else "")
    for name in priors:
        r1 = [a / b for a, b in zip(per_step[f"{name} b1"], per_step["gaussian b1"], strict=True)]
        r256 = [a / b for a, b in zip(per_step[f"{name} b256"], per_step["gaussian b256"], strict=True)]
        m1 = 1000 * statistics.median(per_step[f"{name} b1"])
        m256 = 1000 * statistics.median(per_step[f"{name} b256"])
        line = f"{name:<16}{m1:>11.3f}{m256:>14.2f}   {spread(r1):<20}{spread(r256):<20}"
        if kernels:
            fast = [
                spread([a / b for a, b in zip(per_step[f"{key} tensor kinematics"], per_step[key], strict=True)])
                for key in (f"{name} b1", f"{name} b256")
            ]
            line += f"{fast[0]}, {fast[1]}"
        print(line)
    latent_fits(args, {name: priors[name] for name in ("global_flow", "joint_flow") if name in priors}, keypoints)
    if DEFAULT_BODY_PRIOR in priors:
        prior = priors[DEFAULT_BODY_PRIOR]
        method = "energy" if prior.energy_gaussian is not None else "nll"  # the term fit_keypoints minimises
        step = nll_step(prior, truth, method)
        step()
        gemm = recorded(step).replay()
        gemm_ms = 1000 * timed(gemm, 5)
        fit_ms = 1000 * statistics.median(per_step[f"{DEFAULT_BODY_PRIOR} b256"])
        print(
            f"  {DEFAULT_BODY_PRIOR}: 256-pose fitting step {fit_ms:.2f} ms = {fit_ms / gemm_ms:.2f}x the GEMMs of its "
            f"{method} forward + backward alone ({gemm_ms:.2f} ms, timed after the fits)"
        )


def latent_fits(args: argparse.Namespace, flows: dict[str, PosePrior | None], keypoints: torch.Tensor) -> None:
    """Latent-space fits of the flows (``fit_keypoints(space="latent")``), ms per step, with the spline couplings'
    vectorised loops (when Numba is installed) against their tensor ops (:func:`no_spline_loops`)."""
    if not flows:
        return
    kernels = _numba_spline.available()
    print(f"  latent-space fits (space='latent'), ms per step: 1 pose, 256 poses{' (loops off)' if kernels else ''}")
    per_step: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, prior in flows.items():
            for batch in (1, 256):
                for off in (False, True) if kernels else (False,):
                    with no_spline_loops() if off else contextlib.nullcontext():
                        start = time.perf_counter()
                        fit_keypoints(keypoints[:batch], prior=prior, weight=2e-5, steps=args.steps, space="latent")
                    per_step.setdefault(f"{name} b{batch}{' off' if off else ''}", []).append(
                        (time.perf_counter() - start) / args.steps
                    )
    for name in flows:
        line = f"  {name:<14}"
        for batch in (1, 256):
            line += f"{1000 * statistics.median(per_step[f'{name} b{batch}']):>9.2f}"
            if kernels:
                fast, slow = per_step[f"{name} b{batch}"], per_step[f"{name} b{batch} off"]
                ratios = [a / b for a, b in zip(slow, fast, strict=True)]
                line += f" ({1000 * statistics.median(slow):.2f}: {spread(ratios)} faster)"
        print(line)


_COMPILE_CHILD = """
import sys, time, statistics, torch, posepriors
torch.set_num_threads(int(sys.argv[1]))
posepriors.set_validation(False)
eager = posepriors.load(sys.argv[2])
if sys.argv[3] == "gradient":
    compiled = posepriors.load(sys.argv[2]).compile(gradient=True, options={"cpp_wrapper": True})
else:
    compiled = posepriors.load(sys.argv[2]).compile()
g = torch.Generator().manual_seed(1)
for batch in (1, 256):
    pose = 0.2 * torch.randn(batch, 21, 3, generator=g)
    def step(prior):
        x = pose.clone().requires_grad_(True)
        prior.nll(x).sum().backward()
    start = time.perf_counter()
    step(compiled)
    first = time.perf_counter() - start
    rounds = {"eager": [], "compiled": []}
    for _ in range(5):
        for name, prior in (("eager", eager), ("compiled", compiled)):
            times = []
            for _ in range(30 if batch == 1 else 5):
                start = time.perf_counter()
                step(prior)
                times.append(time.perf_counter() - start)
            rounds[name].append(statistics.median(times))
    ratio = statistics.median([a / b for a, b in zip(rounds["eager"], rounds["compiled"])])
    print(f"  b={batch}: first call {first:.1f} s, then {1000 * statistics.median(rounds['compiled']):.3f} ms "
          f"against eager {1000 * statistics.median(rounds['eager']):.3f} ms ({ratio:.2f}x)")
"""


def compiled_path(args: argparse.Namespace) -> None:
    """``prior.compile()`` and ``prior.compile(gradient=True, options={"cpp_wrapper": True})`` of the default body
    prior, each in fresh processes: with an empty inductor cache (cold) and again with the cache the first process
    left (warm)."""
    import os
    import subprocess
    import sys
    import tempfile

    for mode, call in (("default", "compile()"), ("gradient", 'compile(gradient=True, options={"cpp_wrapper": True})')):
        print(f"\n4. {DEFAULT_BODY_PRIOR}.{call}: nll forward + backward w.r.t. a body-only pose")
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
            for label in ("cold cache", "warm cache"):
                print(f" {label}:")
                command = [sys.executable, "-c", _COMPILE_CHILD, str(args.threads), DEFAULT_BODY_PRIOR, mode]
                result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
                print(result.stdout.rstrip() or result.stderr[-2000:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--repeat", type=int, default=50, help="batch-1 calls per round (median)")
    parser.add_argument("--batch", type=int, default=4096, help="batch of the scoring measurement")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps per keypoint fit")
    parser.add_argument("--only", choices=("scoring", "terms", "fits", "compile"), help="run one measurement")
    parser.add_argument("--compile", action="store_true", help="also measure prior.compile() (about 15 minutes)")
    parser.add_argument(
        "--models", nargs="+", metavar="NAME", help="only these shipped models, and gaussian (default: all)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    posepriors.set_validation(False)  # the finite-value check is a sync per call; fitting loops turn it off
    _numba_spline.LOAD_AFTER = 0  # a loop's steady state: the fused kernels from the first call
    names = posepriors.list_models()
    if args.models:
        unknown = sorted(set(args.models) - set(names))
        if unknown:
            parser.error(f"unknown models {unknown}; expected some of {list(names)}")
        names = [n for n in names if n in args.models or n == "gaussian"]  # the Gaussian: the per-call reference
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} interleaved rounds, models {list(names)}")
    try:
        if args.only in (None, "scoring"):
            scoring(args, names)
        if args.only in (None, "terms"):
            fitting_terms(args, [n for n in names if n in BODY_PRIORS])
        if args.only in (None, "fits"):
            keypoint_fits(args, names)
        if args.only == "compile" or (args.only is None and args.compile):
            compiled_path(args)
    finally:
        posepriors.set_validation(True)


if __name__ == "__main__":
    main()
