"""A small REST client for Apache OpenWhisk: create/update, get, delete and invoke actions.

The runtime image (deploy/Dockerfile) is deployed as a *blackbox* action: OpenWhisk pulls the
image and speaks the same `/init` + `/run` protocol LocalPlatform uses. OpenWhisk's `/init`
for a blackbox action carries no custom value, so the function's `init_value` travels as an
*init parameter* `VEIL_INIT` (JSON) that OpenWhisk hands to `/init` in `value.env` (and thus
to the process environment): the runtime reads it from there.

REST shapes (OpenWhisk API v1, basic auth with the `uuid:key` of `wsk property get --auth`):
- `PUT  /api/v1/namespaces/{ns}/actions/{name}?overwrite=true`
  `{"namespace", "name", "exec": {"kind": "blackbox", "image"}, "limits": {...},
    "parameters": [{"key", "value", "init"?}], "annotations": [{"key", "value"}]}`
- `POST /api/v1/namespaces/{ns}/actions/{name}?blocking=true&result=true` body = the value;
  200 with the result, 502 with `{"error": ...}` for an application error, or 202 with an
  `activationId` when the blocking wait ran out (then poll `GET .../activations/{id}`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from veil.platform.errors import ActionError, PlatformError
from veil.platform.spec import FunctionSpec


@dataclass(frozen=True)
class ActionLimits:
    """OpenWhisk per-action limits (timeout in ms, memory in MB, logs in KB, concurrency)."""

    timeout_ms: int = 60_000
    memory_mb: int = 256
    logs_kb: int = 10
    concurrency: int = 1

    def to_json(self) -> dict[str, int]:
        return {
            "timeout": self.timeout_ms,
            "memory": self.memory_mb,
            "logs": self.logs_kb,
            "concurrency": self.concurrency,
        }


class OpenWhiskClient:
    """Blocking client; one pooled httpx.Client, thread-safe. `auth` is `"uuid:key"`."""

    def __init__(
        self,
        api_host: str,
        auth: str,
        *,
        namespace: str = "_",
        verify: bool = True,
        timeout: float = 70.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if ":" not in auth:
            raise PlatformError("bad_spec", "OpenWhisk auth must be 'uuid:key' (wsk property get --auth)")
        user, key = auth.split(":", 1)
        base = api_host if api_host.startswith(("http://", "https://")) else f"https://{api_host}"
        self.namespace = namespace
        self._http = httpx.Client(
            base_url=base.rstrip("/"),
            auth=httpx.BasicAuth(user, key),
            verify=verify,
            timeout=timeout,
            transport=transport,
            headers={"accept": "application/json"},
        )

    @classmethod
    def from_wskprops(cls, path: Path | None = None, **kw: Any) -> OpenWhiskClient:
        """Read APIHOST, AUTH and NAMESPACE from `~/.wskprops` (or $WSK_CONFIG_FILE), as `wsk` does."""
        path = path or Path(os.environ.get("WSK_CONFIG_FILE", Path.home() / ".wskprops"))
        props: dict[str, str] = {}
        for line in path.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                k, v = line.split("=", 1)
                props[k.strip()] = v.strip()
        missing = [k for k in ("APIHOST", "AUTH") if k not in props]
        if missing:
            raise PlatformError("bad_spec", f"{path}: missing {', '.join(missing)}")
        return cls(props["APIHOST"], props["AUTH"], namespace=props.get("NAMESPACE", "_"), **kw)

    # -- actions ---------------------------------------------------------------------------

    def _action_path(self, name: str) -> str:
        return f"/api/v1/namespaces/{quote(self.namespace, safe='')}/actions/{quote(name, safe='')}"

    def put_action(
        self,
        name: str,
        image: str,
        *,
        limits: ActionLimits | None = None,
        parameters: dict[str, Any] | None = None,
        init_parameters: dict[str, Any] | None = None,
        annotations: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Create or update (overwrite) a blackbox action running `image`."""
        params = [{"key": k, "value": v} for k, v in (parameters or {}).items()]
        params += [{"key": k, "value": v, "init": True} for k, v in (init_parameters or {}).items()]
        body = {
            "namespace": self.namespace,
            "name": name,
            "exec": {"kind": "blackbox", "image": image},
            "limits": (limits or ActionLimits()).to_json(),
            "parameters": params,
            "annotations": [{"key": k, "value": v} for k, v in (annotations or {}).items()],
        }
        resp = self._http.put(self._action_path(name), params={"overwrite": "true"}, json=body)
        return self._json(resp, f"creating/updating action {name!r}")

    def deploy_function(self, spec: FunctionSpec, image: str, *, timeout_ms: int = 60_000) -> dict[str, Any]:
        """Deploy a FunctionSpec as an OpenWhisk action: memory and concurrency map to limits,
        `init_value` to the init parameter VEIL_INIT, `env` to init parameters too.
        (OpenWhisk scales instances itself; min/max instances and idle timeout are the
        operator's invoker settings, not per-action limits.)"""
        init_params: dict[str, Any] = dict(spec.env)
        init_params["VEIL_INIT"] = json.dumps(spec.init_value, separators=(",", ":"))
        return self.put_action(
            spec.name,
            image,
            limits=ActionLimits(timeout_ms=timeout_ms, memory_mb=spec.memory_mb, concurrency=spec.concurrency),
            init_parameters=init_params,
            annotations={"veil-function": spec.name},
        )

    def get_action(self, name: str) -> dict[str, Any]:
        return self._json(self._http.get(self._action_path(name)), f"getting action {name!r}")

    def delete_action(self, name: str) -> None:
        self._json(self._http.delete(self._action_path(name)), f"deleting action {name!r}")

    # -- invocation ------------------------------------------------------------------------

    def invoke(self, name: str, value: dict[str, Any], *, timeout: float = 60.0) -> dict[str, Any]:
        """Blocking invoke returning the action's result; ActionError for `{"error": ...}`."""
        deadline = time.monotonic() + timeout
        try:
            resp = self._http.post(
                self._action_path(name),
                params={"blocking": "true", "result": "true"},
                json=value,
                timeout=timeout,
            )
        except httpx.TimeoutException:
            raise PlatformError("timeout", f"OpenWhisk action {name!r}: no answer within {timeout} s") from None
        except httpx.TransportError as e:
            raise PlatformError("start_failed", f"OpenWhisk at {self._http.base_url}: {e}", status=502) from None
        if resp.status_code == 202:  # the controller's blocking wait ended first: poll
            activation_id = _payload(resp).get("activationId")
            if not activation_id:
                raise PlatformError("action_error", f"OpenWhisk action {name!r}: 202 without activationId")
            return self._wait_activation(name, activation_id, deadline)
        payload = _payload(resp)
        if resp.status_code == 200 and "error" not in payload:
            return payload
        if "error" in payload and resp.status_code in (200, 400, 502):
            raise ActionError(name, payload["error"], resp.status_code if resp.status_code >= 400 else 502)
        raise self._http_error(resp, f"invoking action {name!r}")

    def _wait_activation(self, name: str, activation_id: str, deadline: float) -> dict[str, Any]:
        path = f"/api/v1/namespaces/{quote(self.namespace, safe='')}/activations/{activation_id}"
        delay = 0.2
        while time.monotonic() < deadline:
            resp = self._http.get(path)
            if resp.status_code == 200:
                response = _payload(resp).get("response", {})
                result = response.get("result", {})
                if response.get("success", False):
                    return result
                raise ActionError(name, result.get("error", result), 502)
            if resp.status_code != 404:  # 404: not recorded yet
                raise self._http_error(resp, f"polling activation {activation_id}")
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 2.0)
        raise PlatformError("timeout", f"OpenWhisk action {name!r}: activation {activation_id} did not finish in time")

    # -- plumbing --------------------------------------------------------------------------

    def _json(self, resp: httpx.Response, what: str) -> dict[str, Any]:
        if 200 <= resp.status_code < 300:
            return _payload(resp)
        raise self._http_error(resp, what)

    def _http_error(self, resp: httpx.Response, what: str) -> PlatformError:
        payload = _payload(resp)
        detail = payload.get("error") or resp.text[:300]
        code = {401: "unauthorized", 403: "forbidden", 404: "unknown_function", 409: "conflict", 429: "busy"}.get(
            resp.status_code, "openwhisk_error"
        )
        return PlatformError(
            code,
            f"OpenWhisk: {what} failed ({resp.status_code}): {detail}",
            status=resp.status_code if resp.status_code >= 400 else 502,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OpenWhiskClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _payload(resp: httpx.Response) -> dict[str, Any]:
    try:
        data = resp.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {"result": data}
