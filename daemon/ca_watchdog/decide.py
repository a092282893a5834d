"""The policy: one immutable ClusterView in, one Decision (action + one-line reason) out.

No I/O, no clock, no randomness: every branch is unit-tested over built snapshots. The safety
rules, in the order they are checked:

1. A master that cannot renew its lease in time stops being master before the lease ends.
2. Only the holder of the leader key may have a master CS.cfg; anyone else with one follows.
3. No failover while any member still sees the old master serving (its daemon may just be dead).
4. An election needs an eligible clone; ranking is by data received from the old master, then
   priority, then name; the store's compare-and-set makes at most one winner.
5. After an automatic failover, no other one until acknowledged or `failover_cooldown` passed.
6. Paused: observe, renew, report; never act on a CA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .model import (
    CA_DOWN,
    CA_RUNNING,
    CA_STARTING,
    ROLE_UNREADABLE,
    Action,
    ClusterView,
    Decision,
    MemberState,
)

MASTER, CLONE, INCONSISTENT = "master", "clone", "inconsistent"
UNMANAGED = "master unmanaged"  # the reason's prefix when a lease ended but the old master still serves


def decide(v: ClusterView) -> Decision:
    if not v.store_ok:
        return _without_store(v)
    if v.leader is not None and v.leader.name == v.me:
        return _as_leader(v)
    if v.leader is not None:
        return _as_follower(v)
    return _without_leader(v)


# ---- store unreachable ------------------------------------------------------------------------------


def _serving_as_master(st: MemberState) -> bool:
    """My CA may be acting as master: its CS.cfg would generate CRLs and it is not down."""
    duty = st.cscfg_role == MASTER or (st.cscfg_role == INCONSISTENT and st.cscfg_master_duty)
    return duty and st.ca_status != CA_DOWN


def _fence_deadline(v: ClusterView) -> float:
    # fence one worst-case cycle early: the decision can only come at the end of a cycle
    return v.policy.ttl - v.policy.safety_margin - v.policy.fence_lead


def _without_store(v: ClusterView) -> Decision:
    why = v.store_error or "store unreachable"
    local = v.local
    renewed = v.memory.seconds_since_renew
    duty = local.cscfg_role == MASTER or (local.cscfg_role == INCONSISTENT and local.cscfg_master_duty)
    # With a lease of mine running out, a master CS.cfg is demoted even with the CA stopped (nothing may
    # start it as master again); with no lease of mine, only a CA that is up can be acting as master.
    if not duty or (renewed is None and local.ca_status == CA_DOWN):
        state = f"CS.cfg {local.cscfg_role}, CA {local.ca_status}"
        fenced = "self-fenced; " if renewed is not None else ""
        return Decision(
            Action.WAIT,
            f"{why}; {fenced}no failover decision without the store (my CA is not serving as master: {state})",
        )
    # The truth is what my CA serves, not what this process remembers: a lease not renewed in this run
    # cannot be proven, so it counts from this daemon's own start (it may just have been restarted).
    age = renewed if renewed is not None else v.memory.uptime
    deadline = _fence_deadline(v)
    if age < deadline:
        kept = (
            f"lease renewed {age:.1f}s ago"
            if renewed is not None
            else f"no lease proven in the {age:.1f}s since my start"
        )
        return Decision(Action.WAIT, f"{why}; keeping the master role, {kept} (self-fence at {deadline:g}s)")
    late = (
        f"lease not renewed for {age:.1f}s"
        if renewed is not None
        else f"no lease proven in the {age:.1f}s since my start"
        if math.isfinite(age)
        else "no lease proven"  # the guard: it holds none of its own
    )
    others = sorted(m.name for m in v.members if m.name != v.me)
    if renewed is not None and others and set(others) <= set(v.failsafe_acks):
        # Patroni's failsafe mode: nobody can reach the store, and every member still follows me
        return Decision(
            Action.WAIT,
            f"{why}; failsafe: every member ({', '.join(others)}) acknowledges me as master over the peer API "
            f"and cannot reach the store either; keeping the master role ({late})",
        )
    # No pause exception: the pause I last saw may have been lifted since, and then the others elect
    # (found by the simulation: a master cut off while paused kept its role past the resume).
    missing = [n for n in others if n not in v.failsafe_acks]
    return Decision(
        Action.SELF_FENCE,
        f"{why}; {late} (>= ttl {v.policy.ttl:g}s - safety margin "
        f"{v.policy.safety_margin:g}s - one cycle {v.policy.fence_lead:g}s) and no failsafe acknowledgement from "
        f"{', '.join(missing) or 'anyone'}: "
        "stopping the CA and demoting before another master can be elected"
        + (" (even paused: the pause may have been lifted meanwhile)" if v.control.paused else ""),
        target=_best_guess_successor(v),
    )


# ---- this node holds the leader key -------------------------------------------------------------------


def _as_leader(v: ClusterView) -> Decision:
    assert v.leader is not None
    epoch = v.leader.epoch
    local = v.local
    p = v.policy
    age = v.memory.seconds_since_renew
    if age is not None and age >= _fence_deadline(v) and _serving_as_master(local):
        # the store answers reads but not my renewals: its key may end before I see it go
        if v.control.paused:
            return Decision(Action.RENEW, f"paused: lease not renewed for {age:.1f}s; would self-fence")
        return Decision(
            Action.SELF_FENCE,
            f"lease not renewed for {age:.1f}s (self-fence point {_fence_deadline(v):g}s) although the store "
            "answers: stopping the CA and demoting before the key can end",
            target=_best_guess_successor(v),
        )
    if v.busy:
        return Decision(Action.RENEW, f"{v.busy} in progress; renewing the lease (epoch {epoch})")
    target = v.control.switchover_target
    kind = v.control.switchover_kind or "switchover"
    if target is not None and v.control.paused:
        return Decision(Action.RENEW, f"paused: {kind} to {target} waits for resume; lease renewed (epoch {epoch})")
    if target is not None and target != v.me:
        why_not = _switchover_problem(v, target, old_master=v.me)
        if why_not:
            return Decision(
                Action.CLEAR_SWITCHOVER, f"{kind} to {target} refused: {why_not}", target=v.control.switchover_id
            )
        return Decision(
            Action.DEMOTE_AND_RELEASE,
            f"{kind} to {target} requested: stepping down (epoch {epoch})",
            target=target,
            kind=kind,
        )
    if target == v.me:
        return Decision(
            Action.CLEAR_SWITCHOVER,
            f"switchover to {v.me} requested but it is already master",
            target=v.control.switchover_id,
        )
    if local.cscfg_role in (ROLE_UNREADABLE, INCONSISTENT):
        bad = f"I hold the key (epoch {epoch}) but CS.cfg is {local.cscfg_role} ({local.cscfg_problem})"
        if local.ca_status != CA_DOWN or local.ca_down_streak < p.failure_threshold or v.control.paused:
            return Decision(Action.RENEW, f"{bad}; renewing, not touching the file: repair it")
        # a CA that cannot be restarted as master (the file is not a master's) must not hold the key forever
        ranked, rejected = _ranked(v, old_master=v.me)
        if not ranked:
            return Decision(Action.RENEW, f"{bad}, CA down and no eligible clone ({_list(rejected)}); keeping the key")
        return Decision(
            Action.DEMOTE_AND_RELEASE,
            f"{bad} and CA down ({local.ca_reason}): stopping it and releasing the key for {ranked[0]} "
            f"(best of {', '.join(ranked)}); CS.cfg left for repair",
            target=ranked[0],
        )
    if local.cscfg_role == CLONE:
        if v.control.paused:
            return Decision(Action.RENEW, f"paused: I hold the key (epoch {epoch}) but CS.cfg is clone; would promote")
        return Decision(
            Action.PROMOTE, f"I hold the key (epoch {epoch}) but CS.cfg is clone: completing the promotion", target=v.me
        )
    unfinished = v.memory.unfinished_step
    if local.ca_status == CA_DOWN and unfinished and unfinished.startswith("promote"):
        # an earlier run died mid-promotion (CS.cfg already master, CA not started yet): finish it
        if v.control.paused:
            return Decision(Action.RENEW, f"paused: a promotion was interrupted at {unfinished!r}; would complete it")
        return Decision(
            Action.PROMOTE,
            f"I hold the key (epoch {epoch}); a promotion was interrupted at {unfinished!r}: completing it",
            target=v.me,
        )
    if local.ca_status == CA_RUNNING:
        return Decision(Action.RENEW, f"healthy master; lease renewed (epoch {epoch})")
    if local.ca_status == CA_STARTING:
        return Decision(Action.RENEW, f"master CA starting; lease renewed (epoch {epoch})")
    streak, n = local.ca_down_streak, p.failure_threshold
    if streak < n:
        return Decision(Action.RENEW, f"master CA failed probe {streak}/{n} ({local.ca_reason}); renewing")
    down = f"master CA down for {streak} probes ({local.ca_reason})"
    if v.control.paused:
        return Decision(
            Action.RENEW, f"paused: {down}; would {'restart it' if p.restart_before_failover else 'fail over'}"
        )
    if p.restart_before_failover and not v.memory.restarted_in_incident:
        return Decision(Action.RESTART_CA, f"{down}: restarting it once before failing over")
    cooldown = cooldown_reason(v)
    if cooldown:
        return Decision(Action.RENEW, f"{down}, but {cooldown}; keeping the role")
    ranked, rejected = _ranked(v, old_master=v.me)
    if ranked:
        return Decision(
            Action.DEMOTE_AND_RELEASE,
            f"{down}{', restart did not help' if p.restart_before_failover else ''}: demoting and releasing the key "
            f"for {ranked[0]} (best of {', '.join(ranked)})",
            target=ranked[0],
        )
    if p.restart_before_failover:
        return Decision(Action.RESTART_CA, f"{down} and no eligible clone ({_list(rejected)}): restarting it again")
    return Decision(Action.RENEW, f"{down} and no eligible clone ({_list(rejected)}): keeping the role")


# ---- another node holds the key -------------------------------------------------------------------------


def _as_follower(v: ClusterView) -> Decision:
    assert v.leader is not None
    leader, epoch, local = v.leader.name, v.leader.epoch, v.local
    if v.busy:
        return Decision(Action.WAIT, f"{v.busy} in progress; {leader} is master (epoch {epoch})")
    if local.cscfg_role == MASTER:
        if v.control.paused:
            return Decision(
                Action.WAIT, f"paused: {leader} holds the key (epoch {epoch}) but my CS.cfg is master; would demote"
            )
        return Decision(
            Action.FOLLOW,
            f"{leader} holds the key (epoch {epoch}) but my CS.cfg is master: demoting to a clone of {leader}",
            target=leader,
        )
    if local.cscfg_role in (ROLE_UNREADABLE, INCONSISTENT):
        return _bad_cscfg_on_a_non_holder(v, f"{leader} holds the key (epoch {epoch})")
    if local.ca_status == CA_DOWN and local.ca_down_streak >= v.policy.failure_threshold:
        if v.control.paused:
            return Decision(
                Action.WAIT, f"paused: my CA is down ({local.ca_reason}); would start it as a clone of {leader}"
            )
        promoting = _promoting(v, leader)
        if promoting:
            # two JVMs starting at once on a shared host double the promotion's start; a clone start can wait
            return Decision(
                Action.WAIT,
                f"my CA is down ({local.ca_reason}); its start as a clone of {leader} waits until {leader}'s "
                f"promotion ({promoting}) has it running",
            )
        return Decision(
            Action.FOLLOW, f"my CA is down ({local.ca_reason}): starting it as a clone of {leader}", target=leader
        )
    if v.control.switchover_target == v.me:
        return Decision(Action.WAIT, f"{v.control.switchover_kind} to me requested; waiting for {leader} to step down")
    expected = _agent_of(v, leader)
    seen = f"; its CA is {local.watched_status}" if local.watching == leader and local.watched_status else ""
    note = ""
    if expected and local.master_agent and local.master_agent != expected:
        note = f"; CS.cfg still points at {local.master_agent}, corrected at the next CA restart"
    return Decision(Action.WAIT, f"clone of {leader} (epoch {epoch}){seen}{note}")


# ---- nobody holds the key ----------------------------------------------------------------------------------


def _bad_cscfg_on_a_non_holder(v: ClusterView, context: str) -> Decision:
    """An unreadable or inconsistent CS.cfg on a member that does not hold the key: never elected and
    the file is left for repair, but a CA that may act as master with it is stopped."""
    local = v.local
    what = f"my CS.cfg is {local.cscfg_role} ({local.cscfg_problem})"
    if local.cscfg_master_duty and local.ca_status != CA_DOWN:
        if v.control.paused:
            return Decision(Action.WAIT, f"paused: {context}; {what} and would act as master; would stop my CA")
        return Decision(
            Action.STOP_CA,
            f"{context}; {what} and would generate CRLs or run the status task: stopping my CA, file left for "
            "repair (`ca-watchdog cscfg demote`)",
        )
    return Decision(Action.WAIT, f"{context}; {what}: never elected, file left untouched")


def _without_leader(v: ClusterView) -> Decision:
    if v.busy:
        return Decision(Action.WAIT, f"{v.busy} in progress; no master holds the key")
    if v.memory.epoch == 0 and not v.memory.epoch_unknown:
        return _bootstrap(v)
    old = v.memory.previous_leader
    local = v.local
    released = v.memory.previous_leader_released
    if old == v.me and not released and local.cscfg_role == MASTER and local.ca_status == CA_RUNNING:
        if v.control.paused:
            return Decision(
                Action.WAIT, "paused: my lease ended while my CA kept serving as master; would take the key back"
            )
        return Decision(
            Action.RESUME,
            "my lease ended while my CA kept serving as master: taking the key back (epoch "
            f"{v.memory.epoch} still the last one), CA left running",
            target=v.me,
            kind="resume",
        )
    stopped_master = local.ca_status == CA_DOWN and local.ca_down_streak >= v.policy.failure_threshold
    if local.cscfg_role == MASTER and (_serving_as_master(local) or stopped_master):
        # a stopped CA with a master CS.cfg too: nothing may start it as master, and as a clone it can run
        if v.control.paused:
            return Decision(
                Action.WAIT, "paused: my CS.cfg is master but I do not hold the key; would stop being master"
            )
        return Decision(
            Action.SELF_FENCE,
            "my CS.cfg is master but I do not hold the key: stopping the CA and demoting",
            target=_best_guess_successor(v),
        )
    if local.cscfg_role in (ROLE_UNREADABLE, INCONSISTENT) and local.cscfg_master_duty and local.ca_status != CA_DOWN:
        return _bad_cscfg_on_a_non_holder(v, "no master holds the key")
    if v.memory.epoch_unknown:
        return Decision(Action.WAIT, "the store's epoch record is unreadable: no election until it is repaired")

    wanted, kind = v.control.switchover_target, v.control.switchover_kind or "switchover"
    if wanted is not None and wanted != v.me:
        # the named member gets the key whenever it can; the others defer to it while it is eligible
        # and, whatever its state, for one ttl; then the automatic rules apply
        problem = _switchover_problem(v, wanted, old_master=old)
        if problem is None or v.memory.leaderless_for < v.policy.ttl:
            return Decision(
                Action.WAIT,
                f"{kind} to {wanted}: waiting for it to take the key" + (f" ({wanted}: {problem})" if problem else ""),
            )
    if wanted is not None and wanted == v.me:
        if v.control.paused:
            return Decision(Action.WAIT, f"paused: {kind} to me requested; would take the key")
        why_not = _switchover_problem(v, v.me, old_master=old)
        if why_not:
            return Decision(Action.CLEAR_SWITCHOVER, f"{kind} to me refused: {why_not}", target=v.control.switchover_id)
        serving = [] if released else _seen_serving(v, old)
        if serving:
            return Decision(
                Action.CLEAR_SWITCHOVER,
                f"{kind} to me refused: {old} is still seen serving by {', '.join(serving)}",
                target=v.control.switchover_id,
            )
        return Decision(
            Action.PROMOTE, f"{kind} to me: taking the key", target=v.me, fence_old_master=not released, kind=kind
        )

    lost = f"{old} released the key" if released else f"{old}'s lease ended"
    if not released:
        serving = _seen_serving(v, old)
        if serving:
            return Decision(
                Action.WAIT,
                f"{UNMANAGED}: {lost} but its CA is still seen serving by {', '.join(serving)}; no failover",
            )
        if not _confirmed_not_master(v, old):
            return Decision(
                Action.WAIT, f"{lost}; waiting until clones confirm its CA is down ({_watch_summary(v, old)})"
            )
    if local.cscfg_role == CLONE and local.ca_status == CA_DOWN and local.ca_down_streak >= v.policy.failure_threshold:
        # nobody else will start it, and a clone that does not run can never be elected
        if v.control.paused:
            return Decision(Action.WAIT, f"paused: {lost}; my clone CA is down ({local.ca_reason}); would start it")
        successor = _successor_after_release(v, old) if released else None
        if successor:
            # the member that takes the key next starts its CA now: mine can wait (for one ttl at most)
            return Decision(
                Action.WAIT,
                f"{lost}; my clone CA is down ({local.ca_reason}): its start waits until {successor} has taken "
                "the key and its CA runs",
            )
        return Decision(
            Action.START_CLONE,
            f"{lost}; my clone CA is down ({local.ca_reason}): starting it as a clone so that it can be elected",
        )
    # A released key has no holder left to keep: the step-down itself was the (checked) decision.
    cooldown = None if released else cooldown_reason(v)
    if cooldown:
        return Decision(Action.WAIT, f"{lost}; failover blocked: {cooldown}")
    ranked, rejected = _ranked(v, old_master=old)
    if not ranked:
        return Decision(Action.WAIT, f"{lost}; no eligible clone ({_list(rejected)})")
    if v.control.paused:
        return Decision(Action.WAIT, f"paused: {lost}; would elect {ranked[0]}")
    # The winner gets one ttl to take the key; after each further ttl the next candidate gets its turn
    # (round robin), so identical views never name two promoters.
    rounds = int(v.memory.leaderless_for // v.policy.ttl)
    chosen = ranked[rounds % len(ranked)]
    if chosen == v.me:
        skipped = ranked[: rounds % len(ranked)] if rounds < len(ranked) else [r for r in ranked if r != v.me]
        late = f" ({', '.join(skipped)} did not take the key within ttl)" if rounds and skipped else ""
        return Decision(
            Action.PROMOTE,
            f"{lost}; elected {v.me} from {', '.join(ranked)}{late}",
            target=v.me,
            fence_old_master=not released,
        )
    return Decision(Action.WAIT, f"{lost}; waiting for {chosen} to take the key (ranking {', '.join(ranked)})")


def _bootstrap(v: ClusterView) -> Decision:
    states = _all_states(v)
    masters = sorted(s.name for s in states if s.cscfg_role == MASTER)
    hint = "run `ca-watchdog bootstrap --master NAME`"
    if len(masters) == 1:
        (m,) = masters
        if m != v.me:
            return Decision(Action.WAIT, f"bootstrap: {m}'s CS.cfg is the only master; waiting for it to take the key")
        if v.control.paused:
            return Decision(Action.WAIT, "paused: bootstrap: my CS.cfg is the only master; would take the key")
        return Decision(Action.BOOTSTRAP, "my CS.cfg is the only master: taking the key", target=v.me, kind="bootstrap")
    if not masters:
        seen = ", ".join(f"{s.name} {s.cscfg_role}" for s in states)
        return Decision(Action.WAIT, f"bootstrap: no CS.cfg master ({seen}); {hint}")
    return Decision(Action.WAIT, f"bootstrap: several CS.cfg masters ({', '.join(masters)}); nobody acts; {hint}")


# ---- election helpers -----------------------------------------------------------------------------------------


def _all_states(v: ClusterView) -> list[MemberState]:
    out = [v.local]
    out.extend(s for name, s in sorted(v.records.items()) if name != v.me and v.config_of(name) is not None)
    return out


def _ineligible(v: ClusterView, name: str, old_master: str | None, planned: bool = False) -> str | None:
    """Why `name` cannot become master now (None: it can). Lag is checked by _ranked."""
    cfg = v.config_of(name)
    if cfg is None:
        return "not a cluster member"
    st = v.state_of(name)
    if name == old_master and not (st is not None and st.cscfg_role == CLONE and st.ca_status == CA_RUNNING):
        return "the old master"  # unless it came back as a running clone (after a reboot, say)
    if cfg.nofailover and not planned:
        return "nofailover"
    if st is None:
        return "no fresh member record"
    if _stale(v, st):
        return f"stale member record (unchanged for {v.age_of(st):.0f}s)"
    if st.busy:
        return f"busy ({st.busy})"
    if st.cscfg_role in (ROLE_UNREADABLE, INCONSISTENT):
        return f"CS.cfg {st.cscfg_role}"
    if st.ca_status != CA_RUNNING:
        return f"CA {st.ca_status}"
    if not st.ds_ok:
        return "local 389-DS down"
    # an agreement toward the dead old master turns red at the first write: that is expected
    red = [c for c in st.replication_red if c != old_master]
    if red:
        return f"replication red toward {', '.join(red)}"
    return None


def _csn_of(st: MemberState, rid: int | None) -> str:
    if rid is not None:
        return st.max_csn.get(rid, "")
    return max(st.max_csn.values(), default="")


def _csn_time(csn: str) -> float | None:
    return float(int(csn[:8], 16)) if len(csn) == 20 else None


def _reference(v: ClusterView, old_master: str | None) -> tuple[int | None, float | None]:
    """The old master's replica id and the time of the newest change from it that any fresh record shows
    (eligible or not: a clone whose CA is down still proves what the old master wrote)."""
    rid = v.memory.known_replica_ids.get(old_master) if old_master else None
    reference = [st for st in _all_states(v) if not _stale(v, st)]
    newest = max((_csn_of(s, rid) for s in reference), default="")
    return rid, _csn_time(newest)


def _lag_problem(v: ClusterView, name: str, old_master: str | None) -> str | None:
    st = v.state_of(name)
    rid, newest_t = _reference(v, old_master)
    if st is None or newest_t is None:
        return None
    mine_t = _csn_time(_csn_of(st, rid))
    lag = newest_t - mine_t if mine_t is not None else float("inf")
    if lag > v.policy.maximum_lag:
        return f"replication lag {lag:g}s > maximum_lag {v.policy.maximum_lag:g}s"
    return None


def _switchover_problem(v: ClusterView, name: str, old_master: str | None) -> str | None:
    """Why a named switchover/failover target cannot take over (nofailover and cooldown do not apply)."""
    return _ineligible(v, name, old_master, planned=True) or _lag_problem(v, name, old_master)


def _ranked(v: ClusterView, old_master: str | None) -> tuple[list[str], list[str]]:
    """Eligible candidates, best first, and the rejected ones with their reasons."""
    rejected: list[str] = []
    eligible: list[MemberState] = []
    for m in v.members:
        why = _ineligible(v, m.name, old_master) or _lag_problem(v, m.name, old_master)
        if why:
            if m.name != old_master:
                rejected.append(f"{m.name}: {why}")
            continue
        st = v.state_of(m.name)
        assert st is not None
        eligible.append(st)
    rid = v.memory.known_replica_ids.get(old_master) if old_master else None

    def key(st: MemberState) -> tuple[str, int]:
        cfg = v.config_of(st.name)
        return (_csn_of(st, rid), cfg.priority if cfg else 0)

    # highest CSN first, then highest priority, then name ascending; the old master (back as a clone)
    # only when nobody else can
    eligible.sort(key=lambda s: s.name)
    eligible.sort(key=key, reverse=True)
    eligible.sort(key=lambda s: s.name == old_master)
    return [s.name for s in eligible], rejected


def _promoting(v: ClusterView, leader: str) -> str | None:
    """What says the key holder's promotion is in progress, if anything does: its fresh record's `busy`
    is a promotion step, or it still reports a clone CS.cfg (the record it published before taking the
    key: a holder with a clone CS.cfg completes the promotion or rolls it back, both bounded)."""
    st = v.records.get(leader)
    if st is None or _stale(v, st):
        return None
    if st.busy and st.busy.startswith("promote"):
        return st.busy
    if st.cscfg_role == CLONE:
        return "its CS.cfg is still a clone's"
    return None


def _successor_after_release(v: ClusterView, old: str | None) -> str | None:
    """After a clean release: another eligible member that will take the key (within one ttl of the key
    being seen free); None once that ttl is over or when nobody else can."""
    if v.memory.leaderless_for >= v.policy.ttl:
        return None
    ranked, _ = _ranked(v, old_master=old)
    others = [r for r in ranked if r != v.me]
    return others[0] if others else None


def _stale(v: ClusterView, st: MemberState) -> bool:
    """Another member's record unchanged for one ttl by my clock is not trusted (the store should have expired
    it); never judged by comparing its writer's wall clock with mine."""
    return st.name != v.me and v.age_of(st) > v.policy.ttl


