"""The HA cycle, thin: observe, publish and read the store, build the view, decide, act, report.

Each step is its own module: observe.py (probes -> this node's MemberState), view.py (store facts +
observation -> ClusterView, pure), decide.py (the policy, pure), actuator.py (the lease and every action
on the local CA, pre-emptible), report.py (log line, metrics, sd_notify). An exception inside a cycle is
logged with its traceback, counted, and the next cycle runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import ssl
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import aiohttp

from .actuator import Actuator
from .config import Settings, load_settings
from .decide import decide
from .metrics import Metrics
from .model import CA_RUNNING, ClusterView, ControlView, Decision, MemberConfig, MemberState, Policy
from .node import LocalCA
from .observe import Observation, Observer
from .probes.agent import AgentProbe
from .report import Reporter
from .service import service_for
from .store import open_store
from .store.base import LeaderRecord, Store, StoreState, StoreUnavailable
from .systemd import Notifier, setup_logging
from .view import RecordClock, build_view, decode_records

log = logging.getLogger("ca_watchdog")
T = TypeVar("T")
PEER_ANSWER_LIMIT = 4096  # bytes of a peer's /failsafe answer that are read at all


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


def failsafe_ack(raw: bytes, me: str, epoch: int) -> bool:
    """A peer's /failsafe answer: it follows me at my epoch and cannot reach the store. Anything else,
    malformed included, is no acknowledgement."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return False
    if not isinstance(body, dict):
        return False
    ep = body.get("epoch")
    return (
        body.get("leader") == me
        and isinstance(ep, int)
        and not isinstance(ep, bool)
        and ep == epoch
        and body.get("store_ok") is False
    )


