"""Regressions for the HA core defects of issue 9, each named after the defect it pins down.

View-builder and policy defects run over built snapshots; actuator defects run the real Actuator
against a real SQLite store and a fake CA whose steps can fail or hang."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ca_watchdog import lease_file
from ca_watchdog.actuator import Actuator
from ca_watchdog.config import parse_settings
from ca_watchdog.decide import decide
from ca_watchdog.loop import member_configs, policy_of
from ca_watchdog.metrics import Metrics
from ca_watchdog.model import CA_DOWN, CA_RUNNING, Action, ControlView, Decision, MemberState
from ca_watchdog.node import NodeError, PromotionTimes
from ca_watchdog.store.base import (
    EpochRecord,
    Flags,
    LeaderRecord,
    MemberRecord,
    MembersSnapshot,
    StoreState,
    StoreUnavailable,
)
from ca_watchdog.store.sqlite import SQLiteStore
from ca_watchdog.view import LocalFacts, RecordClock, build_view, decode_records

NAMES = ("ca1", "ca2", "ca3")
NOW = 1_700_000_000.0


def settings(tmp_path: Path, **timing: Any) -> Any:
    return parse_settings(
        {
            "node": {"name": "ca2", "cs_cfg": str(tmp_path / "CS.cfg"), "lease_file": str(tmp_path / "lease.json")},
            "store": {"path": str(tmp_path / "state.db")},
            "timing": {
                "interval": 0.2,
                "ttl": 10.0,
                "safety_margin": 2.0,
                "store_timeout": 1.0,
                "agent_timeout": 0.5,
                "ldap_timeout": 0.5,
                **timing,
            },
            "cluster": {"members": [{"name": n, "agent_url": f"https://{n}.example.test:8443"} for n in NAMES]},
        }
    )


def st(name: str, role: str = "clone", ca: str = CA_RUNNING, **kw: Any) -> MemberState:
    base: dict[str, Any] = {
        "updated_at": NOW,
        "ca_status": ca,
        "cscfg_role": role,
        "ds_ok": True,
        "replication": "green",
    }
    base.update(kw)
    return MemberState(name=name, **base)


def state(
    leader: str | None = None,
    epoch: EpochRecord | None = None,
    members: dict[str, dict[str, Any]] | None = None,
    paused: bool = False,
) -> StoreState:
    recs = {n: MemberRecord(n, p, NOW) for n, p in (members or {}).items()}
    lead = LeaderRecord(leader, 4, NOW, NOW, NOW + 10, "x") if leader else None
    return StoreState(lead, epoch, False, MembersSnapshot(recs, ()), Flags(paused, None, None, None), None, ())


def view_for(
    tmp_path: Path, me_state: MemberState, s: StoreState | None, others: dict[str, MemberState], **kw: Any
) -> Any:
    cfg = settings(tmp_path)
    return build_view(
        me=me_state.name,
        now=NOW,
        policy=policy_of(cfg),
        members=member_configs(cfg),
        local=me_state,
        state=s,
        store_error=None if s is not None else "store unreachable",
        records=others,
        record_ages={n: 0.0 for n in others},
        facts=kw.pop("facts", LocalFacts(uptime=100.0)),
        known_replica_ids={},
        **kw,
    )


# ---- facts from the store, not from history or memory ---------------------------------------------------------


def test_defect4_and_9_the_previous_master_comes_from_the_epoch_record_whatever_the_history_holds(
    tmp_path: Path,
) -> None:
    # ca1's lease ended (nobody wrote "released"); history may hold thousands of follow_failed events
    rec = EpochRecord(4, "ca1", "automatic", NOW - 100, "elected")
    others = {"ca3": st("ca3", watching="ca1", watched_status=CA_DOWN, watched_down_streak=5)}
    v = view_for(
        tmp_path, st("ca2", watching="ca1", watched_status=CA_DOWN, watched_down_streak=5), state(epoch=rec), others
    )
    assert (v.memory.previous_leader, v.memory.previous_leader_released, v.memory.epoch) == ("ca1", False, 4)
    d = decide(v)
    assert d.action is Action.PROMOTE and d.fence_old_master, d.line()  # not released: fenced, checked


def test_defect12_a_failover_that_never_completed_leaves_no_cooldown(tmp_path: Path) -> None:
    # ca2 took the key automatically and died before serving: no cooldown key was ever written
    rec = EpochRecord(5, "ca3", "automatic", NOW - 20, "elected", previous="ca1", previous_ended="expired")
    down = {"watching": "ca3", "watched_status": CA_DOWN, "watched_down_streak": 5}
    others = {"ca1": st("ca1", ca=CA_DOWN, ca_down_streak=1, **down)}
    v = view_for(tmp_path, st("ca2", **down), state(epoch=rec), others)
    assert v.control.cooldown_since is None
    d = decide(v)
    assert d.action is Action.PROMOTE and "cooldown" not in d.reason, d.line()


def test_defect18_malformed_member_records_are_dropped_and_reported_never_raised() -> None:
    good = st("ca1").to_payload()
    bad = {
        "ca1": good,
        "ca2": {**good, "max_csn": {"1": "zz" * 10}},  # 20 characters, not hex
        "ca3": {**good, "ca_down_streak": float("inf")},
        "ca9": good,  # not a member
    }
    cfg_members = member_configs(settings(Path("/nonexistent")))
    records, problems = decode_records(state(members=bad), cfg_members)
    assert set(records) == {"ca1"}
    assert len(problems) == 3 and any("ca9" in p for p in problems)


def test_defect19_a_store_error_keeps_the_last_pause_seen(tmp_path: Path) -> None:
    paused = ControlView(paused=True, paused_at=NOW - 5)
    v = view_for(tmp_path, st("ca2"), None, {}, last_flags=paused)
    assert v.control.paused and not v.store_ok


def test_defect19_record_ages_come_from_the_readers_clock_not_the_writers() -> None:
    clock = RecordClock()
    skewed = st("ca3", updated_at=NOW - 3600)  # its writer's clock is an hour behind
    assert clock.ages({"ca3": skewed}, now=100.0) == {"ca3": 0.0}
    assert clock.ages({"ca3": skewed}, now=105.0) == {"ca3": 5.0}  # unchanged for 5 s: 5 s old
    fresh = st("ca3", updated_at=NOW - 3599)
    assert clock.ages({"ca3": fresh}, now=106.0) == {"ca3": 0.0}  # changed: fresh again


# ---- policy -------------------------------------------------------------------------------------------------


def test_defect7_a_non_holder_whose_inconsistent_cscfg_would_generate_crls_stops_its_ca(tmp_path: Path) -> None:
    me = st("ca2", role="inconsistent", cscfg_problem="issuing point x generates", cscfg_master_duty=True)
    d = decide(view_for(tmp_path, me, state(leader="ca1", epoch=EpochRecord(4, "ca1", "automatic", NOW, "x")), {}))
    assert d.action is Action.STOP_CA, d.line()
    quiet = st("ca2", role="inconsistent", cscfg_problem="listener on", cscfg_master_duty=False)
    d = decide(view_for(tmp_path, quiet, state(leader="ca1", epoch=EpochRecord(4, "ca1", "automatic", NOW, "x")), {}))
    assert d.action is Action.WAIT, d.line()


def test_defect8_pause_reboot_resume_the_old_master_back_as_a_clone_ends_the_wait(tmp_path: Path) -> None:
    # the guard demoted ca1's CS.cfg during the reboot; its CA runs as a clone; nobody sees it "down"
    rec = EpochRecord(4, "ca1", "automatic", NOW - 300, "x")
    others = {
        "ca1": st("ca1", role="clone"),
        "ca3": st("ca3", watching="ca1", watched_status=CA_RUNNING, watched_role="clone"),
    }
    me = st("ca2", watching="ca1", watched_status=CA_RUNNING, watched_role="clone")
    d = decide(view_for(tmp_path, me, state(epoch=rec), others))
    assert d.action is Action.PROMOTE, d.line()


def test_defect8_with_no_other_candidate_the_old_master_back_as_a_running_clone_is_elected(tmp_path: Path) -> None:
    rec = EpochRecord(4, "ca1", "automatic", NOW - 300, "x")
    me = st("ca1", role="clone")
    others = {"ca2": st("ca2", ca=CA_DOWN, ca_down_streak=9), "ca3": st("ca3", ca=CA_DOWN, ca_down_streak=9)}
    d = decide(view_for(tmp_path, me, state(epoch=rec), others))
    assert d.action is Action.PROMOTE and d.target == "ca1", d.line()


def test_defect11_after_a_failed_promotion_a_stopped_clone_is_started_when_nobody_holds_the_key(tmp_path: Path) -> None:
    rec = EpochRecord(6, "ca2", "automatic", NOW - 30, "x", ended="released", ended_reason="promotion failed")
    me = st("ca2", ca=CA_DOWN, ca_down_streak=3, ca_reason="connection refused")
    d = decide(view_for(tmp_path, me, state(epoch=rec), {}))
    assert d.action is Action.START_CLONE, d.line()


# ---- the actuator -------------------------------------------------------------------------------------------


class FakeCA:
    """LocalCA's surface: every step can be made to fail or to hang."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail_stop = False
        self.fail_start = False
        self.hang_start = asyncio.Event()
        self.hang = False

    async def stop(self) -> None:
        self.calls.append("stop")
        if self.fail_stop:
            raise NodeError("stop timed out")

    async def start(self) -> None:
        self.calls.append("start")

    async def fence(self, successor: str | None, journal: Any = None) -> None:
        await self.stop()
        self.calls.append("demote")

    async def demote(self, new_master: str, start: bool, journal: Any = None) -> None:
        self.calls.append("demote")

    async def promote(self, lines: Any, journal: Any, before_start: Any) -> PromotionTimes:
        await journal("promote: stopping")
        self.calls.append("stop")
        await journal("promote: writing CS.cfg")
        await before_start()
        await journal("promote: starting")
        self.calls.append("start-as-master")
        if self.hang:
            self.hang_start.set()
            await asyncio.sleep(3600)
        if self.fail_start:
            raise NodeError("CA failed to start")
        return PromotionTimes(1, 2, 3, 4)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "state.db", NAMES, 1.0)
    yield s
    await s.close()


