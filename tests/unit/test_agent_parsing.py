"""Runbook: how the agent probe reads Dogtag getStatus (PKI 11 JSON / PKI 10 XML) and getInfo."""

from __future__ import annotations

import pytest

from ca_watchdog.probes.agent import (
    AgentInfo,
    parse_info_body,
    parse_status_body,
    safe_xml,
    status_from_answer,
)

PKI11 = b'{"Response":{"State":"1","Type":"CA","Status":"running","Version":"11.5.0"}}'
PKI11_PRODUCT = (
    b'{"Response":{"State":"1","Type":"CA","Status":"running","Version":"11.5.0-1.fc38",'
    b'"ProductVersion":"Dogtag Certificate System"}}'
)
PKI10 = (
    b'<?xml version="1.0" encoding="UTF-8" standalone="no"?><XMLResponse><State>1</State>'
    b"<Type>CA</Type><Status>running</Status><Version>10.10.5</Version></XMLResponse>"
)
BILLION_LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
    b"<XMLResponse><State>1</State><Status>&lol2;</Status></XMLResponse>"
)
EXTERNAL_ENTITY = (
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    b"<XMLResponse><Status>&x;</Status></XMLResponse>"
)


def info_xml(**header: str) -> bytes:
    fields = "".join(f"<{k}>{v}</{k}>" for k, v in header.items())
    head = '<?xml version="1.0" encoding="UTF-8"?>'
    return f"{head}<xml><header>{fields}</header><fixed/><records/></xml>".encode()


def test_pki11_json_running_is_healthy() -> None:
    st = status_from_answer(200, PKI11, 0.01)
    assert (st.status, st.reason, st.http_status) == ("running", None, 200)
    assert (st.version, st.state) == ("11.5.0", "1")
    assert st.healthy and st.latency == 0.01


def test_pki11_json_with_product_version() -> None:
    doc = parse_status_body(PKI11_PRODUCT)
    assert (doc.status, doc.state, doc.version, doc.type) == ("running", "1", "11.5.0-1.fc38", "CA")


def test_pki10_xml_running_is_healthy() -> None:
    st = status_from_answer(200, PKI10, 0.02)
    assert (st.status, st.version, st.state) == ("running", "10.10.5", "1")


@pytest.mark.parametrize(
    "body",
    [
        PKI11.replace(b"running", b"starting"),
        PKI10.replace(b"running", b"starting"),
    ],
)
def test_starting_is_reported_as_starting_and_not_healthy(body: bytes) -> None:
    st = status_from_answer(200, body, 0.0)
    assert st.status == "starting" and not st.healthy and st.reason is None


def test_state_0_not_configured_is_down() -> None:
    st = status_from_answer(200, PKI11.replace(b'"State":"1"', b'"State":"0"'), 0.0)
    assert st.status == "down" and st.reason is not None and "State '0'" in st.reason


def test_unknown_status_text_is_down() -> None:
    st = status_from_answer(200, PKI11.replace(b"running", b"stopping"), 0.0)
    assert st.status == "down" and st.reason == "Status 'stopping'"


def test_http_503_with_html_is_down() -> None:
    st = status_from_answer(503, b"<html><body>Service Temporarily Unavailable</body></html>", 0.0)
    assert (st.status, st.reason, st.http_status) == ("down", "HTTP 503", 503)


def test_http_200_running_body_but_404_code_is_down() -> None:
    assert status_from_answer(404, PKI11, 0.0).reason == "HTTP 404"


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\x17<<garbage{{",
        b"",
        b"null",
        b"[1, 2]",
        b'{"Status":"running"}',  # no Response wrapper
        b'{"Response":{"State":"1"}}',  # no Status
        b"<html><body>running</body></html>",  # wrong XML root
        b"<XMLResponse><State>1</State></XMLResponse>",  # no Status
        BILLION_LAUGHS,
        EXTERNAL_ENTITY,
    ],
)
def test_unparseable_bodies_are_down(body: bytes) -> None:
    st = status_from_answer(200, body, 0.0)
    assert st.status == "down" and st.reason is not None and st.reason.startswith("bad answer: ")


def test_xml_with_dtd_is_refused_before_parsing() -> None:
    with pytest.raises(ValueError, match="DTD"):
        safe_xml(BILLION_LAUGHS)
    with pytest.raises(ValueError, match="DTD"):
        safe_xml(EXTERNAL_ENTITY.replace(b"DOCTYPE", b"doctype"))


def test_getinfo_of_a_master() -> None:
    body = info_xml(crlIssuingPoints="MasterCRL", crlNumbers="42", master_host="", master_port="")
    assert parse_info_body(body) == AgentInfo(None, None, {"MasterCRL": 42}, ok=True, error=None)


def test_getinfo_of_a_clone_with_two_issuing_points() -> None:
    body = info_xml(
        crlIssuingPoints="MasterCRL+UserCRL",
        crlNumbers="7+3",
        master_host="ca1.example.com",
        master_port="8443",
    )
    info = parse_info_body(body)
    assert (info.master_host, info.master_port, info.crl_numbers, info.ok) == (
        "ca1.example.com",
        8443,
        {"MasterCRL": 7, "UserCRL": 3},
        True,
    )


def test_getinfo_issuing_point_without_number_is_left_out() -> None:
    info = parse_info_body(info_xml(crlIssuingPoints="MasterCRL+New", crlNumbers="7+", master_host=""))
    assert info.crl_numbers == {"MasterCRL": 7}


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (info_xml(master_host="h", master_port="84x3", crlIssuingPoints="MasterCRL"), "master_port"),
        (b"<html><header/></html>", "envelope"),
        (b"not xml at all", "invalid XML"),
        (BILLION_LAUGHS, "DTD"),
    ],
)
def test_getinfo_errors_are_reported_not_raised(body: bytes, error: str) -> None:
    info = parse_info_body(body)
    assert not info.ok and info.error is not None and error in info.error
