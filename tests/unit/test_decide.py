"""Runbook tests for the HA policy `decide(view) -> Decision`.

Every test builds one immutable snapshot of a 3-member cluster (ca1, ca2, ca3; ca1 is the master unless a
test says otherwise) at a fixed `NOW`, calls the policy for one member, and checks the action, the target,
the kind / fence flag and the key words of the one-line reason. Test names say what broke and what must
happen.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ca_watchdog.decide import decide
from ca_watchdog.model import (
    CA_DOWN,
    CA_RUNNING,
    CA_STARTING,
    ROLE_UNREADABLE,
    Action,
    ClusterView,
    ControlView,
    Decision,
    LeaderView,
    LocalMemory,
    MemberConfig,
    MemberState,
    Policy,
)

NOW = 1_700_000_000.0
NAMES = ("ca1", "ca2", "ca3")
RID = {"ca1": 1, "ca2": 2, "ca3": 3, "ca4": 4}
EPOCH = 7
POLICY = Policy()  # interval 2, ttl 30, safety margin 5, threshold 3, restart first, lag 60 s, cooldown 1 h
TTL = POLICY.ttl
N = POLICY.failure_threshold
_UNSET: Any = object()


# ---- builders ----------------------------------------------------------------------------------------------


def csn(age: float = 0.0, rid: int = 1, seq: int = 0) -> str:
    """A 389-DS CSN (20 hex digits: time, sequence, replica id, sub-sequence) `age` seconds before NOW."""
    return f"{int(NOW - age):08x}{seq:04x}{rid:04x}0000"


def cfgs(extra: Iterable[str] = (), **overrides: dict[str, Any]) -> tuple[MemberConfig, ...]:
    out = []
    for name in (*NAMES, *extra):
        kw: dict[str, Any] = {"agent_host": f"{name}.example.test", "agent_port": 8443}
        kw.update(overrides.get(name, {}))
        out.append(MemberConfig(name=name, **kw))
    return tuple(out)


def master(name: str = "ca1", **kw: Any) -> MemberState:
    """A member whose CS.cfg is master and whose CA serves."""
    base: dict[str, Any] = {
        "updated_at": NOW,
        "ca_status": CA_RUNNING,
        "cscfg_role": "master",
        "ds_ok": True,
        "replication": "green",
        "replica_id": RID[name],
        "max_csn": {RID[name]: csn(0, RID[name])},
    }
    base.update(kw)
    return MemberState(name=name, **base)


def clone(
    name: str,
    *,
    of: str = "ca1",
    seen: str | None = CA_RUNNING,
    seen_streak: int = 0,
    lag: float = 0.0,
    **kw: Any,
) -> MemberState:
    """A healthy clone of `of` that watches it (`seen`: what its probe of the master says) and has received
    everything from it up to `lag` seconds before NOW."""
    if seen == CA_DOWN and seen_streak == 0:
        seen_streak = N
    base: dict[str, Any] = {
        "updated_at": NOW,
        "ca_status": CA_RUNNING,
        "cscfg_role": "clone",
        "ds_ok": True,
        "replication": "green",
        "replica_id": RID[name],
        "max_csn": {RID[of]: csn(lag, RID[of])},
        "master_agent": f"{of}.example.test:8443",
        "watching": of if seen is not None else None,
        "watched_status": seen,
        "watched_down_streak": seen_streak,
    }
    base.update(kw)
    return MemberState(name=name, **base)


@dataclass(frozen=True)
class Memory(LocalMemory):
    """LocalMemory plus when the last automatic failover completed, which the store keeps as the cooldown
    key (living failover_cooldown seconds, deleted by an ack); view() turns it into that key."""

    last_failover_at: float | None = None


def memory(**kw: Any) -> Memory:
    base: dict[str, Any] = {
        "seconds_since_renew": 1.0,
        "previous_leader": "ca1",
        "epoch": EPOCH,
        "known_replica_ids": dict(RID),
    }
    base.update(kw)
    return Memory(**base)


def view(
    me: str,
    states: Mapping[str, MemberState],
    *,
    leader: str | None = _UNSET,
    epoch: int = EPOCH,
    paused: bool = False,
    switchover: str | None = None,
    kind: str | None = None,
    ack: float | None = None,
    mem: LocalMemory | None = None,
    policy: Policy = POLICY,
    members: tuple[MemberConfig, ...] | None = None,
    store_ok: bool = True,
    store_error: str | None = None,
    busy: str | None = None,
) -> ClusterView:
    if leader is _UNSET:
        leader = "ca1"
    mem = mem if mem is not None else memory()
    last = getattr(mem, "last_failover_at", None)
    cooldown_on = last is not None and NOW - last < policy.failover_cooldown and (ack is None or ack < last)
    return ClusterView(
        now=NOW,
        me=me,
        policy=policy,
        members=members if members is not None else cfgs(),
        local=states[me],
        records={n: s for n, s in states.items() if n != me},
        leader=LeaderView(leader, epoch, NOW + policy.ttl) if leader else None,
        control=ControlView(
            paused=paused,
            switchover_target=switchover,
            switchover_kind=kind if kind or not switchover else "switchover",
            cooldown_since=last if cooldown_on else None,
        ),
        memory=mem,
        store_ok=store_ok,
        store_error=store_error,
        busy=busy,
        record_ages={n: NOW - s.updated_at for n, s in states.items() if n != me},
    )


def decide_for(me: str, states: Mapping[str, MemberState], **kw: Any) -> Decision:
    return decide(view(me, states, **kw))


def healthy() -> dict[str, MemberState]:
    return {"ca1": master("ca1"), "ca2": clone("ca2"), "ca3": clone("ca3")}


def master_ca_down(streak: int = N, **clones: MemberState) -> dict[str, MemberState]:
    """ca1 holds the key; its CA failed `streak` probes in a row (its host and daemon live)."""
    states = {
        "ca1": master("ca1", ca_status=CA_DOWN, ca_down_streak=streak, ca_reason="connection refused"),
        "ca2": clone("ca2", seen=CA_DOWN, seen_streak=streak),
        "ca3": clone("ca3", seen=CA_DOWN, seen_streak=streak),
    }
    states.update(clones)
    return states


def master_host_gone(**clones: MemberState) -> dict[str, MemberState]:
    """ca1's host died: no record of it, both clones see its agent port down for N probes."""
    states = {"ca2": clone("ca2", seen=CA_DOWN), "ca3": clone("ca3", seen=CA_DOWN)}
    states.update(clones)
    return states


def expect(
    d: Decision,
    action: Action,
    *,
    target: str | None = _UNSET,
    kind: str | None = None,
    fence: bool | None = None,
    says: Iterable[str] = (),
    not_says: Iterable[str] = (),
) -> None:
    assert d.action is action, d.line()
    if target is not _UNSET:
        assert d.target == target, d.line()
    if kind is not None:
        assert d.kind == kind, d.line()
    if fence is not None:
        assert d.fence_old_master is fence, d.line()
    for word in says:
        assert word in d.reason, f"{word!r} not in {d.reason!r}"
    for word in not_says:
        assert word not in d.reason, f"{word!r} unexpectedly in {d.reason!r}"
    assert "\n" not in d.reason


# ---- bootstrap: empty store --------------------------------------------------------------------------------

FRESH = memory(previous_leader=None, epoch=0, seconds_since_renew=None)


def test_bootstrap_exactly_one_cscfg_master_which_is_me_takes_the_key() -> None:
    d = decide_for("ca1", healthy(), leader=None, mem=FRESH)
    expect(d, Action.BOOTSTRAP, target="ca1", kind="bootstrap", fence=False, says=("only master",))
    assert d.line() == "bootstrap: my CS.cfg is the only master: taking the key"  # said once, not twice


@pytest.mark.parametrize("me", ["ca2", "ca3"])
def test_bootstrap_exactly_one_cscfg_master_elsewhere_clones_wait_for_it_to_take_the_key(me: str) -> None:
    d = decide_for(me, healthy(), leader=None, mem=FRESH)
    expect(d, Action.WAIT, target=None, says=("bootstrap", "ca1", "only master", "waiting"))


