"""Running one activation: take a slot, POST /run, and handle crashes, timeouts and errors.

The /run body carries the per-activation fields OpenWhisk's invoker sends
(`activation_id`, `deadline` as epoch milliseconds in a string, `action_name`, `namespace`,
`transaction_id`), next to `value`; an action proxy exports them as `__OW_*` for the call.

A value that is only a binary envelope, `{"envelope": <bytes>}` (what the gateway hands on for
`application/vnd.veil.envelope` requests), is sent as the whole /run body instead, as it came,
with the activation fields in headers (`veil.wire.run`); the runtime's binary answer comes back
as `{"envelope": <bytes>}`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx

from veil.jsonbytes import dumps_object
from veil.platform.errors import ActionError, PlatformError
from veil.platform.instance import InstanceGone
from veil.platform.pool import FunctionPool, Lease
from veil.platform.spec import FunctionSpec
from veil.wire import run as run_wire


def encode_value(spec: FunctionSpec, value: dict) -> bytes:
    """`value` as JSON, once per request (a retry reuses it); a value that is not JSON is the
    caller's error. Lists of base64url text (an HE request's ciphertexts) are written without the
    standard encoder's per-character escaping (`veil.jsonbytes`)."""
    try:
        return dumps_object(value)
    except (TypeError, ValueError) as e:
        raise PlatformError(
            "bad_request",
            f"function {spec.name!r}: the value is not JSON-serialisable: {e}",
            status=400,
        ) from None


def _activation_fields(spec: FunctionSpec, deadline: float) -> dict[str, str]:
    remaining_ms = max(0.0, deadline - time.monotonic()) * 1000
    return {
        "activation_id": uuid.uuid4().hex,
        "transaction_id": uuid.uuid4().hex,
        "action_name": f"/{spec.namespace}/{spec.name}",
        "action_version": "0.0.1",
        "namespace": spec.namespace,
        "deadline": str(int(time.time() * 1000 + remaining_ms)),
    }


def activation_frame(spec: FunctionSpec, value_json: bytes, deadline: float) -> bytes:
    """The OpenWhisk /run body around an encoded value, with a fresh activation id."""
    fields = _activation_fields(spec, deadline)
    return b'{"value":' + value_json + b"," + json.dumps(fields, separators=(",", ":")).encode()[1:]


def binary_envelope(value: dict) -> bytes | None:
    """The body of a value that is only a binary envelope (`{"envelope": bytes}`), else None."""
    envelope = value.get("envelope")
    return envelope if isinstance(envelope, bytes) and len(value) == 1 else None


def binary_headers(spec: FunctionSpec, deadline: float) -> dict[str, str]:
    """The headers of a binary-envelope /run: its content type and the activation fields."""
    headers = {"Content-Type": run_wire.BINARY_CONTENT_TYPE}
    for name, value in _activation_fields(spec, deadline).items():
        if name in run_wire.FIELD_HEADERS:
            headers[run_wire.FIELD_HEADERS[name]] = value
    return headers


def encode_activation(spec: FunctionSpec, value: dict, deadline: float) -> bytes:
    """The OpenWhisk /run body for `value`, with a fresh activation id."""
    return activation_frame(spec, encode_value(spec, value), deadline)


