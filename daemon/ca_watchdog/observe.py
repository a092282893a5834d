"""Observe this node: its CA (can it serve?), its CS.cfg, its 389-DS, and the current master as a client
sees it. Probes run concurrently, each with its own timeout; the CS.cfg read runs off the event loop.
The result is this node's MemberState for the cycle (what it publishes and what decide() reads)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from . import cscfg
from .config import Settings
from .metrics import REPLICATION_STATES, Metrics
from .model import CA_DOWN, CA_RUNNING, CA_STARTING, ROLE_UNREADABLE, MemberState
from .node import LocalCA
from .probes.agent import AgentProbe, AgentStatus
from .probes.directory import DirectoryObservation, probe_directory

CSCFG_READ_TIMEOUT = 5.0  # a read that takes longer (a FIFO, a hung file system) counts as unreadable


@dataclass(frozen=True)
class Observation:
    ca: AgentStatus
    directory: DirectoryObservation | None
    cscfg: cscfg.CSCfg | None
    cscfg_role: str
    cscfg_problem: str | None
    cscfg_master_duty: bool
    watched: str | None
    watched_status: AgentStatus | None
    watched_role: str | None


async def _none() -> None:
    return None


def master_duty(report: cscfg.RoleReport) -> bool:
    """Would a CA with this CS.cfg generate CRLs on some issuing point or run the status task?"""
    generating = any(p.enable and p.crl_cache and p.crl_updates for p in report.issuing_points)
    return generating or bool(report.status_update_interval)


class Observer:
    """Probes, plus the counters that need the previous cycles (down streaks, start in progress)."""

    def __init__(
        self, settings: Settings, ca: LocalCA, probe: AgentProbe, metrics: Metrics, ldap_password: str
    ) -> None:
        self.s = settings
        self.me = settings.node.name
        self.ca = ca
        self.probe = probe
        self.metrics = metrics
        self.ldap_password = ldap_password
        self.ca_down_streak = 0
        self.ca_starting_since: float | None = None
        self.watched_down_streak = 0
        self.watched_name: str | None = None
        self.known_rids: dict[str, int] = {}
        self._cscfg_cache: tuple[tuple[int, ...], tuple[cscfg.CSCfg | None, str, str | None, bool]] | None = None

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
        directory: Awaitable[DirectoryObservation | None]
        if self.s.me.ldap_url:
            directory = probe_directory(
                self.s.me.ldap_url,
                self.s.node.ldap_bind_dn,
                self.ldap_password,
                timeout=self.s.timing.ldap_timeout,
                ca_file=self.s.tls.ca_file,
                starttls=self.s.me.ldap_starttls,
            )
        else:
            directory = _none()
        watched_probe = self._watch(self.s.member(watched).agent_url, tell_role) if watched else _none()
        ca, ds, watched_result, (cfg, role, problem, duty) = await asyncio.gather(
            self.ca.status(), directory, watched_probe, self._read_cscfg()
        )
        w, w_role = watched_result if watched_result is not None else (None, None)
        self.metrics.probe_latency.labels("agent").observe(ca.latency)
        if ds is not None:
            self.metrics.probe_latency.labels("ldap").observe(ds.latency)
        return Observation(ca, ds, cfg, role, problem, duty, watched, w, w_role)

    async def _watch(self, url: str, tell_role: bool) -> tuple[AgentStatus, str | None]:
        """The current master as a client sees it: getStatus, and getInfo to tell master from clone."""
        st = await self.probe.status(url)
        if st.status != CA_RUNNING or not tell_role:
            return st, None
        info = await self.probe.info(url)
        return st, (("clone" if info.master_host else "master") if info.ok else None)

    def started_ca(self) -> None:
        """A start was just issued: count failed probes afresh (no burst of starts while it boots)."""
        self.ca_down_streak = 0

    def local_state(self, obs: Observation, now: float, busy: str | None) -> MemberState:
        mono = time.monotonic()
        status: str = obs.ca.status
        if status == CA_STARTING:
            self.ca_starting_since = self.ca_starting_since or mono
            if mono - self.ca_starting_since > self.s.timing.start_timeout:
                status = CA_DOWN  # "starting" for longer than a start may take is a failure
        else:
            self.ca_starting_since = None
        self.ca_down_streak = self.ca_down_streak + 1 if status == CA_DOWN else 0
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
