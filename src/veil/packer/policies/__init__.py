"""Packing policies by name: `per-model`, `sesemi` and `veil` (see each module)."""

from __future__ import annotations

from veil.packer.policies.base import Policy
from veil.packer.policies.per_model import PerModelPolicy, function_for
from veil.packer.policies.sesemi import SeSeMIPolicy
from veil.packer.policies.veil import VeilPolicy
from veil.packer.state import PoolSpec

POLICIES: dict[str, type[Policy]] = {
    "per-model": PerModelPolicy,
    "sesemi": SeSeMIPolicy,
    "veil": VeilPolicy,
}


def make_policy(name: str, spec: PoolSpec, **options: object) -> Policy:
    """Build the policy called `name`; unknown options are an error, not silently dropped."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown packing policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return cls(spec, **options)  # type: ignore[arg-type]


__all__ = [
    "POLICIES",
    "PerModelPolicy",
    "Policy",
    "SeSeMIPolicy",
    "VeilPolicy",
    "function_for",
    "make_policy",
]
