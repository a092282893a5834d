"""Observe this node: its CA (can it serve?), its CS.cfg, its 389-DS, and the current master as a client
sees it. The result is this node's MemberState for the cycle (what it publishes and what decide() reads).

The network probes run on their own cadence (`Cadence`), not inside the cycle: one is started every
`interval` whatever the earlier ones are doing, and the cycle takes the answers that arrived since the last
one. A probe of a frozen CA (the kernel accepts the connection, nothing answers) waits for its whole timeout;
inside the cycle that stretched every cycle to the timeout, so `failure_threshold` failed probes took
threshold x max(interval, timeout): 9 s instead of 6 s at the defaults (interval 2 s, agent_timeout 3 s).
On a cadence they overlap: the last of them is started (threshold - 1) intervals after the first and fails one
timeout later. Answering "failed" before the timeout instead would count a slow but healthy CA as down.
A failed answer wakes the cycle at once, so a kill is still counted as soon as the probe sees it.
The CS.cfg read stays in the cycle (a local file, cached; off the event loop with its own timeout).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

from . import cscfg
from .config import Settings
from .metrics import REPLICATION_STATES, Metrics
from .model import CA_DOWN, CA_RUNNING, CA_STARTING, ROLE_UNREADABLE, MemberState
from .node import LocalCA
from .probes.agent import AgentProbe, AgentStatus
from .probes.directory import DirectoryObservation, probe_directory

CSCFG_READ_TIMEOUT = 5.0  # a read that takes longer (a FIFO, a hung file system) counts as unreadable
T = TypeVar("T")


@dataclass(frozen=True)
class Observation:
    ca: AgentStatus  # the latest answer
    ca_answers: tuple[AgentStatus, ...]  # every answer since the last cycle, oldest first (may be empty)
    directory: DirectoryObservation | None
    cscfg: cscfg.CSCfg | None
    cscfg_role: str
    cscfg_problem: str | None
    cscfg_master_duty: bool
    watched: str | None
    watched_status: AgentStatus | None
    watched_role: str | None
    watched_answers: tuple[AgentStatus, ...] = ()


async def _none() -> None:
    return None


def master_duty(report: cscfg.RoleReport) -> bool:
    """Would a CA with this CS.cfg generate CRLs on some issuing point or run the status task?"""
    generating = any(p.enable and p.crl_cache and p.crl_updates for p in report.issuing_points)
    return generating or bool(report.status_update_interval)


class Cadence(Generic[T]):
    """One probe, started every `interval` on its own task whatever the earlier ones are doing.

    Probes that wait for their timeout overlap (at most `max_pending` at once) instead of delaying the next
    one. Answers are taken in start order; an answer supersedes (cancels) the older probes still waiting, as
    they would only report on an earlier moment. `aim` points it at another target: the old target's
    answers and waiting probes are dropped and a probe starts at once.
    """

    def __init__(self, interval: float, max_pending: int, on_answer: Callable[[T], None] = lambda _a: None) -> None:
        self.interval = interval
        self.max_pending = max(1, max_pending)
        self.on_answer = on_answer
        self.key: Hashable | None = None
        self._probe: Callable[[], Awaitable[T]] | None = None
        self._pending: list[asyncio.Task[None]] = []  # oldest first
        self._new: list[T] = []
        self._latest: T | None = None
        self._have = False  # an answer arrived since the last aim/reset (T may be None)
        self._failure: Exception | None = None  # a probe that raised: the next `answers()` raises it
        self._arrived = asyncio.Event()
        self._ticker: asyncio.Task[None] | None = None

    @property
    def latest(self) -> T | None:
        return self._latest

    def aim(self, key: Hashable, probe: Callable[[], Awaitable[T]]) -> None:
        if key == self.key and self._ticker is not None:
            return
        self.key, self._probe = key, probe
        self.reset()
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick(), name="ca-watchdog probe cadence")

    def reset(self) -> None:
        """Forget every answer and waiting probe, and probe again now (the next `answers()` waits for it)."""
        for task in self._pending:
            task.cancel()
        self._pending.clear()
        self._new.clear()
        self._latest, self._have, self._failure = None, False, None
        self._arrived.clear()
        if self._probe is not None:
            self._launch()

    def close(self) -> None:
        for task in (*self._pending, *([self._ticker] if self._ticker else [])):
            task.cancel()
        self._pending.clear()
        self._ticker, self.key, self._probe = None, None, None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if len(self._pending) < self.max_pending:
                self._launch()

    def _launch(self) -> None:
        assert self._probe is not None
        task = asyncio.create_task(self._one(self._probe))
        self._pending.append(task)

    async def _one(self, probe: Callable[[], Awaitable[T]]) -> None:
        me = asyncio.current_task()
        try:
            answer = await probe()
        except Exception as exc:  # a bug, not a failed probe (those are answers): the cycle reports it
            if me in self._pending:
                self._pending.remove(me)
                self._failure = exc
                self._arrived.set()
            return
        if me not in self._pending:
            return  # dropped by a reset while it ran
        # cancel only after leaving the list: a probe cancels no one while the older ones are still listed
        older = self._pending[: self._pending.index(me)]
        del self._pending[: len(older) + 1]
        for task in older:
            task.cancel()
        self._new.append(answer)
        self._latest, self._have = answer, True
        self._arrived.set()
        self.on_answer(answer)

    async def answers(self) -> list[T]:
        """The answers since the last call, oldest first; waits for one if none came since the last reset."""
        if not self._have:
            await self._arrived.wait()
        if self._failure is not None:
            exc, self._failure = self._failure, None
            if not self._have:
                self._arrived.clear()
            raise exc
        new, self._new = self._new, []
        return new


class Observer:
    """Probes on their cadences, plus the counters that need the previous answers (down streaks, start in
    progress)."""

    def __init__(
        self,
        settings: Settings,
        ca: LocalCA,
        probe: AgentProbe,
        metrics: Metrics,
        ldap_password: str,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.s = settings
        self.me = settings.node.name
        self.ca = ca
        self.probe = probe
        self.metrics = metrics
        self.ldap_password = ldap_password
        self.wake = wake
        self.ca_down_streak = 0
        self.ca_status: str = CA_DOWN
        self.ca_starting_since: float | None = None
        self.watched_down_streak = 0
        self.watched_name: str | None = None
        self.tell_role = False
        self.known_rids: dict[str, int] = {}
        self._cscfg_cache: tuple[tuple[int, ...], tuple[cscfg.CSCfg | None, str, str | None, bool]] | None = None
        t = settings.timing
        # an agent probe is two requests at most (getStatus, then the database read or getInfo), each bounded
        # by the timeout plus AgentProbe's one-second backstop
        agent_pending = math.ceil(2 * (t.agent_timeout + 1.0) / t.interval) + 1
        self.local: Cadence[AgentStatus] = Cadence(t.interval, agent_pending, self._waker())
        self.watched: Cadence[tuple[AgentStatus, str | None]] = Cadence(
            t.interval, agent_pending, self._waker(lambda a: a[0])
        )
        # one directory probe at a time: each holds a thread until its own receive timeouts end it
        self.directory: Cadence[DirectoryObservation | None] = Cadence(t.interval, 1)

    def _waker(self, status_of: Callable[[Any], AgentStatus] = lambda a: a) -> Callable[[Any], None]:
        """Wake the cycle on an answer that moves a decision: a change of status, or a failure while the
        consecutive failures are still counting up to the threshold (not every one of a long outage)."""
        last: str | None = None
        fails = 0

        def on_answer(answer: Any) -> None:
            nonlocal last, fails
            status = status_of(answer).status
            fails = fails + 1 if status == CA_DOWN else 0
            changed, last = status != last, status
            if changed or 0 < fails <= self.s.timing.failure_threshold:
                self.wake()

        return on_answer

    def _identity(self) -> tuple[int, ...] | None:
        """The file's identity without following a link: any replacement or write changes it."""
        try:
            st = os.stat(self.s.node.cs_cfg, follow_symlinks=False)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)

    async def _read_cscfg(self) -> tuple[cscfg.CSCfg | None, str, str | None, bool]:
        ident = self._identity()
        if ident is not None and self._cscfg_cache is not None and self._cscfg_cache[0] == ident:
            return self._cscfg_cache[1]  # unchanged since the last (safe) read: parse it once, not every cycle
        try:
            cfg = await asyncio.wait_for(asyncio.to_thread(cscfg.read_cscfg, self.s.node.cs_cfg), CSCFG_READ_TIMEOUT)
        except TimeoutError:
            return None, ROLE_UNREADABLE, f"{self.s.node.cs_cfg}: not read within {CSCFG_READ_TIMEOUT:g}s", False
        except cscfg.CSCfgError as exc:
            self._cscfg_cache = None
            return None, ROLE_UNREADABLE, str(exc), False
        report = cscfg.classify(cfg)
        result = (cfg, report.role.value, "; ".join(report.problems) or None, master_duty(report))
        self._cscfg_cache = (ident, result) if ident is not None and ident == self._identity() else None
        return result

    async def observe(self, watched: str | None, tell_role: bool) -> Observation:
        self.local.aim("local", self.ca.status)
        if self.s.me.ldap_url:
            self.directory.aim("directory", self._probe_directory)
        self.tell_role = tell_role  # read by the next watched probe: no new target, no lost answers
        if watched:
            self.watched.aim(watched, self._watch_probe(self.s.member(watched).agent_url))
        else:
            self.watched.close()
        local, watched_answers, ds_answers, (cfg, role, problem, duty) = await asyncio.gather(
            self.local.answers(),
            self.watched.answers() if watched else _none(),
            self.directory.answers() if self.s.me.ldap_url else _none(),
            self._read_cscfg(),
        )
        for st in local:
            self.metrics.probe_latency.labels("agent").observe(st.latency)
        for d in ds_answers or ():
            if d is not None:
                self.metrics.probe_latency.labels("ldap").observe(d.latency)
        ds = self.directory.latest
        ca = self.local.latest
        assert ca is not None
        w, w_role = self.watched.latest if watched and self.watched.latest is not None else (None, None)
        return Observation(
            ca,
            tuple(local),
            ds if self.s.me.ldap_url else None,
            cfg,
            role,
            problem,
            duty,
            watched,
            w,
            w_role,
            tuple(a[0] for a in watched_answers or ()),
        )

    async def _probe_directory(self) -> DirectoryObservation | None:
        assert self.s.me.ldap_url
        return await probe_directory(
            self.s.me.ldap_url,
            self.s.node.ldap_bind_dn,
            self.ldap_password,
            timeout=self.s.timing.ldap_timeout,
            ca_file=self.s.tls.ca_file,
            starttls=self.s.me.ldap_starttls,
        )

    def _watch_probe(self, url: str) -> Callable[[], Awaitable[tuple[AgentStatus, str | None]]]:
        async def watch() -> tuple[AgentStatus, str | None]:
            """The current master as a client sees it: getStatus, and getInfo to tell master from clone."""
            st = await self.probe.status(url)
            if st.status != CA_RUNNING or not self.tell_role:
                return st, None
            info = await self.probe.info(url)
            return st, (("clone" if info.master_host else "master") if info.ok else None)

        return watch

    def started_ca(self) -> None:
        """A start was just issued: count failed probes afresh (no burst of starts while it boots), from
        probes started after it."""
        self.ca_down_streak = 0
        self.local.reset()

    def close(self) -> None:
        for cadence in (self.local, self.watched, self.directory):
            cadence.close()

    def _classify(self, st: AgentStatus, mono: float) -> str:
        if st.status != CA_STARTING:
            self.ca_starting_since = None
            return st.status
        self.ca_starting_since = self.ca_starting_since or mono
        # "starting" for longer than a start may take is a failure
        return CA_DOWN if mono - self.ca_starting_since > self.s.timing.start_timeout else CA_STARTING

    def local_state(self, obs: Observation, now: float, busy: str | None) -> MemberState:
        mono = time.monotonic()
        # the streaks count failed probes, as many as answered since the last cycle (none while one waits)
        for st in obs.ca_answers:
            self.ca_status = self._classify(st, mono)
            self.ca_down_streak = self.ca_down_streak + 1 if self.ca_status == CA_DOWN else 0
        status = self.ca_status
        if obs.watched != self.watched_name:
            self.watched_name, self.watched_down_streak = obs.watched, 0
        for wst in obs.watched_answers:
            self.watched_down_streak = self.watched_down_streak + 1 if wst.status == CA_DOWN else 0
        ws = obs.watched_status
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
        if ds is not None and ds.replica_id is not None:
            self.known_rids[self.me] = ds.replica_id
        return MemberState(
            name=self.me,
            updated_at=now,
            ca_status=status,
            ca_reason=obs.ca.reason,
            ca_down_streak=self.ca_down_streak,
            cscfg_role=obs.cscfg_role,
            cscfg_problem=obs.cscfg_problem,
            cscfg_master_duty=obs.cscfg_master_duty,
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
            busy=busy,
        )

    def learn_replica_ids(self, records: dict[str, MemberState] | Any) -> None:
        for name, st in records.items():
            if st.replica_id is not None:
                self.known_rids[name] = st.replica_id

    def _consumer_name(self, host: str | None, port: int | None) -> str:
        """The member whose directory an agreement feeds (by its configured ldap_url), else host:port."""
        for m in self.s.members:
            if m.ldap_url:
                u = urlsplit(m.ldap_url)
                if u.hostname == host and (u.port or (636 if u.scheme == "ldaps" else 389)) == port:
                    return m.name
        return f"{host}:{port}"