@pytest.mark.parametrize("me", NAMES)
def test_bootstrap_zero_cscfg_masters_nobody_acts_and_points_at_the_bootstrap_command(me: str) -> None:
    states = {"ca1": clone("ca1", of="ca2"), "ca2": clone("ca2"), "ca3": clone("ca3")}
    d = decide_for(me, states, leader=None, mem=FRESH)
    expect(d, Action.WAIT, says=("no CS.cfg master", "ca1 clone", "ca-watchdog bootstrap --master"))


@pytest.mark.parametrize("me", NAMES)
def test_bootstrap_several_cscfg_masters_nobody_acts_and_names_them(me: str) -> None:
    states = {"ca1": master("ca1"), "ca2": master("ca2"), "ca3": clone("ca3")}
    d = decide_for(me, states, leader=None, mem=FRESH)
    expect(d, Action.WAIT, says=("several CS.cfg masters", "ca1, ca2", "nobody acts", "ca-watchdog bootstrap"))


def test_bootstrap_inconsistent_or_unreadable_cscfg_is_not_counted_as_a_master() -> None:
    states = {
        "ca1": master("ca1"),
        "ca2": clone("ca2", cscfg_role="inconsistent", cscfg_problem="half master"),
        "ca3": clone("ca3", cscfg_role=ROLE_UNREADABLE, cscfg_problem="line 12 has no ="),
    }
    expect(decide_for("ca1", states, leader=None, mem=FRESH), Action.BOOTSTRAP, target="ca1")


def test_bootstrap_paused_the_only_master_does_not_take_the_key_and_says_paused() -> None:
    d = decide_for("ca1", healthy(), leader=None, mem=FRESH, paused=True)
    expect(d, Action.WAIT, says=("paused", "would take the key"))


# ---- the master holds the key ------------------------------------------------------------------------------


def test_healthy_master_renews_its_lease() -> None:
    d = decide_for("ca1", healthy())
    expect(d, Action.RENEW, says=("healthy master", f"epoch {EPOCH}"))


def test_master_ca_starting_is_not_a_failure_and_the_lease_is_renewed() -> None:
    states = master_ca_down(streak=0)
    states["ca1"] = master("ca1", ca_status=CA_STARTING)
    expect(decide_for("ca1", states), Action.RENEW, says=("starting",))


@pytest.mark.parametrize("streak", range(1, N))
def test_master_ca_failing_fewer_than_threshold_probes_renews_and_counts(streak: int) -> None:
    d = decide_for("ca1", master_ca_down(streak))
    expect(d, Action.RENEW, says=(f"failed probe {streak}/{N}", "connection refused", "renewing"))


def test_master_ca_down_threshold_probes_restarts_it_once_before_failing_over() -> None:
    d = decide_for("ca1", master_ca_down())
    expect(d, Action.RESTART_CA, says=(f"down for {N} probes", "restarting it once"))


def test_master_ca_down_three_probes_after_the_restart_demotes_and_releases_for_the_best_clone() -> None:
    d = decide_for("ca1", master_ca_down(), mem=memory(restarted_in_incident=True))
    expect(
        d,
        Action.DEMOTE_AND_RELEASE,
        target="ca2",
        kind="automatic",
        fence=False,
        says=("restart did not help", "demoting and releasing", "for ca2", "best of ca2, ca3"),
    )


def test_master_ca_down_three_probes_without_restart_before_failover_demotes_at_once() -> None:
    pol = replace(POLICY, restart_before_failover=False)
    d = decide_for("ca1", master_ca_down(), policy=pol)
    expect(d, Action.DEMOTE_AND_RELEASE, target="ca2", says=("demoting and releasing",), not_says=("restart",))


def test_master_ca_down_hands_over_to_the_clone_with_most_data_from_the_master() -> None:
    states = master_ca_down(ca2=clone("ca2", seen=CA_DOWN, lag=5), ca3=clone("ca3", seen=CA_DOWN, lag=1))
    d = decide_for("ca1", states, mem=memory(restarted_in_incident=True))
    expect(d, Action.DEMOTE_AND_RELEASE, target="ca3", says=("best of ca3, ca2",))


def test_master_ca_down_with_no_eligible_clone_keeps_restarting_and_says_why_per_clone() -> None:
    states = master_ca_down(
        ca2=clone("ca2", seen=CA_DOWN, ca_status=CA_DOWN, ca_down_streak=4),
        ca3=clone("ca3", seen=CA_DOWN, ds_ok=False),
    )
    d = decide_for("ca1", states, mem=memory(restarted_in_incident=True))
    expect(d, Action.RESTART_CA, says=("no eligible clone", "ca2: CA down", "ca3: local 389-DS down", "again"))


def test_master_ca_down_with_no_eligible_clone_and_no_restart_configured_keeps_the_role() -> None:
    states = master_ca_down(
        ca2=clone("ca2", seen=CA_DOWN, replication="red", replication_red=("ca3",)),
        ca3=clone("ca3", seen=CA_DOWN, busy="restarting"),
    )
    pol = replace(POLICY, restart_before_failover=False)
    d = decide_for("ca1", states, policy=pol)
    expect(d, Action.RENEW, says=("no eligible clone", "ca2: replication red", "ca3: busy", "keeping the role"))


def test_master_ca_down_alone_in_the_store_says_the_clones_have_no_fresh_record() -> None:
    states = {"ca1": master_ca_down()["ca1"]}
    d = decide_for("ca1", states, mem=memory(restarted_in_incident=True))
    expect(d, Action.RESTART_CA, says=("ca2: no fresh member record", "ca3: no fresh member record"))


def test_master_ca_down_within_cooldown_keeps_the_role_and_says_how_to_acknowledge() -> None:
    mem = memory(restarted_in_incident=True, last_failover_at=NOW - 600)
    d = decide_for("ca1", master_ca_down(), mem=mem)
    expect(d, Action.RENEW, says=("cooldown", "600s ago", "ca-watchdog ack", "keeping the role"))


def test_master_ca_down_within_cooldown_but_acknowledged_fails_over() -> None:
    mem = memory(restarted_in_incident=True, last_failover_at=NOW - 600)
    d = decide_for("ca1", master_ca_down(), mem=mem, ack=NOW - 600)
    expect(d, Action.DEMOTE_AND_RELEASE, target="ca2")


def test_master_ca_down_after_the_cooldown_elapsed_fails_over() -> None:
    mem = memory(restarted_in_incident=True, last_failover_at=NOW - POLICY.failover_cooldown)
    expect(decide_for("ca1", master_ca_down(), mem=mem), Action.DEMOTE_AND_RELEASE, target="ca2")


def test_master_with_a_long_action_in_progress_only_renews() -> None:
    d = decide_for("ca1", master_ca_down(), busy="restart_ca")
    expect(d, Action.RENEW, says=("restart_ca in progress",))


@pytest.mark.parametrize("role", [ROLE_UNREADABLE, "inconsistent"])
def test_master_holding_the_key_with_a_corrupt_cscfg_and_a_running_ca_renews_and_never_touches_the_file(
    role: str,
) -> None:
    states = master_ca_down(ca1=master("ca1", cscfg_role=role, cscfg_problem="bad line", ca_status=CA_RUNNING))
    d = decide_for("ca1", states, mem=memory(restarted_in_incident=True))
    expect(d, Action.RENEW, says=(f"CS.cfg is {role}", "bad line", "not touching", "repair"))


@pytest.mark.parametrize("role", [ROLE_UNREADABLE, "inconsistent"])
def test_defect10_key_holder_with_an_unreadable_cscfg_and_a_dead_ca_releases_the_key_to_the_best_clone(
    role: str,
) -> None:
    states = master_ca_down(
        ca1=master("ca1", cscfg_role=role, cscfg_problem="bad line", ca_status=CA_DOWN, ca_down_streak=9)
    )
    d = decide_for("ca1", states, mem=memory(restarted_in_incident=True))
    expect(d, Action.DEMOTE_AND_RELEASE, target="ca2", says=(f"CS.cfg is {role}", "CA down", "left for repair"))


