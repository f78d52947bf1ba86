"""The kinds of blob a model store keeps, told apart by their first bytes (shared by the HE code,
the KeyService, the gateway and `veil store serve`; a leaf: it imports only the sealed-file header
parser).

- a sealed model (`veil.crypto.chunked`): TEE models and hybrid HE models, under (model, version);
- an HE model blob (`veil.he.bundle`, magic `VEILHEM1`): HE-mode models, weights in clear;
- an evaluation-key record (`veil.he.keys`, magic `VEILHKR1`): a user's HE evaluation keys,
  stored as model id `hek.<key id>` version 1, where the key id is the SHA-256 of the record.
"""

from __future__ import annotations

import io

HE_MODEL_MAGIC = b"VEILHEM1"
HE_KEYS_MAGIC = b"VEILHKR1"
KEY_PREFIX = "hek."  # model ids the KeyService refuses: they name evaluation-key records


def kind_of(head: bytes, model: str, version: int) -> str:
    """ "sealed", "he_model" or "he_keys" for a blob starting with `head` stored as (model,
    version); ValueError saying why it may not be stored there."""
    if model.startswith(KEY_PREFIX):
        if not head.startswith(HE_KEYS_MAGIC) or version != 1:
            raise ValueError(f"{KEY_PREFIX}* ids hold evaluation-key records (version 1) only")
        return "he_keys"
    if head.startswith(HE_KEYS_MAGIC):
        raise ValueError(f"an evaluation-key record belongs under {KEY_PREFIX}<its SHA-256>")
    if head.startswith(HE_MODEL_MAGIC):
        return "he_model"
    from veil.crypto import chunked
    from veil.crypto.errors import CryptoError

    try:
        header = chunked.read_header(io.BytesIO(head))
    except CryptoError as exc:
        raise ValueError(f"not a Veil sealed model, HE model or evaluation-key record ({exc})") from None
    if header.get("model") != model or header.get("version") != version:
        raise ValueError(f"sealed for {header.get('model')!r} v{header.get('version')}, not {model!r} v{version}")
    return "sealed"
