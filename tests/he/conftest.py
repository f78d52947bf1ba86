"""Shared HE fixtures: the reference tasks compiled once per session, a developer model store with
both published and an in-process `HEAction` on it (the code an instance runs, for the HE-models
tests), and `he_stack`: a real deployment (`LocalDeployment`: KeyService, gateway, packer, local
platform, runtime subprocesses) serving them in HE and hybrid mode to a granted user."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from veil.deployment import LocalDeployment, StackOptions
from veil.he import store
from veil.he.action import HEAction
from veil.he.client import ActionTransport, HEClient, RemoteModel
from veil.he.compile import compile_model
from veil.he.tasks import breast_cancer_lr, digits_mlp
from veil.sdk import ModelOwner, ModelUser


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


@dataclass
class HEStack:
    """A real deployment (KeyService, gateway, packer, local platform, runtime subprocesses) with
    HE models published by their owner through the gateway, and a granted user."""

    deployment: LocalDeployment
    info: Any
    owner: ModelOwner
    user: ModelUser
    trust: Any
    tasks: dict[str, Any]
    compiled: dict[str, Any]

    def new_user(self, *, grant: tuple[str, ...] = (), key_dir: Path | None = None) -> ModelUser:
        u = ModelUser(self.info, trust=self.trust, timeout=120.0, key_dir=key_dir)
        u.register()
        for model in grant:
            self.owner.grant(model, u.id)
        return u


HE_MODELS = {"lr": "he", "mlp": "he", "lr-hybrid": "hybrid", "mlp-hybrid": "hybrid"}


@pytest.fixture(scope="session")
def he_stack(tmp_path_factory, lr_task, mlp_task, lr_compiled, mlp_compiled) -> Iterator[HEStack]:
    """Four instances at most per function, two request threads each: HE requests go through the
    real gateway, the packer, the local platform and `python -m veil.runtime` processes."""
    root = tmp_path_factory.mktemp("veil-he")
    # 1 GB per instance: the 64-32-16-10 MLP's keys take ~200 MB once loaded (see he-serving.md)
    deployment = LocalDeployment(root, StackOptions(max_instances=4, concurrency=2, he=True, memory_mb=1024))
    info = deployment.start()
    try:
        trust = deployment.local_trust_anchors()
        owner = ModelOwner(info, trust=trust, timeout=120.0)
        owner.register()
        compiled = {"lr": lr_compiled, "mlp": mlp_compiled}
        for name, mode in HE_MODELS.items():
            owner.publish(name, compiled[name.split("-")[0]], mode=mode)
        user = ModelUser(info, trust=trust, timeout=120.0, key_dir=root / "client" / "he-keys")
        user.register()
        for name, mode in HE_MODELS.items():
            owner.grant(name, user.id)
            if mode == "hybrid":
                user.request_access(name)
        tasks = {"lr": lr_task, "mlp": mlp_task}
        yield HEStack(deployment, info, owner, user, trust, tasks, compiled)
    finally:
        deployment.stop()


@pytest.fixture(scope="session")
def gateway_url(he_stack) -> str:
    return he_stack.info.gateway_url
