"""What the page's buttons do: owner publish, grant and revoke; user request access and infer.

Each action is signed in this process with the principal's own identity through the SDK, which
also verifies the KeyService's signed answer; only then is it written to the console's ledger.
The page never holds a key: it asks, the console signs. All calls block (the SDK is synchronous),
so the app runs them in its thread pool.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from veil.cli.io import InputError
from veil.console.context import ConsoleContext
from veil.console.inputs import parse_inputs
from veil.crypto.envelope import check_identifier
from veil.crypto.errors import MalformedError
from veil.errors import BadRequest, Forbidden, VeilError
from veil.sdk import ModelOwner, ModelUser
from veil.wire.cards import ModelCard

MAX_OUTPUT_ROWS = 50  # the page shows a preview; `veil user infer --output` writes everything


def _identifier(value: object, what: str) -> str:
    try:
        return check_identifier(value, what)
    except MalformedError as exc:
        raise BadRequest(f"{what} id {value!r}: {exc}", code="malformed") from None


class Actions:
    """The console's actions over one `ConsoleContext`."""

    def __init__(self, ctx: ConsoleContext) -> None:
        self.ctx = ctx

    def _owner(self) -> ModelOwner:
        if self.ctx.owner is None:
            raise Forbidden(
                f"no owner identity in {self.ctx.client_dir}: this console acts as a user only", code="not_an_owner"
            )
        return self.ctx.owner

    def _user(self) -> ModelUser:
        if self.ctx.user is None:
            raise Forbidden(
                f"no user identity in {self.ctx.client_dir}: this console acts as an owner only", code="not_a_user"
            )
        return self.ctx.user

    # -- owner ---------------------------------------------------------------------------------
    def publish(
        self, model: str, onnx: bytes, *, revocation_delay_s: int | None = None, description: str = ""
    ) -> dict[str, Any]:
        """A new version of `model` (staged, sealed, signed upload, signed card, committed)."""
        owner = self._owner()
        model = _identifier(model, "model")
        if not onnx:
            raise BadRequest("publish: the ONNX file is empty", code="bad_model")
        result = owner.publish(model, onnx, revocation_delay_s=revocation_delay_s, description=description)
        self.ctx.ledger.append(
            "publish",
            role="owner",
            actor=owner.id,
            model=model,
            version=result["version"],
            replaced_version=result["replaced_version"],
            measurements=result["measurements"],
            revocation_delay_s=result["revocation_delay_s"],
            plaintext_bytes=result["plaintext_bytes"],
            sealed_bytes=result["sealed_bytes"],
        )
        return result

    def grant(self, model: str, user: str) -> dict[str, Any]:
        owner = self._owner()
        model, user = _identifier(model, "model"), _identifier(user, "user")
        owner.grant(model, user)
        self.ctx.ledger.append("grant", role="owner", actor=owner.id, model=model, user=user)
        return {"model": model, "user": user, "granted": True}

    def revoke(self, model: str, user: str) -> dict[str, Any]:
        """Revoke, and record the delay within which it takes effect (asked right after, over the
        signed channel: the delay that governs this revocation)."""
        owner = self._owner()
        model, user = _identifier(model, "model"), _identifier(user, "user")
        owner.revoke(model, user)
        try:
            delay = owner.keyservice.model_info(model).get("revocation_delay_s")
        except VeilError:  # the revocation stands; only the page's countdown lacks its delay
            delay = None
        entry = self.ctx.ledger.append(
            "revoke", role="owner", actor=owner.id, model=model, user=user, revocation_delay_s=delay
        )
        return {"model": model, "user": user, "granted": False, "revocation_delay_s": delay, "at": entry["ts"]}

    # -- user ----------------------------------------------------------------------------------
    def request_access(self, model: str, *, max_revocation_delay_s: int | None = None) -> dict[str, Any]:
        """Make (or reuse) the request key, give it sealed to the attested KeyService, and save it
        where `veil user infer` finds it."""
        user = self._user()
        model = _identifier(model, "model")
        user.request_access(model, max_revocation_delay_s=max_revocation_delay_s)
        self.ctx.save_request_keys()
        self.ctx.ledger.append(
            "request_access", role="user", actor=user.id, model=model, max_revocation_delay_s=max_revocation_delay_s
        )
        return {"model": model, "request_key": True}

    def infer(self, model: str, inputs_text: str) -> dict[str, Any]:
        """Encrypt, send, decrypt; the round trip is timed here and kept as this model's usage."""
        user = self._user()
        model = _identifier(model, "model")
        if model not in user.request_keys:  # perhaps `veil user request-access` ran meanwhile
            self.ctx.reload_request_keys()
        card: ModelCard | None
        try:
            card = user.card(model, refresh=True)
        except VeilError as exc:
            if exc.code != "no_card":
                raise
            card = None
        try:
            named = parse_inputs(inputs_text, card)
        except InputError as exc:
            raise BadRequest(str(exc), code="bad_input") from None
        try:
            outputs = user.infer(model, named, timings=True)
        except VeilError as exc:
            rtt = user.last_timings.get("round_trip_ms")
            self.ctx.usage.record(model, ok=False, round_trip_ms=rtt, error=f"{exc.code}: {exc.message}"[:300])
            raise
        timings = user.last_timings
        self.ctx.usage.record(
            model, ok=True, round_trip_ms=timings.get("round_trip_ms"), runtime_ms=timings.get("infer_ms")
        )
        return {
            "model": model,
            "outputs": {name: _preview(arr) for name, arr in outputs.items()},
            "timings": {k: round(v, 2) for k, v in timings.items() if isinstance(v, float)},
        }

    # -- either ------------------------------------------------------------------------------
    def watch(self, model: str) -> dict[str, Any]:
        """Add a model by id (one published elsewhere, e.g. with `veil owner publish`)."""
        model = _identifier(model, "model")
        self.ctx.ledger.append("watch", role=",".join(self.ctx.roles), model=model)
        return {"model": model}


def _preview(arr: np.ndarray) -> dict[str, Any]:
    rows = arr[:MAX_OUTPUT_ROWS] if arr.ndim else arr
    return {"dtype": str(arr.dtype), "shape": list(arr.shape), "values": rows.tolist()}
