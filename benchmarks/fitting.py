"""Keypoint-fitting benchmark: each prior as the regulariser of a body fit to noisy or partly hidden 3D keypoints.

    python benchmarks/fitting.py [--prior NAME_OR_FOLDER ...] [--steps 200] [--optimizer adam] [--max_poses 300]
        [--per_source 50] [--tune_poses 100] [--seed 0] [--threads 2] [--out fitting.json]

Protocol (docs/models.md, "Fitting benchmark protocol"):

- Poses: ``--max_poses`` seeded poses of ``body_val.npz`` and at most ``--per_source`` seeded poses of every source of
  ``body_ood_val.npz``; the prior weight is tuned on ``--tune_poses`` seeded poses of ``body_train.npz`` (never on a
  validation file).
- Keypoints: the 22 body keypoints (SMPL-X joints 0..21) of the true body pose on the approximate skeleton of
  ``posepriors.kinematics`` (root at identity, pelvis at the origin), plus Gaussian noise per coordinate.
- Scenarios: ``all_1.5cm`` (every keypoint, 1.5 cm noise), ``all_4cm`` (4 cm), ``hidden_1.5cm`` (1.5 cm, the left
  arm's elbow and wrist and the right leg's knee, ankle and foot keypoints hidden: the descendants of the left
  shoulder and the right hip).
- Fit: :func:`posepriors.fitting.fit_keypoints`, Adam (``--optimizer adam``, ``--lr``, the default) for ``--steps``
  steps, or L-BFGS (``--optimizer lbfgs``) for at most ``--steps`` iterations, from the zero pose on the 21 body joint
  rotations, every pose of a data set in one batch; loss = mean squared error of the visible keypoints + w *
  ``prior.energy`` of the body pose (hands marginalised; the prior's fitting energy, its NLL for every prior but
  the shipped ``global_flow``). ``--space latent``: priors with a body latent space (the flows)
  fit their latent code instead, loss = keypoint term + w * |z|^2 / 2, from the code of the zero pose.
- Weight: w = m * 2 s^2 / K (s the noise std, K the visible keypoints: the weight of the MAP objective) with the
  multiplier m from ``--grid`` that gives the lowest mean joint-angle error on the tuning poses, then frozen. By
  default (``--tune shared``) one m per prior is tuned in the ``all_1.5cm`` scenario and used in every scenario (the
  MAP scaling carries it over to other noise levels and hidden keypoints); ``--tune per_scenario`` tunes m in every
  scenario (about 1.5x the run time).
- Metrics per prior x scenario x data set (body_val, pooled body_ood_val, each source): joint-angle error (mean
  geodesic degrees over the 21 body joints), MPJPE (mm, joints 1..21 against the noise-free keypoints), the hidden
  keypoints' MPJPE (mm), and how often the fit's objective ends below its value at the true pose.
- Uncertainty: every prior against ``--reference`` (``gaussian``) on the same poses and noise, as 95% paired
  bootstrap intervals (``--bootstrap`` resamples of each data set's poses, seeded; pooled ``body_ood_val`` resampled
  per source): the joint-angle difference (deg) and, with hidden keypoints, the cut of the hidden keypoints' MPJPE,
  ``1 - mean(prior) / mean(reference)``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import posepriors
from posepriors import skeleton
from posepriors.fitting import BODY_KEYPOINTS, DEFAULT_STEPS, body_keypoints, fit_keypoints
from posepriors.priors import GMMPrior, PosePrior
from posepriors.rotations import axis_angle_geodesic

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_GMM = ROOT.parent / "shared" / "baselines" / "smplify_gmm_08.npz"
DEFAULT_PRIORS = ("none", "gaussian", "smplify_gmm", "joint_flow", "global_flow")


def strict_descendants(name: str) -> list[int]:
    """Body keypoints (SMPL-X joints 0..21) below joint ``name`` in the tree."""
    start = skeleton.SMPLX_JOINT_NAMES.index(name)
    out: list[int] = []
    for j in range(start + 1, BODY_KEYPOINTS):  # parents precede children
        parent = skeleton.SMPLX_PARENTS[j]
        if parent == start or parent in out:
            out.append(j)
    return out


HIDDEN = strict_descendants("left_shoulder") + strict_descendants("right_hip")  # [18, 20] + [5, 8, 11]


@dataclass(frozen=True)
class Scenario:
    name: str
    noise_m: float
    hidden: tuple[int, ...] = ()

    def visible(self, device: torch.device) -> torch.Tensor:
        mask = torch.ones(BODY_KEYPOINTS, dtype=torch.bool, device=device)
        mask[list(self.hidden)] = False
        return mask

    def map_weight(self) -> float:
        """The prior weight of the MAP objective under the keypoint noise: 2 s^2 / K."""
        return 2 * self.noise_m**2 / (BODY_KEYPOINTS - len(self.hidden))


SCENARIOS = (
    Scenario("all_1.5cm", 0.015),
    Scenario("all_4cm", 0.04),
    Scenario("hidden_1.5cm", 0.015, tuple(sorted(HIDDEN))),
)


@dataclass
class Cell:
    prior: str
    scenario: str
    data: str
    poses: int
    weight: float
    angle_deg: float
    mpjpe_mm: float
    hidden_mpjpe_mm: float | None
    below_truth: float | None


def load_body(path: Path) -> tuple[torch.Tensor, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        pose = torch.from_numpy(np.asarray(npz["body_pose"], dtype=np.float32).reshape(-1, 21, 3))
        source = np.asarray(npz["source"]).astype(str) if "source" in npz.files else np.full(len(pose), path.stem)
    return pose, source


def pick(n: int, k: int | None, generator: torch.Generator) -> torch.Tensor:
    order = torch.randperm(n, generator=generator)
    return order if k is None else order[:k]


def load_prior(name: str, gmm: Path, device: str) -> PosePrior | None:
    if name == "none":
        return None
    if name == "smplify_gmm":
        return GMMPrior.from_smplify(gmm).to(device)
    return posepriors.load(name, device=device)


def space_of(prior: PosePrior | None, args: argparse.Namespace) -> str:
    """``--space``, for priors with a body latent space (the flows); every other prior fits in pose space."""
    if args.space == "latent" and prior is not None and hasattr(prior, "body_latent"):
        return "latent"
    return "pose"


def fit(truth, prior, weight, scenario, args, generator):
    """Fit noisy keypoints of ``truth`` (N, 21, 3); returns (fit result, clean keypoints, loss at the truth)."""
    clean = body_keypoints(truth)
    noisy = clean + scenario.noise_m * torch.randn(clean.shape, generator=generator).to(clean.device)
    visible = scenario.visible(truth.device)
    kwargs = {"prior": prior, "weight": weight, "visible": visible, "space": space_of(prior, args)}
    result = fit_keypoints(noisy, steps=args.steps, lr=args.lr, optimizer=args.optimizer, **kwargs)
    at_truth = fit_keypoints(noisy, steps=0, init=truth, **kwargs).loss
    return result, clean, at_truth


def angle_deg(pose: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean geodesic error over the 21 body joints per pose, degrees, (N,)."""
    return torch.rad2deg(axis_angle_geodesic(pose, truth)).mean(-1)


