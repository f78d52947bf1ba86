"""Shared HE fixtures: the two reference tasks compiled once per session, a model store with both
published, and a mini gateway (real HTTP, stdlib server) that forwards to HEAction like Veil's."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from veil.he import store
from veil.he.action import HEAction
from veil.he.client import ActionTransport, HEClient, RemoteModel
from veil.he.compile import compile_model
from veil.he.errors import HEError
from veil.he.tasks import breast_cancer_lr, digits_mlp


@pytest.fixture(scope="session")
def lr_task():
    return breast_cancer_lr()


@pytest.fixture(scope="session")
def mlp_task():
    return digits_mlp()


@pytest.fixture(scope="session")
def cnn_task():
    from veil.he.tasks import digits_cnn

    return digits_cnn()


@pytest.fixture(scope="session")
def cnn_compiled(cnn_task):
    return compile_model(cnn_task.model, cnn_task.x_train, name="cnn", verify_samples=8)


@pytest.fixture(scope="session")
def lr_compiled(lr_task):
    return compile_model(lr_task.model, lr_task.x_train, name="lr")


@pytest.fixture(scope="session")
def mlp_compiled(mlp_task):
    return compile_model(mlp_task.model, mlp_task.x_train, name="mlp")


@pytest.fixture(scope="session")
def he_store(tmp_path_factory, lr_compiled, mlp_compiled) -> Path:
    root = tmp_path_factory.mktemp("store")
    store.publish(root, "lr", lr_compiled)
    store.publish(root, "mlp", mlp_compiled)
    return root


@pytest.fixture(scope="session")
def action(he_store) -> HEAction:
    return HEAction({"kind": "he", "store": str(he_store)})


@pytest.fixture(scope="session")
def lr_client(he_store) -> HEClient:
    return HEClient(store.client_spec(he_store, "lr"))


@pytest.fixture(scope="session")
def mlp_client(he_store) -> HEClient:
    return HEClient(store.client_spec(he_store, "mlp"))


@pytest.fixture(scope="session")
def lr_remote(lr_client, action) -> RemoteModel:
    remote = RemoteModel(lr_client, ActionTransport(action), "lr")
    remote.upload_keys()
    return remote


@pytest.fixture(scope="session")
def mlp_remote(mlp_client, action) -> RemoteModel:
    remote = RemoteModel(mlp_client, ActionTransport(action), "mlp")
    remote.upload_keys()
    return remote


class _Gateway(BaseHTTPRequestHandler):
    """The two HE routes of the gateway contract, forwarding to an HEAction."""

    action: HEAction

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        try:
            if self.path == "/v1/he/keys":
                out, status = self.action.run({"op": "upload_keys", **body}), 200
            elif self.path.startswith("/v1/he/models/") and self.path.endswith(":infer"):
                model = self.path[len("/v1/he/models/") : -len(":infer")]
                out, status = self.action.run({"op": "infer", "model": model, **body}), 200
            else:
                out, status = {"error": {"code": "not_found", "message": self.path}}, 404
        except HEError as exc:
            out, status = exc.to_dict(), exc.status
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="session")
def gateway_url(action):
    handler = type("Gateway", (_Gateway,), {"action": action})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
