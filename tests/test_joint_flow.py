"""joint_flow: exact densities along the kinematic tree, grouped = per-joint loop, masks, sampling, projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import posepriors
from posepriors import flows, rotations, skeleton
from posepriors.priors.gaussian import GaussianConfig, GaussianPrior
from posepriors.priors.joint_flow import JointFlowConfig, JointFlowPrior
from tests.families import check_device_and_dtype, make

posepriors.hub.register_model(JointFlowPrior)

# left_hip, spine1, left_knee, spine3, left_collar, left_shoulder: two roots, spine3 hangs off spine1 because spine2
# is not modelled, and a chain spine1 -> spine3 -> collar -> shoulder.
TREE = (1, 3, 4, 9, 13, 16)
TREE_PARENTS = (-1, -1, 0, 1, 3, 4)
TREE_DEPTHS = (0, 0, 1, 1, 2, 3)
BODY_HAND = "body+right_hand"


def tiny(joints=TREE, seed: int = 0, **kwargs) -> JointFlowPrior:
    """A small prior whose initial weights come from ``seed`` (not from wherever the global RNG stands)."""
    kwargs = {"hidden": 16, "num_layers": 2, **kwargs}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return JointFlowPrior(JointFlowConfig(joints=joints, **kwargs))


def poses(n: int, joints, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Synthetic poses with real parent dependence: each joint is a nonlinear function of its parent plus noise."""
    g = torch.Generator().manual_seed(seed)
    prior = tiny(joints)  # only for the tree
    x = torch.zeros(n, len(joints), 3, dtype=torch.float64)
    for j, p in enumerate(prior.parents):
        noise = 0.15 * torch.randn(n, 3, generator=g, dtype=torch.float64)
        x[:, j] = noise + 0.2 if p < 0 else 0.8 * torch.sin(2 * x[:, p]).roll(1, -1) + noise
    return x.to(dtype)


def perturbed(prior: JointFlowPrior, scale: float = 0.2, seed: int = 0, data: torch.Tensor | None = None):
    """ActNorm initialised, every parameter moved off its (identity) initialisation, eval mode."""
    prior.initialize_from_data(poses(256, prior.joints, seed + 100) if data is None else data)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return prior.eval()


def sub_prior(prior: JointFlowPrior, joints) -> JointFlowPrior:
    """The same factors restricted to ``joints`` (rows of the grouped parameters)."""
    kwargs = {k: v for k, v in prior.config.to_dict().items() if k != "joints"}
    sub = JointFlowPrior(JointFlowConfig(joints=joints, **kwargs)).to(prior.dtype)
    rows = torch.tensor([prior.joints.index(j) for j in sub.joints])
    params = dict(prior.named_parameters())
    sub.load_state_dict({k: params[k][rows] if k in params else v for k, v in prior.state_dict().items()})
    return sub.eval()


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One thread: these tensors are tiny, and on a loaded machine a second thread only adds waiting at barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained() -> tuple[JointFlowPrior, float, torch.Tensor]:
    """A body+right-hand prior briefly trained on synthetic poses, its NLL before training, held-out poses."""
    torch.manual_seed(0)
    prior = tiny(BODY_HAND)
    data = poses(1024, prior.joints, seed=1)
    held_out = poses(256, prior.joints, seed=2)
    prior.initialize_from_data(data)
    with torch.no_grad():
        before = prior.nll(held_out).mean().item()
    adam_fit(prior, data, steps=150, batch=128, lr=1e-2)
    return prior.eval(), before, held_out


def adam_fit(prior: JointFlowPrior, data: torch.Tensor, *, steps: int, batch: int, lr: float) -> None:
    """A few seeded Adam steps of maximum likelihood (with gradient clipping, like the training loop)."""
    opt = torch.optim.Adam(prior.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(data), (batch,), generator=g)
        opt.zero_grad()
        prior.training_loss(data[idx]).backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        opt.step()