def tune(prior, scenario, tune_pose, args, seed) -> tuple[float, dict[str, float]]:
    """Grid search of the prior weight on the tuning poses (all grid points in one batched fit)."""
    weights = [m * scenario.map_weight() for m in args.grid]
    n = len(tune_pose)
    truth = tune_pose.repeat(len(weights), 1, 1)
    w = torch.tensor(weights, device=truth.device).repeat_interleave(n)
    # the same noise for every grid point
    clean = body_keypoints(tune_pose)
    g = torch.Generator().manual_seed(seed)
    noise = scenario.noise_m * torch.randn(clean.shape, generator=g).to(clean.device)
    noisy = (clean + noise).repeat(len(weights), 1, 1)
    result = fit_keypoints(
        noisy,
        prior=prior,
        weight=w,
        visible=scenario.visible(truth.device),
        steps=args.steps,
        lr=args.lr,
        optimizer=args.optimizer,
        space=space_of(prior, args),
    )
    errors = angle_deg(result.pose, truth).reshape(len(weights), n).mean(-1).tolist()
    best = int(np.argmin(errors))
    if best in (0, len(weights) - 1):
        print(
            f"  warning: the best weight of {scenario.name} is at the edge of the grid ({args.grid[best]} x MAP); "
            "widen --grid",
            file=sys.stderr,
        )
    return weights[best], {f"{m:g}": e for m, e in zip(args.grid, errors, strict=True)}


