"""Store records and codec: what is trusted, what is ignored and why (no store needed)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from ca_watchdog.config import EtcdSettings, StoreSettings
from ca_watchdog.store import open_store
from ca_watchdog.store.base import (
    KEY_PAUSED,
    KEY_SWITCHOVER,
    EpochRecord,
    LeaderRecord,
    RecordError,
    SwitchoverRequest,
    acquired_record,
    decode_crl,
    decode_epoch,
    decode_epoch_record,
    decode_flags,
    decode_history,
    decode_leader,
    decode_member,
    dumps,
    encode_crl,
    encode_epoch_record,
    encode_history,
    encode_leader,
    encode_member,
    encode_switchover,
    released_record,
    ttl_seconds,
)
from ca_watchdog.store.etcd import EtcdStore, b64, prefix_end, unb64
from ca_watchdog.store.sqlite import SQLiteStore, leader_identity

MEMBERS = ("ca1", "ca2", "ca3")


def leader_json(**over: Any) -> str:
    d: dict[str, Any] = {"name": "ca1", "epoch": 3, "acquired_at": 10.0, "renewed_at": 12.5, "reason": "boot"}
    d.update(over)
    return json.dumps(d)


def test_leader_record_round_trips_through_the_codec() -> None:
    raw = encode_leader("ca2", 7, 100.0, 105.5, "ca1 released the key")
    assert decode_leader(raw, MEMBERS, 130.0) == LeaderRecord("ca2", 7, 100.0, 105.5, 130.0, "ca1 released the key")
    assert decode_leader(raw.encode(), MEMBERS, 130.0).epoch == 7, "etcd hands us bytes"


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("", "not JSON"),
        ("{bad", "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ("null", "not a JSON object"),
        (leader_json(name="intruder"), "not a cluster member"),
        (leader_json(name=None), "'name' must be a string"),
        (leader_json(epoch=0), "'epoch' must be an integer >= 1"),
        (leader_json(epoch=True), "'epoch'"),
        (leader_json(epoch=2.0), "'epoch'"),
        (leader_json(epoch="2"), "'epoch'"),
        (leader_json(acquired_at="now"), "'acquired_at' must be a number"),
        (leader_json(renewed_at=False), "'renewed_at'"),
        (leader_json(reason=1), "'reason' must be a string"),
        ('{"name": "ca1", "epoch": 1, "acquired_at": NaN, "renewed_at": 1, "reason": ""}', "'acquired_at'"),
    ],
)
def test_unusable_leader_value_is_refused_with_a_reason(raw: str | bytes, why: str) -> None:
    with pytest.raises(RecordError, match=why.replace("(", r"\(")):
        decode_leader(raw, MEMBERS, 0.0)


def test_epoch_record_reads_zero_on_an_empty_store_and_refuses_garbage() -> None:
    assert decode_epoch(None) == 0
    assert decode_epoch(encode_epoch_record(EpochRecord(41, "ca1", "automatic", 1.0, "CA down"))) == 41
    for bad in ("[]", '{"epoch": -1}', '{"epoch": "4"}', '{"epoch": true}', "4"):
        with pytest.raises(RecordError):
            decode_epoch(bad)


def test_epoch_record_says_how_the_key_was_taken_and_how_the_previous_holder_ended() -> None:
    first = acquired_record(None, "ca1", 10.0, "bootstrap", "bootstrap")
    assert (first.epoch, first.previous, first.previous_ended, first.ended) == (1, None, None, None)
    # ca1's lease runs out: ca2 takes the key; the record says ca1 expired
    second = acquired_record(first, "ca2", 50.0, "elected", "automatic")
    assert (second.epoch, second.previous, second.previous_ended) == (2, "ca1", "expired")
    # ca2 steps down cleanly; ca3 takes over: "released"
    gone = released_record(second, 60.0, "switchover to ca3", "ca3")
    third = acquired_record(gone, "ca3", 61.0, "switchover", "switchover")
    assert (third.previous, third.previous_ended) == ("ca2", "released")
    for rec in (first, second, gone, third):
        assert decode_epoch_record(encode_epoch_record(rec), MEMBERS) == rec
    with pytest.raises(ValueError, match="kind"):
        acquired_record(None, "ca1", 1.0, "x", "takeover")


def test_epoch_record_of_the_first_version_reads_its_release_marker() -> None:
    old = json.dumps({"epoch": 4, "name": "ca2", "at": 3.0, "reason": "released: CA down"})
    rec = decode_epoch_record(old, MEMBERS)
    assert (rec.epoch, rec.name, rec.kind, rec.ended) == (4, "ca2", "automatic", "released")


@pytest.mark.parametrize(
    "raw",
    [
        '{"epoch": 3, "name": "ca9", "at": 1, "reason": "x"}',
        '{"epoch": 3, "name": "ca1", "at": 1, "reason": "x", "kind": "takeover"}',
        '{"epoch": 3, "name": "ca1", "at": 1, "reason": "x", "ended": "maybe"}',
        '{"epoch": 3, "name": "ca1", "at": 1e999, "reason": "x"}',
        '{"epoch": 3, "name": "ca1", "reason": "x"}',
    ],
)
def test_unusable_epoch_record_is_refused_with_a_record_error(raw: str) -> None:
    with pytest.raises(RecordError):
        decode_epoch_record(raw, MEMBERS)


def test_member_record_must_sit_under_its_own_name_and_be_a_member() -> None:
    raw = encode_member("ca2", {"ca": "running", "lag": 0.5}, 99.0)
    rec = decode_member("ca2", raw, MEMBERS)
    assert (rec.name, rec.payload, rec.updated_at) == ("ca2", {"ca": "running", "lag": 0.5}, 99.0)
    with pytest.raises(RecordError, match="under the key of 'ca3'"):
        decode_member("ca3", raw, MEMBERS)
    with pytest.raises(RecordError, match="not a cluster member"):
        decode_member("ca9", encode_member("ca9", {}, 1.0), MEMBERS)
    with pytest.raises(RecordError, match="payload"):
        decode_member("ca2", json.dumps({"name": "ca2", "payload": "x", "updated_at": 1}), MEMBERS)


def test_crl_block_keeps_line_order_and_refuses_non_string_lines() -> None:
    lines = [
        "ca.crl.MasterCRL.enable=true",
        "ca.crl.MasterCRL.enableCRLCache=true",
        "ca.crl.MasterCRL.class=x=y",
    ]
    block = decode_crl(encode_crl("ca1", 2, lines, 5.0), MEMBERS)
    assert block.lines == tuple(lines) and (block.name, block.epoch) == ("ca1", 2)
    with pytest.raises(RecordError, match="lines"):
        decode_crl(json.dumps({"name": "ca1", "epoch": 2, "lines": ["a", 3], "updated_at": 1}), MEMBERS)
    with pytest.raises(TypeError):
        encode_crl("ca1", 2, "ca.crl.MasterCRL.enable=true", 1.0)  # a str is a sequence of characters


def test_unreadable_pause_flag_still_pauses_and_bad_switchover_is_dropped() -> None:
    problems: list[str] = []
    req = SwitchoverRequest("r1", "ca2", "failover", 3.0, "admin")
    flags = decode_flags(b"garbage", encode_switchover(req).encode(), None, MEMBERS, problems)
    assert flags.paused and flags.paused_at == 0.0 and flags.switchover == req and flags.cooldown_ack_at is None
    assert len(problems) == 1 and problems[0].startswith(KEY_PAUSED)
    problems.clear()
    bad = json.dumps({"target": "ca2", "kind": "takeover", "requested_at": 1, "requested_by": "x"})
    flags = decode_flags(None, bad, None, MEMBERS, problems)
    assert not flags.paused and flags.switchover is None
    assert problems[0].startswith(KEY_SWITCHOVER) and "takeover" in problems[0]


def test_history_entry_needs_an_event_object() -> None:
    ev = decode_history(12, encode_history(4.0, {"type": "promoted", "name": "ca2"}))
    assert (ev.seq, ev.at, ev.event) == (12, 4.0, {"type": "promoted", "name": "ca2"})
    with pytest.raises(RecordError):
        decode_history(1, json.dumps({"at": 1.0, "event": [1]}))


def test_values_that_are_not_plain_json_are_refused_before_any_write() -> None:
    with pytest.raises(ValueError):
        dumps({"x": math.inf})
    with pytest.raises(TypeError):
        dumps({"x": object()})
    assert dumps({"b": 1, "a": [1.5]}) == '{"a":[1.5],"b":1}'


def test_ttls_round_up_to_whole_seconds_and_must_be_positive() -> None:
    assert [ttl_seconds(t) for t in (0.2, 1.0, 2.01, 30)] == [1, 1, 3, 30]
    for bad in (0, -1, math.nan, math.inf):
        with pytest.raises(ValueError):
            ttl_seconds(bad)


def test_records_are_immutable() -> None:
    rec = LeaderRecord("ca1", 1, 0.0, 0.0, 30.0, "boot")
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.epoch = 2  # type: ignore[misc]


def test_renewals_do_not_change_the_leader_identity_a_watcher_compares() -> None:
    a = encode_leader("ca1", 3, 10.0, 10.0, "boot")
    b = encode_leader("ca1", 3, 10.0, 55.0, "boot")
    c = encode_leader("ca1", 4, 60.0, 60.0, "boot")
    assert leader_identity(a) == leader_identity(b) != leader_identity(c)
    assert leader_identity(None) is None and leader_identity("garbage") == ("raw", "garbage")


def test_etcd_prefix_range_end_and_base64_helpers() -> None:
    assert prefix_end(b"/ca-watchdog/members/") == b"/ca-watchdog/members0"
    assert prefix_end(b"a\xff\xff") == b"b"
    assert prefix_end(b"\xff") == b"\0"
    assert unb64(b64("/pki/leader")) == b"/pki/leader"
    assert unb64(None) == b""


def test_open_store_picks_the_configured_backend(tmp_path: Path) -> None:
    s = open_store(StoreSettings(path=str(tmp_path / "s.db")), MEMBERS, 2.0)
    assert isinstance(s, SQLiteStore) and s.members == frozenset(MEMBERS) and s.timeout == 2.0
    e = open_store(StoreSettings(backend="etcd", etcd=EtcdSettings(("http://127.0.0.1:1",))), MEMBERS, 2.0)
    assert isinstance(e, EtcdStore)
    assert not (tmp_path / "s.db").exists(), "opening must not touch the store yet"
    with pytest.raises(ValueError, match="etcd"):
        open_store(StoreSettings(backend="etcd"), MEMBERS, 2.0)
    with pytest.raises(ValueError):
        open_store(StoreSettings(path=str(tmp_path / "s.db")), [], 2.0)
    with pytest.raises(ValueError):
        open_store(StoreSettings(path=str(tmp_path / "s.db")), MEMBERS, 0)