def test_defect10_switchover_moves_a_key_holder_whose_cscfg_is_unreadable() -> None:
    states = {**healthy(), "ca1": master("ca1", cscfg_role=ROLE_UNREADABLE, cscfg_problem="bad line")}
    d = decide_for("ca1", states, switchover="ca2")
    expect(d, Action.DEMOTE_AND_RELEASE, target="ca2", kind="switchover")


def test_key_holder_with_a_clone_cscfg_completes_the_interrupted_promotion() -> None:
    states = healthy()
    states["ca1"] = clone("ca1", of="ca2", seen=None, ca_status=CA_DOWN)
    d = decide_for("ca1", states)
    expect(d, Action.PROMOTE, target="ca1", says=("completing the promotion",))


# ---- clones while a master holds the key -------------------------------------------------------------------


@pytest.mark.parametrize("me", ["ca2", "ca3"])
def test_clone_of_a_healthy_master_waits_and_reports_what_it_sees(me: str) -> None:
    d = decide_for(me, healthy())
    expect(d, Action.WAIT, target=None, says=("clone of ca1", f"epoch {EPOCH}", "its CA is running"))


def test_clone_whose_cscfg_still_names_another_master_waits_and_notes_the_correction() -> None:
    states = healthy()
    states["ca2"] = clone("ca2", master_agent="ca3.example.test:8443")
    d = decide_for("ca2", states)
    expect(d, Action.WAIT, says=("still points at ca3.example.test:8443", "next CA restart"))


def test_non_leader_with_a_master_cscfg_follows_the_leader_by_demoting() -> None:
    states = healthy()
    states["ca3"] = master("ca3")
    d = decide_for("ca3", states)
    expect(d, Action.FOLLOW, target="ca1", says=("ca1 holds the key", "my CS.cfg is master", "demoting"))


def test_non_leader_with_a_master_cscfg_and_a_stopped_ca_still_demotes() -> None:
    states = healthy()
    states["ca3"] = master("ca3", ca_status=CA_DOWN, ca_down_streak=1)
    expect(decide_for("ca3", states), Action.FOLLOW, target="ca1")


def test_clone_whose_ca_is_down_threshold_probes_is_started_as_a_clone_of_the_leader() -> None:
    states = healthy()
    states["ca2"] = clone("ca2", ca_status=CA_DOWN, ca_down_streak=N, ca_reason="stopped")
    d = decide_for("ca2", states)
    expect(d, Action.FOLLOW, target="ca1", says=("my CA is down", "stopped", "starting it as a clone of ca1"))


def test_clone_whose_ca_failed_fewer_than_threshold_probes_only_waits() -> None:
    states = healthy()
    states["ca2"] = clone("ca2", ca_status=CA_DOWN, ca_down_streak=N - 1)
    expect(decide_for("ca2", states), Action.WAIT, says=("clone of ca1",))


@pytest.mark.parametrize("role", [ROLE_UNREADABLE, "inconsistent"])
def test_clone_with_a_corrupt_cscfg_is_never_touched_even_with_its_ca_down(role: str) -> None:
    states = healthy()
    states["ca2"] = clone("ca2", cscfg_role=role, cscfg_problem="bad", ca_status=CA_DOWN, ca_down_streak=N + 5)
    d = decide_for("ca2", states)
    expect(d, Action.WAIT, says=(role, "never elected", "untouched"))


def test_clone_with_a_long_action_in_progress_waits() -> None:
    states = healthy()
    states["ca2"] = master("ca2")
    expect(decide_for("ca2", states, busy="follow"), Action.WAIT, says=("follow in progress",))


def test_clone_named_as_switchover_target_waits_for_the_master_to_step_down() -> None:
    d = decide_for("ca3", healthy(), switchover="ca3")
    expect(d, Action.WAIT, says=("to me requested", "waiting for ca1 to step down"))


# ---- store unreachable: self-fencing ------------------------------------------------------------------------


def cut_off(age: float | None, **kw: Any) -> ClusterView:
    """ca1 was master; the store stopped answering; its last successful renewal was `age` seconds ago."""
    states = {"ca1": kw.pop("ca1", master("ca1"))}
    return view(
        "ca1",
        states,
        leader=None,
        store_ok=False,
        store_error="store unreachable: timeout",
        mem=memory(seconds_since_renew=age),
        **kw,
    )


@pytest.mark.parametrize("age", [0.0, 10.0, TTL - POLICY.safety_margin - 0.1])
def test_store_unreachable_master_keeps_its_role_until_ttl_minus_safety_margin(age: float) -> None:
    d = decide(cut_off(age))
    expect(d, Action.WAIT, says=("store unreachable", "keeping the master role", "self-fence at 25s"))


@pytest.mark.parametrize("age", [TTL - POLICY.safety_margin, TTL - 1, TTL + 60])
def test_store_unreachable_master_self_fences_once_lease_age_reaches_ttl_minus_safety_margin(age: float) -> None:
    d = decide(cut_off(age))
    expect(d, Action.SELF_FENCE, says=("store unreachable", "lease not renewed", "stopping the CA and demoting"))
    assert d.target in ("ca2", "ca3")  # the CS.cfg is pointed somewhere sane until the new master is known


def test_store_down_for_everyone_master_keeps_its_role_when_every_member_acknowledges_it_failsafe() -> None:
    v = replace(cut_off(TTL + 60), failsafe_acks=("ca2", "ca3"))
    expect(decide(v), Action.WAIT, says=("failsafe", "ca2, ca3", "keeping the master role"))


def test_store_down_master_self_fences_when_one_member_does_not_acknowledge_it() -> None:
    v = replace(cut_off(TTL - POLICY.safety_margin), failsafe_acks=("ca2",))
    expect(decide(v), Action.SELF_FENCE, says=("no failsafe acknowledgement from ca3", "stopping the CA"))


def test_store_unreachable_self_fence_is_idempotent_once_ca_stopped_and_cscfg_clone() -> None:
    fenced = clone("ca1", of="ca2", seen=None, ca_status=CA_DOWN, ca_down_streak=20)
    expect(decide(cut_off(TTL * 3, ca1=fenced)), Action.WAIT, says=("self-fenced",))


def test_store_unreachable_fenced_master_whose_ca_was_restarted_as_a_clone_is_not_fenced_again() -> None:
    # the guard starts the CA as a clone while the store is unreachable: that CA cannot generate CRLs
    fenced = clone("ca1", of="ca2", seen=None, ca_status=CA_RUNNING)
    expect(decide(cut_off(TTL * 3, ca1=fenced)), Action.WAIT, says=("self-fenced",))


def test_store_unreachable_master_with_stopped_ca_but_master_cscfg_still_fences() -> None:
    half = master("ca1", ca_status=CA_DOWN, ca_down_streak=3)
    expect(decide(cut_off(TTL, ca1=half)), Action.SELF_FENCE)


def test_store_unreachable_paused_master_still_fences_because_the_pause_may_have_been_lifted() -> None:
    # simulation seed 196 (3 members): paused, the master cut off from the store, resumed meanwhile; the
    # others elected once its lease ended and its CA froze: two masters when it thawed
    expect(decide(cut_off(TTL, paused=True)), Action.SELF_FENCE, says=("even paused", "may have been lifted"))


@pytest.mark.parametrize("uptime", [1.0, TTL - POLICY.safety_margin - 0.1])
def test_defect1_restarted_daemon_whose_ca_serves_as_master_keeps_it_until_the_deadline_from_its_own_start(
    uptime: float,
) -> None:
    v = cut_off(None)
    v = replace(v, memory=replace(v.memory, uptime=uptime))
    expect(decide(v), Action.WAIT, says=("keeping the master role", "no lease proven", "since my start"))