def per_pose_errors(scenario, result, clean, truth) -> dict[str, torch.Tensor]:
    """Per-pose joint-angle error (deg), MPJPE (mm) and, with hidden keypoints, their MPJPE (mm), each (N,)."""
    dist = (result.keypoints - clean).norm(dim=-1) * 1000  # (N, 22) mm
    errors = {"angle": angle_deg(result.pose, truth), "mpjpe": dist[:, 1:].mean(-1)}
    if scenario.hidden:
        errors["hidden"] = dist[:, list(scenario.hidden)].mean(-1)
    return errors


def summarise(prior_name, scenario, weight, result, errors, at_truth, groups) -> list[Cell]:
    angle, mpjpe, hidden = errors["angle"], errors["mpjpe"], errors.get("hidden")
    below = (result.loss < at_truth).float()
    cells = []
    for data, index in groups.items():
        cells.append(
            Cell(
                prior=prior_name,
                scenario=scenario.name,
                data=data,
                poses=len(index),
                weight=weight,
                angle_deg=angle[index].mean().item(),
                mpjpe_mm=mpjpe[index].mean().item(),
                hidden_mpjpe_mm=None if hidden is None else hidden[index].mean().item(),
                below_truth=below[index].mean().item() if prior_name != "none" else None,
            )
        )
    return cells


def paired_interval(
    stat: Callable[[torch.Tensor], torch.Tensor], strata: list[torch.Tensor], resamples: int, generator: torch.Generator
) -> tuple[float, float, float]:
    """``stat`` of a data set's poses and its 95% percentile interval over bootstrap resamples of them.

    ``stat`` maps rows of pose positions (R, n) to R values; both priors see the same resampled poses (paired).
    Each stratum (positions, e.g. the poses of one source in pooled ``body_ood_val``) is resampled on its own, so
    that a resample keeps the data set's make-up."""
    rows = torch.cat([s[torch.randint(len(s), (resamples, len(s)), generator=generator)] for s in strata], 1)
    draws = stat(rows).double()
    low, high = torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return stat(torch.cat(strata)[None]).item(), low, high


def intervals(errors, priors, groups, names, reference, resamples, seed) -> list[dict[str, object]]:
    """95% paired bootstrap intervals of every prior against the ``reference`` prior per scenario and data set: the
    mean joint-angle difference (deg) and, with hidden keypoints, the cut of their MPJPE (pooled ``body_ood_val`` is
    resampled per source)."""
    out = []
    for scenario in SCENARIOS:
        base = errors.get((reference, scenario.name))
        if base is None:
            continue
        for prior in priors:
            mine = errors.get((prior, scenario.name))
            if prior == reference or mine is None:
                continue
            for data, index in groups.items():
                index = index.cpu()
                labels = names[index.numpy()]
                strata = [torch.from_numpy(np.nonzero(labels == k)[0]) for k in dict.fromkeys(labels)]
                g = torch.Generator().manual_seed(seed)  # the same resamples for every prior
                a, b = mine["angle"].cpu()[index], base["angle"].cpu()[index]
                row = {"prior": prior, "scenario": scenario.name, "data": data}
                row["angle_diff_deg"] = paired_interval(
                    lambda r, a=a, b=b: (a[r] - b[r]).mean(-1), strata, resamples, g
                )
                if "hidden" in mine:
                    h, hb = mine["hidden"].cpu()[index], base["hidden"].cpu()[index]
                    row["hidden_cut"] = paired_interval(
                        lambda r, h=h, hb=hb: 1 - h[r].mean(-1) / hb[r].mean(-1), strata, resamples, g
                    )
                out.append(row)
    return out


