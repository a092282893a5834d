"""Runbook: what the directory probe makes of the raw 389-DS values it reads.

The values are the ones observed on the lab machine (reference/lab.md "Observed values") and the
formats documented in reference/dogtag.md section 5.
"""

from __future__ import annotations

import json
import math
import struct
from datetime import UTC, datetime

import pytest

from ca_watchdog.probes.directory import (
    CSN,
    DirectoryObservation,
    Seconds,
    in_sync,
    lag_by_supplier,
    parse_agmt_maxcsn,
    parse_agreement,
    parse_crl_record,
    parse_generalized_time,
    parse_ldap_url,
    parse_ruv,
    parse_ruv_element,
    parse_status_json,
    parse_status_text,
    parse_update_status,
)

# ---- CSN ------------------------------------------------------------------------------------------


def test_csn_fields_are_time_seq_rid_subseq() -> None:
    c = CSN.parse("6b0a0391000000010000")
    assert (c.timestamp, c.seq, c.rid, c.subseq) == (0x6B0A0391, 0, 1, 0)
    # lab.md: 6b0a0391000000010000 = 2026-11-27 22:26:25 UTC, replica 1
    assert datetime.fromtimestamp(c.time, UTC) == datetime(2026, 11, 27, 22, 26, 25, tzinfo=UTC)
    assert isinstance(c.time, float)


def test_csn_text_round_trips_in_lower_case() -> None:
    assert str(CSN.parse("6B0A0381000200010003")) == "6b0a0381000200010003"


def test_csn_orders_by_time_then_seq_then_rid_then_subseq() -> None:
    older = CSN.parse("6b0a0381000200010000")
    later_seq = CSN.parse("6b0a0381000300010000")
    later_time = CSN.parse("6b0a0382000000010000")
    same_other_rid = CSN.parse("6b0a0381000200020000")
    assert older < later_seq < later_time
    assert older < same_other_rid < later_seq
    assert max([later_seq, older, later_time]) == later_time
    assert CSN.parse("6b0a0381000200010000") == older


@pytest.mark.parametrize("bad", ["", "6b0a0391", "6b0a0391000000010000ff", "zzzz0391000000010000", "unavailable"])
def test_csn_rejects_anything_but_20_hex_digits(bad: str) -> None:
    with pytest.raises(ValueError):
        CSN.parse(bad)


# ---- RUV ------------------------------------------------------------------------------------------

RUV_CA1 = [
    "{replicageneration} 6b0a037f000000010000",
    "{replica 1 ldap://localhost:3891} 6b0a0381000200010000 6b0a0391000000010000",
    "{replica 2 ldap://localhost:3892} 6b0a0384000100020000 6b0a0386000000020000",
]


def test_ruv_gives_generation_and_max_csn_per_replica_id() -> None:
    ruv = parse_ruv(RUV_CA1)
    assert ruv.generation == "6b0a037f000000010000"
    assert ruv.max_csns() == {1: CSN.parse("6b0a0391000000010000"), 2: CSN.parse("6b0a0386000000020000")}
    e1 = ruv.elements[0]
    assert (e1.replica_id, e1.url, e1.min_csn) == (1, "ldap://localhost:3891", CSN.parse("6b0a0381000200010000"))


def test_ruv_element_without_csns_after_total_init_is_none_not_an_error() -> None:
    # lab.md pitfall 7: the consumer's element for the initialising supplier has no CSNs yet
    ruv = parse_ruv(["{replicageneration} 6b0a037f000000010000", "{replica 1 ldap://localhost:3891}"])
    assert ruv.max_csns() == {1: None}
    e = parse_ruv_element("{replica 7 ldap://host.example:389}  ")
    assert (e.replica_id, e.url, e.min_csn, e.max_csn) == (7, "ldap://host.example:389", None, None)


def test_ruv_skips_unknown_value_kinds_and_rejects_a_broken_element() -> None:
    assert parse_ruv(["something else", *RUV_CA1[1:2]]).max_csns() == {1: CSN.parse("6b0a0391000000010000")}
    with pytest.raises(ValueError):
        parse_ruv(["{replica x ldap://localhost:3891} 6b0a0381000200010000 6b0a0391000000010000"])
    with pytest.raises(ValueError):
        parse_ruv(["{replica 1 ldap://localhost:3891} nothex nothex"])


