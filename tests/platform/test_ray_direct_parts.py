"""The direct path's fallback without a cluster: a handle that is not (yet) Serve's handle with
Veil's router behind it sends everything through the handle."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve")

from veil.platform.ray_serve.direct import DirectPath, Miss  # noqa: E402


class _NoRouter:
    """A handle before its first request: Serve creates the router lazily."""

    _router = None


class _DefaultRouter:
    """A handle whose router is Serve's default one (no `place_direct`)."""

    class _Outer:
        class _Inner:
            _request_router = object()
            _metrics_manager = object()
            _event_loop = object()

        _asyncio_router = _Inner()

    _router = _Outer()


@pytest.mark.parametrize("handle", [object(), _NoRouter(), _DefaultRouter()])
def test_without_veil_router_internals_every_request_takes_the_handle(handle):
    path = DirectPath(handle)
    assert not path.available()
    assert path.call("m1", b"{}", 1.0) == Miss(arrived=False)
    assert path.sent == 0 and path.gone == 0
