"""Console entry points: ``posepriors-train``, ``posepriors-eval``, ``posepriors-demo``, ``posepriors-attach``."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["attach_main", "demo_main", "eval_main", "train_main"]


def train_main(argv: Sequence[str] | None = None) -> int:
    """``posepriors-train``: see :func:`posepriors.train.main`."""
    from posepriors.train import main

    return main(argv)


def eval_main(argv: Sequence[str] | None = None) -> int:
    """``posepriors-eval``: see :func:`posepriors.evaluate.main`."""
    from posepriors.evaluate import main

    return main(argv)


def demo_main(argv: Sequence[str] | None = None) -> int:
    """``posepriors-demo``: see :func:`posepriors.demo.main`."""
    from posepriors.demo import main

    return main(argv)


def attach_main(argv: Sequence[str] | None = None) -> int:
    """``posepriors-attach``: see :func:`posepriors.attach.main`."""
    from posepriors.attach import main

    return main(argv)