def _seen_serving(v: ClusterView, old: str | None) -> list[str]:
    if old is None:
        return []
    names = []
    for st in _all_states(v):
        if st.name == old:
            if st.ca_status in (CA_RUNNING, CA_STARTING) and st.cscfg_role == MASTER:
                names.append(f"{old} itself")
        elif (
            st.watching == old and st.watched_status in (CA_RUNNING, CA_STARTING) and st.watched_role != CLONE
        ):  # serving, and not provably as a clone (getInfo names a master_host): it may still make CRLs
            names.append(st.name)
    return names


def _observers_down(v: ClusterView, old: str | None) -> list[str]:
    return [
        st.name
        for st in _all_states(v)
        if st.name != old
        and st.watching == old
        and st.watched_status == CA_DOWN
        and st.watched_down_streak >= v.policy.failure_threshold
        and not _stale(v, st)
    ]


def _confirmed_not_master(v: ClusterView, old: str | None) -> bool:
    """The old master provably does not serve as master: clones see its CA down, or see it answer as a
    clone, or its own fresh record says its CS.cfg is a clone's (or its CA is down)."""
    if old is None or _observers_down(v, old):
        return True
    own = v.state_of(old)
    down = own is not None and own.ca_status == CA_DOWN and own.ca_down_streak >= v.policy.failure_threshold
    if own is not None and not _stale(v, own) and (own.cscfg_role == CLONE or down):
        return True
    return any(
        st.watching == old and st.watched_status == CA_RUNNING and st.watched_role == CLONE and not _stale(v, st)
        for st in _all_states(v)
        if st.name != old
    )


