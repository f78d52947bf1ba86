"""A DCAP quote cut to any length is refused with a VerificationError naming the quote field, never
struct.error/IndexError/ValueError. Inputs: the real SGX v3 and TDX v4 vectors, and TDX v5 quotes
built from the v4 vector as the v5 layout specifies (Intel TDX DCAP Quoting Library API: header
version 5, then a body descriptor `u16 type, u32 size` before the body: type 2 = TD report 1.0,
584 bytes; type 3 = TD report 1.5, 648 bytes = 1.0 + TEE_TCB_SVN2 (16) + MRSERVICETD (48))."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from attest_helpers import SGX_TIME, TDX_TIME, load_vector

from veil.attest import dcap
from veil.attest.errors import AttestationError, VerificationError
from veil.attest.evidence import Evidence
from veil.attest.verify import TrustConfig, verify


def v5_from_v4(v4: bytes, body_type: int = 2) -> bytes:
    """The v4 TDX quote as a v5 quote: version 5 and a body descriptor (type 2 or 3) after the header."""
    assert struct.unpack_from("<H", v4, 0)[0] == 4
    body = v4[dcap.HEADER_LEN : dcap.HEADER_LEN + dcap.TD10_REPORT_LEN]
    if body_type == 3:
        body += bytes(dcap.TD15_REPORT_LEN - dcap.TD10_REPORT_LEN)  # TEE_TCB_SVN2, MRSERVICETD = 0
    header = struct.pack("<H", 5) + v4[2 : dcap.HEADER_LEN]
    return header + struct.pack("<HI", body_type, len(body)) + body + v4[dcap.HEADER_LEN + dcap.TD10_REPORT_LEN :]


def _quotes() -> dict[str, bytes]:
    tdx = load_vector("tdx/tdx_quote")
    return {
        "sgx-v3": load_vector("sgx/sgx_quote"),
        "tdx-v4": tdx,
        "tdx-v5-td10": v5_from_v4(tdx, 2),
        "tdx-v5-td15": v5_from_v4(tdx, 3),
    }


def test_v5_shaped_quotes_parse_through_the_v5_branch() -> None:
    quotes = _quotes()
    for name, body_type, body_len in (("tdx-v5-td10", 2, 584), ("tdx-v5-td15", 3, 648)):
        quote = dcap.parse_quote(quotes[name])
        assert (quote.version, quote.kind, quote.body_type, len(quote.body)) == (5, "tdx", body_type, body_len)
        assert quote.regions["body_descriptor"] == (48, 54)
        assert quote.report_data == dcap.parse_quote(quotes["tdx-v4"]).report_data


@pytest.mark.parametrize("length", [52, 53])
def test_v5_quote_cut_inside_the_body_descriptor(length: int) -> None:
    """The reported case: 52-53 bytes pass the minimum-size check and reached struct.error."""
    raw = _quotes()["tdx-v5-td10"][:length]
    with pytest.raises(VerificationError) as info:
        dcap.parse_quote(raw)
    assert info.value.field == "quote.body_descriptor"
    assert info.value.reason == "truncated" and info.value.actual == length


@pytest.mark.parametrize("name", ["sgx-v3", "tdx-v4", "tdx-v5-td10", "tdx-v5-td15"])
def test_every_truncation_is_a_named_verification_error(name: str) -> None:
    raw = _quotes()[name]
    full = dcap.parse_quote(raw)
    sig_end = full.regions["trailing"][0]
    for length in range(len(raw) + 1):
        cut = raw[:length]
        try:
            quote = dcap.parse_quote(cut)
        except VerificationError as exc:
            assert exc.field.startswith("quote"), (length, str(exc))
            assert length < sig_end, (length, str(exc))  # only a cut into the signature data fails
        else:
            assert length >= sig_end, length  # bytes after the signature data are padding
            assert quote.regions["signature_data_len"] == full.regions["signature_data_len"]
        dcap.detect_kind(cut)  # total too: None or a kind


@pytest.mark.parametrize("name", ["sgx-v3", "tdx-v4", "tdx-v5-td10"])
def test_verify_refuses_every_truncation_cleanly(name: str) -> None:
    raw = _quotes()[name]
    if name == "sgx-v3":
        kind, now, col = "sgx-dcap", SGX_TIME, load_vector("sgx/sgx_quote_collateral.json")
    else:
        kind, now, col = "tdx", TDX_TIME, load_vector("tdx/tdx_quote_collateral.json")
    evidence = Evidence(kind=kind, raw=raw, report_data=b"", collateral=col)
    sig_end = dcap.parse_quote(raw).regions["trailing"][0]
    for length in range(len(raw)):
        if length > sig_end and length % 16:  # past the signature data, sample: each is a full verification
            continue
        try:
            verify(replace(evidence, raw=raw[:length]), TrustConfig(), now)
        except AttestationError as exc:
            assert isinstance(exc, VerificationError), (length, repr(exc))
            assert exc.field.startswith("quote"), (length, str(exc))
        else:
            assert name == "tdx-v4" and length >= sig_end, length  # only padding may go
