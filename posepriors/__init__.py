"""posepriors: pretrained pose priors for SMPL-X bodies and hands.

>>> import torch, posepriors
>>> prior = posepriors.load("gaussian")          # bundled weights, works offline
>>> pose = torch.zeros(4, 55, 3)                  # SMPL-X axis-angle; also (*, 165), SMPL-H, dicts, ...
>>> prior.log_prob(pose).shape                    # one log-density per pose
torch.Size([4])
>>> prior.sample(2, generator=torch.Generator().manual_seed(0)).shape   # (n, J, 3) in prior.joints order
torch.Size([2, 51, 3])
"""

__version__ = "0.1.0"

from posepriors import rotations, skeleton  # noqa: E402
from posepriors.hub import (  # noqa: E402
    list_models,
    load,
    load_pretrained,
    push_to_hub,
    read_manifest,
    save_pretrained,
)
from posepriors.priors import (  # noqa: E402
    GaussianConfig,
    GaussianPrior,
    PosePrior,
    PriorConfig,
    get_validation,
    set_validation,
    validation,
)

_SUBMODULES = frozenset({"attach", "data", "evaluate", "fitting", "kinematics", "plots", "train", "utils"})


def __getattr__(name: str) -> object:
    """Submodules on first use (``posepriors.fitting.fit_keypoints`` without ``import posepriors.fitting``), so
    that ``import posepriors`` stays light."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"posepriors.{name}")
    raise AttributeError(f"module 'posepriors' has no attribute {name!r}")


__all__ = [
    "GaussianConfig",
    "GaussianPrior",
    "PosePrior",
    "PriorConfig",
    "__version__",
    "get_validation",
    "list_models",
    "load",
    "load_pretrained",
    "push_to_hub",
    "read_manifest",
    "rotations",
    "save_pretrained",
    "set_validation",
    "validation",
    "skeleton",
]
