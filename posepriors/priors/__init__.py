"""The model families. Each is a :class:`PosePrior` registered under its ``model_type``."""

from posepriors.priors.base import (
    PosePrior,
    PriorConfig,
    get_validation,
    register_model,
    set_validation,
    validation,
)
from posepriors.priors.flow_config import FlowConfig
from posepriors.priors.gaussian import GaussianConfig, GaussianPrior
from posepriors.priors.global_flow import GlobalFlowConfig, GlobalFlowPrior
from posepriors.priors.gmm import GMMConfig, GMMPrior
from posepriors.priors.hand_vae import HandDecoding, HandEncoding, HandVAE, HandVAEConfig
from posepriors.priors.joint_flow import JointFlowConfig, JointFlowPrior

__all__ = [
    "FlowConfig",
    "GMMConfig",
    "GMMPrior",
    "GaussianConfig",
    "GaussianPrior",
    "GlobalFlowConfig",
    "GlobalFlowPrior",
    "HandDecoding",
    "HandEncoding",
    "HandVAE",
    "HandVAEConfig",
    "JointFlowConfig",
    "JointFlowPrior",
    "PosePrior",
    "PriorConfig",
    "get_validation",
    "set_validation",
    "validation",
]

for _cls in (GaussianPrior, GlobalFlowPrior, GMMPrior, HandVAE, JointFlowPrior):
    register_model(_cls)
