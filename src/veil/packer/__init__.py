"""Model packer: routes each request for a model to a runtime instance of a shared pool.

Policies (`veil.packer.policies`) are pure decision logic over an abstract cluster with the time
passed in; `veil.packer.packer.Packer` executes their decisions on a platform, and the
benchmark's discrete-event simulator executes the same decisions in simulated time.
"""

from __future__ import annotations

from veil.packer.keepalive import KeepAliveLearner
from veil.packer.packer import Packer, PackerError
from veil.packer.policies import POLICIES, Policy, make_policy
from veil.packer.state import PoolSpec, Reject, Route, Stop, Unload

__all__ = [
    "POLICIES",
    "KeepAliveLearner",
    "Packer",
    "PackerError",
    "Policy",
    "PoolSpec",
    "Reject",
    "Route",
    "Stop",
    "Unload",
    "make_policy",
]
