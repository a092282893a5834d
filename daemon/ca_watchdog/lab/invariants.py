"""Safety invariants of a running lab cluster, sampled continuously (for tests and benchmarks).

Fails on: more than one CA serving as master (getStatus running and getInfo without
master_host), more than one CS.cfg master among CAs that serve, a CS.cfg that cannot be parsed
(unless expected), any CS.cfg line outside the role keys that changed, and CRL numbers in LDAP
that do not grow or are written by two CAs in turn.
"""

from __future__ import annotations

import asyncio
import calendar
import itertools
import re
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

from .. import cscfg
from ..probes.agent import INFO_PATH, parse_info_body, parse_status_body

if TYPE_CHECKING:
    from .cluster import LabCluster
    from .dslab import DSLab

_LOG_VALUE = re.compile(r"^(\d{14}\.\d{3}Z) writer=(\S+) crlNumber=(\d+)$")


@dataclass
class Sample:
    at: float
    serving: dict[str, str]  # master | clone | starting | down
    roles: dict[str, str]  # CS.cfg role


@dataclass
class InvariantChecker:
    cluster: LabCluster
    period: float = 0.1
    expect_unreadable: frozenset[str] = frozenset()
    samples: list[Sample] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _baseline: dict[str, dict[str, str]] = field(default_factory=dict)

    def start(self) -> InvariantChecker:
        for n, node in self.cluster.nodes.items():
            if n not in self.expect_unreadable:
                self._baseline[n] = cscfg.unrelated_items(cscfg.read_cscfg(node.cs_cfg))
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="invariants", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[str]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        return self.violations

    def __enter__(self) -> InvariantChecker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _violate(self, text: str) -> None:
        if len(self.violations) < 200:
            self.violations.append(f"{time.strftime('%H:%M:%S')} {text}")

    async def _run(self) -> None:
        assert self.cluster.pki is not None
        ctx = ssl.create_default_context(cafile=str(self.cluster.pki.ca_cert))
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx), timeout=timeout) as session:
            while not self._stop.is_set():
                t0 = time.monotonic()
                await self.sample(session)
                await asyncio.sleep(max(0.0, self.period - (time.monotonic() - t0)))

    async def _serving(self, session: aiohttp.ClientSession, name: str) -> str:
        base = self.cluster.nodes[name].agent_url
        try:
            async with session.get(base + "/ca/admin/ca/getStatus") as r:
                body = await r.read()
                if r.status != 200:
                    return "down"
            doc = parse_status_body(body)
            if doc.status != "running":
                return doc.status
            async with session.get(base + INFO_PATH) as r:
                info = parse_info_body(await r.read())
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError):
            return "down"
        if not info.ok:
            return "unknown"  # running, but getInfo gave no answer: neither master nor clone is proven
        return "clone" if info.master_host else "master"

    async def sample(self, session: aiohttp.ClientSession) -> Sample:
        names = list(self.cluster.nodes)
        serving = dict(zip(names, await asyncio.gather(*(self._serving(session, n) for n in names)), strict=True))
        roles: dict[str, str] = {}
        for n in names:
            try:
                cfg = cscfg.read_cscfg(self.cluster.nodes[n].cs_cfg)
            except cscfg.CSCfgError as exc:
                roles[n] = "unreadable"
                if n not in self.expect_unreadable:
                    self._violate(f"{n}: CS.cfg unreadable: {exc}")
                continue
            roles[n] = cscfg.classify(cfg).role.value
            base = self._baseline.get(n)
            items = cscfg.unrelated_items(cfg)
            if base is not None and items != base:
                self._violate(f"{n}: a CS.cfg key outside the role keys changed: {_changed_keys(base, items)}")
                self._baseline[n] = items
        masters = sorted(n for n, s in serving.items() if s == "master")
        if len(masters) > 1:
            self._violate(f"{len(masters)} CAs serving as master: {', '.join(masters)}")
        cfg_masters = sorted(n for n in names if roles.get(n) == "master" and serving[n] in ("master", "clone"))
        if len(cfg_masters) > 1:
            self._violate(f"{len(cfg_masters)} serving CAs with a master CS.cfg: {', '.join(cfg_masters)}")
        s = Sample(time.time(), serving, roles)
        self.samples.append(s)
        return s

    def first(self, predicate: Any, after: float = 0.0) -> Sample | None:
        return next((s for s in self.samples if s.at >= after and predicate(s)), None)

    def master_sequence(self, after: float = 0.0) -> list[str]:
        """The CAs seen serving as master, in order, each run of samples counted once (gaps ignored):
        ["ca1", "ca2"] is one failover, ["ca1", "ca2", "ca1"] a ping-pong."""
        out: list[str] = []
        for s in list(self.samples):
            if s.at < after:
                continue
            for name in sorted(n for n, v in s.serving.items() if v == "master"):
                if not out or out[-1] != name:
                    out.append(name)
        return out


def _changed_keys(before: dict[str, str], after: dict[str, str]) -> str:
    keys = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")


def crl_write_log(ds: DSLab, names: list[str], issuing_point: str = "MasterCRL") -> list[tuple[str, str, int]]:
    """Every (time, writer, number) the simulated CAs logged, merged over all reachable servers."""
    from .simca import LOG_ATTR

    seen: set[tuple[str, str, int]] = set()
    dn = f"cn={issuing_point},ou=crlIssuingPoints,ou=ca,{ds.suffix}"
    for n in names:
        try:
            with ds.connection(n, connect_timeout=1.0, receive_timeout=2.0) as conn:
                conn.search(dn, "(objectClass=*)", search_scope="BASE", attributes=[LOG_ATTR])
                entries = list(conn.response or [])
        except Exception:
            continue
        for entry in entries:
            for k, values in entry.get("attributes", {}).items():
                if k.lower() == LOG_ATTR.lower():
                    for v in values:
                        m = _LOG_VALUE.match(str(v))
                        if m:
                            seen.add((m.group(1), m.group(2), int(m.group(3))))
    return sorted(seen)


def crl_violations(log: list[tuple[str, str, int]], active_gap: float = 3.0) -> list[str]:
    """CRL numbers must grow with time, and two CAs must never write in the same period.

    A master writes every `crl_interval` seconds, so two writes of one CA less than `active_gap`
    apart mean it was master all that time; a write of another CA between them is a split brain.
    (A, then B, then A again after a second failover is fine.)
    """
    out: list[str] = []
    for (t1, w1, n1), (t2, w2, n2) in itertools.pairwise(log):
        if n2 <= n1:
            out.append(f"CRL number did not grow: {w1} wrote {n1} at {t1}, then {w2} wrote {n2} at {t2}")
    last: dict[str, tuple[float, str]] = {}
    for i, (stamp, writer, _) in enumerate(log):
        t = _stamp_seconds(stamp)
        prev = last.get(writer)
        if prev is not None and t - prev[0] < active_gap:
            between = {w for st, w, _ in log[:i] if st > prev[1] and w != writer}
            if between:
                out.append(
                    f"CRL writers interleave: {', '.join(sorted(between))} wrote while {writer} was master "
                    f"({prev[1]} .. {stamp})"
                )
        last[writer] = (t, stamp)
    return out


def _stamp_seconds(stamp: str) -> float:
    return calendar.timegm(time.strptime(stamp[:14], "%Y%m%d%H%M%S")) + int(stamp[15:18]) / 1000
