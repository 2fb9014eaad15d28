"""The commands on runs: finetune, evaluate, predict, attack, corrupt, ablate, ensemble, explain, compare."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from medtricks.cli.common import (
    DEVICE_HELP,
    OverwriteOption,
    RunDeviceOption,
    TTAOption,
    app,
    console,
    epoch_line,
    err_console,
    fail,
    file_out,
    num,
    progress_bar,
)
from medtricks.errors import MedtricksError


@app.command("finetune")
def finetune_cmd(
    ctx: typer.Context,
    recipe: Annotated[str | None, typer.Option("--recipe", "-r", help="Bundled recipe name or YAML path "
                                               "[default: demo; with --resume the run's own].")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Data folder, CSV manifest, .npz or public data set "
                                            "name (medtricks data list).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (must not exist, unless --resume).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: key=value.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Override the recipe seed.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the unfinished run in --out after its last "
                                         "completed epoch.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="Print only the run directory.")] = False,
    nproc: Annotated[int | None, typer.Option("--nproc", help="Train with N processes on this machine (one per "
                                              "GPU): starts torchrun with the other options.")] = None,
) -> None:
    """Fine-tune a pretrained CNN as a recipe says; writes a run directory (model, metrics, report, plots).

    Example: medtricks finetune --recipe pneumoniamnist --data ../shared/data/pneumoniamnist --set train.epochs=5

    After a crash or a kill: medtricks finetune --out runs/pneumoniamnist-20261128-101500 --resume
    (the run continues from its last completed epoch and ends as if it had never stopped).

    On several GPUs: medtricks finetune --recipe pneumonia_cxr --nproc 8, or torchrun --nproc_per_node 8 -m
    medtricks finetune --recipe pneumonia_cxr (multi-node: see the README). train.batch_size is the global batch.
    """
    from medtricks import distributed
    from medtricks.files import DiskFullError
    from medtricks.finetune import finetune

    if nproc is not None and nproc != 1:
        top = ctx.find_root().params  # the app's own --debug / --quiet
        args = [*(["--debug"] if top.get("debug") else []), *(["--quiet"] if top.get("quiet") else []), "finetune",
                *(["--recipe", recipe] if recipe is not None else []), *(["--data", str(data)] if data else []),
                *(["--out", str(out)] if out is not None else []), *[a for s in set_ or () for a in ("--set", s)],
                *(["--seed", str(seed)] if seed is not None else []), *(["--resume"] if resume else []),
                *(["--quiet"] if quiet else [])]
        try:
            code = distributed.launch(nproc, args)
        except MedtricksError as exc:
            fail(exc)
        raise typer.Exit(code)
    main_rank = distributed.is_main()  # the other ranks print nothing on success and log only warnings
    if not main_rank:
        logging.getLogger("medtricks").setLevel(logging.WARNING)
    bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[line]}"), TimeElapsedColumn(), console=err_console,
                   disable=quiet or not main_rank, transient=True)
    task = bar.add_task("finetune", total=None, line="checking the recipe")

    def on_start(resolved) -> None:
        bar.update(task, description=resolved.name, total=resolved.train.epochs, line="reading the data")

    def on_epoch(row: dict) -> None:
        bar.update(task, completed=row["epoch"], line=epoch_line(row))
        if not quiet:
            bar.console.print(epoch_line(row), highlight=False)

    try:
        with bar:
            run = finetune(recipe if recipe is not None or resume else "demo", data=data, out=out,
                           overrides=set_ or (), seed=seed, on_epoch=on_epoch, resume=resume, on_start=on_start)
    except MedtricksError as exc:
        if isinstance(exc, DiskFullError):
            exc = DiskFullError(f"{exc} The run continues from its last finished epoch with `medtricks finetune "
                                f"--out RUN --resume`.")
        fail(exc)
    if not main_rank:
        return
    if quiet:
        console.print(str(run))
        return
    _print_report(run)


def _print_report(run: Path) -> None:
    """One line per split of a run's report.json, then the run directory."""
    report = json.loads((run / "report.json").read_text())
    for split, m in report["splits"].items():
        ci = "" if not m["auroc_ci95"] or None in m["auroc_ci95"] else \
            f" [{m['auroc_ci95'][0]:.3f}, {m['auroc_ci95'][1]:.3f}]"
        console.print(f"{split}: n={m['n']} AUROC {num(m['auroc'])}{ci}  accuracy {num(m['accuracy'])}  balanced "
                      f"accuracy {num(m['balanced_accuracy'])}  sensitivity {num(m['sensitivity'])}  specificity "
                      f"{num(m['specificity'])}", highlight=False)
    console.print(f"run directory: {run}")


