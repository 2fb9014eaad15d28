"""APGD and an AutoAttack-style ensemble that also works on binary and single-logit medical classifiers.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free attacks"
(ICML 2020): APGD is PGD with momentum (0.75) and a step size that starts at 2 eps and halves at checkpoints where
the loss stopped rising, restarting from the best point so far; no step size to tune. AutoAttack runs APGD on the
cross-entropy and a targeted APGD on the DLR margin loss and counts an image as robust only if every member fails.

Written here rather than taken from torchattacks or fra31/auto-attack because their DLR loss indexes the third
largest logit, so it fails on the two-class and single-logit heads medical models have, and they keep each
example's first successful iterate, which understates scores under attack. `margin_loss` is DLR where it is defined
and the plain logit margin below three (targeted: four) classes; on the run's decision model (attacks.TwoLogits +
ThresholdShift) its zero is exactly the run's threshold. Conventions as in medtricks.attacks: [0, 1] images, eps in
intensity units, fp32, eval mode, BatchNorm folded. Every iterate runs; the returned image of an example is the
highest-loss iterate (of the best restart) and the broken mask is the worst case over all iterates.

Multi-label models (labels (N, L) multi-hot, one logit per finding decided at >= 0: attacks.FindingThresholds):
APGD is untargeted; "ce" ascends the findings' mean binary cross-entropy (attacks.multilabel_loss) and "margin"
the largest logit on the wrong side of its decision (multilabel_margin), > 0 exactly when some finding is wrong;
the broken masks are (N, L). The AutoAttack-style ensemble has no target to aim at there, so it runs the two
untargeted members of the two-class case (APGD-CE on the mean BCE, APGD on multilabel_margin) and keeps, per image,
the member's image with the highest mean BCE of the true findings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medtricks.attacks import (
    ascent_step,
    attack_mode,
    attack_network,
    check_eps,
    finding_errors,
    multilabel_loss,
    project,
    uniform_start,
)
from medtricks.errors import AttackError

LOSSES = ("ce", "margin")
MOMENTUM = 0.75  # Croce & Hein's alpha
RHO = 0.75  # a checkpoint halves the step when the loss rose in fewer than rho of the steps since the last one


def margin_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example margin that APGD ascends: > 0 exactly when the decision is wrong (targeted: the target wins).

    Untargeted: (max_{j != y} z_j - z_y), divided by (z_pi1 - z_pi3) for three or more classes (the DLR loss, whose
    scale invariance keeps the step schedule meaningful); for two classes the plain margin, which on the decision
    model is the distance of the logit from the run's threshold. Targeted: (z_t - z_y) divided by
    (z_pi1 - (z_pi3 + z_pi4) / 2) for four or more classes (DLR-T), by (z_pi1 - z_pi3) for three, plain for two.
    """
    rows = torch.arange(len(logits), device=logits.device)
    true = logits[rows, labels]
    classes = logits.shape[1]
    ranked = logits.sort(dim=1, descending=True).values
    if targets is None:
        other = logits.masked_fill(F.one_hot(labels, classes).bool(), -math.inf).amax(1)
        margin = other - true
    else:
        margin = logits[rows, targets] - true
    if classes >= 4 and targets is not None:
        return margin / (ranked[:, 0] - 0.5 * (ranked[:, 2] + ranked[:, 3]) + 1e-12)
    if classes >= 3:
        return margin / (ranked[:, 0] - ranked[:, 2] + 1e-12)
    return margin


