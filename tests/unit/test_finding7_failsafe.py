"""Issue 10, finding 7: a peer's /failsafe answer is read by the master during a store outage, when
it needs the failsafe most. Deep JSON, `[]` or any other malformed body is no acknowledgement, never
an exception (it raised RecursionError / AttributeError before)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ca_watchdog.loop import PEER_ANSWER_LIMIT, failsafe_ack

GOOD = {"member": "ca2", "leader": "ca1", "epoch": 7, "store_ok": False}


def body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b"[" * 2000 + b"]" * 2000,  # fits in PEER_ANSWER_LIMIT: RecursionError in json.loads
        b'{"leader": "ca1", "epoch": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b"[]",
        b"null",
        b'"ca1"',
        b"",
        b"\xff\xfe{",
        b'{"leader": "ca1", "epoch": Infinity, "store_ok": false}',
        b'{"leader": "ca1", "epoch": NaN, "store_ok": false}',
        body({**GOOD, "epoch": "7"}),
        body({**GOOD, "epoch": "\u00b2"}),
        body({**GOOD, "epoch": True}),
        body({**GOOD, "epoch": 7.0}),
        body({**GOOD, "epoch": 10**400}),
        body({**GOOD, "leader": ["ca1"]}),
        body({**GOOD, "store_ok": 0}),
        body({**GOOD, "store_ok": None}),
    ],
    ids=lambda raw: raw[:24].decode("utf-8", "replace"),
)
def test_finding7_deep_json_a_list_or_odd_types_from_a_peers_failsafe_are_no_acknowledgement(raw: bytes) -> None:
    assert failsafe_ack(raw[:PEER_ANSWER_LIMIT], "ca1", 7) is False


def test_finding7_a_well_formed_failsafe_answer_is_still_an_acknowledgement() -> None:
    assert failsafe_ack(body(GOOD), "ca1", 7) is True
    assert failsafe_ack(body(GOOD), "ca1", 8) is False
    assert failsafe_ack(body({**GOOD, "store_ok": True}), "ca1", 7) is False


json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(st.sampled_from(["leader", "epoch", "store_ok", "member"]), json_values).map(
            lambda d: json.dumps(d).encode()
        ),
        st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),
    )
)
def test_finding7_failsafe_answer_parser_never_raises(raw: bytes) -> None:
    assert failsafe_ack(raw[:PEER_ANSWER_LIMIT], "ca1", 7) in (True, False)
