"""FGSM and PGD on models that take [0, 1] images (normalization is inside the model), for medical classifiers.

Finlayson et al. 2019 (arXiv 1804.05296): ImageNet-pretrained medical classifiers fall to imperceptible PGD.
Madry et al. 2018 (PGD), Goodfellow et al. 2015 (FGSM).

Conventions: eps is a fraction of the displayed intensity range ([0, 1] units) whatever the backbone; attacks run
in fp32 with the model in eval mode and no weight gradients (on CPU with channels-last weights, see attack_mode,
and through a copy with each conv's BatchNorm folded into it, see fold_batchnorm); the adversarial image stays in
[0, 1]. Binary models with a single logit are wrapped into two logits ([0, z]) so one cross-entropy serves every
head. Multi-label models (one logit per finding, labels (N, L) multi-hot) are attacked untargeted: the attack ascends
the binary cross-entropy with logits of the true finding set, averaged over the findings (multilabel_loss), on
logits whose sign is the run's decision (FindingThresholds); the broken mask is then (N, L), each finding's decision
wrong at some iterate, and an image is broken when any of its findings is.

What an attack returns, and which number may use what:
- The adversarial image of an example is its final iterate: every step run (of the restart whose final iterate has
  the highest attack loss). Probability-based metrics (AUROC, every probability a report shows) are computed on it,
  as torchattacks' PGD does; an iterate that just crossed the decision boundary would understate them.
- An example is *broken* when the decision was wrong (targeted: the target) at any iterate of any restart, the clean
  image included (`return_broken=True`). Robust accuracy and success rate use this per-image worst case: PGD's
  iterates can cross back, so the final iterate alone would overstate robustness.
- `early_exit=True` stops stepping an example once it is broken and returns its first successful iterate: the
  broken mask, hence accuracy and success rate, is exactly the same (each example's steps depend only on its own
  gradient in eval mode), but its images must not be used for scores.
"""

from __future__ import annotations

import contextlib
import copy
import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medtricks.errors import AttackError


class TwoLogits(nn.Module):
    """Wrap a single-logit binary model (sigmoid head) into two logits [0, z]: softmax gives the same probability."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if logits.ndim == 1:
            logits = logits[:, None]
        if logits.shape[1] == 1:
            return torch.cat([torch.zeros_like(logits), logits], dim=1)
        return logits


class ThresholdShift(nn.Module):
    """Shift a binary model's class-1 logit by -logit(threshold), so that argmax equals the run's decision rule
    `p1 >= threshold` (chosen on validation). Probabilities change, rankings (AUROC) do not."""

    TIE = 1e-5  # p1 == threshold is class 1 (the run's rule is p1 >= threshold), whatever the float rounding

    def __init__(self, model: nn.Module, threshold: float):
        super().__init__()
        self.model = model
        t = min(max(threshold, 1e-6), 1 - 1e-6)
        self.shift = math.log(t / (1 - t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return torch.stack([logits[:, 0], logits[:, 1] - self.shift + self.TIE], dim=1)


class GradeCuts(nn.Module):
    """Decision scores of an ordinal model decided by grade cuts (tricks.ordinal_decoding): with E = sum_k k p_k,
    score_k = SCALE x min(E - cut_k, cut_k+1 - E) (cut_0 = -inf, cut_K = +inf) is positive only for the grade whose
    interval holds E, so argmax equals the run's cut rule and the attack's loss pushes E across a cut. The model's
    own probabilities (for AUROC) are `probabilities(x)`."""

    SCALE = 10.0  # E moves in grade units; scaled so that the scores' softmax is not flat
    TIE = 1e-5  # E == cut_k is grade k (the run's rule), whatever the float rounding

    def __init__(self, model: nn.Module, cuts: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("cuts", torch.tensor(cuts, dtype=torch.float32))

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float().softmax(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.probabilities(x)
        grade = probs @ torch.arange(probs.shape[1], dtype=probs.dtype, device=probs.device)
        inf = torch.full((1,), math.inf, device=probs.device)
        lower, upper = torch.cat([-inf, self.cuts]), torch.cat([self.cuts, inf])
        return self.SCALE * torch.minimum(grade[:, None] - lower + self.TIE, upper - grade[:, None])


@torch.inference_mode()
def class_probabilities(model: nn.Module, images: torch.Tensor, logits: torch.Tensor,
                        multilabel: bool = False) -> np.ndarray:
    """Probabilities for AUROC of a decision model's output `logits` on `images`: (N, C) their softmax (a
    ThresholdShift reorders no image), or the scored model's own softmax where the decision scores are not logits
    (GradeCuts); multi-label, (N, L) the findings' sigmoids (FindingThresholds reorders no image either)."""
    if multilabel:
        return logits.float().sigmoid().cpu().numpy()
    if isinstance(model, GradeCuts):
        return model.probabilities(images).cpu().numpy()
    return logits.float().softmax(1).cpu().numpy()


