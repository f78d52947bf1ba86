"""CLI round trip (compile -> keygen -> encrypt -> run -> decrypt) and the HTTP client path."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from veil.cli.he import he
from veil.he.demo import run_he_demo


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


def test_owner_publish_and_user_infer_cli(tmp_path, he_stack, lr_compiled, lr_task):
    """`veil owner publish --mode he` and `veil user infer` (and `veil he infer`, which delegates)
    serve an HE model through the real gateway, with the principals' own client directories."""
    import shutil

    from veil.cli import cli

    runner = CliRunner()
    deployment = tmp_path / "deployment.json"
    shutil.copy(he_stack.deployment.root / "deployment.json", deployment)
    compiled_dir = lr_compiled.save(tmp_path / "compiled")
    owner_dir, user_dir = tmp_path / "owner", tmp_path / "user"
    trust = he_stack.trust
    for d in (owner_dir, user_dir):
        d.mkdir()
        (d / "trust.json").write_text(json.dumps(trust.to_json()))
    common = ["--deployment", str(deployment)]
    r = runner.invoke(cli, ["owner", "init", *common, "--client-dir", str(owner_dir)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        cli, ["owner", "publish", "cli-lr", str(compiled_dir), "--mode", "he", *common, "--client-dir", str(owner_dir)]
    )
    assert r.exit_code == 0 and "he mode, N=2048" in r.output, r.output
    r = runner.invoke(cli, ["user", "init", *common, "--client-dir", str(user_dir)])
    assert r.exit_code == 0, r.output
    user_id = r.output.strip().splitlines()[-1]
    r = runner.invoke(cli, ["owner", "grant", "cli-lr", user_id, *common, "--client-dir", str(owner_dir)])
    assert r.exit_code == 0, r.output
    x = lr_task.x_test[:4]
    np.save(tmp_path / "x.npy", x)
    for cmd in (["user", "infer", "cli-lr", "--input"], ["he", "infer", "--model", "cli-lr", "--input"]):
        r = runner.invoke(cli, [*cmd, str(tmp_path / "x.npy"), *common, "--client-dir", str(user_dir)])
        assert r.exit_code == 0, r.output
        out = json.loads(r.output[r.output.index("{") : r.output.rindex("}") + 1])
        assert out["predictions"] == [int(v) for v in lr_task.model.predict(x)], out
    secret = next((user_dir / "he-keys").rglob("secret.key"))
    assert secret.stat().st_mode & 0o077 == 0
    # a tee-mode publish of a directory is refused before anything is sent
    r = runner.invoke(cli, ["owner", "publish", "cli-x", str(compiled_dir), *common, "--client-dir", str(owner_dir)])
    assert r.exit_code != 0 and "ONNX file" in r.output


def test_demo_through_gateway(he_stack):
    from veil.he.tasks import breast_cancer_lr, digits_mlp

    lines = []
    summary = run_he_demo(
        he_stack.info,
        he_stack.trust,
        lines.append,
        samples=2,
        models={"he-breast-lr": breast_cancer_lr, "he-digits-mlp": digits_mlp},
    )
    assert set(summary) == {"he-breast-lr", "he-breast-lr-hybrid", "he-digits-mlp"}
    for item in summary.values():
        assert item["single_agreement"] == 1.0 and item["batch_agreement"] >= 0.99
    assert any("encrypted ->" in line for line in lines)
