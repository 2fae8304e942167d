"""Small instances of every family and synthetic pose data, shared by the tests."""

from __future__ import annotations

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


assert skeleton.resolve_joints(BODY_HAND)
