"""Runbook: what a real Dogtag 10.10.2 CA answers (recorded in tests/fixtures/real-dogtag), and how
the probes read it. Each finding of the first contact with a real CA has its test here; the same
findings are tested against the simulated CA (tests/integration/test_simca_fidelity.py) and the
real one (tests/real/).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ca_watchdog import cscfg
from ca_watchdog.probes.agent import (
    REASON_NO_ANSWER,
    REASON_REFUSED,
    AgentStatus,
    functional_problem,
    parse_info_body,
    status_from_answer,
)
from ca_watchdog.probes.directory import format_dogtag_number, parse_crl_record, parse_dogtag_number
from ca_watchdog.startup import StartupWatch

REAL = Path(__file__).parent.parent / "fixtures" / "real-dogtag"


def real(name: str) -> bytes:
    return (REAL / name).read_bytes()


# ---- finding 1: getInfo without a template is an error body with HTTP 200 ---------------------------


def test_getinfo_without_template_error_body_is_not_read_as_serving_as_master() -> None:
    info = parse_info_body(real("getInfo.no-template.xml"))
    assert not info.ok
    assert info.error is not None and "unexpectedError" in info.error
    assert info.error.startswith("bad answer:")


def test_getinfo_with_template_tells_the_real_master_from_the_real_clone() -> None:
    master = parse_info_body(real("getInfo.master.xml"))
    clone = parse_info_body(real("getInfo.clone.xml"))
    assert (master.ok, master.master_host, master.master_port, master.crl_numbers) == (
        True,
        None,
        None,
        {"MasterCRL": 1},
    )
    assert (clone.ok, clone.master_host, clone.master_port) == (True, "localhost", 8443)


def test_getinfo_of_a_demoted_master_names_its_new_master() -> None:
    info = parse_info_body(real("getInfo.demoted-master.xml"))
    assert info.ok and info.master_host == "localhost" and info.master_port == 9443


def test_getinfo_empty_body_with_its_database_down_is_no_answer() -> None:
    info = parse_info_body(real("getInfo.ds-down.body"))
    assert not info.ok and info.error == "bad answer: empty body"


@pytest.mark.parametrize("port", ["²", "٣", "84x3", "99999", "0"])
def test_getinfo_master_port_that_is_not_an_ascii_port_number_is_a_bad_answer(port: str) -> None:
    body = real("getInfo.clone.xml").replace(b"<master_port>8443<", f"<master_port>{port}<".encode())
    info = parse_info_body(body)
    assert not info.ok and info.error is not None and "master_port" in info.error


# ---- finding 5: getStatus is XML only in 10.10 --------------------------------------------------


def test_getstatus_answered_in_xml_even_to_accept_json_is_read_as_running() -> None:
    for name in ("getStatus.xml", "getStatus.accept-json.xml"):
        st = status_from_answer(200, real(name), 0.01)
        assert (st.status, st.version, st.state) == ("running", "10.10.2", "1")


# ---- finding 2: CRL numbers in LDAP carry a digit-count prefix ----------------------------------


@pytest.mark.parametrize(
    ("stored", "number"),
    [("011", 1), ("012", 2), ("015", 5), ("010", 0), ("02-1", -1), ("0210", 10), ("101234567890", 1234567890)],
)
def test_dogtag_ldap_numbers_are_decoded_from_their_length_prefix(stored: str, number: int) -> None:
    assert parse_dogtag_number(stored) == number
    assert format_dogtag_number(number) == stored


@pytest.mark.parametrize("stored", ["15", "5", "025", "01", "00", "0x1", "01²", "", "01-", "11" + "1" * 12])
def test_values_that_are_not_dogtag_numbers_are_refused(stored: str) -> None:
    with pytest.raises(ValueError, match="not a Dogtag LDAP number"):
        parse_dogtag_number(stored)


@given(st.integers(min_value=-(10**40), max_value=10**60))
def test_dogtag_number_encoding_round_trips_and_sorts_like_the_numbers(n: int) -> None:
    assert parse_dogtag_number(format_dogtag_number(n)) == n
    if n >= 0:  # the point of the encoding: LDAP string order is numeric order
        assert (format_dogtag_number(n) < format_dogtag_number(n + 1)) is True


def test_real_crl_issuing_point_record_crlnumber_011_is_crl_number_1() -> None:
    attrs: dict[str, list[str]] = {}
    for line in real("crlIssuingPoints.master.initial.ldif").decode().splitlines():
        key, sep, value = line.partition(": ")
        if sep and not key.endswith(":"):
            attrs.setdefault(key, []).append(value)
    rec = parse_crl_record("cn=MasterCRL,ou=crlIssuingPoints,ou=ca,o=pki-tomcat-CA", attrs)
    assert (rec.issuing_point, rec.crl_number) == ("MasterCRL", 1)
    assert rec.this_update is not None and rec.next_update is not None


# ---- finding 3: getStatus says running while the CA cannot serve ---------------------------------


def test_certificate_listing_500_with_its_database_down_is_a_functional_failure() -> None:
    body = json.dumps(
        {
            "ClassName": "com.netscape.certsrv.base.PKIException",
            "Code": 500,
            "Message": "Unable to list certificates: Failed to connect LDAP server Unable to connect to LDAP server",
        }
    ).encode()
    problem = functional_problem(500, body)
    assert problem is not None and problem.startswith("HTTP 500: Unable to list certificates")


@pytest.mark.parametrize(
    ("code", "body"),
    [
        (404, b"<html><title>HTTP Status 404 \xe2\x80\x93 Not Found</title></html>"),
        (200, b""),
        (200, b"<html>Unauthorized</html>"),
        (200, b'{"total": "7"}'),
        (200, b'{"total": true}'),
        (200, b"[" * 100_000),
    ],
)
def test_anything_but_a_certificate_listing_is_a_functional_failure(code: int, body: bytes) -> None:
    assert functional_problem(code, body) is not None


def test_a_certificate_listing_is_functional() -> None:
    assert functional_problem(200, b'{"total":7,"entries":[{"id":"0x1"}]}') is None


# ---- finding 4: no "starting" status; refused, then silent, then running --------------------------


def down(reason: str, http: int | None = None) -> AgentStatus:
    return AgentStatus("down", reason, http, None, None, 0.0)


RUNNING = AgentStatus("running", None, 200, "10.10.2", "1", 0.01)


def test_refused_then_silent_port_after_a_start_command_is_starting_not_a_failure() -> None:
    w = StartupWatch(start_timeout=180)
    w.start_issued(100.0)
    assert w.classify(down(REASON_REFUSED), 103.0).status == "starting"
    silent = w.classify(down(REASON_NO_ANSWER), 110.0)
    assert silent.status == "starting" and silent.reason is not None and "no answer yet" in silent.reason
    assert w.classify(RUNNING, 118.0).status == "running"
    # the start is over: a silent port now is a frozen CA
    assert w.classify(down(REASON_NO_ANSWER), 130.0).status == "down"


def test_a_port_that_refuses_again_during_the_start_is_a_ca_that_died_starting() -> None:
    w = StartupWatch(start_timeout=180)
    w.start_issued(0.0)
    assert w.classify(down(REASON_REFUSED), 2.0).status == "starting"
    assert w.classify(down(REASON_NO_ANSWER), 9.0).status == "starting"
    died = w.classify(down(REASON_REFUSED), 12.0)
    assert died.status == "down" and died.reason is not None and "died" in died.reason


def test_silent_port_without_a_start_command_is_a_failure() -> None:
    w = StartupWatch(start_timeout=180)
    assert w.classify(down(REASON_NO_ANSWER), 10.0).status == "down"
    assert w.classify(down(REASON_REFUSED), 10.0).status == "down"


def test_a_start_that_takes_longer_than_start_timeout_is_a_failure() -> None:
    w = StartupWatch(start_timeout=30)
    w.start_issued(0.0)
    assert w.classify(down(REASON_NO_ANSWER), 29.0).status == "starting"
    assert w.classify(down(REASON_NO_ANSWER), 31.0).status == "down"


def test_a_lasting_404_after_a_start_is_a_failed_engine_not_a_start() -> None:
    w = StartupWatch(start_timeout=180, failed_start_grace=10)
    w.start_issued(0.0)
    assert w.classify(down("HTTP 404", 404), 13.0).status == "starting"
    assert w.classify(down("HTTP 404", 404), 20.0).status == "starting"
    failed = w.classify(down("HTTP 404", 404), 24.0)
    assert failed.status == "down" and failed.reason is not None and "database" in failed.reason


def test_an_http_error_or_a_failed_database_read_after_a_start_is_not_hidden_as_starting() -> None:
    w = StartupWatch(start_timeout=180)
    w.start_issued(0.0)
    assert w.classify(down("HTTP 503", 503), 5.0).status == "down"
    assert w.classify(down("getStatus running, but the CA cannot serve: HTTP 500", 500), 5.0).status == "down"


# ---- finding 6: the CA rewrites CS.cfg in sorted order at every start ------------------------------


def test_a_sorted_rewrite_of_cscfg_changes_lines_but_not_keys_or_values() -> None:
    original = cscfg.parse(real("CS.cfg.master.real"), "CS.cfg.master.real")
    demoted = cscfg.demote(original, "localhost", 9443)
    # what the CA writes back at start: every key once, sorted (the keys demote appended move into place)
    last = {line.key: line.raw.rstrip("\n") for line in demoted.lines if line.key is not None}
    rewritten = cscfg.parse("".join(last[k] + "\n" for k in sorted(last)), "rewritten")
    assert rewritten.render() != demoted.render()  # the lines moved...
    assert cscfg.unrelated_items(rewritten) == cscfg.unrelated_items(original)  # ...the keys and values did not
    assert cscfg.classify(rewritten).role is cscfg.Role.CLONE


def test_pkispawn_master_without_status_interval_and_listener_lines_is_a_master() -> None:
    cfg = cscfg.parse(real("CS.cfg.master.real"), "CS.cfg.master.real")
    assert cfg.get(cscfg.KEY_STATUS_INTERVAL) is None and cfg.get(cscfg.KEY_LISTEN_CLONES) is None
    assert cscfg.classify(cfg).role is cscfg.Role.MASTER
    promoted_back = cscfg.promote(cscfg.demote(cfg, "localhost", 9443), cfg.crl_lines())
    assert cscfg.classify(promoted_back).role is cscfg.Role.MASTER
    assert promoted_back.get(cscfg.KEY_STATUS_INTERVAL) == "600"
    assert cscfg.unrelated_items(promoted_back) == cscfg.unrelated_items(cfg)


def test_a_changed_unrelated_value_is_seen_by_the_key_value_comparison() -> None:
    cfg = cscfg.parse(real("CS.cfg.clone.real"), "CS.cfg.clone.real")
    text = (
        real("CS.cfg.clone.real")
        .decode()
        .replace("dbs.enableSerialManagement=true", "dbs.enableSerialManagement=false")
    )
    assert cscfg.unrelated_items(cscfg.parse(text, "changed")) != cscfg.unrelated_items(cfg)
