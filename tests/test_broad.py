"""The broad component: an exact, normalised mixture ``(1 - w) p + w b`` that keeps a prior finite off its data."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import posepriors
from posepriors import skeleton
from posepriors.priors import GaussianConfig, GaussianPrior
from posepriors.priors.broad import MarginalMixture
from tests.families import make, synthetic_poses


def _grid(dim: int, points: int, half_width: float) -> tuple[torch.Tensor, float]:
    axis = torch.linspace(-half_width, half_width, points, dtype=torch.float64)
    mesh = torch.stack(torch.meshgrid(*[axis] * dim, indexing="ij"), -1).reshape(-1, dim)
    return mesh, (axis[1] - axis[0]).item() ** dim


def test_marginal_mixture_normalises_and_fits_by_em():
    g = torch.Generator().manual_seed(0)
    data = torch.cat([torch.randn(300, 2, generator=g) * 0.2 - 1, torch.randn(200, 2, generator=g) * 0.3 + 1])
    mix = MarginalMixture(2, 3).double()
    mix.fit(data.double(), min_std=0.05)
    grid, cell = _grid(2, 241, 4.0)
    total = mix.log_prob(grid).exp().sum().item() * cell
    assert total == pytest.approx(1.0, abs=1e-3)
    assert (mix.stds >= 0.05).all()
    one = MarginalMixture(2, 1).double()
    one.fit(data.double(), min_std=0.05)
    assert mix.log_prob(data.double()).mean() > one.log_prob(data.double()).mean() + 0.2  # two clusters per axis


@pytest.mark.parametrize("components", [1, 2, 3])
def test_marginal_mixture_log_prob_is_the_sum_of_per_coordinate_mixtures(components):
    """log_prob against the formula written out coordinate by coordinate in float64 (math, no tensor ops), with
    observed entries, a subset of coordinates, noise convolution, far points and gradients."""
    g = torch.Generator().manual_seed(components)
    mix = MarginalMixture(4, components).double()
    mix.means.normal_(generator=g)
    mix.stds.uniform_(0.1, 2.0, generator=g)
    mix.log_weights.copy_(torch.log_softmax(torch.randn(components, 4, generator=g, dtype=torch.float64), 0))
    x = 2 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    x[0, 1] = 1e4  # far out: finite
    observed = torch.rand(6, 4, generator=g) > 0.3
    dims = torch.tensor([3, 0])

    def reference(v, obs, coords, noise):
        out = []
        for row, seen in zip(v.tolist(), obs.tolist(), strict=True):
            total = 0.0
            for value, d, on in zip(row, coords, seen, strict=True):
                terms = []
                for k in range(components):
                    sd = math.sqrt(mix.stds[k, d].item() ** 2 + noise**2)
                    z = (value - mix.means[k, d].item()) / sd
                    log_w = mix.log_weights[k, d].item()
                    terms.append(log_w - 0.5 * z * z - math.log(sd) - 0.5 * math.log(2 * math.pi))
                top = max(terms)
                total += on * (top + math.log(sum(math.exp(t - top) for t in terms)))
            out.append(total)
        return torch.tensor(out, dtype=torch.float64)

    every = torch.ones_like(observed)
    tol = {"rtol": 1e-12, "atol": 1e-9}
    torch.testing.assert_close(mix.log_prob(x), reference(x, every, range(4), 0.0), **tol)
    torch.testing.assert_close(mix.log_prob(x, observed), reference(x, observed, range(4), 0.0), **tol)
    subset = reference(x[:, :2], every[:, :2], [3, 0], 0.3)
    torch.testing.assert_close(mix.log_prob(x[:, :2], dims=dims, noise_std=0.3), subset, **tol)
    v = x.clone()
    v[0, 1] = 0.5
    assert torch.autograd.gradcheck(lambda t: mix.log_prob(t, observed, noise_std=0.1), (v.requires_grad_(True),))


def test_marginal_mixture_coefficients_follow_changes_of_the_buffers_and_dims():
    """log_prob caches what it needs of the buffers per (dims, noise, dtype): an in-place change of a buffer or of
    ``dims``, a load_state_dict or a new dtype gives the numbers of a fresh mixture, never the cached ones."""
    g = torch.Generator().manual_seed(5)
    mix = MarginalMixture(4, 2).double()
    mix.means.normal_(generator=g)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    dims = torch.tensor([2, 1])

    def fresh(v, **kwargs):
        other = MarginalMixture(4, 2).double()
        other.load_state_dict(mix.state_dict())
        return other.log_prob(v, **kwargs)

    for _ in range(2):  # the second call from the cache
        torch.testing.assert_close(mix.log_prob(x), fresh(x), rtol=0, atol=0)
        torch.testing.assert_close(mix.log_prob(x[:, :2], dims=dims, noise_std=0.2), fresh(x[:, :2], dims=dims,
                                   noise_std=0.2), rtol=0, atol=0)  # fmt: skip
    before = mix.log_prob(x)
    with torch.no_grad():
        mix.stds.mul_(2.0)
    assert not torch.allclose(mix.log_prob(x), before)
    torch.testing.assert_close(mix.log_prob(x), fresh(x), rtol=0, atol=0)
    subset = mix.log_prob(x[:, :2], dims=dims, noise_std=0.2)
    dims[0] = 3  # in place
    changed = mix.log_prob(x[:, :2], dims=dims, noise_std=0.2)
    assert not torch.allclose(changed, subset)
    torch.testing.assert_close(changed, fresh(x[:, :2], dims=dims, noise_std=0.2), rtol=0, atol=0)
    state = {k: v + 0.1 for k, v in mix.state_dict().items()}
    mix.load_state_dict(state)
    torch.testing.assert_close(mix.log_prob(x), fresh(x), rtol=0, atol=0)
    assert mix.log_prob(x.float()).dtype == torch.float32
    torch.testing.assert_close(mix.log_prob(x.float()), fresh(x.float()))
    with torch.inference_mode():  # tensors without version counters: computed each time
        frozen = MarginalMixture(4, 2).double()
        frozen.load_state_dict(mix.state_dict())
        torch.testing.assert_close(frozen.log_prob(x), fresh(x), rtol=0, atol=0)
    # a call in inference mode caches nothing a later gradient call would trip on (inference tensors)
    prior = posepriors.load("global_flow")
    pose = torch.zeros(2, prior.num_joints, 3) + 0.05
    with torch.inference_mode():
        prior.log_prob(pose)
        prior.energy(pose)
    for method in (prior.log_prob, prior.energy):
        method(pose.clone().requires_grad_(True)).sum().backward()


def _with_broad(prior: GaussianPrior, weight: float = 0.2) -> GaussianPrior:
    mixed = GaussianPrior(dataclasses.replace(prior.config, broad_weight=weight))
    mixed.load_state_dict(prior.state_dict(), strict=False)
    return mixed


def test_a_prior_with_a_broad_component_is_the_exact_normalised_mixture():
    prior = GaussianPrior(GaussianConfig(joints=(1,), min_std=0.01)).double()  # one joint: 3-D, integrable
    data = 0.3 * synthetic_poses(400, prior.joints, seed=1).double()
    prior.fit(data)
    mixed = _with_broad(prior).double()
    mixed.fit_broad(data * 1.5)  # a broader component, so that the two parts differ
    grid, cell = _grid(3, 97, 3.0)
    pose = grid.reshape(-1, 1, 3)
    total = mixed.log_prob(pose).exp().sum().item() * cell
    assert total == pytest.approx(1.0, abs=2e-3)
    expected = torch.logaddexp(prior.log_prob(pose) + math.log(0.8), mixed.broad.log_prob(grid) + math.log(0.2))
    torch.testing.assert_close(mixed.log_prob(pose), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["gaussian", "joint_flow", "hand_vae"])
def test_the_validation_nll_is_the_mixtures(name):
    """Training selected epochs and reported a validation NLL without the broad component: with --broad_weight the
    number in metrics.json was not what the saved model scores (-27.6 against -33.4 nats in the review's run)."""
    family = make(name)
    prior = type(family)(dataclasses.replace(family.config, broad_weight=0.3)).eval()
    prior.load_state_dict(family.state_dict(), strict=False)
    x = synthetic_poses(64, prior.joints, seed=2)
    prior.fit_broad(x * 2.0)
    with torch.no_grad():
        own = family.eval().validation_nll(x)
        mixed = prior.validation_nll(x)
        broad = prior.broad.log_prob(x.flatten(1))
    torch.testing.assert_close(mixed, -torch.logaddexp(-own + math.log(0.7), broad + math.log(0.3)))
    if name != "hand_vae":  # the VAE validates on its IWAE bound (mixed, a bound still), not on the exact NLL
        torch.testing.assert_close(mixed, prior.nll(x))
    assert not torch.allclose(mixed, own)


def test_masks_give_the_mixture_of_the_marginals():
    prior = GaussianPrior(GaussianConfig(joints="body")).double()
    data = synthetic_poses(200, prior.joints, seed=2).double()
    prior.fit(data)
    mixed = _with_broad(prior, 0.1).double()
    mixed.fit_broad(data)
    mask = torch.ones(21, dtype=torch.bool)
    mask[[15, 17, 19]] = False  # the left arm hidden
    x = data[:5]
    dims = mask.repeat_interleave(3).expand(5, -1)
    expected = torch.logaddexp(
        prior.log_prob(x, mask) + math.log(0.9), mixed.broad.log_prob(x.flatten(1), dims) + math.log(0.1)
    )
    torch.testing.assert_close(mixed.log_prob(x, mask), expected, rtol=1e-6, atol=1e-6)


def test_far_from_the_data_the_mixture_stays_near_the_broad_component():
    prior = GaussianPrior(GaussianConfig(joints="body", min_std=0.01))
    data = synthetic_poses(300, prior.joints, seed=3)
    prior.fit(0.05 * data)  # a sharp family
    mixed = _with_broad(prior, 0.1)
    mixed.fit_broad(data)  # that knows the wider range
    far = data[:10]
    assert (mixed.log_prob(far) > prior.log_prob(far) + 50).all()
    near = mixed.log_prob(0.05 * data[:10]) - prior.log_prob(0.05 * data[:10])
    assert (near > math.log(0.9) - 1e-4).all()  # at most -log(1 - w) lost where the family is sharp and right


def test_sampling_mixes_and_is_reproducible(tmp_path):
    prior = GaussianPrior(GaussianConfig(joints="body"))
    data = synthetic_poses(300, prior.joints, seed=4)
    prior.fit(data)
    mixed = _with_broad(prior, 0.5)
    mixed.fit_broad(data + 1.0)  # a component far from the family's, so draws show where they came from
    draws = mixed.sample(400, generator=torch.Generator().manual_seed(0))
    from_broad = (draws.mean((1, 2)) > 0.5).float().mean().item()
    assert 0.4 < from_broad < 0.6
    again = mixed.sample(400, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    posepriors.save_pretrained(mixed, tmp_path / "m")
    loaded = posepriors.load(tmp_path / "m")
    torch.testing.assert_close(loaded.log_prob(data[:8]), mixed.eval().log_prob(data[:8]))


def test_temperature_tempers_the_broad_weight_and_zero_is_deterministic():
    from posepriors.priors.base import tempered_weight

    assert tempered_weight(0.2, 1.0) == pytest.approx(0.2)
    assert tempered_weight(0.2, 0.5) == pytest.approx(0.2**4 / (0.2**4 + 0.8**4))
    assert tempered_weight(0.2, 0.0) == 0.0 and tempered_weight(0.7, 0.0) == 1.0
    assert 0.2 < tempered_weight(0.2, 2.0) < 0.5  # hotter: towards even odds
    prior = GaussianPrior(GaussianConfig(joints="body"))
    data = synthetic_poses(300, prior.joints, seed=4)
    prior.fit(data)
    mixed = _with_broad(prior, 0.3)
    mixed.fit_broad(data + 1.0)  # far from the family's component: draws show where they came from
    cold = mixed.sample(50, generator=torch.Generator().manual_seed(0), temperature=0)
    torch.testing.assert_close(cold, prior.sample(50, temperature=0), atol=0, rtol=0)  # the family's mode, always
    cool = mixed.sample(400, generator=torch.Generator().manual_seed(0), temperature=0.5)
    assert (cool.mean((1, 2)) > 0.5).float().mean().item() < 0.05  # 0.3 -> 0.026
    broad = mixed.broad.sample(5, torch.Generator().manual_seed(1), temperature=0.0)
    assert torch.equal(broad, mixed.broad.sample(5, torch.Generator().manual_seed(2), temperature=0.0))


def test_fit_broad_needs_a_broad_component():
    with pytest.raises(ValueError, match="broad_weight 0"):
        make("gaussian").fit_broad(torch.zeros(4, 36, 3))


# ---------------------------------------------------------------------------- mirroring (an augmentation)
def test_mirroring_is_an_involution_that_maps_left_joints_to_right_ones():
    x = torch.randn(6, 55, 3, generator=torch.Generator().manual_seed(0))
    mirrored = skeleton.mirror_pose(x)
    torch.testing.assert_close(skeleton.mirror_pose(mirrored), x)
    names = skeleton.SMPLX_JOINT_NAMES
    left_wrist, right_wrist = names.index("left_wrist"), names.index("right_wrist")
    torch.testing.assert_close(mirrored[:, right_wrist], x[:, left_wrist] * torch.tensor([1.0, -1.0, -1.0]))
    for j, name in enumerate(names):
        partner = skeleton.MIRROR_JOINTS[j]
        if name.startswith("left_"):
            assert names[partner] == "right_" + name[len("left_") :]
        elif not name.startswith("right_"):
            assert partner == j
    body = skeleton.PARTS["body"]
    torch.testing.assert_close(skeleton.mirror_pose(x[:, body], body), mirrored[:, body])
    with pytest.raises(ValueError, match="closed under left-right mirroring"):
        skeleton.mirror_pose(x[:, skeleton.PARTS["left_hand"]], skeleton.PARTS["left_hand"])


def test_posepriors_attach_adds_a_broad_component_without_touching_the_weights(tmp_path, capsys):
    """``posepriors-attach`` (installed with the package): a trained prior plus a broad component, saved as a new
    folder; the family's weights are copied unchanged."""
    from posepriors import attach

    poses = synthetic_poses(200, skeleton.resolve_joints("body"), seed=0)
    source = GaussianPrior().fit(poses)
    posepriors.save_pretrained(source, tmp_path / "src")
    data = np.zeros((200, 55, 3), np.float32)
    data[:, 1:22] = poses.numpy()
    np.savez(tmp_path / "train.npz", body_pose=data[:, 1:22])
    code = attach.main(
        [
            str(tmp_path / "src"),
            str(tmp_path / "out"),
            "--data_dir",
            str(tmp_path / "train.npz"),
            "--broad_weight",
            "0.2",
        ]
    )
    assert code == 0 and "broad component (weight 0.2) fitted on 200 poses" in capsys.readouterr().out
    out = posepriors.load(tmp_path / "out")
    assert out.config.broad_weight == 0.2
    torch.testing.assert_close(out.mean, source.mean)
    x = poses[:5]
    mixed = torch.logaddexp(source.log_prob(x) + math.log(0.8), out.broad.log_prob(x.flatten(1)) + math.log(0.2))
    torch.testing.assert_close(out.log_prob(x), mixed)
    with pytest.raises(SystemExit):
        attach.main([str(tmp_path / "src"), str(tmp_path / "out2"), "--data_dir", str(tmp_path / "train.npz")])


def test_posepriors_attach_never_writes_over_a_model_and_errors_in_one_line(tmp_path, capsys):
    """It used to save over whatever OUT held (the source's own folder included: its trained model replaced in
    place) and to end every bad input in a traceback."""
    from posepriors import attach

    poses = synthetic_poses(200, skeleton.resolve_joints("body"), seed=0)
    posepriors.save_pretrained(GaussianPrior().fit(poses), tmp_path / "src")
    posepriors.save_pretrained(GaussianPrior().fit(poses[:100]), tmp_path / "other")
    np.savez(tmp_path / "train.npz", body_pose=poses.numpy())
    np.savez(tmp_path / "hands.npz", left_hand_pose=np.zeros((20, 15, 3)))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    src, new, weight = str(tmp_path / "src"), str(tmp_path / "a" / "b"), ["--broad_weight", "0.1"]
    data = ["--data_dir", str(tmp_path / "train.npz")]
    cases = [
        ([src, src, *data, *weight], "the source model's own folder"),
        ([src, str(tmp_path / "other"), *data, *weight], "expected a new or empty OUT"),
        ([src, str(tmp_path / "train.npz"), *data, *weight], "got the file"),
        ([src, new, *data, "--broad_weight", "1.5"], "broad_weight < 1"),
        ([str(tmp_path / "missing"), new, *data, *weight], "missing"),
        ([src, new, "--data_dir", str(tmp_path / "hands.npz"), *weight], "observes none of"),
    ]
    for argv, says in cases:
        with pytest.raises(SystemExit) as exit_info:
            attach.main(argv)
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in stderr, stderr
        assert stderr.startswith("posepriors-attach: error: ") and says in stderr, stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written or lost
    assert not (tmp_path / "a").exists()  # the folders a failed attach made are gone


def test_a_gmm_with_a_broad_component_completes_and_draws_from_the_mixtures_conditional():
    """``hands`` (a Gaussian mixed with a broad component): a flat right hand is far more likely under the broad
    part, so the left hand's conditional is nearly the broad part's. complete(), the fast project's completion and
    conditional draws follow the exact mixture, as the MAP denoiser does at a vanishing noise (before, they used the
    Gaussian's conditional alone: 0.63 rad away)."""
    prior = posepriors.load("hands")
    flat = {"right_hand_pose": torch.zeros(1, 45)}
    completed = prior.complete(flat)
    limit = prior.project(flat, noise_std=1e-5)
    torch.testing.assert_close(completed[0, :15], limit[0, :15], atol=1e-3, rtol=0)
    assert torch.equal(completed[0, 15:], torch.zeros(15, 3))  # observed joints kept exactly
    gaussian_only = prior._posterior_mean(*prior._prepare(flat, None)[:2], 0.0)
    assert (gaussian_only[0, :15] - completed[0, :15]).abs().max() > 0.3
    draws = prior.sample(4000, generator=torch.Generator().manual_seed(0), observed=flat)
    assert torch.equal(draws[:, 0, 15:], torch.zeros(4000, 15, 3))
    torch.testing.assert_close(draws[:, 0, :15].mean(0), completed[0, :15], atol=0.05, rtol=0)
    # the fast projection completes with the mixture too (its clamped right hand is no longer flat)
    projected = prior.project(flat)
    assert torch.equal(projected, prior.complete(projected, skeleton_mask(prior)))
    # at temperature 0 the draws are the Gaussians' deterministic conditional mean (the broad weight tempers to 0)
    cold = prior.sample(2, generator=torch.Generator().manual_seed(1), temperature=0.0, observed=flat)
    torch.testing.assert_close(cold[0, 0], gaussian_only[0], atol=1e-6, rtol=0)


def skeleton_mask(prior) -> torch.Tensor:
    """The mask of ``hands``' 30 joints that observes the right hand only."""
    mask = torch.zeros(prior.num_joints, dtype=torch.bool)
    mask[15:] = True
    return mask
