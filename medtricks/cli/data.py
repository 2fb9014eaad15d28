"""`medtricks data synth|check|list|fetch|prepare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from medtricks.cli.common import (
    OverwriteOption,
    console,
    data_app,
    err_console,
    fail,
    file_out,
    progress_bar,
)
from medtricks.errors import MedtricksError


@data_app.command("synth")
def data_synth(
    out_dir: Annotated[Path, typer.Argument(help="New folder to write the phantoms and labels.csv into.")],
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 200,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1, help="Random seed.")] = 0,
    size: Annotated[int, typer.Option("--size", help="Image side in pixels.")] = 256,
) -> None:
    """Write SYNTHETIC chest-radiograph-like phantoms as DICOM files plus a labels.csv (offline demo and tests).

    Example: medtricks data synth demo_data --n 200 --seed 0
    """
    from medtricks.data.synth import synthesize

    try:
        labels = synthesize(out_dir, n=n, seed=seed, size=size)
    except MedtricksError as exc:
        fail(exc)
    console.print(f"wrote {n} synthetic phantom DICOMs and {labels}")


def _print_check(report: dict) -> None:
    patients = "no ids" if report["patients"] is None else str(report["patients"])
    if report.get("patients_in_several_classes"):
        patients += f" ({report['patients_in_several_classes']} with images in several classes)"
    multilabel = report.get("task") == "multilabel"
    console.print(f"{report['source']} ({report['kind']}): {report['n_images']} images, "
                  f"{len(report['classes'])} {'findings (multi-label)' if multilabel else 'classes'}, patients: "
                  f"{patients}", highlight=False)
    if report.get("splits"):
        title = f"split: {report['split_origin']}" + (" (images with each finding)" if multilabel else "")
        table = Table(title=title, title_justify="left")
        table.add_column("split")
        for name in report["classes"]:
            table.add_column(name, justify="right")
        if multilabel:
            table.add_column("no finding", justify="right")
        table.add_column("images", justify="right")
        table.add_column("patients", justify="right")
        for split, entry in report["splits"].items():
            table.add_row(split, *[str(entry["per_class"][c]) for c in report["classes"]],
                          *([str(entry["no_finding"])] if multilabel else []), str(entry["n"]),
                          str(entry.get("patients", "-")))
        console.print(table)
    if multilabel:
        _print_multilabel_check(report)
    if report["size"]:
        s = report["size"]
        console.print(f"size: height {s['min_height']}-{s['max_height']}, width {s['min_width']}-{s['max_width']}; "
                      f"formats {report['formats']}; bit depths {report['bit_depths']}; "
                      f"photometric {report['photometric']}", highlight=False)
    for warning in report["warnings"]:
        console.print(Text("warning:", style="yellow"), warning, highlight=False)
    leaks = report.get("patients_in_several_splits") or {}
    console.print(f"patients in more than one split: {len(leaks)}"
                  + (": " + ", ".join(f"{p} ({'+'.join(s)})" for p, s in leaks.items()) if leaks else ""))
    console.print(f"unreadable files: {len(report['unreadable'])}")
    for item in report["unreadable"]:
        console.print(f"  - {item['reason']}", highlight=False)
    if report.get("not_images"):
        console.print(f"files not read (no image by extension or content): {len(report['not_images'])}")
        for key in report["not_images"][:20]:
            console.print(f"  - {key}", highlight=False)
        if len(report["not_images"]) > 20:
            console.print(f"  ... and {len(report['not_images']) - 20} more (all in --json)", highlight=False)


def _print_multilabel_check(report: dict) -> None:
    """data check's multi-label counts: no finding, findings per image, and the co-occurrence matrix (columns
    numbered as the rows, to stay narrow with many findings)."""
    per_image = ", ".join(f"{k}: {v}" for k, v in report["labels_per_image"].items())
    console.print(f"no finding: {report['no_finding']} images; findings per image: {per_image}", highlight=False)
    classes = report["classes"]
    table = Table(title="co-occurrence: images with both findings (diagonal: with the finding)", title_justify="left")
    table.add_column("finding")
    for k in range(len(classes)):
        table.add_column(str(k + 1), justify="right")
    for k, name in enumerate(classes):
        table.add_row(f"{k + 1} {name}", *[str(report["cooccurrence"][name][other]) for other in classes])
    console.print(table)


def _class_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    from medtricks.data.sources import check_class_names

    names = [name.strip() for name in text.split(",")]
    check_class_names(names, f"--classes {text!r}")
    return names


@data_app.command("check")
def data_check(
    source: Annotated[Path, typer.Argument(help="Folder (class sub-folders or labels.csv), CSV manifest or .npz.")],
    json_path: Annotated[Path | None, file_out("--json", "Also write the report as JSON here.")] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1, help="Seed of the proposed split.")] = 0,
    classes: Annotated[str | None, typer.Option("--classes", help="Expected classes, comma separated.")] = None,
    multilabel: Annotated[bool, typer.Option("--multilabel", help="Several findings per image (data.task: "
                                             "multilabel): counts per finding, co-occurrence.")] = False,
    label_column: Annotated[str, typer.Option("--label-column", help="The manifest's label column "
                                              "(data.label_column).")] = "label",
    label_separator: Annotated[str, typer.Option("--label-separator", help="Separates an image's findings "
                                                 "(data.label_separator).")] = "|",
    no_finding: Annotated[str, typer.Option("--no-finding", help="The label of an image without findings "
                                            "(data.no_finding).")] = "No Finding",
    overwrite: OverwriteOption = False,
) -> None:
    """Count images per class and split and patients, list unreadable files and patients in two splits.

    With --multilabel: each finding's positives per split, images with no finding, findings per image and the
    co-occurrence matrix.

    Exit code 2 when a file is unreadable or a patient is in two splits.
    Example: medtricks data check ../shared/data/cxr-nih --json check.json
    Example: medtricks data check nih-chestxray14 --multilabel
    """
    from medtricks.data.check import check_data
    from medtricks.data.sources import LabelFormat
    from medtricks.files import check_output, write_json

    try:
        if json_path is not None:
            check_output(json_path, overwrite, "--json")
        if not label_separator or label_separator != label_separator.strip():
            raise MedtricksError(f"--label-separator {label_separator!r}: give one or more characters without "
                                 f"surrounding spaces, e.g. '|' or ';'.")
        labels = LabelFormat(multilabel, label_column, label_separator, no_finding)
        bar, progress = progress_bar("decoding")
        with bar:
            report = check_data(source, _class_list(classes), seed=seed, progress=progress, labels=labels)
        if json_path is not None:
            write_json(json_path, report, replace=overwrite)
    except MedtricksError as exc:
        fail(exc)
    _print_check(report)
    problems = len(report["unreadable"]) + len(report.get("patients_in_several_splits") or {})
    if problems:
        leaks = len(report.get("patients_in_several_splits") or {})
        err_console.print(Text("error:", style="bold red"), f"{source}: {len(report['unreadable'])} unreadable "
                          f"file(s) and {leaks} patient(s) in two splits (listed above). Fix or remove them before "
                          f"training.", highlight=False)
        raise typer.Exit(2)


@data_app.command("list")
def data_list() -> None:
    """List the public data set names a recipe's data.source (or --data) may use, and whether each is cached.

    Example: medtricks data list
    """
    from medtricks.data.catalog import REGISTRY, data_dir

    for spec in REGISTRY.values():
        state = "cached" if spec.is_ready() else f"not cached: {spec.how_to_get()}"
        options = "".join(f"\n    --{o.name} {'|'.join(o.choices)} (default {o.choices[0]}): {o.help}"
                          for o in spec.options)
        console.print(Text(spec.name, style="bold"), f" {state}\n    {spec.title}\n    licence: {spec.licence}"
                      f"{options}", highlight=False)
    console.print(f"cache folder: {data_dir()} (set MEDTRICKS_CACHE to move it)", highlight=False)


@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="Public data set name, e.g. medmnist:pneumoniamnist@28.")],
    force: Annotated[bool, typer.Option("--force", help="Download again even when already cached.")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Install a file that has no registered checksum "
                                            "(a checksum mismatch is always refused).")] = False,
) -> None:
    """Download a public data set into the cache ($MEDTRICKS_CACHE/data), verify its checksum, print its licence.

    An interrupted transfer resumes where it stopped; a file whose checksum does not match is deleted. Offline
    (MEDTRICKS_OFFLINE=1, or no network) the error names the URL and the folder to put the file in by hand.
    covid19-image-data-collection is the repository's archive at a pinned commit (no published checksum:
    --no-verify), extracted safely and prepared into the cache; on any error nothing is left there.
    Example: medtricks data fetch medmnist:pneumoniamnist@28
    """
    from medtricks.data.catalog import find_set
    from medtricks.data.public import fetch

    bar = Progress(TextColumn(name, markup=False), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeElapsedColumn(), console=err_console, transient=True)
    task = bar.add_task(name, total=None)
    try:
        spec = find_set(name)
        with bar:
            folder, lines = fetch(name, force=force, no_verify=no_verify,
                                  progress=lambda done, total: bar.update(task, completed=done, total=total))
    except MedtricksError as exc:
        fail(exc)
    for line in lines:
        console.print(line, highlight=False)
    console.print(f"{name} -> {folder}\nlicence: {spec.licence}\ncite: {spec.citation}", highlight=False)


@data_app.command("prepare")
def data_prepare(
    name: Annotated[str, typer.Argument(help="Public data set name, e.g. nih-chestxray14, kermany-cxr, "
                                        "idrid-grading, isic-2016, chexpert.")],
    raw_dir: Annotated[Path, typer.Argument(help="The unpacked official download (only read).")],
    out: Annotated[Path | None, typer.Option("--out", help="Where labels.csv goes [default: the cache folder of "
                                             "NAME, so the name resolves to it].")] = None,
    overwrite: OverwriteOption = False,
    uncertain: Annotated[str | None, typer.Option("--uncertain", help="chexpert only: an uncertain (-1.0) finding "
                                                  "counts as absent (zeros, U-Zeros) or present (ones, U-Ones) "
                                                  "[default: zeros].")] = None,
    views: Annotated[str | None, typer.Option("--views", help="chexpert only: keep frontal radiographs only "
                                              "(frontal) or lateral ones too (all) [default: frontal].")] = None,
) -> None:
    """Turn the official download of a public data set into a medtricks labels.csv (images stay in RAW_DIR).

    Example: medtricks data prepare nih-chestxray14 ~/Downloads/ChestXray-NIHCC
    """
    from medtricks.data.catalog import find_set
    from medtricks.data.public import prepare_set

    try:
        spec = find_set(name)
        folder, lines = prepare_set(name, raw_dir, out, overwrite, {"uncertain": uncertain, "views": views})
    except MedtricksError as exc:
        fail(exc)
    for line in lines:
        console.print(line, highlight=False)
    console.print(f"{name} -> {folder} (keep {raw_dir} where it is: labels.csv points at its images)\n"
                  f"licence: {spec.licence}\ncite: {spec.citation}", highlight=False)
