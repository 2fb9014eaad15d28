"""Recipes: strict YAML -> frozen dataclasses, with `--set key=value` overrides.

A recipe is data, not code. An unknown key is an error naming the valid keys (nanoGPT's rule), a wrong type is an
error naming the key, the value and the expected type, and the resolved recipe is what a run saves.

Sections: `name`, `seed`, `data`, `model`, `train`, `tricks` (each trick by its own config class in
medtricks/tricks/) and `attack` (the defaults of `medtricks attack`, AttackSettings).

This module is the recipe's vocabulary (the valid values of every key: AUGMENT_PRESETS, THRESHOLD_METHODS, ...)
and its only loader: data/, models/, metrics and the commands import it; it imports only the trick configs and
medtricks.config (the strict YAML-to-dataclass machinery: build_dataclass, set_key, recipe_differences).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from medtricks.config import build_dataclass, field_names, parse_yaml, plain, recipe_differences, set_key
from medtricks.errors import AttackError, DataError, RecipeError, short
from medtricks.files import RECIPE_FILE, read_text
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

ATTACK_METHODS = ("pgd", "fgsm", "apgd", "autoattack")
CORRUPTION_PRESETS = ("radiograph", "fundus", "dermoscopy")  # medtricks.corruptions.PRESETS (a test keeps them equal)
AUGMENT_PRESETS = ("bag_of_tricks", "cxr", "fundus", "dermoscopy", "none")
# The flips each train-time preset draws (medtricks.data.transforms): the symmetries its modality allows (none for
# radiographs: left/right anatomy). Test-time augmentation (medtricks.tta) averages over exactly these.
PRESET_FLIPS = {"bag_of_tricks": ("horizontal",), "cxr": (), "fundus": ("horizontal", "vertical"),
                "dermoscopy": ("horizontal", "vertical"), "none": ()}
IMAGE_SIZES = (8, 4096)  # data.image_size bounds, in pixels (a run's model.json is held to them too)
CROP_FRACTIONS = (0.1, 1.0)  # data.crop_fraction bounds
CACHE_MODES = ("auto", "memory", "disk", "none")
TASKS = ("single", "multilabel")  # data.task
INPUT_MODES = ("sum", "repeat")
# how medtricks.metrics.choose_threshold places the binary operating point on validation; besides these two, a
# target "sensitivity@0.95" / "specificity@0.9" (THRESHOLD_TARGET): the best threshold that reaches it on validation
THRESHOLD_METHODS = ("youden", "logistic")
CALIBRATION_METHODS = ("temperature",)  # medtricks.calibration
THRESHOLD_TARGET = re.compile(r"(sensitivity|specificity)@(0?\.[0-9]+|1(\.0*)?)")


def threshold_target(method: str) -> tuple[str, float] | None:
    """'sensitivity@0.95' -> ('sensitivity', 0.95); None for youden / logistic; RecipeError for anything else."""
    if method in THRESHOLD_METHODS:
        return None
    match = THRESHOLD_TARGET.fullmatch(method) if isinstance(method, str) else None
    if match is None or not 0.0 < float(match.group(2)) <= 1.0:
        raise RecipeError(f"recipe key 'train.threshold' = {short(method)}; choose one of {list(THRESHOLD_METHODS)} "
                          f"or a target such as sensitivity@0.95 or specificity@0.9 (a rate in (0, 1]).")
    return match.group(1), float(match.group(2))


@dataclass(frozen=True)
class SplitConfig:
    """Fractions of patients (of images when the source has no patient ids) per split; they must sum to 1.

    With `folds` = K >= 2 the split is cross-validation fold `fold` of K (medtricks.data.splits.split_source):
    test = that fold of the source's non-test patients, train / val = the other folds at the train : val ratio
    (the `test` fraction and the source's own test split are then unused). `ablate --folds` sets both.

    `seed` fixes the split (and the folds) whatever the recipe's seed: runs that differ only in their training seed
    then share their validation and test images, as an ensemble of seeds needs (None: the recipe's seed).
    """

    train: float = 0.7
    val: float = 0.15
    test: float = 0.15
    folds: int = 0
    fold: int = 0
    seed: int | None = None

    def __post_init__(self):
        if self.folds == 1 or self.folds < 0 or self.folds > 100:
            raise RecipeError(f"recipe key 'data.split.folds' = {self.folds}: 0 (no cross-validation) or 2-100.")
        if not 0 <= self.fold < max(self.folds, 1):
            raise RecipeError(f"recipe key 'data.split.fold' = {self.fold}: must be in 0..{max(self.folds, 1) - 1}.")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise RecipeError(f"recipe key 'data.split.seed' = {self.seed}: must lie in [0, 2^32), or null for the "
                              f"recipe's seed.")
        if self.folds and self.val <= 0:
            raise RecipeError("recipe key 'data.split.val' must be > 0 with data.split.folds: each fold selects its "
                              "epoch and threshold on a validation split carved from its training folds.")
        for name in ("train", "val", "test"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise RecipeError(f"recipe key 'data.split.{name}' = {getattr(self, name)} must lie in [0, 1].")
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise RecipeError(
                f"recipe keys data.split.train/val/test = {self.train}/{self.val}/{self.test} must sum to 1."
            )
        if self.train <= 0:
            raise RecipeError("recipe key 'data.split.train' must be > 0: training needs images.")

    def seed_for(self, recipe_seed: int) -> int:
        """The seed of the split: `seed`, else the recipe's."""
        return recipe_seed if self.seed is None else self.seed


@dataclass(frozen=True)
class DataConfig:
    """The `data:` section.

    Attributes:
        source: data folder or file (ImageFolder, labels.csv / CSV manifest, MedMNIST .npz, DICOM); `--data` wins.
        classes: class names in label order; None takes them from the source (sorted).
        channels: 1 (grey: CXR) or 3 (colour: fundus, dermoscopy).
        image_size: side in pixels of the square image the model sees.
        augment: train-time preset, one of AUGMENT_PRESETS (see medtricks.data.transforms).
        crop_fraction: eval preset resizes the short side to image_size / crop_fraction, then centre-crops.
        split: fractions for the seeded, stratified, patient-level split when the source defines none.
        cache: where decoded, resized images are kept after the first epoch: memory, disk, none, or auto
            (memory when the estimate is under cache_memory_gb, else disk).
        cache_dir: disk cache folder; None = $MEDTRICKS_CACHE/images or ~/.cache/medtricks/images.
        cache_memory_gb: the memory budget of `cache: auto`.
        on_error: what an unreadable image does: raise (stop, naming every bad file) or skip (leave it out,
            and list it in a warning and in the run).
        workers: DataLoader worker processes; None = min(4, CPU count).
        ordinal: the classes are ordered grades, in label order (diabetic retinopathy 0-4): every report adds the
            quadratic and linear weighted kappa of the decisions (with a bootstrap interval for the quadratic one).
        synth_if_missing: when the source folder does not exist, write synthetic phantoms there first (the
            offline `demo` recipe; `medtricks data synth`).
        task: single (one class per image: softmax) or multilabel (any subset of `classes`, the findings, per image:
            one sigmoid per finding; see README "Multi-label"). A record's label is then a multi-hot tuple.
        label_column: the CSV manifest column holding the labels (e.g. finding_labels of ChestX-ray14).
        label_separator: multilabel: what separates the findings of one image in the label column
            (`Pneumonia|Infiltration`).
        no_finding: multilabel: the label meaning "none of the findings" (all zeros); it may not be one of
            `classes` and never appears with a finding. An empty label cell is an error, not a negative image.
    """

    source: str | None = None
    classes: tuple[str, ...] | None = None
    channels: int = 1
    image_size: int = 224
    augment: str = "cxr"
    crop_fraction: float = 0.875
    split: SplitConfig = field(default_factory=SplitConfig)
    cache: str = "auto"
    cache_dir: str | None = None
    cache_memory_gb: float = 2.0
    on_error: str = "raise"
    workers: int | None = None
    synth_if_missing: bool = False
    ordinal: bool = False
    task: str = "single"
    label_column: str = "label"
    label_separator: str = "|"
    no_finding: str | None = "No Finding"

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    def __post_init__(self):
        if self.task not in TASKS:
            raise RecipeError(f"recipe key 'data.task' = {short(self.task)}; choose one of {list(TASKS)}.")
        if not self.label_separator or self.label_separator != self.label_separator.strip():
            raise RecipeError(f"recipe key 'data.label_separator' = {short(self.label_separator)}: give one or more "
                              f"non-blank characters such as '|'.")
        if not self.label_column.strip():
            raise RecipeError("recipe key 'data.label_column' is empty; name the CSV column holding the labels.")
        if self.multilabel and self.ordinal:
            raise RecipeError("recipe keys 'data.task' = multilabel and 'data.ordinal' = true: findings are not "
                              "ordered grades; set data.ordinal: false.")
        if self.multilabel:  # a separator inside data.no_finding or a class name
            from medtricks.data.sources import LabelFormat  # (the data layer imports slowly; recipes load first)

            try:
                LabelFormat.of(self).check_classes(self.classes)
            except DataError as exc:
                raise RecipeError(f"recipe key {exc}") from exc
        if self.multilabel and self.classes is not None and self.no_finding in self.classes:
            raise RecipeError(f"recipe key 'data.no_finding' = {short(self.no_finding)} is also in data.classes; the "
                              f"no-finding label means 'none of the classes': remove it from data.classes.")
        if self.channels not in (1, 3):
            raise RecipeError(f"recipe key 'data.channels' = {self.channels} must be 1 (grey) or 3 (colour).")
        if not IMAGE_SIZES[0] <= self.image_size <= IMAGE_SIZES[1]:
            raise RecipeError(f"recipe key 'data.image_size' = {self.image_size} must lie in [{IMAGE_SIZES[0]}, "
                              f"{IMAGE_SIZES[1]}] pixels.")
        if self.augment not in AUGMENT_PRESETS:
            raise RecipeError(f"recipe key 'data.augment' = {short(self.augment)}; choose one of "
                              f"{list(AUGMENT_PRESETS)}.")
        if not CROP_FRACTIONS[0] <= self.crop_fraction <= CROP_FRACTIONS[1]:
            raise RecipeError(f"recipe key 'data.crop_fraction' = {self.crop_fraction} must lie in "
                              f"[{CROP_FRACTIONS[0]:g}, {CROP_FRACTIONS[1]:g}].")
        if self.cache not in CACHE_MODES:
            raise RecipeError(f"recipe key 'data.cache' = {short(self.cache)}; choose one of {list(CACHE_MODES)}.")
        if self.on_error not in ("raise", "skip"):
            raise RecipeError(f"recipe key 'data.on_error' = {short(self.on_error)}; choose 'raise' or 'skip'.")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise RecipeError(f"recipe key 'data.classes' = {list(self.classes)} has duplicate names.")
        if self.classes is not None and not all(c.strip() for c in self.classes):
            raise RecipeError(f"recipe key 'data.classes' = {list(self.classes)} has an empty name; every class needs "
                              f"one (it is matched against the labels and names reports and files).")
        if self.workers is not None and self.workers < 0:
            raise RecipeError(f"recipe key 'data.workers' = {self.workers} must be >= 0 (0 = main process).")


@dataclass(frozen=True)
class BNResetConfig:
    """One entry of `model.bn_reset` (see medtricks.models.surgery.apply_bn_reset, which checks the values; the
    recipe check before any data is read calls it: medtricks.models.build.check_model_config)."""

    stages: tuple[str, ...]
    gamma: str = "zero"
    which: str = "last_in_block"
    beta: str = "keep"
    running_stats: str = "keep"


@dataclass(frozen=True)
class ModelConfig:
    """The `model:` section.

    Attributes:
        arch: resnet18 | resnet50 | resnet50d | densenet121 | efficientnet_lite0.
        weights: imagenet | imagenet_v2 | sin | sin_in | sin_in_in | none, or a local file path
            (`medtricks weights list`).
        input_mode: for 1-channel data: sum (fold the first conv's RGB filters) or repeat (grey -> 3 channels).
        bn_reset: BatchNorm resets applied once after the weights are loaded, in order.
        freeze: stages whose parameters are not trained (their BN layers stay in eval mode).
        lr_multipliers: {stage: multiplier of the learning rate} for discriminative fine-tuning.
    """

    arch: str = "efficientnet_lite0"
    weights: str = "imagenet"
    input_mode: str = "sum"
    bn_reset: tuple[BNResetConfig, ...] = ()
    freeze: tuple[str, ...] = ()
    lr_multipliers: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.input_mode not in INPUT_MODES:
            raise RecipeError(f"recipe key 'model.input_mode' = {short(self.input_mode)}; choose one of "
                              f"{list(INPUT_MODES)}.")
        negative = {stage: m for stage, m in self.lr_multipliers.items() if not m >= 0}
        if negative:
            raise RecipeError(f"recipe key 'model.lr_multipliers' = {negative}: multipliers must be >= 0.")


SELECT_METRICS = ("auroc", "balanced_accuracy", "accuracy", "f1", "loss")


@dataclass(frozen=True)
class TrainConfig:
    """The `train:` section.

    Attributes:
        epochs: passes over the training split.
        batch_size: images per optimizer step, over all processes of a distributed run (torchrun): each process
            takes batch_size / processes, so the same recipe gives the same steps and LR at any process count.
        optimizer: sgd (Nesterov momentum, the paper's) or adamw.
        lr: base learning rate (scaled by batch_size / base_batch when the linear_scaling trick is on).
        momentum, nesterov: SGD momentum; for adamw momentum is beta1.
        weight_decay: L2 / decoupled weight decay (biases and norms exempt with the no_bias_decay trick).
        grad_clip: max gradient norm, None = no clipping.
        select_metric: validation metric that picks the saved epoch (auroc, balanced_accuracy, accuracy, f1, loss).
        threshold: how the binary operating threshold is estimated on validation (medtricks.metrics.choose_threshold):
            youden (the empirical maximum of sensitivity + specificity), logistic (where a class-balanced logistic
            fit on the score crosses 1/2: steadier on a small or nearly separable validation split), or a target:
            sensitivity@0.95 (the highest threshold whose validation sensitivity is at least 0.95, i.e. the best
            specificity there) or specificity@0.9 (the lowest threshold with validation specificity >= 0.9).
        calibrate: temperature (fit one temperature on validation after the epoch is selected, Guo et al. 2017:
            medtricks.calibration; stored in model.json and applied by every command that opens the run) or None.
        tta: score with test-time augmentation (medtricks.tta): after the epoch is selected (on scores without it),
            validation and test are scored as the mean over the flips data.augment draws, the threshold and any
            temperature are chosen on those scores, and every command that opens the run uses the averaged model.
            An augment preset without flips (cxr, none) has nothing to average and is refused.
        early_stopping: stop after this many epochs without improvement of select_metric; None = never.
        eval_batch_size: images per evaluation batch (on each process of a distributed run).
        device: auto (CUDA when available), cpu or cuda.
        limit_train_batches: at most this many steps per epoch (quick checks); None = all.
        sync_bn: distributed runs only: BatchNorm statistics over the global batch (SyncBatchNorm) instead of each
            process's share; costs a collective per BN layer; CUDA only (torch's SyncBatchNorm does not run on CPU).
    """

    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    grad_clip: float | None = None
    select_metric: str = "auroc"
    threshold: str = "youden"
    calibrate: str | None = None
    tta: bool = False
    early_stopping: int | None = None
    eval_batch_size: int = 64
    device: str = "auto"
    limit_train_batches: int | None = None
    sync_bn: bool = False  # off: per-process BN statistics, as torchvision's references and timm default to

    def __post_init__(self):
        checks = [("epochs", self.epochs >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
                  ("lr", self.lr > 0, "> 0"), ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
                  ("weight_decay", self.weight_decay >= 0, ">= 0"), ("eval_batch_size", self.eval_batch_size >= 1,
                                                                     ">= 1"),
                  ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "> 0 or null"),
                  ("early_stopping", self.early_stopping is None or self.early_stopping >= 1, ">= 1 or null"),
                  ("limit_train_batches", self.limit_train_batches is None or self.limit_train_batches >= 1,
                   ">= 1 or null")]
        for key, ok, rule in checks:
            if not ok:
                raise RecipeError(f"recipe key 'train.{key}' = {getattr(self, key)} must be {rule}.")
        if self.optimizer not in ("sgd", "adamw"):
            raise RecipeError(f"recipe key 'train.optimizer' = {short(self.optimizer)}; choose 'sgd' or 'adamw'.")
        if self.select_metric not in SELECT_METRICS:
            raise RecipeError(f"recipe key 'train.select_metric' = {short(self.select_metric)}; choose one of "
                              f"{list(SELECT_METRICS)}.")
        threshold_target(self.threshold)
        if self.calibrate is not None and self.calibrate not in CALIBRATION_METHODS:
            raise RecipeError(f"recipe key 'train.calibrate' = {short(self.calibrate)}; choose one of "
                              f"{list(CALIBRATION_METHODS)} or null (no calibration).")
        if self.device not in ("auto", "cpu", "cuda"):
            raise RecipeError(f"recipe key 'train.device' = {short(self.device)}; choose auto, cpu or cuda.")


@dataclass(frozen=True)
class TricksConfig:
    """The `tricks:` section: a present key turns a trick on (`{}` = its documented defaults), absent or null = off.
    Each trick's fields and method card live in medtricks/tricks/<name>.py."""

    linear_scaling: LinearScalingConfig | None = None
    warmup: WarmupConfig | None = None
    cosine: CosineConfig | None = None
    step_decay: StepDecayConfig | None = None
    label_smoothing: LabelSmoothingConfig | None = None
    mixup: MixupConfig | None = None
    cutmix: CutMixConfig | None = None
    distillation: DistillationConfig | None = None
    no_bias_decay: NoBiasDecayConfig | None = None
    amp: AmpConfig | None = None
    zero_gamma: ZeroGammaConfig | None = None
    ema: EmaConfig | None = None
    class_balance: ClassBalanceConfig | None = None
    ordinal_decoding: OrdinalDecodingConfig | None = None

    def __post_init__(self):
        if self.cosine is not None and self.step_decay is not None:
            raise RecipeError("tricks.cosine and tricks.step_decay are both on; a run has one LR decay: remove one.")

    def enabled(self) -> list[str]:
        """Names of the tricks that are on, in field order."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


@dataclass(frozen=True)
class AttackSettings:
    """The `attack:` section, the defaults of `medtricks attack` (medtricks.robustness.attack).

    Attributes:
        method: one of ATTACK_METHODS: pgd, fgsm, apgd (Croce & Hein 2020, no step size to tune) or autoattack
            (APGD-CE + APGD-T, per-image worst case; medtricks.apgd).
        eps: budgets in [0, 1] intensity units (L-inf: per pixel; L2: per image).
        steps: PGD / APGD steps (for each ensemble member).
        step_size: per PGD step; None = 2.5 x eps / steps (APGD sets its own).
        norm: linf or l2.
        restarts: PGD / APGD random restarts.
        random_start: PGD starts from a uniform point of the eps ball (APGD always does).
        loss: what APGD ascends, ce or margin (medtricks.apgd.margin_loss; defined for two classes too).
        corruptions: preset of `medtricks corrupt` and `ablate --corruptions` (one of CORRUPTION_PRESETS); None =
            the modality of data.augment (medtricks.corruptions.default_preset).
        severities: corruption severities among 1-5.
        targeted: towards target_class; without one, binary: towards the flipped label.
        target_class: class name of a targeted attack (required with more than two classes).
        seed: seed of the random starts.
    """

    method: str = "pgd"
    eps: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
    steps: int = 10
    step_size: float | None = None
    norm: str = "linf"
    restarts: int = 1
    random_start: bool = True
    loss: str = "ce"
    corruptions: str | None = None
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    targeted: bool = False
    target_class: str | None = None
    seed: int = 0

    def __post_init__(self):
        if self.method not in ATTACK_METHODS:
            raise AttackError(f"attack {short(self.method)} (attack.method): choose one of "
                              f"{', '.join(ATTACK_METHODS)} (--pgd, --fgsm, --apgd, --autoattack).")
        if self.loss not in ("ce", "margin"):
            raise AttackError(f"attack loss {short(self.loss)} (--loss / attack.loss): choose ce or margin.")
        if self.loss != "ce" and self.method != "apgd":
            raise AttackError(f"--loss {short(self.loss)} (attack.loss) applies to --apgd only ({self.method} ascends "
                              f"the cross-entropy; the --autoattack ensemble has its own losses).")
        if self.corruptions is not None and self.corruptions not in CORRUPTION_PRESETS:
            raise AttackError(f"attack.corruptions {short(self.corruptions)}: choose one of "
                              f"{', '.join(CORRUPTION_PRESETS)}, or null for the preset of data.augment.")
        if not self.severities or any(isinstance(s, bool) or s not in (1, 2, 3, 4, 5) for s in self.severities):
            raise AttackError(f"attack.severities {short(self.severities)}: give severities among 1-5, e.g. "
                              f"[1, 2, 3, 4, 5].")
        if self.method == "autoattack" and self.targeted:
            raise AttackError("--autoattack is untargeted: its APGD-T members pick their own targets (the most likely "
                              "wrong classes); drop --targeted, or use --apgd --targeted.")
        if isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise AttackError(f"--seed {self.seed} (attack.seed): must lie in [0, 2^32) (the random starts' seed).")
        if not self.eps:
            raise AttackError("give at least one eps (e.g. --eps 1/255,2/255).")
        for eps in self.eps:
            upper = 1.0 if self.norm == "linf" else math.inf
            if not (0 < eps <= upper and math.isfinite(eps)):
                raise AttackError(f"eps {eps} (--eps / attack.eps): must be in (0, {upper:g}] (a fraction of the "
                                  f"intensity range; 8/255 = 0.031).")
        if self.steps < 1:
            raise AttackError(f"--steps {self.steps}: must be >= 1.")
        if self.restarts < 1:
            raise AttackError(f"--restarts {self.restarts}: must be >= 1.")
        if self.norm not in ("linf", "l2"):
            raise AttackError(f"--norm {short(self.norm)}: choose linf or l2.")
        if self.step_size is not None and not (self.step_size > 0 and math.isfinite(self.step_size)):
            raise AttackError(f"--step-size {self.step_size}: must be > 0.")
        if self.method == "fgsm" and self.step_size is not None:
            raise AttackError("--step-size does not apply to FGSM, which takes one step of size eps.")
        if self.method in ("apgd", "autoattack") and self.step_size is not None:
            raise AttackError(f"--step-size does not apply to {self.method}: APGD starts at 2 eps and halves the step "
                              f"where the loss stops rising.")


@dataclass(frozen=True)
class Recipe:
    name: str
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tricks: TricksConfig = field(default_factory=TricksConfig)
    attack: AttackSettings = field(default_factory=AttackSettings)

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", self.name):
            raise RecipeError(f"recipe key 'name' = {short(self.name)}: use letters, digits, '.', '-' and '_' (at most "
                              f"100; it names the run folder runs/<name>-<time>).")
        if not 0 <= self.seed < 2**32:
            raise RecipeError(f"recipe key 'seed' = {self.seed} must lie in [0, 2^32) (NumPy's seed range).")
        if self.data.multilabel:
            _check_multilabel(self)
        if self.train.tta and not PRESET_FLIPS[self.data.augment]:
            raise RecipeError(f"recipe key 'train.tta' is on but data.augment {self.data.augment!r} draws no flips"
                              f"{' (left/right anatomy of radiographs)' if self.data.augment == 'cxr' else ''}, so "
                              f"test-time augmentation would average the image with itself; set train.tta: false.")
        if self.tricks.ordinal_decoding is not None and not self.data.ordinal:
            raise RecipeError("recipe key 'tricks.ordinal_decoding' is on but 'data.ordinal' is false: the decoding "
                              "cuts an expected grade, so the classes must be ordered grades; set data.ordinal: true "
                              "or remove the trick.")

    def to_dict(self) -> dict:
        """Plain data for YAML/JSON (tuples become lists)."""
        return plain(dataclasses.asdict(self))


def _check_multilabel(recipe: Recipe) -> None:
    """Refuse, naming the key, what data.task: multilabel does not support (yet)."""
    refused = []
    if recipe.tricks.class_balance is not None and recipe.tricks.class_balance.mode == "sampler":
        refused.append(("tricks.class_balance.mode", "sampler", "a multi-label image belongs to several classes at "
                        "once, so there is no class to balance the draws by; use mode: loss (per-finding pos_weight)"))
    if recipe.tricks.distillation is not None:
        refused.append(("tricks.distillation", "on", "the distillation loss is softmax-based; remove the trick"))
    if recipe.train.calibrate is not None:
        refused.append(("train.calibrate", recipe.train.calibrate, "temperature scaling is fitted on a softmax; set "
                        "train.calibrate: null"))
    if refused:
        key, value, why = refused[0]
        raise RecipeError(f"recipe key '{key}' = {short(value)} is not supported with data.task: multilabel ({why}).")


def bundled_recipes() -> list[str]:
    """Names of the recipes shipped with medtricks."""
    return sorted(p.name[:-5] for p in resources.files("medtricks.recipes").iterdir() if p.name.endswith(".yaml"))


def recipe_text(name_or_path: str | Path) -> tuple[str, str]:
    """The YAML text of a recipe and where it came from (a file path, or `medtricks:NAME` for a bundled one)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} not found. Give a recipe name ({', '.join(bundled_recipes())}) "
                              f"or an existing YAML file.")
        try:
            return read_text(path), str(path)
        except UnicodeDecodeError as exc:
            raise RecipeError(f"recipe file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8.") from exc
        except ValueError as exc:
            raise RecipeError(f"recipe file {path}: {exc}; give the recipe's YAML file.") from exc
        except OSError as exc:
            raise RecipeError(f"recipe file {path} cannot be read ({exc.strerror or exc}).") from exc
    bundled = resources.files("medtricks.recipes") / f"{name_or_path}.yaml"
    if not bundled.is_file():
        raise RecipeError(f"unknown recipe {str(name_or_path)!r}; bundled recipes: {', '.join(bundled_recipes())}; "
                          f"or pass the path of a YAML file.")
    return bundled.read_text(), f"medtricks:{name_or_path}"


