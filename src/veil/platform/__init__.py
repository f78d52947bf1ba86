"""Serverless platforms for Veil's runtime: `local` (embedded, default), `openwhisk` (REST
client), `ray_serve` (Ray Serve deployment). Deployment manifests live in `deploy/`."""

from veil.platform.errors import ActionError, PlatformError
from veil.platform.instance import InstanceInfo
from veil.platform.local import LocalPlatform
from veil.platform.spec import FunctionSpec

__all__ = ["ActionError", "FunctionSpec", "InstanceInfo", "LocalPlatform", "PlatformError"]
