"""Ciphertext only at rest: no plaintext model, input, output or key in the model store, the
KeyService database (and its WAL), or any log (KeyService, instances).

Named to run last: it scans the files of every deployment this test session started (the shared
one and each dedicated one) for every secret any test handled, as recorded in `secrets`. Run
alone, it still scans the shared deployment after traffic of its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from e2e_support import assert_matches_reference, scan

from veil.deployment import TEE_FUNCTION


def _kinds(needles: dict[str, bytes]) -> set[str]:
    return {label.split(" ")[0] + " " + label.split(" ")[1] for label in needles}


def test_no_plaintext_model_input_output_or_key_at_rest(stack, secrets, tmp_path_factory):
    # traffic of its own: every model, single rows and a batch, two users
    other = stack.new_user()
    for model in stack.models.values():
        for user in (stack.user, other):
            for x in (model.x_test[:1], np.ascontiguousarray(model.x_test[10:42])):
                assert_matches_reference(model, x, stack.infer(user, model.model_id, x))
    assert stack.platform.metrics(TEE_FUNCTION)["requests"] > 0

    cloud = stack.deployment.cloud
    # the scan is not vacuous: the places that would leak exist and hold data
    files = {p.relative_to(cloud).as_posix() for p in cloud.rglob("*") if p.is_file()}
    for model_id in stack.models:
        assert f"store/models/{model_id}/v1.veilm" in files
    assert "keyservice/keyservice.db" in files
    assert "logs/keyservice.log" in files
    instance_logs = [f for f in files if f.startswith("logs/") and f != "logs/keyservice.log"]
    assert instance_logs, files
    assert any((cloud / f).stat().st_size > 0 for f in instance_logs)

    needles = dict(secrets.needles)
    kinds = _kinds(needles)
    for kind in (
        "model key",
        "request key",
        "input breast-cancer-lr",
        "input digits-mlp",
        "output breast-cancer-lr",
        "output digits-mlp",
    ):
        assert kind in kinds, (kind, sorted(kinds))
    for model_id in stack.models:
        slices = [k for k in needles if k.startswith(f"{model_id} onnx [")]
        assert len(slices) >= 3, slices

    # the scanner finds what is there (controls): a planted key in every encoding it looks for,
    # and the sealed files' magic in the store
    key_needles = {k: v for k, v in needles.items() if k.startswith("model key")}
    planted = tmp_path_factory.mktemp("planted")
    (planted / "some.log").write_bytes(b"..." + b"|".join(key_needles.values()) + b"...")
    found, _, _ = scan(planted, key_needles)
    assert sorted(found) == sorted(key_needles)
    found, _, _ = scan(cloud / "store", {"sealed-model magic": b"VEILMDL1"})
    assert len(found["sealed-model magic"]) >= len(stack.models)

    base = Path(tmp_path_factory.getbasetemp())
    clouds = sorted({p for p in base.rglob("cloud") if p.is_dir()})
    assert cloud in clouds
    leaks: dict[str, dict[str, list[str]]] = {}
    total_files = total_bytes = 0
    for root in clouds:
        found, n, size = scan(root, needles)
        total_files += n
        total_bytes += size
        if found:
            leaks[str(root)] = found
    assert total_files >= 4 and total_bytes > 0
    assert not leaks, f"plaintext or keys found at rest: {leaks}"
