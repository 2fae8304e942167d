"""Maintainer tool: how much of the hand priors' held-out NLL is the subject shift (issue 11), in closed form.

    python tools/hand_subject_shift.py [--data ../shared/data]

Full-covariance Gaussians over both hands (90-D, covariance + 1e-4 I), scored on ``hands_val`` (ARCTIC subject s9):

- fitted on all of ``hands_train`` (7 subjects), as ``gaussian_full`` is;
- the same covariance centred on s9's own mean (an oracle: what the subject's offset costs);
- fitted on s9 itself (an oracle: the within-subject density a Gaussian reaches);
- fitted on each training subject alone;
- leave-one-subject-out (LOSO) on the training subjects for covariance inflation ``c * S`` and shrinkage towards
  the diagonal, next to the same setting on s9, to see whether a held-out-subject-selected regulariser helps.

Nothing is fitted on ``hands_val`` except the two labelled oracles.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def gaussian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), np.cov(x.T, bias=True) + 1e-4 * np.eye(x.shape[1])


def nll(mean: np.ndarray, cov: np.ndarray, y: np.ndarray) -> float:
    """Mean NLL (nats per pose) of the rows of y under N(mean, cov)."""
    chol = np.linalg.cholesky(cov)
    z = np.linalg.solve(chol, (y - mean).T)
    return float((0.5 * (z**2).sum(0) + np.log(np.diag(chol)).sum() + 0.5 * y.shape[1] * np.log(2 * np.pi)).mean())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    args = parser.parse_args(argv)
    train, val = np.load(args.data / "hands_train.npz"), np.load(args.data / "hands_val.npz")

    def both(d: np.lib.npyio.NpzFile) -> np.ndarray:
        return np.concatenate([d["left_hand_pose"].reshape(-1, 45), d["right_hand_pose"].reshape(-1, 45)], 1)

    x, y, subject = both(train).astype(np.float64), both(val).astype(np.float64), train["subject"]
    mean, cov = gaussian(x)
    print(f"all training subjects: {nll(mean, cov, y):.2f} nats on s9 (both hands, 90-D)")
    print(f"  same covariance, centred on s9's mean (oracle): {nll(y.mean(0), cov, y):.2f}")
    print(f"fitted on s9 itself (oracle): {nll(*gaussian(y), y):.2f}")
    for s in np.unique(subject):
        own = gaussian(x[subject == s])
        print(f"fitted on {s} alone: {nll(*own, x[subject == s]):.1f} on itself, {nll(*own, y):.1f} on s9")
    for inflate in (1.0, 1.2, 1.5):
        for shrink in (0.0, 0.05):

            def regularise(c: np.ndarray, inflate: float = inflate, shrink: float = shrink) -> np.ndarray:
                return inflate * ((1 - shrink) * c + shrink * np.diag(np.diag(c)))

            loso = [
                nll(m, regularise(c), x[subject == s])
                for s in np.unique(subject)
                for m, c in [gaussian(x[subject != s])]
            ]
            on_s9 = nll(mean, regularise(cov), y)
            print(f"inflate {inflate}, shrink {shrink}: LOSO {np.mean(loso):.2f}, on s9 {on_s9:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
