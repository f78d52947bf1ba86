"""Policy over a verified report (go-sev-guest's `validate`). Every refusal names the field.

Two tools, for two kinds of caller:

- `validate(report, policy, expected_report_data)`: one relying party's whole policy (kinds,
  debug, TCB status and advisories, measurements, SGX signer/product/SVN, TDX RTMRs, SNP TCB
  minimums, report-data binding). Raises `PolicyError(field, reason, expected, actual)`.
- `matches(report, entry)`: one allow-list entry, as the KeyService keeps them per model and
  per user. An entry is either a plain hex measurement or a structured entry
  `<kind>:<key>=<value>,...` (see `ENTRY_KEYS` and docs/attestation.md).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from veil.attest.errors import PolicyError
from veil.attest.evidence import VerifiedReport

log = logging.getLogger("veil.attest.validate")

#: Entry prefixes and the evidence kind each one applies to.
ENTRY_KINDS = {"sgx": "sgx-dcap", "tdx": "tdx", "snp": "sev-snp", "sim": "sim"}

#: Keys allowed in structured entries: key -> (claim name or "measurement", comparison).
#: "hex": equal lowercase hex; "int": equal integer; "min": claim >= value.
ENTRY_KEYS: dict[str, dict[str, tuple[str, str]]] = {
    "sgx": {
        "mrenclave": ("measurement", "hex"),
        "mrsigner": ("mrsigner", "hex"),
        "isvprodid": ("isvprodid", "int"),
        "min_isvsvn": ("isvsvn", "min"),
        "isvsvn": ("isvsvn", "int"),
    },
    "tdx": {
        "mrtd": ("measurement", "hex"),
        **{f"rtmr{i}": (f"rtmr{i}", "hex") for i in range(4)},
        "mrconfigid": ("mrconfigid", "hex"),
        "mrowner": ("mrowner", "hex"),
        "mrownerconfig": ("mrownerconfig", "hex"),
        "mrseam": ("mrseam", "hex"),
    },
    "snp": {
        "measurement": ("measurement", "hex"),
        "host_data": ("host_data", "hex"),
        "id_key_digest": ("id_key_digest", "hex"),
        "author_key_digest": ("author_key_digest", "hex"),
        "min_guest_svn": ("guest_svn", "min"),
    },
    "sim": {"measurement": ("measurement", "hex")},
}

#: At least one of these keys must be present: an entry that pins no code identity (e.g. only
#: `min_isvsvn`) would admit anything and is refused as malformed.
_IDENTITY_KEYS = {"sgx": {"mrenclave", "mrsigner"}, "tdx": {"mrtd"}, "snp": {"measurement"}, "sim": {"measurement"}}


@dataclass(frozen=True)
class Entry:
    """A parsed allow-list entry: the evidence kind it applies to (None: any) and its terms."""

    kind: str | None
    terms: tuple[tuple[str, str], ...]
    prefix: str = ""


def _is_hex(value: str) -> bool:
    return len(value) % 2 == 0 and len(value) > 0 and all(c in "0123456789abcdef" for c in value)


def parse_entry(entry: str) -> Entry:
    """Parse an allow-list entry; raise ValueError saying what is wrong.

    The KeyService should call this when an entry is added, so typos are refused up front
    rather than silently never matching.
    """
    text = entry.strip()
    if ":" not in text:
        value = text.lower()
        if not _is_hex(value):
            raise ValueError(f"allow-list entry {entry!r}: not a hex measurement nor '<kind>:<key>=<value>,...'")
        return Entry(kind=None, terms=(("measurement", value),))
    prefix, _, rest = text.partition(":")
    prefix = prefix.strip().lower()
    if prefix not in ENTRY_KEYS:
        raise ValueError(f"allow-list entry {entry!r}: unknown kind {prefix!r} (use one of {sorted(ENTRY_KEYS)})")
    terms: list[tuple[str, str]] = []
    seen: set[str] = set()
    for part in rest.split(","):
        key, eq, value = part.partition("=")
        key, value = key.strip().lower(), value.strip().lower()
        if not eq or not key or not value:
            raise ValueError(f"allow-list entry {entry!r}: term {part!r} is not key=value")
        spec = ENTRY_KEYS[prefix].get(key)
        if spec is None:
            raise ValueError(
                f"allow-list entry {entry!r}: unknown key {key!r} for {prefix} (use {sorted(ENTRY_KEYS[prefix])})"
            )
        if key in seen:
            raise ValueError(f"allow-list entry {entry!r}: key {key!r} repeated")
        seen.add(key)
        if spec[1] == "hex" and not _is_hex(value):
            raise ValueError(f"allow-list entry {entry!r}: {key} must be hex")
        if spec[1] in ("int", "min") and not value.isdigit():
            raise ValueError(f"allow-list entry {entry!r}: {key} must be a non-negative integer")
        terms.append((key, value))
    if not seen & _IDENTITY_KEYS[prefix]:
        raise ValueError(f"allow-list entry {entry!r}: must pin one of {sorted(_IDENTITY_KEYS[prefix])}")
    return Entry(kind=ENTRY_KINDS[prefix], terms=tuple(terms), prefix=prefix)


def _claim(report: VerifiedReport, name: str) -> Any:
    return report.measurement if name == "measurement" else report.claims.get(name)


def mismatches(report: VerifiedReport, entry: Entry | str) -> list[tuple[str, object, object]]:
    """(field, expected, actual) for every term of `entry` that `report` does not satisfy."""
    parsed = parse_entry(entry) if isinstance(entry, str) else entry
    if parsed.kind is not None and parsed.kind != report.kind:
        return [("kind", parsed.kind, report.kind)]
    out: list[tuple[str, object, object]] = []
    for key, value in parsed.terms:
        claim_name, how = ENTRY_KEYS[parsed.prefix][key] if parsed.prefix else ("measurement", "hex")
        actual = _claim(report, claim_name)
        if how == "hex":
            ok = isinstance(actual, str) and hmac.compare_digest(actual.lower(), value)
            expected: object = value
        elif how == "int":
            ok = isinstance(actual, int) and actual == int(value)
            expected = int(value)
        else:
            ok = isinstance(actual, int) and actual >= int(value)
            expected = f">= {int(value)}"
        if not ok:
            out.append((claim_name if claim_name != "measurement" else "measurement", expected, actual))
    return out


def matches(report: VerifiedReport, entry: str) -> bool:
    """Whether `report` satisfies one allow-list entry.

    A plain hex string matches `report.measurement` (any kind); a structured entry matches
    only reports of its kind whose claims satisfy every term. A malformed entry matches
    nothing (and is logged): refusing keys is the safe failure; `parse_entry` catches typos
    when the entry is stored.
    """
    try:
        return not mismatches(report, entry)
    except ValueError as exc:
        log.warning("ignoring malformed allow-list entry: %s", exc)
        return False


@dataclass(frozen=True)
class Policy:
    """What a relying party accepts. Defaults are production: nothing simulated, no debug,
    TCB `UpToDate` only, no advisories.

    - `allowed_measurements`: primary measurements accepted (None = any; per-model and per-user
      sets are applied separately by the KeyService at release time);
    - `allow_simulated`: accept the `sim` kind (off by default; production configs keep it off);
    - `allow_debug`: accept debug-mode TEEs (off by default). dcap-qvl does not rate the TCB of
      debug SGX/TDX quotes, so they carry tcb_status "NotEvaluated", which `allowed_tcb_statuses`
      must then also allow;
    - `allowed_tcb_statuses` / `allowed_advisories`: Intel TCB states and advisory ids accepted
      (SEV-SNP has no status service: its reports carry "NotRated" and use `snp_min_tcb`);
    - `allowed_kinds`: evidence kinds accepted (None = any real kind);
    - `allowed_entries`: structured allow-list entries (see `matches`); one must match;
    - `sgx_mrsigners` / `sgx_isvprodid` / `sgx_min_isvsvn`: SGX signer identity, product and
      minimum security version (an alternative to pinning MRENCLAVE across upgrades);
    - `tdx_rtmrs`: required RTMR values, index -> hex;
    - `snp_min_tcb`: minimum REPORTED_TCB components (e.g. {"snp": 8, "microcode": 115});
      `snp_min_guest_svn`: minimum guest SVN; `snp_allowed_vmpls`: VMPLs accepted.
    """

    allowed_measurements: frozenset[str] | None = None
    allow_simulated: bool = False
    allow_debug: bool = False
    allowed_tcb_statuses: frozenset[str] = frozenset({"UpToDate"})
    allowed_advisories: frozenset[str] = frozenset()
    extra: dict = field(default_factory=dict)
    allowed_kinds: frozenset[str] | None = None
    allowed_entries: frozenset[str] | None = None
    sgx_mrsigners: frozenset[str] | None = None
    sgx_isvprodid: int | None = None
    sgx_min_isvsvn: int | None = None
    tdx_rtmrs: Mapping[int, str] = field(default_factory=dict)
    snp_min_tcb: Mapping[str, int] = field(default_factory=dict)
    snp_min_guest_svn: int | None = None
    snp_allowed_vmpls: frozenset[int] | None = None

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Policy:
        """Build a policy from JSON (e.g. `veil attest verify --policy FILE`); unknown keys refused."""
        known = {f for f in cls.__dataclass_fields__ if f != "extra"} | {"report_data"}
        unknown = set(obj) - known
        if unknown:
            raise ValueError(f"policy: unknown keys {sorted(unknown)} (known: {sorted(known)})")

        def fs(name: str, conv: Any = str) -> frozenset | None:
            value = obj.get(name)
            if value is None:
                return None
            if isinstance(value, str) or not isinstance(value, Iterable):
                raise ValueError(f"policy.{name}: must be a list")
            return frozenset(conv(v).lower() if conv is str else conv(v) for v in value)

        kwargs: dict[str, Any] = {}
        for name in ("allowed_measurements", "allowed_kinds", "allowed_entries", "sgx_mrsigners"):
            kwargs[name] = fs(name)
        for name in ("allowed_tcb_statuses", "allowed_advisories"):
            if name in obj:
                kwargs[name] = frozenset(str(v) for v in obj[name])
        if obj.get("snp_allowed_vmpls") is not None:
            kwargs["snp_allowed_vmpls"] = fs("snp_allowed_vmpls", int)
        for name in ("allow_simulated", "allow_debug"):
            if name in obj:
                kwargs[name] = bool(obj[name])
        for name in ("sgx_isvprodid", "sgx_min_isvsvn", "snp_min_guest_svn"):
            if obj.get(name) is not None:
                kwargs[name] = int(obj[name])
        if obj.get("tdx_rtmrs"):
            kwargs["tdx_rtmrs"] = {int(k): str(v).lower() for k, v in obj["tdx_rtmrs"].items()}
        if obj.get("snp_min_tcb"):
            kwargs["snp_min_tcb"] = {str(k): int(v) for k, v in obj["snp_min_tcb"].items()}
        for entry in kwargs.get("allowed_entries") or ():
            parse_entry(entry)
        return cls(**kwargs)


def validate(report: VerifiedReport, policy: Policy, expected_report_data: bytes | None = None) -> None:
    """Raise PolicyError unless `report` satisfies `policy` and binds `expected_report_data`."""
    if report.kind == "sim":
        if not policy.allow_simulated:
            raise PolicyError("kind", "simulated attestation is not allowed by this configuration", actual="sim")
        log.warning("accepting SIMULATED attestation evidence (allow_simulated is on)")
    if policy.allowed_kinds is not None and report.kind not in policy.allowed_kinds:
        raise PolicyError(
            "kind", "evidence kind not allowed", expected=sorted(policy.allowed_kinds), actual=report.kind
        )
    if report.debug and not policy.allow_debug:
        where = {"sgx-dcap": "ATTRIBUTES.DEBUG", "tdx": "TDATTRIBUTES.DEBUG", "sev-snp": "guest policy DEBUG (bit 19)"}
        reason = f"debug-mode TEE refused ({where.get(report.kind, 'debug flag')} is set)"
        raise PolicyError("debug", reason, expected=False, actual=True)
    if report.kind in ("sgx-dcap", "tdx") and report.tcb_status not in policy.allowed_tcb_statuses:
        reason = "TCB status not allowed"
        if report.tcb_status == "NotEvaluated":
            reason += (
                " (a debug-mode quote's TCB level is not rated by dcap-qvl;"
                " add 'NotEvaluated' to allowed_tcb_statuses to accept debug quotes)"
            )
        raise PolicyError(
            "tcb_status",
            reason,
            expected=sorted(policy.allowed_tcb_statuses),
            actual=report.tcb_status,
        )
    unexpected = [a for a in report.advisories if a not in policy.allowed_advisories]
    if unexpected:
        raise PolicyError(
            "advisories", "unaccepted advisories", expected=sorted(policy.allowed_advisories), actual=unexpected
        )
    if policy.allowed_measurements is not None and report.measurement not in policy.allowed_measurements:
        raise PolicyError(
            "measurement",
            "not in the allowed set",
            expected=sorted(policy.allowed_measurements),
            actual=report.measurement,
        )
    if policy.allowed_entries is not None:
        _validate_entries(report, policy.allowed_entries)
    if report.kind == "sgx-dcap":
        _validate_sgx(report, policy)
    elif report.kind == "tdx":
        for index, value in sorted(policy.tdx_rtmrs.items()):
            actual = report.claims.get(f"rtmr{index}")
            if not isinstance(actual, str) or actual != value.lower():
                raise PolicyError(
                    f"rtmr{index}", "TDX runtime measurement register differs", expected=value.lower(), actual=actual
                )
    elif report.kind == "sev-snp":
        _validate_snp(report, policy)
    if expected_report_data is not None:
        padded = expected_report_data.ljust(len(report.report_data), b"\0")
        if not hmac.compare_digest(padded, report.report_data):
            raise PolicyError(
                "report_data",
                "does not bind the expected value",
                expected=expected_report_data.hex(),
                actual=report.report_data.hex(),
            )


def _validate_entries(report: VerifiedReport, entries: frozenset[str]) -> None:
    failures = []
    for entry in sorted(entries):
        missed = mismatches(report, entry)
        if not missed:
            return
        failures.append(f"{entry}: " + "; ".join(f"{f} expected {e!r} got {a!r}" for f, e, a in missed))
    raise PolicyError("allowed_entries", "no allow-list entry matches", expected=sorted(entries), actual=failures)


def _validate_sgx(report: VerifiedReport, policy: Policy) -> None:
    claims = report.claims
    if policy.sgx_mrsigners is not None and claims.get("mrsigner") not in policy.sgx_mrsigners:
        raise PolicyError(
            "mrsigner",
            "enclave signer not allowed",
            expected=sorted(policy.sgx_mrsigners),
            actual=claims.get("mrsigner"),
        )
    if policy.sgx_isvprodid is not None and claims.get("isvprodid") != policy.sgx_isvprodid:
        raise PolicyError(
            "isvprodid", "enclave product id differs", expected=policy.sgx_isvprodid, actual=claims.get("isvprodid")
        )
    svn = claims.get("isvsvn")
    if policy.sgx_min_isvsvn is not None and (not isinstance(svn, int) or svn < policy.sgx_min_isvsvn):
        raise PolicyError(
            "isvsvn", "enclave security version too low", expected=f">= {policy.sgx_min_isvsvn}", actual=svn
        )


def _validate_snp(report: VerifiedReport, policy: Policy) -> None:
    claims = report.claims
    reported = claims.get("reported_tcb") or {}
    for component, minimum in sorted(policy.snp_min_tcb.items()):
        actual = reported.get(component)
        if not isinstance(actual, int) or actual < minimum:
            raise PolicyError(
                f"reported_tcb.{component}",
                "SNP TCB component below the minimum",
                expected=f">= {minimum}",
                actual=actual,
            )
    svn = claims.get("guest_svn")
    if policy.snp_min_guest_svn is not None and (not isinstance(svn, int) or svn < policy.snp_min_guest_svn):
        raise PolicyError(
            "guest_svn", "guest security version too low", expected=f">= {policy.snp_min_guest_svn}", actual=svn
        )
    if policy.snp_allowed_vmpls is not None and claims.get("vmpl") not in policy.snp_allowed_vmpls:
        raise PolicyError(
            "vmpl",
            "report requested from a VMPL not allowed",
            expected=sorted(policy.snp_allowed_vmpls),
            actual=claims.get("vmpl"),
        )