def actuator(tmp_path: Path, store: Any, ca: FakeCA) -> Actuator:
    cfg = settings(tmp_path)
    return Actuator(cfg, store, ca, Metrics("ca2"), policy_of(cfg))  # type: ignore[arg-type]


def promote_view(tmp_path: Path) -> Any:
    return view_for(tmp_path, st("ca2"), state(epoch=EpochRecord(1, "ca1", "bootstrap", NOW, "x")), {})


async def test_defect5_a_rollback_keeps_the_key_when_the_ca_is_not_confirmed_stopped(
    tmp_path: Path, store: SQLiteStore
) -> None:
    ca = FakeCA()
    ca.fail_start = True
    a = actuator(tmp_path, store, ca)
    await a.apply(Decision(Action.PROMOTE, "elected", target="ca2"), promote_view(tmp_path))
    ca.fail_stop = True  # the rollback's stop fails too
    assert a.task is not None
    await a.task
    leader = await store.get_leader()
    assert leader is not None and leader.name == "ca2", "the key was released while the CA may still serve"


async def test_defect5_a_rollback_releases_the_key_once_the_ca_is_confirmed_stopped(
    tmp_path: Path, store: SQLiteStore
) -> None:
    ca = FakeCA()
    ca.fail_start = True
    a = actuator(tmp_path, store, ca)
    await a.apply(Decision(Action.PROMOTE, "elected", target="ca2"), promote_view(tmp_path))
    assert a.task is not None
    await a.task
    assert await store.get_leader() is None
    rec = await store.get_epoch_record()
    assert rec is not None and rec.ended == "released" and "promotion failed" in (rec.ended_reason or "")