def multilabel_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image, max over findings of the logit's distance to the wrong side of its decision (-z for a present
    finding, z for an absent one, on FindingThresholds' logits): > 0 exactly when some finding is decided wrongly;
    the multi-label counterpart of the binary margin."""
    return ((1 - 2 * labels.float()) * logits).amax(1)


def _objective(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None, loss: str) -> torch.Tensor:
    if labels.ndim == 2:  # multi-label (untargeted)
        return multilabel_margin(logits, labels) if loss == "margin" else multilabel_loss(logits, labels)
    if loss == "margin":
        return margin_loss(logits, labels, targets)
    if targets is None:
        return F.cross_entropy(logits, labels, reduction="none")
    return -F.cross_entropy(logits, targets, reduction="none")


def checkpoints(steps: int) -> list[int]:
    """Iterations where APGD may halve its step: w_j = ceil(p_j * steps), p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) (Croce & Hein, sec. 3.2)."""
    p = [0, 22]  # in hundredths, so that ceil sees exact values (0.57 * 100 is 57.000000000000007 in floats)
    while p[-1] + max(p[-1] - p[-2] - 3, 6) <= 100:
        p.append(p[-1] + max(p[-1] - p[-2] - 3, 6))
    return sorted({-(-q * steps // 100) for q in p[1:] if 0 < -(-q * steps // 100) < steps})


def _run_once(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None, eps: float,
              steps: int, norm: str, loss: str, generator: torch.Generator | None):
    """One APGD run from a random start: (highest-loss iterate, its loss, wrong at some iterate, target reached at
    some iterate)."""
    shape = (-1, *[1] * (images.ndim - 1))

    def inside(x: torch.Tensor) -> torch.Tensor:
        return (images + project(x - images, eps, norm)).clamp(0, 1)

    def evaluate(x: torch.Tensor, need_grad: bool):
        x = x.detach().requires_grad_(need_grad)
        logits = net(x)
        losses = _objective(logits, labels, targets, loss)
        grad = torch.autograd.grad(losses.sum(), x)[0] if need_grad else None
        with torch.no_grad():
            if labels.ndim == 2:  # multi-label: each finding's decision
                errors = finding_errors(logits, labels)
                return losses.detach(), grad, errors, errors
            pred = logits.argmax(1)
            return losses.detach(), grad, pred != labels, (pred == targets) if targets is not None else pred != labels

    x = images + uniform_start(images, eps, norm, generator)
    f, grad, wrong, hit = evaluate(x, steps > 0)
    x_max, f_max, grad_max, x_prev, f_prev = x.clone(), f.clone(), grad.clone(), x.clone(), f.clone()
    eta = torch.full((len(images),), 2.0 * eps, device=images.device)
    marks, last_mark = checkpoints(steps), 0
    rises = torch.zeros(len(images), device=images.device)
    halved_last = torch.zeros(len(images), dtype=torch.bool, device=images.device)
    f_max_last = f_max.clone()
    for k in range(1, steps + 1):
        with torch.no_grad():
            z = inside(x + ascent_step(grad, eta.view(shape), norm))
            alpha = 1.0 if k == 1 else MOMENTUM
            x_prev, x = x, inside(x + alpha * (z - x) + (1 - alpha) * (x - x_prev))
        f, grad, now_wrong, now_hit = evaluate(x, k < steps)
        with torch.no_grad():
            wrong |= now_wrong
            hit |= now_hit
            rises += (f > f_prev).float()
            f_prev = f
            better = f > f_max
            x_max[better], f_max[better] = x[better], f[better]
            if grad is not None:
                grad_max[better] = grad[better]
            if k in marks:  # condition 1: too few rises; condition 2: no halving last time and no progress since
                halve = (rises < RHO * (k - last_mark)) | (~halved_last & (f_max <= f_max_last))
                eta[halve] /= 2
                x[halve], x_prev[halve], grad[halve], f_prev[halve] = x_max[halve], x_max[halve], \
                    grad_max[halve], f_max[halve]
                halved_last, f_max_last, last_mark = halve, f_max.clone(), k
                rises.zero_()
    return x_max.detach(), f_max, wrong, hit


def _check(eps: float, steps: int, norm: str, loss: str, restarts: int) -> float:
    if norm not in ("linf", "l2"):
        raise AttackError(f"norm {norm!r}: choose linf or l2.")
    if loss not in LOSSES:
        raise AttackError(f"APGD loss {loss!r}: choose one of {', '.join(LOSSES)}.")
    if steps < 1 or restarts < 1:
        raise AttackError(f"APGD needs steps >= 1 and restarts >= 1 (got {steps}, {restarts}).")
    return check_eps(eps, norm)


def apgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, steps: int = 100,
         norm: str = "linf", loss: str = "ce", targets: torch.Tensor | None = None, restarts: int = 1,
         generator: torch.Generator | None = None,
         return_broken: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Auto-PGD (Croce & Hein 2020) on [0, 1] images.

    Args:
        model: returns logits (N, C) or a single logit (N, 1) for binary; normalization inside.
        images: (N, C, H, W) in [0, 1].
        labels: true classes (N,), or (N, L) multi-hot labels of a multi-label model (untargeted; module docstring).
        eps: budget in [0, 1] intensity units (L-inf: per pixel; L2: per image).
        steps: iterations (Croce & Hein: 100).
        norm: "linf" or "l2".
        loss: "ce" (cross-entropy) or "margin" (margin_loss: DLR, defined for two classes too).
        targets: target classes (N,) for a targeted attack (None = untargeted).
        restarts: independent random starts; an example is broken if any restart breaks it.
        generator: torch generator for the random starts, on the images' device.
        return_broken: also return the per-image worst case.

    Returns:
        Adversarial images in the eps ball and in [0, 1]: each example's highest-loss iterate (of the restart with
        the highest loss); with return_broken also a bool (N,) mask: the decision was wrong (targeted: the target)
        at some iterate of some restart, the clean image included (multi-label: (N, L), each finding's decision).
    """
    adv, broken, _ = _apgd(model, images, labels, eps, steps, norm, loss, targets, restarts, generator)
    return (adv, broken) if return_broken else adv


