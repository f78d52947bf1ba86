"""HE models in Veil's model store: `<store>/he/<model_id>/`.

Publishing writes into a temporary sibling directory and renames it into place, so an instance
loading the model concurrently sees the old version or the new one, never half of each. In HE
mode the server needs the weights in plaintext (HE hides the inputs and outputs, not the
model); run the HE function inside the TEE runtime to keep the model sealed too.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from veil.he.compiled import CompiledModel
from veil.he.errors import HEError
from veil.he.wire import check_model_id

SUBDIR = "he"


def model_dir(store_dir: Path, model_id: str) -> Path:
    return Path(store_dir) / SUBDIR / check_model_id(model_id)


def publish(store_dir: Path, model_id: str, compiled: CompiledModel) -> Path:
    """Write `compiled` as model `model_id` (replacing an older version atomically)."""
    target = model_dir(store_dir, model_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    compiled.name = model_id
    staging = Path(tempfile.mkdtemp(prefix=f".{model_id}.", dir=target.parent))
    try:
        compiled.save(staging)
        if target.exists():
            old = target.with_name(f".{model_id}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load(store_dir: Path, model_id: str) -> CompiledModel:
    """The compiled model `model_id`; HEError("unknown_model", 404) when it is not published."""
    directory = model_dir(store_dir, model_id)
    if not (directory / "manifest.json").is_file():
        raise HEError("unknown_model", f"no HE model {model_id!r} in the store", 404)
    return CompiledModel.load(directory)


def client_spec(store_dir: Path, model_id: str) -> dict[str, Any]:
    """The public client spec of a published model (what `veil he keygen` needs)."""
    path = model_dir(store_dir, model_id) / "client.json"
    if not path.is_file():
        raise HEError("unknown_model", f"no HE model {model_id!r} in the store", 404)
    return json.loads(path.read_text())


def list_models(store_dir: Path) -> list[str]:
    root = Path(store_dir) / SUBDIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file())
