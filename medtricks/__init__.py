"""medtricks: fine-tune pretrained CNNs on medical images with a bag of tricks, then attack them.

The notebook API (each name is also a CLI command or backs one):

    >>> import medtricks
    >>> report = medtricks.check_data("../shared/data/cxr-nih")       # medtricks data check
    >>> bundle = medtricks.load_data(medtricks.load_recipe("my.yaml").data, "../shared/data/cxr-nih")
    >>> pixels, meta = medtricks.read_image("RG1_UNCR.dcm")             # float32 (1, H, W) in [0, 1]
"""

from medtricks.ablate import ablate
from medtricks.attacks import AttackSettings
from medtricks.compare import compare
from medtricks.data.check import check_data
from medtricks.data.images import read_image
from medtricks.data.pipeline import DataBundle, load_data
from medtricks.data.sources import Source, load_source
from medtricks.data.splits import assign_splits, find_leaks
from medtricks.data.synth import synthesize
from medtricks.errors import DataError, MedtricksError, RecipeError
from medtricks.finetune import evaluate, finetune, predict
from medtricks.models import apply_bn_reset, apply_freeze, create_model
from medtricks.recipe import DataConfig, Recipe, load_recipe
from medtricks.robustness import attack

__version__ = "0.1.0"
__all__ = [
    "AttackSettings",
    "DataBundle",
    "DataConfig",
    "DataError",
    "MedtricksError",
    "Recipe",
    "RecipeError",
    "Source",
    "__version__",
    "ablate",
    "apply_bn_reset",
    "attack",
    "apply_freeze",
    "assign_splits",
    "check_data",
    "compare",
    "create_model",
    "evaluate",
    "finetune",
    "find_leaks",
    "load_data",
    "load_recipe",
    "load_source",
    "predict",
    "read_image",
    "synthesize",
]
