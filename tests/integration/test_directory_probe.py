"""Runbook: the directory probe against a real 3-supplier 389-DS mesh (``ds_mesh``).

Every test starts from a healthy, converged mesh and leaves one behind (the fixture restores it,
and each fault is undone in a ``finally``). All traffic is on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest

from ca_watchdog.lab.dslab import DSLab
from ca_watchdog.probes.directory import (
    Agreement,
    CRLRecord,
    DirectoryObservation,
    in_sync,
    lag_by_supplier,
    probe_directory,
)

pytestmark = pytest.mark.lab

T = TypeVar("T")


async def probe(lab: DSLab, name: str, timeout: float = 3.0) -> DirectoryObservation:
    return await probe_directory(
        lab.ldap_url(name), lab.bind_dn, lab.password_file.read_text(), basedn=lab.suffix, timeout=timeout
    )


async def eventually(check: Callable[[], Awaitable[T | None]], timeout: float, what: str) -> T:
    """Poll ``check`` until it returns something truthy; fail saying what never happened."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.25)
    pytest.fail(f"{what}: not within {timeout:g} s (last: {last!r})")


def agreement_to(obs: DirectoryObservation, lab: DSLab, consumer: str) -> Agreement:
    [a] = [a for a in obs.agreements if a.consumer_port == lab.port(consumer)]
    return a


async def all_green(lab: DSLab) -> dict[str, DirectoryObservation] | None:
    obs = {n: await probe(lab, n) for n in lab.names}
    ok = all(o.ok and o.agreements and all(a.state == "green" for a in o.agreements) for o in obs.values())
    return obs if ok else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- healthy ---------------------------------------------------------------------------------------


async def test_healthy_mesh_every_agreement_green_lag_zero_same_max_csns(ds_mesh: DSLab) -> None:
    lab = ds_mesh
    for n in lab.names:  # every agreement gets a session now, so none shows a stale status
        lab.touch(n)
    await asyncio.to_thread(lab.wait_replicated, None, 30.0)
    obs = await eventually(lambda: all_green(lab), 20, "all agreements green")

    for n, o in obs.items():
        assert o.ok and o.error is None, o.error
        assert o.replica_id == lab.replica_id(n)
        assert o.latency < 1.0
        others = {lab.port(m) for m in lab.names if m != n}
        assert {a.consumer_port for a in o.agreements} == others
        for a in o.agreements:
            assert (a.state, a.ldap_rc, a.in_progress) == ("green", 0, False)
            assert a.consumer_host == "127.0.0.1"
            assert a.last_update_end is not None and a.last_update_start is not None
            assert a.last_update_start <= a.last_update_end
    ruvs = {n: o.ruv_max_csn for n, o in obs.items()}
    assert set(ruvs["ca1"]) == {1, 2, 3}
    assert all(csn is not None for csn in ruvs["ca1"].values())
    assert ruvs["ca1"] == ruvs["ca2"] == ruvs["ca3"]
    assert len({o.ruv_generation for o in obs.values()}) == 1
    for s in lab.names:
        for c in lab.names:
            assert lag_by_supplier(ruvs[s], ruvs[c]) == {1: 0.0, 2: 0.0, 3: 0.0}
            assert in_sync(ruvs[s], ruvs[c])


async def test_write_on_one_supplier_reaches_the_others_and_its_csn_advances(ds_mesh: DSLab) -> None:
    lab = ds_mesh
    before = await probe(lab, "ca2")
    rid = lab.replica_id("ca2")
    old = before.ruv_max_csn[rid]

    value = lab.touch("ca2", f"probe test {uuid.uuid4()}")
    t_write = time.time()

    async def seen_everywhere() -> bool:
        return all(lab.read_description(n) == value for n in ("ca1", "ca3"))

    await eventually(seen_everywhere, 10, "the write on ca2 replicated to ca1 and ca3")
    await asyncio.to_thread(lab.wait_replicated, None, 15.0)
    after = {n: await probe(lab, n) for n in lab.names}
    new = after["ca2"].ruv_max_csn[rid]
    assert new is not None and (old is None or new > old)
    assert new.rid == rid
    assert abs(new.time - t_write) < 5
    assert after["ca1"].ruv_max_csn[rid] == after["ca3"].ruv_max_csn[rid] == new
    # the supplier's agreements record the change as sent
    sent = {a.sent_max_csn for a in after["ca2"].agreements}
    assert sent == {new}
    assert lag_by_supplier(after["ca2"].ruv_max_csn, after["ca1"].ruv_max_csn)[rid] == 0.0


