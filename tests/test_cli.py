"""The `pipeline` command line as a user reads it: every option says what it is for, switches show
no value placeholder, `train --help` lists the families, `prepare --help` the data sources, and
`--version` prints the installed package's version."""

from __future__ import annotations

from importlib.metadata import version

import pytest
import typer
from typer.testing import CliRunner

from pipeline.cli import PACKAGE, app

runner = CliRunner()
COMMANDS = [[], ["prepare"], ["train"], ["generate"], ["evaluate"], ["downstream"], ["ui"],
            ["cluster"], ["cluster", "up"], ["cluster", "down"]]


def help_text(args: list[str]) -> str:
    res = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert res.exit_code == 0, res.output
    return res.output


def all_options():
    """(command path, option) for every visible option of every command."""
    root = typer.main.get_command(app)

    def walk(cmd, path):
        for param in cmd.params:
            if param.param_type_name == "option" and not param.hidden:
                yield " ".join(path) or "pipeline", param
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    return list(walk(root, []))


def test_every_option_says_what_it_is_for():
    options = all_options()
    assert len(options) > 25
    missing = [f"{where} {p.opts[0]}" for where, p in options if not (p.help or "").strip()]
    assert not missing, f"options without help: {missing}"


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "pipeline")
def test_switches_show_no_value_placeholder(args):
    text = help_text(args)
    assert "<bool>" not in text
    assert "--help" in text


def test_switches_are_flags():
    flags = {p.opts[0] for _, p in all_options() if getattr(p, "is_flag", False)}
    assert {"--verbose", "--version", "--use-gpu", "--resume"} <= flags


def test_train_help_lists_the_families():
    from pipeline.models import REGISTRY

    text = help_text(["train"])
    for family in REGISTRY:
        assert family in text
    assert "--no-gpu" in text


def test_prepare_help_lists_the_sources():
    from pipeline.cli import sources

    text = help_text(["prepare"])
    assert sources() == ["synthetic", "folder", "mvtec", "cyclegan", "paired", "elpv", "segmentation"]
    for source in sources():
        assert source in text


def test_version_prints_the_package_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"pipeline {version(PACKAGE)}"


def test_ui_help_offers_verbose_access_logs():
    assert "access log" in help_text(["ui"])
