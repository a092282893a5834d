"""The store contract, run unchanged against a real SQLite file and a real etcd on loopback.

Each test name reads as a runbook line: what an operator can rely on from the store.
The etcd member is started once per module by ca_watchdog.lab.etcdlab on a free port from 24790;
each test uses its own key prefix, so tests do not see each other's keys.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import sqlite3
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ca_watchdog.config import EtcdSettings, StoreSettings
from ca_watchdog.lab.etcdlab import ETCD_BINARY, EtcdLab, EtcdTLS, free_ports
from ca_watchdog.store import open_store
from ca_watchdog.store.base import Store, StoreUnavailable
from ca_watchdog.store.etcd import EtcdStore

MEMBERS = tuple(f"ca{i}" for i in range(1, 11))
TIMEOUT = 1.0  # store timeout used by the tests
TTL = 2.0  # etcd's minimum lease TTL with default timings is 2 s

needs_etcd = pytest.mark.skipif(not os.access(ETCD_BINARY, os.X_OK), reason=f"{ETCD_BINARY} not installed")


@pytest.fixture(scope="module")
def etcd_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdLab]:
    if not os.access(ETCD_BINARY, os.X_OK):
        pytest.skip(f"{ETCD_BINARY} not installed")
    client, peer = free_ports(2, 24790)
    lab = EtcdLab(tmp_path_factory.mktemp("etcd"), client, peer)
    lab.start()
    yield lab
    lab.stop()


@dataclass
class Backend:
    """One backend under test: how to open more clients on the same data, and how to write raw
    bytes under a key (to plant garbage the way a bug or a hand edit would)."""

    kind: str
    settings: StoreSettings
    lab: EtcdLab | None = None
    stores: list[Store] = field(default_factory=list)

    def open(self, members: Collection[str] = MEMBERS, timeout: float = TIMEOUT) -> Store:
        s = open_store(self.settings, members, timeout)
        self.stores.append(s)
        return s

    async def raw_put(self, key: str, value: str, ttl: float | None) -> None:
        if self.kind == "sqlite":
            await self.open().get_epoch()  # the schema exists once a store has connected
            with contextlib.closing(sqlite3.connect(self.settings.path)) as c, c:
                expires = None if ttl is None else time.time() + ttl
                c.execute(
                    "INSERT OR REPLACE INTO kv (key, value, expires_at) VALUES (?, ?, ?)",
                    (key, value, expires),
                )
            return
        assert self.settings.etcd is not None
        ep = self.settings.etcd.endpoints[0] + "/v3"
        body: dict[str, Any] = {
            "key": base64.b64encode((self.settings.etcd.prefix + key).encode()).decode(),
            "value": base64.b64encode(value.encode()).decode(),
        }
        async with aiohttp.ClientSession() as http:
            if ttl is not None:
                async with http.post(f"{ep}/lease/grant", json={"TTL": str(int(ttl))}) as r:
                    body["lease"] = (await r.json())["ID"]
            async with http.post(f"{ep}/kv/put", json=body) as r:
                assert r.status == 200, await r.text()

    @contextlib.asynccontextmanager
    async def outage(self) -> AsyncIterator[None]:
        """The store stops answering: sqlite's write lock held by someone else, etcd frozen (SIGSTOP)."""
        if self.kind == "sqlite":
            c = sqlite3.connect(self.settings.path, isolation_level=None)
            c.execute("BEGIN IMMEDIATE")
            try:
                yield
            finally:
                c.execute("ROLLBACK")
                c.close()
        else:
            assert self.lab is not None
            self.lab.freeze()
            try:
                yield
            finally:
                self.lab.thaw()


