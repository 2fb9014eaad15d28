"""Every bundled recipe loads strictly; the README documents every trick."""

from pathlib import Path

import pytest

from medtricks.recipe import Recipe, bundled_recipes, load_recipe
from medtricks.tricks import TRICKS

ROOT = Path(__file__).resolve().parents[1]


def test_bundled_recipes_are_the_files_in_recipes():
    assert set(bundled_recipes()) == {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
    assert {"demo", "covid_cxr", "pneumonia_cxr", "pneumoniamnist", "fundus_dr", "dermoscopy", "baseline",
            "bag_of_tricks"} <= set(bundled_recipes())


@pytest.mark.parametrize("name", bundled_recipes())
def test_recipe_loads_and_is_commented(name):
    recipe = load_recipe(name)
    assert isinstance(recipe, Recipe) and recipe.name == name
    text = (ROOT / "recipes" / f"{name}.yaml").read_text()
    assert text.startswith("#"), "a recipe starts with a comment saying what it is for"


def test_readme_lists_every_trick():
    readme = (ROOT / "README.md").read_text()
    for name in TRICKS:
        assert f"`{name}`" in readme, name
