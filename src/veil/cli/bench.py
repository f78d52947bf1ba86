"""`veil bench NAME`: run `bench/NAME.py` from the source checkout.

Benchmarks live outside the package (they need the bench extra and the repository's workloads);
each module exposes `main(argv: list[str]) -> int`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import click

import veil

SUITES = ("keyservice", "runtime", "packer", "he", "attest", "ray", "report", "chaos")


def bench_dir() -> Path:
    """The checkout's bench/ folder (the package is installed editable from src/veil)."""
    return Path(veil.__file__).resolve().parents[2] / "bench"


BENCH_HELP = """Run benchmark SUITE and write its figures (`--json PATH`).

Each suite has its own options: `veil bench SUITE --help` shows them."""


@click.command(
    "bench",
    help=BENCH_HELP,
    add_help_option=False,  # `--help` after a suite is the suite's own
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.argument("suite", required=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def bench(ctx: click.Context, suite: str | None, args: tuple[str, ...]) -> None:
    if suite in (None, "-h", "--help"):
        click.echo(ctx.get_help())
        click.echo(f"\nSuites: {', '.join(SUITES)}")
        return
    if suite not in SUITES:
        raise click.BadParameter(f"{suite!r}: not a suite; choose from {', '.join(SUITES)}", param_hint="SUITE")
    path = bench_dir() / f"{suite}.py"
    if not path.exists():
        raise click.ClickException(f"{path} not found: benchmarks run from a source checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location(f"veil_bench_{suite}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    raise SystemExit(module.main(list(args)))