# ---------------------------------------------------------------------------- structure and config
def test_tree_structure():
    prior = tiny()
    assert prior.parents == TREE_PARENTS and prior.depths == TREE_DEPTHS and prior.num_levels == 4
    full = JointFlowPrior(JointFlowConfig(hidden=8, num_layers=1))
    assert full.num_joints == 51 and full.num_levels == 10
    names = full.joint_names
    assert names[full.parents[names.index("left_index1")]] == "left_wrist"
    assert [names[j] for j, p in enumerate(full.parents) if p < 0] == ["left_hip", "right_hip", "spine1"]


@pytest.mark.parametrize(
    "kwargs",
    [{"coupling": "maf"}, {"context": "quaternion"}, {"hidden": 0}, {"num_layers": 0}, {"bins": 1}, {"bound": -1.0}],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        JointFlowConfig(**kwargs)


# ---------------------------------------------------------------------------- exactness of the flow
@pytest.mark.parametrize("coupling", ["spline", "affine"])
@pytest.mark.parametrize("context", ["6d", "axis_angle"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_round_trip(coupling, context, dtype):
    prior = perturbed(tiny(coupling=coupling, context=context).to(dtype), scale=0.1)
    x = poses(64, TREE, seed=3, dtype=dtype) + 0.3 * torch.randn(64, len(TREE), 3, dtype=dtype)
    error = prior.round_trip_error(x)
    assert error < (1e-4 if dtype == torch.float32 else 1e-8), error
    # and shrink = 1 without a mask projects a pose onto itself
    torch.testing.assert_close(prior.project(x, shrink=1.0), x, atol=1e-4 if dtype == torch.float32 else 1e-8, rtol=0)


@pytest.mark.parametrize("coupling", ["spline", "affine"])
def test_logdet_matches_autograd_jacobian_and_is_triangular(coupling):
    prior = perturbed(tiny(coupling=coupling).double())
    x = poses(1, TREE, seed=4, dtype=torch.float64)[0]
    J = len(TREE)

    def encode(flat):
        pose = flat.reshape(1, J, 3)
        return prior.flow(pose, prior._context(pose))[0].reshape(-1)

    jac = torch.autograd.functional.jacobian(encode, x.reshape(-1))
    _, logdet = prior.flow(x[None], prior._context(x[None]))
    sign, logabsdet = torch.linalg.slogdet(jac)
    torch.testing.assert_close(logabsdet, logdet.sum(), atol=1e-8, rtol=1e-8)
    # a joint's code depends on the joint itself and its parent only (block lower-triangular Jacobian)
    blocks = jac.reshape(J, 3, J, 3).abs().amax((1, 3))
    for j, p in enumerate(TREE_PARENTS):
        for k in range(J):
            if k == j or k == p:
                assert blocks[j, k] > 1e-6, (j, k)
            else:
                assert blocks[j, k] == 0, (j, k)


def test_per_joint_terms_sum_to_log_prob():
    prior = perturbed(tiny())
    x = poses(32, TREE, seed=5)
    per_joint = prior.log_prob_per_joint(x)
    assert per_joint.shape == (32, len(TREE))
    torch.testing.assert_close(per_joint.sum(-1), prior.log_prob(x), atol=1e-4, rtol=1e-6)
    assert prior.log_prob_per_joint(prior.to_smplx(x).reshape(4, 8, 165)).shape == (4, 8, len(TREE))


def _naive_per_joint(prior: JointFlowPrior, x: torch.Tensor) -> torch.Tensor:
    """A Python loop over joints, each with its own one-group flow loaded from its slice of the grouped weights."""
    cfg = prior.config
    state = prior.flow.state_dict()
    params = dict(prior.flow.named_parameters())
    out = []
    for j, p in enumerate(TREE_PARENTS):
        flow = flows.build_flow(
            1,
            3,
            num_layers=cfg.num_layers,
            hidden=cfg.hidden,
            coupling=cfg.coupling,
            context_features=6 if cfg.context == "6d" else 3,
            actnorm=cfg.actnorm,
            mixing=cfg.mixing,
            num_hidden_layers=cfg.num_hidden_layers,
            bins=cfg.bins,
            bound=cfg.bound,
        ).to(x.dtype)
        flow.load_state_dict({k: params[k][j : j + 1] if k in params else v for k, v in state.items()})
        flow.eval()
        if p < 0:
            context = x.new_zeros(x.shape[0], 1, 6 if cfg.context == "6d" else 3)
        elif cfg.context == "6d":
            context = rotations.axis_angle_to_rotation_6d(x[:, p : p + 1])
        else:
            context = x[:, p : p + 1]
        out.append(flow.log_prob(x[:, j : j + 1], context))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize(("coupling", "context"), [("spline", "6d"), ("affine", "axis_angle")])
def test_grouped_flow_equals_naive_loop_over_joints(coupling, context):
    prior = perturbed(tiny(coupling=coupling, context=context).double())
    x = poses(16, TREE, seed=6, dtype=torch.float64)
    torch.testing.assert_close(prior.log_prob_per_joint(x), _naive_per_joint(prior, x), atol=1e-10, rtol=1e-10)


def test_gradients_reach_every_parameter():
    prior = perturbed(tiny(BODY_HAND))
    prior.train()
    prior.training_loss(poses(64, prior.joints, seed=7)).backward()
    dead = [n for n, p in prior.named_parameters() if p.grad is None or not bool((p.grad != 0).any())]
    assert not dead, dead


# ---------------------------------------------------------------------------- masks
def test_descendant_closed_masks_give_exact_marginals():
    prior = perturbed(tiny(BODY_HAND))
    x = poses(16, prior.joints, seed=8)
    body = sub_prior(prior, skeleton.PARTS["body"])
    n_body = len(skeleton.PARTS["body"])
    expected = body.log_prob(x[:, :n_body])
    mask = torch.tensor([j in skeleton.PARTS["body"] for j in prior.joints])
    torch.testing.assert_close(prior.log_prob(x, mask), expected, atol=1e-4, rtol=1e-6)
    # a body-only input (21 joints) lacks the hand: the same marginal, with no mask given
    torch.testing.assert_close(prior.log_prob(x[:, :n_body]), expected, atol=1e-4, rtol=1e-6)
    # a missing forearm and hand: the sum of the observed joints' terms
    gone = {19, 21, *skeleton.PARTS["right_hand"]}  # right elbow, right wrist, right hand
    arm_mask = torch.tensor([j not in gone for j in prior.joints])
    per_joint = prior.log_prob_per_joint(x)
    torch.testing.assert_close(prior.log_prob(x, arm_mask), (per_joint * arm_mask).sum(-1), atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(prior.log_prob_per_joint(x, arm_mask).sum(-1), prior.log_prob(x, arm_mask))
    # per-pose masks
    both = torch.stack([mask, arm_mask]).repeat(8, 1)
    torch.testing.assert_close(prior.log_prob(x, both), torch.where(both, per_joint, 0).sum(-1), atol=1e-4, rtol=1e-6)


def test_mask_that_is_not_closed_under_descendants_raises():
    prior = perturbed(tiny(BODY_HAND))
    x = poses(4, prior.joints, seed=9)
    mask = torch.tensor([j != 19 for j in prior.joints])  # right elbow missing, right wrist observed
    with pytest.raises(ValueError, match="closed under descendants.*right_wrist.*right_elbow"):
        prior.log_prob(x, mask)
    with pytest.raises(ValueError, match="closed under descendants"):
        prior.log_prob_per_joint(x, mask)


def test_completion_is_the_exact_conditional_walk():
    prior = perturbed(tiny(BODY_HAND))
    full = prior.sample(8, generator=torch.Generator().manual_seed(10))
    mask = torch.tensor([j not in (19, 21, *skeleton.PARTS["right_hand"]) for j in prior.joints])
    # the same noise completes the observed part of a sample into that very sample
    completed = prior.sample(1, observed=full, mask=mask, generator=torch.Generator().manual_seed(10))[0]
    torch.testing.assert_close(completed, full, atol=1e-6, rtol=0)
    # observed joints are kept exactly, also when the mask is not closed under descendants
    odd = torch.tensor([j != 19 for j in prior.joints])
    samples = prior.sample(3, observed=full, mask=odd, generator=torch.Generator().manual_seed(11))
    assert samples.shape == (3, 8, prior.num_joints, 3) and torch.isfinite(samples).all()
    assert torch.equal(samples[:, :, odd], full[:, odd].expand(3, -1, -1, -1))
    assert not torch.allclose(samples[:, :, ~odd], full[:, ~odd].expand(3, -1, -1, -1))


def test_project_with_masks():
    prior = perturbed(tiny(BODY_HAND))
    x = poses(8, prior.joints, seed=12)
    mask = torch.tensor([j not in skeleton.PARTS["right_hand"] for j in prior.joints])
    kept = prior.project(x, mask, keep_observed=True)
    assert torch.equal(kept[:, mask], x[:, mask]) and torch.isfinite(kept).all()
    # missing joints are the latent-zero completion given their parents, whatever the input held there
    torch.testing.assert_close(prior.project(torch.where(mask[:, None], x, 5.0), mask, keep_observed=True), kept)
    moved = prior.project(x, mask)
    assert not torch.allclose(moved[:, mask], x[:, mask])
    # an observed joint below a missing one is re-encoded given its completed parent, so shrink = 1 keeps every
    # observed joint (the wrist and hand below the missing elbow too) and only fills the gap
    odd = torch.tensor([j != 19 for j in prior.joints])
    out = prior.project(x, odd, shrink=1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, odd], x[:, odd], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="shrink"):
        prior.project(x, shrink=1.5)
    with pytest.raises(TypeError, match="max_sigma"):
        prior.project(x, max_sigma=2.0)


def test_project_under_no_grad_and_with_gradients():
    prior = perturbed(tiny())
    x = poses(4, TREE, seed=13).requires_grad_(True)
    with torch.no_grad():
        frozen = prior.project(x)
    assert not frozen.requires_grad
    out = prior.project(x)
    torch.testing.assert_close(out, frozen)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- sampling
def test_sampling_shapes_reproducibility_and_temperature():
    prior = perturbed(tiny(BODY_HAND))
    a = prior.sample(16, generator=torch.Generator().manual_seed(1))
    b = prior.sample(16, generator=torch.Generator().manual_seed(1))
    assert a.shape == (16, prior.num_joints, 3) and torch.isfinite(a).all() and torch.equal(a, b)
    cold = prior.sample(4, generator=torch.Generator().manual_seed(2), temperature=0.0)
    torch.testing.assert_close(cold, cold[:1].expand_as(cold))
    torch.testing.assert_close(cold[0], prior.project(a[:1], shrink=0.0)[0])


def test_level_walk_equals_full_grouped_inverses():
    """Sampling inverts only one level's slice of the weights at a time; check against full grouped inverses."""
    prior = perturbed(tiny(BODY_HAND))
    z = torch.randn(8, prior.num_joints, 3, generator=torch.Generator().manual_seed(3))
    out = torch.zeros_like(z)
    depths = torch.tensor(prior.depths)
    for level in range(prior.num_levels):
        decoded, _ = prior.flow.inverse(z, prior._context(out))
        out[:, depths == level] = decoded[:, depths == level]
    with torch.no_grad():
        torch.testing.assert_close(prior._decode(z, torch.zeros_like(z)), out, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- formats, save/load, training
def test_input_formats_and_save_load(tmp_path):
    prior = perturbed(tiny(BODY_HAND)).requires_grad_(False)  # frozen, like a loaded prior: the same code path
    x = poses(8, prior.joints, seed=14)
    lp = prior.log_prob(x)
    full = prior.to_smplx(x)
    for pose in (full, full.reshape(8, 165), skeleton.from_smplx(full, "seed53"), skeleton.to_smplx_dict(full)):
        torch.testing.assert_close(prior.log_prob(pose), lp, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(prior.log_prob(full.numpy()), lp, atol=1e-4, rtol=1e-6)
    posepriors.hub.save_pretrained(prior, tmp_path / "jf")
    loaded = posepriors.hub.load_pretrained(tmp_path / "jf")
    assert type(loaded) is JointFlowPrior and loaded.config == prior.config
    assert torch.equal(loaded.log_prob(x), lp)


def test_training_lowers_nll_and_project_lowers_nll_of_noisy_poses(trained):
    prior, before, held_out = trained
    with torch.no_grad():
        after = prior.nll(held_out).mean().item()
        assert after < before - 20, (before, after)
        noisy = held_out + 0.15 * torch.randn(held_out.shape, generator=torch.Generator().manual_seed(15))
        projected = prior.project(noisy)
        assert (prior.nll(projected) < prior.nll(noisy)).float().mean() > 0.9


@pytest.mark.slow
def test_short_training_on_shared_body_data_beats_gaussian(shared_data):
    train = torch.from_numpy(np.load(shared_data / "body_train.npz")["body_pose"]).float()
    val = torch.from_numpy(np.load(shared_data / "body_val.npz")["body_pose"]).float()
    gaussian = GaussianPrior(GaussianConfig(joints="body")).fit(train)
    torch.manual_seed(0)
    prior = JointFlowPrior(JointFlowConfig(joints="body", hidden=32, num_layers=2, coupling="affine"))
    prior.initialize_from_data(train)
    adam_fit(prior, train, steps=300, batch=256, lr=3e-3)
    with torch.no_grad():
        flow_nll = prior.eval().nll(val).mean().item()
        gaussian_nll = gaussian.nll(val).mean().item()
    assert flow_nll < gaussian_nll - 15, (flow_nll, gaussian_nll)


def test_joint_flow_on_the_requested_device_and_dtype(device, dtype):
    """``pytest --device cuda --dtype float64`` runs this on a GPU in float64 (it skips where there is none)."""
    check_device_and_dtype(make("joint_flow"), device, dtype)


def _perturbed_joint_flow() -> JointFlowPrior:
    torch.manual_seed(0)
    prior = make("joint_flow")  # body + right hand
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        for p in prior.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return prior.eval().requires_grad_(False)


def test_body_latent_round_trip_and_codes_match_the_full_flow():
    prior = _perturbed_joint_flow()
    dim, encode, decode = prior.body_latent()
    body = 0.2 * torch.randn(5, 21, 3, generator=torch.Generator().manual_seed(5))
    z = encode(body)
    assert dim == 63 and z.shape == (5, 63)
    torch.testing.assert_close(decode(z), body, atol=1e-4, rtol=0)
    # a body joint's code depends on its parent only, so the hands do not change it
    full = torch.zeros(5, prior.num_joints, 3)
    full[:, :21] = body
    full[:, 21:] = 0.3
    codes, _ = prior.flow(full, prior._context(full))
    torch.testing.assert_close(codes[:, :21].flatten(1), z, atol=1e-5, rtol=0)


def test_body_latent_decode_is_differentiable_and_needs_the_body():
    prior = _perturbed_joint_flow()
    _, encode, decode = prior.body_latent()
    z = encode(torch.zeros(2, 21, 3)).requires_grad_(True)
    (grad,) = torch.autograd.grad(decode(z).square().sum(), z)
    assert bool(torch.isfinite(grad).all()) and grad.abs().sum() > 0
    hands = JointFlowPrior(JointFlowConfig(joints="right_hand", hidden=8, num_layers=1))
    with pytest.raises(ValueError, match="needs all 21 body joints"):
        hands.body_latent()