class Watchdog:
    def __init__(
        self, settings: Settings, store: Store, probe: AgentProbe, metrics: Metrics, notifier: Notifier | None = None
    ) -> None:
        self.s = settings
        self.me = settings.node.name
        self.store = store
        self.probe = probe
        self.metrics = metrics
        self.notifier = notifier or Notifier()
        self.policy = policy_of(settings)
        self.members = member_configs(settings)
        self.ca = LocalCA(settings, service_for(settings.node), probe)
        self.observer = Observer(settings, self.ca, probe, metrics, settings.ldap_password() or "", wake=self.wake)
        self.actuator = Actuator(
            settings, store, self.ca, metrics, self.policy, on_start_issued=self.observer.started_ca, wake=self.wake
        )
        self.reporter = Reporter(self.me, self.members, metrics, self.notifier)
        self.clock = RecordClock()
        self.snapshot = Snapshot()
        self.store_ok = True
        self.last_leader_seen: tuple[str, int] | None = None
        self.previous_leader: str | None = None  # the epoch record's holder: whom to watch with no key held
        self.last_flags: ControlView | None = None
        self.last_local: MemberState | None = None
        self.leaderless_since: float | None = None
        self.published_crl: tuple[str, ...] | None = None
        self.cycles = 0
        self._errors_logged: set[str] = set()
        self._peer_session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()

    @property
    def held_epoch(self) -> int | None:
        return self.actuator.held_epoch

    # ---- the cycle -----------------------------------------------------------------------------------

    async def _call(self, coro: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(coro, self.s.timing.store_timeout + 0.5)
        except TimeoutError as exc:
            raise StoreUnavailable(f"store did not answer within {self.s.timing.store_timeout:g}s") from exc

    async def cycle(self) -> Decision:
        t0 = time.monotonic()
        now = time.time()
        if self.actuator.fence_overdue():
            # one renewal first: the store may be back (a failsafe outage ends), and a renewed lease is
            # the only proof that counts; this costs at most one store timeout of the cycle budget
            with contextlib.suppress(StoreUnavailable):
                await self.actuator.renew()
        if self.actuator.fence_overdue() and self.last_local is not None:
            # renewals have failed up to the fence point (or this process was frozen): decide before probing,
            # with only the peers' failsafe answers (which may keep the role through a store outage)
            held = self.actuator.held_epoch
            overdue_acks = await self._failsafe_acks(held) if held is not None else ()
            view = self._view(now, self.last_local, None, "lease overdue: renewals failed", {}, {}, (), overdue_acks)
            return await self._decide_and_act(view, t0)
        watched = self.last_leader_seen[0] if self.last_leader_seen else self.previous_leader
        # getInfo (master or clone?) only matters once the key is free: skip that TLS handshake otherwise
        obs = await self.observer.observe(watched if watched != self.me else None, self.last_leader_seen is None)
        self.reporter.directory(obs.directory)
        if obs.ca.status == CA_RUNNING:
            self.actuator.ca_running()
        local = self.observer.local_state(obs, now, self.actuator.facts(0.0).busy)
        self.last_local = local
        read_started = time.monotonic()
        state: StoreState | None = None
        error: str | None = None
        try:
            await self._call(self.store.put_member(self.me, local.to_payload(), member_ttl(self.s)))
            state = await self._call(self.store.read_state())
        except StoreUnavailable as exc:
            error = f"store unreachable: {exc}"
        self.store_ok = state is not None
        self.metrics.store_up.set(1 if state is not None else 0)
        records: dict[str, MemberState] = {}
        problems: list[str] = []
        acks: tuple[str, ...] = ()
        if state is not None:
            records, problems = decode_records(state, self.members)
            self.actuator.observe_leader(state.leader, read_started)
            leader = state.leader
            self.last_leader_seen = (leader.name, leader.epoch) if leader else None
            self.previous_leader = state.epoch.name if state.epoch else None
            mono = time.monotonic()
            self.leaderless_since = (self.leaderless_since or mono) if leader is None else None
            await self._publish_crl(leader, obs)
            await self._refresh_history()
        elif self.actuator.held_epoch is not None:
            acks = await self._failsafe_acks(self.actuator.held_epoch)
        self.observer.learn_replica_ids(records)
        view = self._view(now, local, state, error, records, self.clock.ages(records), tuple(problems), acks)
        if state is not None:
            self.last_flags = view.control
        return await self._decide_and_act(view, t0)

    def _view(
        self,
        now: float,
        local: MemberState,
        state: StoreState | None,
        error: str | None,
        records: dict[str, MemberState],
        ages: dict[str, float],
        problems: tuple[str, ...],
        acks: tuple[str, ...] = (),
    ) -> ClusterView:
        leaderless = time.monotonic() - self.leaderless_since if self.leaderless_since is not None else 0.0
        return build_view(
            me=self.me,
            now=now,
            policy=self.policy,
            members=self.members,
            local=local,
            state=state,
            store_error=error,
            records=records,
            record_ages=ages,
            facts=self.actuator.facts(leaderless),
            known_replica_ids=self.observer.known_rids,
            last_flags=self.last_flags,
            problems=problems,
            failsafe_acks=acks,
        )

    async def _decide_and_act(self, view: ClusterView, t0: float) -> Decision:
        decision = decide(view)
        try:
            await self.actuator.apply(decision, view)
        except StoreUnavailable as exc:
            decision = replace(decision, reason=f"{decision.reason} (store: {exc})")
        epoch = self.actuator.held_epoch or (view.leader.epoch if view.leader else 0)
        self.reporter.report(view, decision, time.monotonic() - t0, epoch)
        self.snapshot.view, self.snapshot.decision, self.snapshot.at = view, decision, time.time()
        self.cycles += 1
        return decision

    async def _publish_crl(self, leader: LeaderRecord | None, obs: Observation) -> None:
        if leader is None or leader.name != self.me or obs.cscfg is None or obs.cscfg_role != "master":
            return
        lines = tuple(obs.cscfg.crl_lines())
        if lines == self.published_crl:
            return
        try:
            current = await self._call(self.store.get_crl_block())
            changed = current is None or current.lines != lines or current.epoch != leader.epoch
            if changed and await self._call(self.store.put_crl_block(self.me, leader.epoch, lines)):
                log.info("published the ca.crl. block (%d lines, epoch %d)", len(lines), leader.epoch)
            self.published_crl = lines
        except StoreUnavailable as exc:
            log.warning("could not publish the ca.crl. block: %s", exc)

    async def _refresh_history(self) -> None:
        """For /history while the store is unreachable; no decision reads it."""
        if self.cycles % 15:
            return
        with contextlib.suppress(StoreUnavailable):
            events = await self._call(self.store.get_history(50))
            self.snapshot.history = [{"seq": e.seq, "at": e.at, **e.event} for e in events]

    async def _failsafe_acks(self, epoch: int) -> tuple[str, ...]:
        """Peers that, over the peer API, still follow me (same epoch) and cannot reach the store."""
        peers = [m for m in self.s.members if m.name != self.me and m.api_url]
        if not peers:
            return ()
        session = self._peers()

        async def ask(url: str, name: str) -> str | None:
            try:
                async with session.get(url.rstrip("/") + "/failsafe") as r:
                    raw = await r.content.read(PEER_ANSWER_LIMIT) if r.status == 200 else b""
            except (aiohttp.ClientError, TimeoutError, ValueError):
                return None
            return name if failsafe_ack(raw, self.me, epoch) else None

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

    # ---- run ---------------------------------------------------------------------------------------------

    def _cycle_failed(self, exc: Exception) -> None:
        """A cycle that raised: logged (with the traceback the first time), counted; the loop goes on."""
        self.metrics.cycle_errors.inc()
        key = f"{type(exc).__name__}: {exc}"[:200]
        if key in self._errors_logged:
            log.error("cycle failed again: %s", key)
        else:
            if len(self._errors_logged) < 100:
                self._errors_logged.add(key)
            log.exception("cycle failed: %s", key)
        self.notifier.cycle(f"cycle failed: {key}")

    async def run_forever(self) -> None:
        await self.actuator.load_journal()
        self.actuator.start_renewer()
        while True:
            started = time.monotonic()
            self._wake.clear()  # a wake while the cycle runs (a probe answer it missed) runs the next one at once
            try:
                await self.cycle()
            except Exception as exc:
                self._cycle_failed(exc)
            if self.cycles == 1:
                self.notifier.ready()
            remaining = max(0.0, self.policy.interval - (time.monotonic() - started))
            waits: list[Awaitable[Any]] = [asyncio.sleep(remaining), self._wake.wait()]
            if self.actuator.held_epoch is None:
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
        """Run the next cycle now (a control call or the renewer changed something)."""
        self._wake.set()

    async def shutdown(self) -> None:
        self.notifier.stopping()
        self.observer.close()
        await self.actuator.stop()
        if self._peer_session is not None:
            await self._peer_session.close()


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