@app.command("evaluate")
def evaluate_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory written by finetune.")],
    data: Annotated[Path | None, typer.Option("--data", help="Data source (default: the run's own).")] = None,
    split: Annotated[str, typer.Option("--split", help="val, test, train, or all (an external set).")] = "val",
    json_path: Annotated[Path | None, file_out("--json", "Write the metrics as JSON here.")] = None,
    device: RunDeviceOption = None,
    overwrite: OverwriteOption = False,
    tta: TTAOption = False,
    explain_summary: Annotated[bool, typer.Option("--explain-summary", help="Grad-CAM shortcut screen over the "
                                                  "whole split (border and corner saliency), with a gallery.")]
    = False,
) -> None:
    """Evaluate a run's model on a split of its data or on another source.

    Example: medtricks evaluate runs/demo-20261128-101500 --data other_site/ --split all --json external.json
    (under torchrun --nproc_per_node N -m medtricks evaluate ...: each process predicts a shard, rank 0 prints).
    """
    from medtricks import distributed
    from medtricks.files import check_output, to_json
    from medtricks.finetune import evaluate

    try:
        gallery = check_output(Path(f"shortcuts-{run.resolve().name}-{split}.png"), overwrite,
                               "--explain-summary gallery") if explain_summary else None  # before any output
        with distributed.process_group():
            metrics = evaluate(run, data=data, split=split, json_path=json_path, device=device, overwrite=overwrite,
                               tta=tta)
    except MedtricksError as exc:
        fail(exc)
    if explain_summary and distributed.is_main():
        try:
            from medtricks.explain import explain_split
            from medtricks.files import write_json
            from medtricks.runs import open_run

            metrics["explain_summary"] = explain_split(open_run(run, device), split, data, gallery=gallery)
            if json_path is not None:  # the file evaluate just wrote, now with the screen
                write_json(json_path, metrics)
        except MedtricksError as exc:
            fail(exc)
    if distributed.is_main():
        console.print(to_json(metrics, indent=2))


@app.command("predict")
def predict_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory written by finetune.")],
    inputs: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    out: Annotated[Path | None, file_out("--out", "Write predictions to this CSV.")] = None,
    device: RunDeviceOption = None,
    overwrite: OverwriteOption = False,
    tta: TTAOption = False,
) -> None:
    """Predict classes (and probabilities) for images with a run's model.

    Example: medtricks predict runs/demo-20261128-101500 new_images/ --out predictions.csv
    """
    from medtricks.finetune import predict

    try:
        rows = predict(run, inputs, out_csv=out, device=device, overwrite=overwrite, tta=tta)
    except MedtricksError as exc:
        fail(exc)
    for row in rows if out is None else []:
        console.print(f"{row['path']}\t{'ERROR: ' + row['error'] if row['error'] else row['prediction']}",
                      highlight=False)
    failed = [r for r in rows if r["error"]]
    if out is not None:
        console.print(f"{len(rows) - len(failed)} predictions written to {out}; {len(failed)} unreadable",
                      highlight=False)
    for row in failed:
        err_console.print(Text("unreadable:", style="yellow"), row["error"], highlight=False)
    if len(failed) == len(rows):
        fail(MedtricksError(f"none of the {len(rows)} image file(s) could be read (listed above); nothing was "
                             f"predicted."))


