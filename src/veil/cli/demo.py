"""`veil demo`: the whole story on the embedded platform, narrated."""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from veil.errors import VeilError


def _scan(paths: list[Path], needles: dict[str, bytes]) -> dict[str, list[str]]:
    """Which needles (plaintext model bytes, keys, inputs) occur in which files."""
    found: dict[str, list[str]] = {}
    for root in paths:
        for f in root.rglob("*") if root.is_dir() else [root]:
            if f.is_file():
                data = f.read_bytes()
                for name, needle in needles.items():
                    if needle and needle in data:
                        found.setdefault(name, []).append(str(f))
    return found


@click.command("demo")
@click.option(
    "--dir",
    "workdir",
    type=click.Path(path_type=Path),
    default=None,
    help="Keep the deployment's files here (default: a temporary directory, removed after).",
)
@click.option("--samples", default=20, show_default=True, help="Encrypted requests per model.")
@click.option("--he/--no-he", "with_he", default=True, show_default=True, help="Also run the HE-mode part.")
def demo(workdir: Path | None, samples: int, with_he: bool) -> None:
    """Train two models, seal them, attest, and run encrypted inference end to end.

    Everything runs on this machine: a KeyService subprocess (SQLite), a gateway, the local
    serverless platform starting runtime subprocesses on demand (simulated TEE attestation),
    and a model store directory that only ever holds ciphertext.
    """
    console = Console()
    logging.basicConfig(level=logging.ERROR)
    from veil.demo_models import train_demo_models
    from veil.deployment import LocalDeployment, StackOptions
    from veil.sdk import ModelOwner, ModelUser

    tmp = workdir is None
    root = Path(tempfile.mkdtemp(prefix="veil-demo-")) if tmp else workdir
    try:
        with console.status("Training demo models on scikit-learn's breast_cancer and digits…"):
            models = train_demo_models()
        console.print(f"[bold]1. Trained[/] {', '.join(m.model_id for m in models)} and converted them to ONNX")

        with console.status("Starting KeyService, gateway and local platform…"):
            stack = LocalDeployment(root, StackOptions(he=with_he))
            info = stack.start()
        try:
            trust = stack.local_trust_anchors()  # the clients' own choice: this code, this simulated TEE
            console.print(f"[bold]2. Deployment up[/] (state in {root})")
            console.print(f"   KeyService  {info.keyservice_url}  measurement {trust.keyservice_measurements[0][:16]}…")
            console.print(f"   gateway     {info.gateway_url}  (OpenAPI at /docs, metrics at /metrics)")
            console.print(
                f"   runtime     measurement {trust.runtime_measurements[0][:16]}…  [yellow](simulated TEE)[/]"
            )
            _tee_story(console, stack, info, trust, models, samples, ModelOwner, ModelUser)
            if with_he:
                _he_story(console, stack, info)
            m = stack.platform.metrics(stack.tee_spec.name)
            if m.get("requests"):
                console.print(
                    f"[bold]Platform[/]: {m.get('cold_starts')} cold start(s), {m.get('warm_hits')} warm hits, "
                    f"{m.get('gb_seconds', 0):.2f} GB-s billed"
                )
        finally:
            with console.status("Stopping…"):
                stack.stop()
        console.print("[bold green]Demo complete.[/]")
        console.print(
            "Next: run it yourself, step by step (README, 'Step by step'):\n"
            "  veil up                      # in one terminal\n"
            "  veil trust init --allow-simulated --sim-root .veil/cloud/keyservice/sim-root.key\n"
            "  veil example breast-cancer && veil owner init && veil owner publish cancer model.onnx\n"
            "Then: docs/tutorial.md (a hospital, two users, a revocation, the audit), `veil bench SUITE --help`."
        )
    except VeilError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from None
    finally:
        if tmp:
            shutil.rmtree(root, ignore_errors=True)


REVOCATION_DELAY_S = 3  # the demo owner's choice, so step 7 is quick (the default is 60 s)


