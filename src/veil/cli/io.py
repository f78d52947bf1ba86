"""Reading a user's input files and writing predictions, for `veil user infer`.

Inputs: CSV (with or without a header row; a header names the columns, which are then ignored),
`.npy` (one array), `.npz` (named arrays, one per model input) and JSON (a list of rows, or a
mapping of input names to nested lists for multi-input models). Values are cast to the dtypes the
verified model card gives, so an int64 input (MiniLM's `input_ids`) is fed as int64; without a
card, floats become float32. Outputs: JSON (stdout or `.json`), CSV (one row per sample, a
column per output value) or `.npz`.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from veil.wire.cards import ModelCard

INPUT_SUFFIXES = (".csv", ".txt", ".npy", ".npz", ".json")


class InputError(ValueError):
    """A bad input file: the message names the file, and the row or field at fault."""


def _csv_rows(path: Path) -> np.ndarray:
    text = path.read_text()
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    if not rows:
        raise InputError(f"{path}: no rows")
    try:
        [float(c) for c in rows[0]]
    except ValueError:
        rows = rows[1:]  # a header row: column names
        if not rows:
            raise InputError(f"{path}: a header but no data rows") from None
    width = len(rows[0])
    for i, row in enumerate(rows, start=1):
        if len(row) != width:
            raise InputError(f"{path}: row {i} has {len(row)} values, the first row has {width}")
    try:
        return np.array([[float(c) for c in row] for row in rows], dtype=np.float64)
    except ValueError as exc:
        raise InputError(f"{path}: not a number ({exc})") from None


def load_inputs(path: Path, card: ModelCard | None, input_name: str | None) -> np.ndarray | dict[str, np.ndarray]:
    """The arrays in `path`, named and typed after the card where it says how."""
    suffix = path.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise InputError(f"{path}: input must be one of {', '.join(INPUT_SUFFIXES)}")
    try:
        if suffix in (".csv", ".txt"):
            raw: Any = _csv_rows(path)
        elif suffix == ".npy":
            raw = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                raw = {name: archive[name] for name in archive.files}
        else:
            loaded = json.loads(path.read_text())
            raw = {k: np.asarray(v) for k, v in loaded.items()} if isinstance(loaded, dict) else np.asarray(loaded)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
    if isinstance(raw, dict):
        return {name: _typed(arr, _dtype(card, name)) for name, arr in raw.items()}
    name = input_name or (card.inputs[0].name if card is not None and len(card.inputs) == 1 else None)
    if name is None and card is not None and len(card.inputs) > 1:
        names = ", ".join(t.name for t in card.inputs)
        raise InputError(f"{path}: the model has several inputs ({names}); give a .npz or a JSON mapping of them")
    arr = np.atleast_2d(raw) if suffix in (".csv", ".txt") else raw
    typed = _typed(arr, _dtype(card, name))
    return {name: typed} if name is not None else typed


def _dtype(card: ModelCard | None, name: str | None) -> str | None:
    if card is None:
        return None
    return next((t.dtype for t in card.inputs if t.name == name), None)


def _typed(arr: np.ndarray, dtype: str | None) -> np.ndarray:
    if dtype is not None:
        to_int = np.issubdtype(np.dtype(dtype), np.integer) and np.issubdtype(arr.dtype, np.floating)
        if to_int and (not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr))):
            raise InputError(f"values must be whole numbers for a {dtype} input")
        return arr.astype(dtype)
    return arr.astype(np.float32) if arr.dtype == np.float64 else arr


def write_outputs(outputs: dict[str, np.ndarray], target: Path | None) -> str | None:
    """Write to `target` (by suffix: .json, .csv, .npz); None means return JSON text for stdout."""
    if target is None or target.suffix.lower() == ".json":
        text = json.dumps({k: v.tolist() for k, v in outputs.items()})
        if target is None:
            return text
        target.write_text(text + "\n")
        return None
    suffix = target.suffix.lower()
    if suffix == ".npz":
        np.savez(target, **outputs)
        return None
    if suffix == ".csv":
        _write_csv(outputs, target)
        return None
    raise InputError(f"{target}: output must be .json, .csv or .npz")


def _write_csv(outputs: dict[str, np.ndarray], target: Path) -> None:
    """One row per sample, one column per output value (`label`, `probabilities_0`, ...), when
    every output has one row per sample; otherwise one file per output."""
    rows = {arr.shape[0] if arr.ndim else None for arr in outputs.values()}
    if len(rows) == 1 and None not in rows:
        columns, header = [], []
        for name, arr in outputs.items():
            flat = arr.reshape(arr.shape[0], -1)
            columns.append(flat)
            header += [name] if flat.shape[1] == 1 else [f"{name}_{i}" for i in range(flat.shape[1])]
        table = np.concatenate([c.astype(np.float64) for c in columns], axis=1)
        np.savetxt(target, table, delimiter=",", fmt="%.9g", header=",".join(header), comments="")
        return
    for name, arr in outputs.items():
        out = target.with_name(f"{target.stem}.{name}.csv")
        np.savetxt(out, np.atleast_2d(arr), delimiter=",", fmt="%.9g", header=name, comments="")
