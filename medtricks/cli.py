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
weights_app = typer.Typer(help="Pretrained weight files: list, verify, locate.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")
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


@weights_app.command("list")
def weights_list() -> None:
    """List the known pretrained weights, their files, sha256 and whether they are available offline.

    Example: medtricks weights list
    """
    from medtricks.models.weights import REGISTRY, WeightsError, cache_dir, weights_path

    for spec in REGISTRY.values():
        try:
            available = "available" if weights_path(spec, download=False).is_file() else "not cached (downloaded " \
                "on first use; offline: see `medtricks weights path`)"
        except WeightsError:
            available = "package missing"
        console.print(f"[bold]{spec.arch}:{spec.name}[/]  {available}\n    {spec.description}\n    file "
                      f"{spec.filename}  sha256 {spec.sha256}", highlight=False)
    console.print(f"cache folder: {cache_dir()} (set MEDTRICKS_CACHE to move it; MEDTRICKS_OFFLINE=1 never downloads)")


@weights_app.command("verify")
def weights_verify(file: Annotated[Path, typer.Argument(help="A .pth, .pth.tar or .safetensors file.")]) -> None:
    """Check a weights file: sha256 against the registry, safe loading, and that its keys fit the architecture.

    Example: medtricks weights verify ~/Downloads/resnet50-0676ba61.pth
    """
    from medtricks.models.backbones import ARCHS, pretrained_state
    from medtricks.models.weights import find_by_file, sha256_of

    try:
        spec = find_by_file(file)
        digest = sha256_of(file) if file.is_file() else ""
        archs = [spec.arch] if spec is not None else list(ARCHS)
        fits = []
        for arch in archs:
            state, *_ = pretrained_state(arch, str(file))  # verifies the hash, loads safely, remaps
            backbone = ARCHS[arch].build(state[f"{ARCHS[arch].head}.weight"].shape[0]
                                         if f"{ARCHS[arch].head}.weight" in state else 1000)
            if set(backbone.state_dict()) == set(state):
                fits.append(arch)
    except MedtricksError as exc:
        _fail(exc)
    known = f"{spec.arch} '{spec.name}' ({spec.description})" if spec else "not in the registry"
    console.print(f"{file}: sha256 {digest}; {known}; loads safely; keys fit: {', '.join(fits) or 'no known arch'}",
                  highlight=False)
    if not fits:
        raise typer.Exit(2)


def _weight_spec(name: str):
    """ARCH:WEIGHTS, or a bare WEIGHTS name that only one architecture has (sin_in)."""
    from medtricks.models.weights import REGISTRY, WeightsError

    arch, _, weights = name.rpartition(":")
    matches = [spec for (a, w), spec in REGISTRY.items() if w == weights and (a == arch or not arch)]
    if len(matches) != 1:
        known = ", ".join(f"{a}:{w}" for a, w in REGISTRY)
        raise WeightsError(f"{name!r} names {'several' if matches else 'no'} known weights; give ARCH:WEIGHTS, one "
                           f"of {known}.")
    return matches[0]


@weights_app.command("path")
def weights_path_cmd(name: Annotated[str, typer.Argument(help="ARCH:WEIGHTS, e.g. resnet50:sin_in.")]) -> None:
    """Print where the file for ARCH:WEIGHTS is expected, so it can be copied there on an offline machine.

    Example: medtricks weights path resnet50:imagenet
    """
    from medtricks.models.weights import weights_path

    try:
        spec = _weight_spec(name)
        console.print(f"{weights_path(spec, download=False)}\n  from {spec.url}\n  sha256 {spec.sha256}",
                      highlight=False)
    except MedtricksError as exc:
        _fail(exc)


@weights_app.command("fetch")
def weights_fetch(name: Annotated[str, typer.Argument(help="ARCH:WEIGHTS, e.g. resnet50:imagenet.")]) -> None:
    """Download (if needed) and verify the file for ARCH:WEIGHTS into the cache, e.g. before going offline.

    Example: medtricks weights fetch resnet50:sin_in
    """
    from medtricks.models.weights import verify, weights_path

    try:
        spec = _weight_spec(name)
        path = weights_path(spec)
        digest = verify(path, spec)
    except MedtricksError as exc:
        _fail(exc)
    console.print(f"{path}  sha256 {digest}", highlight=False)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except MedtricksError as exc:  # raised outside a command's own handler
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
