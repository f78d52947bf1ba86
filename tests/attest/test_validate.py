"""Policy: allow-list entries (`matches`) and `validate`, each refusal naming its field."""

from __future__ import annotations

import pytest

from veil.attest.errors import PolicyError
from veil.attest.evidence import VerifiedReport
from veil.attest.validate import Policy, matches, parse_entry, validate

MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
MRSIGNER = "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
MRTD = "91" * 48
RTMR0 = "44" * 48


def sgx(**kw) -> VerifiedReport:
    claims = {"mrenclave": MRENCLAVE, "mrsigner": MRSIGNER, "isvprodid": 7, "isvsvn": 3}
    claims.update(kw.pop("claims", {}))
    base = dict(kind="sgx-dcap", measurement=MRENCLAVE, report_data=b"\x01" * 64, debug=False, claims=claims)
    base.update(kw)
    return VerifiedReport(**base)


def tdx() -> VerifiedReport:
    claims = {"mrtd": MRTD, "rtmr0": RTMR0, "rtmr1": "00" * 48, "rtmr2": "00" * 48, "rtmr3": "00" * 48}
    return VerifiedReport(kind="tdx", measurement=MRTD, report_data=b"\0" * 64, debug=False, claims=claims)


def snp_report() -> VerifiedReport:
    return VerifiedReport(
        kind="sev-snp",
        measurement="b0" * 48,
        report_data=b"\0" * 64,
        debug=False,
        tcb_status="NotRated",
        claims={"guest_svn": 2, "host_data": "00" * 32, "reported_tcb": {"snp": 8}, "vmpl": 0},
    )


def test_plain_hex_entry_matches_primary_measurement_any_case() -> None:
    assert matches(sgx(), MRENCLAVE)
    assert matches(sgx(), MRENCLAVE.upper())
    assert not matches(sgx(), MRSIGNER)
    assert matches(tdx(), MRTD)


def test_structured_sgx_entries() -> None:
    assert matches(sgx(), f"sgx:mrsigner={MRSIGNER},isvprodid=7,min_isvsvn=3")
    assert matches(sgx(), f"sgx:mrenclave={MRENCLAVE}")
    assert not matches(sgx(), f"sgx:mrsigner={MRSIGNER},isvprodid=7,min_isvsvn=4")
    assert not matches(sgx(), f"sgx:mrsigner={MRSIGNER},isvprodid=8")
    assert not matches(sgx(), f"sgx:mrsigner={'00' * 32}")
    assert not matches(tdx(), f"sgx:mrenclave={MRENCLAVE}")  # kind must match too


def test_structured_tdx_and_snp_entries() -> None:
    assert matches(tdx(), f"tdx:mrtd={MRTD},rtmr0={RTMR0}")
    assert not matches(tdx(), f"tdx:mrtd={MRTD},rtmr0={'00' * 48}")
    assert matches(snp_report(), f"snp:measurement={'b0' * 48},min_guest_svn=2")
    assert not matches(snp_report(), f"snp:measurement={'b0' * 48},min_guest_svn=3")
    assert not matches(snp_report(), f"tdx:mrtd={'b0' * 48}")


@pytest.mark.parametrize(
    "entry",
    [
        "",
        "xyz",
        "sgx:",
        "sgx:min_isvsvn=1",
        "sgx:mrsigner=zz",
        "sgx:isvprodid=-1,mrenclave=00",
        "tdx:rtmr9=00,mrtd=00",
        "nope:measurement=00",
        f"sgx:mrenclave={MRENCLAVE},mrenclave={MRENCLAVE}",
        "tdx:mrtd",
    ],
)
def test_malformed_entries_never_match_and_parse_entry_says_why(entry: str) -> None:
    with pytest.raises(ValueError, match="allow-list entry"):
        parse_entry(entry)
    assert matches(sgx(), entry) is False


def test_default_policy_refuses_non_uptodate_tcb_and_advisories() -> None:
    report = sgx(tcb_status="ConfigurationAndSWHardeningNeeded", advisories=("INTEL-SA-00289",))
    with pytest.raises(PolicyError) as info:
        validate(report, Policy())
    assert info.value.field == "tcb_status" and info.value.actual == "ConfigurationAndSWHardeningNeeded"
    with pytest.raises(PolicyError) as info:
        validate(report, Policy(allowed_tcb_statuses=frozenset({"ConfigurationAndSWHardeningNeeded"})))
    assert info.value.field == "advisories" and info.value.actual == ["INTEL-SA-00289"]
    validate(
        report,
        Policy(
            allowed_tcb_statuses=frozenset({"ConfigurationAndSWHardeningNeeded"}),
            allowed_advisories=frozenset({"INTEL-SA-00289"}),
        ),
    )


