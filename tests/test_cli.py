"""The command line: the set of commands, a documented --help for each, click's usage errors, `python -m pipeline`."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner
from conftest import run_cli

from pipeline.cli import main

CORE = {"teacher", "data", "cache-logits", "distill", "baseline", "compare", "generate"}
OPTIONAL = {"bench", "docs", "finetune-teacher", "export", "sweep", "train-tokenizer"}


def test_the_commands_are_the_stages():
    assert CORE <= set(main.commands) <= CORE | OPTIONAL


@pytest.mark.parametrize("command", sorted(main.commands))
def test_help_documents_every_option(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: main {command} [OPTIONS]")
    docstring = main.commands[command].help
    assert docstring and docstring.split("\n")[0].split()[0] in result.output
    options = [p for p in main.commands[command].params if isinstance(p, click.Option)]
    assert options, f"{command} has no options"
    for option in options:
        assert option.help and option.help.strip(), f"{command} {option.opts[0]} has no help text"
        for flag in option.opts + option.secondary_opts:
            assert flag in result.output, f"{command} --help does not mention {flag}"
    assert CliRunner().invoke(main, [command, "-h"]).output == result.output


@pytest.mark.parametrize(
    "args", [["distill", "--no-such-option", "1"], ["compare", "--eval-rows", "many"], ["no-such-command"]]
)
def test_usage_errors_exit_2(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "Usage:" in result.stderr and "Error:" in result.stderr


def test_python_m_pipeline():
    result = run_cli("--help", check=True)
    listed = {line.split()[0] for line in result.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == set(main.commands)
    assert "Usage: python -m pipeline" in result.stdout
    unknown = run_cli("distill", "--no-such-option")
    assert unknown.returncode == 2 and "No such option" in unknown.stderr and "--no-such-option" in unknown.stderr
