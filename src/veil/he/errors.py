"""The one exception type HE mode raises across its boundaries.

The runtime action server turns it into `{"error": {"code", "message"}}` with `status` as the
HTTP status, so every failure a caller can cause (bad bytes, wrong key, wrong model) is a clear,
typed answer instead of a crashed instance.
"""

from __future__ import annotations


class HEError(Exception):
    """A failed HE operation with a stable machine-readable `code` and an HTTP `status`."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status

    def to_dict(self) -> dict[str, dict[str, str]]:
        """The JSON error body of the action protocol."""
        return {"error": {"code": self.code, "message": self.message}}


class PlanError(HEError):
    """The model cannot be compiled to an HE plan (unsupported layer, activation, shape)."""

    def __init__(self, message: str) -> None:
        super().__init__("unsupported_model", message, 400)


class InsecureParametersError(HEError):
    """The requested CKKS parameters are not 128-bit secure; they are refused, never used."""

    def __init__(self, message: str) -> None:
        super().__init__("insecure_parameters", message, 400)