def intervals_markdown(rows: list[dict[str, object]], reference: str) -> str:
    """The intervals of ``body_val`` and pooled ``body_ood_val`` (every source's are in the JSON)."""
    rows = [row for row in rows if row["data"] in ("body_val", "body_ood_val")]
    if not rows:
        return ""
    lines = [
        f"### against {reference}: mean and 95% paired bootstrap interval (per source: the JSON)",
        "",
        f"| prior | scenario | data | joint-angle deg, prior - {reference} | hidden MPJPE cut |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        mean, low, high = row["angle_diff_deg"]
        cut = row.get("hidden_cut")
        text = "–" if cut is None else f"{100 * cut[0]:.1f}% [{100 * cut[1]:.1f}, {100 * cut[2]:.1f}]"
        lines.append(
            f"| {row['prior']} | {row['scenario']} | {row['data']} | {mean:+.2f} [{low:+.2f}, {high:+.2f}] | {text} |"
        )
    return "\n".join(lines + [""])


def markdown(cells: list[Cell], priors: list[str], weights: dict[str, dict[str, float]]) -> str:
    lines = []
    for scenario in SCENARIOS:
        rows = [c for c in cells if c.scenario == scenario.name]
        if not rows:
            continue
        tuned = ", ".join(f"{p} {weights[p][scenario.name]:.2g}" for p in priors if p in weights)
        what = "joint-angle deg / MPJPE mm" + (" / hidden MPJPE mm" if scenario.hidden else "")
        lines += [f"### {scenario.name} ({what}; weights: {tuned or '–'})", ""]
        lines += ["| data | poses | " + " | ".join(priors) + " |", "|---|---|" + "---|" * len(priors)]
        for data in dict.fromkeys(c.data for c in rows):
            by_prior = {c.prior: c for c in rows if c.data == data}
            best = min(c.angle_deg for c in by_prior.values())
            entries = []
            for p in priors:
                c = by_prior.get(p)
                if c is None:
                    entries.append("–")
                    continue
                a = f"{c.angle_deg:.1f}"
                a = f"**{a}**" if c.angle_deg == best else a
                text = f"{a} / {c.mpjpe_mm:.1f}"
                if c.hidden_mpjpe_mm is not None:
                    text += f" / {c.hidden_mpjpe_mm:.0f}"
                entries.append(text)
            lines.append(f"| {data} | {next(iter(by_prior.values())).poses} | " + " | ".join(entries) + " |")
        lines.append("")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--prior", action="append", default=[], help="extra prior: a model name or a folder (repeatable)"
    )
    parser.add_argument(
        "--baselines",
        default=",".join(DEFAULT_PRIORS),
        help="comma-separated built-in priors to run (none, gaussian, smplify_gmm, joint_flow, global_flow)",
    )
    parser.add_argument("--data_dir", type=Path, default=DEFAULT_DATA, help="folder with body_{train,val,ood_val}.npz")
    parser.add_argument("--gmm", type=Path, default=DEFAULT_GMM, help="SMPLify's GMM (.npz) for smplify_gmm")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="Adam steps (default 200) or the most L-BFGS iterations (default 800) per fit: fit_keypoints' defaults",
    )
    parser.add_argument(
        "--optimizer", choices=("adam", "lbfgs"), default="adam", help="fit_keypoints' optimiser (see its docs)"
    )
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: 0.05 Adam, 1 L-BFGS)")
    parser.add_argument(
        "--space",
        choices=("pose", "latent"),
        default="pose",
        help="latent: priors with a body latent space (global_flow, joint_flow) fit their latent code",
    )
    parser.add_argument("--max_poses", type=int, default=300, help="poses of body_val")
    parser.add_argument("--per_source", type=int, default=50, help="poses per source of body_ood_val at most")
    parser.add_argument("--tune_poses", type=int, default=100, help="poses of body_train for the weight tuning")
    parser.add_argument(
        "--grid",
        type=float,
        nargs="+",
        default=[0.25, 0.5, 1.0, 2.0, 4.0],
        help="prior weights to try, as multiples of the MAP weight 2 s^2 / K",
    )
    parser.add_argument(
        "--tune",
        choices=("shared", "per_scenario"),
        default="shared",
        help="one weight multiplier per prior (tuned in all_1.5cm) or one per prior and scenario",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (poses, noise)")
    parser.add_argument(
        "--bootstrap", type=int, default=2000, help="paired bootstrap resamples of the intervals against --reference"
    )
    parser.add_argument(
        "--reference", default="gaussian", help="the prior every other one is compared with in the intervals"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = DEFAULT_STEPS[args.optimizer]
    if min(args.steps, args.max_poses, args.per_source, args.tune_poses, args.bootstrap) < 1:
        parser.error("--steps, --max_poses, --per_source, --tune_poses and --bootstrap must be >= 1")
    if (args.lr is not None and not args.lr > 0) or not args.grid or min(args.grid) <= 0:
        parser.error("--lr and every --grid value must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)

    val, _ = load_body(args.data_dir / "body_val.npz")
    ood, ood_source = load_body(args.data_dir / "body_ood_val.npz")
    train, _ = load_body(args.data_dir / "body_train.npz")
    val = val[pick(len(val), args.max_poses, g)]
    ood_parts, ood_names = [], []
    for source in sorted(set(ood_source.tolist())):
        rows = torch.from_numpy(np.nonzero(ood_source == source)[0])
        ood_parts.append(ood[rows[pick(len(rows), args.per_source, g)]])
        ood_names += [source] * len(ood_parts[-1])
    tune_pose = train[pick(len(train), args.tune_poses, g)].to(device)
    truth = torch.cat([val, *ood_parts]).to(device)
    names = np.array(["body_val"] * len(val) + ood_names)
    groups = {"body_val": np.nonzero(names == "body_val")[0]}
    groups["body_ood_val"] = np.nonzero(names != "body_val")[0]
    for source in dict.fromkeys(ood_names):
        groups[source] = np.nonzero(names == source)[0]
    groups = {k: torch.from_numpy(v).to(device) for k, v in groups.items()}
    print(
        f"{len(val)} body_val poses, {len(names) - len(val)} body_ood_val poses "
        f"({', '.join(f'{k} {len(v)}' for k, v in list(groups.items())[2:])}), {len(tune_pose)} tuning poses "
        f"(body_train); {args.steps} {args.optimizer} steps, lr {args.lr or 'default'}, space {args.space}; "
        f"{torch.get_num_threads()} threads",
        file=sys.stderr,
    )

    labels = [p for p in args.baselines.split(",") if p] + list(args.prior)
    for label in labels:
        if label in DEFAULT_PRIORS or label in args.prior:
            continue
        raise SystemExit(f"unknown baseline prior {label!r}; expected names from {DEFAULT_PRIORS}")
    cells: list[Cell] = []
    errors: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    weights: dict[str, dict[str, float]] = {}
    grids: dict[str, dict[str, dict[str, float]]] = {}
    timing: dict[str, dict[str, float]] = {}
    shown: list[str] = []
    for label in labels:
        name = Path(label).name if Path(label).is_dir() else label
        if label == "smplify_gmm" and not args.gmm.is_file():
            print(f"skipping smplify_gmm: {args.gmm} not found", file=sys.stderr)
            continue
        prior = load_prior(label, args.gmm, args.device)
        shown.append(name)
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        multiplier = None
        for k, scenario in enumerate(SCENARIOS):
            weight = 0.0
            if prior is not None:
                if multiplier is None or args.tune == "per_scenario":
                    weight, grid = tune(prior, scenario, tune_pose, args, seed=args.seed * 1000 + 100 + k)
                    multiplier = weight / scenario.map_weight()
                    grids.setdefault(name, {})[scenario.name] = grid
                weight = multiplier * scenario.map_weight()
                weights.setdefault(name, {})[scenario.name] = weight
            noise = torch.Generator().manual_seed(args.seed * 1000 + k)  # the same noise for every prior
            result, clean, at_truth = fit(truth, prior, weight, scenario, args, noise)
            errors[name, scenario.name] = per_pose_errors(scenario, result, clean, truth)
            cells += summarise(name, scenario, weight, result, errors[name, scenario.name], at_truth, groups)
            body = next(c for c in cells[::-1] if c.data == "body_val" and c.scenario == scenario.name)
            print(
                f"{name:>14} {scenario.name:>13}: weight {weight:.3g}, body_val {body.angle_deg:.2f} deg, "
                f"{body.mpjpe_mm:.1f} mm ({time.perf_counter() - start_wall:.0f} s)",
                file=sys.stderr,
            )
        timing[name] = {
            "wall_s": time.perf_counter() - start_wall,
            "cpu_s": time.process_time() - start_cpu,
        }
    total = {"wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0}
    table = markdown(cells, shown, weights)
    print(table)
    if args.reference not in shown:
        print(f"no intervals: the reference prior {args.reference!r} was not run ({', '.join(shown)})", file=sys.stderr)
    spreads = intervals(errors, shown, groups, names, args.reference, args.bootstrap, args.seed)
    print(intervals_markdown(spreads, args.reference))
    print(
        f"time: {total['wall_s']:.0f} s wall, {total['cpu_s']:.0f} s CPU ({torch.get_num_threads()} threads); "
        + ", ".join(f"{k} {v['wall_s']:.0f} s" for k, v in timing.items())
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out",)},
            "scenarios": [asdict(s) | {"map_weight": s.map_weight()} for s in SCENARIOS],
            "poses": {k: len(v) for k, v in groups.items()},
            "weights": weights,
            "tuning_angle_deg_by_multiplier": grids,
            "results": [asdict(c) for c in cells],
            "intervals_95": {"reference": args.reference, "rows": spreads},
            "time": {"total": total, "per_prior": timing, "threads": torch.get_num_threads()},
        }
        args.out.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
