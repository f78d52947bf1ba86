"""`veil` command line. Each command group lives in its own module and is imported on first use,
so `veil --help` is fast and one group's heavy imports (TenSEAL, ONNX) never slow another."""

from __future__ import annotations

import importlib
import sys

import click

# command name -> (module, attribute, one-line help)
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("veil.cli.demo", "demo", "Run the whole story on the embedded platform: seal, attest, infer."),
    "up": ("veil.cli.up", "up", "Start KeyService, model store, gateway and local platform."),
    "example": ("veil.cli.example", "example", "Write an example ONNX model and test rows to try Veil with."),
    "status": ("veil.cli.status", "status", "Show what a deployment runs: services, functions, instances, GB-s."),
    "owner": ("veil.cli.owner", "owner", "Model owner: seal and upload models, set policy, grant, revoke."),
    "user": ("veil.cli.user", "user", "Model user: register, request keys, run encrypted inference."),
    "console": ("veil.cli.console", "console", "A local web page for your models, grants, audit log and usage."),
    "keyservice": ("veil.cli.keyservice", "keyservice", "Run and inspect the KeyService."),
    "trust": ("veil.cli.trust", "trust", "Your own trust anchors: KeyService and runtime measurements, simulation."),
    "measure": ("veil.cli.measure", "measure", "Print the measurement of Veil's trusted components."),
    "attest": ("veil.cli.attest", "attest", "Verify attestation evidence (sim, SGX, TDX, SEV-SNP)."),
    "he": ("veil.cli.he", "he", "HE mode: compile models, make keys, encrypted CKKS inference."),
    "runtime": ("veil.cli.runtime", "runtime", "Run a Veil runtime instance (OpenWhisk action server)."),
    "bench": ("veil.cli.bench", "bench", "Run benchmarks from bench/ and write JSON reports."),
    "store": ("veil.cli.store", "store", "Serve the sealed-model store every node reads (HTTP; local dir or S3)."),
    "cluster": ("veil.cli.cluster", "cluster", "Prepare a node for a multi-node deployment (simulation root)."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when invoked."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = _COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module, attr, _ = entry
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            message = f"`veil {cmd_name}` is unavailable: {exc}. Is the right extra installed?"

            @click.command(cmd_name, help=entry[2])
            def unavailable() -> None:
                raise click.ClickException(message)

            return unavailable

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_text) for name, (_, _, help_text) in sorted(_COMMANDS.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="veil")
def cli() -> None:
    """Veil: private ML inference on untrusted clouds (TEE mode and HE mode)."""


def main() -> None:
    """Console entry point: clear one-line errors, never a traceback for expected failures."""
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)
