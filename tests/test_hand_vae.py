"""The ``hand_vae`` family: one VAE for both hands, the decoder's two uses, the IWAE bound, completion."""

from __future__ import annotations

import math

import pytest
import torch

from posepriors.priors import HandVAE, HandVAEConfig
from posepriors.rotations import exp_map_log_abs_det
from tests.families import synthetic_poses

LOG_2PI = math.log(2 * math.pi)


@pytest.mark.parametrize("variant", ["standard", "so3"])
def test_decode_and_the_likelihood_read_the_same_decoder_head(variant):
    torch.manual_seed(0)
    vae = HandVAE(HandVAEConfig(variant=variant, z_dim=4, hidden=16)).double()
    vae.initialize_from_data(synthetic_poses(64, vae.joints).double())
    z = torch.randn(5, 4, dtype=torch.float64)
    decoded = vae.decode(z)
    assert decoded.pose.shape == (5, 15, 3)
    assert decoded.scale.shape == ((5, 15) if variant == "so3" else (5, 15, 3))
    # at the decoder mean the Gaussian's exponent vanishes: only the normalisers remain
    log_lik = vae._log_likelihood(decoded.pose, z[None], None)[0]
    if variant == "so3":
        expected = (-3 * decoded.scale.log() - 1.5 * LOG_2PI + exp_map_log_abs_det(decoded.pose)).sum(-1)
    else:
        expected = (-decoded.scale.log() - 0.5 * LOG_2PI).sum((-1, -2))
    torch.testing.assert_close(log_lik, expected, atol=1e-8, rtol=1e-8)
    # observation noise widens the scales the same way in both paths
    noisy = vae._log_likelihood(decoded.pose, z[None], None, noise_std=0.1)[0]
    wide = (decoded.scale.square() + 0.01).sqrt()
    if variant == "so3":
        expected = (-3 * wide.log() - 1.5 * LOG_2PI + exp_map_log_abs_det(decoded.pose)).sum(-1)
    else:
        expected = (-wide.log() - 0.5 * LOG_2PI).sum((-1, -2))
    torch.testing.assert_close(noisy, expected, atol=1e-8, rtol=1e-8)
