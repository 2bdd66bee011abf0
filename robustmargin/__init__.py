"""robustmargin: margins, implicit bias and L2 robustness of homogeneous neural networks.

The public API is a handful of names; everything else lives in the submodules. Each name is imported on
first use, so `import robustmargin` (and the command line's --help) does not load torch.
"""
import importlib
import sys
import types

__all__ = ["Config", "UserError", "adversarial_examples", "evaluate", "load_checkpoint", "load_config",
           "load_dataset", "load_preset", "load_split", "minimal_distances", "robust_accuracy_curve", "train"]
__version__ = "0.1.0"

# public name → the module that defines it
_HOMES = {
    "Config": "robustmargin.config",
    "UserError": "robustmargin.errors",
    "adversarial_examples": "robustmargin.rundir",
    "load_dataset": "robustmargin.data",
    "evaluate": "robustmargin.external",
    "load_checkpoint": "robustmargin.checkpoints",
    "load_config": "robustmargin.config",
    "load_preset": "robustmargin.config",
    "load_split": "robustmargin.rundir",
    "minimal_distances": "robustmargin.attacks",
    "robust_accuracy_curve": "robustmargin.robustness",
    "train": "robustmargin.train",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'robustmargin' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """`robustmargin.train` names the function, as `from robustmargin.train import train` made it before
    the names were lazy. Importing the submodule binds it on the package; that binding is refused here,
    so the function stays the attribute (the module is sys.modules["robustmargin.train"])."""

    @property
    def train(self):
        return self.__dict__["train"] if "train" in self.__dict__ else __getattr__("train")

    @train.setter
    def train(self, value):
        if not (isinstance(value, types.ModuleType) and value.__name__ == "robustmargin.train"):
            self.__dict__["train"] = value

    @train.deleter
    def train(self):
        self.__dict__.pop("train", None)


sys.modules[__name__].__class__ = _Package
