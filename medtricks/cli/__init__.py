"""The `medtricks` command line: thin typer wrappers over the Python API.

Bad input (MedtricksError) becomes a one-paragraph message on stderr and exit code 2, without a traceback unless
`--debug` is given. Library code logs; only this package prints.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

from rich.text import Text

# importing a command module registers its commands on the apps of common.py
from medtricks.cli import data, recipes, run_commands, weights  # noqa: F401
from medtricks.cli.common import _state, app, err_console
from medtricks.errors import MedtricksError, short

__all__ = ["app", "main"]


_stopped: list[int] = []  # the stop signal received, if any


def _stop(signum: int, frame) -> None:
    """SIGTERM (kill, timeout, docker stop, a batch scheduler) as an exception, as Ctrl-C is: the cleanup of
    temporary files and folders runs, where the default action would end the process on the spot."""
    _stopped.append(signum)
    raise SystemExit(128 + signum)


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGTERM, _stop)
    try:
        os.getcwd()
    except OSError as exc:  # torch's import would fail with "oneMKL: cannot load libtorch_cpu.so", blaming the install
        err_console.print(Text("error:", style="bold red"), f"the current folder cannot be read ({exc.strerror}): it "
                          f"was deleted or moved; cd to an existing folder and run the command again.", highlight=False)
        sys.exit(2)
    try:
        _run_app()
    except MedtricksError as exc:  # raised outside a command's own handler
        err_console.print(Text("error:", style="bold red"), str(exc), highlight=False)
        sys.exit(2)
    except OSError as exc:  # a path given on the command line that no file system call accepts, wherever it is used
        if exc.errno not in (errno.ENAMETOOLONG, errno.ELOOP) or _state["debug"]:
            raise
        err_console.print(Text("error:", style="bold red"), f"{short(str(exc.filename))}: cannot use that path "
                          f"({exc.strerror}); give a path whose every part is at most 255 bytes and that is no loop "
                          f"of links.", highlight=False)
        sys.exit(2)


def _run_app() -> None:
    try:
        app()
    except Exception:
        if not _stopped or _state["debug"]:
            raise
        # an error while the stop unwound (a library's own signal check, e.g. torch's "DataLoader worker is killed"
        # when the signal went to the whole process group): a consequence of the stop, not a failure to show
        err_console.print(f"stopped by {signal.Signals(_stopped[0]).name}", highlight=False)
        sys.exit(128 + _stopped[0])
