"""Splitting a throughput batch: whole groups per part, order kept, a failed part retried once.

`split`/`merge` are checked on their own (every cut of every batch size); `Spreader` against a
platform double whose instances fail on cue, to reach the retry paths deterministically (the
end-to-end split through real instances is tests/he/test_serving.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from veil.gateway.he_split import Spreader, merge, part_count, split
from veil.platform.errors import PlatformError


def _request(batch: int, group: int, features: int) -> dict:
    groups = math.ceil(batch / group)
    cts = [f"g{g}f{f}" for g in range(groups) for f in range(features)]
    return {"v": 1, "packing": "throughput", "batch": batch, "features": features, "ciphertexts": cts}


@pytest.mark.parametrize("batch", [1, 7, 8, 9, 16, 17, 40])
@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_split_keeps_whole_groups_in_order(batch, parts):
    group, features = 8, 3
    value = _request(batch, group, features)
    n = part_count(value, group, parts)
    assert n == min(parts, math.ceil(batch / group)) if parts > 1 else n == 1
    pieces = split(value, group, n)
    assert [c for p in pieces for c in p["ciphertexts"]] == value["ciphertexts"]
    assert sum(p["batch"] for p in pieces) == batch
    for p in pieces:
        assert len(p["ciphertexts"]) == features * math.ceil(p["batch"] / group)
    answers = [{"v": 1, "batch": p["batch"], "ciphertexts": p["ciphertexts"], "eval_ms": 1.0} for p in pieces]
    merged = merge(value, answers)
    assert merged["ciphertexts"] == value["ciphertexts"] and merged["batch"] == batch


def test_latency_and_malformed_batches_are_not_split():
    assert part_count({**_request(40, 8, 3), "packing": "latency"}, 8, 4) == 1
    assert part_count({**_request(40, 8, 3), "features": 0}, 8, 4) == 1
    assert part_count({**_request(40, 8, 3), "ciphertexts": ["x"] * 7}, 8, 4) == 1
    assert split({**_request(40, 8, 3), "batch": 9}, 8, 2)[0]["batch"] == 9  # groups disagree: as it came


@dataclass
class _Info:
    id: str
    state: str = "ready"
    inflight: int = 0


class _Platform:
    """Two ready instances; `fail` names those whose next call raises `error`."""

    routes_models = False

    def __init__(self, error: PlatformError) -> None:
        self.fail: set[str] = set()
        self.error = error
        self.calls: list[str] = []

    def instances(self, name):
        return [_Info("a"), _Info("b")]

    def invoke_instance(self, name, instance_id, value, *, timeout):
        self.calls.append(instance_id)
        if instance_id in self.fail:
            self.fail.discard(instance_id)
            raise self.error
        return {"v": 1, "batch": value["batch"], "ciphertexts": value["ciphertexts"], "on": instance_id}

    def start_instance(self, name):
        raise AssertionError("the spreader never starts instances: the packer owns scaling")


def test_a_failed_part_is_retried_once_through_the_router():
    platform = _Platform(PlatformError("instance_crashed", "gone", status=502))
    routed: list[str] = []

    def invoke(key, value, timeout):
        routed.append(key)
        return {"v": 1, "batch": value["batch"], "ciphertexts": value["ciphertexts"], "on": "router"}

    spreader = Spreader(platform, "veil-he", invoke)
    value = _request(20, 8, 2)
    pieces = split(value, 8, 3)
    platform.fail = {"b"}
    results = spreader.run("m@k", pieces, 10.0)
    assert [r["on"] for r in results] == ["a", "router", "router"]  # b failed; the third had no instance
    assert routed == ["m@k", "m@k"]  # the request's own routing key: the packer places them
    assert merge(value, results)["ciphertexts"] == value["ciphertexts"]
    spreader.close()


def test_a_part_failing_twice_fails_the_batch_and_refusals_are_not_retried():
    platform = _Platform(PlatformError("instance_crashed", "gone", status=502))

    def broken(key, value, timeout):
        raise PlatformError("instance_crashed", "gone again", status=502)

    spreader = Spreader(platform, "veil-he", broken)
    platform.fail = {"a"}
    with pytest.raises(PlatformError, match="gone again"):
        spreader.run("m@k", split(_request(16, 8, 2), 8, 2), 10.0)
    refusing = _Platform(PlatformError("bad_request", "field 'batch'", status=400))
    refusing.fail = {"a"}
    spreader = Spreader(refusing, "veil-he", lambda *a: pytest.fail("a 4xx must not be retried"))
    with pytest.raises(PlatformError, match="batch"):
        spreader.run("m@k", split(_request(16, 8, 2), 8, 2), 10.0)
    spreader.close()


@pytest.mark.parametrize("batch", [10**400, -(10**400), "9", None, 0])
def test_absurd_batches_are_passed_on_unsplit(batch):
    """The instance's parser names the field; splitting must not trip over it first."""
    value = {**_request(20, 8, 2), "batch": batch}
    assert split(value, 8, part_count(value, 8, 4)) == [value]
