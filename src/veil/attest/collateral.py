"""DCAP collateral: what a verifier needs besides the quote, and where it comes from.

A quote proves nothing alone: its PCK chain must be checked against Intel's CRLs, and the
platform's TCB and the quoting enclave against Intel's signed TCB info and QE identity. Those
documents expire (each carries a `nextUpdate`), so verification is a function of the collateral
*and* the time. This module holds the collateral in the JSON shape `dcap-qvl` and the test
vectors use (nine fields, binary ones hex-encoded) and offers two sources:

- `OfflineCollateral`: fixed bytes per evidence kind (air-gapped verifiers, tests, the CLI);
- `PccsCollateral`: fetched from a PCCS (or Intel PCS) by the quote's FMSPC and CA, cached in
  memory and optionally on disk until the earliest `nextUpdate` of what was fetched.

Both implement `get(kind, evidence, now) -> bytes | None`, the source protocol of
`veil.attest.verify.TrustConfig.collateral`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509

from veil.attest.errors import VerificationError
from veil.attest.evidence import Evidence

log = logging.getLogger("veil.attest.collateral")

DCAP_KINDS = ("sgx-dcap", "tdx")

#: The nine fields of DCAP collateral (dcap-qvl's QuoteCollateralV3 JSON).
FIELDS = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)
_HEX_FIELDS = ("root_ca_crl", "pck_crl", "tcb_info_signature", "qe_identity_signature")


class CollateralSource(Protocol):
    """Where a verifier gets collateral for a piece of evidence (None: this source has none)."""

    def get(self, kind: str, evidence: Evidence, now: datetime) -> bytes | None: ...


def _parse_time(value: object, field: str) -> datetime:
    if not isinstance(value, str):
        raise VerificationError(field, "missing or not a string", actual=value)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise VerificationError(field, "not an ISO-8601 time", actual=value) from None
    if parsed.tzinfo is None:
        raise VerificationError(field, "time has no timezone", actual=value)
    return parsed


@dataclass(frozen=True)
class Validity:
    """One expiring collateral document: its name, when it was issued, until when it is valid."""

    name: str
    issued: datetime
    next_update: datetime


class DcapCollateral:
    """Parsed DCAP collateral. Construct with `from_json`; errors name the offending field."""

    def __init__(self, fields: dict[str, str]) -> None:
        self.fields = fields

    @classmethod
    def from_json(cls, data: bytes | str | Mapping[str, Any]) -> DcapCollateral:
        """Parse collateral JSON (bytes, text or an already-decoded mapping)."""
        if isinstance(data, Mapping):
            obj: Any = data
        else:
            try:
                obj = json.loads(data)
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                raise VerificationError("collateral", f"not JSON ({exc})") from None
        if not isinstance(obj, Mapping):
            raise VerificationError("collateral", "must be a JSON object")
        fields: dict[str, str] = {}
        for name in FIELDS:
            value = obj.get(name)
            if not isinstance(value, str) or not value:
                raise VerificationError(f"collateral.{name}", "missing or not a non-empty string")
            if name in _HEX_FIELDS:
                try:
                    bytes.fromhex(value)
                except ValueError:
                    raise VerificationError(f"collateral.{name}", "not hex") from None
            fields[name] = value
        return cls(fields)

    @staticmethod
    @lru_cache(maxsize=32)
    def parse(data: bytes) -> DcapCollateral:
        """`from_json`, memoised by content: a verifier sees the same collateral many times,
        and a parsed `DcapCollateral` is never modified (its derived values are cached)."""
        return DcapCollateral.from_json(data)

    def to_json(self) -> bytes:
        return json.dumps(self.fields, sort_keys=True).encode()

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the canonical JSON, to identify the collateral in logs and caches."""
        return hashlib.sha256(self.to_json()).hexdigest()

    @cached_property
    def tcb_info(self) -> dict[str, Any]:
        return self._json_field("tcb_info")

    @cached_property
    def qe_identity(self) -> dict[str, Any]:
        return self._json_field("qe_identity")

    def _json_field(self, name: str) -> dict[str, Any]:
        try:
            value = json.loads(self.fields[name])
        except (ValueError, RecursionError):
            raise VerificationError(f"collateral.{name}", "not JSON") from None
        if not isinstance(value, dict):
            raise VerificationError(f"collateral.{name}", "must be a JSON object")
        return value

    def _crl(self, name: str) -> x509.CertificateRevocationList:
        try:
            return x509.load_der_x509_crl(bytes.fromhex(self.fields[name]))
        except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is not a ValueError
            raise VerificationError(f"collateral.{name}", f"not a DER CRL ({exc})") from None

    @cached_property
    def validity(self) -> tuple[Validity, ...]:
        """Issue and expiry times of the four expiring documents, in checking order."""
        out = []
        for name, doc in (("tcb_info", self.tcb_info), ("qe_identity", self.qe_identity)):
            out.append(
                Validity(
                    name,
                    _parse_time(doc.get("issueDate"), f"collateral.{name}.issueDate"),
                    _parse_time(doc.get("nextUpdate"), f"collateral.{name}.nextUpdate"),
                )
            )
        for name in ("pck_crl", "root_ca_crl"):
            crl = self._crl(name)
            if crl.next_update_utc is None:
                raise VerificationError(f"collateral.{name}.nextUpdate", "CRL has no nextUpdate")
            out.append(Validity(name, crl.last_update_utc, crl.next_update_utc))
        return tuple(out)

    @property
    def next_update(self) -> datetime:
        """When the first document expires: the collateral as a whole is stale from then."""
        return min(v.next_update for v in self.validity)

    def check_fresh(self, now: datetime) -> None:
        """Refuse collateral not yet issued or already expired at `now`, naming each document.

        dcap-qvl checks this too, but reports e.g. `CrlExpired` without saying which CRL; doing
        it here first gives the operator the field and both times.
        """
        expired = [v for v in self.validity if now >= v.next_update]
        if expired:
            first = expired[0]
            names = ", ".join(f"{v.name} (nextUpdate {v.next_update.isoformat()})" for v in expired)
            raise VerificationError(
                f"collateral.{first.name}.nextUpdate",
                f"collateral expired at the verification time; expired: {names}",
                expected=f"> {now.isoformat()}",
                actual=first.next_update.isoformat(),
            )
        future = [v for v in self.validity if now < v.issued]
        if future:
            first = future[0]
            raise VerificationError(
                f"collateral.{first.name}.issueDate",
                "collateral issued after the verification time",
                expected=f"<= {now.isoformat()}",
                actual=first.issued.isoformat(),
            )

    @cached_property
    def qvl(self) -> Any:
        return self.to_qvl()

    def to_qvl(self) -> Any:
        """The `dcap_qvl.QuoteCollateralV3` for this collateral."""
        import dcap_qvl

        try:
            return dcap_qvl.QuoteCollateralV3.from_json(json.dumps(self.fields))
        except ValueError as exc:
            raise VerificationError("collateral", f"rejected by dcap-qvl ({exc})") from None


