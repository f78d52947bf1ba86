"""Measurement of Veil's trusted components in the simulated TEE.

Real TEEs measure the loaded code in hardware (MRENCLAVE, MRTD, MEASUREMENT). The simulated TEE
stands in with SHA-256 over the component's source files (relative path and bytes, in sorted
order) and the installed versions of its pinned dependencies, so any change of code or of a
dependency version yields a different measurement and is refused keys.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

import veil

# Files and packages (relative to the `veil` package) that make up each trusted component.
COMPONENTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "runtime": (
        (
            "__init__.py",
            "errors.py",
            "store.py",
            "crypto",
            "attest",
            "runtime",
            "keyservice/client.py",
            "keyservice/wire.py",
            "he",
        ),
        ("cryptography", "pyhpke", "numpy", "onnxruntime", "httpx"),
    ),
    "keyservice": (
        ("__init__.py", "errors.py", "http.py", "crypto", "attest", "keyservice"),
        ("cryptography", "pyhpke", "fastapi", "uvicorn", "dcap-qvl"),
    ),
}


def _files(root: Path, entries: tuple[str, ...]) -> list[Path]:
    found: list[Path] = []
    for entry in entries:
        path = root / entry
        if path.is_dir():
            found.extend(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
        elif path.is_file():
            found.append(path)
    return sorted(set(found), key=lambda p: p.relative_to(root).as_posix())


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def measure(component: str = "runtime", package_root: Path | None = None) -> str:
    """Hex SHA-256 measurement of `component` as found under `package_root` (default: installed)."""
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {sorted(COMPONENTS)}")
    root = package_root or Path(veil.__file__).parent
    entries, deps = COMPONENTS[component]
    h = hashlib.sha256(f"veil-measurement-v1\0{component}\0".encode())
    for path in _files(root, entries):
        rel = path.relative_to(root).as_posix().encode()
        data = path.read_bytes()
        h.update(len(rel).to_bytes(4, "big") + rel + len(data).to_bytes(8, "big") + data)
    for dist in deps:
        h.update(f"{dist}=={_version(dist)}\0".encode())
    return h.hexdigest()