@pytest.mark.parametrize("uptime", [TTL - POLICY.safety_margin, TTL * 10])
def test_defect1_restarted_daemon_with_the_store_unreachable_fences_its_master_ca_by_the_deadline_from_its_start(
    uptime: float,
) -> None:
    # "was I master?" is answered by what the CA serves, not by process memory: a new process that
    # cannot prove a lease must not keep a master CA running past the point where clones may elect
    v = cut_off(None)
    v = replace(v, memory=replace(v.memory, uptime=uptime), failsafe_acks=("ca2", "ca3"))
    expect(decide(v), Action.SELF_FENCE, target="ca2", says=("no lease proven", "since my start", "stopping the CA"))


def test_store_unreachable_on_a_node_whose_ca_does_not_serve_as_master_takes_no_decision() -> None:
    v = cut_off(None, ca1=clone("ca1", of="ca2", seen=None))
    expect(decide(v), Action.WAIT, says=("no failover decision without the store", "not serving as master"))


@pytest.mark.parametrize("me", ["ca2", "ca3"])
def test_store_unreachable_clone_takes_no_failover_decision(me: str) -> None:
    states = master_host_gone()
    v = view(me, states, leader=None, store_ok=False, mem=memory(leaderless_for=999))
    expect(decide(v), Action.WAIT, says=("store unreachable", "no failover decision"))


# ---- lease expired: the old master may be alive --------------------------------------------------------------


@pytest.mark.parametrize("me", ["ca2", "ca3"])
def test_lease_expired_but_a_clone_still_sees_the_old_master_serving_no_failover_master_unmanaged(me: str) -> None:
    states = master_host_gone(ca2=clone("ca2", seen=CA_RUNNING))
    d = decide_for(me, states, leader=None, mem=memory(leaderless_for=TTL * 5))
    expect(d, Action.WAIT, says=("master unmanaged", "ca1's lease ended", "seen serving by ca2", "no failover"))


def test_lease_expired_but_the_old_master_reports_itself_serving_no_failover_master_unmanaged() -> None:
    states = master_host_gone(ca1=master("ca1"))  # clones cannot reach it, but it publishes its record
    d = decide_for("ca2", states, leader=None)
    expect(d, Action.WAIT, says=("master unmanaged", "ca1 itself"))


def test_lease_expired_and_old_master_ca_starting_counts_as_serving() -> None:
    states = master_host_gone(ca3=clone("ca3", seen=CA_STARTING))
    expect(decide_for("ca2", states, leader=None), Action.WAIT, says=("master unmanaged", "ca3"))


def test_lease_expired_and_old_master_unseen_by_all_clones_elects_the_best_with_fencing() -> None:
    d = decide_for("ca2", master_host_gone(), leader=None)
    expect(
        d,
        Action.PROMOTE,
        target="ca2",
        kind="automatic",
        fence=True,
        says=("ca1's lease ended", "elected ca2", "ca2, ca3"),
    )


def test_lease_expired_the_runner_up_waits_for_the_winner() -> None:
    d = decide_for("ca3", master_host_gone(), leader=None)
    expect(d, Action.WAIT, says=("waiting for ca2 to take the key", "ranking ca2, ca3"))


def test_lease_expired_a_clone_that_cannot_tell_does_not_block_the_election() -> None:
    states = master_host_gone(ca3=clone("ca3", seen=None))
    expect(decide_for("ca2", states, leader=None), Action.PROMOTE, target="ca2", fence=True)


def test_lease_expired_but_no_clone_confirmed_the_master_down_for_threshold_probes_waits() -> None:
    states = master_host_gone(
        ca2=clone("ca2", seen=CA_DOWN, seen_streak=N - 1), ca3=clone("ca3", seen=CA_DOWN, seen_streak=1)
    )
    d = decide_for("ca2", states, leader=None)
    expect(d, Action.WAIT, says=("waiting until clones confirm", f"ca2: down x{N - 1}", "ca3: down x1"))


def test_lease_expired_and_nobody_watches_the_old_master_waits_for_confirmation() -> None:
    states = master_host_gone(ca2=clone("ca2", seen=None), ca3=clone("ca3", seen=None))
    expect(decide_for("ca2", states, leader=None), Action.WAIT, says=("waiting until clones confirm", "no view"))


def test_lease_expired_a_stale_record_cannot_confirm_the_old_master_down() -> None:
    states = master_host_gone(ca2=clone("ca2", seen=None), ca3=clone("ca3", seen=CA_DOWN, updated_at=NOW - 3 * TTL))
    expect(decide_for("ca2", states, leader=None), Action.WAIT, says=("waiting until clones confirm",))


def test_old_master_released_the_key_clones_elect_at_once_without_fencing_or_seen_serving_check() -> None:
    # the master demoted itself and released the key; the clones' probes still show its CA a moment ago
    states = master_host_gone(ca2=clone("ca2", seen=CA_RUNNING), ca3=clone("ca3", seen=None))
    d = decide_for("ca2", states, leader=None, mem=memory(previous_leader_released=True, leaderless_for=0.0))
    expect(d, Action.PROMOTE, target="ca2", fence=False, says=("ca1 released the key", "elected ca2"))


def test_old_master_whose_lease_ended_while_its_ca_kept_serving_takes_the_key_back() -> None:
    states = {"ca1": master("ca1"), "ca2": clone("ca2"), "ca3": clone("ca3")}
    d = decide_for("ca1", states, leader=None, mem=memory(leaderless_for=3.0))
    # defect 17: the key is taken back without touching the healthy CA (no stop, no restart)
    expect(d, Action.RESUME, target="ca1", kind="resume", fence=False, says=("taking the key back", "CA left running"))
    for other in ("ca2", "ca3"):
        expect(decide_for(other, states, leader=None), Action.WAIT, says=("master unmanaged",))


def test_old_master_that_released_the_key_but_still_runs_a_master_cscfg_fences_itself() -> None:
    states = {"ca1": master("ca1"), "ca2": clone("ca2"), "ca3": clone("ca3")}
    d = decide_for("ca1", states, leader=None, mem=memory(previous_leader_released=True))
    expect(d, Action.SELF_FENCE, says=("do not hold the key", "stopping the CA"))


def test_non_holder_running_a_master_cscfg_while_the_key_is_free_fences_itself() -> None:
    states = master_host_gone(ca3=master("ca3"))
    d = decide_for("ca3", states, leader=None)
    expect(d, Action.SELF_FENCE, target="ca2", says=("CS.cfg is master but I do not hold the key",))


def test_old_master_whose_ca_is_down_after_its_lease_ended_is_never_its_own_successor() -> None:
    states = master_host_gone(ca1=clone("ca1", of="ca2", seen=None, ca_status=CA_DOWN, ca_down_streak=9))
    # it starts its CA as a clone (defect 11: nothing else would), and ca2 is elected meanwhile
    expect(decide_for("ca1", states, leader=None), Action.START_CLONE, says=("starting it as a clone",))
    expect(decide_for("ca2", states, leader=None), Action.PROMOTE, target="ca2")


def test_leaderless_node_with_a_long_action_in_progress_waits() -> None:
    expect(
        decide_for("ca2", master_host_gone(), leader=None, busy="promote"), Action.WAIT, says=("promote in progress",)
    )


# ---- election ranking ----------------------------------------------------------------------------------------


def test_election_prefers_the_clone_that_received_most_from_the_old_master() -> None:
    states = master_host_gone(ca2=clone("ca2", seen=CA_DOWN, lag=10), ca3=clone("ca3", seen=CA_DOWN, lag=2))
    expect(decide_for("ca3", states, leader=None), Action.PROMOTE, target="ca3", says=("ca3, ca2",))
    expect(decide_for("ca2", states, leader=None), Action.WAIT, says=("waiting for ca3",))