class OfflineCollateral:
    """Fixed collateral per evidence kind, e.g. loaded from files by an air-gapped verifier."""

    def __init__(self, by_kind: Mapping[str, bytes]) -> None:
        self._by_kind = dict(by_kind)

    @classmethod
    def for_kinds(cls, data: bytes, *kinds: str) -> OfflineCollateral:
        """The same collateral for each of `kinds` (default: both DCAP kinds)."""
        return cls({kind: data for kind in (kinds or DCAP_KINDS)})

    @classmethod
    def from_file(cls, path: Path, *kinds: str) -> OfflineCollateral:
        return cls.for_kinds(Path(path).read_bytes(), *kinds)

    def get(self, kind: str, evidence: Evidence, now: datetime) -> bytes | None:
        return self._by_kind.get(kind)


Fetcher = Callable[[str, bytes], bytes]


def _fetch_with_dcap_qvl(url: str, raw_quote: bytes) -> bytes:
    """Fetch collateral for a quote from a PCCS/PCS with dcap-qvl's client (network I/O)."""
    import dcap_qvl

    async def run() -> Any:
        return await dcap_qvl.get_collateral(url, raw_quote)

    try:
        collateral = asyncio.run(run())
    except (ValueError, RuntimeError) as exc:
        raise VerificationError("collateral.pccs", f"fetch from {url} failed ({exc})") from None
    return collateral.to_json().encode()


class PccsCollateral:
    """Collateral fetched from a PCCS and cached until its earliest `nextUpdate`.

    One entry per (TEE type, FMSPC, CA), as collateral depends only on those. `cache_dir`
    keeps the cache across restarts (collateral is public and signed, so a file cache is safe;
    a tampered file fails verification). `fetch` is injectable for tests and other clients.
    """

    def __init__(self, url: str, *, cache_dir: Path | None = None, fetch: Fetcher | None = None) -> None:
        self.url = url.rstrip("/")
        self.cache_dir = cache_dir
        self._fetch = fetch or _fetch_with_dcap_qvl
        self._cache: dict[str, tuple[bytes, datetime]] = {}
        self._lock = threading.Lock()
        self.fetches = 0

    def _key(self, evidence: Evidence) -> str:
        from veil.attest.dcap import parse_quote

        quote = parse_quote(evidence.raw)
        return f"{quote.kind}-{quote.fmspc()}-{quote.pck_ca()}"

    def _disk_path(self, key: str) -> Path | None:
        if self.cache_dir is None:
            return None
        url_tag = hashlib.sha256(self.url.encode()).hexdigest()[:12]
        return self.cache_dir / f"dcap-{url_tag}-{key}.json"

    def get(self, kind: str, evidence: Evidence, now: datetime) -> bytes | None:
        if kind not in DCAP_KINDS:
            return None
        key = self._key(evidence)
        with self._lock:
            hit = self._cache.get(key)
            if hit is None:
                hit = self._load_disk(key)
            if hit is not None and now < hit[1]:
                return hit[0]
            data = self._fetch(self.url, evidence.raw)
            self.fetches += 1
            expires = DcapCollateral.from_json(data).next_update
            if now < expires:
                self._cache[key] = (data, expires)
                self._store_disk(key, data)
                log.info("fetched DCAP collateral for %s from %s, valid until %s", key, self.url, expires)
            else:
                log.warning("PCCS %s served collateral for %s already stale (%s)", self.url, key, expires)
            return data

    def _load_disk(self, key: str) -> tuple[bytes, datetime] | None:
        path = self._disk_path(key)
        if path is None or not path.exists():
            return None
        data = path.read_bytes()
        try:
            return data, DcapCollateral.from_json(data).next_update
        except VerificationError:
            log.warning("ignoring unreadable collateral cache file %s", path)
            return None

    def _store_disk(self, key: str, data: bytes) -> None:
        path = self._disk_path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)


def resolve_collateral(source: Any, evidence: Evidence, now: datetime) -> bytes | None:
    """Collateral for `evidence`: from the configured source, else from the evidence itself.

    The source wins when it answers; evidence-supplied collateral is as safe (every document in
    it is signed under the pinned root) but lets the attester choose *which* valid collateral,
    e.g. an older still-valid TCB info, so verifiers that care configure a source.
    """
    if source is not None:
        data = source.get(evidence.kind, evidence, now)
        if data is not None:
            return data
    return evidence.collateral
