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


@pytest.mark.parametrize("name", bundled_recipes())
def test_recipe_builds_offline(name):
    """Recipes that need downloaded weights say so in a comment and work offline with arch efficientnet_lite0."""
    from medtricks.models.build import build_model
    from medtricks.models.weights import REGISTRY

    recipe = load_recipe(name)
    spec = REGISTRY.get((recipe.model.arch, recipe.model.weights))
    if spec is not None and spec.package is None:
        text = (ROOT / "recipes" / f"{name}.yaml").read_text()
        assert "model.arch=efficientnet_lite0" in text, "say how to run it offline"
        recipe = load_recipe(name, ["model.arch=efficientnet_lite0", "model.weights=imagenet"])
    model = build_model(recipe.model, num_classes=len(recipe.data.classes or (0, 1)), in_chans=recipe.data.channels)
    assert model.arch == recipe.model.arch


@pytest.mark.parametrize("name", bundled_recipes())
def test_shipped_recipes_name_no_path_users_do_not_have(name):
    """Users have no ../shared: a shipped recipe's data comes from --data (or, for demo, its own synthetic folder)."""
    text = (ROOT / "recipes" / f"{name}.yaml").read_text()
    assert "shared" not in text, name
    source = load_recipe(name).data.source
    assert source is None or not Path(source).is_absolute() and ".." not in Path(source).parts, source