def test_election_compares_only_the_old_masters_replica_id_from_local_memory() -> None:
    # ca2 has a much newer change from ca3's replica id, but less from the old master (replica id 1)
    newer_elsewhere = {1: csn(20, 1), 3: csn(0, 3)}
    states = master_host_gone(
        ca2=clone("ca2", seen=CA_DOWN, max_csn=newer_elsewhere), ca3=clone("ca3", seen=CA_DOWN, lag=5)
    )
    expect(decide_for("ca3", states, leader=None), Action.PROMOTE, target="ca3")
    expect(decide_for("ca2", states, leader=None), Action.WAIT, says=("waiting for ca3",))


def test_election_same_csn_breaks_the_tie_by_priority() -> None:
    members = cfgs(ca3={"priority": 200})
    expect(decide_for("ca3", master_host_gone(), leader=None, members=members), Action.PROMOTE, target="ca3")
    expect(decide_for("ca2", master_host_gone(), leader=None, members=members), Action.WAIT, says=("ca3",))


def test_election_csn_beats_priority() -> None:
    members = cfgs(ca3={"priority": 999})
    states = master_host_gone(ca3=clone("ca3", seen=CA_DOWN, lag=1))
    expect(decide_for("ca2", states, leader=None, members=members), Action.PROMOTE, target="ca2")


def test_election_same_csn_and_priority_breaks_the_tie_by_name() -> None:
    expect(decide_for("ca2", master_host_gone(), leader=None), Action.PROMOTE, target="ca2")
    expect(decide_for("ca3", master_host_gone(), leader=None), Action.WAIT, says=("waiting for ca2",))


INELIGIBLE: dict[str, tuple[dict[str, Any], str]] = {
    "stale_record": ({"updated_at": NOW - 2 * TTL}, "stale member record"),
    "ca_down": ({"ca_status": CA_DOWN, "ca_down_streak": 1}, "CA down"),
    "ca_starting": ({"ca_status": CA_STARTING}, "CA starting"),
    "local_ds_down": ({"ds_ok": False, "ds_error": "timeout"}, "local 389-DS down"),
    "replication_red": ({"replication": "red", "replication_red": ("ca3",)}, "replication red toward ca3"),
    "lag_over_maximum": ({"max_csn": {1: csn(POLICY.maximum_lag + 1)}}, "replication lag 61s > maximum_lag 60s"),
    "nothing_from_old_master": ({"max_csn": {3: csn(0, 3)}}, "replication lag inf"),
    "cscfg_unreadable": ({"cscfg_role": ROLE_UNREADABLE}, f"CS.cfg {ROLE_UNREADABLE}"),
    "cscfg_inconsistent": ({"cscfg_role": "inconsistent"}, "CS.cfg inconsistent"),
    "busy": ({"busy": "follow"}, "busy (follow)"),
}


@pytest.mark.parametrize("case", sorted(INELIGIBLE))
def test_election_skips_an_ineligible_best_clone_and_elects_the_next(case: str) -> None:
    changes, _ = INELIGIBLE[case]
    states = master_host_gone(ca2=clone("ca2", seen=CA_DOWN, **changes))
    expect(decide_for("ca3", states, leader=None), Action.PROMOTE, target="ca3", fence=True)
    if case != "stale_record":  # ca2's own view is always fresh
        assert decide_for("ca2", states, leader=None).action is not Action.PROMOTE


@pytest.mark.parametrize("case", sorted(INELIGIBLE))
def test_election_with_no_eligible_clone_waits_and_says_why_per_clone(case: str) -> None:
    changes, why = INELIGIBLE[case]
    states = master_host_gone(
        ca2=clone("ca2", seen=CA_DOWN, **changes), ca3=clone("ca3", seen=CA_DOWN, ca_status=CA_DOWN, ca_down_streak=1)
    )
    me = "ca3"
    d = decide_for(me, states, leader=None)
    expect(d, Action.WAIT, says=("no eligible clone", f"ca2: {why}", "ca3: CA down"))


def test_election_skips_nofailover_clone() -> None:
    members = cfgs(ca2={"nofailover": True})
    expect(decide_for("ca3", master_host_gone(), leader=None, members=members), Action.PROMOTE, target="ca3")
    expect(decide_for("ca2", master_host_gone(), leader=None, members=members), Action.WAIT, says=("waiting for ca3",))


def test_election_skips_a_clone_without_a_fresh_record() -> None:
    states = {"ca3": clone("ca3", seen=CA_DOWN)}
    d = decide_for("ca3", states, leader=None)
    expect(d, Action.PROMOTE, target="ca3", says=("elected ca3",))


def test_election_agreement_red_only_toward_the_dead_old_master_stays_eligible() -> None:
    # the first write on a clone turns its agreement toward the dead master red: expected, not a defect
    states = master_host_gone(ca2=clone("ca2", seen=CA_DOWN, replication="red", replication_red=("ca1",)))
    d = decide(view(me="ca2", leader=None, states=states, mem=memory(previous_leader="ca1", leaderless_for=0.0)))
    assert d.action is Action.PROMOTE and d.target == "ca2"


def test_election_lag_within_maximum_and_amber_replication_are_eligible() -> None:
    states = master_host_gone(ca2=clone("ca2", seen=CA_DOWN, lag=POLICY.maximum_lag, replication="amber"))
    expect(decide_for("ca3", states, leader=None), Action.PROMOTE, target="ca3", says=("from ca3, ca2",))


def test_election_lag_counts_changes_seen_by_an_ineligible_clone() -> None:
    # ca3's CA is down but its DS proves ca1 wrote 90 s after the newest change ca2 has
    states = master_host_gone(
        ca2=clone("ca2", seen=CA_DOWN, lag=90), ca3=clone("ca3", seen=CA_DOWN, ca_status=CA_DOWN, ca_down_streak=1)
    )
    d = decide_for("ca2", states, leader=None)
    expect(d, Action.WAIT, says=("no eligible clone", "ca2: replication lag 90s > maximum_lag 60s"))


def test_election_lag_is_measured_against_the_old_masters_own_record_when_it_is_fresh() -> None:
    # ca1's record still exists (its daemon runs) and shows changes the clones never received
    states = master_host_gone(ca1=clone("ca1", of="ca1", seen=None, cscfg_role="master", ca_status=CA_DOWN))
    states["ca1"] = replace(states["ca1"], max_csn={1: csn(-120)})  # 2 minutes newer than the clones'
    d = decide_for("ca2", states, leader=None)
    expect(d, Action.WAIT, says=("no eligible clone", "ca2: replication lag 120s", "ca3: replication lag 120s"))


# ---- the winner does not take the key --------------------------------------------------------------------------


def test_winner_not_taking_the_key_within_ttl_lets_the_next_candidate_promote() -> None:
    mem = memory(leaderless_for=TTL)
    d = decide_for("ca3", master_host_gone(), leader=None, mem=mem)
    expect(d, Action.PROMOTE, target="ca3", fence=True, says=("ca2 did not take the key within ttl",))
    # one candidate at a time: the winner stands aside while the next one has its turn
    expect(decide_for("ca2", master_host_gone(), leader=None, mem=mem), Action.WAIT, says=("waiting for ca3",))


def test_before_one_ttl_only_the_winner_may_promote() -> None:
    mem = memory(leaderless_for=TTL - 0.1)
    expect(decide_for("ca3", master_host_gone(), leader=None, mem=mem), Action.WAIT, says=("waiting for ca2",))
    expect(decide_for("ca2", master_host_gone(), leader=None, mem=mem), Action.PROMOTE, target="ca2")


def test_after_two_ttl_the_third_candidate_promotes() -> None:
    members = cfgs(extra=["ca4"])
    states = master_host_gone(
        ca2=clone("ca2", seen=CA_DOWN), ca3=clone("ca3", seen=CA_DOWN, lag=1), ca4=clone("ca4", seen=CA_DOWN, lag=2)
    )
    mem = memory(leaderless_for=2 * TTL)
    expect(decide_for("ca4", states, leader=None, mem=mem, members=members), Action.PROMOTE, target="ca4")
    for me in ("ca2", "ca3"):
        expect(decide_for(me, states, leader=None, mem=mem, members=members), Action.WAIT, says=("waiting for ca4",))


