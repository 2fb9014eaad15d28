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
