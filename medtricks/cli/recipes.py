"""`medtricks recipes list|show`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from medtricks.cli.common import (
    console,
    fail,
    recipes_app,
)
from medtricks.errors import MedtricksError


@recipes_app.command("list")
def recipes_list() -> None:
    """List the bundled recipes with their first comment line.

    Example: medtricks recipes list
    """
    from medtricks.recipe import bundled_recipes, recipe_text

    for name in bundled_recipes():
        text, _ = recipe_text(name)
        first = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), "")
        console.print(Text(name, style="bold"), f" {first}", highlight=False)


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(help="Recipe name or YAML path.")]) -> None:
    """Print a recipe's YAML (with its comments).

    Example: medtricks recipes show covid_cxr
    """
    from medtricks.recipe import load_recipe, recipe_text

    try:
        text, _ = recipe_text(name)
        load_recipe(name)  # validate it too
    except MedtricksError as exc:
        fail(exc)
    console.print(text, highlight=False, markup=False)
