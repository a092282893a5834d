"""Store facts + this cycle's observation -> the ClusterView that decide() reads. Pure: no I/O, no clock.

Every fact a decision uses is here and comes from the store's explicit keys (leader, epoch record,
flags, cooldown) or from this node's own observation; nothing from the history log. Ages of other
members' records come from the reader's own monotonic clock (`RecordClock`), never from comparing
another host's wall clock with this one. A record that cannot be read is dropped and reported.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from .model import ClusterView, ControlView, LeaderView, LocalMemory, MemberConfig, MemberState, Policy
from .store.base import StoreState


@dataclass(frozen=True)
class LocalFacts:
    """What this daemon itself knows that the store does not: its lease (kept by the actuator), its
    own start, whether it already restarted its CA in this incident, and an earlier run's journal."""

    seconds_since_renew: float | None = None
    held_epoch: int | None = None  # the epoch of the key the actuator holds (renewed seconds_since_renew ago)
    uptime: float = float("inf")
    restarted_in_incident: bool = False
    leaderless_for: float = 0.0
    unfinished_step: str | None = None
    busy: str | None = None


@dataclass
class RecordClock:
    """When this reader first saw each member's record in its current version (monotonic seconds).

    A record's age is the time since its content last changed, as this reader saw it: a writer whose
    wall clock is wrong cannot make its record look fresh or stale."""

    seen: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (updated_at, first seen)

    def ages(self, records: Mapping[str, MemberState], now: float | None = None) -> dict[str, float]:
        mono = time.monotonic() if now is None else now
        out: dict[str, float] = {}
        for name, st in records.items():
            prev = self.seen.get(name)
            if prev is None or prev[0] != st.updated_at:
                self.seen[name] = prev = (st.updated_at, mono)
            out[name] = mono - prev[1]
        for gone in set(self.seen) - set(records):
            del self.seen[gone]
        return out


def decode_records(state: StoreState, members: tuple[MemberConfig, ...]) -> tuple[dict[str, MemberState], list[str]]:
    """Member payloads -> MemberState; a malformed one is dropped with a line saying why."""
    names = {m.name for m in members}
    records: dict[str, MemberState] = {}
    problems: list[str] = []
    for name, rec in state.members.records.items():
        if name not in names:
            problems.append(f"member record of {name!r}: not a cluster member; ignored")
            continue
        try:
            records[name] = MemberState.from_payload(name, rec.payload)
        except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as exc:
            problems.append(f"member record of {name} unreadable ({exc}); ignored")
    return records, problems


def build_view(
    *,
    me: str,
    now: float,
    policy: Policy,
    members: tuple[MemberConfig, ...],
    local: MemberState,
    state: StoreState | None,
    store_error: str | None,
    records: Mapping[str, MemberState],
    record_ages: Mapping[str, float],
    facts: LocalFacts,
    known_replica_ids: Mapping[str, int],
    last_flags: ControlView | None = None,
    problems: tuple[str, ...] = (),
    failsafe_acks: tuple[str, ...] = (),
) -> ClusterView:
    """`state` None means the store could not be read this cycle (`store_error` says why): the view then
    keeps the last control flags seen (a store blip must not drop a pause) and no leader."""
    if state is not None:
        sw = state.flags.switchover
        control = ControlView(
            paused=state.flags.paused,
            paused_at=state.flags.paused_at,
            switchover_target=sw.target if sw else None,
            switchover_kind=sw.kind if sw else None,
            switchover_id=sw.id if sw else None,
            cooldown_since=state.cooldown.at if state.cooldown is not None else None,
        )
        ep = state.epoch
        leader = state.leader
        memory = LocalMemory(
            seconds_since_renew=facts.seconds_since_renew,
            uptime=facts.uptime,
            restarted_in_incident=facts.restarted_in_incident,
            previous_leader=ep.name if ep else (leader.name if leader else None),
            previous_leader_released=bool(ep and ep.ended == "released" and not leader),
            leaderless_for=facts.leaderless_for,
            known_replica_ids=dict(known_replica_ids),
            epoch=max(ep.epoch if ep else 0, leader.epoch if leader else 0),
            epoch_unknown=state.epoch_unreadable,
            unfinished_step=facts.unfinished_step,
        )
        leader_view = LeaderView(leader.name, leader.epoch, leader.expires_at) if leader else None
        problems = (*state.problems, *problems)
    else:
        control = last_flags or ControlView()
        memory = LocalMemory(
            seconds_since_renew=facts.seconds_since_renew,
            uptime=facts.uptime,
            restarted_in_incident=facts.restarted_in_incident,
            leaderless_for=facts.leaderless_for,
            known_replica_ids=dict(known_replica_ids),
            unfinished_step=facts.unfinished_step,
        )
        leader_view = None
        age = facts.seconds_since_renew
        if facts.held_epoch is not None and age is not None and age < policy.ttl - policy.safety_margin:
            # my own lease, proven by a renewal this recently: still mine through a store blip, so /master
            # keeps answering (the decision goes by the lease age, not by this)
            leader_view = LeaderView(me, facts.held_epoch, now + policy.ttl - age)
    return ClusterView(
        now=now,
        me=me,
        policy=policy,
        members=members,
        local=MemberState(**{**local.__dict__, "busy": facts.busy}),
        records={k: v for k, v in records.items() if k != me},
        leader=leader_view,
        control=control,
        memory=memory,
        store_ok=state is not None,
        store_error=store_error,
        busy=facts.busy,
        problems=problems,
        failsafe_acks=failsafe_acks,
        record_ages={k: v for k, v in record_ages.items() if k != me},
    )
