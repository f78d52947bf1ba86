"""`veil user infer` takes real data: CSV with or without a header, .npy, .npz, JSON rows or a
JSON mapping for a multi-input int64 model; writes JSON, CSV or .npz; explains a card mismatch
and refuses unknown models and invalid ids clearly. Real CLI processes against a running
deployment."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from veil.sdk import ModelOwner


def _two_input_int64_model() -> bytes:
    """out = sum(input_ids * attention_mask) per row, as float32: MiniLM-style int64 inputs."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [None, 4])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [None, 4])
    out = helper.make_tensor_value_info("score", TensorProto.FLOAT, [None, 1])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("Mul", ["input_ids", "attention_mask"], ["m"]),
        helper.make_node("ReduceSum", ["m", "axes"], ["s"], keepdims=1),
        helper.make_node("Cast", ["s"], ["score"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(nodes, "two-inputs", [ids, mask], [out], initializer=[axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def cli(stack, tmp_path_factory):
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    types = [("float_input", FloatTensorType([None, 4]))]
    iris = convert_sklearn(LogisticRegression(max_iter=500).fit(x, y), initial_types=types, options={"zipmap": False})
    owner = ModelOwner(stack.info, stack.owner.identity, trust=stack.trust)
    owner.publish("cli-iris", iris.SerializeToString())
    owner.publish("cli-two", _two_input_int64_model())
    onnx.checker.check_model(onnx.load_model_from_string(_two_input_int64_model()))

    home = tmp_path_factory.mktemp("cli-user")
    client = home / "client"
    deployment = stack.deployment.root / "deployment.json"
    sim_root = stack.deployment.keyservice_dir / "sim-root.key"

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(
            [sys.executable, "-m", "veil.cli", *args, "--client-dir", str(client)]
            + (["--deployment", str(deployment)] if args[0] == "user" else []),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=home,
        )
        assert (r.returncode == 0) == ok, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        return r

    run("trust", "init", "--allow-simulated", "--sim-root", str(sim_root))
    user_id = run("user", "init").stdout.strip().splitlines()[-1]
    for model in ("cli-iris", "cli-two"):
        owner.grant(model, user_id)
        run("user", "request-access", model)
    owner.close()
    return run, home, x.astype(np.float32)


def test_csv_with_and_without_header_npy_json(cli):
    run, home, x = cli
    np.savetxt(home / "plain.csv", x[:3], delimiter=",")
    np.savetxt(home / "header.csv", x[:3], delimiter=",", header="a,b,c,d", comments="")
    np.save(home / "rows.npy", x[:3])
    (home / "rows.json").write_text(json.dumps(x[:3].tolist()))
    answers = []
    for name in ("plain.csv", "header.csv", "rows.npy", "rows.json"):
        answers.append(json.loads(run("user", "infer", "cli-iris", "--input", str(home / name)).stdout))
    assert all(a == answers[0] for a in answers) and len(answers[0]["label"]) == 3


def test_multi_input_int64_from_json_mapping_and_npz(cli):
    run, home, _ = cli
    ids, mask = [[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 1, 0, 0], [1, 1, 1, 1]]
    (home / "two.json").write_text(json.dumps({"input_ids": ids, "attention_mask": mask}))
    out = json.loads(run("user", "infer", "cli-two", "--input", str(home / "two.json")).stdout)
    assert out["score"] == [[3.0], [26.0]]
    np.savez(home / "two.npz", input_ids=np.array(ids), attention_mask=np.array(mask))
    run("user", "infer", "cli-two", "--input", str(home / "two.npz"), "--output", str(home / "out.npz"))
    with np.load(home / "out.npz") as got:
        np.testing.assert_array_equal(got["score"], [[3.0], [26.0]])
    run("user", "infer", "cli-two", "--input", str(home / "two.json"), "--output", str(home / "out.csv"))
    assert (home / "out.csv").read_text().splitlines() == ["score", "3", "26"]


def test_mismatches_and_bad_ids_are_explained(cli):
    run, home, x = cli
    np.savetxt(home / "narrow.csv", x[:2, :3], delimiter=",")
    r = run("user", "infer", "cli-iris", "--input", str(home / "narrow.csv"), ok=False)
    assert "card_mismatch" in r.stderr and "float_input: expected float32 [batch, 4], got float32 [2, 3]" in r.stderr
    (home / "frac.json").write_text(json.dumps({"input_ids": [[1.5, 2, 3, 4]], "attention_mask": [[1, 1, 1, 1]]}))
    r = run("user", "infer", "cli-two", "--input", str(home / "frac.json"), ok=False)
    assert "whole numbers" in r.stderr
    r = run(
        "user",
        "infer",
        "cli-two",
        "--input",
        str(home / "rows.npy" if (home / "rows.npy").exists() else home / "narrow.csv"),
        ok=False,
    )
    assert "several inputs" in r.stderr or "card_mismatch" in r.stderr
    r = run("user", "infer", "no-such-model", "--input", str(home / "narrow.csv"), ok=False)
    assert "unknown_model" in r.stderr and "no-such-model" in r.stderr
    r = run("user", "infer", "a/b", "--input", str(home / "narrow.csv"), ok=False)
    assert "model" in r.stderr and "A-Z a-z 0-9" in r.stderr
