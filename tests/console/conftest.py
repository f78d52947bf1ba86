"""Fixtures of the console tests: a real embedded deployment, client directories written by the
real CLI, `veil console` processes for an owner and a user, and Debian's Chromium under Playwright.

Playwright's own browser download is not reachable here, so the browser is the `chromium`
package's (`apt-get install -y chromium`), launched through `executable_path`. Without it, or
without the `playwright` package, the browser tests skip and say which is missing; the tests of
the console's HTTP defences still run.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from console_support import Console, Deployed, chromium_path, start_console, veil


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    """`veil up`'s embedded deployment (in-process), then `veil trust init` and `veil owner init`
    / `veil user init` for an owner and a user, each in its own client directory."""
    from veil.deployment import LocalDeployment, StackOptions

    root = tmp_path_factory.mktemp("console-deployment")
    deployment = LocalDeployment(root, StackOptions(he=False, gateway_port=0, keyservice_port=0, max_instances=1))
    deployment.start()
    try:
        deployment_json = root / "deployment.json"
        sim_root = str(deployment.keyservice_dir / "sim-root.key")
        owner_dir, user_dir = root / "owner-client", root / "user-client"
        with ThreadPoolExecutor(2) as pool:
            for d in pool.map(
                lambda d: veil("trust", "init", "--allow-simulated", "--sim-root", sim_root, "--client-dir", str(d)),
                (owner_dir, user_dir),
            ):
                assert "trust anchors written" in d
            owner_id, user_id = pool.map(
                lambda pair: veil(pair[0], "init", "--client-dir", str(pair[1]), "--deployment", str(deployment_json)),
                (("owner", owner_dir), ("user", user_dir)),
            )
        yield Deployed(root, deployment_json, owner_dir, user_dir, owner_id.splitlines()[-1], user_id.splitlines()[-1])
    finally:
        deployment.stop()


@pytest.fixture(scope="module")
def owner_console(deployed: Deployed) -> Iterator[Console]:
    """`veil console` on the owner's client directory (a real process), stopped at module end."""
    console = start_console(deployed.owner_dir, deployed.deployment_json)
    try:
        yield console
    finally:
        console.stop()


@pytest.fixture(scope="module")
def user_console(deployed: Deployed) -> Iterator[Console]:
    """`veil console` on the user's client directory."""
    console = start_console(deployed.user_dir, deployed.deployment_json)
    try:
        yield console
    finally:
        console.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Debian Chromium under Playwright; skips (saying which is missing) without either."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]' pins it)"
    )
    executable = chromium_path()
    if executable is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"], timeout=30_000)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def iris_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[float]]]:
    """A small scikit-learn model converted the usual way (input `float_input`), and two rows."""
    import numpy as np
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=500).fit(x.astype(np.float32), y)
    onnx = convert_sklearn(
        model, initial_types=[("float_input", FloatTensorType([None, 4]))], options={"zipmap": False}
    ).SerializeToString()
    path = tmp_path_factory.mktemp("model") / "iris.onnx"
    path.write_bytes(onnx)
    return path, x[:2].tolist()