def test_after_every_candidate_had_its_turn_the_winner_gets_another() -> None:
    mem = memory(leaderless_for=2 * TTL)
    expect(decide_for("ca2", master_host_gone(), leader=None, mem=mem), Action.PROMOTE, target="ca2")
    expect(decide_for("ca3", master_host_gone(), leader=None, mem=mem), Action.WAIT)


# ---- pause -------------------------------------------------------------------------------------------------------


def _would_act() -> dict[str, tuple[str, dict[str, MemberState], dict[str, Any]]]:
    gone = master_host_gone()
    demoted_holder = dict(healthy(), ca1=clone("ca1", of="ca2", seen=None, ca_status=CA_DOWN))
    return {
        "bootstrap": ("ca1", healthy(), {"leader": None, "mem": FRESH}),
        "restart": ("ca1", master_ca_down(), {}),
        "demote_and_release": ("ca1", master_ca_down(), {"mem": memory(restarted_in_incident=True)}),
        "no_clone_restart_again": (
            "ca1",
            {"ca1": master_ca_down()["ca1"]},
            {"mem": memory(restarted_in_incident=True)},
        ),
        "complete_promotion": ("ca1", demoted_holder, {}),
        "switchover_on_master": ("ca1", healthy(), {"switchover": "ca3"}),
        "switchover_to_ineligible": (
            "ca1",
            dict(healthy(), ca3=clone("ca3", ca_status=CA_DOWN)),
            {"switchover": "ca3"},
        ),
        "switchover_to_master_itself": ("ca1", healthy(), {"switchover": "ca1"}),
        "election": ("ca2", gone, {"leader": None}),
        "election_after_release": ("ca2", gone, {"leader": None, "mem": memory(previous_leader_released=True)}),
        "switchover_target_promotes": (
            "ca3",
            gone,
            {"leader": None, "switchover": "ca3", "mem": memory(previous_leader_released=True)},
        ),
        "switchover_target_ineligible": (
            "ca3",
            dict(gone, ca3=clone("ca3", seen=CA_DOWN, ds_ok=False)),
            {"leader": None, "switchover": "ca3"},
        ),
        "manual_failover": ("ca3", gone, {"leader": None, "switchover": "ca3", "kind": "failover"}),
        "resume": ("ca1", healthy(), {"leader": None}),
        "fence_master_cscfg_without_key": ("ca3", dict(gone, ca3=master("ca3")), {"leader": None}),
        "follow_demote": ("ca3", dict(healthy(), ca3=master("ca3")), {}),
        "follow_start_clone": ("ca2", dict(healthy(), ca2=clone("ca2", ca_status=CA_DOWN, ca_down_streak=N)), {}),
        "self_fence_store_down": (
            "ca1",
            {"ca1": master("ca1")},
            {"leader": None, "store_ok": False, "mem": memory(seconds_since_renew=TTL)},
        ),
    }


WOULD_ACT = _would_act()


@pytest.mark.parametrize("case", sorted(WOULD_ACT))
def test_situation_that_would_act_does_act_when_not_paused(case: str) -> None:
    me, states, kw = WOULD_ACT[case]
    assert decide_for(me, states, **kw).action not in (Action.WAIT, Action.RENEW)


@pytest.mark.parametrize("case", sorted(WOULD_ACT))
def test_paused_blocks_every_action_but_renew_and_says_paused(case: str) -> None:
    me, states, kw = WOULD_ACT[case]
    d = decide_for(me, states, paused=True, **kw)
    if case == "self_fence_store_down":  # the pause seen last may have been lifted: fence anyway
        assert d.action is Action.SELF_FENCE and "even paused" in d.reason, d.line()
        return
    assert d.action in (Action.WAIT, Action.RENEW), d.line()
    assert "paused" in d.reason, d.line()
    if d.action is Action.RENEW:
        assert me == "ca1"  # only the key holder renews


def test_paused_healthy_master_still_renews_its_lease() -> None:
    expect(decide_for("ca1", healthy(), paused=True), Action.RENEW, says=("healthy master",))


def test_paused_master_with_ca_down_renews_and_says_what_it_would_do() -> None:
    d = decide_for("ca1", master_ca_down(), paused=True)
    expect(d, Action.RENEW, says=("paused", "would restart it"))


# ---- planned switchover ----------------------------------------------------------------------------------------


def test_switchover_master_demotes_and_releases_the_key_for_the_named_clone() -> None:
    d = decide_for("ca1", healthy(), switchover="ca3")
    expect(
        d,
        Action.DEMOTE_AND_RELEASE,
        target="ca3",
        kind="switchover",
        fence=False,
        says=("switchover to ca3", "stepping down"),
    )


@pytest.mark.parametrize(
    ("target_state", "why"),
    [
        (clone("ca3", ca_status=CA_DOWN, ca_down_streak=2), "CA down"),
        (clone("ca3", ds_ok=False), "local 389-DS down"),
        (clone("ca3", replication="red", replication_red=("ca2",)), "replication red"),
        (clone("ca3", cscfg_role=ROLE_UNREADABLE), "CS.cfg unreadable"),
        (clone("ca3", busy="follow"), "busy"),
        (clone("ca3", lag=POLICY.maximum_lag + 30), "maximum_lag"),
        (clone("ca3", updated_at=NOW - 2 * TTL), "stale member record"),
    ],
)
def test_switchover_to_an_ineligible_clone_is_refused_and_cleared(target_state: MemberState, why: str) -> None:
    states = dict(healthy(), ca3=target_state)
    d = decide_for("ca1", states, switchover="ca3")
    expect(d, Action.CLEAR_SWITCHOVER, says=("switchover to ca3 refused", why))


def test_switchover_to_a_clone_without_a_record_is_refused_and_cleared() -> None:
    states = {"ca1": master("ca1"), "ca2": clone("ca2")}
    expect(decide_for("ca1", states, switchover="ca3"), Action.CLEAR_SWITCHOVER, says=("no fresh member record",))


def test_switchover_to_an_unknown_member_is_refused_and_cleared() -> None:
    expect(decide_for("ca1", healthy(), switchover="ca9"), Action.CLEAR_SWITCHOVER, says=("not a cluster member",))


def test_switchover_to_the_current_master_is_cleared() -> None:
    expect(decide_for("ca1", healthy(), switchover="ca1"), Action.CLEAR_SWITCHOVER, says=("already master",))


def test_switchover_ignores_nofailover_and_the_cooldown() -> None:
    members = cfgs(ca3={"nofailover": True})
    mem = memory(last_failover_at=NOW - 10)
    d = decide_for("ca1", healthy(), switchover="ca3", members=members, mem=mem)
    expect(d, Action.DEMOTE_AND_RELEASE, target="ca3", kind="switchover")


def test_switchover_master_with_ca_down_still_hands_over_to_the_named_clone() -> None:
    states = master_ca_down()
    expect(decide_for("ca1", states, switchover="ca3"), Action.DEMOTE_AND_RELEASE, target="ca3")


def released_for_switchover(**kw: MemberState) -> dict[str, MemberState]:
    """ca1 stepped down for ca3 and released the key; its CA is stopped, the clones see it down."""
    states = {
        "ca1": clone("ca1", of="ca3", seen=None, ca_status=CA_DOWN, ca_down_streak=1),
        "ca2": clone("ca2", seen=CA_DOWN, seen_streak=1),
        "ca3": clone("ca3", seen=CA_DOWN, seen_streak=1, lag=3),  # not the automatic winner
    }
    states.update(kw)
    return states


RELEASED = memory(previous_leader_released=True, leaderless_for=1.0)


def test_switchover_target_promotes_once_the_key_is_released_even_when_not_the_best_ranked() -> None:
    d = decide_for("ca3", released_for_switchover(), leader=None, switchover="ca3", mem=RELEASED)
    expect(d, Action.PROMOTE, target="ca3", kind="switchover", fence=False, says=("switchover to me",))


