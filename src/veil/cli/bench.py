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

SUITES = ("keyservice", "runtime", "packer", "he", "attest")


def bench_dir() -> Path:
    """The checkout's bench/ folder (the package is installed editable from src/veil)."""
    return Path(veil.__file__).resolve().parents[2] / "bench"


@click.command("bench", context_settings={"ignore_unknown_options": True, "help_option_names": ["-h", "--help"]})
@click.argument("suite", type=click.Choice(SUITES))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(suite: str, args: tuple[str, ...]) -> None:
    """Run benchmark SUITE; pass e.g. `--json PATH` after it (`veil bench SUITE --help` for its options)."""
    path = bench_dir() / f"{suite}.py"
    if not path.exists():
        raise click.ClickException(f"{path} not found: benchmarks run from a source checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location(f"veil_bench_{suite}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    raise SystemExit(module.main(list(args)))