def test_sgx_signer_product_and_svn() -> None:
    validate(sgx(), Policy(sgx_mrsigners=frozenset({MRSIGNER}), sgx_isvprodid=7, sgx_min_isvsvn=3))
    with pytest.raises(PolicyError) as info:
        validate(sgx(), Policy(sgx_min_isvsvn=4))
    assert (info.value.field, info.value.expected, info.value.actual) == ("isvsvn", ">= 4", 3)
    with pytest.raises(PolicyError) as info:
        validate(sgx(), Policy(sgx_isvprodid=1))
    assert (info.value.field, info.value.expected, info.value.actual) == ("isvprodid", 1, 7)
    with pytest.raises(PolicyError) as info:
        validate(sgx(), Policy(sgx_mrsigners=frozenset({"00" * 32})))
    assert info.value.field == "mrsigner" and info.value.actual == MRSIGNER


def test_debug_measurement_rtmr_and_binding() -> None:
    with pytest.raises(PolicyError) as info:
        validate(sgx(debug=True), Policy())
    assert info.value.field == "debug" and "ATTRIBUTES.DEBUG" in info.value.reason
    with pytest.raises(PolicyError) as info:
        validate(sgx(), Policy(allowed_measurements=frozenset({"00" * 32})))
    assert info.value.field == "measurement" and info.value.actual == MRENCLAVE
    validate(tdx(), Policy(tdx_rtmrs={0: RTMR0}))
    with pytest.raises(PolicyError) as info:
        validate(tdx(), Policy(tdx_rtmrs={0: "ab" * 48}))
    assert (info.value.field, info.value.expected, info.value.actual) == ("rtmr0", "ab" * 48, RTMR0)
    validate(sgx(), Policy(), expected_report_data=b"\x01" * 64)
    with pytest.raises(PolicyError) as info:
        validate(sgx(), Policy(), expected_report_data=b"\x02" * 32)
    assert info.value.field == "report_data"


def test_allowed_entries_and_kinds() -> None:
    validate(sgx(), Policy(allowed_entries=frozenset({f"sgx:mrsigner={MRSIGNER},isvprodid=7", MRTD})))
    with pytest.raises(PolicyError) as info:
        validate(sgx(), Policy(allowed_entries=frozenset({f"sgx:mrsigner={MRSIGNER},min_isvsvn=9"})))
    assert info.value.field == "allowed_entries"
    assert "isvsvn expected '>= 9' got 3" in info.value.actual[0]
    with pytest.raises(PolicyError) as info:
        validate(sgx(), Policy(allowed_kinds=frozenset({"tdx"})))
    assert info.value.field == "kind"


def test_snp_tcb_status_is_not_rated_and_policy_uses_minimums() -> None:
    validate(snp_report(), Policy())  # "NotRated" is not judged by Intel's status list
    with pytest.raises(PolicyError) as info:
        validate(snp_report(), Policy(snp_min_guest_svn=3))
    assert info.value.field == "guest_svn"
    with pytest.raises(PolicyError) as info:
        validate(snp_report(), Policy(snp_allowed_vmpls=frozenset({1})))
    assert info.value.field == "vmpl"


def test_policy_from_json() -> None:
    policy = Policy.from_json(
        {
            "allowed_measurements": [MRENCLAVE.upper()],
            "sgx_min_isvsvn": 2,
            "tdx_rtmrs": {"0": RTMR0},
            "allowed_tcb_statuses": ["UpToDate", "SWHardeningNeeded"],
            "snp_min_tcb": {"snp": 8},
        }
    )
    assert policy.allowed_measurements == frozenset({MRENCLAVE})
    assert policy.tdx_rtmrs == {0: RTMR0} and policy.snp_min_tcb == {"snp": 8}
    assert policy.allow_debug is False and policy.allow_simulated is False
    with pytest.raises(ValueError, match="unknown keys"):
        Policy.from_json({"allow_everything": True})
    with pytest.raises(ValueError, match="allow-list entry"):
        Policy.from_json({"allowed_entries": ["sgx:min_isvsvn=1"]})
