"""`veil measure`: stable across runs, different when one byte of the runtime's code changes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import veil
from veil.attest.measurement import measure


def test_measure_cli_is_stable_across_processes(veil_cli) -> None:
    runs = {subprocess.run([*veil_cli, "measure"], capture_output=True, text=True, check=True).stdout for _ in range(2)}
    assert len(runs) == 1
    (out,) = runs
    assert len(out.strip()) == 64 and all(c in "0123456789abcdef" for c in out.strip())


def test_one_changed_byte_changes_the_measurement(tmp_path: Path) -> None:
    copy = tmp_path / "veil"
    shutil.copytree(Path(veil.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = {c: measure(c, package_root=copy) for c in ("runtime", "keyservice")}
    assert before == {c: measure(c, package_root=copy) for c in ("runtime", "keyservice")}
    target = copy / "crypto" / "aead.py"
    data = bytearray(target.read_bytes())
    data[-2] ^= 0x01
    target.write_bytes(bytes(data))
    after = {c: measure(c, package_root=copy) for c in ("runtime", "keyservice")}
    assert after["runtime"] != before["runtime"] and after["keyservice"] != before["keyservice"]
    # A file outside a component does not change it: the keyservice ignores the runtime package.
    runtime_file = next((copy / "runtime").glob("*.py"))
    runtime_file.write_bytes(runtime_file.read_bytes() + b"\n")
    assert measure("keyservice", package_root=copy) == after["keyservice"]
    assert measure("runtime", package_root=copy) != after["runtime"]
