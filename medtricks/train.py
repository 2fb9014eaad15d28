"""The one training loop. Each step-time trick is named once: mixup/cutmix (batch), AMP (autocast + scaler),
distillation (loss). Schedule tricks live in `lr_factor` (a pure function of the step), optimizer tricks in the
parameter groups, loss tricks in `create_loss`, model tricks at model build (medtricks.finetune).

Under torchrun the same loop runs on every process (medtricks.distributed): the forward/backward goes through
DistributedDataParallel, everything else (EMA, evaluation, checkpoints) uses the plain model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from medtricks import distributed
from medtricks.data.sampling import epoch_seed
from medtricks.errors import MedtricksError
from medtricks.metrics import choose_threshold, compute_metrics
from medtricks.models.backbones import MedModel
from medtricks.models.surgery import stage_parameter_groups
from medtricks.recipe import TrainConfig, TricksConfig
from medtricks.tricks.amp import autocast, create_grad_scaler, resolve_amp_dtype
from medtricks.tricks.cosine import cosine_factor
from medtricks.tricks.distillation import distillation_loss
from medtricks.tricks.ema import create_ema, ema_update
from medtricks.tricks.label_smoothing import label_smoothing_loss
from medtricks.tricks.mixup import cutmix_batch, mixup_batch, one_hot
from medtricks.tricks.no_bias_decay import create_param_groups
from medtricks.tricks.step_decay import step_factor
from medtricks.tricks.warmup import warmup_factor

logger = logging.getLogger(__name__)
# the wall-clock fields of report.json's `train` and of each metrics.jsonl row: everything else is a function of
# the recipe, data and seed (compare runs without these)
TIMING_KEYS = frozenset({"seconds", "images_per_second", "data_wait_seconds"})


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


def create_loss(tricks: TricksConfig, class_weights: torch.Tensor | None) -> Callable:
    """Cross-entropy with the label_smoothing trick's smoothing and class-balance weights (indices or soft
    targets, as torch's CrossEntropyLoss takes both)."""
    smoothing = tricks.label_smoothing.smoothing if tricks.label_smoothing is not None else 0.0
    return lambda logits, targets: label_smoothing_loss(logits, targets, smoothing, class_weights=class_weights)


@dataclass
class EvalOutput:
    labels: np.ndarray
    probs: np.ndarray
    patient_ids: list[str]
    loss: float