def load_recipe(name_or_path: str | Path, overrides: typing.Sequence[str] = (), seed: int | None = None) -> Recipe:
    """Load a bundled recipe by name or a YAML file by path, apply `--set` overrides, and validate strictly.

    Example:
        >>> recipe = load_recipe("demo", ["data.image_size=128"])
    """
    text, origin = recipe_text(name_or_path)
    raw = parse_yaml(text, f"recipe {origin}")
    if raw is None:
        raise RecipeError(f"recipe {origin} is empty; a recipe needs at least its sections (see `medtricks recipes "
                          f"show demo`).")
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {origin}: the top level must be a mapping with keys {field_names(Recipe)}.")
    raw.setdefault("name", re.sub(r"[^A-Za-z0-9_.-]", "_", Path(str(name_or_path)).stem).lstrip("._-") or "recipe")
    return load_recipe_from_dict(raw, overrides, seed)


def load_recipe_from_dict(raw: dict, overrides: typing.Sequence[str] = (), seed: int | None = None) -> Recipe:
    """A Recipe from plain data (Recipe.to_dict(), a parsed YAML file), with `--set` overrides and a seed."""
    raw = copy.deepcopy(raw)
    for assignment in overrides:
        set_key(raw, assignment)
    if seed is not None:
        raw["seed"] = seed
    return build_dataclass(Recipe, raw)


