"""medtricks: fine-tune pretrained CNNs on medical images with a bag of tricks, then attack them.

The notebook API (each name is also a CLI command or backs one):

    >>> import medtricks
    >>> report = medtricks.check_data("../shared/data/cxr-nih")       # medtricks data check
    >>> bundle = medtricks.load_data(medtricks.load_recipe("my.yaml").data, "../shared/data/cxr-nih")
    >>> pixels, meta = medtricks.read_image("RG1_UNCR.dcm")             # float32 (1, H, W) in [0, 1]
    >>> run = medtricks.open_run("runs/demo")                           # model, recipe, threshold of a run

Names are imported on first use (PEP 562), so `import medtricks` and `medtricks --help` do not wait for torch,
timm, scikit-learn or matplotlib.
"""

import sys
from importlib import import_module
from types import ModuleType

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "AttackSettings": "medtricks.recipe",
    "DataBundle": "medtricks.data.pipeline",
    "DataConfig": "medtricks.recipe",
    "DataError": "medtricks.errors",
    "MedtricksError": "medtricks.errors",
    "Recipe": "medtricks.recipe",
    "RecipeError": "medtricks.errors",
    "Run": "medtricks.runs",
    "Source": "medtricks.data.sources",
    "ablate": "medtricks.ablate",
    "apply_bn_reset": "medtricks.models.surgery",
    "apply_freeze": "medtricks.models.surgery",
    "assign_splits": "medtricks.data.splits",
    "attack": "medtricks.robustness",
    "check_data": "medtricks.data.check",
    "compare": "medtricks.compare",
    "corruption_report": "medtricks.corruption_report",
    "ensemble": "medtricks.ensemble",
    "explain": "medtricks.explain",
    "create_model": "medtricks.models.backbones",
    "evaluate": "medtricks.finetune",
    "finetune": "medtricks.finetune",
    "find_leaks": "medtricks.data.splits",
    "load_data": "medtricks.data.pipeline",
    "load_recipe": "medtricks.recipe",
    "load_source": "medtricks.data.sources",
    "open_run": "medtricks.runs",
    "predict": "medtricks.finetune",
    "read_image": "medtricks.data.images",
    "synthesize": "medtricks.data.synth",
}
__all__ = ["__version__", *sorted(_EXPORTS)]


class _Package(ModuleType):
    """The medtricks package object. Python binds every imported submodule as an attribute of its package, so
    importing medtricks.finetune would replace the function medtricks.finetune by its module (likewise ablate and
    compare): the public function wins. The modules stay reachable: importlib.import_module("medtricks.ablate")."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medtricks' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
