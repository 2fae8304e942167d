"""The ``global_flow`` family: parts (exact marginals of trailing parts), the completion flow, random training masks,
and conditioning through ``context=`` (an argument, never module state)."""

from __future__ import annotations

import threading

import pytest
import torch

from posepriors import skeleton
from posepriors.priors import GlobalFlowConfig, GlobalFlowPrior
from posepriors.priors.global_flow import random_joint_mask
from tests.families import NAMES, check_device_and_dtype, make, synthetic_poses


def test_flow_initialisation_draws_nothing_from_the_global_rng():
    prior = GlobalFlowPrior(GlobalFlowConfig(joints="body", hidden=8, num_layers=2, conditional=True))
    data = synthetic_poses(64, prior.joints)
    state = torch.get_rng_state()
    prior.initialize_from_data(data)
    assert torch.equal(torch.get_rng_state(), state)


def test_masks_that_are_not_trailing_parts_raise_without_a_completion_flow():
    prior = make("global_flow").eval()  # parts body, right_hand; no completion flow
    x = synthetic_poses(4, prior.joints)
    hand = torch.tensor([j in skeleton.PARTS["right_hand"] for j in prior.joints])
    torch.testing.assert_close(prior.log_prob(x, ~hand), prior.log_prob_per_part(x)[:, 0])  # exact p(body)
    with pytest.raises(ValueError, match="partially observed part"):
        prior.log_prob(x, torch.arange(prior.num_joints) != 3)
    with pytest.raises(ValueError, match="a missing part before an observed one"):
        prior.log_prob(x, hand)
    with pytest.raises(ValueError, match="conditional=True"):
        prior.project(x, torch.arange(prior.num_joints) != 3)
    body_only = {"body_pose": x[:, : len(skeleton.PARTS["body"])]}  # the hand part is not given: no term for it
    with pytest.raises(ValueError, match="lacks right_hand"):
        prior.log_prob_per_part(body_only)
    if prior.broad is None:  # the parts' terms are the flows' density
        torch.testing.assert_close(prior.log_prob_per_part(x).sum(-1), prior.log_prob(x))


