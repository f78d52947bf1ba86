"""`veil attest ...`: verify attestation evidence and show which provider this machine has."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from veil.attest.errors import AttestationError, PolicyError, VerificationError
from veil.attest.evidence import KINDS, Evidence


@click.group("attest", context_settings={"help_option_names": ["-h", "--help"]})
def attest() -> None:
    """Verify attestation evidence (sim, SGX, TDX, SEV-SNP) and inspect the local TEE."""


def _parse_time(value: str | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO-8601 time", param_hint="--at") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def load_evidence(data: bytes, kind: str | None) -> tuple[Evidence, dict[str, Any]]:
    """Evidence from a file's bytes: Evidence JSON, an RA-TLS certificate, or a raw quote/report.

    Returns the evidence and notes for the verdict (e.g. the RA-TLS formats found).
    """
    from veil.attest import dcap, snp

    notes: dict[str, Any] = {}
    stripped = data.lstrip()
    if stripped.startswith(b"{"):
        return Evidence.from_json(json.loads(data)), {"format": "evidence-json"}
    if stripped.startswith(b"-----BEGIN CERTIFICATE") or (
        data[:1] == b"\x30" and kind is None and not dcap.detect_kind(data)
    ):
        from veil.attest.ratls import extract_evidence

        found = extract_evidence(data)
        notes = {
            "format": "ra-tls-certificate",
            "ratls_formats": list(found.formats),
            "ratls_public_key_sha256": _sha256(found.public_key_spki),
        }
        return found.evidence, notes
    detected = dcap.detect_kind(data) or ("sev-snp" if snp.detect(data) else None)
    kind = kind or detected
    if kind is None:
        raise VerificationError("evidence", "cannot tell the kind of this file: pass --kind")
    report_data = b""
    if kind in ("sgx-dcap", "tdx") and detected == kind:
        report_data = dcap.parse_quote(data).report_data
    elif kind == "sev-snp" and detected == kind:
        report_data = data[0x50:0x90]
    return Evidence(kind=kind, raw=data, report_data=report_data), {"format": "raw"}


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _trust(kind: str, collateral: tuple[Path, ...], pccs: str | None, cache_dir: Path | None) -> Any:
    from veil.attest.collateral import OfflineCollateral, PccsCollateral
    from veil.attest.verify import TrustConfig

    trust = TrustConfig()
    if kind == "sev-snp":
        if collateral:
            trust.options["snp_certs"] = [p.read_bytes() for p in collateral]
    elif kind in ("sgx-dcap", "tdx"):
        if len(collateral) > 1:
            raise click.BadParameter("DCAP quotes take one collateral JSON file", param_hint="--collateral")
        if collateral:
            trust.collateral = OfflineCollateral.for_kinds(collateral[0].read_bytes(), kind)
        elif pccs:
            trust.collateral = PccsCollateral(pccs, cache_dir=cache_dir)
    return trust


def _error_json(exc: AttestationError) -> dict[str, Any]:
    return {
        "field": exc.field,
        "reason": exc.reason,
        "expected": _jsonable(exc.expected),
        "actual": _jsonable(exc.actual),
    }


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


@attest.command("verify")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--collateral",
    "collateral",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="DCAP collateral JSON (SGX/TDX), or VCEK/ASK/ARK certificates (SEV-SNP; repeatable).",
)
@click.option("--pccs", default=None, help="Fetch DCAP collateral from this PCCS URL when no --collateral is given.")
@click.option(
    "--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Cache fetched collateral here."
)
@click.option("--at", "at", default=None, help="Verification time, ISO-8601 (default: now). Collateral expires.")
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Policy JSON (fields of veil.attest.validate.Policy, plus report_data hex).",
)
@click.option(
    "--kind", type=click.Choice([k for k in KINDS if k != "sim"]), default=None, help="Evidence kind if not detectable."
)
@click.option(
    "--report-data", "report_data_hex", default=None, help="Expected report data (hex); refused if not bound."
)
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
def verify_cmd(
    file: Path,
    collateral: tuple[Path, ...],
    pccs: str | None,
    cache_dir: Path | None,
    at: str | None,
    policy_file: Path | None,
    kind: str | None,
    report_data_hex: str | None,
    as_json: bool,
) -> None:
    """Verify FILE (a raw quote/report, Evidence JSON or RA-TLS certificate) and print a verdict.

    Exit status: 0 accepted, 1 refused (not genuine, or against the policy), 2 usage error.
    """
    from veil.attest.validate import Policy, validate
    from veil.attest.verify import verify

    now = _parse_time(at)
    verdict: dict[str, Any] = {"file": str(file), "at": now.isoformat(), "accepted": False}
    try:
        policy = None
        expected_rd = bytes.fromhex(report_data_hex) if report_data_hex else None
        if policy_file is not None:
            obj = json.loads(policy_file.read_text())
            if "report_data" in obj and expected_rd is None:
                expected_rd = bytes.fromhex(obj["report_data"])
            policy = Policy.from_json({k: v for k, v in obj.items() if k != "report_data"})
        evidence, notes = load_evidence(file.read_bytes(), kind)
        verdict.update(notes)
        verdict["kind"] = evidence.kind
        report = verify(evidence, _trust(evidence.kind, collateral, pccs, cache_dir), now)
        verdict["genuine"] = True
        verdict["report"] = report.summary()
        if policy is not None or expected_rd is not None:
            validate(report, policy or Policy(), expected_rd)
            verdict["policy"] = "satisfied"
        else:
            verdict["policy"] = "not checked (no --policy or --report-data)"
        verdict["accepted"] = True
    except VerificationError as exc:
        verdict.update(genuine=False, stage="verify", error=_error_json(exc))
    except PolicyError as exc:
        verdict.update(stage="validate", error=_error_json(exc))
    except AttestationError as exc:
        verdict.update(stage="evidence", error=_error_json(exc))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(verdict, indent=2, sort_keys=True))
    else:
        _print_readable(verdict)
    sys.exit(0 if verdict["accepted"] else 1)


def _print_readable(verdict: dict[str, Any]) -> None:
    if verdict["accepted"]:
        click.echo(f"ACCEPTED  {verdict['kind']} evidence is genuine at {verdict['at']}")
    else:
        stage = {"verify": "NOT GENUINE", "validate": "REFUSED BY POLICY", "evidence": "UNREADABLE"}[verdict["stage"]]
        click.echo(f"{stage}  {verdict.get('kind', '?')} evidence at {verdict['at']}")
        err = verdict["error"]
        click.echo(f"  failed:      {err['field']}: {err['reason']}")
        if err["expected"] is not None or err["actual"] is not None:
            click.echo(f"  expected:    {err['expected']}")
            click.echo(f"  actual:      {err['actual']}")
    report = verdict.get("report")
    if report:
        click.echo(f"  measurement: {report['measurement']}")
        click.echo(
            f"  tcb status:  {report['tcb_status']}"
            + (f"  advisories: {', '.join(report['advisories'])}" if report["advisories"] else "")
        )
        click.echo(f"  debug:       {report['debug']}")
        click.echo(f"  report data: {report['report_data']}")
        claims = report["claims"]
        for key in (
            "mrsigner",
            "isvprodid",
            "isvsvn",
            "rtmr0",
            "rtmr1",
            "rtmr2",
            "rtmr3",
            "product",
            "signing_key",
            "reported_tcb",
            "chip_id",
            "collateral_next_update",
        ):
            if key in claims:
                click.echo(f"  {key + ':':<12} {claims[key]}")
    if "policy" in verdict:
        click.echo(f"  policy:      {verdict['policy']}")


@attest.command("provider")
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/"),
    show_default=True,
    help="Filesystem root to probe (for containers with host paths mounted elsewhere).",
)
def provider_cmd(root: Path) -> None:
    """Say which evidence provider this machine would use (Gramine SGX, configfs-tsm, none)."""
    from veil.attest.providers import select_provider

    try:
        provider = select_provider(root=root)
    except AttestationError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(provider.describe())
