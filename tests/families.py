"""Small instances of every family and synthetic pose data, shared by the tests."""

from __future__ import annotations

import copy

import torch

from posepriors import skeleton
from posepriors.priors import (
    GaussianConfig,
    GaussianPrior,
    GlobalFlowConfig,
    GlobalFlowPrior,
    GMMConfig,
    GMMPrior,
    HandVAE,
    HandVAEConfig,
    JointFlowConfig,
    JointFlowPrior,
    PosePrior,
)

BODY_HAND = "body+right_hand"


def make(name: str) -> PosePrior:
    """A small prior of the family ``name`` (a key of :data:`NAMES`)."""
    if name == "gaussian":
        return GaussianPrior(GaussianConfig(joints=BODY_HAND))
    if name == "joint_flow":
        return JointFlowPrior(JointFlowConfig(joints=BODY_HAND, hidden=8, num_layers=2))
    if name == "joint_flow_affine":
        return JointFlowPrior(
            JointFlowConfig(joints="body", hidden=8, num_layers=2, coupling="affine", context="axis_angle")
        )
    if name == "global_flow":
        return GlobalFlowPrior(
            GlobalFlowConfig(joints=BODY_HAND, hidden=16, num_layers=2, coupling="spline", parts=("body", "right_hand"))
        )
    if name == "global_flow_conditional":
        return GlobalFlowPrior(GlobalFlowConfig(joints="body", hidden=16, num_layers=2, conditional=True))
    if name == "hand_vae":
        return HandVAE(HandVAEConfig(z_dim=4, hidden=16, iwae_samples=8))
    if name == "hand_vae_so3":
        return HandVAE(HandVAEConfig(variant="so3", z_dim=4, hidden=16, iwae_samples=8))
    if name == "gmm":
        return GMMPrior(GMMConfig(joints=BODY_HAND, num_components=3))
    raise KeyError(name)


NAMES = (
    "gaussian",
    "joint_flow",
    "joint_flow_affine",
    "global_flow",
    "global_flow_conditional",
    "hand_vae",
    "hand_vae_so3",
    "gmm",
)


def synthetic_poses(n: int, joints: tuple[int, ...], seed: int = 0, latent: int = 3) -> torch.Tensor:
    """Poses on a noisy low-dimensional manifold (correlated joints), shape (n, J, 3), angles < pi."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(latent, len(joints) * 3, generator=torch.Generator().manual_seed(123)) * 0.25
    code = torch.randn(n, latent, generator=g)
    x = code @ basis + 0.05 * torch.randn(n, len(joints) * 3, generator=g) + 0.1
    return x.reshape(n, len(joints), 3)


def train(prior: PosePrior, steps: int = 60, n: int = 512, seed: int = 0) -> tuple[PosePrior, torch.Tensor]:
    """Fit ``prior`` briefly on synthetic data; returns it and held-out poses."""
    data = synthetic_poses(n, prior.joints, seed)
    prior.initialize_from_data(data)
    opt = torch.optim.Adam(prior.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(n, (128,), generator=g)
        opt.zero_grad()
        prior.training_loss(data[idx], g).backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 5.0)
        opt.step()
    prior.eval()
    return prior, synthetic_poses(64, prior.joints, seed + 1)


def check_device_and_dtype(prior: PosePrior, device: torch.device, dtype: torch.dtype) -> None:
    """Every public path of ``prior`` on ``device`` in ``dtype``: results stay there, gradients reach the pose."""
    torch.manual_seed(0)
    data = synthetic_poses(64, prior.joints)
    prior.initialize_from_data(data)
    prior = prior.to(device=device, dtype=dtype).eval()
    assert prior.device.type == device.type and prior.dtype == dtype
    x = synthetic_poses(5, prior.joints, seed=1).to(device=device, dtype=dtype)
    lp = prior.log_prob(x)
    assert lp.shape == (5,) and lp.device.type == device.type and lp.dtype == dtype and bool(torch.isfinite(lp).all())
    pose = x.clone().requires_grad_(True)
    prior.nll(pose).sum().backward()
    assert pose.grad is not None and bool(torch.isfinite(pose.grad).all())
    samples = prior.sample(4, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (4, prior.num_joints, 3) and samples.device.type == device.type and samples.dtype == dtype
    projected = prior.project(x)
    assert projected.shape == x.shape and projected.device.type == device.type and projected.dtype == dtype
    denoised = prior.project(x, noise_std=0.1, **({"steps": 2} if "steps" in prior.project_options(True) else {}))
    assert denoised.dtype == dtype and bool(torch.isfinite(denoised).all())
    cpu = copy.deepcopy(prior).to(device="cpu", dtype=torch.float64)
    torch.testing.assert_close(lp.cpu().double(), cpu.log_prob(x.cpu().double()), atol=1e-2, rtol=1e-3)
    # frozen, as load() returns it: the flows fold their linear maps (in float64: on the CPU for MPS)
    frozen = copy.deepcopy(prior).requires_grad_(False)
    torch.testing.assert_close(frozen.log_prob(x), lp, atol=1e-2 if dtype == torch.float64 else 0.1, rtol=1e-3)
    mask = torch.ones(5, prior.num_joints, dtype=torch.bool, device=device)
    mask[:2, -1] = False
    completed = frozen.project(x, mask)
    assert completed.device.type == device.type and bool(torch.isfinite(completed).all())
    drawn = frozen.sample(2, generator=torch.Generator().manual_seed(0), observed=x, mask=mask)
    assert drawn.shape == (2, 5, prior.num_joints, 3) and drawn.device.type == device.type
    assert frozen.to_smplx(samples.cpu()).shape == (4, skeleton.NUM_JOINTS, 3)  # a CPU pose, a prior elsewhere
    refit = copy.deepcopy(prior).train().requires_grad_(True)  # the closed-form fits (float64: CPU for MPS)
    refit.initialize_from_data(data.to(device=device, dtype=dtype))
    assert refit.device.type == device.type and bool(torch.isfinite(refit.log_prob(x)).all())


assert skeleton.resolve_joints(BODY_HAND)