@pytest.mark.parametrize("me", ["ca1", "ca2"])
def test_switchover_others_wait_for_the_target_to_take_the_key(me: str) -> None:
    d = decide_for(me, released_for_switchover(), leader=None, switchover="ca3", mem=RELEASED)
    expect(d, Action.WAIT, says=("switchover to ca3", "waiting for it"))


def test_switchover_target_that_became_ineligible_after_the_release_clears_the_request() -> None:
    states = released_for_switchover(ca3=clone("ca3", seen=None, ds_ok=False))
    d = decide_for("ca3", states, leader=None, switchover="ca3", mem=RELEASED)
    expect(d, Action.CLEAR_SWITCHOVER, says=("to me refused", "local 389-DS down"))


def test_switchover_target_ignores_nofailover_and_cooldown_when_taking_the_key() -> None:
    members = cfgs(ca3={"nofailover": True})
    mem = replace(RELEASED, last_failover_at=NOW - 10)
    d = decide_for("ca3", released_for_switchover(), leader=None, switchover="ca3", mem=mem, members=members)
    expect(d, Action.PROMOTE, target="ca3", kind="switchover")


def test_switchover_target_gone_for_a_ttl_the_others_elect_even_within_the_cooldown() -> None:
    # ca3 vanished after ca1 stepped down: nobody holds the key, nobody must stay masterless
    states = released_for_switchover()
    del states["ca3"]
    mem = memory(previous_leader_released=True, leaderless_for=TTL + 1, last_failover_at=NOW - 60)
    d = decide_for("ca2", states, leader=None, switchover="ca3", mem=mem)
    expect(d, Action.PROMOTE, target="ca2", fence=False, says=("ca1 released the key",))


def test_switchover_target_gone_others_still_wait_within_the_first_ttl() -> None:
    states = released_for_switchover()
    del states["ca3"]
    d = decide_for("ca2", states, leader=None, switchover="ca3", mem=RELEASED)
    expect(d, Action.WAIT, says=("waiting for it", "no fresh member record"))


# ---- manual failover -------------------------------------------------------------------------------------------


def test_manual_failover_on_a_serving_master_steps_down_with_kind_failover() -> None:
    d = decide_for("ca1", healthy(), switchover="ca2", kind="failover")
    expect(d, Action.DEMOTE_AND_RELEASE, target="ca2", kind="failover", says=("failover to ca2",))


def test_manual_failover_to_a_named_clone_after_the_lease_expired_promotes_it_with_fencing() -> None:
    states = master_host_gone(ca3=clone("ca3", seen=CA_DOWN, lag=5))
    d = decide_for("ca3", states, leader=None, switchover="ca3", kind="failover")
    expect(d, Action.PROMOTE, target="ca3", kind="failover", fence=True, says=("failover to me",))
    expect(decide_for("ca2", states, leader=None, switchover="ca3", kind="failover"), Action.WAIT)


def test_manual_failover_is_refused_while_the_old_master_is_still_seen_serving() -> None:
    states = master_host_gone(ca2=clone("ca2", seen=CA_RUNNING))
    d = decide_for("ca3", states, leader=None, switchover="ca3", kind="failover")
    expect(d, Action.CLEAR_SWITCHOVER, says=("failover to me refused", "still seen serving by ca2"))


def test_manual_failover_is_honoured_long_after_the_key_expired_when_the_cooldown_blocks_automatic() -> None:
    mem = memory(leaderless_for=10 * TTL, last_failover_at=NOW - 600)
    states = master_host_gone()
    expect(decide_for("ca2", states, leader=None, mem=mem), Action.WAIT, says=("cooldown",))
    d = decide_for("ca3", states, leader=None, mem=mem, switchover="ca3", kind="failover")
    expect(d, Action.PROMOTE, target="ca3", kind="failover", fence=True)
    expect(decide_for("ca2", states, leader=None, mem=mem, switchover="ca3", kind="failover"), Action.WAIT)


def test_manual_failover_ignores_nofailover() -> None:
    members = cfgs(ca3={"nofailover": True})
    d = decide_for("ca3", master_host_gone(), leader=None, switchover="ca3", kind="failover", members=members)
    expect(d, Action.PROMOTE, target="ca3", kind="failover")


def test_manual_failover_to_the_old_master_itself_is_refused() -> None:
    states = master_host_gone(ca1=clone("ca1", of="ca1", seen=None, ca_status=CA_DOWN, ca_down_streak=9))
    d = decide_for("ca1", states, leader=None, switchover="ca1", kind="failover")
    expect(d, Action.CLEAR_SWITCHOVER, says=("the old master",))


# ---- cooldown after an automatic failover -------------------------------------------------------------------------


def test_cooldown_blocks_an_automatic_election_after_a_recent_failover() -> None:
    mem = memory(last_failover_at=NOW - 600)
    d = decide_for("ca2", master_host_gone(), leader=None, mem=mem)
    expect(d, Action.WAIT, says=("failover blocked", "cooldown", "ca-watchdog ack"))


def test_cooldown_acknowledged_at_the_failover_time_allows_the_election() -> None:
    mem = memory(last_failover_at=NOW - 600)
    d = decide_for("ca2", master_host_gone(), leader=None, mem=mem, ack=NOW - 600)
    expect(d, Action.PROMOTE, target="ca2")


def test_cooldown_acknowledged_before_the_last_failover_does_not_count() -> None:
    mem = memory(last_failover_at=NOW - 600)
    d = decide_for("ca2", master_host_gone(), leader=None, mem=mem, ack=NOW - 601)
    expect(d, Action.WAIT, says=("cooldown",))


def test_cooldown_elapsed_allows_the_election() -> None:
    mem = memory(last_failover_at=NOW - POLICY.failover_cooldown)
    expect(decide_for("ca2", master_host_gone(), leader=None, mem=mem), Action.PROMOTE, target="ca2")


def test_cooldown_of_zero_disables_it() -> None:
    mem = memory(last_failover_at=NOW - 1)
    pol = replace(POLICY, failover_cooldown=0)
    expect(decide_for("ca2", master_host_gone(), leader=None, mem=mem, policy=pol), Action.PROMOTE)


def test_cooldown_does_not_keep_the_cluster_masterless_after_the_old_master_released_the_key() -> None:
    mem = memory(last_failover_at=NOW - 60, previous_leader_released=True)
    expect(decide_for("ca2", master_host_gone(), leader=None, mem=mem), Action.PROMOTE, target="ca2", fence=False)


# ---- decisions are one line and name who acts ----------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(WOULD_ACT))
def test_every_acting_decision_is_one_line_with_a_target_where_it_names_one(case: str) -> None:
    me, states, kw = WOULD_ACT[case]
    d = decide_for(me, states, **kw)
    assert d.line().startswith(f"{d.action.value}: ")
    assert "\n" not in d.line()
    if d.action in (Action.PROMOTE, Action.BOOTSTRAP):
        assert d.target == me
    if d.action in (Action.DEMOTE_AND_RELEASE, Action.FOLLOW):
        assert d.target is not None and d.target != me


# ---- properties over random clusters --------------------------------------------------------------------------------


@st.composite
def member_states(draw: st.DrawFn, name: str) -> MemberState:
    watch = draw(st.sampled_from([None, *NAMES]))
    return MemberState(
        name=name,
        updated_at=NOW,
        ca_status=draw(st.sampled_from([CA_RUNNING, CA_STARTING, CA_DOWN])),
        ca_down_streak=draw(st.integers(0, N + 1)),
        cscfg_role=draw(st.sampled_from(["master", "clone", "inconsistent", ROLE_UNREADABLE])),
        ds_ok=draw(st.booleans()),
        replication=draw(st.sampled_from(["green", "amber", "red", "unknown"])),
        replica_id=RID[name],
        max_csn={1: csn(draw(st.sampled_from([0.0, 1.0, 30.0, 90.0])))} if draw(st.booleans()) else {},
        watching=watch,
        watched_status=draw(st.sampled_from([None, CA_RUNNING, CA_STARTING, CA_DOWN])) if watch else None,
        watched_down_streak=draw(st.integers(0, N + 1)),
        busy=draw(st.sampled_from([None, None, None, "promote"])),
    )


