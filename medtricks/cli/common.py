"""What every command module of the CLI shares: the typer apps, the consoles, the shared options, and how a
MedtricksError becomes a one-paragraph message and exit code 2 (`fail`)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from medtricks.errors import MedtricksError

app = typer.Typer(help="Fine-tune pretrained CNNs on medical images with a bag of tricks; attack them.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Inspect data sources, fetch or prepare public data sets, make the synthetic demo set.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
recipes_app = typer.Typer(help="Bundled recipes: list and show.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
weights_app = typer.Typer(help="Pretrained weight files: list, verify, locate.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")
# markup off: paths and messages are printed literally (a folder named "cache[v2]" must not lose "[v2]")
console = Console(soft_wrap=True, markup=False)  # soft wrap: long paths stay whole, for grep and copy-paste
err_console = Console(stderr=True, soft_wrap=True, markup=False)
_state = {"debug": False}
DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N."
RunDeviceOption = Annotated[str | None, typer.Option("--device", help=DEVICE_HELP + " [default: the recipe's]")]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Allow replacing an existing output file (never a "
                                                                  "run's own files).")]


def file_option(value: str) -> Path:
    """The value of an option that names one file: a trailing slash names a folder, and Path would drop it silently."""
    if value.endswith(("/", "\\")):
        raise typer.BadParameter(f"{value} ends in a slash, so it names a folder, but this option writes one file; "
                                 f"give a file name (e.g. {value}report.json).")
    return Path(value)


def file_out(name: str, help_text: str) -> typer.models.OptionInfo:
    """An option that names one output file (--json, predict's --out)."""
    return typer.Option(name, parser=file_option, help=help_text)


TTAOption = Annotated[bool, typer.Option("--tta", help="Average over the flips the run's augment preset allows (none "
                                                       "for radiographs); binary threshold re-chosen on validation.")]


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
    warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library's warning as one log line naming the library, not a path into site-packages and a source line."""
    parts = Path(filename).parts
    packages = [i for i, part in enumerate(parts) if part in ("site-packages", "dist-packages")]
    origin = parts[packages[-1] + 1] if packages and packages[-1] + 1 < len(parts) else Path(filename).stem
    logging.getLogger("medtricks").warning("%s (%s from %s)", message, category.__name__, origin.removesuffix(".py"))


def fail(exc: MedtricksError) -> None:
    if _state["debug"]:
        raise exc
    err_console.print(Text("error:", style="bold red"), str(exc), highlight=False)
    raise typer.Exit(2)


def progress_bar(what: str):
    """A transient rich progress bar and the `progress(done, total)` callback that drives it."""
    bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err_console,
                   transient=True)
    task = bar.add_task(what, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


def num(value: float | None, signed: bool = False) -> str:
    """A metric for the terminal: 4 decimals, "n/a" where it does not exist (a split without one of the classes)."""
    return "n/a" if value is None else f"{value:+.4f}" if signed else f"{value:.4f}"


def epoch_line(row: dict) -> str:
    parts = [f"epoch {row['epoch']}", f"loss {row['train_loss']:.4f}", f"lr {row['lr']:.2e}"]
    if "val_auroc" in row:
        parts += [f"val AUROC {num(row['val_auroc'])}", f"val acc {num(row['val_accuracy'])}"]
    speed = f"{row['images_per_second']:.1f} img/s"
    if row.get("data_wait_seconds") is not None and row["seconds"] > 0:  # > 10%: the input pipeline limits training
        speed += f" ({row['data_wait_seconds'] / row['seconds']:.0%} waiting for data)"
    parts.append(speed + ("  *best" if row.get("best") else ""))
    return "  ".join(parts)