def _watch_summary(v: ClusterView, old: str | None) -> str:
    parts = [
        f"{st.name}: {st.watched_status or 'no view'} x{st.watched_down_streak}"
        for st in _all_states(v)
        if st.name != old
    ]
    return ", ".join(parts) or "no clone reports"


def cooldown_reason(v: ClusterView) -> str | None:
    """The store's cooldown key is the fact: it is written when an automatic failover completes (the new
    master serving) and lives failover_cooldown seconds in the store; `ca-watchdog ack` deletes it."""
    since = v.control.cooldown_since
    if since is None or v.policy.failover_cooldown <= 0:
        return None
    age = max(0.0, v.now - since)
    return (
        f"cooldown: last failover {age:.0f}s ago (< failover_cooldown {v.policy.failover_cooldown:g}s); "
        "run `ca-watchdog ack` to allow another"
    )


def _best_guess_successor(v: ClusterView) -> str | None:
    """Whom a demoted CS.cfg should name until the real new master is known: the best candidate."""
    old = v.memory.previous_leader or v.me
    ranked = [name for name in _ranked(v, old_master=old)[0] if name != v.me]
    if ranked:
        return ranked[0]
    others = sorted((m for m in v.members if m.name != v.me), key=lambda m: (-m.priority, m.name))
    return others[0].name if others else None


def _agent_of(v: ClusterView, name: str) -> str | None:
    cfg = v.config_of(name)
    return f"{cfg.agent_host}:{cfg.agent_port}" if cfg and cfg.agent_host else None


def _list(items: Sequence[str]) -> str:
    return "; ".join(items) if items else "no other members"