@st.composite
def clusters(draw: st.DrawFn) -> dict[str, Any]:
    states = {n: draw(member_states(n)) for n in NAMES}
    previous = draw(st.sampled_from([None, *NAMES]))
    leader = draw(st.sampled_from([None, None, *NAMES]))
    mem = Memory(
        seconds_since_renew=draw(st.sampled_from([None, 1.0, TTL])),
        restarted_in_incident=draw(st.booleans()),
        previous_leader=previous,
        previous_leader_released=draw(st.booleans()),
        leaderless_for=draw(st.sampled_from([0.0, TTL - 1, TTL, 2 * TTL + 1, 10 * TTL])),
        last_failover_at=draw(st.sampled_from([None, NOW - 60, NOW - 10 * POLICY.failover_cooldown])),
        known_replica_ids=dict(RID),
        epoch=draw(st.sampled_from([0, EPOCH])) if previous is None else EPOCH,
    )
    target = draw(st.sampled_from([None, None, *NAMES]))
    members = cfgs(
        **{n: {"nofailover": draw(st.booleans()), "priority": draw(st.sampled_from([50, 100]))} for n in NAMES}
    )
    return {
        "states": states,
        "leader": leader,
        "mem": mem,
        "paused": draw(st.booleans()),
        "switchover": target,
        "kind": draw(st.sampled_from(["switchover", "failover"])) if target else None,
        "ack": draw(st.sampled_from([None, NOW - 30])),
        "members": members,
        "store_ok": draw(st.sampled_from([True, True, True, False])),
    }


def _seen_serving(states: Mapping[str, MemberState], old: str | None) -> bool:
    if old is None:
        return False
    for s in states.values():
        if s.name == old and s.cscfg_role == "master" and s.ca_status in (CA_RUNNING, CA_STARTING):
            return True
        if s.name != old and s.watching == old and s.watched_status in (CA_RUNNING, CA_STARTING):
            return True
    return False


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_property_identical_records_never_name_two_masters_and_pause_and_serving_old_master_block_promotion(
    c: dict[str, Any],
) -> None:
    states = c.pop("states")
    decisions = {me: decide_for(me, states, **c) for me in NAMES}
    takers = [me for me, d in decisions.items() if d.action in (Action.PROMOTE, Action.BOOTSTRAP)]
    assert len(takers) <= 1, {me: d.line() for me, d in decisions.items()}
    for me, d in decisions.items():
        assert d.reason and "\n" not in d.reason
        if d.action in (Action.PROMOTE, Action.BOOTSTRAP):
            assert d.target == me
            assert c["store_ok"], d.line()
        if c["paused"]:  # the one exception: a self-fence without the store (the pause may be over)
            assert d.action in (Action.WAIT, Action.RENEW) or (d.action is Action.SELF_FENCE and not c["store_ok"])
        if c["leader"] is not None and c["leader"] != me:
            assert d.action not in (Action.PROMOTE, Action.BOOTSTRAP, Action.RENEW), d.line()
        old, mem = c["mem"].previous_leader, c["mem"]
        if d.action is Action.PROMOTE and c["leader"] is None and me != old and not mem.previous_leader_released:
            assert not _seen_serving(states, old), d.line()


def test_key_holder_restarted_after_dying_mid_promotion_with_master_cscfg_and_stopped_ca_completes_it() -> None:
    me = master("ca1", ca_status=CA_DOWN, ca_down_streak=N + 5)
    v = view("ca1", {"ca1": me, "ca2": clone("ca2")}, leader="ca1", mem=memory(unfinished_step="promote: starting"))
    d = decide(v)
    expect(d, Action.PROMOTE, target="ca1", says=("interrupted", "promote: starting", "completing it"))
    paused = decide(replace(v, control=replace(v.control, paused=True)))
    expect(paused, Action.RENEW, says=("paused", "would complete it"))


def test_key_holder_with_stopped_ca_and_no_interrupted_promotion_is_a_failed_master_not_a_resume() -> None:
    me = master("ca1", ca_status=CA_DOWN, ca_down_streak=N)
    d = decide(view("ca1", {"ca1": me, "ca2": clone("ca2")}, leader="ca1", mem=memory(unfinished_step=None)))
    assert d.action is not Action.PROMOTE


# ---- a clone start waits for a promotion in progress (found on the real Dogtag bed) -----------------------
# Two JVMs starting at once on a shared host double the promotion's start (22-33 s instead of ~9 s): the old
# master's clone start waits until the new master runs. Waiting to start a clone never makes a master.


def test_clone_whose_ca_is_down_waits_while_the_new_master_reports_its_promotion_in_progress() -> None:
    states = healthy()
    states["ca1"] = master("ca1", ca_status=CA_STARTING, busy="promote: starting")
    states["ca2"] = clone("ca2", ca_status=CA_DOWN, ca_down_streak=N, ca_reason="stopped")
    d = decide_for("ca2", states)
    expect(d, Action.WAIT, says=("waits until ca1's promotion", "promote: starting"))
    # the promotion is over: the clone starts
    states["ca1"] = master("ca1")
    expect(decide_for("ca2", states), Action.FOLLOW, target="ca1")
    # a record gone stale is not trusted to hold the start back
    states["ca1"] = master("ca1", busy="promote: starting", updated_at=NOW - TTL - 1)
    expect(decide_for("ca2", states), Action.FOLLOW, target="ca1")
    # another long action of the master (a restart) does not hold it back either
    states["ca1"] = master("ca1", busy="restart: starting")
    expect(decide_for("ca2", states), Action.FOLLOW, target="ca1")
    # nor a master whose CA is down: the clone must run to be elected in its place
    states["ca1"] = master("ca1", ca_status=CA_DOWN, ca_down_streak=N)
    expect(decide_for("ca2", states), Action.FOLLOW, target="ca1")


def test_clone_whose_ca_is_down_waits_for_a_new_key_holder_whose_record_is_still_a_clones() -> None:
    """Seen on the real bed: the old master saw the new holder 0.3 s after it took the key, before it
    published `busy`; its record from just before still said clone."""
    states = healthy()
    states["ca1"] = clone("ca1", of="ca3", seen=None)
    states["ca2"] = clone("ca2", ca_status=CA_DOWN, ca_down_streak=N, ca_reason="stopped")
    d = decide_for("ca2", states)
    expect(d, Action.WAIT, says=("waits until ca1's promotion", "still a clone's"))


def test_a_master_cscfg_on_a_non_holder_is_demoted_even_while_the_new_master_promotes() -> None:
    states = healthy()
    states["ca1"] = master("ca1", ca_status=CA_STARTING, busy="promote: starting")
    states["ca3"] = master("ca3", ca_status=CA_DOWN, ca_down_streak=N)
    expect(decide_for("ca3", states), Action.FOLLOW, target="ca1", says=("my CS.cfg is master",))


def test_old_master_that_released_the_key_waits_one_ttl_for_its_successor_before_starting_its_clone() -> None:
    states = master_host_gone(ca1=clone("ca1", of="ca2", seen=None, ca_status=CA_DOWN, ca_down_streak=9))
    released = memory(previous_leader_released=True, leaderless_for=0.5)
    d = decide_for("ca1", states, leader=None, mem=released)
    expect(d, Action.WAIT, says=("waits until ca2 has taken the key",))
    expect(decide_for("ca2", states, leader=None, mem=released), Action.PROMOTE, target="ca2")
    late = memory(previous_leader_released=True, leaderless_for=TTL)
    expect(decide_for("ca1", states, leader=None, mem=late), Action.START_CLONE, says=("starting it as a clone",))
    # nobody else can take the key: start at once (a clone that does not run can never be elected)
    down = {"ca_status": CA_DOWN, "ca_down_streak": N}
    nobody = {"ca1": states["ca1"], "ca2": clone("ca2", **down), "ca3": clone("ca3", **down)}
    expect(decide_for("ca1", nobody, leader=None, mem=released), Action.START_CLONE)
