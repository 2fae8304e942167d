"""The model families. Each is a :class:`PosePrior` registered under its ``model_type``."""

from posepriors.priors.base import PosePrior, PriorConfig, get_validation, register_model, set_validation
from posepriors.priors.gaussian import GaussianConfig, GaussianPrior
from posepriors.priors.gmm import GMMConfig, GMMPrior

__all__ = [
    "GMMConfig",
    "GMMPrior",
    "GaussianConfig",
    "GaussianPrior",
    "PosePrior",
    "PriorConfig",
    "get_validation",
    "set_validation",
]

for _cls in (GaussianPrior, GMMPrior):
    register_model(_cls)