def test_agmt_maxcsn_names_the_agreement_and_its_last_sent_csn() -> None:
    v = "o=pki-tomcat-CA;agmt-ca2-to-ca1;127.0.0.1;3891;1;6b0a05a1000000020000"
    assert parse_agmt_maxcsn(v) == ("agmt-ca2-to-ca1", CSN.parse("6b0a05a1000000020000"))
    # before the first session the consumer rid is "unavailable" and there may be no CSN
    assert parse_agmt_maxcsn("o=pki-tomcat-CA;agmt-x;h;389;unavailable;") == ("agmt-x", None)
    with pytest.raises(ValueError):
        parse_agmt_maxcsn("o=pki-tomcat-CA;only;three")


# ---- lag ------------------------------------------------------------------------------------------


def _ruv(**by_rid: str | None) -> dict[int, CSN | None]:
    return {int(k[1:]): (CSN.parse(v) if v else None) for k, v in by_rid.items()}


def test_lag_is_zero_when_consumer_has_the_suppliers_max_csns() -> None:
    s = _ruv(r1="6b0a0391000000010000", r2="6b0a0386000000020000")
    assert lag_by_supplier(s, dict(s)) == {1: 0.0, 2: 0.0}
    assert in_sync(s, dict(s))


def test_lag_is_the_time_between_the_max_csns_per_replica_id() -> None:
    s = _ruv(r1="6b0a0391000000010000", r2="6b0a042e000000020000")  # rid 2 wrote at 22:29:02
    c = _ruv(r1="6b0a0391000000010000", r2="6b0a0386000000020000")  # consumer still at 22:26:14
    assert lag_by_supplier(s, c) == {1: 0.0, 2: float(0x6B0A042E - 0x6B0A0386)}
    assert not in_sync(s, c)


def test_consumer_ahead_is_not_negative_lag() -> None:
    s = _ruv(r1="6b0a0391000000010000")
    c = _ruv(r1="6b0a0400000000010000")
    assert lag_by_supplier(s, c) == {1: 0.0}
    assert in_sync(s, c)


def test_same_second_but_older_csn_is_zero_seconds_yet_not_in_sync() -> None:
    s = _ruv(r1="6b0a0391000200010000")
    c = _ruv(r1="6b0a0391000100010000")
    assert lag_by_supplier(s, c) == {1: 0.0}
    assert not in_sync(s, c)


def test_consumer_that_never_saw_a_change_from_a_supplier_is_infinitely_behind() -> None:
    s = _ruv(r1="6b0a0391000000010000", r3=None)
    assert lag_by_supplier(s, _ruv(r1=None)) == {1: math.inf, 3: 0.0}
    assert lag_by_supplier(s, {}) == {1: math.inf, 3: 0.0}
    assert not in_sync(s, {})
    # a supplier that originated nothing cannot be lagged behind
    assert in_sync(_ruv(r3=None), {})


# ---- agreement status -----------------------------------------------------------------------------

GREEN_JSON = json.dumps(
    {
        "state": "green",
        "ldap_rc": "0",
        "ldap_rc_text": "Success",
        "repl_rc": "0",
        "repl_rc_text": "replica acquired",
        "date": "2026-11-27T22:26:25Z",
        "message": "Error (0) Replica acquired successfully: Incremental update succeeded",
    }
)
RED_JSON = json.dumps(
    {
        "state": "red",
        "ldap_rc": "-1",
        "ldap_rc_text": "Can't contact LDAP server",
        "repl_rc": "16",
        "repl_rc_text": "connection error",
        "date": "2026-11-27T22:29:01Z",
        "message": "Error (-1) Problem connecting to replica - LDAP error: Can't contact LDAP server "
        "(connection error)",
    }
)


