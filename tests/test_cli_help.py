"""Every command's --help shows an example (DESIGN: CLI contract)."""

import pytest
from typer.testing import CliRunner

from medtricks.cli import app

COMMANDS = [["finetune"], ["evaluate"], ["predict"], ["attack"], ["data", "check"], ["data", "synth"],
            ["recipes", "list"], ["recipes", "show"], ["weights", "list"], ["weights", "verify"], ["weights", "path"],
            ["weights", "fetch"], ["ablate"], ["compare"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_has_an_example(command):
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "Example: medtricks " + command[0] in result.output


def test_recipes_list_and_show():
    runner = CliRunner()
    listed = runner.invoke(app, ["recipes", "list"])
    assert listed.exit_code == 0 and "pneumoniamnist" in listed.output and "covid_cxr" in listed.output
    shown = runner.invoke(app, ["recipes", "show", "covid_cxr"])
    assert shown.exit_code == 0 and "SOURCE-SHORTCUT RISK" in shown.output
    bad = runner.invoke(app, ["recipes", "show", "nope"])
    assert bad.exit_code == 2 and "unknown recipe" in bad.output


def test_a_library_warning_is_one_line_naming_the_library_not_its_source_path(caplog):
    """monai, torch or pydicom warn with a path into site-packages and a line of their source; the CLI says which
    library warned instead."""
    import warnings

    with warnings.catch_warnings():  # restores warnings.showwarning, which the CLI sets
        warnings.simplefilter("always")
        assert CliRunner().invoke(app, ["recipes", "list"]).exit_code == 0
        warnings.warn_explicit("spacing is ignored", UserWarning,
                               "/opt/venv/lib/python3.11/site-packages/monai/transforms/utils.py", 123)
        warnings.warn_explicit("bare script", RuntimeWarning, "/home/u/tool.py", 1)
    assert [r.getMessage() for r in caplog.records if r.name == "medtricks"] == [
        "spacing is ignored (UserWarning from monai)", "bare script (RuntimeWarning from tool)"]