async def test_defect3_a_self_fence_pre_empts_a_running_promotion(tmp_path: Path, store: SQLiteStore) -> None:
    ca = FakeCA()
    ca.hang = True
    a = actuator(tmp_path, store, ca)
    await a.apply(Decision(Action.PROMOTE, "elected", target="ca2"), promote_view(tmp_path))
    await asyncio.wait_for(ca.hang_start.wait(), 5)
    promotion = a.task
    await a.apply(Decision(Action.SELF_FENCE, "lease overdue", target="ca1"), promote_view(tmp_path))
    assert promotion is not None and promotion.cancelled()
    assert a.task is not None
    await a.task
    assert ca.calls[-2:] == ["stop", "demote"] and a.held_epoch is None


async def test_defect3_nothing_starts_the_ca_as_master_once_the_lease_is_lost(
    tmp_path: Path, store: SQLiteStore
) -> None:
    ca = FakeCA()
    a = actuator(tmp_path, store, ca)
    real_renew = store.renew_leader

    async def lost(*args: Any) -> None:
        return None  # another member holds the key now

    store.renew_leader = lost  # type: ignore[method-assign]
    await a.apply(Decision(Action.PROMOTE, "elected", target="ca2"), promote_view(tmp_path))
    assert a.task is not None
    with contextlib.suppress(asyncio.CancelledError):
        await a.task  # the lost lease stops the promotion where it is
    assert "start-as-master" not in ca.calls
    store.renew_leader = real_renew  # type: ignore[method-assign]


