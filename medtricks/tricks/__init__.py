"""The bag of tricks: one module per trick, each with a method-card docstring, a frozen config dataclass (its fields
are the recipe keys under `tricks.<name>`) and plain functions usable from a notebook.

- linear_scaling: peak lr = lr x batch / base_batch (schedule).
- warmup: linear lr warmup from 0 (schedule).
- cosine: cosine lr decay after warmup (schedule).
- step_decay: lr x gamma at fractions of training, the paper's baseline (schedule).
- label_smoothing: cross-entropy against smoothed targets (loss).
- mixup: mix pairs of images and their targets (training step).
- cutmix: paste a box of another image, targets mixed by area (training step; in mixup.py).
- distillation: match a teacher run's softened predictions (training step and loss).
- no_bias_decay: no weight decay on biases and norm gamma/beta (optimizer groups).
- amp: bfloat16/float16 autocast, loss scaling for float16 on CUDA (training step).
- zero_gamma: gamma = 0 in the BN closing each residual branch (model build).
- ema: exponential moving average of the weights (training step).
- class_balance: inverse-frequency loss weights or a balanced sampler (loss or data).
- ordinal_decoding: cut the expected grade at points tuned on validation for weighted kappa (decision rule).

`TRICKS` maps each recipe key to its config class, in the order above.
"""

from medtricks.tricks.amp import AmpConfig
from medtricks.tricks.class_balance import ClassBalanceConfig
from medtricks.tricks.cosine import CosineConfig
from medtricks.tricks.distillation import DistillationConfig
from medtricks.tricks.ema import EmaConfig
from medtricks.tricks.label_smoothing import LabelSmoothingConfig
from medtricks.tricks.linear_scaling import LinearScalingConfig
from medtricks.tricks.mixup import CutMixConfig, MixupConfig
from medtricks.tricks.no_bias_decay import NoBiasDecayConfig
from medtricks.tricks.ordinal_decoding import OrdinalDecodingConfig
from medtricks.tricks.step_decay import StepDecayConfig
from medtricks.tricks.warmup import WarmupConfig
from medtricks.tricks.zero_gamma import ZeroGammaConfig

TRICKS: dict[str, type] = {
    "linear_scaling": LinearScalingConfig,
    "warmup": WarmupConfig,
    "cosine": CosineConfig,
    "step_decay": StepDecayConfig,
    "label_smoothing": LabelSmoothingConfig,
    "mixup": MixupConfig,
    "cutmix": CutMixConfig,
    "distillation": DistillationConfig,
    "no_bias_decay": NoBiasDecayConfig,
    "amp": AmpConfig,
    "zero_gamma": ZeroGammaConfig,
    "ema": EmaConfig,
    "class_balance": ClassBalanceConfig,
    "ordinal_decoding": OrdinalDecodingConfig,
}

__all__ = ["TRICKS"]
