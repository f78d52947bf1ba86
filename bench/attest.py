"""`veil bench attest`: time verification of the real SGX, TDX and SEV-SNP vectors.

Each figure is the median over N runs (default 200) of `veil.attest.verify.verify` on one
vector, with the collateral supplied offline and the time pinned to when it was valid. Two
regimes are reported:

- `*_verify_ms` (steady state): what a KeyService sees verifying evidence from machines it has
  seen before; certificate-chain signature checks are memoised per (certificate, issuer) pair;
- `*_verify_cold_ms`: those memos cleared before every run, i.e. the first evidence from a new
  platform.

Target: <= 5 ms each. Vectors are read from ../shared/attest-vectors beside the checkout, or
`--vectors DIR`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from veil.attest import dcap, snp
from veil.attest.collateral import DcapCollateral
from veil.attest.evidence import Evidence
from veil.attest.verify import TrustConfig, verify

DEFAULT_VECTORS = Path(__file__).resolve().parents[1] / ".." / "shared" / "attest-vectors"


def _clear_memos() -> None:
    """Forget everything memoised across verifications (parsed collateral, chain checks)."""
    DcapCollateral.parse.cache_clear()
    dcap._CHAINS_OK.clear()
    dcap._pem_chain_cached.cache_clear()
    dcap._issued_by.cache_clear()
    dcap._load_cert_cached.cache_clear()
    dcap._load_crl.cache_clear()
    snp._signed_by.cache_clear()


def _time(fn: Callable[[], object], n: int, cold: bool) -> list[float]:
    samples = []
    for _ in range(n):
        if cold:
            _clear_memos()
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000.0)
    return samples


def cases(vectors: Path) -> dict[str, Callable[[], object]]:
    """name -> a zero-argument call verifying that vector (checked once here to fail early)."""
    sgx = Evidence(
        kind="sgx-dcap",
        raw=(vectors / "sgx/sgx_quote").read_bytes(),
        report_data=b"",
        collateral=(vectors / "sgx/sgx_quote_collateral.json").read_bytes(),
    )
    tdx = Evidence(
        kind="tdx",
        raw=(vectors / "tdx/tdx_quote").read_bytes(),
        report_data=b"",
        collateral=(vectors / "tdx/tdx_quote_collateral.json").read_bytes(),
    )
    snp_ev = Evidence(kind="sev-snp", raw=(vectors / "snp/attestation.bin").read_bytes(), report_data=b"")
    snp_trust = TrustConfig(
        options={
            "snp_certs": [(vectors / "snp/vcek.der").read_bytes(), (vectors / "snp/ask_ark_milan.pem").read_bytes()]
        }
    )
    sgx_at = datetime.fromisoformat("2025-06-19T11:56:00+00:00")
    tdx_at = datetime.fromisoformat("2025-06-19T11:16:00+00:00")
    snp_at = datetime.fromisoformat("2025-06-19T12:00:00+00:00")
    trust = TrustConfig()
    out: dict[str, Callable[[], object]] = {
        "sgx": lambda: verify(sgx, trust, sgx_at),
        "tdx": lambda: verify(tdx, trust, tdx_at),
        "snp": lambda: verify(snp_ev, snp_trust, snp_at),
    }
    expected = {"sgx": "ConfigurationAndSWHardeningNeeded", "tdx": "UpToDate", "snp": "NotRated"}
    for name, fn in out.items():
        status = fn().tcb_status  # type: ignore[attr-defined]
        if status != expected[name]:
            raise SystemExit(f"{name}: unexpected verification result {status!r}")
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="veil bench attest", description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_path", type=Path, help="write the results here")
    parser.add_argument("-n", type=int, default=200, help="runs per vector (median of these; >= 100)")
    parser.add_argument("--vectors", type=Path, default=DEFAULT_VECTORS, help="attest-vectors folder")
    args = parser.parse_args(argv)
    if args.n < 100:
        parser.error("-n must be at least 100")
    if not (args.vectors / "sgx/sgx_quote").exists():
        print(f"attestation vectors not found at {args.vectors.resolve()}")
        return 2
    results: dict[str, object] = {}
    for name, fn in cases(args.vectors).items():
        _time(fn, 10, cold=False)  # warm-up
        warm = _time(fn, args.n, cold=False)
        cold = _time(fn, args.n, cold=True)
        results[f"{name}_verify_ms"] = round(statistics.median(warm), 3)
        results[f"{name}_verify_p90_ms"] = round(statistics.quantiles(warm, n=10)[-1], 3)
        results[f"{name}_verify_cold_ms"] = round(statistics.median(cold), 3)
    results.update(n=args.n, target_ms=5.0, python=platform.python_version(), machine=platform.machine())
    for key in ("sgx", "tdx", "snp"):
        ok = "ok" if results[f"{key}_verify_ms"] <= 5.0 else "OVER TARGET"
        print(f"{key}: median {results[f'{key}_verify_ms']} ms (cold {results[f'{key}_verify_cold_ms']} ms) [{ok}]")
    if args.json_path:
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.json_path}")
    return 0
