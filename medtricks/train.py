"""The one training loop. Each step-time trick is named once: mixup/cutmix (`mix_batch`), AMP (autocast + scaler in
`train_epoch`), EMA (after each step). Schedule tricks live in `lr_factor` (a pure function of the step), optimizer
tricks in the parameter groups (`create_optimizer`), loss tricks (label smoothing, class weights, distillation) in
`create_loss`, model tricks at model build (medtricks.models.build).

`fit` runs epochs: `train_epoch` (the optimizer steps), `validate` (metrics and threshold on the validation split),
`Progress.select` (best epoch, early stopping), and the resume state (`Progress.state`, `Progress.restore`).

Under torchrun the same loop runs on every process (medtricks.distributed): the forward/backward goes through
DistributedDataParallel, everything else (EMA, evaluation, checkpoints) uses the plain model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medtricks import distributed
from medtricks.data.sampling import epoch_seed
from medtricks.errors import MedtricksError
from medtricks.models.backbones import MedModel
from medtricks.models.surgery import stage_parameter_groups
from medtricks.recipe import TrainConfig, TricksConfig
from medtricks.scoring import evaluate_split, predict_loader, val_threshold
from medtricks.tricks.amp import autocast, create_grad_scaler, resolve_amp_dtype
from medtricks.tricks.cosine import cosine_factor
from medtricks.tricks.distillation import distillation_loss
from medtricks.tricks.ema import create_ema, ema_update
from medtricks.tricks.label_smoothing import binary_label_smoothing_loss, label_smoothing_loss
from medtricks.tricks.mixup import cutmix_batch, mix_probability_gate, mixup_batch, one_hot
from medtricks.tricks.no_bias_decay import create_param_groups
from medtricks.tricks.step_decay import step_factor
from medtricks.tricks.warmup import warmup_factor

logger = logging.getLogger(__name__)
# the wall-clock fields of report.json's `train` and of each metrics.jsonl row: everything else is a function of
# the recipe, data and seed (compare runs without these)
TIMING_KEYS = frozenset({"seconds", "images_per_second", "data_wait_seconds"})
EXPLODING = 1000.0  # a loss this many times its epoch's first (finite) value gets a warning: the run is diverging
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, targets, images) -> scalar


class TrainingError(MedtricksError):
    """Training cannot go on (NaN/inf loss); the last good checkpoint is kept."""


def lr_factor(step: int, total_steps: int, warmup_steps: int, tricks: TricksConfig) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based): warmup x (cosine | step | 1)."""
    factor = warmup_factor(step, warmup_steps) if tricks.warmup is not None else 1.0
    if tricks.cosine is not None:
        factor *= cosine_factor(step, warmup_steps, total_steps, tricks.cosine.final_factor)
    elif tricks.step_decay is not None:
        factor *= step_factor(step, total_steps, tricks.step_decay.milestones, tricks.step_decay.gamma)
    return factor


def create_optimizer(model: MedModel, config: TrainConfig, tricks: TricksConfig, base_lr: float,
                     lr_multipliers: dict[str, float]) -> torch.optim.Optimizer:
    """Nesterov SGD or AdamW over stage groups (LR multipliers) split by the no_bias_decay trick."""
    groups = create_param_groups(stage_parameter_groups(model, lr_multipliers), config.weight_decay,
                                 no_bias_decay=tricks.no_bias_decay is not None)
    for group in groups:
        group["lr"] = base_lr * group["lr_mult"]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=base_lr, momentum=config.momentum, nesterov=config.nesterov and
                               config.momentum > 0)
    return torch.optim.AdamW(groups, lr=base_lr, betas=(config.momentum, 0.999))


