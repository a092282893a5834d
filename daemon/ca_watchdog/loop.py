"""The HA cycle: observe, publish, decide, act, report. One decision per cycle, one log line.

Long actions (promote, demote, restart) run as a task; the loop keeps publishing and renewing
the lease meanwhile and reports what is in progress. The loop never blocks on an action.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp

from . import cscfg
from .config import Settings, load_settings
from .decide import UNMANAGED, cooldown_reason, decide
from .metrics import REPLICATION_STATES, ROLES, Metrics
from .model import (
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
from .node import LocalCA, NodeError, run_fence_command
from .probes.agent import AgentProbe, AgentStatus
from .probes.directory import DirectoryObservation, probe_directory
from .service import service_for
from .store import open_store
from .store.base import Flags, LeaderRecord, Store, StoreUnavailable
from .systemd import Notifier, setup_logging

log = logging.getLogger("ca_watchdog")
T = TypeVar("T")


@dataclass(frozen=True)
class Observation:
    ca: AgentStatus
    directory: DirectoryObservation | None
    cscfg: cscfg.CSCfg | None
    cscfg_role: str
    cscfg_problem: str | None
    watched: str | None
    watched_status: AgentStatus | None
    watched_role: str | None


@dataclass(frozen=True)
class HistoryFacts:
    epoch: int = 0
    previous_leader: str | None = None
    released: bool = False
    last_failover_at: float | None = None


@dataclass
class Snapshot:
    """What the API and `status` show: the last cycle's view and decision."""

    view: ClusterView | None = None
    decision: Decision | None = None
    at: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def policy_of(s: Settings) -> Policy:
    return Policy(
        interval=s.timing.interval,
        ttl=s.timing.ttl,
        safety_margin=s.timing.safety_margin,
        failure_threshold=s.timing.failure_threshold,
        restart_before_failover=s.failover.restart_before_failover,
        maximum_lag=s.failover.maximum_lag,
        failover_cooldown=s.failover.failover_cooldown,
        fence_lead=s.timing.cycle_budget,
    )


def member_configs(s: Settings) -> tuple[MemberConfig, ...]:
    return tuple(MemberConfig(m.name, m.priority, m.nofailover, m.agent_host, m.agent_port) for m in s.members)


def member_ttl(s: Settings) -> float:
    """A member record older than this is stale: about three missed cycles."""
    return min(s.timing.ttl, max(3 * s.timing.interval + 2 * s.timing.store_timeout, 5.0))