def _apgd(model, images, labels, eps, steps, norm, loss, targets, restarts, generator, net=None):
    """apgd, plus the per-image 'wrong at some iterate' mask (what an untargeted ensemble counts); `net` is the
    model already wrapped and folded (the ensemble prepares it once)."""
    eps = _check(eps, steps, norm, loss, restarts)
    # clones: tensors made under inference_mode (e.g. labels predicted there) cannot enter autograd
    images, labels = images.detach().float().clone(), labels.detach().clone()
    targets = targets.detach().clone() if targets is not None else None
    multilabel = labels.ndim == 2
    if multilabel and targets is not None:
        raise AttackError("a multi-label APGD is untargeted: drop the targets.")
    with attack_mode(model), torch.enable_grad(), torch.autocast(images.device.type, enabled=False):
        net = net if net is not None else attack_network(model, images[:2], multilabel)
        with torch.no_grad():
            logits = net(images)
        if multilabel:
            wrong = finding_errors(logits, labels)
            broken = wrong.clone()
        else:
            pred = logits.argmax(1)
            wrong = pred != labels
            broken = (pred == targets) if targets is not None else wrong.clone()
        adv = images.clone()
        if eps == 0:
            return adv, broken, wrong
        best = torch.full((len(images),), -math.inf, device=images.device)
        for _ in range(restarts):
            x_max, f_max, now_wrong, now_hit = _run_once(net, images, labels, targets, eps, steps, norm, loss,
                                                         generator)
            wrong |= now_wrong
            broken |= now_hit
            keep = f_max > best
            adv[keep], best[keep] = x_max[keep], f_max[keep]
    return adv.detach(), broken, wrong


@dataclass(frozen=True)
class Member:
    """One attack of the ensemble: APGD with `loss`, untargeted (rank 0) or targeted at the rank-th most likely
    wrong class of the clean image."""

    name: str
    loss: str
    rank: int = 0


def ensemble_members(n_classes: int, n_targets: int = 9, multilabel: bool = False) -> list[Member]:
    """AutoAttack's white-box members: APGD-CE, then targeted APGD on the margin loss towards each of the
    min(n_targets, classes - 1) most likely wrong classes (APGD-T); for two classes, where the only target is the
    other class, and for multi-label models, which have no class to aim at, one untargeted APGD on the margin."""
    members = [Member("apgd-ce", "ce")]
    if n_classes == 2 or multilabel:
        return [*members, Member("apgd-margin", "margin")]
    ranks = range(1, min(n_targets, n_classes - 1) + 1)
    return [*members, *(Member(f"apgd-t{rank}", "margin", rank) for rank in ranks)]


def autoattack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, steps: int = 100,
               norm: str = "linf", restarts: int = 1, generator: torch.Generator | None = None, n_targets: int = 9,
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The ensemble of ensemble_members, every member on every image to the end.

    Returns:
        (adversarial images, broken, per-member broken): an image is broken when some member made the decision
        wrong at some iterate (the per-image worst case: robust accuracy = 1 - mean(broken)); its adversarial image
        is the member's highest-loss iterate with the lowest probability of the true class (the worst case for
        scores such as AUROC; multi-label: the highest mean BCE of the true findings); per-member masks say which
        member broke what. Multi-label: broken is (N, L) per finding, the per-member masks (N,) per image (some
        finding wrong).
    """
    images, labels = images.detach().float().clone(), labels.detach().clone()
    multilabel = labels.ndim == 2
    with attack_mode(model), torch.autocast(images.device.type, enabled=False):
        net = attack_network(model, images[:2], multilabel)
        with torch.no_grad():
            logits = net(images)
        members = ensemble_members(logits.shape[1], n_targets, multilabel)
        if multilabel:
            broken = finding_errors(logits, labels)
        else:
            order = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), -math.inf).argsort(1,
                                                                                                     descending=True)
            broken = logits.argmax(1) != labels
        adv, worst = images.clone(), torch.full((len(images),), -math.inf, device=images.device)
        per_member = {}
        for member in members:
            targets = order[:, member.rank - 1] if member.rank else None
            x, _, wrong = _apgd(model, images, labels, eps, steps, norm, member.loss, targets, restarts, generator,
                                net=net)
            with torch.no_grad():
                adversity = _adversity(net(x), labels)
            keep = adversity > worst
            adv[keep], worst[keep] = x[keep], adversity[keep]
            per_member[member.name] = wrong.any(1) if multilabel else wrong
            broken |= wrong
    return adv, broken, per_member


def _adversity(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How bad an image is for its true label, per image: minus the true class's probability; multi-label, the mean
    binary cross-entropy of the true findings."""
    if labels.ndim == 2:
        return multilabel_loss(logits, labels)
    return -logits.softmax(1).gather(1, labels[:, None])[:, 0]
