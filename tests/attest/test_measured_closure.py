"""The simulated TEE's measurement is exactly the import closure of each component.

Unit level: the import scanner finds what `ast` finds, the closure holds the HE server side but
no dev or client module, the distribution map agrees with `packages_distributions()`, and edits
change the measurement exactly when they touch measured code. tests/e2e/
test_runtime_loaded_modules.py checks the closure against what a real runtime process loads.
"""

from __future__ import annotations

import ast
import shutil
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

import veil
from veil.attest import measurement
from veil.attest.measurement import closure, imports, measure

VEIL = Path(veil.__file__).parent
REPO = VEIL.parents[1]

# Modules no trusted component may contain: the owner's and user's tools, the untrusted cloud
# side, and HE's dev and client code (the runtime only evaluates).
DEV_MODULES = (
    "veil.cli",
    "veil.sdk",
    "veil.gateway",
    "veil.platform",
    "veil.packer",
    "veil.console",
    "veil.deployment",
    "veil.demo_models",
    "veil.he.compile",
    "veil.he.compiler",
    "veil.he.fusion",
    "veil.he.approx",
    "veil.he.bounds",
    "veil.he.train",
    "veil.he.tasks",
    "veil.he.demo",
    "veil.he.client",
    "veil.store.client",
    "veil.store.server",
    "veil.store.s3",
)
# the reader side of the model store: what a runtime reads sealed models with (a directory or HTTP)
STORE_READER = ("veil.store", "veil.store.base", "veil.store.local", "veil.store.remote")
HE_SERVER = ("veil.he.action", "veil.he.server", "veil.he.seal_backend", "veil.he.store", "veil.he.compiled")


def is_dev(module: str, extra: tuple[str, ...] = ()) -> bool:
    """Is `module` one of DEV_MODULES (or `extra`), or inside one of those packages?"""
    return any(module == d or module.startswith(d + ".") for d in (*DEV_MODULES, *extra))


