"""Spreading one throughput-mode HE batch over several instances, and putting it back together.

A throughput-packed request is a sequence of groups, each `features` ciphertexts holding up to
`group` samples (one per slot pair); groups are independent, so a batch of several groups can
run on several instances at once. `split` cuts a request into contiguous runs of whole groups,
`merge` concatenates the parts' result ciphertexts in order. `Spreader` sends each part to its own
ready instance when the platform lets the caller place requests (the local platform); parts
beyond the ready instances, and every part on a model-routing platform such as Ray Serve, go
through the router under their own routing keys, so its policy places (and scales for) them. A
failed part is retried once, routed anew.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("veil.gateway.he_split")


def part_count(value: dict[str, Any], group: int, instances: int) -> int:
    """How many parts to cut `value` into: one per instance, never more than its groups."""
    if value.get("packing") != "throughput" or group < 1 or instances < 2:
        return 1
    features, cts = value.get("features"), value.get("ciphertexts")
    if type(features) is not int or features < 1 or not isinstance(cts, list) or len(cts) % features:
        return 1  # malformed: let the instance refuse it with its own message
    return max(1, min(instances, len(cts) // features))


def split(value: dict[str, Any], group: int, parts: int) -> list[dict[str, Any]]:
    """`parts` requests of contiguous whole groups (earlier parts take the extra group)."""
    features, cts, batch = value["features"], value["ciphertexts"], value.get("batch")
    groups = len(cts) // features
    if type(batch) is not int or batch < 1 or groups != -(-batch // group):  # integers: any size is safe
        return [value]  # inconsistent: the instance refuses it with its own message
    base, extra = divmod(groups, parts)
    out, start = [], 0
    for i in range(parts):
        n = base + (1 if i < extra else 0)
        samples = min(batch, (start + n) * group) - start * group
        out.append(
            {**value, "batch": samples, "ciphertexts": cts[start * features : (start + n) * features], "part": i}
        )
        start += n
    return out


def merge(original: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """One response from the parts' responses, ciphertexts in the original order."""
    first = results[0]
    return {
        **first,
        "batch": original["batch"],
        "ciphertexts": [c for r in results for c in r.get("ciphertexts", [])],
        "eval_ms": round(max(float(r.get("eval_ms", 0.0)) for r in results), 3),
        "parts": len(results),
    }


class Spreader:
    """Runs split parts concurrently, one instance each where the platform allows it."""

    def __init__(self, platform: Any, function: str, invoke: Callable[..., dict[str, Any]]) -> None:
        self.platform = platform
        self.function = function
        self.invoke = invoke  # (routing key, value, timeout) through the packer/router
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="veil-he-split")

    def placeable(self) -> bool:
        return (
            self.platform is not None
            and not getattr(self.platform, "routes_models", False)
            and all(hasattr(self.platform, m) for m in ("instances", "invoke_instance", "start_instance"))
        )

    def capacity(self) -> int:
        """How many instances a batch may spread over (the function's maximum)."""
        if self.platform is None:
            return 1
        try:
            return int(self.platform.spec(self.function).max_instances)
        except Exception:  # noqa: BLE001 - a platform without specs: no spreading
            return 1

    def _targets(self, parts: int) -> list[str]:
        """Up to `parts` ready instances, least busy first. None is started here: the packer owns
        scaling (an instance started behind its back would take a slot its policy counts on), so
        parts beyond the ready instances are routed through it and it scales as it decides."""
        ready = [i for i in self.platform.instances(self.function) if i.state == "ready"]
        ready.sort(key=lambda i: i.inflight)
        return [i.id for i in ready[:parts]]

    def run(self, key: str, parts: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
        targets = self._targets(len(parts)) if self.placeable() else []

        def one(i: int, part: dict[str, Any]) -> dict[str, Any]:
            try:
                if i < len(targets):
                    return self.platform.invoke_instance(self.function, targets[i], part, timeout=timeout)
                return self.invoke(key, part, timeout)
            except Exception as exc:  # noqa: BLE001 - one retry, routed anew, then the error stands
                if _is_refusal(exc):
                    raise
                log.info("split part %d failed (%s); retrying once", i, getattr(exc, "code", type(exc).__name__))
                return self.invoke(key, part, timeout)

        futures = [self._pool.submit(one, i, p) for i, p in enumerate(parts)]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def _is_refusal(exc: BaseException) -> bool:
    """An answer about the request itself (4xx): retrying elsewhere would answer the same."""
    status = getattr(exc, "status", 502)
    return isinstance(status, int) and 400 <= status < 500 and status != 429
