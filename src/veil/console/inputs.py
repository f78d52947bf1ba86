"""Inputs typed on the page, read like `veil user infer --input rows.json`.

JSON: a list of rows (or one row) for a single-input model, or a mapping of input names for a
multi-input one. Names, dtypes and the single input's name come from the verified model card,
with the CLI's own casting rule (`veil.cli.io`), so the page and the CLI accept the same text.
"""

from __future__ import annotations

import json

import numpy as np

from veil.cli.io import InputError, _typed
from veil.wire.cards import ModelCard

MAX_INPUT_CHARS = 4 << 20


def _dtype(card: ModelCard | None, name: str | None) -> str | None:
    if card is None or name is None:
        return None
    return next((t.dtype for t in card.inputs if t.name == name), None)


def parse_inputs(text: str, card: ModelCard | None) -> dict[str, np.ndarray]:
    """Named, typed arrays; InputError says what is wrong with the text."""
    if len(text) > MAX_INPUT_CHARS:
        raise InputError(f"inputs: more than {MAX_INPUT_CHARS} characters")
    try:
        loaded = json.loads(text)
    except ValueError as exc:
        raise InputError(f"inputs: not JSON ({exc})") from None
    try:
        if isinstance(loaded, dict):
            return {str(k): _typed(np.asarray(v), _dtype(card, str(k))) for k, v in loaded.items()}
        if card is not None and len(card.inputs) > 1:
            names = ", ".join(t.name for t in card.inputs)
            raise InputError(f"inputs: the model has several inputs ({names}); give a JSON mapping of them")
        name = card.inputs[0].name if card is not None and card.inputs else "input"
        return {name: _typed(np.atleast_2d(np.asarray(loaded)), _dtype(card, name))}
    except (ValueError, TypeError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"inputs: not an array of numbers ({exc})") from None
