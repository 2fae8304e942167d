"""The flow block protocol: checked public ``forward``/``inverse`` around unchecked ``_forward``/``_inverse``."""

from __future__ import annotations

from torch import Tensor, nn

from posepriors.grouped import check_grouped as _check_input
from posepriors.utils import LOG_2PI

__all__ = ["standard_normal_log_prob"]

# A block's internal log-determinant: (B, G) when it depends on the input, (G,) when it depends on the parameters
# only (broadcast later), None when it is zero.
_LogDet = Tensor | None


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """Log-density of a standard normal, summed over the last dim.

    Args:
        z: Latent codes, shape (B, G, D) (any leading dims).

    Returns:
        Log-densities, shape (B, G).
    """
    return z.square().sum(-1).mul(-0.5).sub(0.5 * z.shape[-1] * LOG_2PI)


def _check_context(context: Tensor | None, x: Tensor, features: int) -> None:
    """Raise ``ValueError`` unless ``context`` fits a block or flow with ``features`` context features."""
    if features == 0:
        if context is not None and context.shape[-1] != 0:
            raise ValueError(f"this flow takes no context, got a context of shape {tuple(context.shape)}")
        return
    if context is None:
        raise ValueError(f"this flow needs a context of shape (B, G, {features}), got None")
    B, G = x.shape[0], x.shape[1]
    if context.dim() != 3 or context.shape != (B, G, features):
        raise ValueError(f"expected context of shape ({B}, {G}, {features}), got {tuple(context.shape)}")


def _full_logdet(logdet: _LogDet, x: Tensor) -> Tensor:
    """An internal log-determinant as a (B, G) tensor."""
    if logdet is None:
        return x.new_zeros(x.shape[:2])
    return logdet.expand(x.shape[0], x.shape[1]) if logdet.dim() < 2 else logdet


class _Block(nn.Module):
    """Base of the flow blocks: checked public ``forward``/``inverse`` around unchecked ``_forward``/``_inverse``.

    ``_forward`` and ``_inverse`` return the output and a log-determinant of shape (B, G), (G,) or None (zero);
    :class:`FlowSequence` calls them directly and broadcasts once.
    """

    dim: int
    context_features: int = 0

    def _groups(self) -> int | None:
        """The number of groups the parameters hold (None: any)."""
        return None

    def _forward(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, _LogDet]:
        raise NotImplementedError

    def _inverse(self, z: Tensor, context: Tensor | None) -> tuple[Tensor, _LogDet]:
        raise NotImplementedError

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data to latent.

        Args:
            x: Inputs, shape (B, G, D).
            context: Conditioner inputs, shape (B, G, C), or None (ignored by blocks without a conditioner).

        Returns:
            The outputs, shape (B, G, D), and ``log |det dz/dx|`` per group, shape (B, G).
        """
        _check_input(x, self._groups(), self.dim)
        if self.context_features:
            _check_context(context, x, self.context_features)
        z, logdet = self._forward(x, context)
        return z, _full_logdet(logdet, x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Latent to data.

        Args:
            z: Latent codes, shape (B, G, D).
            context: Conditioner inputs, shape (B, G, C), or None.

        Returns:
            The inputs that map to ``z``, shape (B, G, D), and ``log |det dx/dz|`` per group, shape (B, G).
        """
        _check_input(z, self._groups(), self.dim)
        if self.context_features:
            _check_context(context, z, self.context_features)
        x, logdet = self._inverse(z, context)
        return x, _full_logdet(logdet, z)
