"""Robustness evaluation of a run: an eps sweep of FGSM or PGD, the attack report, plots, transfer attacks.

`attack(run, ...)` reads only the run directory (+ data), like evaluate, and runs the model on the run's device
(`device`, default CUDA when available). Decisions follow the run: a binary model's
class-1 logit is shifted by the validation threshold (ThresholdShift) so "correct" means the same as in
report.json, and the attack breaks that decision. With `source_run`, perturbations are crafted on another run's
model and evaluated on this one (black-box transfer, Finlayson et al.'s setting).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Sequence
from contextlib import nullcontext
from datetime import datetime
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from medtricks import plots
from medtricks.apgd import apgd, autoattack, ensemble_members
from medtricks.attacks import (
    FindingThresholds,
    GradeCuts,
    ThresholdShift,
    TwoLogits,
    class_probabilities,
    decided,
    fgsm,
    pgd,
)
from medtricks.errors import AttackError, short
from medtricks.files import (
    OutputError,
    atomic_write,
    check_output,
    check_record_folder,
    new_folder,
    record_folder,
    write_json,
)
from medtricks.metrics import auroc, missing_class_warning
from medtricks.models.backbones import MedModel
from medtricks.multilabel import decision_scores, label_name
from medtricks.recipe import AttackSettings
from medtricks.runs import Run, newest_run, open_run
from medtricks.tta import unwrap

# Finlayson et al.: eps 0.02 and step 0.01 on a [-1, 1] input scale, 20 iterations, targeted at the flipped label
FINLAYSON = {"eps": (0.01,), "step_size": 0.005, "steps": 20, "targeted": True, "random_start": False}
PRESETS = {"finlayson": FINLAYSON}


def parse_eps(text: str) -> tuple[float, ...]:
    """'1/255,2/255,0.01' -> (0.0039, 0.0078, 0.01); each must be in (0, 1]."""
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            num, _, den = part.partition("/")
            value = float(num) / (float(den) if den else 1.0)
        except (ValueError, ZeroDivisionError) as exc:
            raise AttackError(f"--eps {short(part)}: not a number or fraction such as 2/255.") from exc
        if not (value > 0 and math.isfinite(value)):
            raise AttackError(f"--eps {part} = {value:g}: must be > 0 (L-inf: at most 1, a fraction of the intensity "
                              f"range).")
        if value in values:
            raise AttackError(f"--eps {text}: {part} is given twice (eps {value:g}); give each eps once.")
        values.append(value)
    return tuple(values)


def attack_settings(base: AttackSettings, preset: str | None = None, **given) -> AttackSettings:
    """The settings of one attack: `base` (a run recipe's attack: section), replaced by a preset's when one is named,
    then by every option in `given` that is not None (options given explicitly win over the preset).

    Raises:
        AttackError: an unknown preset, a preset combined with a method it is not, or invalid values.
    """
    if preset is not None:
        if preset not in PRESETS:
            raise AttackError(f"--preset {short(preset)}: the only preset is {', '.join(PRESETS)}.")
        if given.get("method") not in (None, "pgd"):
            raise AttackError(f"--preset {preset} is a PGD attack; drop --{given['method']}.")
        base = dataclasses.replace(base, **PRESETS[preset], method="pgd")
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def decision_model(run: Run) -> torch.nn.Module:
    """The run's model whose argmax is the run's decision (validation threshold for binary, grade cuts for an ordinal
    run with tricks.ordinal_decoding); multi-label: whose logits are >= 0 exactly for the findings the run predicts
    (FindingThresholds: each finding's threshold)."""
    if run.multilabel:
        return FindingThresholds(run.model, run.threshold, len(run.classes)).eval()
    net = TwoLogits(run.model)
    if len(run.classes) == 2 and run.threshold is not None:
        net = ThresholdShift(net, run.threshold)
    elif isinstance(run.threshold, list):
        net = GradeCuts(net, run.threshold)
    return net.eval()


def _targets(labels: torch.Tensor, settings: AttackSettings, classes: Sequence[str]) -> torch.Tensor | None:
    if not settings.targeted:
        return None
    if settings.target_class is not None and settings.target_class not in classes:
        raise AttackError(f"--target-class {short(settings.target_class)} is not one of {list(classes)}.")
    if settings.target_class is None and len(classes) == 2:
        return 1 - labels  # Finlayson et al.: the flipped label
    if settings.target_class is None:
        raise AttackError(f"a targeted attack on {len(classes)} classes needs --target-class, one of {list(classes)}.")
    return torch.full_like(labels, list(classes).index(settings.target_class))


def refuse_targeted_multilabel(settings: AttackSettings, what: str) -> None:
    """Every attack method works on multi-label models, untargeted only: `what` (a run, a recipe) is refused when
    `settings` ask for a target."""
    if settings.targeted:
        raise AttackError(f"{what} is multi-label: a targeted attack (--targeted, --preset finlayson, "
                          f"attack.targeted) has no single class to aim at; run it untargeted (it raises the binary "
                          f"cross-entropy of the true findings).")


def run_attack(model: torch.nn.Module, loader: DataLoader, settings: AttackSettings, classes: Sequence[str],
               source: torch.nn.Module | None = None, keep_examples: int = 0,
               save_dir: str | Path | None = None, device: torch.device | None = None) -> dict:
    """Sweep eps over a loader: clean and robust accuracy/AUROC per eps, success rate, speed.

    Every attack runs every step. AUROC and the probabilities come from the images the attack returns after its
    full run (PGD/FGSM: the final iterate; APGD: the highest-loss iterate; the ensemble: of its members' images, the
    one with the lowest true-class probability); robust accuracy and success rate are the per-image worst case:
    white-box, an image counts as broken if the decision was wrong at any iterate (of any ensemble member, whose
    results alone are in the row's "members"); transfer (`source`), only the target's decision on the final
    perturbation of the surrogate's full run counts.

    Multi-label loaders ((N, L) multi-hot labels; `model` a decision_model with FindingThresholds): the attack ascends
    the findings' mean BCE (medtricks.attacks.multilabel_loss); "accuracy" and "auroc" are the means over findings
    (as report.json's M: AUROC over the findings with both classes), "exact_match" the share of images with every
    finding right and "per_label" each finding's accuracy and AUROC, all worst case per finding over the iterates;
    an image counts as broken (success rate, clean images with every finding right) when any finding flips.

    Args:
        model: the evaluated model (decisions by argmax, multi-label by logit >= 0; see decision_model), on `device`.
        loader: batches of {"image", "label"}; the images are moved to `device`.
        settings: attack settings.
        classes: class names.
        source: craft perturbations on this model instead (transfer attack); evaluated on `model`.
        keep_examples: keep this many (clean, adversarial, predictions) examples of the largest eps for plots.
        save_dir: save every adversarial image of the largest eps there (16-bit PNG for grey images).
        device: where the images go (default: the CPU); `model` and `source` must be there.
    """
    device = device or torch.device("cpu")
    crafter = source if source is not None else model
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    labels_all, clean_probs, clean_pred = [], [], []
    adv_probs = {eps: [] for eps in settings.eps}
    adv_wrong = {eps: [] for eps in settings.eps}  # the decision was wrong at some iterate (white-box) or at the end
    adv_hit = {eps: [] for eps in settings.eps}  # the attack reached its goal (the target, or any wrong class)
    member_wrong = {eps: {} for eps in settings.eps}  # white-box ensembles: what each member alone broke
    examples, attacked, started = [], 0, time.perf_counter()
    multilabel = False
    for batch in loader:
        images, labels = batch["image"].float().to(device), batch["label"].to(device)
        multilabel = labels.ndim == 2
        offset = sum(len(x) for x in labels_all)  # index of this batch's first image
        targets = _targets(labels, settings, classes)
        with torch.inference_mode():
            logits = model(images).float()
        labels_all.append(labels.cpu().numpy())
        clean_probs.append(class_probabilities(model, images, logits, multilabel))
        clean_pred.append(decided(logits, multilabel).cpu().numpy())
        goal = targets if targets is not None else labels
        for eps in settings.eps:
            adv, broken, by_member = craft(crafter, images, labels, targets, eps, settings, generator)
            if source is not None:  # transfer: only what the final perturbation does to the target counts
                broken = torch.zeros_like(broken)
            attacked += len(images)
            with torch.inference_mode():
                adv_logits = model(adv).float()
            final = decided(adv_logits, multilabel)
            if multilabel:  # (N, L): each finding wrong at some iterate; the image is broken when any finding is
                wrong = (final != labels) | broken
                hit = wrong.any(1)
            else:
                hit = (final == goal if targets is not None else final != labels) | broken
                wrong = (final != labels) | (broken & (goal != labels) if targets is not None else broken)
            adv_probs[eps].append(class_probabilities(model, adv, adv_logits, multilabel))
            adv_wrong[eps].append(wrong.cpu().numpy())
            adv_hit[eps].append(hit.cpu().numpy())
            for name, member_broken in by_member.items() if source is None else ():  # transfer: no per-member
                member_wrong[eps].setdefault(name, []).append(member_broken.cpu().numpy())
            if eps == settings.eps[-1] and save_dir is not None:
                _save_adversarial(adv, labels, final, classes, Path(save_dir), start=offset)
            if eps == settings.eps[-1] and len(examples) < keep_examples:
                clean_decisions = decided(logits, multilabel)
                for k in range(min(len(images), keep_examples - len(examples))):
                    examples.append((images[k].cpu(), adv[k].cpu(), *(_label(t[k]) for t in
                                                                      (labels, clean_decisions, final))))
    seconds = time.perf_counter() - started
    labels = np.concatenate(labels_all)
    clean_p, clean_hat = np.concatenate(clean_probs), np.concatenate(clean_pred)
    clean_ok = ~_any_finding(clean_hat != labels)  # multi-label: every finding right
    if multilabel:
        clean = decision_scores(labels, clean_p, clean_hat != labels, classes)
    else:
        missing_class_warning(labels, clean_p.shape[1], "attack report")
        clean = {"accuracy": float(np.mean(clean_ok)), "auroc": auroc(labels, clean_p)}
    results = []
    for eps in settings.eps:
        probs, wrong, hit = (np.concatenate(found[eps]) for found in (adv_probs, adv_wrong, adv_hit))
        success = float(np.mean(hit[clean_ok])) if clean_ok.any() else None
        scores = decision_scores(labels, probs, wrong, classes) if multilabel else \
            {"accuracy": float(np.mean(~wrong)), "auroc": auroc(labels, probs)}
        row = {"eps": eps, **scores, "success_rate": success, "step_size": _step_size(settings, eps)}
        if member_wrong[eps]:  # each member alone (the row's accuracy is the worst case over all of them)
            row["members"] = {name: {"accuracy": float(np.mean(~(np.concatenate(found) | ~clean_ok))),
                                     "success_rate": float(np.mean(np.concatenate(found)[clean_ok]))
                                     if clean_ok.any() else None}
                              for name, found in member_wrong[eps].items()}
        results.append(row)
    iterative = settings.method != "fgsm"
    return {"attack": settings.method, "norm": settings.norm, "steps": settings.steps if iterative else 1,
            "step_size": settings.step_size, "restarts": settings.restarts if iterative else 1,
            **({"loss": settings.loss} if settings.method == "apgd" else {}),
            **({"members": [m.name for m in ensemble_members(len(classes), multilabel=multilabel)]}
               if settings.method == "autoattack" else {}),
            **({"task": "multilabel"} if multilabel else {}),
            "targeted": settings.targeted, "target_class": settings.target_class, "n": int(len(labels)),
            "clean": clean, "results": results, "seconds": round(seconds, 3),
            "images_per_second": round(attacked / max(seconds, 1e-9), 2), "examples": examples}


def _label(value: torch.Tensor) -> int | tuple[int, ...]:
    """A class index as an int, a multi-hot row as a tuple (as multilabel.label_name reads them)."""
    return int(value) if value.ndim == 0 else tuple(int(v) for v in value.tolist())


def _any_finding(wrong: np.ndarray) -> np.ndarray:
    """Per image: wrong (single-label), or some finding wrong (multi-label, (N, L))."""
    return wrong.any(axis=1) if wrong.ndim == 2 else wrong


def craft(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None,
          eps: float, settings: AttackSettings, generator: torch.Generator | None,
          ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One attack of `settings.method` at one eps: (adversarial images, per-image worst case, and for the ensemble
    what each member alone broke; {} otherwise)."""
    if settings.method == "fgsm":
        return *fgsm(model, images, labels, eps, settings.norm, targets, return_broken=True), {}
    if settings.method == "apgd":
        return *apgd(model, images, labels, eps, settings.steps, settings.norm, settings.loss, targets,
                     settings.restarts, generator, return_broken=True), {}
    if settings.method == "autoattack":
        return autoattack(model, images, labels, eps, settings.steps, settings.norm, settings.restarts, generator)
    return *pgd(model, images, labels, eps, settings.steps, settings.step_size, settings.norm, settings.random_start,
                settings.restarts, targets, generator=generator, return_broken=True), {}


def _step_size(settings: AttackSettings, eps: float) -> float:
    """The step of the report's rows: PGD's, FGSM's eps, APGD's first (2 eps, then halved where the loss stalls)."""
    if settings.method == "pgd":
        return settings.step_size if settings.step_size is not None else 2.5 * eps / settings.steps
    return eps if settings.method == "fgsm" else 2 * eps


def attack(run: str | Path | None = None, data: str | Path | None = None, settings: AttackSettings | None = None,
           split: str = "test", limit: int | None = None, source_run: str | Path | None = None,
           json_path: str | Path | None = None, save_images: str | Path | None = None,
           device: str | None = "auto", preset: str | None = None, options: dict | None = None,
           overwrite: bool = False, checks: bool = True, explain: bool = False) -> dict:
    """Attack a run's model on a split of its data (or another source); write the JSON report and plots.

    Args:
        run: a finished run directory; None = the newest finished run under runs/.
        data: data source (default: the run's own).
        settings: default: the run recipe's `attack:` section.
        split: val, test, train or all.
        limit: attack only the first `limit` images.
        source_run: craft the perturbations on this run's model instead (black-box transfer).
        json_path: also write the report here.
        save_images: save the adversarial images of the largest eps into this folder.
        device: auto (CUDA when available), cpu, cuda or cuda:N; None = the recipe's train.device. The model, the
            source model and the images all go there.
        preset, options: applied to `settings` by attack_settings (a preset replaces them; options not None
            override both), e.g. preset="finlayson", options={"eps": (2 / 255,)}.
        overwrite: allow `json_path` to replace an existing file and `save_images` to write into a non-empty folder
            (never a run's own files: medtricks.files.check_output).
        checks: add the gradient-masking checks (masking_checks; about twice the attack's time) as "checks".
        explain: add Grad-CAM of the gallery's clean and adversarial images (medtricks.explain.attention_shift) as
            "explain" and explain.png: does the attack move the model's attention?

    Returns:
        The report (DESIGN.md's attack JSON plus where its files are).
    """
    if json_path is not None:
        check_output(json_path, overwrite, "--json")
    if save_images is not None:
        check_output(save_images, overwrite, "--save-images", folder=True)
    target = open_run(run if run is not None else newest_run(), device)
    check_record_folder(target.path, "attacks")
    if explain and not isinstance(unwrap(target.model), MedModel):
        raise AttackError(f"--explain: {target.path} is an ensemble, whose maps would mix its members' attention; "
                          f"attack without --explain, or explain a member run.")
    settings = attack_settings(settings or target.recipe.attack, preset, **(options or {}))
    if target.multilabel:
        refuse_targeted_multilabel(settings, str(target.path))
    dataset = target.dataset(data, split, limit)
    source = decision_model(target.open_same_task(source_run, "--source-run")) if source_run is not None else None
    loader, model = target.loader(dataset), decision_model(target)
    with new_folder(save_images, SAVED_IMAGE) if save_images is not None else nullcontext() as save_dir:
        report = run_attack(model, loader, settings, target.classes, source, keep_examples=8, save_dir=save_dir,
                            device=target.device)
    examples = report.pop("examples")
    report["checks"] = masking_checks(model, loader, settings, target.classes, report, source, target.device) \
        if checks else [_check("all", None, "skipped (checks=False)", "")]
    report.update({"split": split, "data": str(data if data is not None else target.source),
                   "run": str(target.path), "source_run": str(source_run) if source_run else None,
                   "device": str(target.device)})
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    kind = f"{settings.method}-{settings.norm}{'-targeted' if settings.targeted else ''}"
    out_dir = target.path / "attacks" / f"{kind}-{stamp}"
    try:
        with record_folder(target.path, "attacks", out_dir.name) as folder:
            plots.plot_robustness(report, folder / "robustness.png")
            plots.plot_adversarial_examples(examples, target.classes, folder / "examples.png", eps=settings.eps[-1])
            if explain:
                from medtricks.explain import attention_shift  # MONAI is imported only when maps are asked for

                report["explain"] = attention_shift(target.model, examples, target.classes, folder / "explain.png",
                                                    multilabel=target.multilabel)
            write_json(folder / "attack.json", report)
    except OutputError:
        if json_path is not None:  # the file the user asked for does not depend on the run being writable
            write_json(Path(json_path), report, replace=overwrite)
        raise
    if json_path is not None:
        write_json(Path(json_path), report, replace=overwrite)
    report["files"] = str(out_dir)
    return report


# a budget that can turn almost any image into almost any other: an honest attack breaks (nearly) every image there
LARGE_EPS = {"linf": 64 / 255, "l2_factor": 16.0}


def _check(name: str, passed: bool | None, detail: str, warning: str) -> dict:
    status = "SKIP" if passed is None else "PASS" if passed else "WARN"
    return {"check": name, "status": status, "detail": detail, **({"meaning": warning} if status == "WARN" else {})}


def masking_checks(model: torch.nn.Module, loader, settings: AttackSettings, classes: Sequence[str], report: dict,
                   source: torch.nn.Module | None = None, device: torch.device | None = None) -> list[dict]:
    """Carlini et al. 2019's signs of gradient masking ("On evaluating adversarial robustness", sec. 5), each
    PASS, WARN (with what it may mean) or SKIP, from extra attacks at the sweep's largest eps on the same images:

    - large_eps: APGD at a budget that can change the image almost arbitrarily (L-inf 64/255, or 8x the largest eps;
      L2 16x) breaks >= 95% of the correctly classified images (the sweep's own success counts: its adversarial
      images lie in the larger ball; when it already reached 95%, no extra attack runs);
    - iterative_vs_one_step: the iterative attack's (PGD, APGD, the ensemble) success rate is at least FGSM's
      (within one image);
    - more_steps_restarts: the same attack with twice the steps and one more restart is not weaker (within one
      image and 2%);
    - transfer_vs_white_box (transfer attacks): the transfer attack is not stronger than white-box PGD on the target.
    """
    top = max(settings.eps)
    rows = {row["eps"]: row for row in report["results"]}
    large = min(1.0, max(LARGE_EPS["linf"], 8 * top)) if settings.norm == "linf" else LARGE_EPS["l2_factor"] * top
    pgd_settings = dataclasses.replace(settings, method="pgd", step_size=None, eps=(top,), loss="ce")

    def success(changes: dict, crafted_on_source: bool = False) -> float | None:
        run = run_attack(model, loader, dataclasses.replace(pgd_settings, **changes), classes,
                         source if crafted_on_source else None, device=device)
        return run["results"][0]["success_rate"]

    clean = report["clean"]  # images decided right: multi-label, with every finding right (success: any flips)
    clean_right = round(clean["exact_match" if "exact_match" in clean else "accuracy"] * report["n"])
    if clean_right == 0:
        return [_check("all", None, "no image is classified correctly on the clean data: nothing to check", "")]
    one = 1 / clean_right
    main = rows[top]["success_rate"] if source is None else success({})  # white-box at the largest eps
    checks = []
    # an adversarial image of a smaller ball lies in the large one too: the sweep's best counts (and may spare the run)
    swept = max((row["success_rate"] or 0.0, row["eps"]) for row in report["results"])
    if swept[0] >= 0.95:
        at_large, how = swept[0], f"already at eps {swept[1]:.4g} of the sweep, inside the large ball"
    else:  # APGD: PGD's fixed step (2.5 eps / steps) overshoots at so large a budget and can miss what 16/255 breaks
        at_large = max(run_attack(model, loader, dataclasses.replace(pgd_settings, method="apgd", eps=(large,)),
                                  classes, device=device)["results"][0]["success_rate"], swept[0])
        how = f"white-box APGD, {settings.steps} steps"
    checks.append(_check("large_eps", at_large >= 0.95, f"success rate {at_large:.3f} at eps {large:.4g} ({how})",
                         "an attack with a budget this large should break nearly "
                         "every image; a model that resists it likely masks its gradients (a non-differentiable or "
                         "saturating input step, randomness): the sweep's robust accuracy is then an overestimate."))
    if settings.method != "fgsm":
        name = settings.method.upper() if settings.method != "autoattack" else "the ensemble"
        fgsm_success = run_attack(model, loader, dataclasses.replace(settings, method="fgsm", eps=(top,), steps=1,
                                                                     step_size=None, restarts=1, loss="ce"), classes,
                                  device=device)["results"][0]["success_rate"]
        checks.append(_check("iterative_vs_one_step", main + one >= fgsm_success,
                             f"{name} {main:.3f} vs FGSM {fgsm_success:.3f} at eps {top:.4g}",
                             "one step beats the iterative attack: its step size or number of steps may be wrong, "
                             "or the loss surface is masked near the data."))
        more = {"steps": 2 * settings.steps, "restarts": settings.restarts + 1}
        stronger = success(more) if settings.method == "pgd" else run_attack(
            model, loader, dataclasses.replace(settings, eps=(top,), **more), classes,
            device=device)["results"][0]["success_rate"]
        checks.append(_check("more_steps_restarts", stronger + one + 0.02 >= main,
                             f"{name}, {2 * settings.steps} steps, {settings.restarts + 1} restarts: {stronger:.3f} "
                             f"vs {settings.steps} steps, {settings.restarts} restart(s): {main:.3f}",
                             "more attack effort found fewer adversarial examples: the attack is not converging, "
                             "a sign of masked or noisy gradients."))
    else:
        checks.append(_check("iterative_vs_one_step", None, "FGSM report: run --pgd for the iterative checks", ""))
    if source is not None:
        transfer = rows[top]["success_rate"]
        checks.append(_check("transfer_vs_white_box", transfer <= main + one,
                             f"transfer {transfer:.3f} vs white-box {main:.3f} at eps {top:.4g}",
                             "the black-box attack beats the white-box one on the target: the target's own gradients "
                             "are likely masked."))
    return checks


# the files _save_adversarial names: --save-images --overwrite removes an earlier attack's before adding its own
SAVED_IMAGE = re.compile(r"\d{5,}_true-.*_pred-.*\.png")


def _save_adversarial(adv: torch.Tensor, labels, preds, classes, folder: Path, start: int) -> None:
    """Adversarial images as 16-bit grey PNGs or 8-bit RGB PNGs named by index, true and predicted class (multi-label:
    the findings joined by +, or none; no metadata is written into the files; characters other than ASCII letters,
    digits, - and _ in class names become _, and long names are cut so that a file name stays legal)."""
    safe = [re.sub(r"[^\w-]", "_", name, flags=re.ASCII) for name in classes]
    for k in range(len(adv)):
        pixels = adv[k].clamp(0, 1).cpu().numpy()
        # cut to keep the name within 255 bytes (the index keeps it unique)
        true, pred = (label_name(_label(c[k]), safe)[:100] for c in (labels, preds))
        if pixels.shape[0] == 1:
            image = Image.fromarray((pixels[0] * 65535).round().astype(np.uint16))
        else:
            image = Image.fromarray((np.moveaxis(pixels, 0, -1) * 255).round().astype(np.uint8))
        atomic_write(folder / f"{start + k:05d}_true-{true}_pred-{pred}.png", partial(image.save, format="PNG"))