def test_json_status_green_with_rc_and_last_attempt_date() -> None:
    s = parse_status_json(GREEN_JSON)
    assert s is not None
    assert (s.state, s.ldap_rc) == ("green", 0)
    assert s.message.startswith("Error (0) Replica acquired")
    assert s.date == datetime(2026, 11, 27, 22, 26, 25, tzinfo=UTC)


def test_json_status_red_for_a_dead_consumer() -> None:
    s = parse_update_status(RED_JSON, "Error (-1) Problem connecting to replica - LDAP error: ...")
    assert (s.state, s.ldap_rc) == ("red", -1)
    assert "Can't contact LDAP server" in s.message


def test_json_status_amber_is_kept() -> None:
    s = parse_update_status(json.dumps({"state": "amber", "ldap_rc": "0", "message": "busy"}), None)
    assert s.state == "amber"


@pytest.mark.parametrize("broken", ["", "not json", "[1, 2]", '{"state": "purple"}', "{}"])
def test_unusable_json_falls_back_to_the_text_form(broken: str) -> None:
    s = parse_update_status(broken, "Error (0) Replica acquired successfully: Incremental update succeeded")
    assert (s.state, s.ldap_rc) == ("green", 0)


@pytest.mark.parametrize(
    ("text", "state", "rc"),
    [
        ("Error (0) Replica acquired successfully: Incremental update succeeded", "green", 0),
        ("Error (0) Replica acquired successfully: Incremental update started", "green", 0),
        ("Error (0) No replication sessions started since server startup", "green", 0),
        (
            "Error (-1) Unable to receive the response for a startReplication extended operation to "
            "consumer. Will retry later. - LDAP error: Can't contact LDAP server (connection error)",
            "red",
            -1,
        ),
        (
            "Error (-1) Problem connecting to replica - LDAP error: Can't contact LDAP server (connection error)",
            "red",
            -1,
        ),
        ("Error (1) Can't acquire busy replica (Incremental update transient error.)", "amber", 1),
        ("Error (19) Replication error acquiring replica: Replica has different database generation ID", "red", 19),
        # before 389-DS 1.3.5: "<rc> <text>"
        ("0 Replica acquired successfully: Incremental update succeeded", "green", 0),
        ("-1 Problem connecting to replica", "red", -1),
        ("1 Can't acquire busy replica", "amber", 1),
    ],
)
def test_text_status_forms(text: str, state: str, rc: int) -> None:
    s = parse_status_text(text)
    assert (s.state, s.ldap_rc, s.message) == (state, rc, text)
    assert parse_update_status(None, text).state == state


def test_missing_or_unparsable_status_is_unknown_never_green() -> None:
    assert parse_update_status(None, None).state == "unknown"
    assert parse_status_text("   ").state == "unknown"
    s = parse_status_text("Replica is fine, trust me")
    assert (s.state, s.ldap_rc) == ("unknown", None)


def test_generalized_time_and_the_never_values() -> None:
    assert parse_generalized_time("20261127222625Z") == datetime(2026, 11, 27, 22, 26, 25, tzinfo=UTC)
    assert parse_generalized_time("20261127222625.5Z") == datetime(2026, 11, 27, 22, 26, 25, 500000, tzinfo=UTC)
    assert parse_generalized_time("20261127232625+0100") == datetime(2026, 11, 27, 22, 26, 25, tzinfo=UTC)
    for never in ("19700101000000Z", "0", "", None):
        assert parse_generalized_time(never) is None
    with pytest.raises(ValueError):
        parse_generalized_time("yesterday")


def test_agreement_from_raw_attributes_as_read_with_get_info_none() -> None:
    sent = CSN.parse("6b0a0391000000010000")
    a = parse_agreement(
        "cn=agmt-ca1-to-ca2,cn=replica,cn=o\\3Dpki-tomcat-CA,cn=mapping tree,cn=config",
        {
            "cn": ["agmt-ca1-to-ca2"],
            "nsDS5ReplicaHost": ["127.0.0.1"],
            "nsDS5ReplicaPort": ["3892"],
            "nsds5replicaLastUpdateStatus": ["Error (0) Replica acquired successfully: Incremental update started"],
            "nsds5replicaLastUpdateStart": ["20261127222913Z"],
            "nsds5replicaLastUpdateEnd": ["19700101000000Z"],
            "nsds5replicaUpdateInProgress": ["TRUE"],
        },
        sent,
    )
    assert a.name == "agmt-ca1-to-ca2"
    assert (a.consumer_host, a.consumer_port) == ("127.0.0.1", 3892)
    assert (a.state, a.ldap_rc, a.in_progress) == ("green", 0, True)
    assert a.last_update_start == datetime(2026, 11, 27, 22, 29, 13, tzinfo=UTC)
    assert a.last_update_end is None
    assert a.sent_max_csn == sent


