"""Serverless platforms for Veil's runtime behind one protocol (`protocol.Platform`): `local`
(embedded, default), `ray_serve` (Ray Serve, for clusters; the optional extra `veil[ray]`) and an
`openwhisk` REST client. Deployment manifests live in `deploy/`."""

from veil.platform.errors import ActionError, PlatformError
from veil.platform.instance import InstanceInfo
from veil.platform.local import LocalPlatform
from veil.platform.protocol import InstanceControl, Platform, Routing
from veil.platform.spec import FunctionSpec

__all__ = [
    "ActionError",
    "FunctionSpec",
    "InstanceControl",
    "InstanceInfo",
    "LocalPlatform",
    "Platform",
    "PlatformError",
    "Routing",
]
