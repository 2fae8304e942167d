"""Random draws from an optional ``torch.Generator`` that may live on another device than the result.

Every draw of the package goes through these, so that a generator gives the same draws for any result device and
dtype, and nothing touches the global RNG when a generator is given.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["categorical", "rand", "randn"]


def randn(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """Standard normal noise on ``device`` drawn from ``generator`` (which may live on another device).

    The draws are made in float32 and then cast, so that float32 and float64 priors given the same generator see
    the same noise.
    """
    if generator is None:
        return torch.randn(shape, device=device).to(dtype)
    return torch.randn(shape, generator=generator, device=generator.device).to(device=device, dtype=dtype)


def rand(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Uniform [0, 1) draws in ``dtype`` on ``device`` from ``generator`` (which may live on another device); float32
    on MPS, which has no float64."""
    if torch.device(device).type == "mps" and dtype == torch.float64:
        dtype = torch.float32
    if generator is None:
        return torch.rand(shape, device=device, dtype=dtype)
    return torch.rand(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def categorical(probs: Tensor, generator: torch.Generator | None, u: Tensor | None = None) -> Tensor:
    """Indices drawn from the categorical distributions ``probs`` (*, K) (rows need not be normalised), shape (*,);
    ``u`` (*,) are the uniform draws to use (default: fresh ones from ``generator``)."""
    if u is None:
        u = rand(tuple(probs.shape[:-1]), generator, probs.device)
    shape = torch.broadcast_shapes(u.shape, probs.shape[:-1])
    cdf = probs.cumsum(-1)
    cdf = (cdf / cdf[..., -1:]).expand(*shape, probs.shape[-1]).contiguous()
    u = u.to(cdf.dtype).expand(shape).unsqueeze(-1).contiguous()
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_max(probs.shape[-1] - 1)