def _ast_imports(source: str) -> list[tuple[str, int, tuple[str, ...]]]:
    found: list[tuple[str, int, tuple[str, ...]]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((alias.name, 0, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level, tuple(alias.name for alias in node.names)))
    return sorted(found)


def _sources() -> list[Path]:
    """Veil's own files, the tests and benchmarks, and the stdlib's top-level modules (a corpus
    with every import form: parenthesised, continued, relative, inside strings and comments)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    mine = [p for d in (VEIL, REPO / "tests", REPO / "bench") for p in d.rglob("*.py")]
    return mine + sorted(stdlib.glob("*.py"))


def test_scanner_finds_exactly_what_ast_finds() -> None:
    checked = 0
    for path in _sources():
        source = path.read_text(encoding="utf-8", errors="replace")
        try:
            want = _ast_imports(source)
        except SyntaxError:
            continue
        assert sorted(imports(source)) == want, path
        checked += 1
    assert checked > 200


def test_scanner_ignores_imports_in_strings_and_comments() -> None:
    source = '''
"""Docstring.

import not_a_module
from nowhere import nothing
"""
x = "import fake"  # import also_fake
y = r\'\'\'
    from fake import it\'\'\'
def f():
    from . import sibling  # noqa
    import real.one as r, real_two
from .pkg import (a as b,  # a comment (with parentheses)
    c)
from x \\
    import y
'''
    assert sorted(imports(source)) == sorted(
        [("", 1, ("sibling",)), ("real.one", 0, ()), ("real_two", 0, ()), ("pkg", 1, ("a", "c")), ("x", 0, ("y",))]
    )


def test_runtime_closure_is_the_server_side_only() -> None:
    c = closure("runtime")
    for module in c.modules:
        assert not is_dev(module), f"{module} is dev-side but in the runtime's measurement"
    # the lazily imported actions and their imports are in
    for module in ("veil.runtime.__main__", "veil.runtime.tee_action", "veil.runtime.core", *HE_SERVER, *STORE_READER):
        assert module in c.modules, module
    # package __init__s on the way count: importing veil.keyservice.client runs them
    for init in ("__init__.py", "keyservice/__init__.py", "he/__init__.py", "runtime/__init__.py"):
        assert init in c.files, init
    assert "tenseal" in c.distributions and "onnxruntime" in c.distributions
    # nothing of the HE compiler's or the benchmark's dependencies
    assert not {"onnx", "scikit-learn", "skl2onnx", "matplotlib", "fastapi", "click", "pytest"} & c.distributions.keys()
    # nor the store's server and S3 adapter, nor httpx (cold-start time)
    assert not {"boto3", "botocore", "uvicorn", "httpx"} & c.distributions.keys()
    # transitive requirements count (onnxruntime -> protobuf; cryptography -> cffi -> pycparser)
    assert {"protobuf", "cffi", "pycparser"} <= c.distributions.keys()
    # every measured file is a module of the closure, and nothing else is measured
    assert len(c.files) == len(c.modules)


def test_keyservice_closure() -> None:
    c = closure("keyservice")
    for module in c.modules:
        assert not is_dev(module, ("veil.runtime", "veil.he")), module
    for module in ("veil.keyservice.server", "veil.keyservice.api", "veil.keyservice.service", "veil.http"):
        assert module in c.modules, module
    # uvicorn picks uvloop and httptools whenever they are installed: they count
    assert {"fastapi", "uvicorn", "starlette", "pydantic"} <= c.distributions.keys()
    for auto in ("uvloop", "httptools"):
        if auto in measurement._Distributions().by_name:
            assert auto in c.distributions


def test_dynamic_imports_mirror_the_verifier_table() -> None:
    """`veil.attest.verify` imports its real verifiers by name; the measurement must know them."""
    from veil.attest import verify

    targets = {target.split(":")[0] for target in verify._REAL_VERIFIERS.values()}
    assert targets == set(measurement.DYNAMIC_IMPORTS["veil.attest.verify"])
    assert targets <= closure("runtime").modules


def test_distribution_owners_agree_with_packages_distributions() -> None:
    c_ext = set()
    for component in measurement.ENTRIES:
        c_ext |= measurement._veil_closure(VEIL, measurement.ENTRIES[component])[2]
    dists = measurement._Distributions()
    ours = dists.owners(c_ext | {"_distutils_hack"})
    reference = metadata.packages_distributions()
    for top in c_ext:
        want = {measurement._normalize(d) for d in reference.get(top, [])}
        assert want <= ours.get(top, set()), top


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    target = tmp_path / "veil"
    shutil.copytree(VEIL, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def _append(path: Path, text: str = "\n# changed\n") -> None:
    path.write_bytes(path.read_bytes() + text.encode())


@pytest.mark.parametrize(
    "outside",
    ["he/demo.py", "he/compiler.py", "he/train.py", "he/tasks.py", "he/client.py", "cli/demo.py", "sdk.py"],
)
def test_editing_code_outside_the_closure_keeps_the_measurement(copy: Path, outside: str) -> None:
    before = measure("runtime", package_root=copy)
    _append(copy / outside, '\nDEMO = "a different demo string"\n')
    assert measure("runtime", package_root=copy) == before


@pytest.mark.parametrize(
    "inside",
    ["runtime/core.py", "keyservice/__init__.py", "he/seal_backend.py", "attest/dcap.py", "__init__.py"],
)
def test_editing_code_inside_the_closure_changes_the_measurement(copy: Path, inside: str) -> None:
    before = measure("runtime", package_root=copy)
    _append(copy / inside)
    assert measure("runtime", package_root=copy) != before


def test_a_new_lazy_import_brings_its_module_into_the_closure(copy: Path) -> None:
    """Importing a dev module from the server side, even inside a function, measures it."""
    assert "he/train.py" not in closure("runtime", copy).files
    _append(copy / "he" / "action.py", "\n\ndef _oops():\n    from veil.he.train import PolyMLP  # noqa\n")
    assert "he/train.py" in closure("runtime", copy).files


def test_unknown_component_is_refused() -> None:
    with pytest.raises(ValueError, match="component must be one of"):
        measure("gateway")


def test_cli_lists_the_closure(veil_cli) -> None:
    import subprocess

    out = subprocess.run([*veil_cli, "measure", "--list"], capture_output=True, text=True, check=True).stdout
    assert "runtime/core.py" in out and "onnxruntime==" in out
    assert "he/compiler.py" not in out
    assert out.splitlines()[0] == measure("runtime")