def decided(logits: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    """A decision model's decisions: the class (argmax), or multi-label each finding's 0/1 (logit >= 0)."""
    return (logits >= 0).long() if multilabel else logits.argmax(1)


class FindingThresholds(nn.Module):
    """Shift a multi-label model's logits by -logit(threshold) per finding, so that a finding is predicted exactly
    when its shifted logit is >= 0: the run's rule p >= threshold (chosen on validation; None: 0.5 each). Ties as
    ThresholdShift. Each finding's probabilities change, its ranking (AUROC) does not."""

    def __init__(self, model: nn.Module, thresholds: list[float] | None, n_findings: int):
        super().__init__()
        self.model = model
        t = torch.tensor([0.5] * n_findings if thresholds is None else thresholds, dtype=torch.float64)
        if t.shape != (n_findings,):
            raise AttackError(f"{len(t)} thresholds for {n_findings} findings: give one per finding.")
        t = t.clamp(1e-6, 1 - 1e-6)
        device = next(model.parameters(), torch.empty(0)).device
        self.register_buffer("shift", (t / (1 - t)).log().float().to(device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) - self.shift + ThresholdShift.TIE


def multilabel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image, the binary cross-entropy with logits of the true multi-hot labels (N, L), averaged over the
    findings: what an attack on a multi-label model ascends (the training loss, without its tricks)."""
    return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(1)


def finding_errors(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, L) bool: each finding's decision (logit >= 0, on FindingThresholds' logits) differs from its label."""
    return (logits >= 0) != labels.bool()


def attack_network(model: nn.Module, example: torch.Tensor, multilabel: bool) -> nn.Module:
    """What an attack differentiates: `model` with its BatchNorms folded (fold_batchnorm on `example`), a single-logit
    head as two logits (TwoLogits); a multi-label model's logits as they are, one per finding."""
    folded = fold_batchnorm(model, example)
    return folded if multilabel else TwoLogits(folded)


def check_eps(eps: float, norm: str = "linf") -> float:
    """eps in [0, 1] intensity units for L-inf (0 = clean); for L2 any finite eps >= 0 (the L2 norm of a whole
    image's perturbation can exceed 1)."""
    upper = 1.0 if norm == "linf" else math.inf
    if not 0.0 <= eps <= upper or not math.isfinite(eps):
        raise AttackError(f"eps {eps} is outside [0, {upper:g}]: eps is a fraction of the displayed intensity "
                          f"range (e.g. 2/255 = 0.0078).")
    return float(eps)


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """The nearest perturbation inside the eps ball (L-inf: clamp each pixel; L2: shrink the whole image's)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (delta.ndim - 1))
    return delta * torch.clamp(eps / norms, max=1.0)


def ascent_step(grad: torch.Tensor, step_size: float | torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent step of the norm: step_size * sign(grad) (L-inf) or along grad / ||grad|| (L2);
    `step_size` is a number or a per-image tensor (N, 1, 1, 1)."""
    if norm == "linf":
        return step_size * grad.sign()
    norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.ndim - 1))
    return step_size * grad / norms


def uniform_start(images: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    """A random perturbation, uniform in the eps ball, such that images + perturbation stays in [0, 1]."""
    if norm == "linf":
        delta = (torch.rand(images.shape, generator=generator, device=images.device) * 2 - 1) * eps
    else:  # uniform in the L2 ball: random direction, radius eps * u^(1/d)
        direction = torch.randn(images.shape, generator=generator, device=images.device)
        direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (images.ndim - 1))
        d = images[0].numel()
        radius = eps * torch.rand(len(images), generator=generator, device=images.device) ** (1.0 / d)
        delta = direction * radius.view(-1, *[1] * (images.ndim - 1))
    return (images + delta).clamp(0, 1) - images


