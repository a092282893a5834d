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


# ---- store record decoders (store/base.py) and MemberState.from_payload ----------------------------------
# A store value is written by a peer (or by anyone who can write to etcd): each decoder may raise only
# RecordError (from_payload: ValueError, which the caller reports and ignores), never RecursionError,
# TypeError (an unhashable list tested against a set of members) or OverflowError.

from ca_watchdog import model  # noqa: E402
from ca_watchdog.store import base  # noqa: E402

MEMBERS = frozenset({"ca1", "ca2", "ca3"})  # a set: `x in members` with an unhashable x is a TypeError
STORE_FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# values a hostile writer can put in a field: JSON of any type, non-finite floats, huge integers, deep
hostile_values: st.SearchStrategy[Any] = st.one_of(
    json_values,
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 10**4000 // 10**3700, -(2**63), 2**64, 1e308]),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "ca1", "ca2", "", "²", "released", "expired", "switchover"]),
    st.integers(1, 3000).map(lambda n: json.loads(deep(min(n, 900), "[", "]"))),
    st.integers(1, 900).map(lambda n: json.loads('{"a":' * n + "1" + "}" * n)),
)

VALID: dict[str, dict[str, Any]] = {
    "leader": {"name": "ca1", "epoch": 3, "acquired_at": 1.0, "renewed_at": 2.0, "reason": "r"},
    "epoch_record": {
        "epoch": 3, "name": "ca1", "kind": "automatic", "at": 1.0, "reason": "r", "ended": None, "ended_at": None,
        "ended_reason": None, "target": "ca2", "previous": "ca2", "previous_ended": "expired",
    },
    "member": {"name": "ca1", "payload": {"updated_at": 1.0}, "updated_at": 1.0},
    "crl": {"name": "ca1", "epoch": 3, "lines": ["ca.crl.MasterCRL.enable=true"], "updated_at": 1.0},
    "switchover": {"id": "x", "target": "ca2", "kind": "switchover", "requested_at": 1.0, "requested_by": "op"},
    "at": {"at": 1.0},
    "cooldown": {"name": "ca1", "epoch": 3, "at": 1.0},
    "history": {"at": 1.0, "event": {"action": "promote"}},
}  # fmt: skip


def mutated(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    """The valid record of `kind` with some fields replaced by hostile values, removed or added."""
    keys = [*VALID[kind], "x"]
    return st.tuples(
        st.dictionaries(st.sampled_from(keys), hostile_values, max_size=4), st.sets(st.sampled_from(keys), max_size=2)
    ).map(lambda ch: {k: v for k, v in {**VALID[kind], **ch[0]}.items() if k not in ch[1]})


def encoded(records: st.SearchStrategy[Any]) -> st.SearchStrategy[str | bytes]:
    """JSON text of the records (NaN/Infinity allowed, as a hostile writer may), str or bytes; or garbage."""
    as_json = records.map(lambda r: json.dumps(r, allow_nan=True))
    return st.one_of(
        as_json,
        as_json.map(str.encode),
        texts,
        st.binary(max_size=200),
        st.integers(1, 200_000).map(lambda n: deep(n, "[", "]")),
        st.integers(1, 200_000).map(lambda n: '{"name":' * n + "1" + "}" * n),
        st.integers(4000, 20_000).map(lambda n: '{"epoch": ' + "9" * n + "}"),
        hostile_values.map(lambda v: json.dumps(v, allow_nan=True)),
    )


def only_record_error(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except base.RecordError as exc:
        assert len(str(exc)) < 2000, "a RecordError message carries the whole hostile value"


@STORE_FUZZ
@given(encoded(mutated("leader")), encoded(mutated("cooldown")))
def test_store_leader_and_cooldown_decoders_raise_only_record_error(leader: str | bytes, cool: str | bytes) -> None:
    only_record_error(base.decode_leader, leader, MEMBERS, 5.0)
    only_record_error(base.decode_cooldown, cool, MEMBERS, 5.0)
    only_record_error(base.decode_epoch, leader)


@STORE_FUZZ
@given(encoded(mutated("epoch_record")))
def test_store_epoch_record_decoder_raises_only_record_error(raw: str | bytes) -> None:
    only_record_error(base.decode_epoch_record, raw, MEMBERS)
    only_record_error(base.decode_epoch_record, raw, ("ca1", "ca2"))


@STORE_FUZZ
@given(encoded(mutated("member")), st.sampled_from(["ca1", "ca9"]))
def test_store_member_decoder_raises_only_record_error(raw: str | bytes, key: str) -> None:
    only_record_error(base.decode_member, key, raw, MEMBERS)


@STORE_FUZZ
@given(encoded(mutated("crl")), encoded(mutated("history")), st.integers())
def test_store_crl_history_and_step_decoders_raise_only_record_error(
    crl: str | bytes, history: str | bytes, seq: int
) -> None:
    only_record_error(base.decode_crl, crl, MEMBERS)
    only_record_error(base.decode_history, seq, history)
    only_record_error(base.decode_step, history)


@STORE_FUZZ
@given(
    st.none() | encoded(mutated("at")),
    st.none() | encoded(mutated("switchover")),
    st.none() | encoded(mutated("at")),
)
def test_store_switchover_and_flags_decoders_raise_only_record_error(
    paused: str | bytes | None, switchover: str | bytes | None, ack: str | bytes | None
) -> None:
    if switchover is not None:
        only_record_error(base.decode_switchover, switchover, MEMBERS)
    problems: list[str] = []
    flags = base.decode_flags(paused, switchover, ack, MEMBERS, problems)  # never raises: problems instead
    assert flags.paused == (paused is not None)
    assert all(len(p) < 2000 for p in problems)


PAYLOAD = {
    "updated_at": 1.0, "ca_status": "running", "ca_reason": None, "ca_down_streak": 0, "cscfg_role": "master",
    "cscfg_problem": None, "cscfg_master_duty": True, "master_agent": None, "ds_ok": True, "ds_error": None,
    "replication": "green", "replication_red": [], "replica_id": 7, "max_csn": {"7": "0" * 20}, "watching": None,
    "watched_status": None, "watched_role": None, "watched_down_streak": 0, "busy": None,
}  # fmt: skip


@STORE_FUZZ
@given(
    st.tuples(
        st.dictionaries(st.sampled_from([*PAYLOAD, "x"]), hostile_values, max_size=4),
        st.sets(st.sampled_from(list(PAYLOAD)), max_size=2),
    ).map(lambda ch: {k: v for k, v in {**PAYLOAD, **ch[0]}.items() if k not in ch[1]})
    | hostile_values
)
def test_member_state_from_payload_raises_only_value_error(payload: Any) -> None:
    assert model.MemberState.from_payload("ca1", PAYLOAD).name == "ca1"  # the base payload is valid
    try:
        state = model.MemberState.from_payload("ca1", payload)
    except ValueError as exc:
        assert type(exc) is ValueError or isinstance(exc, base.RecordError), repr(exc)
        return
    json.dumps(state.to_payload() if hasattr(state, "to_payload") else {}, allow_nan=False)