# ---- faults ---------------------------------------------------------------------------------------


async def test_killed_supplier_probe_fails_fast_and_peers_agreement_turns_red_after_a_write(
    ds_mesh: DSLab,
) -> None:
    lab = ds_mesh
    pid = lab.pid("ca3")
    assert pid is not None
    try:
        assert lab.kill("ca3") == pid
        assert lab.pid("ca3") is None and not lab.is_running("ca3")

        t0 = time.monotonic()
        dead = await probe(lab, "ca3", timeout=3.0)
        took = time.monotonic() - t0
        assert not dead.ok
        assert dead.error == "connection refused"
        assert took < 1.0, f"a refused connection must not wait for the timeout ({took:.2f} s)"
        assert dead.replica_id is None and dead.agreements == ()

        lab.touch("ca1")  # pitfall 5: agreements only change when a session is attempted

        async def red_toward_ca3() -> Agreement | None:
            o = await probe(lab, "ca1")
            a = agreement_to(o, lab, "ca3")
            return a if a.state == "red" else None

        red = await eventually(red_toward_ca3, 15, "ca1's agreement toward the killed ca3 turns red")
        assert red.ldap_rc is not None and red.ldap_rc != 0
        assert "ldap error" in red.message.lower()

        # the live part of the mesh is unaffected
        survivor = await probe(lab, "ca1")
        assert survivor.ok
        assert agreement_to(survivor, lab, "ca2").state == "green"
    finally:
        lab.start("ca3")


async def test_frozen_supplier_is_reported_down_within_the_receive_timeout(ds_mesh: DSLab) -> None:
    lab = ds_mesh
    timeout = 2.0
    lab.freeze("ca2")
    try:
        assert lab.is_frozen("ca2")
        t0 = time.monotonic()
        hung = await probe(lab, "ca2", timeout=timeout)
        took = time.monotonic() - t0
        assert not hung.ok
        assert hung.error is not None and hung.error.startswith("timeout"), hung.error
        assert timeout - 0.2 <= took <= timeout + 1.0, f"took {took:.2f} s for a {timeout} s timeout"

        # the event loop stays free while the probe waits: a concurrent probe of a live peer is quick
        t0 = time.monotonic()
        hung2, live = await asyncio.gather(probe(lab, "ca2", timeout=timeout), probe(lab, "ca1", timeout=timeout))
        assert not hung2.ok and live.ok
        assert time.monotonic() - t0 <= timeout + 1.0
    finally:
        lab.thaw("ca2")

    async def answers() -> DirectoryObservation | None:
        o = await probe(lab, "ca2")
        return o if o.ok else None

    back = await eventually(answers, 10, "ca2 answers again after SIGCONT")
    assert back.replica_id == lab.replica_id("ca2")


async def test_restarted_supplier_recovers_green_and_ruvs_converge(ds_mesh: DSLab) -> None:
    lab = ds_mesh
    lab.stop("ca2")  # clean shutdown
    try:
        assert not lab.is_running("ca2")
        missed = lab.touch("ca1", f"written while ca2 was down {uuid.uuid4()}")

        async def red_toward_ca2() -> Agreement | None:
            a = agreement_to(await probe(lab, "ca1"), lab, "ca2")
            return a if a.state == "red" else None

        await eventually(red_toward_ca2, 15, "ca1's agreement toward the stopped ca2 turns red")
        down = await probe(lab, "ca1")
        lagging_rid = lab.replica_id("ca1")
        assert down.ruv_max_csn[lagging_rid] is not None
    finally:
        t_start = time.monotonic()
        lab.start("ca2")
        started = time.monotonic() - t_start
    assert started < 30

    # backoff max is 5 s in the lab, so the missed change arrives within seconds
    await eventually(
        lambda: asyncio.to_thread(lambda: lab.read_description("ca2") == missed), 20, "ca2 receives the missed write"
    )

    async def green_toward_ca2() -> Agreement | None:
        a = agreement_to(await probe(lab, "ca1"), lab, "ca2")
        return a if a.state == "green" else None

    green = await eventually(green_toward_ca2, 20, "ca1's agreement toward ca2 green again")
    assert green.ldap_rc == 0
    assert green.last_update_end is not None
    assert green.last_update_end >= datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=60)

    await asyncio.to_thread(lab.wait_replicated, None, 30.0)
    obs = {n: await probe(lab, n) for n in lab.names}
    assert obs["ca1"].ruv_max_csn == obs["ca2"].ruv_max_csn == obs["ca3"].ruv_max_csn
    assert lag_by_supplier(obs["ca1"].ruv_max_csn, obs["ca2"].ruv_max_csn)[lagging_rid] == 0.0