@pytest.fixture(params=["sqlite", pytest.param("etcd", marks=needs_etcd)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        b = Backend("sqlite", StoreSettings(backend="sqlite", path=str(tmp_path / "state.db")))
    else:
        lab: EtcdLab = request.getfixturevalue("etcd_lab")
        prefix = f"/ca-watchdog-test/{uuid.uuid4().hex}/"
        b = Backend("etcd", StoreSettings(backend="etcd", etcd=EtcdSettings((lab.endpoint,), prefix=prefix)), lab)
    yield b
    for s in b.stores:
        await s.close()


async def wait_until(pred: Callable[[], Awaitable[object]], limit: float, step: float = 0.1) -> float:
    """Seconds until `pred` returns something true; fails the test after `limit`."""
    t0 = time.monotonic()
    while not await pred():
        if time.monotonic() - t0 > limit:
            pytest.fail(f"condition not met within {limit:g} s")
        await asyncio.sleep(step)
    return time.monotonic() - t0


# ---- the leader key ----------------------------------------------------------------------------


async def test_only_one_of_many_concurrent_candidates_becomes_master(backend: Backend) -> None:
    stores = [backend.open() for _ in range(5)]
    names = [MEMBERS[i % len(MEMBERS)] for i in range(40)]
    results = await asyncio.gather(*(stores[i % 5].acquire_leader(n, TTL * 5, "race") for i, n in enumerate(names)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1, winners
    leader = await stores[0].get_leader()
    assert leader is not None and leader.name == winners[0].name and leader.epoch == 1
    assert await stores[3].get_epoch() == 1


WORKER = """
import asyncio, json, sys, time
from ca_watchdog.config import EtcdSettings, StoreSettings
from ca_watchdog.store import open_store
spec = json.loads(sys.argv[1])
etcd = EtcdSettings(tuple(spec["endpoints"]), prefix=spec["prefix"]) if spec["backend"] == "etcd" else None
settings = StoreSettings(backend=spec["backend"], path=spec["path"], etcd=etcd)
async def main():
    store = open_store(settings, spec["members"], 5.0)
    await store.get_epoch()  # connect before the start line, so all race the acquire itself
    time.sleep(max(0.0, spec["start_at"] - time.time()))
    rec = await store.acquire_leader(spec["name"], 10.0, "process race")
    print(json.dumps({"name": spec["name"], "won": rec is not None, "epoch": rec.epoch if rec else None}))
    await store.close()
asyncio.run(main())
"""


async def test_only_one_of_several_processes_racing_for_the_key_becomes_master(backend: Backend) -> None:
    e = backend.settings.etcd
    base = {
        "backend": backend.kind,
        "path": backend.settings.path,
        "endpoints": list(e.endpoints) if e else [],
        "prefix": e.prefix if e else "",
        "members": list(MEMBERS),
        "start_at": time.time() + 2.0,
    }
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", WORKER, json.dumps({**base, "name": name}), stdout=subprocess.PIPE
        )
        for name in MEMBERS[:6]
    ]
    outs = [json.loads((await p.communicate())[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    winners = [o for o in outs if o["won"]]
    assert len(winners) == 1, outs
    assert winners[0]["epoch"] == 1
    leader = await backend.open().get_leader()
    assert leader is not None and leader.name == winners[0]["name"]


async def test_master_key_expires_after_its_ttl_when_not_renewed(backend: Backend) -> None:
    s = backend.open()
    # from before the write: the store starts the TTL inside the call, and the calls below take time too
    # (counting from after them made a correct store look early when they were slow)
    t0 = time.monotonic()
    rec = await s.acquire_leader("ca1", TTL, "bootstrap")
    assert rec is not None and rec.expires_at >= time.time() + TTL - 0.5
    await asyncio.sleep(1.0)
    assert (await s.get_leader()) is not None, "gone before its TTL"
    assert await s.acquire_leader("ca2", TTL, "too early") is None
    await wait_until(lambda: _no_leader(s), limit=4.0)
    elapsed = time.monotonic() - t0
    assert TTL - 0.2 <= elapsed <= TTL + 1.5
    took = await s.acquire_leader("ca2", TTL, "old master expired")
    assert took is not None and took.epoch == 2


async def _no_leader(s: Store) -> bool:
    return await s.get_leader() is None


async def test_renewal_keeps_the_master_past_its_ttl(backend: Backend) -> None:
    s = backend.open()
    rec = await s.acquire_leader("ca1", TTL, "bootstrap")
    assert rec is not None
    for _ in range(4):  # 4 s, twice the TTL
        await asyncio.sleep(1.0)
        renewed = await s.renew_leader("ca1", rec.epoch, TTL)
        assert renewed is not None and renewed.epoch == rec.epoch
        assert renewed.expires_at >= time.time() + TTL - 0.5
    leader = await s.get_leader()
    assert leader is not None and leader.name == "ca1" and leader.epoch == 1


async def test_epoch_grows_by_one_per_new_master_and_never_goes_back(backend: Backend) -> None:
    a, b = backend.open(), backend.open()
    assert await a.get_epoch() == 0
    r1 = await a.acquire_leader("ca1", TTL, "bootstrap")
    assert r1 is not None and r1.epoch == 1
    assert await a.release_leader("ca1", 1, "switchover to ca2")
    assert await b.get_epoch() == 1, "release must keep the epoch"
    r2 = await b.acquire_leader("ca2", TTL, "switchover")
    assert r2 is not None and r2.epoch == 2
    await wait_until(lambda: _no_leader(a), limit=4.0)  # ca2 dies: its key expires
    assert await a.get_epoch() == 2, "expiry must keep the epoch"
    r3 = await a.acquire_leader("ca1", TTL, "failover")
    assert r3 is not None and r3.epoch == 3
    assert await a.renew_leader("ca1", 3, TTL) is not None
    leader = await b.get_leader()
    assert leader is not None and (leader.name, leader.epoch) == ("ca1", 3)


async def test_released_key_is_free_at_once_for_the_next_master(backend: Backend) -> None:
    a, b = backend.open(), backend.open()
    rec = await a.acquire_leader("ca1", 30, "bootstrap")
    assert rec is not None
    t0 = time.monotonic()
    assert await a.release_leader("ca1", rec.epoch, "CA down, stepping aside")
    assert await b.get_leader() is None
    took = await b.acquire_leader("ca2", 30, "ca1 released the key")
    assert took is not None and took.epoch == 2
    assert time.monotonic() - t0 < 1.0, "no waiting for the old TTL"


async def test_renew_or_release_by_a_non_holder_or_with_a_stale_epoch_fails(backend: Backend) -> None:
    s = backend.open()
    rec = await s.acquire_leader("ca1", 30, "bootstrap")
    assert rec is not None
    assert await s.renew_leader("ca2", rec.epoch, 30) is None, "non-holder renewed"
    assert await s.renew_leader("ca1", rec.epoch + 1, 30) is None, "wrong epoch renewed"
    assert not await s.release_leader("ca2", rec.epoch, "not mine")
    assert not await s.release_leader("ca1", rec.epoch - 1, "stale")
    assert await s.acquire_leader("ca1", 30, "again") is None, "a holder cannot take the key twice"
    leader = await s.get_leader()
    assert leader is not None and (leader.name, leader.epoch) == ("ca1", 1)
    # after a change of master the old epoch is stale even for the same name
    assert await s.release_leader("ca1", 1, "step down")
    again = await s.acquire_leader("ca1", 30, "back")
    assert again is not None and again.epoch == 2
    assert await s.renew_leader("ca1", 1, 30) is None


async def test_expired_master_cannot_renew(backend: Backend) -> None:
    s = backend.open()
    rec = await s.acquire_leader("ca1", TTL, "bootstrap")
    assert rec is not None
    await wait_until(lambda: _no_leader(s), limit=4.0)
    assert await s.renew_leader("ca1", rec.epoch, TTL) is None
    assert not await s.release_leader("ca1", rec.epoch, "too late")


async def test_garbage_leader_key_reads_as_no_master_but_blocks_election_until_it_expires(
    backend: Backend,
) -> None:
    s = backend.open()
    await backend.raw_put("leader", "{not json", TTL)
    assert await s.get_leader() is None
    assert any("leader" in p for p in s.last_problems()), s.last_problems()
    assert await s.acquire_leader("ca1", TTL, "key looks free") is None, "acquired over a live key"
    await wait_until(lambda: s.acquire_leader("ca1", TTL, "garbage expired"), limit=4.0, step=0.2)
    leader = await s.get_leader()
    assert leader is not None and leader.name == "ca1" and leader.epoch == 1
    assert s.last_problems() == ()


async def test_leader_key_naming_an_unknown_node_is_not_trusted(backend: Backend) -> None:
    s = backend.open()
    value = {
        "name": "intruder",
        "epoch": 7,
        "acquired_at": time.time(),
        "renewed_at": time.time(),
        "reason": "x",
    }
    await backend.raw_put("leader", json.dumps(value), TTL * 5)
    assert await s.get_leader() is None
    assert any("intruder" in p for p in s.last_problems()), s.last_problems()
    assert await s.acquire_leader("ca1", TTL, "key looks free") is None


async def test_wrongly_typed_leader_record_is_not_trusted(backend: Backend) -> None:
    s = backend.open()
    value = {"name": "ca1", "epoch": True, "acquired_at": "yesterday", "renewed_at": 0, "reason": "x"}
    await backend.raw_put("leader", json.dumps(value), TTL * 5)
    assert await s.get_leader() is None
    assert any("epoch" in p for p in s.last_problems()), s.last_problems()
    assert await s.renew_leader("ca1", 1, TTL) is None


async def test_garbage_epoch_record_stops_elections_instead_of_reusing_an_epoch(backend: Backend) -> None:
    s = backend.open()
    await backend.raw_put("epoch", "[]", None)
    assert await s.acquire_leader("ca1", TTL, "bootstrap") is None
    assert any("epoch" in p for p in s.last_problems()), s.last_problems()
    with pytest.raises(StoreUnavailable):
        await s.get_epoch()


# ---- member records ----------------------------------------------------------------------------


async def test_member_records_are_published_and_vanish_after_their_ttl(backend: Backend) -> None:
    a, b = backend.open(), backend.open()
    await a.put_member("ca1", {"ca": "running", "csn": "6b0a0391000000010000"}, TTL)
    await b.put_member("ca2", {"ca": "down"}, 30)
    refreshed = time.monotonic()  # before the refresh: its TTL starts inside the call (see the leader key's test)
    await a.put_member("ca1", {"ca": "running", "csn": "6b0a0391000000010001"}, TTL)  # a refresh
    snap = await b.get_members()
    assert set(snap.records) == {"ca1", "ca2"} and snap.rejected == ()
    rec = snap.records["ca1"]
    assert rec.name == "ca1" and rec.payload == {"ca": "running", "csn": "6b0a0391000000010001"}
    assert abs(rec.updated_at - time.time()) < 5

    async def ca1_gone() -> bool:
        return "ca1" not in (await b.get_members()).records

    await wait_until(ca1_gone, limit=4.0)
    assert time.monotonic() - refreshed >= TTL - 0.5
    assert set((await b.get_members()).records) == {"ca2"}


async def test_member_record_of_an_unknown_node_is_rejected_and_reported(backend: Backend) -> None:
    ours = backend.open()
    theirs = backend.open(members=[*MEMBERS, "intruder"])  # a node configured with another member list
    await theirs.put_member("intruder", {"ca": "running"}, 30)
    await ours.put_member("ca1", {"ca": "running"}, 30)
    snap = await ours.get_members()
    assert set(snap.records) == {"ca1"}
    assert len(snap.rejected) == 1 and "intruder" in snap.rejected[0]
    assert ours.last_problems() == snap.rejected
    with pytest.raises(ValueError):
        await ours.put_member("intruder", {}, 30)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("{oops", "not JSON"),
        ('["ca2"]', "not a JSON object"),
        ('{"name": "ca2", "payload": [1], "updated_at": 1}', "payload"),
        ('{"name": "ca2", "payload": {}, "updated_at": "now"}', "updated_at"),
        ('{"name": "ca3", "payload": {}, "updated_at": 1}', "ca3"),
    ],
)
async def test_garbage_member_record_is_rejected_and_reported(backend: Backend, raw: str, why: str) -> None:
    s = backend.open()
    await backend.raw_put("members/ca2", raw, 30)
    await s.put_member("ca1", {"ok": True}, 30)
    snap = await s.get_members()
    assert set(snap.records) == {"ca1"}
    assert len(snap.rejected) == 1 and snap.rejected[0].startswith("members/ca2") and why in snap.rejected[0]


# ---- CRL block, flags, history, journal ---------------------------------------------------------


async def test_only_the_current_master_publishes_the_crl_block_and_it_round_trips(backend: Backend) -> None:
    s = backend.open()
    lines = [
        "ca.crl.MasterCRL.enable=true",
        "ca.crl.MasterCRL.enableCRLCache=true",
        "ca.crl.MasterCRL.autoUpdateInterval=240",
    ]
    assert await s.get_crl_block() is None
    assert not await s.put_crl_block("ca1", 1, lines), "published without holding the key"
    r1 = await s.acquire_leader("ca1", 30, "bootstrap")
    assert r1 is not None
    assert await s.put_crl_block("ca1", r1.epoch, lines)
    block = await s.get_crl_block()
    assert block is not None and (block.name, block.epoch, block.lines) == ("ca1", 1, tuple(lines))
    assert await s.release_leader("ca1", 1, "switchover")
    assert await s.acquire_leader("ca2", 30, "switchover") is not None
    assert not await s.put_crl_block("ca1", 1, ["ca.crl.MasterCRL.enable=false"]), "stale master overwrote"
    block = await backend.open().get_crl_block()
    assert block is not None and block.lines == tuple(lines), "the pre-demotion block must survive"


async def test_pause_switchover_and_cooldown_flags_round_trip(backend: Backend) -> None:
    s, other = backend.open(), backend.open()
    f = await s.get_flags()
    assert (f.paused, f.paused_at, f.switchover, f.cooldown_ack_at) == (False, None, None, None)
    await s.set_paused(True)
    first = (await other.get_flags()).paused_at
    assert first is not None
    await asyncio.sleep(0.05)
    await s.set_paused(True)
    assert (await other.get_flags()).paused_at == first, "a second pause must keep the first time"
    req = await s.request_switchover("ca3", "switchover", "admin@ca1")
    got = (await other.get_flags()).switchover
    assert got == req and got.kind == "switchover" and got.target == "ca3" and got.requested_by == "admin@ca1"
    req2 = await s.request_switchover("ca4", "failover", "admin")
    assert (await other.get_flags()).switchover == req2, "the last request wins"
    with pytest.raises(ValueError):
        await s.request_switchover("nobody", "switchover", "admin")
    await s.clear_switchover()
    at = await s.ack_cooldown()
    await s.set_paused(False)
    f = await other.get_flags()
    assert (f.paused, f.paused_at, f.switchover, f.cooldown_ack_at) == (False, None, None, at)


async def test_switchover_to_an_unknown_node_in_the_store_is_ignored_and_reported(backend: Backend) -> None:
    s = backend.open()
    bad = {"target": "intruder", "kind": "switchover", "requested_at": 1.0, "requested_by": "x"}
    await backend.raw_put("flags/switchover", json.dumps(bad), None)
    await backend.raw_put("flags/paused", "garbage", None)
    f = await s.get_flags()
    assert f.switchover is None
    assert f.paused, "an unreadable pause flag must still pause (the safe side)"
    assert len(s.last_problems()) == 2


async def test_history_is_stamped_ordered_and_limited(backend: Backend) -> None:
    s = backend.open()
    assert await s.get_history() == []
    made = [await s.append_history({"type": "acquired", "name": f"ca{i}", "epoch": i}) for i in range(1, 6)]
    assert [e.seq for e in made] == sorted({e.seq for e in made}), "sequence numbers must grow"
    assert all(abs(e.at - time.time()) < 5 for e in made)
    got = await backend.open().get_history(limit=3)
    assert [e.event["name"] for e in got] == ["ca3", "ca4", "ca5"], "newest 3, oldest first"
    assert [e.seq for e in got] == [e.seq for e in made[2:]]
    assert got[-1].event == {"type": "acquired", "name": "ca5", "epoch": 5}
    with pytest.raises(ValueError):
        await s.append_history({"t": float("nan")})


async def test_promotion_journal_survives_a_restart_and_clears(backend: Backend) -> None:
    s = backend.open()
    assert await s.get_step("ca2") is None
    step = {"step": "cscfg-written", "epoch": 4, "backup": "CS.cfg.1700000000000.ca-watchdog"}
    await s.put_step("ca2", step)
    await s.close()
    restarted = backend.open()  # a new daemon process reading what the dead one journaled
    assert await restarted.get_step("ca2") == step
    assert await restarted.get_step("ca3") is None
    await restarted.put_step("ca2", None)
    assert await restarted.get_step("ca2") is None
    with pytest.raises(ValueError):
        await restarted.put_step("intruder", {"step": "x"})


async def test_doctor_write_check_round_trips_expires_and_leaves_the_leader_key_alone(backend: Backend) -> None:
    admin, daemon = backend.open(), backend.open()
    held = await daemon.acquire_leader("ca1", 30, "test master")
    assert held is not None
    await admin.put_doctor_token("ca2", "token-1", TTL)
    assert await daemon.get_doctor_token("ca2") == "token-1"
    assert await daemon.get_doctor_token("ca3") is None
    state = await daemon.read_state()
    assert state.leader is not None and (state.leader.name, state.leader.epoch) == ("ca1", held.epoch)
    assert state.members.records == {} and state.problems == ()

    async def token_gone() -> bool:
        return await daemon.get_doctor_token("ca2") is None

    assert await wait_until(token_gone, limit=4.0) >= TTL - 0.5
    assert await daemon.renew_leader("ca1", held.epoch, 30) is not None
    with pytest.raises(ValueError):
        await admin.put_doctor_token("intruder", "x", TTL)


# ---- watching -----------------------------------------------------------------------------------


async def test_watch_returns_early_when_a_new_master_takes_the_key(backend: Backend) -> None:
    watcher, other = backend.open(), backend.open()
    assert await watcher.get_leader() is None
    t0 = time.monotonic()
    task = asyncio.create_task(watcher.watch_leader(10.0))
    await asyncio.sleep(0.3)
    assert not task.done()
    assert await other.acquire_leader("ca2", 30, "bootstrap") is not None
    await asyncio.wait_for(task, 3.0)
    assert time.monotonic() - t0 < 2.0


async def test_watch_ignores_renewals_and_returns_at_the_timeout(backend: Backend) -> None:
    watcher, master = backend.open(), backend.open()
    rec = await master.acquire_leader("ca1", 30, "bootstrap")
    assert rec is not None
    assert await watcher.get_leader() is not None
    t0 = time.monotonic()
    task = asyncio.create_task(watcher.watch_leader(1.5))
    for _ in range(3):
        await asyncio.sleep(0.3)
        assert await master.renew_leader("ca1", rec.epoch, 30) is not None
    await asyncio.wait_for(task, 3.0)
    assert 1.4 <= time.monotonic() - t0 < 2.5


async def test_watch_returns_when_the_master_key_expires(backend: Backend) -> None:
    watcher, master = backend.open(), backend.open()
    assert await master.acquire_leader("ca1", TTL, "bootstrap") is not None
    assert await watcher.get_leader() is not None
    t0 = time.monotonic()
    await watcher.watch_leader(10.0)
    assert time.monotonic() - t0 < TTL + 1.5
    assert await watcher.get_leader() is None


async def test_watch_returns_at_once_if_the_key_changed_since_the_last_look(backend: Backend) -> None:
    watcher, other = backend.open(), backend.open()
    assert await watcher.get_leader() is None
    assert await other.acquire_leader("ca3", 30, "bootstrap") is not None
    t0 = time.monotonic()
    await watcher.watch_leader(5.0)
    assert time.monotonic() - t0 < 1.0


# ---- the store is down -----------------------------------------------------------------------------


async def test_store_that_stops_answering_raises_store_unavailable_within_the_timeout(
    backend: Backend,
) -> None:
    s = backend.open()
    rec = await s.acquire_leader("ca1", 30, "bootstrap")
    assert rec is not None
    await s.put_member("ca1", {}, 30)
    async with backend.outage():
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: s.renew_leader("ca1", rec.epoch, 30),
            lambda: s.acquire_leader("ca2", 30, "x"),
            lambda: s.release_leader("ca1", rec.epoch, "x"),
            lambda: s.put_member("ca1", {}, 30),
            lambda: s.set_paused(True),
            lambda: s.append_history({"type": "x"}),
        ]
        for call in calls:
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call()
            assert time.monotonic() - t0 < TIMEOUT + 0.5
    # and the store works again afterwards, with the master still in place; (a write that timed
    # out may still land later: StoreUnavailable means "outcome unknown", so set_paused is not checked)
    renewed = await s.renew_leader("ca1", rec.epoch, 30)
    assert renewed is not None and renewed.epoch == rec.epoch


async def test_sqlite_store_in_a_missing_directory_or_corrupt_file_is_unavailable(tmp_path: Path) -> None:
    missing = open_store(StoreSettings(path=str(tmp_path / "no" / "state.db")), MEMBERS, TIMEOUT)
    with pytest.raises(StoreUnavailable):
        await missing.get_leader()
    await missing.close()
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database" * 100)
    s = open_store(StoreSettings(path=str(corrupt)), MEMBERS, TIMEOUT)
    with pytest.raises(StoreUnavailable):
        await s.get_leader()
    await s.close()


@needs_etcd
async def test_etcd_unreachable_endpoint_raises_store_unavailable_within_the_timeout() -> None:
    (port,) = free_ports(1, 24890)  # nothing listens there
    s = open_store(StoreSettings(backend="etcd", etcd=EtcdSettings((f"http://127.0.0.1:{port}",))), MEMBERS, TIMEOUT)
    for call in (s.get_leader(), s.acquire_leader("ca1", 30, "x"), s.get_members(), s.watch_leader(5.0)):
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await call
        assert time.monotonic() - t0 < TIMEOUT + 0.5
    await s.close()


@needs_etcd
async def test_etcd_killed_mid_term_raises_store_unavailable_and_frozen_etcd_times_out(
    tmp_path: Path,
) -> None:
    client, peer = free_ports(2, 24800)
    lab = EtcdLab(tmp_path / "etcd", client, peer)
    lab.start()
    try:
        s = open_store(StoreSettings(backend="etcd", etcd=EtcdSettings((lab.endpoint,))), MEMBERS, TIMEOUT)
        rec = await s.acquire_leader("ca1", 30, "bootstrap")
        assert rec is not None
        lab.freeze()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await s.renew_leader("ca1", rec.epoch, 30)
        assert TIMEOUT - 0.1 <= time.monotonic() - t0 < TIMEOUT + 0.5
        lab.thaw()
        assert await s.renew_leader("ca1", rec.epoch, 30) is not None
        lab.kill()
        for call in (s.renew_leader("ca1", rec.epoch, 30), s.get_leader(), s.put_member("ca1", {}, 30)):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call
            assert time.monotonic() - t0 < TIMEOUT + 0.5
        await s.close()
    finally:
        lab.stop()


@needs_etcd
async def test_etcd_client_fails_over_to_the_next_endpoint(etcd_lab: EtcdLab) -> None:
    (dead,) = free_ports(1, 24890)
    settings = EtcdSettings((f"http://127.0.0.1:{dead}", etcd_lab.endpoint), prefix=f"/t/{uuid.uuid4().hex}/")
    s = open_store(StoreSettings(backend="etcd", etcd=settings), MEMBERS, TIMEOUT)
    t0 = time.monotonic()
    rec = await s.acquire_leader("ca1", 30, "bootstrap")
    assert rec is not None and time.monotonic() - t0 < TIMEOUT
    leader = await s.get_leader()
    assert leader is not None and leader.name == "ca1"
    await s.close()


@needs_etcd
async def test_etcd_over_tls_with_client_certificates_and_a_password(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server, client, stranger = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    files: dict[str, str] = {}
    for name, blob in [
        ("ca.pem", ca.cert_pem),
        ("server.pem", server.cert_chain_pems[0]),
        ("server.key", server.private_key_pem),
        ("client.pem", client.cert_chain_pems[0]),
        ("client.key", client.private_key_pem),
        ("stranger.pem", stranger.cert_chain_pems[0]),
        ("stranger.key", stranger.private_key_pem),
    ]:
        blob.write_to_path(str(tmp_path / name))
        files[name] = str(tmp_path / name)
    (tmp_path / "password").write_text("s3cret\n")
    tls = EtcdTLS(
        files["server.pem"], files["server.key"], files["ca.pem"], True, files["client.pem"], files["client.key"]
    )
    client_port, peer_port = free_ports(2, 24820)
    lab = EtcdLab(tmp_path / "etcd", client_port, peer_port, tls=tls)
    lab.start()
    try:
        ctx = ssl.create_default_context(cafile=files["ca.pem"])
        ctx.load_cert_chain(files["client.pem"], files["client.key"])
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
            for path, body in [
                ("auth/user/add", {"name": "root", "password": "s3cret"}),
                ("auth/user/grant", {"user": "root", "role": "root"}),
                ("auth/enable", {}),
            ]:
                async with http.post(f"{lab.endpoint}/v3/{path}", json=body) as r:
                    assert r.status == 200, await r.text()
        good = EtcdSettings(
            (lab.endpoint,),
            ca_file=files["ca.pem"],
            cert_file=files["client.pem"],
            key_file=files["client.key"],
            username="root",
            password_file=str(tmp_path / "password"),
        )
        s = open_store(StoreSettings(backend="etcd", etcd=good), MEMBERS, TIMEOUT)
        rec = await s.acquire_leader("ca1", 30, "bootstrap")
        assert rec is not None and rec.epoch == 1
        assert isinstance(s, EtcdStore)
        logins = 0
        login = s._authenticate

        async def counted() -> None:
            nonlocal logins
            logins += 1
            await login()

        s._authenticate = counted  # type: ignore[method-assign]
        s._token = "expired-or-bogus"  # a token etcd no longer knows: the store must log in again
        renewed = await s.renew_leader("ca1", 1, 30)
        assert renewed is not None and logins == 1
        await s.close()
        # no password: the certificate's CN is not a user, so nothing is readable
        nopw = dataclasses.replace(good, username=None, password_file=None, cert_file=files["stranger.pem"])
        nopw = dataclasses.replace(nopw, key_file=files["stranger.key"])
        s2 = open_store(StoreSettings(backend="etcd", etcd=nopw), MEMBERS, TIMEOUT)
        with pytest.raises(StoreUnavailable):
            await s2.get_leader()
        await s2.close()
        # no client certificate at all: the TLS handshake is refused
        nocert = dataclasses.replace(good, cert_file=None, key_file=None)
        s3 = open_store(StoreSettings(backend="etcd", etcd=nocert), MEMBERS, TIMEOUT)
        with pytest.raises(StoreUnavailable):
            await s3.get_leader()
        await s3.close()
    finally:
        lab.stop()


# ---- the facts a decision reads (issue 9): epoch record, cooldown key, request ids, one read ----------


async def test_epoch_record_says_who_held_the_key_how_it_was_taken_and_that_it_was_released(backend: Backend) -> None:
    a, b = backend.open(), backend.open()
    assert await a.get_epoch_record() is None
    r1 = await a.acquire_leader("ca1", TTL, "bootstrap", kind="bootstrap")
    assert r1 is not None
    rec = await b.get_epoch_record()
    assert rec is not None and (rec.epoch, rec.name, rec.kind, rec.ended) == (1, "ca1", "bootstrap", None)
    assert await a.release_leader("ca1", 1, "switchover to ca2", target="ca2")
    rec = await b.get_epoch_record()
    assert rec is not None and (rec.ended, rec.target, rec.ended_reason) == ("released", "ca2", "switchover to ca2")
    assert await b.acquire_leader("ca2", TTL, "switchover", kind="switchover") is not None
    rec = await a.get_epoch_record()
    assert rec is not None and (rec.epoch, rec.name, rec.kind) == (2, "ca2", "switchover")
    assert (rec.previous, rec.previous_ended, rec.ended) == ("ca1", "released", None)
    await wait_until(lambda: _no_leader(a), limit=4.0)  # ca2 dies: its lease expires, nobody writes "ended"
    assert await a.acquire_leader("ca3", TTL, "elected") is not None
    rec = await b.get_epoch_record()
    assert rec is not None and (rec.epoch, rec.kind, rec.previous, rec.previous_ended) == (
        3,
        "automatic",
        "ca2",
        "expired",
    )


async def test_taking_an_expired_key_back_with_an_expected_epoch_fails_once_another_epoch_was_handed_out(
    backend: Backend,
) -> None:
    a, b = backend.open(), backend.open()
    assert await a.acquire_leader("ca1", TTL, "bootstrap", kind="bootstrap") is not None
    await wait_until(lambda: _no_leader(a), limit=4.0)
    assert await b.acquire_leader("ca2", TTL, "elected") is not None  # epoch 2, then it expires too
    await wait_until(lambda: _no_leader(a), limit=4.0)
    assert await a.acquire_leader("ca1", TTL, "take my key back", kind="resume", expect_epoch=1) is None
    took = await a.acquire_leader("ca1", TTL, "take my key back", kind="resume", expect_epoch=2)
    assert took is not None and took.epoch == 3


async def test_cooldown_key_needs_the_holder_lives_its_ttl_and_ack_ends_it(backend: Backend) -> None:
    a, b = backend.open(), backend.open()
    rec = await a.acquire_leader("ca2", 30, "elected")
    assert rec is not None
    assert not await b.start_cooldown("ca3", rec.epoch, 30), "only the holder starts the cooldown"
    assert not await b.start_cooldown("ca2", rec.epoch + 1, 30)
    assert await a.start_cooldown("ca2", rec.epoch, TTL)
    cd = await b.get_cooldown()
    assert cd is not None and (cd.name, cd.epoch) == ("ca2", rec.epoch)
    await wait_until(lambda: _none(b.get_cooldown()), limit=5.0)  # the store ends it, nobody's clock
    assert await a.start_cooldown("ca2", rec.epoch, 30)
    at = await b.ack_cooldown()
    assert await a.get_cooldown() is None
    assert (await a.get_flags()).cooldown_ack_at == at


async def test_clearing_a_switchover_request_by_id_never_deletes_a_newer_one(backend: Backend) -> None:
    s = backend.open()
    old = await s.request_switchover("ca2", "switchover", "admin")
    new = await s.request_switchover("ca3", "switchover", "admin")
    assert old.id and new.id and old.id != new.id
    await s.clear_switchover(old.id)
    assert (await s.get_flags()).switchover == new
    await s.clear_switchover(new.id)
    assert (await s.get_flags()).switchover is None


async def test_read_state_returns_every_fact_of_a_cycle_at_once(backend: Backend) -> None:
    s = backend.open()
    empty = await s.read_state()
    assert (empty.leader, empty.epoch, empty.epoch_unreadable, empty.cooldown) == (None, None, False, None)
    rec = await s.acquire_leader("ca1", 30, "bootstrap", kind="bootstrap")
    assert rec is not None
    await s.put_member("ca2", {"x": 1}, 30)
    await s.set_paused(True)
    await s.start_cooldown("ca1", rec.epoch, 30)
    st = await s.read_state()
    assert st.leader is not None and (st.leader.name, st.leader.epoch) == ("ca1", rec.epoch)
    assert st.leader.expires_at > time.time() + 20
    assert st.epoch is not None and st.epoch.kind == "bootstrap"
    assert set(st.members.records) == {"ca2"} and st.flags.paused and st.cooldown is not None


async def test_unreadable_epoch_record_is_reported_and_never_read_as_an_empty_store(backend: Backend) -> None:
    s = backend.open()
    await backend.raw_put("epoch", '{"epoch": "seven"}', None)
    st = await s.read_state()
    assert st.epoch is None and st.epoch_unreadable and any("epoch" in p for p in st.problems)


async def _none(aw: Awaitable[object]) -> bool:
    return await aw is None