async def test_defect6_a_release_whose_answer_is_lost_is_read_back_not_retried_into_a_failure(
    tmp_path: Path, store: SQLiteStore
) -> None:
    rec = await store.acquire_leader("ca2", 10.0, "x")
    assert rec is not None
    a = actuator(tmp_path, store, FakeCA())
    a.held_epoch = rec.epoch
    real_release = store.release_leader

    async def lost_answer(*args: Any) -> bool:
        await real_release(*args)
        raise StoreUnavailable("answer lost after the commit")

    store.release_leader = lost_answer  # type: ignore[method-assign]
    await a._release("switchover to ca3", "ca3")
    assert a.held_epoch is None
    rec2 = await store.get_epoch_record()
    assert rec2 is not None and rec2.ended == "released" and rec2.target == "ca3"


async def test_defect16_sigterm_during_a_promotion_stops_it_without_a_rollback(
    tmp_path: Path, store: SQLiteStore
) -> None:
    ca = FakeCA()
    ca.hang = True
    a = actuator(tmp_path, store, ca)
    await a.apply(Decision(Action.PROMOTE, "elected", target="ca2"), promote_view(tmp_path))
    await asyncio.wait_for(ca.hang_start.wait(), 5)
    await a.stop()
    assert "demote" not in ca.calls, "a stop of the daemon rolled the promotion back"
    leader = await store.get_leader()
    assert leader is not None and leader.name == "ca2", "the key must stay for the next run to finish the promotion"
    step = await store.get_step("ca2")
    assert step is not None and step["step"] == "promote: starting"


async def test_defect15_an_unfinished_step_is_cleared_once_a_decision_was_taken_on_it(
    tmp_path: Path, store: SQLiteStore
) -> None:
    await store.put_step("ca2", {"step": "promote: starting"})
    a = actuator(tmp_path, store, FakeCA())
    await a.load_journal()
    assert a.unfinished_step == "promote: starting"
    v = view_for(tmp_path, st("ca2"), state(leader="ca1", epoch=EpochRecord(4, "ca1", "automatic", NOW, "x")), {})
    await a.apply(Decision(Action.WAIT, "clone of ca1"), v)
    assert a.unfinished_step is None and await store.get_step("ca2") is None