def create_loss(tricks: TricksConfig, class_weights: torch.Tensor | None = None,
                teacher: nn.Module | None = None, multilabel: bool = False) -> Loss:
    """The training loss of (logits, targets, images): cross-entropy with the label_smoothing trick's smoothing and
    class_balance's weights (targets: class indices or mixup's soft targets, as torch's cross_entropy takes both).
    With a teacher (distillation) Hinton et al.'s loss against the teacher's logits for the same images, whose
    hard term carries the same smoothing and class weights. `multilabel`: binary cross-entropy with logits per
    finding (targets (N, L) multi-hot or mixed), smoothed towards 1/2, `class_weights` being the per-finding
    pos_weight (class_balance.label_pos_weights); no teacher."""
    smoothing = tricks.label_smoothing.smoothing if tricks.label_smoothing is not None else 0.0
    if multilabel:
        if teacher is not None:
            raise ValueError("distillation is not supported for multi-label tasks")
        return lambda logits, targets, images: binary_label_smoothing_loss(logits, targets.float(), smoothing,
                                                                           class_weights)
    if teacher is None:
        return lambda logits, targets, images: label_smoothing_loss(logits, targets, smoothing, class_weights)
    teacher.eval()
    distill = tricks.distillation

    def distilled(logits: torch.Tensor, targets: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(images).float()
        return distillation_loss(logits, teacher_logits, targets, distill.temperature, distill.weight, smoothing,
                                 class_weights)

    return distilled


def mix_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int, tricks: TricksConfig,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, targets): the labels as they are, or mixed images and soft targets when mixup/cutmix fires (at most
    one of them per batch; when both fire they alternate at random, as timm's Mixup with switch_prob 0.5).
    Multi-label targets ((N, L) multi-hot) are mixed as they are: lam y_i + (1 - lam) y_j per finding."""
    use_mixup = tricks.mixup is not None and mix_probability_gate(tricks.mixup.prob, generator)
    use_cutmix = tricks.cutmix is not None and mix_probability_gate(tricks.cutmix.prob, generator)
    if not (use_mixup or use_cutmix):
        return images, labels
    soft = labels.float() if labels.ndim == 2 else one_hot(labels, num_classes)
    if use_mixup and use_cutmix:
        use_mixup = mix_probability_gate(0.5, generator)
    if use_mixup:
        return mixup_batch(images, soft, tricks.mixup.alpha, generator)
    return cutmix_batch(images, soft, tricks.cutmix.alpha, generator)


@dataclass
class Progress:
    """Where training stands after an epoch: counters, the selected epoch and early-stopping state. With the model,
    optimizer, scaler and EMA states it is the resume state (`state`), from which an epoch continues exactly."""

    epoch: int = 0
    step: int = 0
    seen: int = 0  # images trained on, all ranks
    seconds: float = 0.0
    best_value: float | None = None
    best_loss: float | None = None  # the selected epoch's validation loss: breaks ties of best_value
    best_epoch: int = 0
    threshold: float | list[float] | None = None  # multi-label: one per finding
    stale: int = 0  # epochs since the selected metric last improved
    stopped: bool = False  # early stopping fired

    def select(self, metric: str, value: float | None, threshold: float | list[float] | None,
               patience: int | None, loss: float | None = None) -> bool:
        """Record the epoch's selection metric; True when it is the best so far (then also keep its threshold).

        A tie with the best so far goes to the epoch with the lower validation `loss`: on a small validation split
        AUROC and accuracy take few distinct values, and the first of two equal epochs is often a lucky early one."""
        if value is None:
            improved = self.best_value is None
        elif self.best_value is None:
            improved = True
        elif value == self.best_value:
            improved = loss is not None and self.best_loss is not None and loss < self.best_loss
        else:
            improved = value < self.best_value if metric == "loss" else value > self.best_value
        if improved:
            self.best_value, self.best_loss, self.best_epoch, self.threshold, self.stale = (
                value, loss, self.epoch, threshold, 0)
        else:
            self.stale += 1
        self.stopped = patience is not None and self.stale >= patience
        return improved

    def state(self, parts: _Parts) -> dict:
        """The resume state: these counters plus the model, optimizer, scaler and EMA states."""
        return {**dataclasses.asdict(self), "model": parts.model.state_dict(),
                "optimizer": parts.optimizer.state_dict(), "scaler": parts.scaler.state_dict(),
                "ema": parts.ema.state_dict() if parts.ema is not None else None}

    @classmethod
    def restore(cls, state: dict, parts: _Parts) -> Progress:
        """Load a resume state into the objects fit built; return its counters."""
        parts.model.load_state_dict(state["model"])
        parts.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            parts.scaler.load_state_dict(state["scaler"])
        if (parts.ema is None) != (state["ema"] is None):
            raise TrainingError("the resume state and the recipe disagree about tricks.ema; resume with the run's "
                                "own recipe.")
        if parts.ema is not None:
            parts.ema.load_state_dict(state["ema"])
        progress = cls(**{f.name: state.get(f.name, f.default) for f in dataclasses.fields(cls)})  # older states
        logger.info("resuming after epoch %d (global step %d)", progress.epoch, progress.step)
        return progress


@dataclass(frozen=True)
class Schedule:
    """The optimizer steps of a fit: `steps` per epoch of `total_steps`, the first `warmup_steps` warming up."""

    base_lr: float
    steps: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def create(cls, base_lr: float, loader_steps: int, config: TrainConfig, tricks: TricksConfig) -> Schedule:
        steps = loader_steps if config.limit_train_batches is None else min(loader_steps, config.limit_train_batches)
        warmup = round(tricks.warmup.epochs * steps) if tricks.warmup is not None else 0
        return cls(base_lr, steps, steps * config.epochs, warmup)


@dataclass
class _Parts:
    """What the epochs share, built once per fit."""

    model: MedModel  # EMA, evaluation and checkpoints use it (no `module.` prefix)
    trained: nn.Module  # the forward/backward path: DistributedDataParallel around `model`, or `model`
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: nn.Module | None
    amp_dtype: torch.dtype | None
    mix_generator: torch.Generator


@dataclass
class FitResult:
    best_epoch: int
    best_value: float
    threshold: float | list[float] | None
    seconds: float
    images_per_second: float
    epochs_run: int


@dataclass
class Callbacks:
    """What fit calls on rank 0 after each epoch, in this order (each optional): `save_best(model, row)` when the
    selected metric improved (the EMA model when EMA is on), `on_epoch(row)` with the metrics.jsonl row, and
    `save_state(state)` with the resume state."""

    save_best: Callable[[nn.Module, dict], None] | None = None
    on_epoch: Callable[[dict], None] | None = None
    save_state: Callable[[dict], None] | None = None

    def after_epoch(self, row: dict, improved_model: nn.Module | None, state: dict) -> None:
        if improved_model is not None and self.save_best is not None:
            self.save_best(improved_model, row)
        if self.on_epoch is not None:
            self.on_epoch(row)
        if self.save_state is not None:
            self.save_state(state)


def train_epoch(parts: _Parts, loader: DataLoader, loss_fn: Loss, config: TrainConfig, tricks: TricksConfig,
                schedule: Schedule, progress: Progress, device: torch.device) -> dict:
    """One epoch of schedule.steps optimizer steps; advances progress.step and returns the metrics.jsonl row's
    training fields (mean loss over the global batch, last lr, images, speed, time waiting for the loader).

    Raises:
        TrainingError: the loss (mean over all ranks, so every rank stops together) is NaN or infinite.
    """
    parts.model.train()
    world = distributed.world_size()
    loss_sum, images_seen, factor, first_loss, warned = 0.0, 0, 1.0, None, False
    started = asked = time.perf_counter()
    waited = 0.0  # seconds blocked on the loader: the input pipeline's share of the epoch
    for i, batch in enumerate(loader):
        waited += time.perf_counter() - asked
        if i >= schedule.steps:
            break
        factor = lr_factor(progress.step, schedule.total_steps, schedule.warmup_steps, tricks)
        for group in parts.optimizer.param_groups:
            group["lr"] = schedule.base_lr * group["lr_mult"] * factor
        images, labels = batch["image"].to(device), batch["label"].to(device)
        images, targets = mix_batch(images, labels, parts.model.num_classes, tricks, parts.mix_generator)
        try:
            with autocast(device, parts.amp_dtype):
                loss = loss_fn(parts.trained(images).float(), targets, images)
        except ValueError as exc:  # BatchNorm in training mode: a 1 x 1 feature map of a batch of one
            if "more than 1 value per channel" not in str(exc):
                raise
            raise TrainingError(f"a training batch of {len(images)} image leaves BatchNorm a single value per "
                                f"channel at this image size; set train.batch_size to 2 or more (with at least 2 "
                                f"training images per process), or raise data.image_size.") from exc
        global_loss = float(distributed.mean(loss.detach()))
        if not math.isfinite(global_loss):
            raise TrainingError(f"the training loss became {global_loss} at epoch {progress.epoch + 1}, step "
                                f"{i + 1} (global step {progress.step + 1}); training stopped and the last saved "
                                f"checkpoint is kept. Lower train.lr, set train.grad_clip, or turn off tricks.amp.")
        first_loss = global_loss if first_loss is None else first_loss
        if not warned and global_loss > EXPLODING * max(first_loss, 1.0):
            logger.warning("the training loss grew from %.3g to %.3g within epoch %d (step %d): training is "
                           "diverging; lower train.lr or set train.grad_clip.", first_loss, global_loss,
                           progress.epoch + 1, i + 1)
            warned = True
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scaler.scale(loss).backward()
        if config.grad_clip is not None:
            parts.scaler.unscale_(parts.optimizer)
            torch.nn.utils.clip_grad_norm_(parts.model.parameters(), config.grad_clip)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        if parts.ema is not None:
            ema_update(parts.ema, parts.model)
        loss_sum += global_loss * len(images) * world
        images_seen += len(images) * world  # images of the global batch
        progress.step += 1
        asked = time.perf_counter()
    seconds = time.perf_counter() - started
    return {"train_loss": loss_sum / max(images_seen, 1), "lr": schedule.base_lr * factor, "images": images_seen,
            "images_per_second": images_seen / max(seconds, 1e-9), "seconds": seconds, "data_wait_seconds": waited}


def validate(model: nn.Module, loader: DataLoader, device: torch.device, config: TrainConfig, seed: int,
             num_classes: int) -> tuple[dict, float | None, float | list[float] | None]:
    """Score `model` on the validation loader: (the metrics.jsonl row's val_* fields, the value of
    config.select_metric, the binary threshold chosen on these predictions with config.threshold; multi-label: the
    means over the findings, and one threshold per finding)."""
    out = predict_loader(model, loader, device)
    if not np.isfinite(out.probs).all():  # a finite training loss does not rule it out (BN statistics, EMA)
        raise TrainingError("the model's outputs on the validation split became NaN or infinite: the weights "
                            "diverged. Training stopped and the last saved checkpoint is kept. Lower train.lr, set "
                            "train.grad_clip, or turn off tricks.amp.")
    threshold = val_threshold(out, num_classes, config.threshold)
    metrics = evaluate_split(out, threshold, seed, n_boot=0)  # the row holds no interval
    row = {f"val_{k}": metrics[k] for k in ("loss", "auroc", "accuracy", "balanced_accuracy", "f1")}
    return row, metrics[config.select_metric], threshold


def fit(model: MedModel, train_loader: DataLoader, val_loader: DataLoader | None, config: TrainConfig,
        tricks: TricksConfig, *, base_lr: float, lr_multipliers: dict[str, float], device: torch.device, seed: int,
        loss_fn: Loss, callbacks: Callbacks | None = None, state: dict | None = None) -> FitResult:
    """Train `model`; after each epoch validate, select the best epoch on config.select_metric (with its
    validation threshold), stop early when asked, and call `callbacks` (see Callbacks) on rank 0.

    Every epoch is a function of the state at its start and (seed, epoch): the train loader's sampler must be a
    SeededSampler, and the mixing and dropout RNGs are reseeded per epoch. So `fit(..., state=saved)` with a state
    from `save_state` continues exactly as the uninterrupted run would have.

    Distributed (inside medtricks.distributed.process_group): call it on every rank with the rank's share of the
    data (SeededSampler num_replicas/rank, batch_size / world; val_loader over distributed.shard). Gradients are
    averaged over the ranks, the train loss and validation metrics are those of all ranks (the same on each, so
    every rank takes the same best-epoch and early-stopping decisions), and the callbacks run on rank 0 only.

    Raises:
        TrainingError: on a NaN or infinite loss (naming the epoch and step); what was saved stays.
    """
    callbacks = callbacks or Callbacks()
    schedule = Schedule.create(base_lr, len(train_loader), config, tricks)
    if config.sync_bn:
        model = distributed.convert_sync_batchnorm(model, device)
    amp_dtype = resolve_amp_dtype(device, tricks.amp.dtype) if tricks.amp is not None else None
    parts = _Parts(model, model, create_optimizer(model, config, tricks, base_lr, lr_multipliers),
                   create_grad_scaler(device, amp_dtype),
                   create_ema(model, tricks.ema.decay, len(train_loader) * config.epochs)
                   if tricks.ema is not None else None, amp_dtype,
                   torch.Generator())
    progress = Progress.restore(state, parts) if state is not None else Progress()
    parts.trained = distributed.wrap_model(model, device)
    rank, sampler = distributed.rank(), getattr(train_loader, "sampler", None)
    started = time.perf_counter() - progress.seconds
    while not progress.stopped and progress.epoch < config.epochs:
        epoch = progress.epoch + 1
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        parts.mix_generator.manual_seed(epoch_seed(seed, epoch, stream=1))  # the same on every rank
        torch.manual_seed(epoch_seed(seed, epoch, stream=2, rank=rank))  # dropout and drop-path: per rank's images
        row = {"epoch": epoch, **train_epoch(parts, train_loader, loss_fn, config, tricks, schedule, progress, device)}
        progress.epoch, progress.seen = epoch, progress.seen + row["images"]
        evaluated = parts.ema.module if parts.ema is not None else model
        distributed.broadcast_buffers(evaluated)  # rank 0's BN statistics everywhere: the model rank 0 saves
        if val_loader is not None:
            try:
                val_row, value, threshold = validate(evaluated, val_loader, device, config, seed, model.num_classes)
            except TrainingError as exc:
                raise TrainingError(f"epoch {epoch}: {exc}") from None
            row.update(val_row)
        else:  # no validation split: the last epoch is kept
            value, threshold = row["train_loss"] if config.select_metric == "loss" else -row["train_loss"], None
        row["best"] = progress.select(config.select_metric, value, threshold, config.early_stopping,
                                      row.get("val_loss"))
        progress.seconds = time.perf_counter() - started
        distributed.on_main(partial(callbacks.after_epoch, row, evaluated if row["best"] else None,
                                    progress.state(parts)))  # files and progress on rank 0; its errors reach all
        if progress.stopped:
            logger.info("early stopping after epoch %d: no better val %s for %d epochs", epoch,
                        config.select_metric, progress.stale)
    seconds = time.perf_counter() - started
    return FitResult(progress.best_epoch, progress.best_value if progress.best_value is not None else math.nan,
                     progress.threshold, seconds, progress.seen / max(seconds, 1e-9), progress.epoch)
