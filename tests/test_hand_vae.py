"""The ``hand_vae`` family: one VAE for both hands, the decoder's two uses, the IWAE bound, completion."""

from __future__ import annotations

import math

import pytest
import torch

from posepriors.priors import HandVAE, HandVAEConfig
from posepriors.rotations import exp_map_log_abs_det
from tests.families import check_device_and_dtype, make, synthetic_poses

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


@pytest.mark.parametrize("variant", ["standard", "so3"])
def test_hand_vae_on_the_requested_device_and_dtype(variant, device, dtype):
    """``pytest --device cuda --dtype float64`` runs this on a GPU in float64 (it skips where there is none)."""
    check_device_and_dtype(make("hand_vae" if variant == "standard" else "hand_vae_so3"), device, dtype)


@pytest.mark.parametrize("variant", ["standard", "so3"])
def test_log_prob_is_a_function_of_the_pose_alone(variant):
    torch.manual_seed(0)
    prior = HandVAE(HandVAEConfig(variant=variant, z_dim=4, hidden=16, iwae_samples=8)).eval()
    x = synthetic_poses(4, prior.joints, seed=2)
    others = 0.5 * torch.randn(3, prior.num_joints, 3, generator=torch.Generator().manual_seed(5))
    tight = {"atol": 1e-4, "rtol": 1e-6}
    with torch.no_grad():
        alone = torch.stack([prior.log_prob(x[i]) for i in range(4)])
        assert torch.isfinite(alone).all()
        assert alone.unique().numel() == 4  # different poses score differently: the checks below mean something
        torch.testing.assert_close(prior.log_prob(x), alone, **tight)  # in a batch of 4
        torch.testing.assert_close(prior.log_prob(x.flip(0)), alone.flip(0), **tight)  # order does not matter
        for position in range(4):  # among 3 other poses, at every position
            batch = torch.cat([others[:position], x[:1], others[position:]])
            torch.testing.assert_close(prior.log_prob(batch)[position], alone[0], **tight)
        copies = prior.log_prob(x[1].expand(8, -1, -1).clone())
        torch.testing.assert_close(copies, alone[1].expand(8), **tight)
        torch.testing.assert_close(prior.log_prob(x), prior.log_prob(x), atol=0, rtol=0)  # deterministic


@pytest.mark.parametrize("variant", ["standard", "so3"])
def test_fast_projection_with_a_mask_projects_every_fully_observed_hand(variant):
    """A mask of all True, or one MANO hand given alone, projects the observed hands like no mask; a hand with a
    missing joint keeps its observed joints and gets the missing one filled in."""
    torch.manual_seed(0)
    prior = HandVAE(HandVAEConfig(variant=variant, z_dim=4, hidden=16)).eval()
    prior.initialize_from_data(synthetic_poses(64, prior.joints))
    x = synthetic_poses(3, prior.joints, seed=4) + 0.2 * torch.randn(3, prior.num_joints, 3)
    plain = prior.project(x)
    assert (plain - x).abs().amax() > 1e-3  # the projection moves the hands: the checks below mean something
    torch.testing.assert_close(prior.project(x, torch.ones(prior.num_joints, dtype=torch.bool)), plain)
    right = x[:, 15:]  # prior.joints: the left hand, then the right one
    torch.testing.assert_close(prior.project(right, layout="mano_right")[:, 15:], plain[:, 15:])
    mask = torch.ones(prior.num_joints, dtype=torch.bool)
    mask[17] = False  # one joint of the right hand missing
    out = prior.project(x, mask, steps=5)
    torch.testing.assert_close(out[:, :15], plain[:, :15])  # the left hand: projected as without a mask
    torch.testing.assert_close(out[:, mask][:, 15:], x[:, mask][:, 15:], atol=0, rtol=0)  # right: observed kept
    assert (out[:, 17] - x[:, 17]).abs().amax() > 1e-3


def test_encode_decode_and_to_smplx_check_their_arguments():
    prior = HandVAE(HandVAEConfig(z_dim=4, hidden=16)).eval()
    hand = synthetic_poses(2, prior.joints)[:, 15:]  # right hands
    with torch.no_grad():
        torch.testing.assert_close(prior.encode(hand.double()).mean, prior.encode(hand).mean)  # run in float32
        torch.testing.assert_close(prior.encode(hand.numpy()).mean, prior.encode(hand).mean)
        torch.testing.assert_close(
            prior.encode(hand, torch.ones(15, dtype=torch.bool)).mean,
            prior.encode(hand, torch.ones(2, 15, dtype=torch.bool)).mean,
        )
        assert prior.decode(torch.zeros(3, 4, dtype=torch.float64)).pose.dtype == torch.float32
        # any batch shape, as decode takes (before: (*, 15, 3) in one message and (B, 15, 3) in the next)
        batched = prior.encode(hand.reshape(1, 2, 15, 3), torch.ones(1, 2, 15, dtype=torch.bool))
        assert batched.mean.shape == (1, 2, 4)
        torch.testing.assert_close(batched.mean[0], prior.encode(hand).mean)
        assert prior.encode(hand[0]).mean.shape == (4,)
    for call, error, match in [
        (lambda: prior.encode(hand.long()), TypeError, "right-hand poses as floating-point values"),
        (lambda: prior.encode(hand[:, :14]), ValueError, r"shape \(\*, 15, 3\), got \(2, 14, 3\)"),
        (lambda: prior.encode(hand, torch.ones(2, 15)), ValueError, "boolean mask"),
        (lambda: prior.encode(hand, torch.ones(3, 15, dtype=torch.bool)), ValueError, r"\(15,\) or \(2, 15\)"),
        (lambda: prior.decode(torch.zeros(2, 5)), ValueError, r"latent codes of shape \(\*, 4\), got \(2, 5\)"),
        (lambda: prior.decode([0.0] * 4), TypeError, "got list"),
        (lambda: prior.to_smplx([0.0]), TypeError, "got list"),
    ]:
        with pytest.raises(error, match=match):
            call()
    assert prior.to_smplx(synthetic_poses(2, prior.joints).numpy()).shape == (2, 55, 3)