@contextlib.contextmanager
def attack_mode(model: nn.Module):
    """Eval mode, no weight gradients and, on CPU, channels-last convolution weights for the duration of an
    attack; all restored afterwards (the weights to their very tensors).

    Channels-last makes oneDNN run the convolutions in its native layout: the input-gradient step of
    efficientnet_lite0 (batch 64, 128 px) takes about 1.4x less time than with contiguous weights on a 2-core
    AVX-512 CPU, for 1- and 3-channel inputs alike (benchmarks/attack_speed.py). Only the layout changes, not the
    values; the gradients agree up to float rounding. GPUs keep their layout (not measured there).
    """
    modes = [(m, m.training) for m in model.modules()]  # each module's own flag: train() would recurse
    flags = [(p, p.requires_grad) for p in model.parameters()]
    # `to`, not `contiguous`: it also restrides (C, 1, k, k) depthwise and 1-channel weights, which `contiguous`
    # leaves as they are (ambiguous layout) and which then keep a whole grey model in the slow layout
    layouts = [(t, t.data, t.data.to(memory_format=torch.channels_last))
               for t in [*model.parameters(), *model.buffers()] if t.ndim == 4 and t.device.type == "cpu"]
    layouts = [(t, data, fast) for t, data, fast in layouts if fast.stride() != data.stride()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    for tensor, _, fast in layouts:
        tensor.data = fast
    try:
        yield model
    finally:
        for tensor, data, _ in layouts:
            tensor.data = data
        for p, flag in flags:
            p.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode


class _AfterNorm(nn.Module):
    """What a folded BatchNorm still does once its affine map lives in the conv: timm BatchNormAct2d's dropout
    and activation (nothing for a plain BatchNorm2d)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.drop = getattr(norm, "drop", nn.Identity())
        self.act = getattr(norm, "act", nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _foldable(module: nn.Module) -> bool:
    from timm.layers import BatchNormAct2d

    return type(module) in (nn.BatchNorm2d, BatchNormAct2d) and module.running_mean is not None


def fold_batchnorm(model: nn.Module, example: torch.Tensor, atol: float = 1e-4) -> nn.Module:
    """An eval-mode copy of `model` with every BatchNorm that directly follows a convolution folded into that
    convolution's weight and bias (w * g / sqrt(v + e), (b - m) * g / sqrt(v + e) + beta), or `model` itself.

    An attack differentiates through the frozen network a few dozen times per image; folding drops the BatchNorm
    passes from every forward and backward: PGD-10 on efficientnet_lite0 (CPU, 128 px) ran 1.3-1.5x faster with
    folding than without (benchmarks/attack_speed.py). Conv -> BN pairs are found by running `example` with hooks:
    a BN whose input is the very tensor a conv returned. The copy must give the same logits on `example` (within
    `atol`, plus float rounding relative to the logits' size); otherwise, e.g. when a conv's output also feeds a
    skip connection, `model` is returned unchanged. Call inside `attack_mode` (eval, no weight gradients).
    """
    folded = copy.deepcopy(model)
    produced, pairs, hooks = {}, [], []

    def conv_hook(module, inputs, output, name):
        produced[id(output)] = (name, output)  # the tensor itself too: an id alone may be reused once it is freed

    def norm_hook(module, inputs, output, name):
        source = produced.get(id(inputs[0]))
        if source is not None and source[1] is inputs[0]:
            pairs.append((source[0], name))

    for name, module in folded.named_modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(partial(conv_hook, name=name)))
        elif _foldable(module):
            hooks.append(module.register_forward_hook(partial(norm_hook, name=name)))
    try:
        with torch.no_grad():
            reference = folded(example)
    finally:
        for hook in hooks:
            hook.remove()
    produced.clear()
    if not pairs:
        return model
    modules = dict(folded.named_modules())
    with torch.no_grad():
        for conv_name, norm_name in pairs:
            conv, norm = modules[conv_name], modules[norm_name]
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps) if norm.affine else \
                1 / torch.sqrt(norm.running_var + norm.eps)
            shift = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
            conv.weight.data = conv.weight * scale.view(-1, 1, 1, 1)
            conv.bias = nn.Parameter((bias - norm.running_mean) * scale + shift, requires_grad=False)
            parent, _, attr = norm_name.rpartition(".")
            setattr(modules[parent] if parent else folded, attr, _AfterNorm(norm))
        logits = folded(example)
    if not torch.allclose(logits, reference, rtol=1e-4, atol=atol):
        return model
    return folded


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, steps: int = 10,
        step_size: float | None = None, norm: str = "linf", random_start: bool = True, restarts: int = 1,
        targets: torch.Tensor | None = None, early_exit: bool = False, generator: torch.Generator | None = None,
        return_broken: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Projected gradient descent (Madry et al. 2018) on [0, 1] images.

    Args:
        model: returns logits (N, C) or a single logit (N, 1) for binary; normalization inside. Multi-label: one
            logit per finding, a finding predicted at logit >= 0 (FindingThresholds).
        images: (N, C, H, W) in [0, 1].
        labels: true classes (N,), or (N, L) multi-hot labels of a multi-label model (untargeted, no early exit:
            the attack ascends multilabel_loss).
        eps: budget in [0, 1] intensity units (L-inf: per pixel; L2: per image).
        steps: gradient steps (>= 1).
        step_size: per step; default 2.5 * eps / steps.
        norm: "linf" or "l2".
        random_start: start from a uniform point of the eps ball (Madry et al.).
        restarts: independent random starts; an example counts as broken if any restart breaks it.
        targets: target classes for a targeted attack (None = untargeted).
        early_exit: stop stepping examples once broken (the same broken mask, less work; the returned images of
            broken examples are then their first successful iterates: not for scores, see the module docstring).
        generator: torch generator for the random starts (reproducible attacks), on the images' device.
        return_broken: also return the per-image worst case.

    Returns:
        Adversarial images (N, C, H, W) in [0, 1] with ||adv - images|| <= eps: each example's final iterate (of the
        restart with the highest final attack loss); with return_broken also a bool (N,) mask: the decision was
        wrong (targeted: the target) at some iterate of some restart, the clean image included (multi-label: (N, L),
        each finding's decision).
    """
    if norm not in ("linf", "l2"):
        raise AttackError(f"norm {norm!r}: choose linf or l2.")
    eps = check_eps(eps, norm)
    if steps < 1:
        raise AttackError(f"steps {steps}: PGD needs at least 1 step.")
    if restarts < 1:
        raise AttackError(f"restarts {restarts}: need at least 1.")
    step_size = 2.5 * eps / steps if step_size is None else float(step_size)
    if not (step_size >= 0 and math.isfinite(step_size)):
        raise AttackError(f"step_size {step_size} must be a finite number >= 0.")
    images, labels = images.detach().float(), labels.detach()
    multilabel = labels.ndim == 2
    if multilabel and (targets is not None or early_exit):
        raise AttackError("a multi-label attack is untargeted and runs every step (no targets, no early_exit).")
    goal = targets.detach() if targets is not None else labels
    sign = -1.0 if targets is not None else 1.0  # the attack ascends sign * cross-entropy towards `goal`

    def objective(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if multilabel:
            return multilabel_loss(logits, labels[idx])
        return sign * F.cross_entropy(logits, goal[idx], reduction="none")

    def broken(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if multilabel:
            return finding_errors(logits, labels[idx])
        pred = logits.argmax(1)
        return pred == goal[idx] if targets is not None else pred != goal[idx]

    # fp32 even inside an enclosing autocast (robustness is evaluated in full precision)
    with attack_mode(model), torch.enable_grad(), torch.autocast(images.device.type, enabled=False):
        net = attack_network(model, images[:2], multilabel)
        adv = images.clone()
        everyone = torch.arange(len(images), device=images.device)
        with torch.no_grad():
            done = broken(net(images), everyone)
        best = torch.full((len(images),), -math.inf, device=images.device)  # final attack loss of adv
        if eps == 0:
            return (adv, done) if return_broken else adv
        for _ in range(restarts):
            active = torch.nonzero(~done).flatten() if early_exit else everyone
            if len(active) == 0:
                break
            x0 = images[active]
            # drawn for every example, then indexed: an example's start does not depend on which others are done
            start = uniform_start(images, eps, norm, generator) if random_start else torch.zeros_like(images)
            delta = start[active]
            # iterate k = the start plus k steps; one forward per iterate both checks it and gives the gradient
            # of the next step (steps + 1 forwards and `steps` backwards in all)
            for k in range(steps + 1):
                last = k == steps
                delta.requires_grad_(not last)
                logits = net(x0 + delta)
                losses = objective(logits, active)
                with torch.no_grad():
                    current = (x0 + delta).detach()
                    success = broken(logits, active)
                    if early_exit:  # first successful iterates of the newly broken
                        first = success & ~done[active]
                        adv[active[first]] = current[first]
                    done[active] |= success
                    if last:  # the final iterate replaces an earlier restart's when its loss is higher
                        keep = losses.detach() > best[active]
                        if early_exit:
                            keep &= ~success
                        adv[active[keep]] = current[keep]
                        best[active[keep]] = losses.detach()[keep]
                        break
                step = ~success if early_exit else torch.ones(len(active), dtype=torch.bool, device=images.device)
                if not step.any():
                    break
                (grad,) = torch.autograd.grad(losses[step].sum(), delta)
                with torch.no_grad():
                    active, x0 = active[step], x0[step]
                    stepped = project(delta.detach()[step] + ascent_step(grad[step], step_size, norm), eps, norm)
                    delta = (x0 + stepped).clamp(0, 1) - x0
    adv = adv.detach()
    return (adv, done) if return_broken else adv


def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, norm: str = "linf",
         targets: torch.Tensor | None = None,
         return_broken: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size eps from the clean image
    (PGD with one step, no random start, step = eps; `return_broken` as there)."""
    return pgd(model, images, labels, eps, steps=1, step_size=eps, norm=norm, random_start=False, targets=targets,
               return_broken=return_broken)
