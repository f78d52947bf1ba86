"""The runtime's dependence on the KeyService: revocation takes effect within the owner's
revocation delay (whatever the platform's /init says), and a KeyService that is gone gives a
clear error, never a hang."""

from __future__ import annotations

import subprocess
import time

import pytest
from e2e_support import assert_matches_reference

from veil.deployment import TEE_FUNCTION
from veil.errors import VeilError
from veil.platform.local import PlatformError

LR, MLP = "breast-cancer-lr", "digits-mlp"
TTL_S = 2


@pytest.mark.parametrize(
    "platform_init",
    [{}, {"key_cache_ttl_s": 3600, "revocation_delay_s": 3600, "ttl_s": 3600}],
    ids=["default-init", "init-asks-3600s"],
)
def test_revoked_user_is_refused_within_the_owners_delay(make_stack, platform_init):
    """The owner set 2 s; a platform whose /init asks runtimes to cache keys for an hour changes
    nothing: the delay comes from the KeyService's release, capped in measured code."""
    stack = make_stack(revocation_delay_s=TTL_S, runtime_init=platform_init)
    lr = stack.models[LR]
    victim, bystander = stack.user, stack.new_user()
    x = lr.x_test[:2]
    for u in (victim, bystander):  # both warm: their keys are cached in the instance
        assert_matches_reference(lr, x, stack.infer(u, LR, x))
        mx = stack.models[MLP].x_test[:2]
        assert_matches_reference(stack.models[MLP], mx, stack.infer(u, MLP, mx))

    stack.owner.revoke(LR, victim.id)
    revoked_at = time.monotonic()
    refused_after = None
    while time.monotonic() - revoked_at < TTL_S + 5:
        try:
            stack.infer(victim, LR, x)
        except VeilError as exc:
            assert (exc.code, exc.status) == ("not_granted", 403), (exc.code, exc.message)
            refused_after = time.monotonic() - revoked_at
            break
        # other users of the model are unaffected meanwhile
        assert_matches_reference(lr, x, stack.infer(bystander, LR, x))
        time.sleep(0.1)
    assert refused_after is not None, f"still served {TTL_S + 5:.0f} s after the revocation"
    assert refused_after <= TTL_S + 1.0, f"revocation took {refused_after:.2f} s (TTL {TTL_S} s)"

    # refused from then on, on every try; the bystander, and the victim's other model, still work
    for _ in range(3):
        with pytest.raises(VeilError) as info:
            stack.infer(victim, LR, x)
        assert info.value.code == "not_granted"
        assert_matches_reference(lr, x, stack.infer(bystander, LR, x))
    mx = stack.models[MLP].x_test[:2]
    assert_matches_reference(stack.models[MLP], mx, stack.infer(victim, MLP, mx))

    # a fresh grant restores access (again within the TTL at most)
    stack.owner.grant(LR, victim.id)
    deadline = time.monotonic() + TTL_S + 5
    while True:
        try:
            assert_matches_reference(lr, x, stack.infer(victim, LR, x))
            break
        except VeilError as exc:
            assert exc.code == "not_granted"
            assert time.monotonic() < deadline, "re-grant never took effect"
            time.sleep(0.1)

    # the user, too, can withdraw: deleting the request key stops releases within the TTL
    mlp = stack.models[MLP]
    victim.keyservice.delete_request_key(MLP)
    withdrawn_at = time.monotonic()
    while True:
        try:
            assert_matches_reference(mlp, mlp.x_test[:2], stack.infer(victim, MLP, mlp.x_test[:2]))
        except VeilError as exc:
            assert (exc.code, exc.status) == ("no_request_key", 403), (exc.code, exc.message)
            break
        assert time.monotonic() - withdrawn_at < TTL_S + 1.0, "withdrawn request key still released"
        time.sleep(0.1)
    assert_matches_reference(mlp, mlp.x_test[:2], stack.infer(bystander, MLP, mlp.x_test[:2]))


def test_keyservice_down_is_a_clear_error_not_a_hang(make_stack):
    stack = make_stack()
    lr = stack.models[LR]
    x = lr.x_test[:2]
    assert_matches_reference(lr, x, stack.infer(stack.user, LR, x))  # warm instance, keys cached
    late = stack.new_user([LR])  # registered and granted, but no keys released to a runtime yet

    ks = stack.deployment._keyservice
    assert ks is not None and ks.poll() is None
    ks.terminate()
    try:
        ks.wait(timeout=15)
    except subprocess.TimeoutExpired:
        ks.kill()
        ks.wait(timeout=10)

    # released keys are cached for the TTL: the warm path keeps working without the KeyService
    assert_matches_reference(lr, x, stack.infer(stack.user, LR, x))

    # a request that needs a release fails fast and says why
    for _ in range(2):
        t0 = time.monotonic()
        with pytest.raises(VeilError) as info:
            stack.infer(late, LR, x)
        took = time.monotonic() - t0
        assert took < 15, f"took {took:.1f} s to fail"
        err = info.value
        assert (err.code, err.status) == ("keyservice_unavailable", 503), (err.code, err.message)
        assert "KeyService" in err.message and "unreachable" in err.message

    # a cold start cannot attest: it fails fast, naming the cause
    t0 = time.monotonic()
    with pytest.raises(PlatformError) as started:
        stack.platform.start_instance(TEE_FUNCTION)
    assert time.monotonic() - t0 < 15
    assert started.value.code == "start_failed"
    assert "keyservice_unavailable" in started.value.message, started.value.message

    # the instance itself is fine: no crash, still serving what it can
    assert stack.platform.metrics(TEE_FUNCTION)["crashes"] == 0
    assert_matches_reference(lr, x, stack.infer(stack.user, LR, x))
