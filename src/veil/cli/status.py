"""`veil status`: what a deployment runs, from its public endpoints (nothing secret is shown or
needed): services and whether they answer, functions with their instances, cold starts, requests
and GB-s billed, and the model versions in the store."""

from __future__ import annotations

import json
from pathlib import Path

import click

from veil.cli._client import deployment_option, load_deployment


def _probe(url: str) -> str:
    import httpx

    try:
        return "up" if httpx.get(f"{url}/healthz", timeout=3).status_code == 200 else "unhealthy"
    except httpx.HTTPError as exc:
        return f"down ({type(exc).__name__})"


def _models(store_dir: str | None) -> dict[str, list[int]]:
    """model → stored versions, when the store is a local directory this machine can read."""
    if not store_dir or not Path(store_dir, "models").is_dir():
        return {}
    from veil.store import LocalModelStore

    store = LocalModelStore(Path(store_dir))
    return {p.name: store.versions(p.name) for p in sorted(Path(store_dir, "models").iterdir()) if p.is_dir()}


@click.command("status")
@deployment_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def status(deployment_path: Path, as_json: bool) -> None:
    """Show services, functions, instances, cold starts, GB-s and stored model versions."""
    import httpx

    d = load_deployment(deployment_path)
    report: dict = {
        "services": {"gateway": {"url": d.gateway_url}, "keyservice": {"url": d.keyservice_url}},
        "models": _models(d.extra.get("store_dir")),
    }
    for service in report["services"].values():
        service["state"] = _probe(service["url"])
    try:
        report["platform"] = httpx.get(f"{d.gateway_url}/v1/platform/metrics", timeout=5).json()
    except (httpx.HTTPError, ValueError) as exc:
        report["platform"] = {"error": type(exc).__name__}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for name, service in report["services"].items():
        console.print(f"{name:11} {service['url']:28} {service['state']}")
    functions = report["platform"].get("functions", {})
    table = Table(title="functions")
    for col in ("function", "instances", "ready", "inflight", "requests", "cold starts", "warm hits", "GB-s"):
        table.add_column(col)
    for fname, m in functions.items():
        table.add_row(
            fname,
            str(m.get("instances", 0)),
            str(m.get("ready", "")),
            str(m.get("inflight", "")),
            str(m.get("requests", 0)),
            str(m.get("cold_starts", 0)),
            str(m.get("warm_hits", 0)),
            f"{m.get('gb_seconds', 0):.2f}",
        )
    console.print(table)
    totals = report["platform"].get("totals", {})
    if totals:
        console.print(f"total: {totals.get('requests', 0)} requests, {totals.get('gb_seconds', 0):.2f} GB-s billed")
    if report["models"]:
        console.print("models in the store: " + ", ".join(f"{m} v{max(v)}" for m, v in report["models"].items() if v))