def _tee_story(console: Console, stack, info, trust, models, samples: int, ModelOwner, ModelUser) -> None:  # noqa: N803
    import onnxruntime as ort

    owner, user = ModelOwner(info, trust=trust), ModelUser(info, trust=trust)
    owner.register()
    user.register()
    console.print(
        f"[bold]3. Owner and user verified the KeyService's attestation[/] and registered "
        f"(owner {owner.id[:12]}…, user {user.id[:12]}…)"
    )
    for m in models:
        owner.publish(m.model_id, m.onnx, revocation_delay_s=REVOCATION_DELAY_S)
        owner.grant(m.model_id, user.id)
        user.request_access(m.model_id)
    console.print(
        "[bold]4. Owner sealed and uploaded the models[/] (AES-256-GCM, 1 MiB chunks), registered model keys "
        "and allowed runtime measurements; granted the user. User registered request keys."
    )

    table = Table(title="5. Encrypted inference (TEE mode)")
    for col in ("model", "requests", "agree with plain ONNX", "accuracy", "cold ms", "warm p50 ms"):
        table.add_column(col)
    wire_samples: list[tuple[bytes, dict]] = []
    for m in models:
        session = ort.InferenceSession(m.onnx)
        agree, correct, lat = 0, 0, []
        for i in range(min(samples, len(m.x_test))):
            x = m.x_test[i : i + 1]
            t0 = time.perf_counter()
            out = user.infer(m.model_id, x)
            lat.append((time.perf_counter() - t0) * 1e3)
            ref = session.run(None, {"input": x})
            agree += int(np.array_equal(out["label"], ref[0]) and np.allclose(out["probabilities"], ref[1]))
            correct += int(out["label"][0] == m.y_test[i])
            if i == 0:
                _, env = user.sealed_request(m.model_id, {"input": x})
                wire_samples.append((x.tobytes(), env))
        n = len(lat)
        table.add_row(
            m.model_id,
            str(n),
            f"{agree}/{n}",
            f"{correct / n:.0%}",
            f"{lat[0]:.0f}",
            f"{statistics.median(lat[1:]):.1f}",
        )
    console.print(table)

    needles = {f"{m.model_id} plaintext": m.onnx[-256:] for m in models}
    needles.update({f"request key {k}": v.material() for k, v in user.request_keys.items()})
    needles.update({f"input of {m.model_id}": w[0] for m, w in zip(models, wire_samples, strict=True)})
    leaks = _scan([stack.cloud], needles)
    envelope_text = str(wire_samples[0][1]).encode()
    console.print(
        f"[bold]6. Ciphertext only:[/] scanned {stack.cloud} (model store, KeyService database, all logs) "
        f"for model bytes, request keys and inputs: "
        + ("[green]nothing found[/]" if not leaks else f"[red]FOUND {leaks}[/]")
    )
    console.print(
        f"   on the wire an envelope is {{v, model, user, request_id, direction, expires, ct}}; ct is "
        f"{len(wire_samples[0][1]['ct'])} base64url characters; plaintext input in it: "
        f"{'[red]yes[/]' if wire_samples[0][0] in envelope_text else '[green]no[/]'}"
    )

    victim = models[0].model_id
    owner.revoke(victim, user.id)
    time.sleep(REVOCATION_DELAY_S + 0.5)
    try:
        user.infer(victim, models[0].x_test[:1])
        console.print("[red]7. Revocation did not take effect![/]")
    except VeilError as exc:
        console.print(
            f"[bold]7. Owner revoked the user[/]; after the model's revocation delay ({REVOCATION_DELAY_S} s, "
            f"the owner's setting; 60 s by default) the next request is refused: [yellow]{exc.code}[/]"
        )


def _he_story(console: Console, stack, info) -> None:
    try:
        from veil.he.demo import run_he_demo
    except ImportError as exc:
        console.print(f"[yellow]HE part skipped: {exc}[/]")
        return
    console.print(
        "[bold]8. HE and hybrid mode[/]: the client encrypts with CKKS; the cloud computes on ciphertexts "
        "(hybrid: inside the attested runtime, the weights sealed too)"
    )
    run_he_demo(info, stack.local_trust_anchors(), lambda line: console.print("   " + line))