@pytest.mark.parametrize("name", ["hand_vae", "hand_vae_so3"])
def test_conditional_draws_of_a_hidden_hand_are_its_marginal_and_a_partial_hand_is_resampled(name):
    """The VAE's hands are independent, so a hidden hand given the other one is drawn from the latent prior: its
    draws spread like unconditional draws (before: the encoder's posterior of the hand filled in at the data mean,
    0.04 rad against 0.25). A partly observed hand's latent is drawn by importance resampling: its draws are all
    distinct, keep the observed joints, and are reproducible with a generator."""
    import posepriors

    prior = posepriors.load(name)
    g = torch.Generator().manual_seed(0)
    free = prior.sample(400, generator=g)[:, :15].std(0).mean()
    right = prior.sample(1, generator=g)[0, 15:].reshape(1, 45)
    hidden = prior.sample(400, generator=g, observed={"right_hand_pose": right})[:, 0, :15].std(0).mean()
    assert 0.8 < float(hidden / free) < 1.25
    cold = prior.sample(2, temperature=0.0, observed={"right_hand_pose": right})[0, 0, :15]
    torch.testing.assert_close(cold, prior.sample(1, temperature=0.0)[0, :15])  # the latent zero's hand
    pose = prior.sample(3, generator=g)
    mask = torch.ones(prior.num_joints, dtype=torch.bool)
    mask[27:30] = False  # the right thumb
    draws = [prior.sample(16, generator=torch.Generator().manual_seed(1), observed=pose, mask=mask) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    assert torch.equal(draws[0][:, :, mask], pose[:, mask].expand(16, -1, -1, -1))
    assert draws[0][:, :, ~mask].std(0).mean() > 1e-3
    distinct = torch.unique(draws[0][:, 0, ~mask].reshape(16, -1), dim=0).shape[0]
    assert distinct == 16  # fresh proposals per draw (shared ones repeated a few of them)
    with torch.inference_mode():  # its latent fit runs on copies with autograd switched back on, as project's
        again = prior.sample(16, generator=torch.Generator().manual_seed(1), observed=pose, mask=mask)
    assert torch.equal(again, draws[0])


def test_reconstruction_error_reads_any_pose_input_and_encode_refuses_non_finite_hands():
    """reconstruction_error takes what log_prob takes (a dict, the prior's own joints) and names what is missing;
    encode and decode refuse NaN (before: NaN codes and poses came out silently)."""
    import posepriors

    prior = posepriors.load("hand_vae")
    pose = prior.sample(4, generator=torch.Generator().manual_seed(0))
    own = prior.reconstruction_error(pose)
    as_dict = prior.reconstruction_error({"left_hand_pose": pose[:, :15], "right_hand_pose": pose[:, 15:]})
    torch.testing.assert_close(own, as_dict)
    with pytest.raises(ValueError, match="reconstruction_error needs every joint"):
        prior.reconstruction_error({"right_hand_pose": pose[:, 15:]})
    with pytest.raises(ValueError, match="expected finite right-hand poses"):
        prior.encode(torch.full((1, 15, 3), float("nan")))
    with pytest.raises(ValueError, match="expected finite"):
        prior.decode(torch.full((1, prior.config.z_dim), float("nan")))


def test_vae_finite_check_follows_the_validation_switch_and_torch_func():
    """encode/decode's finite check is data-dependent like log_prob's: skipped under torch.func.vmap (which gives
    the plain call's numbers with randomness="same") and with validation off (a NaN pose then scores NaN alone)."""
    import posepriors

    prior = posepriors.load("hand_vae")
    x = prior.sample(4, generator=torch.Generator().manual_seed(0))
    mapped = torch.func.vmap(lambda p: prior.nll(p[None])[0], randomness="same")(x)
    torch.testing.assert_close(mapped, prior.nll(x))
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    with posepriors.validation(False):
        scores = prior.nll(bad)
    assert scores[0].isnan() and bool(scores[1:].isfinite().all())
