"""What the gateway calls to get a request served: a packer, or the platform directly."""

from __future__ import annotations

from typing import Any, Protocol


class Router(Protocol):
    def invoke(self, model: str, value: dict[str, Any], *, timeout: float = 60.0) -> dict[str, Any]: ...


class DirectRouter:
    """All models on one platform function (the platform's own OpenWhisk-style scheduling)."""

    def __init__(self, platform: Any, function: str) -> None:
        self.platform = platform
        self.function = function

    def invoke(self, model: str, value: dict[str, Any], *, timeout: float = 60.0) -> dict[str, Any]:
        return self.platform.invoke(self.function, value, timeout=timeout)

    def close(self) -> None:
        return None
