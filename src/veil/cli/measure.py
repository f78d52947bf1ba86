"""`veil measure`: print the simulated-TEE measurement of a trusted component."""

from __future__ import annotations

import click

from veil.attest.measurement import COMPONENTS, closure


@click.command("measure")
@click.option(
    "--component",
    type=click.Choice(sorted(COMPONENTS)),
    default="runtime",
    show_default=True,
    help="Which trusted component to measure.",
)
@click.option(
    "--list",
    "show",
    is_flag=True,
    help="After the measurement, list what it covers: Veil files, distributions, start-up lines.",
)
def measure(component: str, show: bool) -> None:
    """Print the measurement (hex SHA-256 over the component's import closure: its Veil modules
    and the versions of the distributions they import).

    Model owners and users put this value in their allow-lists; a runtime whose code differs by a
    single byte measures differently and is refused keys. `--list` shows what they approve.
    """
    measured = closure(component)
    click.echo(measured.digest())
    if show:
        for rel in measured.files:
            click.echo(f"file veil/{rel}")
        for dist, version in measured.distributions.items():
            click.echo(f"dist {dist}=={version}")
        for line in measured.startup:
            click.echo(f"pth  {line}")
        for module, digest in measured.unowned.items():
            click.echo(f"unowned {module} {digest}")