def invoke(pool: FunctionPool, value: dict, timeout: float, instance_id: str | None = None) -> dict[str, Any]:
    """Run `value` on the function (or on one instance) within `timeout` seconds.

    Auto-routed invokes retry once after a crash (on a replacement or another instance);
    invokes aimed at one instance do not, since the caller chose that instance. An instance
    stopped for going over its memory fails its requests with `out_of_memory`, not retried
    (the request may be what needs the memory). A request that gets no answer in time makes
    its instance suspect (`FunctionPool.suspect`): a health probe decides whether it lives.
    """
    if not isinstance(value, dict):
        raise PlatformError("bad_request", f"function {pool.name!r}: value must be a JSON object", status=400)
    arrival = time.monotonic()
    deadline = arrival + timeout
    raw = binary_envelope(value)  # sent as it came
    value_json = encode_value(pool.spec, value) if raw is None else b""  # fail fast on bad values, before a slot
    queued_s = 0.0
    first: tuple[Lease, InstanceGone] | None = None
    while True:
        t_wait = time.monotonic()
        try:
            lease = pool.acquire(deadline) if instance_id is None else pool.acquire_on(instance_id, deadline)
        except PlatformError as e:
            pool.metrics.request_done(cold=False, queue_s=time.monotonic() - arrival, exec_s=None, outcome=e.code)
            if first is not None and e.code == "timeout":
                e.message += f" (after instance {first[0].instance.id} {first[1].reason})"
                e.args = (e.message,)
            if first is None:
                e.sent = False  # no instance got it: nothing ran
            raise
        queued_s += time.monotonic() - t_wait
        t_run = time.monotonic()
        remaining = deadline - t_run
        try:
            if remaining <= 0:
                raise httpx.ReadTimeout("deadline passed before dispatch")
            if raw is not None:
                result = lease.instance.run(raw, remaining, binary_headers(pool.spec, deadline))
            else:
                result = lease.instance.run(
                    activation_frame(pool.spec, value_json, deadline), remaining, keep_encoding=True
                )
        except InstanceGone as gone:
            why = pool.instance_gone(lease, gone)
            if why == "out_of_memory":
                err = PlatformError(
                    "out_of_memory",
                    f"function {pool.name!r}: instance {lease.instance.id} went over its memory "
                    f"({pool.spec.memory_mb} MB) while running the request and was stopped",
                )
                pool.metrics.request_done(cold=lease.cold, queue_s=queued_s, exec_s=None, outcome=err.code)
                raise err from None
            crashed = why != ""
            if instance_id is None and first is None:
                first = (lease, gone)
                pool.metrics.retried()
                continue
            err = _crash_error(pool, lease, gone, first, crashed, targeted=instance_id is not None)
            pool.metrics.request_done(cold=lease.cold, queue_s=queued_s, exec_s=None, outcome=err.code)
            raise err from None
        except httpx.TimeoutException:
            pool.release(lease, served=False)
            if remaining > 0:  # it was sent and got no answer in time
                pool.suspect(lease.instance)
            pool.metrics.request_done(cold=lease.cold, queue_s=queued_s, exec_s=None, outcome="timeout")
            raise PlatformError(
                "timeout",
                f"function {pool.name!r}: no result within {timeout:.2f} s (instance "
                f"{lease.instance.id} was still running the request)",
            ) from None
        except ActionError as e:
            exec_s = time.monotonic() - t_run
            pool.release(lease, served=True)
            pool.metrics.request_done(cold=lease.cold, queue_s=queued_s, exec_s=exec_s, outcome=e.code)
            raise
        exec_s = time.monotonic() - t_run
        pool.release(lease, served=True)
        pool.metrics.request_done(cold=lease.cold, queue_s=queued_s, exec_s=exec_s, outcome="ok")
        return result


def _crash_error(
    pool: FunctionPool,
    lease: Lease,
    gone: InstanceGone,
    first: tuple[Lease, InstanceGone] | None,
    crashed: bool,
    *,
    targeted: bool,
) -> PlatformError:
    inst = lease.instance
    pid = inst.proc.pid if inst.proc is not None else None
    what = f"instance {inst.id} (pid {pid}) {gone.reason} while running the request"
    if targeted:
        msg = f"function {pool.name!r}: {what}; not retried (the request targeted this instance)"
    else:
        assert first is not None
        f_inst, f_gone = first[0].instance, first[1]
        msg = (
            f"function {pool.name!r}: the request failed twice: instance {f_inst.id} "
            f"{f_gone.reason}, and the retry on {what}. The action likely crashes on this input; "
            f"see {f_inst.log_path} and {inst.log_path}"
        )
    if not crashed and gone.exit_code is None:
        msg += " (the connection broke while the process stayed alive)"
    return PlatformError("instance_crashed", msg)