@torch.inference_mode()
def predict_loader(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> EvalOutput:
    """Class probabilities of every sample, in fp32 and eval mode (robustness and metrics are always fp32).

    The loader's sampler lists the dataset positions it visits: in a distributed run this rank's shard
    (`sampler=distributed.shard(len(dataset))`), whose predictions are gathered from all ranks; the output is in
    dataset order on every rank, and the same as one process's (the mean loss is summed in that order too).
    """
    model.eval()
    rows = []  # (label, probs, patient id, loss) per sample
    for batch in loader:
        logits = model(batch["image"].to(device)).float()
        losses = F.cross_entropy(logits, batch["label"].to(device), reduction="none")
        rows.extend(zip(batch["label"].tolist(), logits.softmax(-1).cpu().numpy().astype(np.float64),
                        batch["patient_id"], losses.cpu().numpy().astype(np.float64), strict=True))
    rows = distributed.gather_by_position(rows, list(loader.sampler))
    if not rows:
        return EvalOutput(np.zeros(0, dtype=np.int64), np.zeros((0, 0)), [], 0.0)
    labels, probs, ids, losses = zip(*rows, strict=True)
    return EvalOutput(np.array(labels), np.stack(probs), list(ids), float(np.sum(losses)) / len(losses))


def evaluate_split(output: EvalOutput, threshold: float | None, seed: int) -> dict:
    """Report metrics M of one split plus its mean loss."""
    metrics = compute_metrics(output.labels, output.probs, output.patient_ids, threshold=threshold, seed=seed)
    metrics["loss"] = output.loss
    return metrics


def val_threshold(output: EvalOutput, num_classes: int, method: str = "youden") -> float | None:
    """The binary operating threshold chosen on validation (choose_threshold's method); None for multi-class."""
    return choose_threshold(output.labels, output.probs, method) if num_classes == 2 else None


@dataclass
class FitResult:
    best_epoch: int
    best_value: float
    threshold: float | None
    seconds: float
    images_per_second: float
    epochs_run: int


def _better(metric: str, value: float | None, best: float | None) -> bool:
    if value is None:
        return best is None
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def fit(model: MedModel, train_loader: DataLoader, val_loader: DataLoader | None, config: TrainConfig,
        tricks: TricksConfig, *, base_lr: float, lr_multipliers: dict[str, float], device: torch.device,
        seed: int, num_classes: int, class_weights: torch.Tensor | None = None,
        teacher: torch.nn.Module | None = None, on_epoch: Callable[[dict], None] | None = None,
        save_best: Callable[[torch.nn.Module, dict], None] | None = None,
        save_state: Callable[[dict], None] | None = None, state: dict | None = None) -> FitResult:
    """Train `model`; after each epoch evaluate on validation, call `on_epoch(row)`, when the selected validation
    metric improves `save_best(model_to_save, row)` (the EMA model when EMA is on), then `save_state(state)`.

    Every epoch is a function of the state at its start and (seed, epoch): the train loader's sampler must be a
    SeededSampler, and the mixing and dropout RNGs are reseeded per epoch. So `fit(..., state=saved)` with a
    state from `save_state` continues exactly as the uninterrupted run would have.

    Distributed (inside medtricks.distributed.process_group): call it on every rank with the rank's share of the
    data (SeededSampler num_replicas/rank, batch_size / world; val_loader over distributed.shard). Gradients are
    averaged over the ranks, the train loss and validation metrics are those of all ranks (the same on each, so
    every rank takes the same best-epoch and early-stopping decisions), and the callbacks run on rank 0 only.

    Raises:
        TrainingError: on a NaN or infinite loss (naming the epoch and step); what was saved stays.
    """
    steps_per_epoch = len(train_loader) if config.limit_train_batches is None else min(
        len(train_loader), config.limit_train_batches)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = round(tricks.warmup.epochs * steps_per_epoch) if tricks.warmup is not None else 0
    if config.sync_bn:
        model = distributed.convert_sync_batchnorm(model, device)
    optimizer = create_optimizer(model, config, tricks, base_lr, lr_multipliers)
    amp_dtype = resolve_amp_dtype(device, tricks.amp.dtype) if tricks.amp is not None else None
    scaler = create_grad_scaler(device, amp_dtype)
    loss_fn = create_loss(tricks, class_weights)
    ema = create_ema(model, tricks.ema.decay) if tricks.ema is not None else None
    mix_gen = torch.Generator()
    progress = {"epoch": 0, "step": 0, "seen": 0, "seconds": 0.0, "best_value": None, "best_epoch": 0,
                "threshold": None, "stale": 0, "stopped": False}
    if state is not None:
        _restore(state, progress, model, optimizer, scaler, ema)
    trained = distributed.wrap_model(model, device)  # the forward/backward path; `model` for all else
    world, rank = distributed.world_size(), distributed.rank()
    best_value, best_epoch, threshold, stale = (progress[k] for k in ("best_value", "best_epoch", "threshold",
                                                                       "stale"))
    step, seen, started = progress["step"], progress["seen"], time.perf_counter() - progress["seconds"]
    if teacher is not None:
        teacher.eval()
    sampler = getattr(train_loader, "sampler", None)
    first_epoch = config.epochs + 1 if progress["stopped"] else progress["epoch"] + 1
    epoch = progress["epoch"]
    for epoch in range(first_epoch, config.epochs + 1):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        mix_gen.manual_seed(epoch_seed(seed, epoch, stream=1))  # the same on every rank
        torch.manual_seed(epoch_seed(seed, epoch, stream=2, rank=rank))  # dropout and drop-path: per rank's images
        model.train()
        loss_sum, n_epoch, epoch_start = 0.0, 0, time.perf_counter()
        waited, asked = 0.0, epoch_start  # seconds blocked on the loader: the input pipeline's share of the epoch
        for i, batch in enumerate(train_loader):
            waited += time.perf_counter() - asked
            if i >= steps_per_epoch:
                break
            factor = lr_factor(step, total_steps, warmup_steps, tricks)
            for group in optimizer.param_groups:
                group["lr"] = base_lr * group["lr_mult"] * factor
            images, labels = batch["image"].to(device), batch["label"].to(device)
            images, targets = _mixed_targets(images, labels, num_classes, tricks, mix_gen)
            with autocast(device, amp_dtype):
                logits = trained(images)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(images)
                    loss = distillation_loss(logits.float(), teacher_logits.float(), targets,
                                             tricks.distillation.temperature, tricks.distillation.weight,
                                             tricks.label_smoothing.smoothing if tricks.label_smoothing else 0.0)
                else:
                    loss = loss_fn(logits.float(), targets)
            global_loss = float(distributed.mean(loss.detach()))  # all ranks' mean: every rank stops together
            if not math.isfinite(global_loss):
                raise TrainingError(f"the training loss became {global_loss} at epoch {epoch}, step {i + 1} "
                                    f"(global step {step + 1}); training stopped and the last saved checkpoint is "
                                    f"kept. Lower train.lr, set train.grad_clip, or turn off tricks.amp.")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema_update(ema, model)
            loss_sum += global_loss * len(images) * world
            n_epoch += len(images) * world  # images of the global batch
            step += 1
            asked = time.perf_counter()
        seen += n_epoch
        train_seconds = time.perf_counter() - epoch_start
        row = {"epoch": epoch, "train_loss": loss_sum / max(n_epoch, 1), "lr": base_lr * factor, "images": n_epoch,
               "images_per_second": n_epoch / max(train_seconds, 1e-9), "seconds": train_seconds,
               "data_wait_seconds": waited}
        evaluated = ema.module if ema is not None else model
        distributed.broadcast_buffers(evaluated)  # rank 0's BN statistics everywhere: the model rank 0 saves
        if val_loader is not None:
            out = predict_loader(evaluated, val_loader, device)
            epoch_threshold = val_threshold(out, num_classes, config.threshold)
            metrics = evaluate_split(out, epoch_threshold, seed)
            row.update({f"val_{k}": metrics[k] for k in ("loss", "auroc", "accuracy", "balanced_accuracy", "f1")})
            value = metrics[config.select_metric]
        else:
            epoch_threshold, value = None, -row["train_loss"] if config.select_metric != "loss" else row["train_loss"]
        improved = _better(config.select_metric, value, best_value)
        if improved:
            best_value, best_epoch, threshold, stale = value, epoch, epoch_threshold, 0
        else:
            stale += 1
        row["best"] = improved
        stopped = config.early_stopping is not None and stale >= config.early_stopping
        fit_state = {"epoch": epoch, "step": step, "seen": seen, "seconds": time.perf_counter() - started,
                     "best_value": best_value, "best_epoch": best_epoch, "threshold": threshold, "stale": stale,
                     "stopped": stopped, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema is not None else None}
        distributed.on_main(partial(_epoch_callbacks, row, evaluated if improved else None, fit_state, save_best,
                                    on_epoch, save_state))  # files and progress on rank 0; its errors reach all
        if stopped:
            logger.info("early stopping after epoch %d: no better val %s for %d epochs", epoch,
                        config.select_metric, stale)
            break
    seconds = time.perf_counter() - started
    return FitResult(best_epoch, best_value if best_value is not None else math.nan, threshold, seconds,
                     seen / max(seconds, 1e-9), epoch)


def _epoch_callbacks(row: dict, improved_model: torch.nn.Module | None, fit_state: dict,
                     save_best: Callable | None, on_epoch: Callable | None, save_state: Callable | None) -> None:
    """fit's callbacks after an epoch, in order: save_best (when the model improved), on_epoch, save_state."""
    if improved_model is not None and save_best is not None:
        save_best(improved_model, row)
    if on_epoch is not None:
        on_epoch(row)
    if save_state is not None:
        save_state(fit_state)


def _restore(state: dict, progress: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler, ema: torch.nn.Module | None) -> None:
    """Load a saved training state into the objects fit() built, and its counters into `progress`."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    if (ema is None) != (state["ema"] is None):
        raise TrainingError("the resume state and the recipe disagree about tricks.ema; resume with the run's own "
                            "recipe.")
    if ema is not None:
        ema.load_state_dict(state["ema"])
    progress.update({k: state[k] for k in progress})
    logger.info("resuming after epoch %d (global step %d)", progress["epoch"], progress["step"])


def _mixed_targets(images, labels, num_classes, tricks: TricksConfig, generator: torch.Generator):
    """(images, targets): class indices, or soft targets when mixup/cutmix is on (one picked per batch)."""
    use_mixup = tricks.mixup is not None and float(torch.rand(1, generator=generator)) < tricks.mixup.prob
    use_cutmix = tricks.cutmix is not None and float(torch.rand(1, generator=generator)) < tricks.cutmix.prob
    if not (use_mixup or use_cutmix):
        return images, labels
    soft = one_hot(labels, num_classes)
    if use_mixup and use_cutmix:  # both on: alternate at random, as timm's Mixup does with switch_prob 0.5
        use_mixup = float(torch.rand(1, generator=generator)) < 0.5
    if use_mixup:
        return mixup_batch(images, soft, tricks.mixup.alpha, generator)
    return cutmix_batch(images, soft, tricks.cutmix.alpha, generator)
