"""A deployment whose model store is a network service (`veil store serve`), and a "second node":
a runtime that has only the store's URL, the KeyService's URL and the deployment's simulation
root installed with `veil cluster join`, serving the same models.

Everything is real: the store service subprocess, the owner's signed upload streamed through the
gateway into it, runtimes reading it over HTTP.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from e2e_support import assert_matches_reference, python_env, wait_until

from veil.attest.sim import SimRoot
from veil.deployment import free_port
from veil.store import HttpModelReader

LR = "breast-cancer-lr"


@pytest.fixture(scope="module")
def net_stack(tmp_path_factory, models, secrets):
    from e2e_support import start_stack

    s = start_stack(tmp_path_factory.mktemp("veil-net-store"), models, secrets, serve_store=True)
    try:
        yield s
    finally:
        s.close()


def test_uploads_go_through_the_store_service_and_runtimes_read_it(net_stack):
    d = net_stack.deployment
    url = d.store_location
    assert url.startswith("http://127.0.0.1:")
    assert d.tee_spec.init_value["store"] == url
    # the owner's uploads (through the gateway) landed in the service, versioned
    reader = HttpModelReader(url)
    for model_id in net_stack.models:
        assert reader.versions(model_id) == [1]
    # the service keeps them in the deployment's directory, and the token is not world-readable
    assert (d.store_dir / "models" / LR / "v1.veilm").is_file()
    assert (d.cloud / "store-token").stat().st_mode & 0o077 == 0
    # and a user's inference is served by runtimes reading the store over HTTP
    model = net_stack.models[LR]
    out = net_stack.infer(net_stack.user, LR, model.x_test[:4])
    assert_matches_reference(model, model.x_test[:4], out)
    # nobody without the token can write to it
    r = httpx.delete(f"{url}/v1/models/{LR}/versions/1", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


def _join(root_file: Path, target: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "veil.cli", "cluster", "join", str(root_file), "--to", str(target), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_second_node_joins_and_serves_from_the_network_store(net_stack, tmp_path):
    d = net_stack.deployment
    node = tmp_path / "node-b"
    # the operator copied the head's root file; join checks it against the KeyService and installs it
    copied = tmp_path / "copied-sim-root.key"
    copied.write_bytes((d.keyservice_dir / "sim-root.key").read_bytes())
    done = _join(copied, node / "sim-root.key", "--keyservice", net_stack.info.keyservice_url)
    assert done.returncode == 0, done.stderr
    assert "runs under it" in done.stdout and f"VEIL_SIM_ROOT={node / 'sim-root.key'}" in done.stdout
    installed = node / "sim-root.key"
    assert installed.stat().st_mode & 0o777 == 0o600
    assert SimRoot.load(installed).id == SimRoot.load(d.keyservice_dir / "sim-root.key").id

    # a runtime on "node b": only URLs and its own root file
    port = free_port()
    log = tmp_path / "node-b.log"
    env = python_env(VEIL_PORT=str(port), VEIL_SIM_ROOT=str(installed), VEIL_HOST="127.0.0.1")
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "veil.runtime"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

        def up() -> bool:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                return http.get("/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(up, 60)
        init = {"kind": "tee", "keyservice_url": net_stack.info.keyservice_url, "store": d.store_location}
        r = http.post("/init", json={"value": init})
        assert r.status_code == 200, r.text
        from veil.crypto.envelope import Envelope, open_envelope
        from veil.runtime import tensors

        model = net_stack.models[LR]
        x = model.x_test[:3]
        net_stack.secrets.tensors(f"input {LR}", {"input": x})
        rid, envelope = net_stack.user.sealed_request(LR, {"input": x})
        r = http.post("/run", json={"value": {"envelope": envelope}})
        assert r.status_code == 200 and "error" not in r.json(), r.text
        key = net_stack.user.request_keys[LR]
        plain = open_envelope(
            key,
            Envelope.from_json(r.json()["envelope"]),
            model=LR,
            user=net_stack.user.id,
            direction="response",
            request_id=rid,
        )
        out = tensors.decode(plain)
        net_stack.secrets.tensors(f"output {LR}", out)
        assert_matches_reference(model, x, out)
        http.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_join_refuses_a_root_the_keyservice_does_not_run_under(net_stack, tmp_path):
    stranger = tmp_path / "other-root.key"
    SimRoot.load_or_create(stranger)
    done = _join(stranger, tmp_path / "node" / "sim-root.key", "--keyservice", net_stack.info.keyservice_url)
    assert done.returncode != 0 and "does not run under this root" in done.stderr
    assert not (tmp_path / "node" / "sim-root.key").exists()
    # and a different root already installed is not silently replaced
    target = tmp_path / "installed.key"
    SimRoot.load_or_create(target)
    done = _join(net_stack.deployment.keyservice_dir / "sim-root.key", target)
    assert done.returncode != 0 and "holds another root" in done.stderr and "--force" in done.stderr
    assert _join(net_stack.deployment.keyservice_dir / "sim-root.key", target, "--force").returncode == 0
