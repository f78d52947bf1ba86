"""Every `veil` command and subcommand answers `--help` with exit 0 and names each of its
options; every benchmark suite shows its own options."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from veil.cli import cli
from veil.cli.bench import SUITES


def _commands(group: click.Group, ctx: click.Context, prefix: list[str]) -> list[tuple[list[str], click.Command]]:
    found = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, name
        found.append(([*prefix, name], command))
        if isinstance(command, click.Group):
            found.extend(_commands(command, click.Context(command, parent=ctx), [*prefix, name]))
    return found


COMMANDS = _commands(cli, click.Context(cli), [])


def test_every_group_is_listed() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    for expected in ("owner publish", "user infer", "trust init", "keyservice audit", "keyservice migrate", "bench"):
        assert expected in names, names


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_names_every_option(path: list[str], command: click.Command) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert any(opt in result.output for opt in param.opts), (path, param.opts)


@pytest.mark.parametrize("suite", SUITES)
def test_each_bench_suite_has_its_own_help(suite: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "veil.cli", "bench", suite, "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert f"veil bench {suite}" in result.stdout and "--json" in result.stdout
