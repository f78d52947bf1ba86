"""`veil he ...`: HE mode from the command line (dev: compile; client: keygen, encrypt, decrypt,
infer; server: run a request locally against a model store)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import click
import numpy as np

from veil.cli._client import client_dir_option, deployment_option
from veil.he.errors import HEError

CONTEXT = {"help_option_names": ["-h", "--help"]}


def _fail(exc: HEError) -> click.ClickException:
    return click.ClickException(f"{exc.code}: {exc.message}")


def _load_array(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    return np.loadtxt(path, delimiter=",", ndmin=2)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read {path}: {exc}") from None


@click.group("he", context_settings=CONTEXT)
def he() -> None:
    """HE mode: compile models, make keys, encrypted CKKS inference."""


@he.command("compile", context_settings=CONTEXT)
@click.argument("model", required=False, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--task",
    type=click.Choice(["breast_cancer_lr", "digits_mlp", "digits_mlp3", "digits_cnn"]),
    help="Train a reference model instead.",
)
@click.option("--calib", type=click.Path(exists=True, path_type=Path), help="Calibration inputs (.npy or .csv).")
@click.option("--out", type=click.Path(path_type=Path), help="Write the compiled model to this directory.")
@click.option("--publish", "publish_to", type=click.Path(path_type=Path), help="Publish into this model store.")
@click.option("--model-id", default="model", show_default=True)
@click.option("--precision", default=1e-4, show_default=True, help="Target absolute error of the outputs.")
@click.option("--poly-degree", type=int, help="Pin the ring dimension N (refused if not 128-bit secure).")
@click.option(
    "--latency-program",
    type=click.Choice(["auto", "coeff", "rows", "conv", "bsgs"]),
    default="auto",
    show_default=True,
    help="Latency-mode program: auto takes the cheapest the model fits (docs/he.md).",
)
@click.option(
    "--verify-samples",
    default=32,
    show_default=True,
    help="Calibration samples run on real ciphertexts to check the precision (0: bounds only).",
)
@click.option(
    "--max-approx-change",
    default=0.02,
    show_default=True,
    help="Largest share of calibration predictions a ReLU/sigmoid/tanh approximation may change.",
)
def compile_cmd(
    model: Path | None,
    task: str | None,
    calib: Path | None,
    out: Path | None,
    publish_to: Path | None,
    model_id: str,
    precision: float,
    poly_degree: int | None,
    latency_program: str,
    verify_samples: int,
    max_approx_change: float,
) -> None:
    """Compile MODEL (ONNX file, or a pickled scikit-learn estimator you trust) to an HE plan.

    Every intermediate value is bounded over the calibration data and checked against the exact
    modulus chain; with --verify-samples the precision is measured on real ciphertexts. A model
    that would not fit or meet --precision is refused here, naming the layer and the value.
    """
    from veil.he import store
    from veil.he.compile import compile_model
    from veil.he.tasks import TASKS

    if task:
        t = TASKS[task]()
        source, x_calib = t.model, t.x_train
    elif model is not None:
        if calib is None:
            raise click.ClickException("--calib is required with MODEL (inputs to calibrate value ranges)")
        x_calib = _load_array(calib)
        if model.suffix == ".onnx":
            source = model
        else:
            with model.open("rb") as fh:
                source = pickle.load(fh)  # noqa: S301 (the owner's own model file, on the owner's machine)
    else:
        raise click.ClickException("give MODEL or --task")
    try:
        from rich.console import Console

        # compiling picks parameters and, with --verify-samples, runs real ciphertexts: seconds to minutes
        with Console(stderr=True).status(f"compiling {model_id}: bounds, parameters, packing, verification…"):
            compiled = compile_model(
                source,
                x_calib,
                precision,
                poly_modulus_degree=poly_degree,
                name=model_id,
                latency=latency_program,
                verify_samples=verify_samples,
                max_approx_change=max_approx_change,
            )
        if out:
            compiled.save(out)
        if publish_to:
            store.publish(publish_to, model_id, compiled)
    except HEError as exc:
        raise _fail(exc) from None
    p = compiled.params
    click.echo(
        f"compiled {model_id}: N={p.poly_modulus_degree} log2QP={p.log2_qp} primes={list(p.coeff_bits)} "
        f"scale=2^{p.scale_bits} security={p.security} layers={len(compiled.plan.layers)} latency={compiled.latency}"
    )
    meta = compiled.meta
    click.echo(f"headroom (bits, worst intermediate): {meta.get('headroom_bits')}")
    if "measured_error" in meta:
        errs = ", ".join(f"{k} {v:.2g}" for k, v in meta["measured_error"].items())
        click.echo(f"measured max error on real ciphertexts: {errs} (target {precision:g})")
    approx = meta.get("approximation")
    if approx:
        for f in approx["activations"]:
            click.echo(
                f"approximated {f['kind']} (op {f['op']}) by degree {approx['degree']} on "
                f"[{f['lo']:.3g}, {f['hi']:.3g}]: max error {f['max_abs_error']:.3g}"
            )
        click.echo(
            f"approximation changes {approx['prediction_change']:.2%} of calibration predictions "
            f"(threshold {approx['threshold']:.2%}), scores by up to {approx['max_score_change']:.3g}"
        )


@he.command("keygen", context_settings=CONTEXT)
@click.option("--spec", required=True, type=click.Path(exists=True, path_type=Path), help="The model's client.json.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Key directory to create.")
def keygen(spec: Path, out: Path) -> None:
    """Make a secret key (stays here, mode 0600) and the evaluation keys to upload."""
    from veil.he.client import HEClient

    client = HEClient(_read_json(spec))
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / "secret.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(client.export_secret_key())
    (out / "eval.keys").write_bytes(client.eval_keys())
    (out / "key_id").write_text(client.key_id + "\n")
    click.echo(f"key id {client.key_id} ({len(client.eval_keys()) / 2**20:.1f} MiB of evaluation keys)")


def _client(spec: Path, keys: Path):  # noqa: ANN202
    from veil.he.client import HEClient

    client = HEClient(_read_json(spec), (keys / "secret.key").read_bytes())
    client._blob = (keys / "eval.keys").read_bytes()
    return client


@he.command("encrypt", context_settings=CONTEXT)
@click.option("--spec", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--keys", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--input", "inp", required=True, type=click.Path(exists=True, path_type=Path), help=".npy or .csv")
@click.option("--packing", type=click.Choice(["latency", "throughput"]), help="Default: the cost model picks.")
@click.option("--model", "model_id", required=True)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Request JSON (wire format v1).")
def encrypt(spec: Path, keys: Path, inp: Path, packing: str | None, model_id: str, out: Path) -> None:
    """Encrypt inputs into an infer request body."""
    from veil.he.wire import InferRequest

    client = _client(spec, keys)
    try:
        batch = client.encrypt(_load_array(inp), packing)
    except HEError as exc:
        raise _fail(exc) from None
    req = InferRequest(model_id, client.key_id, batch.packing, batch.batch, batch.features, batch.ciphertexts)
    out.write_text(json.dumps(req.to_json()))
    click.echo(f"{batch.batch} samples, {batch.packing} packing, {len(batch.ciphertexts)} ciphertexts")


@he.command("run", context_settings=CONTEXT)
@click.option("--store", "store_dir", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--keys", required=True, type=click.Path(exists=True, path_type=Path), help="Key dir (eval.keys only).")
@click.option("--request", "request_path", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path))
def run(store_dir: Path, keys: Path, request_path: Path, out: Path) -> None:
    """Server side, locally: evaluate a request with the same code a serverless instance runs."""
    from veil.crypto.encoding import b64e
    from veil.he.action import HEAction

    body = _read_json(request_path)
    action = HEAction({"kind": "he", "store": str(store_dir)})
    try:
        action.run(
            {"op": "upload_keys", "v": 1, "model": body.get("model"), "keys": b64e((keys / "eval.keys").read_bytes())}
        )
        resp = action.run({**body, "op": "infer"})
    except HEError as exc:
        raise _fail(exc) from None
    out.write_text(json.dumps(resp))
    click.echo(f"evaluated in {resp['eval_ms']:.1f} ms")


@he.command("decrypt", context_settings=CONTEXT)
@click.option("--spec", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--keys", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--response", "response_path", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Write scores as .npy (else print predictions).")
def decrypt(spec: Path, keys: Path, response_path: Path, out: Path | None) -> None:
    """Decrypt a response; print predictions (or save raw scores)."""
    from veil.he.wire import InferResponse

    client = _client(spec, keys)
    try:
        resp = InferResponse.parse(_read_json(response_path))
        scores = client.decrypt(resp, resp.packing, resp.batch)
    except HEError as exc:
        raise _fail(exc) from None
    if out:
        np.save(out, scores)
    click.echo(" ".join(str(p) for p in client.predict(scores)))


@he.command("infer", context_settings=CONTEXT)
@deployment_option
@client_dir_option
@click.option("--model", "model_id", required=True, help="A model published in HE or hybrid mode.")
@click.option("--input", "inp", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--packing", type=click.Choice(["latency", "throughput"]))
@click.pass_context
def infer(
    ctx: click.Context, deployment_path: Path, client_dir: Path, model_id: str, inp: Path, packing: str | None
) -> None:
    """Encrypt, send to the gateway, decrypt: the same as `veil user infer MODEL --input FILE`
    (keys made once and kept in the client directory, uploaded once per model parameters)."""
    from veil.cli.user import infer as user_infer

    ctx.invoke(
        user_infer,
        model_id=model_id,
        input_path=inp,
        input_name=None,
        output_path=None,
        packing=packing,
        deployment_path=deployment_path,
        client_dir=client_dir,
    )


@he.command("demo", context_settings=CONTEXT)
@deployment_option
@client_dir_option
def demo(deployment_path: Path, client_dir: Path) -> None:
    """Publish the demo models in HE (and hybrid) mode through the gateway and run encrypted
    requests as a fresh owner and user (the SDK's `ModelOwner.publish(mode=...)`, `ModelUser.infer`)."""
    from veil.cli._client import load_deployment, load_trust, run_or_fail
    from veil.he.demo import run_he_demo

    deployment, trust = load_deployment(deployment_path), load_trust(client_dir)
    summary = run_or_fail(lambda: run_he_demo(deployment, trust, click.echo))
    click.echo(json.dumps(summary, indent=1))
