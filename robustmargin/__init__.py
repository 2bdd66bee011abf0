"""robustmargin: margins, implicit bias and L2 robustness of homogeneous neural networks.

The public API is a handful of names; everything else lives in the submodules.
"""
from robustmargin.checkpoints import load_checkpoint
from robustmargin.config import Config, load_config, load_preset
from robustmargin.rundir import load_split
from robustmargin.errors import UserError
from robustmargin.train import train

__all__ = ["Config", "UserError", "evaluate", "load_checkpoint", "load_config", "load_preset", "load_split",
           "minimal_distances", "robust_accuracy_curve", "train"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # the attack stage imports foolbox lazily: keep `import robustmargin` light
    if name == "minimal_distances":
        from robustmargin.attacks import minimal_distances
        return minimal_distances
    if name == "evaluate":
        from robustmargin.external import evaluate
        return evaluate
    if name == "robust_accuracy_curve":
        from robustmargin.robustness import robust_accuracy_curve
        return robust_accuracy_curve
    raise AttributeError(f"module 'robustmargin' has no attribute {name!r}")
