"""The `medtricks` command line: thin typer wrappers over the Python API.

Bad input (MedtricksError) becomes a one-paragraph message on stderr and exit code 2, without a traceback unless
`--debug` is given. Library code logs; only this module prints.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from medtricks.errors import MedtricksError

app = typer.Typer(help="Fine-tune pretrained CNNs on medical images with a bag of tricks; attack them.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Inspect data sources and make the synthetic demo set.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(soft_wrap=True)  # long paths stay whole, for grep and copy-paste
err_console = Console(stderr=True, soft_wrap=True)
_state = {"debug": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
          quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False) -> None:
    """medtricks: transfer learning with a bag of tricks for medical images, and its adversarial robustness."""
    _state["debug"] = debug
    log = logging.getLogger("medtricks")  # only our loggers: the root logger stays the caller's (notebooks, pytest)
    for handler in [h for h in log.handlers if isinstance(h, RichHandler)]:
        log.removeHandler(handler)
    log.addHandler(RichHandler(console=err_console, show_time=False, show_path=False))
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def _fail(exc: MedtricksError) -> None:
    if _state["debug"]:
        raise exc
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _progress(what: str):
    """A transient rich progress bar and the `progress(done, total)` callback that drives it."""
    bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err_console,
                   transient=True)
    task = bar.add_task(what, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


@data_app.command("synth")
def data_synth(
    out_dir: Annotated[Path, typer.Argument(help="New folder to write the phantoms and labels.csv into.")],
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    size: Annotated[int, typer.Option("--size", help="Image side in pixels.")] = 256,
) -> None:
    """Write SYNTHETIC chest-radiograph-like phantoms as DICOM files plus a labels.csv (offline demo and tests).

    Example: medtricks data synth demo_data --n 200 --seed 0
    """
    from medtricks.data.synth import synthesize

    try:
        labels = synthesize(out_dir, n=n, seed=seed, size=size)
    except MedtricksError as exc:
        _fail(exc)
    console.print(f"wrote {n} synthetic phantom DICOMs and {labels}")


def _print_check(report: dict) -> None:
    patients = "no ids" if report["patients"] is None else str(report["patients"])
    if report.get("patients_in_several_classes"):
        patients += f" ({report['patients_in_several_classes']} with images in several classes)"
    console.print(f"[bold]{report['source']}[/] ({report['kind']}): {report['n_images']} images, "
                  f"{len(report['classes'])} classes, patients: {patients}", highlight=False)
    if report.get("splits"):
        table = Table(title=f"split: {report['split_origin']}", title_justify="left")
        table.add_column("split")
        for name in report["classes"]:
            table.add_column(name, justify="right")
        table.add_column("images", justify="right")
        table.add_column("patients", justify="right")
        for split, entry in report["splits"].items():
            table.add_row(split, *[str(entry["per_class"][c]) for c in report["classes"]], str(entry["n"]),
                          str(entry.get("patients", "-")))
        console.print(table)
    if report["size"]:
        s = report["size"]
        console.print(f"size: height {s['min_height']}-{s['max_height']}, width {s['min_width']}-{s['max_width']}; "
                      f"formats {report['formats']}; bit depths {report['bit_depths']}; "
                      f"photometric {report['photometric']}", highlight=False)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    leaks = report.get("patients_in_several_splits") or {}
    console.print(f"patients in more than one split: {len(leaks)}"
                  + (": " + ", ".join(f"{p} ({'+'.join(s)})" for p, s in leaks.items()) if leaks else ""))
    console.print(f"unreadable files: {len(report['unreadable'])}")
    for item in report["unreadable"]:
        console.print(f"  - {item['reason']}", highlight=False)


@data_app.command("check")
def data_check(
    source: Annotated[Path, typer.Argument(help="Folder (class sub-folders or labels.csv), CSV manifest or .npz.")],
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON here.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the proposed split.")] = 0,
    classes: Annotated[str | None, typer.Option("--classes", help="Expected classes, comma separated.")] = None,
) -> None:
    """Count images per class and split and patients, list unreadable files and patients in two splits.

    Exit code 2 when a file is unreadable or a patient is in two splits.
    Example: medtricks data check ../shared/data/cxr-nih --json check.json
    """
    from medtricks.data.check import check_data

    try:
        bar, progress = _progress("decoding")
        with bar:
            report = check_data(source, classes.split(",") if classes else None, seed=seed, progress=progress)
    except MedtricksError as exc:
        _fail(exc)
    _print_check(report)
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    problems = len(report["unreadable"]) + len(report.get("patients_in_several_splits") or {})
    if problems:
        err_console.print(f"[bold red]error:[/] {source}: {len(report['unreadable'])} unreadable file(s) and "
                          f"{len(report.get('patients_in_several_splits') or {})} patient(s) in two splits "
                          f"(listed above). Fix or remove them before training.", highlight=False)
        raise typer.Exit(2)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except MedtricksError as exc:  # raised outside a command's own handler
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