def test_random_joint_masks_hide_and_keep_something_and_are_reproducible():
    joints = skeleton.resolve_joints("body+right_hand")
    a = random_joint_mask(256, joints, 1.0, torch.Generator().manual_seed(0), torch.device("cpu"))
    b = random_joint_mask(256, joints, 1.0, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert a.shape == (256, len(joints)) and torch.equal(a, b)
    assert bool(a.any(-1).all()) and bool((~a).any(-1).all())
    none = random_joint_mask(64, joints, 0.0, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert bool(none.all())
    # some masks hide a whole subtree: a joint together with all its modelled descendants
    subtrees = [set(s) for s in skeleton.modelled_descendants(joints) if len(s) > 1]
    hidden = [set(torch.nonzero(~m).flatten().tolist()) for m in a]
    assert any(h in subtrees for h in hidden)


# ---------------------------------------------------------------------------- conditioning: context= is an argument
C = 4


@pytest.fixture(scope="module")
def conditioned():
    """A conditioned global_flow whose couplings depend on the context (perturbed away from the identity init)."""
    torch.manual_seed(0)
    prior = GlobalFlowPrior(
        GlobalFlowConfig(
            joints="body+right_hand",
            hidden=16,
            num_layers=2,
            parts=("body", "right_hand"),
            use_conditioning=True,
            context_features=C,
            conditional=True,
        )
    )
    x = synthetic_poses(64, prior.joints)
    ctx = torch.randn(64, C, generator=torch.Generator().manual_seed(1))
    prior.initialize_from_data(x, context=ctx)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for p in prior.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return prior.eval(), x[:6], ctx[:6]


def test_context_changes_the_density_and_broadcasts_from_one_row(conditioned):
    prior, x, ctx = conditioned
    lp = prior.log_prob(x, context=ctx)
    assert lp.shape == (6,) and torch.isfinite(lp).all()
    rows = torch.stack([prior.log_prob(x[i], context=ctx[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(rows, lp, atol=1e-5, rtol=1e-5)
    shared = prior.log_prob(x, context=ctx[:1])
    torch.testing.assert_close(shared, prior.log_prob(x, context=ctx[:1].expand(6, C)))
    assert not torch.allclose(shared, lp)  # the context matters
    torch.testing.assert_close(prior.nll(x, context=ctx), -lp)
    grid = prior.log_prob(x.reshape(2, 3, -1, 3), context=ctx.reshape(2, 3, C))  # (*, C) for batch shape (*)
    torch.testing.assert_close(grid.reshape(6), lp)
    parts = prior.log_prob_per_part(x, context=ctx)
    assert parts.shape == (6, 2)
    torch.testing.assert_close(parts.sum(-1), lp, atol=1e-5, rtol=1e-5)
    body = prior.log_prob({"body_pose": prior.to_smplx(x)[:, 1:22]}, context=ctx)  # the hand part drops out
    torch.testing.assert_close(body, parts[:, 0], atol=1e-5, rtol=1e-5)


def test_context_reaches_sampling_and_projection(conditioned):
    prior, x, ctx = conditioned
    a = prior.sample(8, generator=torch.Generator().manual_seed(0), context=ctx[:1])
    b = prior.sample(8, generator=torch.Generator().manual_seed(0), context=ctx[1:2].expand(8, C))
    assert a.shape == b.shape == (8, prior.num_joints, 3) and not torch.allclose(a, b)
    mask = torch.tensor([j not in skeleton.PARTS["right_hand"] for j in prior.joints])
    done = prior.sample(3, observed=x, mask=mask, context=ctx, generator=torch.Generator().manual_seed(0))
    assert done.shape == (3, 6, prior.num_joints, 3)
    torch.testing.assert_close(done[:, :, mask], x[:, mask].expand(3, -1, -1, -1))
    fast = prior.project(x, context=ctx)
    assert fast.shape == x.shape and not torch.allclose(fast, prior.project(x, context=ctx[:1]))
    scattered = torch.ones(prior.num_joints, dtype=torch.bool)
    scattered[[2, 7, 30]] = False  # not a trailing-part pattern: the completion flow, which sees the context too
    completed = prior.project(x, scattered, keep_observed=True, context=ctx)
    torch.testing.assert_close(completed[:, scattered], x[:, scattered])
    other = prior.project(x, scattered, keep_observed=True, context=ctx[:1])
    assert not torch.allclose(completed[:, ~scattered], other[:, ~scattered])
    denoised = prior.project(x, context=ctx, noise_std=0.1, steps=3)
    assert denoised.shape == x.shape and torch.isfinite(denoised).all()


def test_context_reaches_the_training_and_validation_paths(conditioned):
    prior, x, ctx = conditioned
    prior.train()
    try:
        loss = prior.training_loss(x, torch.Generator().manual_seed(0), context=ctx)
        assert loss.shape == () and torch.isfinite(loss)
        loss.backward()
        assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in prior.parameters())
        prior.zero_grad()
    finally:
        prior.eval()
    torch.testing.assert_close(prior.validation_nll(x, context=ctx), -prior.log_prob(x, context=ctx))
    assert prior.round_trip_error(x, context=ctx) < 1e-4
    with pytest.raises(ValueError, match="conditioned on a context of 4 features"):
        prior.training_loss(x)
    with pytest.raises(ValueError, match="conditioned on a context of 4 features"):
        prior.validation_nll(x)


def test_missing_or_misshapen_contexts_are_clear_errors(conditioned):
    prior, x, ctx = conditioned
    assert prior.conditioning_features == C
    for call in (
        lambda: prior.log_prob(x),
        lambda: prior.sample(2),
        lambda: prior.project(x),
        lambda: prior.log_prob_per_part(x),
    ):
        with pytest.raises(ValueError, match=r"conditioned on a context of 4 features: pass context= of shape"):
            call()
    with pytest.raises(ValueError, match=r"expected context of shape \(6, 4\) or \(1, 4\) for 6 poses, got \(6, 3\)"):
        prior.log_prob(x, context=ctx[:, :3])
    with pytest.raises(ValueError, match=r"expected context of shape \(6, 4\) or \(1, 4\) for 6 poses, got \(2, 4\)"):
        prior.log_prob(x, context=ctx[:2])
    with pytest.raises(ValueError, match=r"got \(4,\)"):
        prior.log_prob(x, context=ctx[0])
    with pytest.raises(TypeError, match="expected context to be a floating-point tensor, got dtype torch.int64"):
        prior.log_prob(x, context=torch.zeros(6, C, dtype=torch.long))
    with pytest.raises(TypeError, match="got list"):
        prior.log_prob(x, context=[[0.0] * C] * 6)


@pytest.mark.parametrize("name", NAMES)
def test_a_prior_that_is_not_conditioned_refuses_a_context(name):
    prior = make(name).eval()
    x = synthetic_poses(3, prior.joints)
    ctx = torch.zeros(3, 2)
    assert prior.conditioning_features == 0
    calls = {
        "log_prob": lambda: prior.log_prob(x, context=ctx),
        "nll": lambda: prior.nll(x, context=ctx),
        "sample": lambda: prior.sample(3, context=ctx),
        "project": lambda: prior.project(x, context=ctx),
        "training_loss": lambda: prior.training_loss(x, context=ctx),
        "validation_nll": lambda: prior.validation_nll(x, context=ctx),
    }
    for what, call in calls.items():
        with pytest.raises(ValueError, match=rf"{type(prior).__name__} .* is not conditioned on a context"):
            call()
        assert what  # every public path checks
    assert "context" not in prior.project_options() and "context" not in prior.project_options(map_mode=True)


def test_no_context_is_stored_on_the_module(conditioned):
    prior, x, ctx = conditioned
    before = dict(vars(prior))
    buffers = {k: v.clone() for k, v in prior.named_buffers()}
    prior.log_prob(x, context=ctx)
    prior.sample(2, context=ctx[:1], generator=torch.Generator().manual_seed(0))
    assert not hasattr(prior, "_context")
    assert vars(prior).keys() == before.keys()
    assert all(vars(prior)[k] is v for k, v in before.items())  # no attribute was rebound
    assert all(torch.equal(v, buffers[k]) for k, v in prior.named_buffers())
    # two threads with different contexts see their own (no shared state to race on)
    expected = [prior.log_prob(x, context=ctx[i : i + 1]) for i in range(4)]
    results = [None] * 4

    def work(i):
        for _ in range(5):
            results[i] = prior.log_prob(x, context=ctx[i : i + 1])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_with_context_is_a_deprecated_bound_wrapper(conditioned):
    prior, x, ctx = conditioned
    with pytest.warns(DeprecationWarning, match="pass context="):
        bound = prior.with_context(ctx)
    with bound as scoped:
        torch.testing.assert_close(scoped.nll(x), prior.nll(x, context=ctx))
        with pytest.raises(ValueError, match="pass context="):  # the prior itself stores nothing
            prior.nll(x)
    torch.testing.assert_close(bound.log_prob(x), prior.log_prob(x, context=ctx))
    torch.testing.assert_close(bound.log_prob_per_part(x), prior.log_prob_per_part(x, context=ctx))
    torch.testing.assert_close(bound.validation_nll(x), prior.validation_nll(x, context=ctx))
    g = torch.Generator
    torch.testing.assert_close(
        bound.sample(6, generator=g().manual_seed(0)), prior.sample(6, generator=g().manual_seed(0), context=ctx)
    )
    torch.testing.assert_close(bound.project(x), prior.project(x, context=ctx))
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"expected context of shape"):
        prior.with_context(ctx[:, :2])
    unconditioned = GlobalFlowPrior(GlobalFlowConfig(hidden=8, num_layers=1))
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="is not conditioned on a context"):
        unconditioned.with_context(ctx)


def test_global_flow_on_the_requested_device_and_dtype(device, dtype):
    """``pytest --device cuda --dtype float64`` runs this on a GPU in float64 (it skips where there is none)."""
    check_device_and_dtype(make("global_flow_conditional"), device, dtype)


@pytest.fixture(scope="module")
def trained_body_hand():
    """A body + right-hand global_flow, initialised on synthetic poses and perturbed away from the identity."""
    torch.manual_seed(0)
    prior = make("global_flow")
    x = synthetic_poses(64, prior.joints)
    prior.initialize_from_data(x)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in prior.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return prior.eval().requires_grad_(False), x[:8]


def test_encode_decode_round_trip_and_shapes(trained_body_hand):
    prior, x = trained_body_hand
    z = prior.encode(x)
    assert z.shape == (8, prior.latent_dim) and prior.latent_dim == 3 * prior.num_joints
    torch.testing.assert_close(prior.decode(z), x, atol=1e-4, rtol=0)
    torch.testing.assert_close(prior.encode(prior.decode(z)), z, atol=1e-4, rtol=0)
    assert prior.decode(z.reshape(2, 4, -1)).shape == (2, 4, prior.num_joints, 3)
    # the base density is a standard normal: log p(x) = log N(z) + log |det dz/dx|, so the code is not the pose
    assert not torch.allclose(z, x.flatten(1))


def test_decode_is_differentiable_in_the_latent_code(trained_body_hand):
    prior, x = trained_body_hand
    z = prior.encode(x).requires_grad_(True)
    (grad,) = torch.autograd.grad(prior.decode(z).square().sum(), z)
    assert grad.shape == z.shape and bool(torch.isfinite(grad).all()) and grad.abs().sum() > 0


def test_encode_and_decode_reject_bad_input(trained_body_hand):
    prior, x = trained_body_hand
    with pytest.raises(ValueError, match="encode needs every modelled joint"):
        prior.encode({"body_pose": x[:, :21]})
    with pytest.raises(ValueError, match=rf"latent codes of shape \(\*, {prior.latent_dim}\), got \(8, 5\)"):
        prior.decode(torch.zeros(8, 5))
    with pytest.raises(TypeError, match=r"latent codes of shape .* as floating-point values, got dtype torch\.int64"):
        prior.decode(torch.zeros(8, prior.latent_dim, dtype=torch.long))
    with pytest.raises(TypeError, match="latent codes .* as a tensor or numpy array, got list"):
        prior.decode([[0.0] * prior.latent_dim])


def test_decode_takes_numpy_and_returns_the_promoted_dtype_as_encode_does(trained_body_hand):
    prior, x = trained_body_hand
    z = prior.encode(x[:3])
    from_numpy = prior.decode(z.numpy())
    torch.testing.assert_close(from_numpy, prior.decode(z))
    z64 = prior.encode(x[:3].double())
    assert z64.dtype == torch.float64 and prior.decode(z64).dtype == torch.float64
    assert prior.decode(z.double()).dtype == torch.float64 and prior.decode(z).dtype == prior.dtype
    # the flat (*, 3J) form of the prior's own order places in SMPL-X like (*, J, 3)
    pose = prior.decode(z)
    torch.testing.assert_close(prior.to_smplx(pose.flatten(-2)), prior.to_smplx(pose))
    with pytest.raises(
        ValueError, match=rf"\(\*, {prior.num_joints}, 3\) or \(\*, {3 * prior.num_joints}\), got \(3, 7\)"
    ):
        prior.to_smplx(torch.zeros(3, 7))


def test_body_latent_maps_the_body_part_alone(trained_body_hand):
    prior, x = trained_body_hand
    dim, encode, decode = prior.body_latent()
    body = x[:, :21]
    zb = encode(body)
    assert dim == 63 and zb.shape == (8, 63)
    torch.testing.assert_close(zb, prior.encode(x)[:, :63])  # the body is the first factor: the hands do not enter
    torch.testing.assert_close(decode(zb), body, atol=1e-4, rtol=0)


def test_body_latent_needs_the_body_as_first_part_and_no_context(conditioned):
    hands_first = GlobalFlowPrior(
        GlobalFlowConfig(joints="right_hand+body", hidden=8, num_layers=1, parts=("right_hand", "body"))
    )
    with pytest.raises(ValueError, match="21 body joints as the first part"):
        hands_first.body_latent()
    with pytest.raises(ValueError, match="conditioned on a context"):
        conditioned[0].body_latent()


def test_every_pose_of_a_batch_is_completed_and_denoised_from_its_own_mask_alone():
    """A batch mixing masks that hide whole trailing parts (the exact decoding) with others (the completion flow),
    and with the whole body seen or not (Tweedie's formula or the MAP fallback): each pose as if alone."""
    import warnings

    torch.manual_seed(0)
    config = GlobalFlowConfig(
        joints="body+right_hand", parts=("body", "right_hand"), hidden=16, num_layers=2, conditional=True,
        smoothed_noise_std=0.1, smoothed_members=1, smoothed_hidden=16, smoothed_num_layers=1,
    )  # fmt: skip
    prior = GlobalFlowPrior(config).eval()
    x = synthetic_poses(4, prior.joints, seed=7)
    prior.initialize_from_data(synthetic_poses(64, prior.joints))
    hand = torch.tensor([j in skeleton.PARTS["right_hand"] for j in prior.joints])
    mask = torch.ones(4, prior.num_joints, dtype=torch.bool)
    mask[0, hand] = False  # the hand hidden: a trailing part
    mask[1, 3] = False  # a body joint hidden: the completion flow
    mask[2, hand.nonzero()[0]] = False  # part of the hand hidden
    calls = {
        "project": lambda p, m: prior.project(p, m),
        "project MAP": lambda p, m: prior.project(p, m, noise_std=0.1, steps=3),
        "sample": lambda p, m: prior.sample(1, observed=p, mask=m, temperature=0)[0],
        "denoise": lambda p, m: prior.denoise(p, m, noise_std=0.1),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the MAP fallback warns
        for name, call in calls.items():
            together = call(x, mask)
            for i in range(4):
                alone = call(x[i : i + 1], mask[i : i + 1])[0]
                torch.testing.assert_close(together[i], alone, atol=1e-5, rtol=0, msg=f"{name}, pose {i}")


def test_a_mask_of_one_row_repeated_is_read_once_with_the_same_states_and_errors():
    """A mask whose rows repeat one row (a (J,) mask, a layout's missing joints) or of one pose is read in Python;
    its part states, part flags and errors equal those of the same mask written out row by row."""
    prior = make("global_flow").eval()
    hand = torch.tensor([j in skeleton.PARTS["right_hand"] for j in prior.joints])
    for row in (~hand, torch.ones_like(hand), torch.arange(prior.num_joints) != 3, hand):
        for batch in (1, 3):
            shared = row.expand(batch, -1)
            written = shared.clone()  # the general path (for batch 1 it is the Python one too)
            assert batch == 1 or prior._uniform_states(written) is None
            for got, want in zip(prior._part_states(shared), prior._part_states(written), strict=True):
                assert torch.equal(got, want)
            outcomes = []
            for mask in (shared, written):
                try:
                    outcomes.append(prior._part_mask(mask))
                except ValueError as error:
                    outcomes.append(str(error))
            assert type(outcomes[0]) is type(outcomes[1])
            assert outcomes[0] == outcomes[1] if isinstance(outcomes[0], str) else torch.equal(*outcomes)
