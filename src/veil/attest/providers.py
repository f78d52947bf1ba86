"""Evidence providers: the code inside a TEE that produces evidence for given report data."""

from __future__ import annotations

from typing import Protocol

from veil.attest.evidence import Evidence


class EvidenceProvider(Protocol):
    """Produces evidence whose report data is exactly the bytes given."""

    kind: str

    def get_evidence(self, report_data: bytes) -> Evidence: ...

    def describe(self) -> str: ...