def resolve_recipe(recipe: Recipe | str | Path, overrides: typing.Sequence[str] = (),
                   seed: int | None = None) -> Recipe:
    """A Recipe from a Recipe, a bundled name or a YAML path, with overrides and a seed applied."""
    if not isinstance(recipe, Recipe):
        return load_recipe(recipe, overrides, seed)
    return load_recipe_from_dict(recipe.to_dict(), overrides, seed) if overrides or seed is not None else recipe


def recipe_for_run(recipe: Recipe | str | Path | None = None, overrides: typing.Sequence[str] = (),
                   seed: int | None = None, resume_from: str | Path | None = None) -> Recipe:
    """The recipe a fine-tune runs with.

    Args:
        recipe: a Recipe, bundled name or YAML path; None = the run's own when resuming, else the bundled demo.
        overrides: `--set` strings.
        seed: overrides the recipe seed.
        resume_from: an unfinished run directory: its saved recipe.yaml is the recipe, and a recipe, overrides or
            seed given again must leave it unchanged (resuming with other settings would mix two experiments).

    Raises:
        RecipeError: a bad recipe, or one that differs from the resumed run's (naming the keys).
    """
    if resume_from is None:
        return resolve_recipe(recipe if recipe is not None else "demo", overrides, seed)
    if not Path(resume_from).is_dir():
        raise RecipeError(f"--resume needs an existing run directory as --out; {resume_from} is not one.")
    saved_file = Path(resume_from) / RECIPE_FILE
    if not saved_file.is_file():
        raise RecipeError(f"{resume_from}: no {RECIPE_FILE}, so this is not a medtricks run that can be resumed; "
                          f"choose a new --out.")
    saved = load_recipe(saved_file)
    if recipe is None and not overrides and seed is None:
        return saved
    given = resolve_recipe(recipe if recipe is not None else saved, overrides, seed)
    changed = recipe_differences(given.to_dict(), saved.to_dict())
    if changed:
        raise RecipeError(f"{resume_from}: the given recipe differs from the run's {RECIPE_FILE} in "
                          f"{', '.join(changed)}; resume without --recipe/--set/--seed (the run's own recipe is used), "
                          f"or start a new run.")
    return saved
