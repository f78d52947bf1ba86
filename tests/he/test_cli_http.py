"""CLI round trip (compile -> keygen -> encrypt -> run -> decrypt) and the HTTP client path."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from veil.cli.he import he
from veil.he.client import HEClient, HttpTransport, RemoteModel
from veil.he.demo import run_he_demo
from veil.he.errors import HEError


@pytest.mark.parametrize("cmd", [[], ["compile"], ["keygen"], ["encrypt"], ["run"], ["decrypt"], ["infer"], ["demo"]])
def test_help_everywhere(cmd):
    result = CliRunner().invoke(he, [*cmd, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_cli_round_trip(tmp_path, lr_task):
    runner = CliRunner()
    store = tmp_path / "store"
    r = runner.invoke(he, ["compile", "--task", "breast_cancer_lr", "--publish", str(store), "--model-id", "bc"])
    assert r.exit_code == 0, r.output
    assert "N=2048" in r.output and "tc128" in r.output and "latency=coeff" in r.output
    spec = store / "he" / "bc" / "client.json"
    keys = tmp_path / "keys"
    assert runner.invoke(he, ["keygen", "--spec", str(spec), "--out", str(keys)]).exit_code == 0
    assert (keys / "secret.key").stat().st_mode & 0o077 == 0
    x = lr_task.x_test[:5]
    np.save(tmp_path / "x.npy", x)
    r = runner.invoke(
        he,
        [
            "encrypt",
            "--spec",
            str(spec),
            "--keys",
            str(keys),
            "--input",
            str(tmp_path / "x.npy"),
            "--model",
            "bc",
            "--out",
            str(tmp_path / "req.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "req.json").read_text())["v"] == 1
    r = runner.invoke(
        he,
        [
            "run",
            "--store",
            str(store),
            "--keys",
            str(keys),
            "--request",
            str(tmp_path / "req.json"),
            "--out",
            str(tmp_path / "resp.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        he, ["decrypt", "--spec", str(spec), "--keys", str(keys), "--response", str(tmp_path / "resp.json")]
    )
    assert r.exit_code == 0, r.output
    assert r.output.split() == [str(v) for v in lr_task.model.predict(x)]


def test_cli_refuses_insecure_ring(tmp_path):
    r = CliRunner().invoke(
        he, ["compile", "--task", "digits_mlp", "--poly-degree", "4096", "--out", str(tmp_path / "m")]
    )
    assert r.exit_code != 0 and "insecure_parameters" in r.output


def test_http_transport_against_gateway(gateway_url, he_store, mlp_task):
    from veil.he import store

    transport = HttpTransport(gateway_url)
    try:
        remote = RemoteModel(HEClient(store.client_spec(he_store, "mlp")), transport, "mlp")
        res = remote.infer(mlp_task.x_test[:3])
        assert list(res.predictions) == list(mlp_task.model.predict(mlp_task.x_test[:3]))
        with pytest.raises(HEError) as info:
            RemoteModel(HEClient(store.client_spec(he_store, "mlp")), transport, "nope").infer(mlp_task.x_test[:1])
        assert info.value.code == "unknown_model" and info.value.status == 404
    finally:
        transport.close()


def test_demo_through_gateway(gateway_url, he_store):
    lines = []
    summary = run_he_demo(he_store, gateway_url, lines.append, samples=2)
    assert set(summary) == {"he-breast-lr", "he-digits-mlp", "he-digits-cnn"}
    for item in summary.values():
        assert item["single_agreement"] == 1.0 and item["batch_agreement"] >= 0.999
    assert any("encrypted ->" in line for line in lines)
