"""Field checks and ids shared by envelopes, stores and HE requests, with no cryptography
library behind them: an HE instance or a store reader validates names without loading it."""

from __future__ import annotations

import os
import re

from veil.crypto.errors import MalformedError

_IDENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def new_request_id() -> str:
    """128 random bits as 32 hex characters."""
    return os.urandom(16).hex()


def check_identifier(value: object, field: str) -> str:
    """Model and principal ids: 1-128 characters of [A-Za-z0-9._:-], starting alphanumeric."""
    if not isinstance(value, str) or not _IDENT.match(value):
        raise MalformedError(field, "must be 1-128 characters of A-Z a-z 0-9 . _ : - ")
    return value
