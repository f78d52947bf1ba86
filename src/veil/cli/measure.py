"""`veil measure`: print the simulated-TEE measurement of a trusted component."""

from __future__ import annotations

import click

from veil.attest.measurement import COMPONENTS
from veil.attest.measurement import measure as compute


@click.command("measure")
@click.option(
    "--component",
    type=click.Choice(sorted(COMPONENTS)),
    default="runtime",
    show_default=True,
    help="Which trusted component to measure.",
)
def measure(component: str) -> None:
    """Print the measurement (hex SHA-256 over code and pinned dependency versions).

    Model owners and users put this value in their allow-lists; a runtime whose code differs by a
    single byte measures differently and is refused keys.
    """
    click.echo(compute(component))
