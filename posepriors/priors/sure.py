"""Stein's unbiased risk estimate (SURE): how far to trust a prior on a set of noisy poses, from those poses alone.

For ``y = x + s n`` with ``n ~ N(0, I)`` in ``d`` dimensions and a (weakly) differentiable denoiser ``f``,

    SURE(f, y) = |f(y) - y|^2 + 2 s^2 div f(y) - d s^2

is an unbiased estimate of the squared error ``|f(y) - x|^2`` (Stein 1981) that needs no clean ``x``. For the blend
``f + t (g - f)`` of two denoisers, the SURE summed over a set of poses is a quadratic in ``t``, so the weight that
minimises it has a closed form (:func:`blend_weight`). ``PosePrior.denoise(..., adaptive=True)`` uses it to blend
the flow's posterior mean towards the broad component's when the poses of a call come from a source the flow was
not trained on (dance, A-poses): the flow's correlations then pull towards AMASS poses, and the set itself says
so. The estimate is per set: its noise falls with the number of poses, so give it a clip or a capture, not a pose.

Divergences come from :func:`divergence`: Hutchinson's estimator with Rademacher probes and central differences of
the denoiser (exact for a linear denoiser with a diagonal Jacobian, unbiased up to the O(step^2) difference error
otherwise), which needs nothing but calls of the denoiser.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["blend_weight", "divergence", "probes_for", "sure"]


def divergence(
    denoiser: Callable[[Tensor], Tensor],
    y: Tensor,
    *,
    step: float,
    probes: int = 1,
    generator: torch.Generator | None = None,
    chunk_rows: int = 4096,
) -> Tensor:
    """Hutchinson's estimate of ``div f(y) = tr(df/dy)`` per point, by central differences along random signs.

    ``div f(y) ~ mean_k e_k . (f(y + h e_k) - f(y - h e_k)) / (2 h)`` with ``e_k`` uniform in ``{-1, 1}^d``.

    Args:
        denoiser: ``f``, (B, d) -> (B, d), row by row (a row's output depends on that row only).
        y: Points, shape (N, d).
        step: The difference step ``h`` (> 0), in ``y``'s units.
        probes: Random sign vectors per point (>= 1).
        generator: Generator of the signs (None: a fixed seed, so equal inputs give equal outputs; no global
            RNG is used).
        chunk_rows: Rows per call of ``denoiser``.

    Returns:
        Divergence estimates, shape (N,).

    Raises:
        ValueError: On a wrong shape or setting.
    """
    if y.dim() != 2:
        raise ValueError(f"expected points of shape (N, d), got {tuple(y.shape)}")
    if not step > 0 or probes < 1 or chunk_rows < 1:
        raise ValueError(f"expected step > 0, probes >= 1 and chunk_rows >= 1, got {step}, {probes}, {chunk_rows}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    n, d = y.shape
    signs = torch.randint(0, 2, (probes, n, d), generator=generator, device=generator.device)
    signs = (2 * signs - 1).to(device=y.device, dtype=y.dtype).reshape(probes * n, d)
    points = y.repeat(probes, 1)
    rows = torch.cat([points + step * signs, points - step * signs])
    out = torch.cat([denoiser(part) for part in rows.split(chunk_rows)])
    if out.shape != rows.shape:
        raise ValueError(f"expected the denoiser to return shape {tuple(rows.shape)}, got {tuple(out.shape)}")
    plus, minus = out.chunk(2)
    return (((plus - minus) * signs).sum(-1) / (2 * step)).reshape(probes, n).mean(0)


def sure(denoised: Tensor, y: Tensor, div: Tensor, noise_std: float) -> Tensor:
    """Stein's unbiased estimate of ``|f(y) - x|^2`` per point.

    Args:
        denoised: ``f(y)``, shape (N, d).
        y: Noisy points ``x + noise_std * n``, shape (N, d).
        div: ``div f(y)``, shape (N,).
        noise_std: The noise std ``s``.

    Returns:
        Estimated squared errors, shape (N,) (single values may be negative; their mean is unbiased).
    """
    d = y.shape[-1]
    return (denoised - y).square().sum(-1) + 2 * noise_std**2 * div - d * noise_std**2


def blend_weight(y: Tensor, f: Tensor, div_f: Tensor, g: Tensor, div_g: Tensor, noise_std: float) -> Tensor:
    """The weight ``t`` in [0, 1] of the blend ``f + t (g - f)`` that minimises the summed SURE over the set.

    The summed SURE of the blend is ``sum |f - y + t (g - f)|^2 + 2 s^2 sum (div f + t (div g - div f))`` plus a
    constant, a quadratic in ``t`` with its minimum at
    ``-[sum (f - y) . (g - f) + s^2 sum (div g - div f)] / sum |g - f|^2``, clipped to [0, 1].

    Args:
        y: Noisy points, shape (N, d).
        f: The first denoiser's output, shape (N, d).
        div_f: Its divergence, shape (N,).
        g: The second denoiser's output, shape (N, d).
        div_g: Its divergence, shape (N,).
        noise_std: The noise std ``s``.

    Returns:
        The weight of ``g``, a 0-dim tensor (0 where ``f`` and ``g`` agree everywhere). Points with a non-finite
        entry do not count (their outputs stay non-finite whatever the weight).
    """
    gap = g - f
    rows = gap.square().sum(-1)
    slopes = ((f - y) * gap).sum(-1) + noise_std**2 * (div_g - div_f)
    finite = rows.isfinite() & slopes.isfinite()
    curvature, slope = rows[finite].sum(), slopes[finite].sum()
    if not bool(curvature > 0):
        return curvature.new_zeros(())
    return (-slope / curvature).clamp(0.0, 1.0)


def probes_for(points: int, budget: int = 256, most: int = 64) -> int:
    """Probes per point so that a set of ``points`` gets about ``budget`` in all (1 to ``most`` per point): the
    set's summed divergence is what the blend weight needs, and its noise falls with the number of probes."""
    return max(1, min(most, math.ceil(budget / max(points, 1))))
