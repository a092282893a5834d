"""Issue 10: fuzzing the parsers of hostile input (CS.cfg, getStatus, getInfo, LDAP attributes).

Each parser may raise only its own error type (CSCfgError, agent.BadAnswer, directory.BadAnswer);
anything else (RecursionError, OverflowError, TypeError, a bare ValueError) would end a cycle.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ca_watchdog import cscfg
from ca_watchdog.probes import agent, directory

FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# text close to what the parsers look for, so the fuzzer gets past the first check
TOKENS = st.sampled_from(
    [
        "ca.crl.MasterCRL.",
        "enable",
        "enableCRLCache",
        "enableCRLUpdates",
        "=",
        ":",
        "true",
        "false",
        "\\",
        "#",
        " ",
        "\t",
        "\n",
        "\r",
        "\r\n",
        "\x0c",
        "\x85",
        "\u2028",
        "\xa0",
        "²",
        "٣",
        "0",
        "600",
        "ca.certStatusUpdateInterval",
        "ca.listenToCloneModifications",
        "master.ca.agent.host",
        "\x00",
        "Infinity",
        "NaN",
        "{",
        "}",
        "[",
        "]",
        '"',
        "<",
        ">",
        "&",
        "%",
    ]
)
texts = st.one_of(st.text(max_size=200), st.lists(st.one_of(TOKENS, st.text(max_size=5)), max_size=60).map("".join))
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def deep(depth: int, open_: str, close: str) -> str:
    return open_ * depth + close * depth


@FUZZ
@given(st.one_of(texts, st.binary(max_size=300)))
def test_cscfg_parser_and_classifier_raise_only_cscfgerror(data: str | bytes) -> None:
    try:
        cfg = cscfg.parse(data, "/etc/pki/pki-tomcat/ca/CS.cfg")
    except cscfg.CSCfgError:
        return
    report = cscfg.classify(cfg)
    for transform in (
        lambda: cscfg.demote(cfg, "ca2.example.com", 8443),
        lambda: cscfg.promote(cfg, cfg.crl_lines() or ["ca.crl.MasterCRL.class=x"]),
    ):
        with contextlib.suppress(cscfg.CSCfgError):
            transform()
    assert report.role in tuple(cscfg.Role)


STATUS_KEYS = st.sampled_from(["Status", "State", "Version", "Type", "Response", "x"])


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps({"Response": v}).encode()),
        st.dictionaries(STATUS_KEYS, json_values, max_size=5).map(lambda d: json.dumps({"Response": d}).encode()),
        st.integers(1, 3000).map(
            lambda n: ('{"Response": {"Status": "running", "State": ' + deep(n, "[", "]") + "}}").encode()
        ),
        texts.map(
            lambda t: f"<XMLResponse><Status>{t}</Status><State>{t}</State></XMLResponse>".encode(errors="replace")
        ),
        texts.map(
            lambda t: f'<?xml version="1.0" encoding="UTF-16"?><XMLResponse>{t}</XMLResponse>'.encode(
                "utf-16", "replace"
            )
        ),
    )
)
def test_getstatus_parser_raises_only_bad_answer(body: bytes) -> None:
    with contextlib.suppress(agent.BadAnswer):
        agent.parse_status_body(body)
    st_ = agent.status_from_answer(200, body, 0.0)
    assert st_.status in ("running", "starting", "down")
    agent.functional_problem(200, body)
    agent.functional_problem(500, body)


INFO_TAGS = st.sampled_from(["master_host", "master_port", "crlIssuingPoints", "crlNumbers", "error", "x"])


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=300),
        st.dictionaries(INFO_TAGS, texts, max_size=5).map(
            lambda d: ("<xml><header>" + "".join(f"<{k}>{v}</{k}>" for k, v in d.items()) + "</header></xml>").encode(
                errors="replace"
            )
        ),
        st.integers(1, 20000).map(lambda n: ("<xml><header>" + deep(n, "<a>", "</a>") + "</header></xml>").encode()),
        st.sampled_from(["utf-16", "utf-16-be", "utf-8"]).map(
            lambda e: (
                f'<?xml version="1.0" encoding="{e.upper()}"?><!DOCTYPE xml [<!ENTITY r "x">]><xml>&r;</xml>'.encode(e)
            )
        ),
    )
)
def test_getinfo_parser_never_raises(body: bytes) -> None:
    info = agent.parse_info_body(body)
    assert info.ok or (info.error or "").startswith("bad answer: ")


@FUZZ
@given(
    st.one_of(
        texts,
        json_values.map(json.dumps),
        st.dictionaries(st.sampled_from(["state", "ldap_rc", "message", "date"]), json_values).map(json.dumps),
    )
)
def test_replication_status_parsers_never_raise(text: str) -> None:
    status = directory.parse_update_status(text, text)
    assert status.state in ("green", "amber", "red", "unknown")


LDAP_ATTRS = st.sampled_from(
    [
        "cn",
        "nsds5replicaHost",
        "nsds5replicaPort",
        "nsds5replicaLastUpdateStatus",
        "nsds5replicaLastUpdateStatusJSON",
        "nsds5replicaLastUpdateStart",
        "nsds5replicaLastUpdateEnd",
        "nsds5replicaUpdateInProgress",
        "crlNumber",
        "thisUpdate",
        "nextUpdate",
    ]
)


@FUZZ
@given(st.dictionaries(LDAP_ATTRS, st.lists(texts, max_size=2), max_size=8), texts)
def test_ldap_attribute_parsers_raise_only_bad_answer(attrs: dict[str, list[str]], value: str) -> None:
    directory.parse_agreement("cn=a,cn=replica", attrs)
    directory.parse_crl_record("cn=MasterCRL,ou=crlIssuingPoints", attrs)
    problems: list[str] = []
    directory.parse_ruv([value, f"{{replica {value}}} {value}"], problems)
    for parser in (
        directory.CSN.parse,
        directory.parse_ruv_element,
        directory.parse_agmt_maxcsn,
        directory.parse_generalized_time,
        directory.parse_dogtag_number,
        directory.parse_port,
        directory.parse_replica_id,
        lambda v: directory.parse_ruv([v]),
        directory.parse_status_text,
    ):
        with contextlib.suppress(directory.BadAnswer):
            parser(value)