@app.command("attack")
def attack_cmd(
    run: Annotated[Path | None, typer.Argument(help="Run directory (default: the newest under runs/).")] = None,
    pgd: Annotated[bool, typer.Option("--pgd", help="Projected gradient descent (default).")] = False,
    fgsm: Annotated[bool, typer.Option("--fgsm", help="Fast gradient sign method.")] = False,
    apgd: Annotated[bool, typer.Option("--apgd", help="Auto-PGD (Croce & Hein 2020): no step size to tune.")] = False,
    autoattack: Annotated[bool, typer.Option("--autoattack", help="APGD-CE + targeted APGD ensemble, per-image "
                                             "worst case (works on binary models).")] = False,
    loss: Annotated[str | None, typer.Option("--loss", help="APGD loss: ce or margin.")] = None,
    eps: Annotated[str | None, typer.Option("--eps", help="Budgets in [0, 1] units: 1/255,2/255,...")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="PGD/APGD steps (recipe default: 10; "
                                              "AutoAttack's standard is 100).")] = None,
    step_size: Annotated[float | None, typer.Option("--step-size", help="Default 2.5 x eps / steps.")] = None,
    restarts: Annotated[int | None, typer.Option("--restarts", help="PGD random restarts.")] = None,
    norm: Annotated[str | None, typer.Option("--norm", help="linf or l2.")] = None,
    targeted: Annotated[bool, typer.Option("--targeted", help="Binary: flipped label; else --target-class.")] = False,
    target_class: Annotated[str | None, typer.Option(
        "--target-class", help="Class to aim at (multi-class: required; binary default: the flipped label).")] = None,
    preset: Annotated[str | None, typer.Option("--preset", help="finlayson: their PGD in [0, 1] units.")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Data source (default: the run's own).")] = None,
    split: Annotated[str, typer.Option("--split", help="val, test, train or all.")] = "test",
    limit: Annotated[int | None, typer.Option("--limit", help="Attack only the first N images.")] = None,
    source_run: Annotated[Path | None, typer.Option("--source-run", help="Craft on this run (transfer).")] = None,
    json_path: Annotated[Path | None, file_out("--json", "Also write the report here.")] = None,
    save_images: Annotated[Path | None, typer.Option("--save-images", help="Save adversarial PNGs here.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the random starts.")] = None,
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "auto",
    overwrite: OverwriteOption = False,
    checks: Annotated[bool, typer.Option("--checks/--no-checks", help="Gradient-masking checks (Carlini et al. "
                                         "2019; about doubles the time).")] = True,
    explain: Annotated[bool, typer.Option("--explain", help="Grad-CAM of the gallery's clean and adversarial "
                                          "images: does the attack move the model's attention?")] = False,
) -> None:
    """Attack a fine-tuned model with FGSM, PGD, APGD or the AutoAttack-style ensemble over a sweep of eps; writes
    JSON and plots under RUN/attacks/.

    Defaults come from the run recipe's `attack:` section; a --preset replaces them, and options given here
    override both.

    Example: medtricks attack runs/demo --pgd --eps 1/255,2/255,4/255,8/255 --limit 200
    """
    from medtricks.robustness import attack, parse_eps

    try:
        chosen = [name for name, on in (("pgd", pgd), ("fgsm", fgsm), ("apgd", apgd), ("autoattack", autoattack))
                  if on]
        if len(chosen) > 1:
            raise MedtricksError(f"choose one of --pgd, --fgsm, --apgd and --autoattack (got --{', --'.join(chosen)}).")
        options = {"steps": steps, "step_size": step_size, "restarts": restarts, "norm": norm, "loss": loss,
                   "target_class": target_class, "seed": seed, "method": chosen[0] if chosen else None,
                   "targeted": True if targeted else None, "eps": parse_eps(eps) if eps is not None else None}
        report = attack(run, data=data, preset=preset, options=options, split=split, limit=limit,
                        source_run=source_run, json_path=json_path, save_images=save_images, device=device,
                        overwrite=overwrite, checks=checks, explain=explain)
    except MedtricksError as exc:
        fail(exc)
    if report.get("task") == "multilabel":
        _print_multilabel_attack(report)
    else:
        console.print(f"{report['attack']} {report['norm']}{' targeted' if report['targeted'] else ''} on "
                      f"{report['n']} images ({report['split']}): clean accuracy "
                      f"{num(report['clean']['accuracy'])}", highlight=False)
        for row in report["results"]:
            console.print(f"  eps {row['eps'] * 255:6.2f}/255: accuracy {num(row['accuracy'])}  AUROC "
                          f"{num(row['auroc'])}  success rate {num(row['success_rate'])}", highlight=False)
            if "members" in row:
                console.print("    alone: " + ", ".join(f"{name} {num(m['accuracy'])}" for name, m in
                                                       row["members"].items()), highlight=False)
    for check in report["checks"]:
        style = {"PASS": "green", "WARN": "bold yellow"}.get(check["status"], "")
        console.print(Text(f"  check {check['check']}: {check['status']}", style=style), f"({check['detail']})",
                      highlight=False)
        if check["status"] == "WARN":
            console.print(f"    {check['meaning']}", highlight=False)
    if explain and (rho := [row["spearman"] for row in report["explain"] if row["spearman"] is not None]):
        console.print(f"  attention (Grad-CAM, clean vs adversarial, {len(rho)} gallery images): Spearman "
                      f"{min(rho):.2f} to {max(rho):.2f} (explain.png)", highlight=False)
    console.print(f"{report['images_per_second']:.1f} images/s on {report['device']}; report and plots in "
                  f"{report['files']}", highlight=False)


def _print_multilabel_attack(report: dict) -> None:
    """attack's multi-label rows: the means over findings and exact match per eps, then each finding's AUROC."""
    clean = report["clean"]
    console.print(f"{report['attack']} {report['norm']} on {report['n']} images ({report['split']}), multi-label "
                  f"(ascends the findings' mean BCE): clean mean accuracy {num(clean['accuracy'])}, exact match "
                  f"{num(clean['exact_match'])}, mean AUROC {num(clean['auroc'])}", highlight=False)
    for row in report["results"]:
        console.print(f"  eps {row['eps'] * 255:6.2f}/255: mean accuracy {num(row['accuracy'])}  exact match "
                      f"{num(row['exact_match'])}  mean AUROC {num(row['auroc'])}  success rate (any finding "
                      f"flips) {num(row['success_rate'])}", highlight=False)
    table = Table(title="AUROC per finding (accuracy per finding in the JSON)", title_justify="left")
    table.add_column("finding")
    for column in ["clean", *(f"{row['eps'] * 255:.2f}/255" for row in report["results"])]:
        table.add_column(column, justify="right", no_wrap=True)
    for name, m in clean["per_label"].items():
        table.add_row(name, num(m["auroc"]), *(num(row["per_label"][name]["auroc"]) for row in report["results"]))
    console.print(table)


@app.command("corrupt")
def corrupt_cmd(
    run: Annotated[Path | None, typer.Argument(help="Run directory (default: the newest under runs/).")] = None,
    preset: Annotated[str | None, typer.Option("--preset", help="radiograph, fundus or dermoscopy (default: the "
                                               "run's data.augment).")] = None,
    corruptions: Annotated[str | None, typer.Option("--corruptions", help="Names a,b instead of a preset.")] = None,
    severities: Annotated[str | None, typer.Option("--severities", help="Among 1-5 (recipe default: "
                                                   "1,2,3,4,5).")] = None,
    against: Annotated[Path | None, typer.Option("--against", help="Compare with this run (same images).")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Data source (default: the run's own).")] = None,
    split: Annotated[str, typer.Option("--split", help="val, test, train or all.")] = "test",
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first N images.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random corruptions.")] = 0,
    json_path: Annotated[Path | None, file_out("--json", "Also write the report here.")] = None,
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "auto",
    overwrite: OverwriteOption = False,
) -> None:
    """Evaluate a fine-tuned model under natural corruptions (noise, blur, contrast, gamma, JPEG, ...) at five
    severities; writes corruptions.json, corruptions.png and gallery.png under RUN/corruptions/.

    Example: medtricks corrupt runs/sin --against runs/imagenet --limit 500
    """
    from medtricks.corruption_report import corruption_report, parse_severities

    try:
        names = [n.strip() for n in corruptions.split(",") if n.strip()] if corruptions is not None else None
        bar, progress = progress_bar("corrupting")
        with bar:
            report = corruption_report(run, data=data, split=split, preset=preset, corruptions=names,
                                       severities=parse_severities(severities) if severities is not None else None,
                                       seed=seed, limit=limit,
                                       against=against, json_path=json_path, device=device, overwrite=overwrite,
                                       progress=progress)
    except MedtricksError as exc:
        fail(exc)
    clean = report["clean"]
    means = " (multi-label: accuracy and AUROC are means over findings)" if report.get("task") == "multilabel" else ""
    console.print(f"{report['preset']} corruptions on {report['n']} images ({report['split']}): clean accuracy "
                  f"{num(clean['accuracy'])}, AUROC {num(clean['auroc'])}{means}", highlight=False)
    versus = {r["corruption"]: r for r in report["versus"]["corruptions"]} if "versus" in report else {}
    for row in report["corruptions"]:
        extra = f"  CE vs --against {num(versus[row['corruption']]['ce'])}" if versus else ""
        console.print(f"  {row['corruption']:<18} accuracy {num(row['accuracy'])}  AUROC {num(row['auroc'])}"
                      f"{extra}", highlight=False)
    console.print(f"mean corruption error {num(report['mce'])} (relative to clean "
                  f"{num(report['relative_mce'], True)})", highlight=False)
    if versus:
        console.print(f"against {report['against']['run']}: its mean corruption error "
                      f"{num(report['against']['mce'])}; mCE normalised by it {num(report['versus']['mce'])} "
                      f"(< 1: this run is more robust), relative mCE {num(report['versus']['relative_mce'])}",
                      highlight=False)
    console.print(f"report and plots in {report['files']}", highlight=False)


@app.command("ablate")
def ablate_cmd(
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Bundled recipe name or YAML path.")] = "demo",
    data: Annotated[Path | None, typer.Option("--data", help="Data folder, CSV manifest or .npz.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder; an existing one is resumed.")] = None,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds 0..N-1 per variant (>= 2 for an interval).")] = 3,
    tricks: Annotated[str | None, typer.Option("--tricks", help="Tricks a,b (default: the recipe's).")] = None,
    mode: Annotated[str, typer.Option("--mode", help="leave-one-out, add-one or each.")] = "leave-one-out",
    attack: Annotated[bool, typer.Option("--attack", help="Add robust accuracy (recipe attack, max eps).")] = False,
    corruptions: Annotated[bool, typer.Option("--corruptions", help="Add mean accuracy under the recipe's "
                                              "corruptions.")] = False,
    folds: Annotated[int, typer.Option("--folds", help="K-fold cross-validation: scored on held-out folds.")] = 0,
    variant: Annotated[list[str] | None, typer.Option("--variant", help="NAME:key=value[,key=value] (repeatable): "
                                                      "the reference with those recipe keys changed.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key in every run: key=value.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="Print only the output folder.")] = False,
) -> None:
    """Ablate tricks over seeds: train a reference and one variant per trick, paired differences with 95% intervals.

    Modes: leave-one-out (the recipe vs the recipe without X), add-one (the recipe without the listed tricks vs
    that plus X), each (no tricks vs only X). Every variant uses seeds 0..N-1, so seed k of each has the same
    patient-level split and the differences are paired. Metrics on the validation split (--attack adds robust
    accuracy under the recipe's attack: settings at their largest eps, --set attack.method=autoattack for the
    ensemble; --corruptions adds the mean accuracy under the recipe's corruption preset and severities). Writes
    OUT/ablation.json, OUT/ablation.md (the table printed at the end), OUT/forest.png and one run per variant and
    seed under OUT/runs/.
    Default OUT: runs/ablate-<recipe>-<time>. Run the same command with the same --out again to resume: finished
    runs are reused (after checking their recipe), unfinished ones continued or set aside, none overwritten.

    Variants over any recipe key: --variant 64px:data.image_size=64 (repeatable; without --tricks only these).

    Example: medtricks ablate --recipe demo --seeds 3 --tricks warmup,label_smoothing --out runs/ablate-demo
    """
    from medtricks.ablate import ablate

    bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[line]}", markup=False), TimeElapsedColumn(), console=err_console,
                   disable=quiet, transient=True)
    task = bar.add_task("runs", total=None, line="loading the recipe")

    def on_run(event: dict) -> None:
        where = f"{event['variant']} seed {event['seed']}" + (f" fold {event['fold']}" if "fold" in event else "")
        if event["status"] == "epoch":
            line = f"{where}: {epoch_line(event['row'])}"
        elif event["status"] in ("trained", "resumed", "reused"):
            scores = "  ".join(f"{k} {num(v)}" for k, v in event["values"].items())
            line = f"{where}: {event['status']}  {scores}"
            if not quiet:
                bar.console.print(line, highlight=False)
        else:
            line = f"{where}: {event['status']}"
        bar.update(task, completed=event["done"], total=event["total"], line=line)

    try:
        with bar:
            result = ablate(recipe, data=data, out=out, seeds=seeds, mode=mode, attack=attack, corruptions=corruptions,
                            overrides=set_ or (), custom=variant or (), folds=folds,
                            tricks=[t.strip() for t in tricks.split(",") if t.strip()] if tricks is not None else None,
                            on_run=on_run)
    except MedtricksError as exc:
        fail(exc)
    folder = Path(result["files"]["ablation.json"]).parent
    if quiet:
        console.print(str(folder))
        return
    console.print(Path(result["files"]["ablation.md"]).read_text(), highlight=False)
    console.print(f"ablation.json, ablation.md, forest.png and runs/ in {folder}", highlight=False)


@app.command("ensemble")
def ensemble_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Finished runs of one task and one data split (2-16).")],
    out: Annotated[Path | None, typer.Option("--out", help="New ensemble directory [default: runs/ensemble-<time>].")]
    = None,
    device: RunDeviceOption = None,
) -> None:
    """Average runs' probabilities into a run-like directory that evaluate, predict, compare, attack and corrupt
    open like any run; the binary threshold (multi-label: each finding's) is chosen again on the validation split.

    Example: medtricks ensemble runs/seed-0 runs/seed-1 runs/seed-2 --out runs/ensemble-3
    """
    from medtricks.ensemble import ensemble

    try:
        folder = ensemble(runs, out=out, device=device)
    except MedtricksError as exc:
        fail(exc)
    _print_report(folder)


@app.command("explain")
def explain_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory written by finetune.")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    method: Annotated[str, typer.Option("--method", help="gradcam, gradcam++ or occlusion.")] = "gradcam",
    target_class: Annotated[str | None, typer.Option("--class", help="Class to explain [default: the run's "
                                                     "decision per image].")] = None,
    layer: Annotated[str | None, typer.Option("--layer", help="Grad-CAM layer [default: the last feature stage].")]
    = None,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for overlays, maps and explain.json [default: "
                                             "explain-<run>-<method>].")] = None,
    sanity: Annotated[bool, typer.Option("--sanity", help="Cascading randomization check (Adebayo et al. 2018).")]
    = False,
    shortcuts: Annotated[bool, typer.Option("--shortcuts", help="Screen for saliency on borders and corners.")]
    = False,
    device: RunDeviceOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Saliency maps (where the model looks) as overlays and raw maps, with optional sanity and shortcut screens.

    Example: medtricks explain runs/covid images/ --method gradcam --shortcuts --sanity --out covid-maps
    """
    import torch

    from medtricks.explain import explain, sanity_check, shortcut_screen, write_explanations
    from medtricks.runs import open_run

    try:
        opened = open_run(run, device)
        result = explain(opened, images, method=method, target_class=target_class, layer=layer)
        extra = {}
        if shortcuts:
            extra["shortcuts"] = shortcut_screen(result.maps)
        if sanity:
            pixels = torch.from_numpy(result.images).to(opened.device)
            extra["sanity"] = sanity_check(opened.model, pixels, result.classes, method, layer,
                                           multilabel=opened.multilabel)
        folder = write_explanations(result, out or Path(f"explain-{run.resolve().name}-{method}"), method, overwrite,
                                    extra)
    except MedtricksError as exc:
        fail(exc)
    for path, name, probs, cls in zip(result.paths, result.class_names, result.probabilities, result.classes,
                                      strict=True):
        console.print(f"{path}\t{name} (p = {probs[cls]:.3f})", highlight=False)
    for row in result.unreadable:
        err_console.print(Text("unreadable:", style="yellow"), row["error"], highlight=False)
    if shortcuts:
        screen = extra["shortcuts"]
        console.print(f"shortcut screen: border {screen['border_density']:.2f}x and corners "
                      f"{screen['corner_density']:.2f}x a uniform map's share, peaks outside the centre in "
                      f"{screen['peaks_outside_central']:.0%} -> {'FLAGGED' if screen['flagged'] else 'not flagged'} "
                      f"({screen['note']})", highlight=False)
    if sanity:
        check = extra["sanity"]
        last = check["steps"][-1]
        console.print(f"sanity: all stages randomized: Spearman {num(last['spearman'])}, SSIM {num(last['ssim'])} "
                      f"-> {'FLAGGED' if check['flagged'] else 'the maps depend on the trained weights'}",
                      highlight=False)
    console.print(f"overlays, maps and explain.json in {folder}", highlight=False)


@app.command("compare")
def compare_cmd(
    run_a: Annotated[Path, typer.Argument(help="Run directory A.")],
    run_b: Annotated[Path, typer.Argument(help="Run directory B (same classes).")],
    data: Annotated[Path | None, typer.Option("--data", help="Data source (default: the runs' own).")] = None,
    split: Annotated[str, typer.Option("--split", help="val, test, train, or all (an external set).")] = "val",
    json_path: Annotated[Path | None, file_out("--json", "Also write the result as JSON here.")] = None,
    device: RunDeviceOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Compare two runs' models on the same images: DeLong test and patient-level paired bootstrap for AUROC
    (macro AUROC bootstrap for multi-class), exact McNemar test for accuracy; differences are A - B.

    Multi-label runs: DeLong per finding with Holm-adjusted p, bootstrap of the mean AUROC, McNemar on exact matches.

    Example: medtricks compare runs/ablate-demo/runs/reference/seed-0 runs/ablate-demo/runs/without-warmup/seed-0
    """
    from medtricks.compare import compare
    from medtricks.files import check_output, write_json

    try:
        if json_path is not None:
            check_output(json_path, overwrite, "--json")
        result = compare(run_a, run_b, data=data, split=split, device=device)
        if json_path is not None:
            write_json(json_path, result, replace=overwrite)
    except MedtricksError as exc:
        fail(exc)

    a, b, auroc, mcnemar = result["a"], result["b"], result["auroc"], result["accuracy"]["mcnemar"]
    console.print(f"{result['n']} images ({result['split']} of {result['data']}), patients: "
                  f"{result['patients'] or 'no ids, images resampled'}", highlight=False)
    if result.get("task") == "multilabel":
        _print_multilabel_compare(result, run_a, run_b)
        return
    console.print(f"A {run_a}: AUROC {num(a['auroc'])}  accuracy {num(a['accuracy'])}", highlight=False)
    console.print(f"B {run_b}: AUROC {num(b['auroc'])}  accuracy {num(b['accuracy'])}", highlight=False)
    if auroc["delong"] is not None:
        d = auroc["delong"]
        console.print(f"AUROC A - B {num(d['difference'], True)}  DeLong 95% CI [{num(d['ci95'][0], True)}, "
                      f"{num(d['ci95'][1], True)}]  p = {d['p_value']:.4g}", highlight=False)
    if auroc["bootstrap"] is not None:
        boot = auroc["bootstrap"]
        console.print(f"AUROC A - B {num(boot['difference'], True)}  paired bootstrap 95% CI "
                      f"[{num(boot['ci95'][0], True)}, {num(boot['ci95'][1], True)}] ({boot['replicates']} "
                      f"replicates)", highlight=False)
    if auroc["note"]:
        console.print(f"AUROC: {auroc['note']}", highlight=False)
    console.print(f"accuracy A - B {num(mcnemar['accuracy_difference'], True)}  exact McNemar p = "
                  f"{mcnemar['p_value']:.4g} (A right / B wrong: {mcnemar['a_only']}, B right / A wrong: "
                  f"{mcnemar['b_only']})", highlight=False)


def _print_multilabel_compare(result: dict, run_a: Path, run_b: Path) -> None:
    """compare's multi-label result: a table per finding (AUROC of A and B, DeLong difference, p, Holm p; intervals
    and accuracies are in the JSON), then the mean AUROC with its bootstrap interval and the exact-match McNemar
    test."""
    table = Table(title=f"per finding, A - B: DeLong's test, p adjusted by Holm over "
                        f"{result['multiple_comparisons']['tests']} findings", title_justify="left")
    for name in ("finding", "positives", "AUROC A", "AUROC B", "A - B", "p", "p (Holm)"):
        table.add_column(name, justify="left" if name == "finding" else "right", no_wrap=True)
    for name, m in result["per_label"].items():
        d = m["delong"]
        table.add_row(name, str(m["positives"]), num(m["a"]["auroc"]), num(m["b"]["auroc"]),
                      num(d["difference"], True) if d else "n/a", f"{d['p_value']:.3g}" if d else "n/a",
                      f"{m['p_holm']:.3g}" if d else "n/a")
    console.print(table)
    console.print(f"multiple comparisons: {result['multiple_comparisons']['note']}", highlight=False)
    for label, side, run in (("A", result["a"], run_a), ("B", result["b"], run_b)):
        console.print(f"{label} {run}: mean AUROC {num(side['auroc'])}  mean accuracy {num(side['accuracy'])}  "
                      f"exact match {num(side['exact_match'])}", highlight=False)
    boot = result["auroc"]["bootstrap"]
    if boot is not None:
        console.print(f"mean AUROC A - B {num(boot['difference'], True)}  paired bootstrap 95% CI "
                      f"[{num(boot['ci95'][0], True)}, {num(boot['ci95'][1], True)}] ({boot['replicates']} "
                      f"replicates)", highlight=False)
    console.print(f"AUROC: {result['auroc']['note']}", highlight=False)
    mcnemar = result["exact_match"]["mcnemar"]
    console.print(f"exact match A - B {num(mcnemar['accuracy_difference'], True)}  exact McNemar p = "
                  f"{mcnemar['p_value']:.4g} (A right / B wrong: {mcnemar['a_only']}, B right / A wrong: "
                  f"{mcnemar['b_only']})", highlight=False)
