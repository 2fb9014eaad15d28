"""The `medtricks` command line: thin typer wrappers over the Python API.

Bad input (MedtricksError) becomes a one-paragraph message on stderr and exit code 2, without a traceback unless
`--debug` is given. Library code logs; only this package prints.
"""

from __future__ import annotations

import sys

from rich.text import Text

# importing a command module registers its commands on the apps of common.py
from medtricks.cli import data, recipes, run_commands, weights  # noqa: F401
from medtricks.cli.common import app, err_console
from medtricks.errors import MedtricksError

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except MedtricksError as exc:  # raised outside a command's own handler
        err_console.print(Text("error:", style="bold red"), str(exc), highlight=False)
        sys.exit(2)
