"""`veil attest verify` on the real vectors: readable and JSON verdicts, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from attest_helpers import VECTORS
from click.testing import CliRunner

from veil.cli.attest import attest


@pytest.fixture
def vectors(sgx_quote: bytes) -> Path:  # the fixture skips when the vectors are absent
    return VECTORS


def run(*args: str):
    return CliRunner().invoke(attest, list(args))


def test_sgx_verdict_readable_and_json(vectors: Path) -> None:
    common = [
        str(vectors / "sgx/sgx_quote"),
        "--collateral",
        str(vectors / "sgx/sgx_quote_collateral.json"),
        "--at",
        "2025-06-19T11:56:00Z",
    ]
    result = run("verify", *common)
    assert result.exit_code == 0, result.output
    assert "ACCEPTED  sgx-dcap" in result.output
    assert "ConfigurationAndSWHardeningNeeded" in result.output and "INTEL-SA-00615" in result.output
    result = run("verify", *common, "--json")
    verdict = json.loads(result.output)
    assert verdict["accepted"] is True and verdict["kind"] == "sgx-dcap"
    assert verdict["report"]["advisories"] == ["INTEL-SA-00289", "INTEL-SA-00615"]


def test_expired_collateral_exits_1_naming_the_field(vectors: Path) -> None:
    result = run(
        "verify",
        str(vectors / "sgx/sgx_quote"),
        "--collateral",
        str(vectors / "sgx/sgx_quote_collateral.json"),
        "--json",
    )
    assert result.exit_code == 1
    verdict = json.loads(result.output)
    assert verdict["stage"] == "verify" and verdict["genuine"] is False
    assert verdict["error"]["field"].startswith("collateral.")


def test_tdx_up_to_date(vectors: Path) -> None:
    result = run(
        "verify",
        str(vectors / "tdx/tdx_quote"),
        "--collateral",
        str(vectors / "tdx/tdx_quote_collateral.json"),
        "--at",
        "2025-06-19T11:16:00Z",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["report"]["tcb_status"] == "UpToDate"


def test_snp_with_production_policy_refused_for_debug(vectors: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"allowed_kinds": ["sev-snp"]}))
    args = [
        str(vectors / "snp/attestation.bin"),
        "--collateral",
        str(vectors / "snp/vcek.der"),
        "--collateral",
        str(vectors / "snp/ask_ark_milan.pem"),
        "--at",
        "2025-06-19T12:00:00Z",
    ]
    result = run("verify", *args, "--policy", str(policy))
    assert result.exit_code == 1
    assert "REFUSED BY POLICY" in result.output and "debug" in result.output
    result = run("verify", *args, "--report-data", "0102030405")
    assert result.exit_code == 1  # debug is refused by the default policy too
    policy.write_text(json.dumps({"allow_debug": True, "report_data": "0102030405"}))
    result = run("verify", *args, "--policy", str(policy), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["policy"] == "satisfied"


def test_provider_command_reports_no_tee(tmp_path: Path) -> None:
    result = run("provider", "--root", str(tmp_path))
    assert result.exit_code == 1 and "no TEE found" in result.output
    (tmp_path / "sys/kernel/config/tsm/report").mkdir(parents=True)
    result = run("provider", "--root", str(tmp_path))
    # a plain directory is not configfs (mkdir creates no attributes): the probe fails, named
    assert result.exit_code == 1 and "tsm.provider" in result.output