class Watchdog:
    def __init__(
        self, settings: Settings, store: Store, probe: AgentProbe, metrics: Metrics, notifier: Notifier | None = None
    ) -> None:
        self.s = settings
        self.me = settings.node.name
        self.store = store
        self.probe = probe
        self.ca = LocalCA(settings, service_for(settings.node), probe)
        self.metrics = metrics
        self.notifier = notifier or Notifier()
        self.policy = policy_of(settings)
        self.members = member_configs(settings)
        self.ldap_password = settings.ldap_password() or ""
        self.snapshot = Snapshot()
        # memory across cycles
        self.ca_down_streak = 0
        self.ca_starting_since: float | None = None
        self.watched_down_streak = 0
        self.watched_name: str | None = None
        self.last_renew_mono: float | None = None
        self.held_epoch: int | None = None
        self.restarted_in_incident = False
        self.leaderless_since: float | None = None
        self.known_rids: dict[str, int] = {}
        self.history = HistoryFacts()
        self.last_leader_seen: tuple[str, int] | None = None
        self.published_crl: tuple[str, ...] | None = None
        self.last_local: MemberState | None = None
        self.task: asyncio.Task[None] | None = None
        self.busy: str | None = None
        self.cycles = 0
        self.store_ok = True
        self.unfinished_step: str | None = None
        self.last_cycle_end: float | None = None
        self._peer_session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()

    # ---- observe ----------------------------------------------------------------------------------

    def _read_cscfg(self) -> tuple[cscfg.CSCfg | None, str, str | None]:
        try:
            cfg = cscfg.read_cscfg(self.s.node.cs_cfg)
        except cscfg.CSCfgError as exc:
            return None, ROLE_UNREADABLE, str(exc)
        report = cscfg.classify(cfg)
        return cfg, report.role.value, "; ".join(report.problems) or None

    async def observe(self) -> Observation:
        leader = self.last_leader_seen[0] if self.last_leader_seen else self.history.previous_leader
        watched = leader if leader and leader != self.me else None
        directory: Awaitable[DirectoryObservation | None]
        if self.s.me.ldap_url:
            directory = probe_directory(
                self.s.me.ldap_url,
                self.s.node.ldap_bind_dn,
                self.ldap_password,
                timeout=self.s.timing.ldap_timeout,
                ca_file=self.s.tls.ca_file,
            )
        else:
            directory = _none()
        # getInfo (master or clone?) only matters once the key is free: skip that TLS handshake otherwise
        tell_role = self.last_leader_seen is None
        watched_probe = self._watch(self.s.member(watched).agent_url, tell_role) if watched else _none()
        ca, ds, watched_result = await asyncio.gather(self.ca.status(), directory, watched_probe)
        w, w_role = watched_result if watched_result is not None else (None, None)
        cfg, role, problem = self._read_cscfg()
        self.metrics.probe_latency.labels("agent").observe(ca.latency)
        if ds is not None:
            self.metrics.probe_latency.labels("ldap").observe(ds.latency)
        return Observation(ca, ds, cfg, role, problem, watched, w, w_role)

    async def _watch(self, url: str, tell_role: bool) -> tuple[AgentStatus, str | None]:
        """The current master as a client sees it: getStatus, and getInfo to tell master from clone."""
        st = await self.probe.status(url)
        if st.status != CA_RUNNING or not tell_role:
            return st, None
        info = await self.probe.info(url)
        return st, (("clone" if info.master_host else "master") if info.ok else None)

    def _local_state(self, obs: Observation, now: float) -> MemberState:
        mono = time.monotonic()
        status: str = obs.ca.status
        if status == CA_STARTING:
            self.ca_starting_since = self.ca_starting_since or mono
            if mono - self.ca_starting_since > self.s.timing.start_timeout:
                status = CA_DOWN  # "starting" for longer than a start may take is a failure
        else:
            self.ca_starting_since = None
        self.ca_down_streak = self.ca_down_streak + 1 if status == CA_DOWN else 0
        if status == CA_RUNNING:
            self.restarted_in_incident = False
        if obs.watched != self.watched_name:
            self.watched_name, self.watched_down_streak = obs.watched, 0
        ws = obs.watched_status
        self.watched_down_streak = self.watched_down_streak + 1 if ws is not None and ws.status == CA_DOWN else 0
        ds = obs.directory
        replication = "unknown"
        red: list[str] = []
        if ds is not None and ds.ok:
            states = [a.state for a in ds.agreements]
            replication = max(states, key=lambda st: REPLICATION_STATES.get(st, 3)) if states else "green"
            red = [self._consumer_name(a.consumer_host, a.consumer_port) for a in ds.agreements if a.state == "red"]
        report_agent: str | None = None
        if obs.cscfg is not None:
            h, p = obs.cscfg.get(cscfg.KEY_MASTER_HOST), obs.cscfg.get(cscfg.KEY_MASTER_PORT)
            report_agent = f"{h}:{p}" if h and p else None
        return MemberState(
            name=self.me,
            updated_at=now,
            ca_status=status,
            ca_reason=obs.ca.reason,
            ca_down_streak=self.ca_down_streak,
            cscfg_role=obs.cscfg_role,
            cscfg_problem=obs.cscfg_problem,
            master_agent=report_agent,
            ds_ok=bool(ds and ds.ok) if self.s.me.ldap_url else True,
            ds_error=ds.error if ds is not None else None,
            replication=replication,
            replication_red=tuple(red),
            replica_id=ds.replica_id if ds is not None else None,
            max_csn={rid: str(c) for rid, c in ds.ruv_max_csn.items() if c is not None}
            if ds is not None and ds.ok
            else {},
            watching=obs.watched,
            watched_status=ws.status if ws is not None else None,
            watched_role=obs.watched_role,
            watched_down_streak=self.watched_down_streak,
            busy=self.busy,
        )

    def _consumer_name(self, host: str | None, port: int | None) -> str:
        """The member whose directory an agreement feeds (by its configured ldap_url), else host:port."""
        for m in self.s.members:
            if m.ldap_url:
                u = urlsplit(m.ldap_url)
                if u.hostname == host and (u.port or (636 if u.scheme == "ldaps" else 389)) == port:
                    return m.name
        return f"{host}:{port}"

    # ---- store ------------------------------------------------------------------------------------

    async def _call(self, coro: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(coro, self.s.timing.store_timeout + 0.5)
        except TimeoutError as exc:
            raise StoreUnavailable(f"store did not answer within {self.s.timing.store_timeout:g}s") from exc

    async def _refresh_history(self, leader: LeaderRecord | None) -> None:
        epoch = await self._call(self.store.get_epoch())
        events = await self._call(self.store.get_history(50))
        previous, released, last_failover = None, False, None
        acquired_epoch = 0
        for e in events:
            ev = e.event
            if ev.get("type") == "acquired" and isinstance(ev.get("name"), str):
                previous, released = ev["name"], False
                acquired_epoch = int(ev.get("epoch", 0))
            elif (
                ev.get("type") == "released"
                and ev.get("name") == previous
                and int(ev.get("epoch", -1)) == acquired_epoch
            ):
                released = True
            if ev.get("type") in ("acquired", "promoted") and ev.get("kind") == "automatic":
                last_failover = e.at  # an automatic failover counts from the moment a clone took the key
        if leader is not None:
            previous, released = leader.name, False
        self.history = HistoryFacts(max(epoch, leader.epoch if leader else 0), previous, released, last_failover)
        self.snapshot.history = [{"seq": e.seq, "at": e.at, **e.event} for e in events]

    async def _history(self, event: Mapping[str, Any]) -> None:
        try:
            await self._call(self.store.append_history({"member": self.me, **event}))
        except StoreUnavailable as exc:
            log.warning("could not record %s in the history: %s", event.get("type"), exc)

    async def _journal(self, step: str) -> None:
        self.busy = step
        try:
            await self._call(self.store.put_step(self.me, {"step": step, "at": time.time(), "epoch": self.held_epoch}))
        except StoreUnavailable as exc:
            log.warning("could not journal step %r: %s", step, exc)

    # ---- the cycle -----------------------------------------------------------------------------------

    def _memory(self, now_mono: float) -> LocalMemory:
        return LocalMemory(
            seconds_since_renew=(now_mono - self.last_renew_mono) if self.last_renew_mono is not None else None,
            restarted_in_incident=self.restarted_in_incident,
            previous_leader=self.history.previous_leader,
            previous_leader_released=self.history.released,
            leaderless_for=(now_mono - self.leaderless_since) if self.leaderless_since is not None else 0.0,
            last_failover_at=self.history.last_failover_at,
            known_replica_ids=dict(self.known_rids),
            epoch=self.history.epoch,
            unfinished_step=self.unfinished_step,
        )

    def _stalled_past_lease(self) -> bool:
        """This daemon itself was stalled (frozen, starved) past the point where it must self-fence."""
        if self.held_epoch is None or self.last_renew_mono is None or self.last_cycle_end is None:
            return False
        deadline = self.policy.ttl - self.policy.safety_margin
        now = time.monotonic()
        return now - self.last_cycle_end >= deadline - self.policy.interval and now - self.last_renew_mono >= deadline

    async def cycle(self) -> Decision:
        t0 = time.monotonic()
        now = time.time()
        if self._stalled_past_lease() and self.last_local is not None:
            # woke up late (frozen, overloaded): fence before spending time on probes
            view = self._view(now, self.last_local, {}, None, Flags(False, None, None, None), False, "lease overdue")
            return await self._decide_and_act(view, t0)
        obs = await self.observe()
        self.report_directory(obs.directory)
        local = self._local_state(obs, now)
        self.last_local = local
        store_ok, store_error = True, None
        leader: LeaderRecord | None = None
        records: dict[str, MemberState] = {}
        flags = Flags(False, None, None, None)
        problems: list[str] = []
        try:
            await self._call(self.store.put_member(self.me, local.to_payload(), member_ttl(self.s)))
            leader = await self._call(self.store.get_leader())
            problems.extend(self.store.last_problems())
            snap = await self._call(self.store.get_members())
            problems.extend(snap.rejected)
            flags = await self._call(self.store.get_flags())
            for name, rec in snap.records.items():
                try:
                    records[name] = MemberState.from_payload(name, rec.payload)
                except (KeyError, TypeError, ValueError) as exc:
                    problems.append(f"member record of {name} unreadable ({exc}); ignored")
            # every cycle: the cooldown and "who was master" must never be decided on stale history
            await self._refresh_history(leader)
            self.last_leader_seen = (leader.name, leader.epoch) if leader else None
            if leader is not None and leader.name == self.me:
                self.held_epoch = leader.epoch
            elif self.held_epoch is not None and (leader is None or leader.name != self.me):
                self.held_epoch = None
                self.last_renew_mono = None
            await self._publish_crl(leader, obs)
        except StoreUnavailable as exc:
            store_ok, store_error = False, f"store unreachable: {exc}"
        self.store_ok = store_ok
        self.metrics.store_up.set(1 if store_ok else 0)
        acks: tuple[str, ...] = ()
        if not store_ok and self.held_epoch is not None:
            acks = await self._failsafe_acks(self.held_epoch)
        for name, st in records.items():
            if st.replica_id is not None:
                self.known_rids[name] = st.replica_id
        if local.replica_id is not None:
            self.known_rids[self.me] = local.replica_id
        if store_ok:
            mono = time.monotonic()
            self.leaderless_since = (self.leaderless_since or mono) if leader is None else None
        view = self._view(now, local, records, leader, flags, store_ok, store_error, tuple(problems))
        view = replace(view, failsafe_acks=acks)
        return await self._decide_and_act(view, t0)

    async def _failsafe_acks(self, epoch: int) -> tuple[str, ...]:
        """Peers that, over the peer API, still follow me (same epoch) and cannot reach the store."""
        peers = [m for m in self.s.members if m.name != self.me and m.api_url]
        if not peers:
            return ()
        session = self._peers()

        async def ask(url: str, name: str) -> str | None:
            try:
                async with session.get(url.rstrip("/") + "/failsafe") as r:
                    body = await r.json() if r.status == 200 else {}
            except (aiohttp.ClientError, TimeoutError, ValueError):
                return None
            ok = body.get("leader") == self.me and body.get("epoch") == epoch and body.get("store_ok") is False
            return name if ok else None

        answers = await asyncio.gather(*(ask(m.api_url, m.name) for m in peers if m.api_url))
        return tuple(a for a in answers if a)

    def _peers(self) -> aiohttp.ClientSession:
        if self._peer_session is None or self._peer_session.closed:
            t = self.s.tls
            ctx = ssl.create_default_context(cafile=t.ca_file)
            if t.cert_file and t.key_file:
                ctx.load_cert_chain(t.cert_file, t.key_file)
            self._peer_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx),
                timeout=aiohttp.ClientTimeout(total=self.s.timing.agent_timeout),
            )
        return self._peer_session

    def _view(
        self,
        now: float,
        local: MemberState,
        records: Mapping[str, MemberState],
        leader: LeaderRecord | None,
        flags: Flags,
        store_ok: bool,
        store_error: str | None,
        problems: tuple[str, ...] = (),
    ) -> ClusterView:
        sw = flags.switchover
        memory = self._memory(time.monotonic())
        if not store_ok and self.held_epoch is not None:
            memory = replace(memory, previous_leader=self.me)
        return ClusterView(
            now=now,
            me=self.me,
            policy=self.policy,
            members=self.members,
            local=replace(local, busy=self.busy),
            records={k: v for k, v in records.items() if k != self.me},
            leader=LeaderView(leader.name, leader.epoch, leader.expires_at) if leader else None,
            control=ControlView(
                paused=flags.paused,
                paused_at=flags.paused_at,
                switchover_target=sw.target if sw else None,
                switchover_kind=sw.kind if sw else None,
                cooldown_ack_at=flags.cooldown_ack_at,
            ),
            memory=memory,
            store_ok=store_ok,
            store_error=store_error,
            busy=self.busy,
            problems=problems,
        )

    async def _decide_and_act(self, view: ClusterView, t0: float) -> Decision:
        decision = decide(view)
        try:
            await self.act(decision, view)
        except StoreUnavailable as exc:
            decision = replace(decision, reason=f"{decision.reason} (store: {exc})")
        self.report(view, decision, time.monotonic() - t0)
        self.cycles += 1
        self.last_cycle_end = time.monotonic()
        return decision

    async def _publish_crl(self, leader: LeaderRecord | None, obs: Observation) -> None:
        if leader is None or leader.name != self.me or obs.cscfg is None or obs.cscfg_role != "master":
            return
        lines = tuple(obs.cscfg.crl_lines())
        if lines == self.published_crl:
            return
        current = await self._call(self.store.get_crl_block())
        changed = current is None or current.lines != lines or current.epoch != leader.epoch
        if changed and await self._call(self.store.put_crl_block(self.me, leader.epoch, lines)):
            log.info("published the ca.crl. block (%d lines, epoch %d)", len(lines), leader.epoch)
        self.published_crl = lines

    # ---- act -----------------------------------------------------------------------------------------

    async def act(self, d: Decision, view: ClusterView) -> None:
        if d.action is Action.WAIT:
            return
        if d.action is Action.RENEW:
            assert view.leader is not None
            await self._renew(view.leader.epoch)
            return
        if d.action is Action.CLEAR_SWITCHOVER:
            await self._call(self.store.clear_switchover())
            await self._history({"type": "switchover_refused", "reason": d.reason})
            return
        if d.action is Action.BOOTSTRAP:
            await self._acquire(d)
            return
        if self.task is not None and not self.task.done():
            return
        runners: dict[Action, Callable[[Decision, ClusterView], Awaitable[None]]] = {
            Action.PROMOTE: self._promote,
            Action.DEMOTE_AND_RELEASE: self._demote_and_release,
            Action.RESTART_CA: self._restart,
            Action.SELF_FENCE: self._self_fence,
            Action.FOLLOW: self._follow,
        }
        self.busy = d.action.value
        self.task = asyncio.create_task(self._guarded(runners[d.action], d, view), name=f"ca-watchdog {d.action}")

    async def _guarded(
        self, run: Callable[[Decision, ClusterView], Awaitable[None]], d: Decision, v: ClusterView
    ) -> None:
        try:
            await run(d, v)
        except asyncio.CancelledError:
            # the journal stays in the store: the next run resumes or rolls back from it
            log.warning("%s cancelled at %r", d.action.value, self.busy)
            self.busy = None
            raise
        except Exception as exc:
            log.error("%s failed: %s", d.action.value, exc)
            await self._history({"type": f"{d.action.value}_failed", "error": str(exc)})
        self.busy = None
        self.unfinished_step = None  # done, failed or rolled back: nothing left to resume
        with contextlib.suppress(StoreUnavailable):
            await self._call(self.store.put_step(self.me, None))
        self._wake.set()

    async def _renew(self, epoch: int) -> None:
        sent = time.monotonic()
        rec = await self._call(self.store.renew_leader(self.me, epoch, self.policy.ttl))
        if rec is None:
            log.error("lost the leader key (epoch %d): someone else holds it or it expired", epoch)
            self.held_epoch = None
            self.last_renew_mono = None
            return
        self.held_epoch, self.last_renew_mono = rec.epoch, sent

    async def _acquire(self, d: Decision) -> LeaderRecord | None:
        sent = time.monotonic()
        rec = await self._call(self.store.acquire_leader(self.me, self.policy.ttl, d.reason))
        if rec is None:
            log.info("did not get the leader key: another member took it first")
            return None
        self.held_epoch, self.last_renew_mono = rec.epoch, sent
        self.last_leader_seen = (rec.name, rec.epoch)
        await self._history(
            {"type": "acquired", "name": self.me, "epoch": rec.epoch, "kind": d.kind, "reason": d.reason}
        )
        return rec

    async def _release(self, reason: str, target: str | None = None) -> None:
        epoch = self.held_epoch
        if epoch is None:
            return
        released = await self._call(self.store.release_leader(self.me, epoch, reason))
        self.held_epoch = None
        self.last_renew_mono = None
        if released:
            await self._history(
                {"type": "released", "name": self.me, "epoch": epoch, "reason": reason, "target": target}
            )

    async def _promote(self, d: Decision, v: ClusterView) -> None:
        t_decided = time.time()
        if (v.leader is None or v.leader.name != self.me) and await self._acquire(d) is None:
            return
        epoch = self.held_epoch
        old = v.memory.previous_leader if v.memory.previous_leader != self.me else None
        if d.fence_old_master and old and self.s.failover.fence_command:
            await self._journal(f"promote: fencing {old}")
            try:
                await run_fence_command(self.s.failover.fence_command, old, self.s.timing.stop_timeout)
            except NodeError:
                await self._release("fence_command failed; not promoting")
                raise
        block = await self._call(self.store.get_crl_block())
        lines = block.lines if block is not None else None
        try:
            times = await self.ca.promote(lines, self._journal)
        except (NodeError, cscfg.CSCfgError, OSError) as exc:
            self.metrics.failovers.labels(d.kind, "failed").inc()
            await self._rollback_promotion(str(exc))
            raise
        duration = times.running_at - t_decided
        self.metrics.failovers.labels(d.kind, "success").inc()
        self.metrics.last_failover.set(times.running_at)
        self.metrics.last_failover_duration.set(duration)
        await self._history(
            {
                "type": "promoted",
                "name": self.me,
                "epoch": epoch,
                "kind": d.kind,
                "old_master": old,
                "reason": d.reason,
                "decided_at": t_decided,
                "stopped_at": times.stopped_at,
                "written_at": times.written_at,
                "started_at": times.started_at,
                "running_at": times.running_at,
                "duration": round(duration, 3),
            }
        )
        if d.kind in ("switchover", "failover"):
            await self._call(self.store.clear_switchover())
        log.info("promotion done: %s is master (epoch %s), running %.1fs after the decision", self.me, epoch, duration)

    async def _rollback_promotion(self, why: str) -> None:
        """A failed promotion: back to a stopped clone, and the key released with the reason."""
        successor = next(
            (m.name for m in sorted(self.members, key=lambda m: (-m.priority, m.name)) if m.name != self.me), None
        )
        with contextlib.suppress(NodeError, cscfg.CSCfgError, OSError):
            await self.ca.fence(successor, self._journal)
        await self._release(f"promotion failed: {why}")

    async def _demote_and_release(self, d: Decision, v: ClusterView) -> None:
        assert d.target is not None
        await self.ca.demote(d.target, start=False, journal=self._journal)
        # keep trying to release until the lease would have ended anyway: holding the key with a
        # demoted CA would make the next cycle "complete a promotion" of the CA that just failed
        deadline = time.monotonic() + self.policy.ttl
        while True:
            try:
                await self._release(d.reason, d.target)
                return
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(self.policy.interval)

    async def _restart(self, d: Decision, v: ClusterView) -> None:
        self.restarted_in_incident = True
        await self._history({"type": "restart", "name": self.me, "reason": d.reason})
        await self.ca.restart(self._journal)
        self._started_ca()

    async def _self_fence(self, d: Decision, v: ClusterView) -> None:
        # no store I/O before the CA is down: the store is the thing we cannot reach, and every
        # call would spend a store timeout of the safety margin
        self.busy = "self-fence"
        await self.ca.fence(d.target)
        self.held_epoch = None  # fenced: no longer the lease holder as far as this daemon knows
        self.last_renew_mono = None
        await self._history({"type": "self_fence", "name": self.me, "reason": d.reason})

    async def _follow(self, d: Decision, v: ClusterView) -> None:
        assert d.target is not None
        await self.ca.demote(d.target, start=True, journal=self._journal)
        self._started_ca()

    def _started_ca(self) -> None:
        """A start was just issued: count failed probes afresh (no burst of starts while it boots)."""
        self.ca_down_streak = 0

    # ---- report ----------------------------------------------------------------------------------------

    def report(self, view: ClusterView, d: Decision, seconds: float) -> None:
        epoch = view.leader.epoch if view.leader else 0
        log.info(d.line(), extra={"MEMBER": self.me, "EPOCH": str(epoch), "ACTION": d.action.value})
        for p in view.problems:
            log.warning("ignored: %s", p)
        self.snapshot.view, self.snapshot.decision, self.snapshot.at = view, d, time.time()
        m = self.metrics
        m.actions.labels(d.action.value).inc()
        m.cycle_seconds.observe(seconds)
        m.last_cycle.set(time.time())
        m.epoch.set(epoch)
        m.leader_present.set(1 if view.leader else 0)
        m.is_leader.labels(self.me).set(1 if view.leader and view.leader.name == self.me else 0)
        m.paused.set(1 if view.control.paused else 0)
        m.paused_since.set(view.control.paused_at or 0)
        m.master_unmanaged.set(1 if d.reason.startswith(UNMANAGED) else 0)
        m.cooldown_active.set(1 if cooldown_reason(view) else 0)
        states = [view.local, *view.records.values()]
        m.masters_seen.set(sum(1 for st in states if st.cscfg_role == "master"))
        by_name = {st.name: st for st in states}
        for member in self.members:  # a member without a fresh record is not up and has no known role
            st = by_name.get(member.name)
            m.up.labels(member.name).set(1 if st is not None and st.ca_status == CA_RUNNING else 0)
            for role in ROLES:
                m.cscfg_role.labels(member.name, role).set(1 if st is not None and st.cscfg_role == role else 0)
        newest: dict[int, int] = {}
        for st in states:
            for rid, csn in st.max_csn.items():
                newest[rid] = max(newest.get(rid, 0), int(csn[:8], 16))
        for rid, t in newest.items():
            mine = view.local.max_csn.get(rid)
            lag = t - int(mine[:8], 16) if mine else float("nan")
            m.replication_lag.labels(self.me, str(rid)).set(lag)
        self.notifier.cycle(d.line())

    def report_directory(self, ds: DirectoryObservation | None) -> None:
        if ds is None or not ds.ok:
            return
        for a in ds.agreements:
            self.metrics.replication_state.labels(self.me, a.name).set(REPLICATION_STATES.get(a.state, 3))
        now = datetime.now(UTC)
        for rec in ds.crl_records:
            if rec.crl_number is not None:
                self.metrics.crl_number.labels(rec.issuing_point).set(rec.crl_number)
            if rec.this_update is not None:
                self.metrics.crl_age.labels(rec.issuing_point).set((now - rec.this_update).total_seconds())
            if rec.next_update is not None:
                self.metrics.crl_next_update.labels(rec.issuing_point).set(rec.next_update.timestamp())

    # ---- run ---------------------------------------------------------------------------------------------

    async def run_forever(self) -> None:
        step = await self._safe(self.store.get_step(self.me))
        self.unfinished_step = str(step.get("step")) if step else None
        if step:
            log.warning(
                "an earlier run stopped during %r; this cycle decides whether to resume or roll back", step.get("step")
            )
        while True:
            started = time.monotonic()
            await self.cycle()
            if self.cycles == 1:
                self.notifier.ready()
            self._wake.clear()
            remaining = max(0.0, self.policy.interval - (time.monotonic() - started))
            waits: list[Awaitable[Any]] = [asyncio.sleep(remaining), self._wake.wait()]
            if self.held_epoch is None:
                waits.append(self._watch_leader(remaining))  # wake at once when the key changes
            tasks = [asyncio.ensure_future(w) for w in waits]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in tasks:
                    t.cancel()
                for t in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t

    async def _watch_leader(self, seconds: float) -> None:
        try:
            await self.store.watch_leader(seconds)
        except StoreUnavailable:
            await asyncio.sleep(seconds)  # an unreachable store must not turn the wait into a busy loop

    def wake(self) -> None:
        """Run the next cycle now (a control call changed something)."""
        self._wake.set()

    async def _safe(self, coro: Awaitable[T]) -> T | None:
        try:
            return await self._call(coro)
        except StoreUnavailable:
            return None

    async def shutdown(self) -> None:
        self.notifier.stopping()
        if self._peer_session is not None:
            await self._peer_session.close()
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


async def _none() -> None:
    return None


async def run(settings: Settings) -> None:
    from .api import start_api

    store = open_store(settings.store, [m.name for m in settings.members], settings.timing.store_timeout)
    metrics = Metrics(settings.node.name)
    async with AgentProbe(
        settings.tls.ca_file, settings.tls.cert_file, settings.tls.key_file, settings.timing.agent_timeout
    ) as probe:
        wd = Watchdog(settings, store, probe, metrics)
        runner = await start_api(wd)
        main = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            if main is not None:
                loop.add_signal_handler(sig, main.cancel)
        try:
            await wd.run_forever()
        except asyncio.CancelledError:
            log.info("stopping")
        finally:
            await wd.shutdown()
            await runner.cleanup()
            await store.close()


def cli_main(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, check_files=True)
    setup_logging(settings.node.name)
    asyncio.run(run(settings))
    return 0