# ---- what the probe says about bad targets --------------------------------------------------------


async def test_wrong_password_is_a_bind_failure_not_a_crash(ds_mesh: DSLab) -> None:
    obs = await probe_directory(ds_mesh.ldap_url("ca1"), ds_mesh.bind_dn, "wrong password", timeout=3.0)
    assert not obs.ok
    assert obs.error is not None and obs.error.startswith("bind failed"), obs.error
    assert "invalidCredentials" in obs.error


async def test_nothing_listening_is_connection_refused() -> None:
    obs = await probe_directory(f"ldap://127.0.0.1:{free_port()}", "cn=Directory Manager", "x", timeout=3.0)
    assert (obs.ok, obs.error) == (False, "connection refused")
    assert obs.latency < 1.0


async def test_starttls_against_a_server_without_tls_says_tls(ds_mesh: DSLab) -> None:
    obs = await probe_directory(
        ds_mesh.ldap_url("ca1"), ds_mesh.bind_dn, ds_mesh.password_file.read_text(), timeout=3.0, starttls=True
    )
    assert not obs.ok
    assert obs.error is not None and obs.error.startswith("TLS"), obs.error


async def test_crl_issuing_point_records_are_read_from_the_replicated_tree(ds_mesh: DSLab) -> None:
    from ldap3 import MODIFY_REPLACE
    from ldap3.core.exceptions import LDAPEntryAlreadyExistsResult

    lab = ds_mesh
    ip = f"TestCRL{uuid.uuid4().hex[:8]}"
    dn = f"cn={ip},ou=crlIssuingPoints,ou=ca,{lab.suffix}"
    with lab.connection("ca1") as c:
        for ou_dn, ou in (
            (f"ou=ca,{lab.suffix}", "ca"),
            (f"ou=crlIssuingPoints,ou=ca,{lab.suffix}", "crlIssuingPoints"),
        ):
            # may exist from an earlier test (simca writes here too)
            with contextlib.suppress(LDAPEntryAlreadyExistsResult):
                c.add(ou_dn, ["top", "organizationalUnit"], {"ou": ou})
        # the lab has no Dogtag schema: extensibleObject lets the CRL attributes in (as simca does)
        c.add(
            dn,
            ["top", "extensibleObject"],
            {"cn": ip, "crlNumber": "0241", "thisUpdate": "20261127220000Z", "nextUpdate": "20261127230000Z"},
        )
    try:
        with lab.connection("ca1") as c:
            c.modify(
                dn, {"crlNumber": [(MODIFY_REPLACE, ["0242"])], "thisUpdate": [(MODIFY_REPLACE, ["20261127221000Z"])]}
            )

        async def record_on_ca3() -> CRLRecord | None:
            o = await probe(lab, "ca3")
            recs = [r for r in o.crl_records if r.issuing_point == ip]
            return recs[0] if recs and recs[0].crl_number == 42 else None

        rec = await eventually(record_on_ca3, 15, "the CRL record replicated to ca3")
        assert rec == CRLRecord(
            issuing_point=ip,
            crl_number=42,
            this_update=datetime(2026, 11, 27, 22, 10, tzinfo=UTC),
            next_update=datetime(2026, 11, 27, 23, 0, tzinfo=UTC),
        )
    finally:
        with lab.connection("ca1") as c:
            c.delete(dn)


# ---- the command -------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ca_watchdog.cli", "probe", "ldap", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_probe_ldap_command_prints_one_json_object_and_exits_0_when_up(ds_mesh: DSLab) -> None:
    r = _cli(
        ds_mesh.ldap_url("ca1"),
        "--bind-dn",
        ds_mesh.bind_dn,
        "--password-file",
        str(ds_mesh.password_file),
        "--timeout",
        "2",
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["replica_id"] == 1
    assert {a["state"] for a in doc["agreements"]} <= {"green", "amber", "red", "unknown"}
    assert len(doc["agreements"]) == 2
    assert set(doc["ruv_max_csn"]) == {"1", "2", "3"}


def test_probe_ldap_command_exits_1_when_down(ds_mesh: DSLab) -> None:
    r = _cli(
        f"ldap://127.0.0.1:{free_port()}",
        "--bind-dn",
        ds_mesh.bind_dn,
        "--password-file",
        str(ds_mesh.password_file),
        "--timeout",
        "1",
    )
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert (doc["ok"], doc["error"]) == (False, "connection refused")
