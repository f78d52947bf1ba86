"""A runtime whose code was changed measures differently and gets no keys: refused by the model
owner's allow-list, or by the user's when the owner allows it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import Stack, assert_matches_reference, python_env

import veil
from veil.crypto.envelope import Envelope, open_envelope
from veil.deployment import TEE_FUNCTION
from veil.errors import VeilError
from veil.platform.local import ActionError, FunctionSpec
from veil.runtime import tensors

MODIFIED = "veil-tee-modified"
LR = "breast-cancer-lr"


def _pythonpath(first: Path) -> str:
    """`first` ahead of whatever PYTHONPATH the tests run with."""
    rest = os.environ.get("PYTHONPATH")
    return str(first) + (os.pathsep + rest if rest else "")


def _measure_in(env: dict[str, str]) -> tuple[str, str]:
    """(veil.__file__, measure('runtime')) as a process with `env` sees them."""
    code = "import veil; from veil.attest.measurement import measure; print(veil.__file__); print(measure('runtime'))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    return out[0], out[1]


@pytest.fixture(scope="module")
def modified_copy(tmp_path_factory) -> Path:
    """A copy of the veil package with a comment appended to runtime/core.py; returns the
    directory to put on PYTHONPATH."""
    root = tmp_path_factory.mktemp("veil-modified")
    copy = root / "veil"
    shutil.copytree(Path(veil.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "runtime" / "core.py").open("a") as f:
        f.write("\n# a harmless-looking change is still a different runtime\n")
    return root


@pytest.fixture(scope="module")
def modified(stack: Stack, modified_copy: Path) -> Iterator[str]:
    """A function on the shared platform whose instances run a copy of veil with one runtime file
    changed (a comment appended to runtime/core.py). Yields that copy's measurement."""
    root, copy = modified_copy, modified_copy / "veil"
    env = {**stack.deployment.tee_spec.env, "PYTHONPATH": _pythonpath(root)}
    where, measurement = _measure_in(python_env(**env))
    assert Path(where).resolve() == (copy / "__init__.py").resolve(), where
    _, genuine = _measure_in(python_env())
    assert genuine == stack.measurement, "the genuine runtime's measurement changed under the test"
    assert measurement != genuine

    stack.platform.deploy(
        FunctionSpec(
            name=MODIFIED,
            command=[sys.executable, "-m", "veil.runtime"],
            init_value=dict(stack.deployment.tee_spec.init_value),
            env=env,
            memory_mb=512,
            concurrency=2,
            max_instances=1,
            idle_timeout_s=300,
        )
    )
    try:
        yield measurement
    finally:
        stack.platform.remove(MODIFIED)


def _send_to_modified(stack: Stack, user, model_id: str, x):
    rid, env = user.sealed_request(model_id, {"input": x})
    stack.secrets.tensors(f"input {model_id}", {"input": x})
    return rid, stack.platform.invoke(MODIFIED, {"envelope": env}, timeout=60)


def test_modified_runtime_really_runs_the_modified_code(stack, modified):
    """The instances of the function attest with the changed measurement (their /init says so
    in the instance log), so the refusals below are about the code, not a setup mistake."""
    stats = stack.platform.invoke(MODIFIED, {"op": "stats"}, timeout=60)
    assert "models_cached" in stats
    [inst] = stack.platform.instances(MODIFIED)
    log = Path(inst.log_path).read_text()
    assert f"measurement {modified}" in log
    assert stack.measurement not in log


def test_modified_runtime_refused_by_owner(stack, modified):
    """The owner allowed only the genuine measurement (the default publish)."""
    x = stack.models[LR].x_test[:1]
    with pytest.raises(ActionError) as info:
        _send_to_modified(stack, stack.user, LR, x)
    assert info.value.status == 403
    assert info.value.body["code"] == "measurement_refused_by_owner", info.value.body
    assert modified in info.value.body["message"]
    # the genuine runtime serves the same user and model
    assert_matches_reference(stack.models[LR], x, stack.infer(stack.user, LR, x))
    stats = stack.platform.invoke(MODIFIED, {"op": "stats"}, timeout=60)
    assert stats["key_cache_entries"] == 0 and stats["models_cached"] == []


def test_modified_runtime_refused_by_user_when_owner_allows_it(stack, modified):
    model = stack.models[LR]
    model_id = "owner-allows-modified"
    stack.publish(model_id, model.onnx, measurements=[stack.measurement, modified])
    strict = stack.new_user([model_id])  # allows only the genuine measurement (the default)
    lax = stack.new_user([model_id], allowed_measurements=[stack.measurement, modified])
    x = model.x_test[:2]

    with pytest.raises(ActionError) as info:
        _send_to_modified(stack, strict, model_id, x)
    assert info.value.status == 403
    assert info.value.body["code"] == "measurement_refused_by_user", info.value.body
    assert modified in info.value.body["message"]
    # both users are served by the genuine runtime
    for u in (strict, lax):
        assert_matches_reference(model, x, stack.infer(u, model_id, x))

    # control: a user who also allows the modified runtime is served by it, correctly, so the
    # refusal above came from the user's allow-list and nothing else
    rid, answer = _send_to_modified(stack, lax, model_id, x)
    out = tensors.decode(
        open_envelope(
            lax.request_keys[model_id],
            Envelope.from_json(answer["envelope"]),
            model=model_id,
            user=lax.id,
            direction="response",
            request_id=rid,
        )
    )
    stack.secrets.tensors(f"output {model_id}", out)
    assert_matches_reference(model, x, out)
    assert stack.platform.metrics(TEE_FUNCTION)["crashes"] == 0


def test_modified_runtime_behind_the_gateway(make_stack, modified_copy, modified):
    """A whole deployment whose runtime instances run the modified copy: the owner published
    for the genuine measurement, so every request is refused, and the user hears why."""
    stack = make_stack(runtime_env={"PYTHONPATH": _pythonpath(modified_copy)})
    x = stack.models[LR].x_test[:1]
    for _ in range(2):
        with pytest.raises(VeilError) as info:
            stack.infer(stack.user, LR, x)
        assert (info.value.code, info.value.status) == ("measurement_refused_by_owner", 403), info.value.message
        assert modified in info.value.message