def test_agreement_attribute_names_are_case_insensitive_and_json_wins() -> None:
    a = parse_agreement(
        "cn=agmt-ca2-to-ca1,cn=replica,cn=mapping tree,cn=config",
        {
            "nsds5replicalastupdatestatusjson": [RED_JSON],
            "nsds5replicalastupdatestatus": ["Error (0) stale text"],
            "NSDS5REPLICAPORT": ["3891"],
            "nsds5replicaupdateinprogress": ["FALSE"],
        },
    )
    assert a.name == "agmt-ca2-to-ca1"  # from the DN when cn was not read
    assert (a.state, a.ldap_rc, a.consumer_port, a.in_progress) == ("red", -1, 3891, False)
    assert a.last_attempt == datetime(2026, 11, 27, 22, 29, 1, tzinfo=UTC)


def test_crl_record_fields() -> None:
    r = parse_crl_record(
        "cn=MasterCRL,ou=crlIssuingPoints,ou=ca,o=pki-tomcat-CA",
        {
            "cn": ["MasterCRL"],
            "crlnumber": ["0242"],  # Dogtag stores 42 as 0242
            "thisupdate": ["20261127222625Z"],
            "nextupdate": ["20261128002625Z"],
        },
    )
    assert (r.issuing_point, r.crl_number) == ("MasterCRL", 42)
    assert r.this_update == datetime(2026, 11, 27, 22, 26, 25, tzinfo=UTC)
    assert r.next_update == datetime(2026, 11, 28, 0, 26, 25, tzinfo=UTC)
    empty = parse_crl_record("cn=Other,ou=crlIssuingPoints,ou=ca,o=x", {"crlNumber": ["garbage"]})
    assert (empty.issuing_point, empty.crl_number, empty.this_update) == ("Other", None, None)


# ---- plumbing -------------------------------------------------------------------------------------


def test_ldap_urls() -> None:
    t = parse_ldap_url("ldap://127.0.0.1:38900")
    assert (t.host, t.port, t.use_ssl) == ("127.0.0.1", 38900, False)
    t = parse_ldap_url("ldaps://ds.example.com")
    assert (t.host, t.port, t.use_ssl) == ("ds.example.com", 636, True)
    assert parse_ldap_url("ldap://[::1]").port == 389
    for bad in ("http://x", "ldap://", "ldap://h:99999"):
        with pytest.raises(ValueError):
            parse_ldap_url(bad)


def test_receive_timeout_is_a_float_for_python_and_whole_seconds_for_so_rcvtimeo() -> None:
    # ldap3 packs receive_timeout with struct 'LL' (ints only) after settimeout(); a bare float fails
    with pytest.raises(struct.error):
        struct.pack("LL", 2.5, 0)
    s = Seconds(2.5)
    assert float(s) == 2.5
    assert struct.unpack("LL", struct.pack("LL", s, 0)) == (3, 0)
    assert struct.unpack("LL", struct.pack("LL", Seconds(0.2), 0)) == (1, 0)


def test_observation_json_is_serialisable() -> None:
    obs = DirectoryObservation(
        url="ldap://127.0.0.1:1",
        ok=True,
        error=None,
        latency=0.01,
        replica_id=1,
        ruv_max_csn={1: CSN.parse("6b0a0391000000010000"), 2: None},
    )
    doc = json.loads(json.dumps(obs.to_json()))
    assert doc["ruv_max_csn"] == {"1": "6b0a0391000000010000", "2": None}
    assert doc["ok"] is True