async def test_defect17_taking_my_own_expired_key_back_never_touches_the_ca(tmp_path: Path, store: SQLiteStore) -> None:
    assert await store.acquire_leader("ca2", 0.5, "bootstrap", kind="bootstrap") is not None
    await asyncio.sleep(0.7)
    ca = FakeCA()
    a = actuator(tmp_path, store, ca)
    v = view_for(tmp_path, st("ca2", role="master"), await store.read_state(), {})
    d = decide(v)
    assert d.action is Action.RESUME, d.line()
    await a.apply(d, v)
    assert ca.calls == [] and a.held_epoch == 2
    rec = await store.get_epoch_record()
    assert rec is not None and rec.kind == "resume"


@pytest.mark.parametrize("expect_epoch", [0])
async def test_defect17_resume_fails_once_another_epoch_was_handed_out(
    tmp_path: Path, store: SQLiteStore, expect_epoch: int
) -> None:
    assert await store.acquire_leader("ca2", 10, "bootstrap", kind="bootstrap") is not None
    assert await store.acquire_leader("ca2", 10, "x", kind="resume", expect_epoch=expect_epoch) is None


async def test_defect14_renewals_keep_their_cadence_while_a_cycle_is_stuck_in_slow_probes(
    tmp_path: Path, store: SQLiteStore
) -> None:
    # the cycle is not running at all here (as if its probes hung): the renewer alone keeps the lease
    rec = await store.acquire_leader("ca2", 10.0, "x")
    assert rec is not None
    a = actuator(tmp_path, store, FakeCA())
    a.held_epoch, a.last_renew = rec.epoch, None
    a.start_renewer()
    seen: list[float] = []
    for _ in range(8):
        await asyncio.sleep(0.2)  # interval 0.2 s in these settings
        leader = await store.get_leader()
        assert leader is not None
        seen.append(leader.renewed_at)
    await a.stop()
    assert len(set(seen)) >= 4, f"renewals stalled: {seen}"
    age = a.lease_age()
    assert age is not None and age < 1.0


def test_defect19_a_store_blip_keeps_my_proven_lease_in_the_view_so_master_keeps_answering(tmp_path: Path) -> None:
    me = st("ca2", role="master")
    fresh = LocalFacts(uptime=100.0, seconds_since_renew=1.5, held_epoch=7)
    v = view_for(tmp_path, me, None, {}, facts=fresh)
    assert not v.store_ok and v.leader is not None and (v.leader.name, v.leader.epoch) == ("ca2", 7)
    assert decide(v).action is Action.WAIT  # decided by the lease age, without the store
    old = LocalFacts(uptime=100.0, seconds_since_renew=9.0, held_epoch=7)  # past ttl - safety_margin
    assert view_for(tmp_path, me, None, {}, facts=old).leader is None


async def test_the_lease_is_handed_to_the_guard_while_held_and_withdrawn_the_moment_it_is_released(
    tmp_path: Path,
    store: SQLiteStore,
) -> None:
    """The guard that runs before a start as master must see the lease the daemon renewed for it; once
    the key is released (or lost), no proof may outlive it, or a store blip would let a master CS.cfg
    start on a member that no longer holds the key."""
    a = actuator(tmp_path, store, FakeCA())
    path = str(tmp_path / "lease.json")
    rec = await a._acquire(Decision(Action.PROMOTE, "elected", target="ca2"))
    assert rec is not None
    proof = lease_file.read(path, "ca2")
    assert proof is not None and proof.epoch == rec.epoch and proof.age() < 1.0
    before = proof.renewed
    assert await a.renew()
    proof = lease_file.read(path, "ca2")
    assert proof is not None and proof.renewed > before
    await a._release("switchover to ca3", "ca3")
    assert lease_file.read(path, "ca2") is None
    rec = await a._acquire(Decision(Action.PROMOTE, "elected", target="ca2"))
    assert rec is not None and lease_file.read(path, "ca2") is not None
    await store.release_leader("ca2", rec.epoch, "taken away")  # someone ended it behind my back
    assert not await a.renew()
    assert lease_file.read(path, "ca2") is None
