"""``hand_vae``: a variational auto-encoder over MANO hand poses (15 joints), one model for both hands.

Left hands are mirrored to right hands (``(x, y, z) -> (x, -y, -z)`` per joint, volume preserving) on the way in
and back on the way out, so one VAE of a right hand serves both and the two hands of a pose are independent
factors. Two variants:

- ``standard``: axis-angle in and out; the decoder is a Gaussian on the axis-angle coordinates.
- ``so3``: the encoder sees each joint's 6D rotation; the decoder gives a mean rotation (6D -> Gram-Schmidt) and
  a scale per joint, and the likelihood is an isotropic Gaussian on the tangent vector
  ``v = log(R_mu^T exp(x))``, carried over to the axis-angle coordinates by the volume factor of the exponential
  map: ``log p(x | z) = log N(v; 0, s^2 I) + log J(x) - log J(v)``, ``J(w) = 2 (1 - cos|w|) / |w|^2`` (left
  invariance of the Haar measure). The tangent Gaussian is not renormalised for its mass beyond pi, which is
  negligible for the small scales a trained model uses.

``log_prob`` is the importance-weighted bound (IWAE) with ``iwae_samples`` samples: a lower bound on
``log p(x)`` that tightens as K grows. It is deterministic and a function of the pose alone: every hand of every
pose uses the same fixed table of K standard-normal draws (seed 0, drawn on the CPU in float32), so a pose scores
the same alone, in any batch, at any position, on any device and in float32 or float64 (up to rounding), and the
bound is a smooth function of the pose (safe for L-BFGS fitting). The price of shared draws: the error of the
estimate is correlated across poses, so a mean over a data set carries the table's error (about 0.5 nats on the
shipped ``hand_vae_so3``'s validation NLL); for a metric, average ``iwae_log_prob(pose, K, generator=g)`` with
fresh draws instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from posepriors import skeleton
from posepriors.grouped import GroupedMLP
from posepriors.priors.base import (
    PoseInput,
    PosePrior,
    PriorConfig,
    _adam_argmin,
    _check_generator,
    float_tensor,
    get_validation,
    select_rows,
    split_batch,
)
from posepriors.priors.draws import categorical, randn
from posepriors.rotations import (
    axis_angle_geodesic,
    axis_angle_to_matrix,
    axis_angle_to_rotation_6d,
    exp_map_log_abs_det,
    matrix_to_axis_angle,
    mirror_axis_angle,
    rotation_6d_to_matrix,
)
from posepriors.utils import LOG_2PI, in_transform

__all__ = ["HandDecoding", "HandEncoding", "HandVAE", "HandVAEConfig"]

_HANDS = (("left", skeleton.PARTS["left_hand"]), ("right", skeleton.PARTS["right_hand"]))


@dataclass(frozen=True)
class HandVAEConfig(PriorConfig):
    """Settings of :class:`HandVAE`.

    Attributes:
        joints: Modelled SMPL-X joints: both hands (default), or one hand's 15 joints.
        variant: ``"standard"`` (axis-angle Gaussian decoder) or ``"so3"`` (rotation-aware).
        z_dim: Latent dimension.
        hidden: Width of the encoder and decoder MLPs.
        num_hidden_layers: Hidden layers of each MLP.
        min_std: Floor of the decoder's standard deviations (radians).
        iwae_samples: Importance samples K of ``log_prob``.
        val_iwae_samples: Importance samples of the validation NLL during training.
        kl_weight: Weight of the KL term in the training loss (1: the ELBO).
    """

    joints: tuple[int, ...] = skeleton.resolve_joints("hands")
    variant: str = "standard"
    z_dim: int = 24
    hidden: int = 256
    num_hidden_layers: int = 2
    min_std: float = 0.01
    iwae_samples: int = 64
    val_iwae_samples: int = 8
    kl_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        hands = [set(idx) for _, idx in _HANDS]
        joints = set(self.joints)
        if not any(joints == h for h in hands) and joints != hands[0] | hands[1]:
            raise ValueError(
                f"hand_vae models whole hands: expected the joints of 'left_hand', 'right_hand' or both, "
                f"got {self.joints}"
            )
        if self.variant not in ("standard", "so3"):
            raise ValueError(f"expected variant 'standard' or 'so3', got {self.variant!r}")
        for name in ("z_dim", "hidden", "num_hidden_layers", "iwae_samples", "val_iwae_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.min_std) and self.min_std > 0):
            raise ValueError(f"expected a finite min_std > 0, got {self.min_std}")


@dataclass
class HandEncoding:
    """Approximate posterior q(z | hand) = N(mean, exp(log_var)).

    Attributes:
        mean: Shape (B, z_dim).
        log_var: Shape (B, z_dim).
    """

    mean: Tensor
    log_var: Tensor


@dataclass
class HandDecoding:
    """Decoder output for right hands.

    Attributes:
        pose: Mean hand pose (axis-angle), shape (B, 15, 3).
        scale: Decoder standard deviations: per coordinate (B, 15, 3) for ``standard``, per joint (B, 15) for
            ``so3``.
    """

    pose: Tensor
    scale: Tensor


class HandVAE(PosePrior):
    """VAE prior over hands (see the module docstring). Hands that are entirely missing under a mask are dropped
    (exact marginal); partly observed hands get an importance-weighted estimate of their observed joints'
    marginal (the encoder sees the hand with missing joints at the data mean, still a valid proposal)."""

    model_type = "hand_vae"
    config_class = HandVAEConfig
    exact_log_prob = False
    mask_marginals = "whole_hands"
    reconstructs = True
    training_defaults = MappingProxyType(
        {"learning_rate": 3e-4, "max_epochs": 100, "batch_size": 8192, "scheduler": "cosine"}
    )
    flag_aliases = MappingProxyType({"variant": "model_type"})

    def __init__(self, config: HandVAEConfig | None = None) -> None:
        super().__init__(config if config is not None else HandVAEConfig())
        cfg: HandVAEConfig = self.config
        position = {j: i for i, j in enumerate(cfg.joints)}
        self.hands = tuple(side for side, idx in _HANDS if idx[0] in position)
        for side, idx in _HANDS:
            if idx[0] in position:
                self.register_buffer(f"{side}_index", torch.tensor([position[j] for j in idx]), persistent=False)
        so3 = cfg.variant == "so3"
        in_features = 90 if so3 else 45
        out_features = 90 + 15 if so3 else 90
        self.encoder = GroupedMLP(
            1, in_features, 2 * cfg.z_dim, cfg.hidden, cfg.num_hidden_layers, zero_init_last=False
        )
        self.decoder = GroupedMLP(1, cfg.z_dim, out_features, cfg.hidden, cfg.num_hidden_layers, zero_init_last=False)
        self.register_buffer("input_mean", torch.zeros(in_features))
        self.register_buffer("input_std", torch.ones(in_features))
        self.register_buffer("pose_mean", torch.zeros(45))
        self.register_buffer("pose_std", torch.ones(45))

    # ------------------------------------------------------------------ hands in and out
    def _split_hands(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(B, J, 3) poses -> right-hand tensors (H*B, 15, 3) (left hands mirrored) and masks (H*B, 15)."""
        hands, masks = [], []
        for side in self.hands:
            index = getattr(self, f"{side}_index")
            hand = x.index_select(1, index)
            hands.append(mirror_axis_angle(hand) if side == "left" else hand)
            if mask is not None:
                masks.append(mask.index_select(1, index))
        return torch.cat(hands), (torch.cat(masks) if mask is not None else None)

    def _merge_hands(self, right: Tensor, batch: int) -> Tensor:
        """Inverse of :meth:`_split_hands` for (H*B, 15, 3) right hands -> (B, J, 3)."""
        out = right.new_zeros(batch, self.num_joints, 3)
        for h, side in enumerate(self.hands):
            hand = right[h * batch : (h + 1) * batch]
            out = out.index_copy(1, getattr(self, f"{side}_index"), mirror_axis_angle(hand) if side == "left" else hand)
        return out

    # ------------------------------------------------------------------ encoder / decoder
    def _features(self, hand: Tensor, mask: Tensor | None) -> Tensor:
        if mask is not None:  # missing joints at the data mean
            hand = torch.where(mask[..., None], hand, self.pose_mean.view(15, 3))
        feats = axis_angle_to_rotation_6d(hand).flatten(1) if self.config.variant == "so3" else hand.flatten(1)
        return (feats - self.input_mean) / self.input_std

    def encode(self, hand: Tensor, mask: Tensor | None = None) -> HandEncoding:
        """Approximate posterior of right hands.

        Args:
            hand: Right-hand poses (mirror left hands first), shape (*, 15, 3), a float tensor or NumPy array (run in
                the prior's dtype).
            mask: Optional observed joints, boolean, shape (*, 15) or (15,).

        Returns:
            The posterior's mean and log-variance, each (*, z_dim), in the prior's dtype.
        """
        hand = self._checked(hand, "right-hand poses", (15, 3))
        batch = hand.shape[:-2]
        if mask is not None:
            mask = torch.as_tensor(mask, device=hand.device)
            if mask.dtype != torch.bool or mask.shape not in ((15,), (*batch, 15)):
                raise ValueError(
                    f"expected a boolean mask of shape (15,) or {(*batch, 15)}, got {mask.dtype} {tuple(mask.shape)}"
                )
            mask = mask.expand(*batch, 15).reshape(-1, 15)
        out = self.encoder(self._features(hand.reshape(-1, 15, 3), mask).unsqueeze(1)).squeeze(1)
        mean, log_var = out.reshape(*batch, -1).chunk(2, dim=-1)
        return HandEncoding(mean, log_var.clamp(-12.0, 6.0))

    def decode(self, z: Tensor) -> HandDecoding:
        """Decoder mean and scale for latent codes.

        Args:
            z: Latent codes, shape (*, z_dim), a float tensor or NumPy array (run in the prior's dtype).

        Returns:
            Mean right-hand poses (*, 15, 3) and the decoder's scales, in the prior's dtype.
        """
        z = self._checked(z, "latent codes", (self.config.z_dim,))
        batch = z.shape[:-1]
        mean, scale = self._head(z)
        if self.config.variant == "so3":
            return HandDecoding(matrix_to_axis_angle(mean).reshape(*batch, 15, 3), scale.reshape(*batch, 15))
        return HandDecoding(mean.reshape(*batch, 15, 3), scale.reshape(*batch, 15, 3))

    def _checked(self, value: Any, what: str, tail: tuple[int, ...]) -> Tensor:
        """``value`` (*, *tail) as a tensor in the prior's dtype, or a clear error naming ``what``."""
        value = float_tensor(value, what, self)
        if value.dim() < len(tail) or tuple(value.shape[value.dim() - len(tail) :]) != tail:
            shape = ", ".join(["*", *map(str, tail)])
            raise ValueError(f"expected {what} of shape ({shape}), got {tuple(value.shape)}")
        # a data-dependent check, as in log_prob: off with posepriors.set_validation(False) and under torch.func
        if get_validation() and not in_transform() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"expected finite {what}, got NaN or Inf")
        return value.to(self.dtype)

    def _head(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The decoder's distribution for latent codes (*, z_dim), flattened to N = prod(*) rows.

        Returns:
            ``so3``: mean rotations (N, 15, 3, 3) and per-joint tangent scales (N, 15); ``standard``: mean poses
            (N, 15, 3) and per-coordinate scales (N, 15, 3).
        """
        out = self.decoder(z.reshape(-1, 1, z.shape[-1])).squeeze(1)
        if self.config.variant == "so3":
            rot = rotation_6d_to_matrix(out[:, :90].reshape(-1, 15, 6) + self._mean_6d())
            return rot, self._scale(out[:, 90:])
        mean = (self.pose_mean + self.pose_std * out[:, :45]).reshape(-1, 15, 3)
        return mean, self._scale(out[:, 45:] + self.pose_std.log()).reshape(-1, 15, 3)

    def _mean_6d(self) -> Tensor:
        return axis_angle_to_rotation_6d(self.pose_mean.view(15, 3))

    def _scale(self, raw: Tensor) -> Tensor:
        # softplus keeps the scale smooth and positive; the floor keeps densities finite
        return self.config.min_std + nn.functional.softplus(raw)

    def _log_likelihood(self, hand: Tensor, z: Tensor, mask: Tensor | None, noise_std: float = 0.0) -> Tensor:
        """log p(hand | z) for hands (B, 15, 3) and latents (S, B, z_dim) -> (S, B); ``noise_std`` adds observation
        noise to the decoder's scales (the likelihood of a noisy observation of the hand)."""
        S, B = z.shape[:2]
        mean, scale = self._head(z)
        scale = (scale.square() + noise_std**2).sqrt()  # (SB, 15) for so3, (SB, 15, 3) for standard
        target = repeat(hand, "b j c -> (s b) j c", s=S)
        if self.config.variant == "so3":  # mean: rotations (SB, 15, 3, 3)
            rel = matrix_to_axis_angle(mean.transpose(-1, -2) @ axis_angle_to_matrix(target))
            per_joint = (
                -0.5 * rel.square().sum(-1) / scale.square()
                - 3 * scale.log()
                - 1.5 * LOG_2PI
                + exp_map_log_abs_det(target)
                - exp_map_log_abs_det(rel)
            )
        else:
            per_joint = (-0.5 * ((target - mean) / scale).square() - scale.log() - 0.5 * LOG_2PI).sum(-1)
        per_joint = per_joint.reshape(S, B, 15)
        if mask is not None:
            per_joint = per_joint * mask
        return per_joint.sum(-1)

    # ------------------------------------------------------------------ bounds
    def _noise(
        self, k: int, batch: int, generator: torch.Generator | None, table: Tensor | None, start: int, like: Tensor
    ) -> Tensor:
        """Standard-normal draws (k, batch, z_dim): rows ``start:start + k`` of the shared ``table`` (K, z_dim),
        the same for every hand, or fresh per hand from ``generator``."""
        if table is not None:
            return table[start : start + k, None, :].expand(k, batch, -1)
        return randn((k, batch, self.config.z_dim), generator=generator, device=like.device, dtype=like.dtype)

    def _noise_table(self, num_samples: int, like: Tensor) -> Tensor:
        """The fixed draws (num_samples, z_dim) of the deterministic bounds: seed 0 on the CPU, in float32."""
        generator = torch.Generator().manual_seed(0)
        return randn((num_samples, self.config.z_dim), generator=generator, device=like.device, dtype=like.dtype)

    def _hand_bounds(
        self,
        hand: Tensor,
        mask: Tensor | None,
        num_samples: int,
        generator: torch.Generator | None,
        elbo: bool,
        fixed: bool = False,
    ) -> Tensor:
        """IWAE bound (or ELBO) per right hand (B,), chunking the K samples to bound memory. ``fixed``: use the
        fixed noise table (:meth:`_noise_table`), which makes the bound a deterministic function of each hand."""
        enc = self.encode(hand, mask)
        std = (0.5 * enc.log_var).exp()
        B, Z = enc.mean.shape
        table = self._noise_table(num_samples, hand) if fixed else None
        if elbo:
            eps = self._noise(1, B, generator, table, 0, hand)
            z = enc.mean + std * eps
            kl = 0.5 * (enc.mean.square() + std.square() - 1 - enc.log_var).sum(-1)
            return self._log_likelihood(hand, z, mask)[0] - self.config.kl_weight * kl
        chunk = max(1, min(num_samples, 2**20 // max(B, 1)))
        terms = []
        for start in range(0, num_samples, chunk):
            k = min(chunk, num_samples - start)
            eps = self._noise(k, B, generator, table, start, hand)
            z = enc.mean + std * eps
            log_prior = -0.5 * (z.square().sum(-1) + Z * LOG_2PI)
            log_q = -0.5 * (eps.square().sum(-1) + Z * LOG_2PI) - 0.5 * enc.log_var.sum(-1)
            terms.append(self._log_likelihood(hand, z, mask) + log_prior - log_q)
        return torch.logsumexp(torch.cat(terms), dim=0) - math.log(num_samples)

    def _bound(
        self,
        x: Tensor,
        mask: Tensor | None,
        num_samples: int,
        generator: torch.Generator | None,
        elbo: bool = False,
        fixed: bool = False,
    ) -> Tensor:
        hands, hand_mask = self._split_hands(x, mask)
        per_hand = self._hand_bounds(hands, hand_mask, num_samples, generator, elbo, fixed)
        if hand_mask is not None:  # hands with no observed joint drop out: an exact marginal
            per_hand = per_hand * hand_mask.any(-1)
        return per_hand.reshape(len(self.hands), x.shape[0]).sum(0)

    def _log_prob(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return self._bound(x, mask, self.config.iwae_samples, None, fixed=True)

    def iwae_log_prob(
        self, pose: Any, num_samples: int, *, generator: torch.Generator | None = None, layout: str | None = None
    ) -> Tensor:
        """Importance-weighted lower bound on ``log p(pose)`` with ``num_samples`` samples.

        Args:
            pose: Any supported pose input, batch shape (*).
            num_samples: Number of importance samples K (>= 1; K = 1 is the ELBO in expectation).
            generator: Generator of fresh samples for every hand. Default: the fixed noise table, which makes the
                bound deterministic and a function of each pose alone (see the module docstring).
            layout: The layout of a pose tensor, as in :meth:`log_prob`.

        Returns:
            The bound, shape (*,), in the promoted dtype of the pose and the prior.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"expected an integer num_samples >= 1, got {num_samples!r}")
        _check_generator(generator)
        x, mask, batch_shape, out_dtype, _ = self._prepare_full(pose, None, layout)
        bound = self._bound(x, mask, num_samples, generator, fixed=generator is None)
        return bound.reshape(batch_shape).to(out_dtype)

    def elbo(self, pose: Any, *, generator: torch.Generator | None = None, layout: str | None = None) -> Tensor:
        """Evidence lower bound (one reparameterised sample), shape (*,).

        Args:
            pose: Any supported pose input, batch shape (*).
            generator: Generator of a fresh sample for every hand. Default: the first row of the fixed noise
                table (deterministic, a function of each pose alone).
            layout: The layout of a pose tensor, as in :meth:`log_prob`.

        Returns:
            The bound, shape (*,), in the promoted dtype of the pose and the prior.
        """
        _check_generator(generator)
        x, mask, batch_shape, out_dtype, _ = self._prepare_full(pose, None, layout)
        bound = self._bound(x, mask, 1, generator, elbo=True, fixed=generator is None)
        return bound.reshape(batch_shape).to(out_dtype)

    # ------------------------------------------------------------------ training
    def _training_loss(self, pose: Tensor, generator: torch.Generator | None) -> Tensor:
        """Negative ELBO per pose (KL weighted by ``kl_weight``), averaged over the batch."""
        return -self._bound(pose, None, 1, generator, elbo=True).mean()

    def _validation_nll(self, pose: Tensor) -> Tensor:
        """Negative IWAE bound with ``val_iwae_samples`` samples (cheaper than ``nll``; the fixed noise table, so it
        does not depend on how the validation set is batched)."""
        return -self._bound(pose, None, self.config.val_iwae_samples, None, fixed=True)

    @torch.no_grad()
    def reconstruction_error(self, pose: PoseInput) -> Tensor:
        """Mean geodesic error (degrees) of encode -> decoder mean, over the joints of every hand of the poses (any
        supported input with both hands of the prior, as in :meth:`log_prob`)."""
        x, observed, *_ = self._prepare_full(pose, None)
        if observed is not None:
            raise ValueError(
                f"reconstruction_error needs every joint of the prior ({self.num_joints} joints: "
                f"{skeleton.describe_joints(self.joints)}); the input lacks some of them"
            )
        hands, _ = self._split_hands(x, None)
        recon = self.decode(self.encode(hands).mean).pose
        return torch.rad2deg(axis_angle_geodesic(recon, hands)).mean()

    def diagnostics(self, pose: Tensor) -> dict[str, float]:
        """The reconstruction error, ``{"reconstruction_deg": ...}`` (:meth:`reconstruction_error`)."""
        return {"reconstruction_deg": self.reconstruction_error(pose).item()}

    @torch.no_grad()
    def initialize_from_data(self, pose: Tensor) -> None:
        """Set the input normalisation and the decoder's reference pose from data (B, J, 3)."""
        hands, _ = self._split_hands(pose, None)
        flat = hands.flatten(1)
        self.pose_mean.copy_(flat.mean(0))
        self.pose_std.copy_(flat.std(0).clamp_min(self.config.min_std))
        feats = axis_angle_to_rotation_6d(hands).flatten(1) if self.config.variant == "so3" else flat
        self.input_mean.copy_(feats.mean(0))
        self.input_std.copy_(feats.std(0).clamp_min(1e-3))

    # ------------------------------------------------------------------ sampling and projection
    def _sample(
        self,
        n: int,
        generator: torch.Generator | None,
        temperature: float,
        observed: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        """Decoder means of latent samples. With observations, per hand: a hand with no observed joint from the
        latent prior (the hands are independent: its conditional is its marginal); a partly observed hand by
        importance resampling (:meth:`_resampled_latents`); at temperature 0, the encoder's mean (a hidden hand:
        the latent zero)."""
        device, dtype = self.pose_mean.device, self.pose_mean.dtype
        Z, H = self.config.z_dim, len(self.hands)
        if observed is None:
            z = temperature * randn((n, H, Z), generator=generator, device=device, dtype=dtype)
            right = self.decode(rearrange(z, "n h z -> (h n) z")).pose  # hand-major, as _merge_hands reads it
            return self._merge_hands(right, n)
        B = observed.shape[0]
        hands, hand_mask = self._split_hands(observed, mask)
        hidden = ~hand_mask.any(-1)  # (H*B,) hands with no observed joint
        partial = ~hidden & ~hand_mask.all(-1)  # hands with some joints hidden
        enc = self.encode(hands, hand_mask)
        if temperature == 0:  # the modes
            z = torch.where(hidden[:, None], 0.0, enc.mean).expand(n, -1, -1)
        else:
            z = enc.mean + temperature * (0.5 * enc.log_var).exp() * randn(
                (n, H * B, Z), generator=generator, device=device, dtype=dtype
            )  # a whole hand: the encoder's posterior
            prior = temperature * randn(z.shape, generator=generator, device=device, dtype=dtype)
            z = torch.where(hidden[:, None], prior, z)
            rows = partial.nonzero().squeeze(-1)
            if len(rows):
                z[:, rows] = self._resampled_latents(
                    hands[rows], hand_mask[rows], enc.log_var[rows], n, temperature, generator
                )
        right = self.decode(z).pose  # (n, H*B, 15, 3)
        return torch.stack([self._merge_hands(right[i], B) for i in range(n)])

    CONDITIONAL_PROPOSALS = 64
    """Proposals per draw of :meth:`_resampled_latents`."""

    def _resampled_latents(
        self,
        hands: Tensor,
        mask: Tensor,
        log_var: Tensor,
        n: int,
        temperature: float,
        generator: torch.Generator | None,
    ) -> Tensor:
        """n latent draws (n, B, z_dim) per partly observed hand of ``hands`` (B, 15, 3) from the model's
        conditional given its observed joints ``mask`` (B, 15), ``p(z | x_o) ~ p(x_o | z) N(z; 0, I)`` raised to
        ``1 / temperature^2``, by importance resampling: each draw one of :attr:`CONDITIONAL_PROPOSALS` fresh
        proposals from ``N(z*, T^2 diag(s^2))``, ``z*`` the code that best explains the observed joints
        (:meth:`_fit_latent`) and ``s`` the encoder's posterior std (``log_var``), picked with weights
        ``target / q_T``. The encoder's posterior of the hand filled in at the data mean alone drew nearly the same
        hand every time; proposals shared by the draws repeated a few of them."""
        M, (B, Z) = self.CONDITIONAL_PROPOSALS, log_var.shape
        device, dtype = log_var.device, log_var.dtype
        centre = self._fit_latent(hands, mask, steps=100, lr=0.05)
        eps = randn((n * M, B, Z), generator=generator, device=device, dtype=dtype)
        z = centre + temperature * (0.5 * log_var).exp() * eps  # (n M, B, Z)
        log_target = self._log_likelihood(hands, z, mask) - 0.5 * z.square().sum(-1)
        weights = (log_target / temperature**2 + 0.5 * eps.square().sum(-1)).reshape(n, M, B)  # q_T up to a constant
        pick = categorical(torch.softmax(weights, 1).transpose(1, 2), generator)  # (n, B)
        return z.reshape(n, M, B, Z)[torch.arange(n, device=device)[:, None], pick, torch.arange(B, device=device)]

    def _fit_latent(self, hands: Tensor, mask: Tensor | None, steps: int, lr: float, noise_std: float = 0.0) -> Tensor:
        """The latent code maximising ``log p(observed | z) + log p(z)`` (Adam from the encoder mean), (B, z_dim).

        The module's parameters are not changed (gradients are taken w.r.t. the codes only)."""
        target = hands.detach()

        def objective(z: Tensor) -> Tensor:
            log_lik = self._log_likelihood(target, z.unsqueeze(0), mask, noise_std)[0]
            return -(log_lik - 0.5 * z.square().sum(-1)).sum()

        with torch.enable_grad():  # as in the loop (detached by _adam_argmin)
            start = self.encode(target, mask).mean
        return _adam_argmin(objective, start, steps, lr)

    def _project(self, x: Tensor, mask: Tensor | None, steps: int = 100, lr: float = 0.05) -> Tensor:
        """Per hand: the decoder mean of the encoder mean for a hand with every joint observed (with or without a
        mask, so that a mask of all True, or one MANO hand given alone, projects like no mask). A hand with missing
        joints: the decoder mean of the latent code that best explains its observed joints (:meth:`_fit_latent`)
        fills them in; its observed joints are kept."""
        hands, hand_mask = self._split_hands(x, mask)

        def whole(rows: Tensor | None) -> Tensor:
            return self.decode(self.encode(select_rows(hands, rows)).mean).pose

        def completed(rows: Tensor | None) -> Tensor:
            some, some_mask = select_rows(hands, rows), select_rows(hand_mask, rows)
            decoded = self.decode(self._fit_latent(some, some_mask, steps, lr)).pose
            return torch.where(some_mask[..., None], some, decoded)

        full = hand_mask.all(-1) if hand_mask is not None else hands.new_ones(hands.shape[0], dtype=torch.bool)
        return self._merge_hands(split_batch(full, whole, completed), x.shape[0])

    def _map_project(
        self, x: Tensor, mask: Tensor | None, noise_std: float, steps: int = 100, lr: float = 0.05
    ) -> Tensor:
        """MAP denoising: the latent code that best explains the noisy hand (decoder scales widened by the noise),
        then per joint the noise-weighted combination of observation and decoder mean (Wiener filter; along the
        geodesic for ``so3``). Missing joints take the decoder mean."""
        hands, hand_mask = self._split_hands(x, mask)
        decoded = self.decode(self._fit_latent(hands, hand_mask, steps, lr, noise_std))
        var = decoded.scale.square()
        if self.config.variant == "so3":
            weight = (noise_std**2 / (var + noise_std**2))[..., None]  # (B, 15, 1): pull toward the mean
            R = axis_angle_to_matrix(hands)
            rel = matrix_to_axis_angle(R.transpose(-1, -2) @ axis_angle_to_matrix(decoded.pose))
            estimate = matrix_to_axis_angle(R @ axis_angle_to_matrix(weight * rel))
        else:
            estimate = (hands * var + decoded.pose * noise_std**2) / (var + noise_std**2)
        if hand_mask is not None:
            estimate = torch.where(hand_mask[..., None], estimate, decoded.pose)
        return self._merge_hands(estimate, x.shape[0])
