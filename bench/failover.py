"""Failover-time and overhead benchmark of ca-watchdog on the local lab (bench/README.md).

    python bench/failover.py --runs 5 --out bench/results/NAME.json [--parts kill,freeze,host,slow,flap,idle,cycle]
                             [--ds] [--base-port 21000] [--ds-prefix cwbench --ds-base-port 38300]

Every fault run builds a fresh 3-node LabCluster (simulated CAs over TLS + one `ca-watchdog run`
per node, SQLite store, optionally a real replicated 389-DS per node), waits for a steady state
(ca1 master and leader, every member record fresh), injects the fault at a random phase of the
cycle, and measures:

* from the daemons' own history in the store: detection, decision and restart time;
* from outside: an InvariantChecker polls every CA's getStatus + getInfo every 100 ms, which gives
  the first moment another CA serves `running` as master, and checks the safety invariants.

It prints a markdown table and writes everything (every run, the machine, the settings) as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import random
import re
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ca_watchdog.config import TimingSettings
from ca_watchdog.lab.cluster import LAB_TIMING, LabCluster, LabNode, wait_until
from ca_watchdog.lab.dslab import NS_SLAPD, DSLab
from ca_watchdog.lab.invariants import InvariantChecker
from ca_watchdog.loop import member_ttl
from ca_watchdog.model import MemberState
from ca_watchdog.store import open_store

FAULTS = ("kill", "freeze", "host", "slow", "flap")
PARTS = (*FAULTS, "idle", "cycle")
FAULT_TITLES = {
    "kill": "master CA killed (SIGKILL)",
    "freeze": "master CA frozen (SIGSTOP)",
    "host": "master host dead (daemon + CA{ds} killed)",
    "slow": "slow getStatus answers ({delay:g} s < {timeout:g} s timeout)",
    "flap": "flapping master CA (down {down:g} s / up {up:g} s for {seconds:g} s)",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the lab cluster, with the hooks the benchmark needs ------------------------------------------


class BenchCluster(LabCluster):
    """LabCluster with per-node getStatus delay, and ports that do not overlap for >20 members.

    (LabCluster gives agent ports base+i and API ports base+20+i: with more than 20 members they
    collide. Here agent ports are base+i and API ports base+N+i.)
    """

    def __init__(self, *args: Any, status_delay: dict[str, float] | None = None, **kw: Any) -> None:
        self.status_delay = dict(status_delay or {})
        super().__init__(*args, **kw)

    def __post_init__(self) -> None:
        super().__post_init__()
        n = len(self.names)
        for i, name in enumerate(self.names):
            self.nodes[name] = LabNode(name, self.base_port + i, self.base_port + n + i, self.root / name)

    def _ca_argv(self, node: LabNode) -> list[str]:
        argv = super()._ca_argv(node)
        delay = self.status_delay.get(node.name, 0.0)
        if delay > 0:
            argv += ["--status-delay", str(delay)]
        return argv

    # -- the store, read directly (cheaper than `ca-watchdog status` subprocesses) --

    def _store(self) -> Any:
        s = self.settings(self.names[0])
        return open_store(s.store, list(self.names), s.timing.store_timeout)

    async def _astate(self) -> tuple[Any, Any, list[Any]]:
        store = self._store()
        try:
            leader = await store.get_leader()
            members = await store.get_members()
            history = await store.get_history(200)
            return leader, members, history
        finally:
            await store.close()

    def state(self) -> tuple[str | None, dict[str, dict[str, Any]], list[dict[str, Any]]]:
        """(leader name, fresh member payloads, history events with `at` and `seq`)."""
        try:
            leader, members, history = asyncio.run(self._astate())
        except Exception as exc:  # store busy: treat as unknown, the caller polls again
            log(f"store read failed: {exc}")
            return None, {}, []
        recs = {n: dict(r.payload) for n, r in members.records.items()}
        events = [{"seq": e.seq, "at": e.at, **e.event} for e in history]
        return (leader.name if leader else None), recs, events


def daemon_pid(c: LabCluster, name: str) -> int:
    return c.daemons[name].pid


class Poller:
    """Every CA polled on its own (getStatus, then getInfo when running) every `period` s.

    One task per CA, so a frozen CA (whose requests hang until the timeout) does not slow the
    view of the others, as one combined sample would. Records each change of a CA's state.
    """

    def __init__(self, c: LabCluster, period: float = 0.1, timeout: float = 1.0) -> None:
        self.c, self.period, self.timeout = c, period, timeout
        self.changes: list[tuple[float, str, str]] = []  # (time, CA, new state)
        self.polls = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Poller:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="poller", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    async def _run(self) -> None:
        import aiohttp

        assert self.c.pki is not None
        ctx = ssl.create_default_context(cafile=str(self.c.pki.ca_cert))
        # InvariantChecker._serving is exactly the outside view we want (getStatus + getInfo)
        probe = InvariantChecker(self.c)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx), timeout=aiohttp.ClientTimeout(total=self.timeout)
        ) as session:

            async def one(name: str) -> None:
                last = None
                while not self._stop.is_set():
                    t0 = time.monotonic()
                    state = await probe._serving(session, name)
                    self.polls += 1
                    if state != last:
                        self.changes.append((time.time(), name, state))
                        last = state
                    await asyncio.sleep(max(0.0, self.period - (time.monotonic() - t0)))

            await asyncio.gather(*(one(n) for n in self.c.names))

    def first(self, name: str, state: str, after: float) -> float | None:
        """When `name` was first seen in `state` at or after `after` (also if it already was then)."""
        current: str | None = None
        for at, n, st in list(self.changes):
            if n != name:
                continue
            if at >= after and st == state:
                return at if current != state else after
            current = st
        return None

    def master_sequence(self, after: float) -> list[str]:
        """The CAs seen serving as master from `after` on (starting with the one serving then),
        each run counted once: ["ca1", "ca2"] is one failover, ["ca1", "ca2", "ca1"] a ping-pong."""
        masters: set[str] = set()
        seq: list[str] | None = None
        for at, n, st in list(self.changes):
            if at >= after and seq is None:
                seq = sorted(masters)
            if st == "master":
                masters.add(n)
            else:
                masters.discard(n)
            if seq is not None:
                for m in sorted(masters):
                    if not seq or seq[-1] != m:
                        seq.append(m)
        return seq if seq is not None else sorted(masters)


class StoreWatch:
    """The store read every `period` s on its own thread: each lease renewal the store recorded (the
    leader record's `renewed_at`, the store's own clock) and each member's published `ca_down_streak`.

    Renewals come every `interval` (1 s in the lab), so a 0.1 s poll sees every one of them; a missed one
    could only make a measured gap longer, never shorter.
    """

    def __init__(self, c: BenchCluster, period: float = 0.1) -> None:
        self.c, self.period = c, period
        self.started = time.time()
        self.leases: list[tuple[str, int, float, float]] = []  # (holder, epoch, acquired_at, renewed_at)
        self.streaks: list[tuple[float, str, int]] = []  # (seen at, member, ca_down_streak) on each change
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="store-watch", daemon=True)

    def start(self) -> StoreWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    async def _run(self) -> None:
        store = self.c._store()
        last: dict[str, int] = {}
        try:
            while not self._stop.is_set():
                t0 = time.monotonic()
                with contextlib.suppress(Exception):  # a busy store: the next poll reads it
                    leader = await store.get_leader()
                    if leader is not None:
                        rec = (leader.name, leader.epoch, leader.acquired_at, leader.renewed_at)
                        if not self.leases or self.leases[-1] != rec:
                            self.leases.append(rec)
                    for name, m in (await store.get_members()).records.items():
                        streak = int(m.payload.get("ca_down_streak") or 0)
                        if last.get(name) != streak:
                            self.streaks.append((time.time(), name, streak))
                            last[name] = streak
                await asyncio.sleep(max(0.0, self.period - (time.monotonic() - t0)))
        finally:
            await store.close()

    def renewal_gaps(self) -> list[float]:
        """Gaps between two successful renewals of one lease (an acquisition seen here counts as the first)."""
        stamps: dict[tuple[str, int], set[float]] = {}
        for name, epoch, acquired, renewed in self.leases:
            got = stamps.setdefault((name, epoch), set())
            got.add(renewed)
            if acquired >= self.started:
                got.add(acquired)
        gaps: list[float] = []
        for got in stamps.values():
            ordered = sorted(got)
            gaps += [b - a for a, b in itertools.pairwise(ordered)]
        return gaps

    def declared(self, name: str, threshold: int, after: float) -> float | None:
        """When `name`'s record first showed `threshold` failed probes at or after `after`."""
        return next((at for at, n, k in self.streaks if n == name and k >= threshold and at >= after), None)


# ---- helpers ------------------------------------------------------------------------------------------


class Ports:
    """LabCluster base ports inside [lo, hi], one fresh block per cluster."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi, self.next = lo, hi, lo

    def take(self, members: int) -> int:
        size = ((2 * members + 9) // 10) * 10
        if self.next + size - 1 > self.hi:
            self.next = self.lo
        base = self.next
        self.next += size
        return base


def sweep(root: Path) -> list[str]:
    """Terminate processes this benchmark started under `root` that LabCluster.stop() missed
    (a CA started twice at once leaves one not in its pidfile); returns their command lines."""
    found = []
    me = os.getpid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(root) + "/" in cmd:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(d.name), signal.SIGCONT)
                os.kill(int(d.name), signal.SIGTERM)
            found.append(f"{d.name}: {cmd[:200]}")
    if found:
        log(f"swept {len(found)} leftover process(es) under {root}: {found}")
    return found


def summary(values: list[float | None]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"n": 0, "median": None, "worst": None, "best": None}
    return {
        "n": len(vals),
        "median": round(statistics.median(vals), 3),
        "worst": round(max(vals), 3),
        "best": round(min(vals), 3),
    }


def proc_stat(pid: int) -> dict[str, float]:
    """CPU seconds (utime + stime, this process only) and memory of one process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    out = {"cpu_s": (utime + stime) / tick}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024  # MiB
    return out


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def scrape(c: LabCluster, name: str) -> dict[str, float]:
    assert c.pki is not None
    ctx = ssl.create_default_context(cafile=str(c.pki.ca_cert))
    url = f"https://127.0.0.1:{c.nodes[name].api_port}/metrics"
    with urllib.request.urlopen(url, context=ctx, timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(ca_watchdog_cycle_duration_seconds_(?:sum|count))(?:\{[^}]*\})? (\S+)$", line)
        if m:
            out[m.group(1).rsplit("_", 1)[1]] = float(m.group(2))
    return out


def machine() -> dict[str, Any]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "unknown",
    )
    mem_kb = next(
        int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")
    )
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_at_start": loadavg(),
        "git": git_state(),
    }


def git_state() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "head": git("rev-parse", "--short", "HEAD").strip(),
        "uncommitted_daemon_files": [ln[3:] for ln in git("status", "--porcelain", "daemon").splitlines()],
    }


# ---- the benchmark --------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.rng = random.Random(args.seed)
        self.ports = Ports(args.base_port, args.base_port_max)
        self.workdir = Path(tempfile.mkdtemp(prefix="ca-watchdog-bench-"))
        self.ds: DSLab | None = None
        self.counter = 0
        self.leaked: list[str] = []
        self.timing: dict[str, float | int] = {**LAB_TIMING, **args.timing}

    # -- lab --

    def checkpoint(self, result: dict[str, Any]) -> None:
        """Write what is measured so far: a failure in a later part must not lose 15 minutes of runs."""
        if self.a.out:
            self.a.out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    def ds_up(self) -> None:
        if not self.a.ds:
            return
        if not os.access(NS_SLAPD, os.X_OK):
            raise SystemExit(f"--ds: {NS_SLAPD} not installed")
        state = Path(tempfile.gettempdir()) / f"ca-watchdog-dslab-{self.a.ds_prefix}"
        self.ds = DSLab(("ca1", "ca2", "ca3"), self.a.ds_base_port, self.a.ds_prefix, state)
        log(f"389-DS lab {self.a.ds_prefix} on {self.a.ds_base_port}: up")
        took = self.ds.up()
        log(f"389-DS lab up in {took:.1f}s")

    def ds_restore(self) -> None:
        if self.ds is None:
            return
        for n in self.ds.names:
            if self.ds.is_frozen(n):
                self.ds.thaw(n)
            if not self.ds.is_running(n):
                self.ds.start(n)
        self.ds.wait_replicated(timeout=60)

    def ds_down(self) -> None:
        if self.ds is not None and not self.a.keep_ds:
            log("389-DS lab: down")
            self.ds.down()

    @contextlib.contextmanager
    def cluster(
        self,
        names: tuple[str, ...] = ("ca1", "ca2", "ca3"),
        timing: dict[str, float | int] | None = None,
        status_delay: dict[str, float] | None = None,
        use_ds: bool = True,
        start: tuple[str, ...] | None = None,
    ) -> Iterator[BenchCluster]:
        self.counter += 1
        root = self.workdir / f"c{self.counter:03d}"
        c = BenchCluster(
            root,
            names=names,
            base_port=self.ports.take(len(names)),
            ds=self.ds if use_ds else None,
            start_delay=self.a.start_delay,
            timing=dict(timing or self.timing),
            status_delay=status_delay,
        )
        c.build()
        try:
            for n in start or names:
                c.start_ca(n)
            for n in start or names:
                c.start_daemon(n)
            yield c
        finally:
            c.stop()
            self.leaked += sweep(root)
            if not self.a.keep_logs:
                shutil.rmtree(root, ignore_errors=True)

    def steady(self, c: BenchCluster, names: tuple[str, ...] | None = None, timeout: float = 90) -> None:
        """ca1 serves as master and holds the key, every member's record is fresh and running."""
        names = names or tuple(c.names)

        def ok() -> bool:
            leader, recs, _ = c.state()
            return (
                leader == "ca1"
                and all(n in recs and recs[n].get("ca_status") == "running" for n in names)
                and recs["ca1"].get("cscfg_role") == "master"
            )

        if not wait_until(ok, timeout, 0.5):
            raise RuntimeError(f"cluster not steady within {timeout}s: {c.state()[:2]}\n{tail(c)}")
        serving = asyncio.run(c.serving())
        if serving.get("ca1") != "master":
            raise RuntimeError(f"ca1 not serving as master: {serving}")
        time.sleep(self.a.settle)

    # -- fault runs --

    def fault_run(self, kind: str) -> dict[str, Any]:
        t = self.timing
        interval, threshold, ttl = float(t["interval"]), int(t["failure_threshold"]), float(t["ttl"])
        status_delay = None
        if kind == "slow":
            status_delay = {n: self.a.slow_delay for n in ("ca1", "ca2", "ca3")}
        with self.cluster(status_delay=status_delay) as c:
            self.steady(c)
            checker = InvariantChecker(c, period=self.a.poll).start()
            poller = Poller(c, period=self.a.poll).start()
            watch = StoreWatch(c, period=self.a.poll).start()
            # every CA's state known (ca1: master) before the fault, so the master sequence starts right
            wait_until(
                lambda: (
                    poller.first("ca1", "master", 0.0) is not None
                    and len({n for _, n, _ in poller.changes}) == len(c.names)
                ),
                10,
                0.1,
            )
            time.sleep(self.rng.uniform(0, interval))  # a random phase of the cycle
            load_before = loadavg()
            fault_at = time.time()
            extra: dict[str, Any] = {}
            try:
                if kind == "kill":
                    c.kill_ca("ca1", signal.SIGKILL)
                elif kind == "freeze":
                    extra["frozen_pid"] = c.kill_ca("ca1", signal.SIGSTOP)
                elif kind == "host":
                    c.kill_daemon("ca1", signal.SIGKILL)
                    c.kill_ca("ca1", signal.SIGKILL)
                    if self.ds is not None:
                        self.ds.kill("ca1")
                    fault_at = time.time()  # all three are gone from here on
                if kind in ("kill", "freeze", "host"):
                    res = self._wait_failover(c, poller, fault_at, timeout=ttl + 60)
                    if kind == "freeze":  # thaw the old CA (if its daemon did not stop it) and watch a while
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(extra["frozen_pid"], signal.SIGCONT)
                        res["thawed_at"] = time.time()
                        res["old_ca_still_ran_at_thaw"] = c.ca_pid("ca1") == extra["frozen_pid"]
                    time.sleep(self.a.settle + 2)
                elif kind == "slow":
                    time.sleep(self.a.slow_seconds)
                    res = {}
                else:
                    res = self._flap(c, fault_at)
                    time.sleep(self.a.settle + interval * (threshold + 2))  # let the last flap settle
            finally:
                if kind == "freeze" and extra.get("frozen_pid"):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(extra["frozen_pid"], signal.SIGCONT)
                violations = checker.stop()
                poller.stop()
                watch.stop()
            leader, _, events = c.state()
            after = [e for e in events if e["at"] >= fault_at]
            res.update(
                kind=kind,
                fault_at=fault_at,
                loadavg_before=load_before,
                loadavg_after=loadavg(),
                leader_after=leader,
                failovers=sum(1 for e in after if e.get("type") == "promoted"),
                releases=sum(1 for e in after if e.get("type") == "released"),
                restarts=sum(1 for e in after if e.get("type") == "restart"),
                master_sequence=poller.master_sequence(fault_at),
                master_changes=max(0, len(poller.master_sequence(fault_at)) - 1),
                outside_polls=poller.polls,
                invariant_violations=violations,
                events=[{k: v for k, v in e.items() if k not in ("reason",)} for e in after],
            )
            gaps = watch.renewal_gaps()
            res["renewals_seen"] = len(gaps)
            res["renewal_gap_max_s"] = round(max(gaps), 3) if gaps else None
            declared = watch.declared("ca1", threshold, fault_at)
            if kind in ("kill", "freeze") and declared is not None:
                res["declared_s"] = round(declared - fault_at, 3)  # ca1 published `threshold` failed probes
                if res.get("detection_s") is not None:  # then stopped its CA, wrote CS.cfg, released the key
                    res["demote_s"] = round(res["detection_s"] - res["declared_s"], 3)
            if kind in ("kill", "freeze"):
                res["floor"] = {
                    "detection_s": interval * threshold,
                    "restart_s": self.a.start_delay,
                    "total_s": interval * threshold + self.a.start_delay,
                }
            elif kind == "host":
                res["floor"] = {
                    "detection_s": ttl,
                    "restart_s": self.a.start_delay,
                    "total_s": ttl + self.a.start_delay,
                }
        if kind == "host":
            self.ds_restore()
        return res

    def _wait_failover(self, c: BenchCluster, poller: Poller, fault_at: float, timeout: float) -> dict[str, Any]:
        def promoted() -> dict[str, Any] | None:
            _, _, events = c.state()
            return next(
                (e for e in events if e.get("type") == "promoted" and e["at"] >= fault_at and e.get("name") != "ca1"),
                None,
            )

        def new_master_seen() -> bool:
            return any(poller.first(n, "master", fault_at) is not None for n in c.names if n != "ca1")

        ok = wait_until(lambda: new_master_seen() and promoted() is not None, timeout, 0.25)
        if not ok:
            return {"ok": False, "error": f"no failover within {timeout:g}s", "log_tail": tail(c)}
        time.sleep(0.3)
        _, _, events = c.state()
        p = next(e for e in events if e.get("type") == "promoted" and e["at"] >= fault_at and e.get("name") != "ca1")
        new = p["name"]
        released = next(
            (e for e in events if e.get("type") == "released" and e.get("name") == "ca1" and e["at"] >= fault_at), None
        )
        acquired = next(
            (e for e in events if e.get("type") == "acquired" and e.get("name") == new and e["at"] >= fault_at), None
        )
        seen = poller.first(new, "master", fault_at)
        out: dict[str, Any] = {"ok": True, "new_master": new, "promoted": p}
        if released is not None:  # the old master's daemon saw the failure and stepped down
            out["detection_s"] = released["at"] - fault_at
            out["decision_s"] = p["decided_at"] - released["at"]
        else:  # a dead host: detection ends with the clone's PROMOTE decision
            out["detection_s"] = p["decided_at"] - fault_at
            out["decision_s"] = (acquired["at"] - p["decided_at"]) if acquired else None
        out["restart_s"] = p["running_at"] - p["decided_at"]
        out["total_s"] = p["running_at"] - fault_at
        out["external_total_s"] = (seen - fault_at) if seen is not None else None
        for k in ("detection_s", "decision_s", "restart_s", "total_s", "external_total_s"):
            if out.get(k) is not None:
                out[k] = round(out[k], 3)
        return out

    def _flap(self, c: BenchCluster, started: float) -> dict[str, Any]:
        """Kill whoever's CS.cfg is master, start it again after `down` s (through the guard), repeat."""
        flaps: list[dict[str, Any]] = []
        end = started + self.a.flap_seconds
        while time.time() < end:
            roles = c.roles()
            target = next((n for n, r in roles.items() if r == "master"), None)
            if target is None or c.ca_pid(target) is None:
                time.sleep(0.5)
                continue
            with contextlib.suppress(RuntimeError):
                c.kill_ca(target, signal.SIGKILL)
            down_at = time.time()
            time.sleep(self.a.flap_down)
            restarted = False
            # the daemon may have demoted it and start it as a clone itself: two starts at once race
            if c.roles().get(target) == "master" and c.ca_pid(target) is None:
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    c.start_ca(target)
                    restarted = True
            flaps.append({"target": target, "down_at": down_at, "up_at": time.time(), "restarted_by_bench": restarted})
            time.sleep(max(0.0, self.a.flap_up - (time.time() - down_at - self.a.flap_down)))
        return {"flaps": len(flaps), "flap_log": flaps}

    # -- overhead --

    def idle(self) -> dict[str, Any]:
        # the shipped timing defaults (interval 2 s, ttl 30 s, ...): what one daemon costs as installed
        d = TimingSettings()
        timing = dict(self.timing, interval=d.interval, ttl=d.ttl, safety_margin=d.safety_margin)
        with self.cluster(timing=timing) as c:
            self.steady(c)
            time.sleep(5)
            pids = {n: daemon_pid(c, n) for n in c.names}
            before = {n: proc_stat(p) for n, p in pids.items()}
            load_before = loadavg()
            t0 = time.monotonic()
            time.sleep(self.a.idle_seconds)
            wall = time.monotonic() - t0
            after = {n: proc_stat(p) for n, p in pids.items()}
            leader, _, _ = c.state()
        per: dict[str, dict[str, Any]] = {}
        for n in pids:
            cpu = after[n]["cpu_s"] - before[n]["cpu_s"]
            per[n] = {
                "role": "master" if n == leader else "clone",
                "cpu_s": round(cpu, 3),
                "cpu_pct_of_one_core": round(100 * cpu / wall, 3),
                "rss_mib": round(after[n]["VmRSS"], 1),
                "hwm_mib": round(after[n]["VmHWM"], 1),
            }
        return {
            "interval": 2.0,
            "seconds": round(wall, 1),
            "with_ds": self.ds is not None,
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
            "daemons": per,
        }

    def cycle(self, members: int) -> dict[str, Any]:
        """Cycle time of real daemons (ca1..ca3) in a cluster of `members` members.

        The other members are configured like any member but have no process: the benchmark
        publishes a fresh, healthy clone record for each of them every second, so every daemon
        reads, validates and ranks `members` records and exports per-member metrics for them.
        """
        names = tuple(f"ca{i + 1}" for i in range(members))
        real = names[:3]
        with self.cluster(names=names, use_ds=False, start=real) as c:
            stop = threading.Event()
            phantoms = names[3:]
            s = c.settings("ca1")
            ttl = member_ttl(s)

            async def publish() -> None:
                store = open_store(s.store, list(names), s.timing.store_timeout)
                try:
                    while not stop.is_set():
                        now = time.time()
                        for n in phantoms:
                            st = MemberState(
                                name=n, updated_at=now, ca_status="running", cscfg_role="clone",
                                master_agent=f"127.0.0.1:{c.nodes['ca1'].agent_port}", ds_ok=True,
                                replication="green", watching="ca1", watched_status="running", watched_role="master",
                            )  # fmt: skip
                            await store.put_member(n, st.to_payload(), ttl)
                        await asyncio.sleep(1.0)
                finally:
                    await store.close()

            pub = threading.Thread(target=lambda: asyncio.run(publish()), daemon=True)
            pub.start()
            try:
                self.steady(c, names)
                time.sleep(3)
                before = {n: scrape(c, n) for n in real}
                t0 = time.monotonic()
                time.sleep(self.a.cycle_seconds)
                after = {n: scrape(c, n) for n in real}
                wall = time.monotonic() - t0
                leader, recs, _ = c.state()
                fresh = len(recs)
            finally:
                stop.set()
                pub.join(timeout=10)
        per: dict[str, dict[str, Any]] = {}
        for n in real:
            cnt = after[n]["count"] - before[n]["count"]
            per[n] = {
                "role": "master" if n == leader else "clone",
                "cycles": int(cnt),
                "mean_cycle_ms": round(1000 * (after[n]["sum"] - before[n]["sum"]) / cnt, 2) if cnt else None,
            }
        means = [v["mean_cycle_ms"] for v in per.values() if v["mean_cycle_ms"] is not None]
        return {
            "members": members,
            "fresh_records": fresh,
            "seconds": round(wall, 1),
            "daemons": per,
            "mean_cycle_ms_master": per["ca1"]["mean_cycle_ms"],
            "mean_cycle_ms_all": round(statistics.mean(means), 2) if means else None,
            "loadavg": loadavg(),
        }

    # -- main --

    def run(self) -> dict[str, Any]:
        parts = self.a.parts
        result: dict[str, Any] = {
            "machine": machine(),
            "settings": {
                "timing": self.timing,
                "start_delay": self.a.start_delay,
                "store": "sqlite",
                "ds": bool(self.a.ds),
                "poll_s": self.a.poll,
                "runs": self.a.runs,
                "seed": self.a.seed,
                "slow_delay": self.a.slow_delay,
                "slow_seconds": self.a.slow_seconds,
                "flap_down": self.a.flap_down,
                "flap_up": self.a.flap_up,
                "flap_seconds": self.a.flap_seconds,
                "idle_seconds": self.a.idle_seconds,
                "cycle_seconds": self.a.cycle_seconds,
                "cycle_rounds": self.a.cycle_rounds,
                "failover": {"restart_before_failover": False, "failover_cooldown": 3600},
            },
            "faults": {},
        }
        try:
            self.ds_up()
            for kind in FAULTS:
                if kind not in parts:
                    continue
                runs = []
                for i in range(self.a.runs):
                    log(f"{kind}: run {i + 1}/{self.a.runs}")
                    try:
                        r = self.fault_run(kind)
                    except Exception as exc:
                        log(f"{kind}: run {i + 1} failed: {exc}")
                        r = {"kind": kind, "ok": False, "error": str(exc)}
                    runs.append(r)
                    keys = (
                        *("ok", "detection_s", "declared_s", "decision_s", "restart_s", "total_s", "external_total_s"),
                        "renewal_gap_max_s",
                    )
                    log(f"{kind}: {json.dumps({k: r.get(k) for k in (*keys, 'failovers', 'master_changes')})}")
                result["faults"][kind] = {"runs": runs, "summary": summarize(kind, runs)}
                self.checkpoint(result)
            if "idle" in parts:
                log(f"idle: {self.a.idle_seconds:g} s at interval 2 s")
                result["idle"] = self.idle()
                self.checkpoint(result)
                log(f"idle: {json.dumps(result['idle']['daemons'])}")
            if "cycle" in parts:
                rounds: dict[str, list[dict[str, Any]]] = {str(n): [] for n in self.a.cycle_members}
                for rnd in range(self.a.cycle_rounds):  # sizes interleaved, so load drifts hit all alike
                    for n in self.a.cycle_members:
                        log(f"cycle: {n} members, round {rnd + 1}/{self.a.cycle_rounds}")
                        one = self.cycle(n)
                        rounds[str(n)].append(one)
                        log(f"cycle: {json.dumps(one['daemons'])}")
                result["cycle"] = {}
                for n, rs in rounds.items():
                    result["cycle"][n] = {
                        "members": int(n),
                        "rounds": rs,
                        "fresh_records": min(x["fresh_records"] for x in rs),
                        "median_cycle_ms": {
                            d: summary([x["daemons"][d]["mean_cycle_ms"] for x in rs])["median"]
                            for d in ("ca1", "ca2", "ca3")
                        },
                        "cycles": sum(v["cycles"] for x in rs for v in x["daemons"].values()),
                    }
        finally:
            self.ds_down()
            if not self.a.keep_logs:
                shutil.rmtree(self.workdir, ignore_errors=True)
            else:
                log(f"logs kept in {self.workdir}")
        result["machine"]["loadavg_at_end"] = loadavg()
        result["leaked_processes"] = self.leaked
        return result


def tail(c: LabCluster, lines: int = 8) -> str:
    out = []
    for n, node in c.nodes.items():
        if node.daemon_log.exists():
            out.append(f"--- {n}\n" + "\n".join(node.daemon_log.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(out)


def summarize(kind: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r.get("ok", True) and "error" not in r]
    out: dict[str, Any] = {"runs": len(runs), "ok": len(ok)}
    for k in ("detection_s", "declared_s", "demote_s", "decision_s", "restart_s", "total_s", "external_total_s"):
        out[k] = summary([r.get(k) for r in ok])
    # every run, failed ones too: a lease renewed late is what a failed run may show
    out["renewal_gap_max_s"] = summary([r.get("renewal_gap_max_s") for r in runs])
    out["renewals_seen"] = sum(r.get("renewals_seen") or 0 for r in runs)
    floors = [r["floor"] for r in ok if "floor" in r]
    if floors:
        out["floor"] = floors[0]
        out["total_minus_floor_s"] = summary(
            [r["total_s"] - r["floor"]["total_s"] for r in ok if r.get("total_s") is not None]
        )
        out["external_minus_floor_s"] = summary(
            [r["external_total_s"] - r["floor"]["total_s"] for r in ok if r.get("external_total_s") is not None]
        )
    steps = (
        ("acquire + stop the clone CA", "decided_at", "stopped_at"),
        ("write CS.cfg", "stopped_at", "written_at"),
        ("start command (guard + spawn)", "written_at", "started_at"),
        ("CA process up + start delay + poll", "started_at", "running_at"),
    )
    promoted = [r["promoted"] for r in ok if isinstance(r.get("promoted"), dict)]
    if promoted:
        out["restart_breakdown_s"] = {name: summary([p[b] - p[a] for p in promoted]) for name, a, b in steps}
    out["failovers"] = [r.get("failovers") for r in runs]
    out["master_changes"] = [r.get("master_changes") for r in runs]
    out["invariant_violations"] = sum(len(r.get("invariant_violations") or []) for r in runs)
    return out


# ---- report ---------------------------------------------------------------------------------------------


def _mw(s: dict[str, Any] | None) -> str:
    if not s or s.get("median") is None:
        return "-"
    return f"{s['median']:.2f} / {s['worst']:.2f}"


def markdown(res: dict[str, Any]) -> str:
    st = res["settings"]
    t = st["timing"]
    lines = []
    if res["faults"]:
        lines += [
            f"Settings: interval {t['interval']:g} s, failure_threshold {t['failure_threshold']}, ttl {t['ttl']:g} s, "
            f"agent_timeout {t['agent_timeout']:g} s, CA start delay {st['start_delay']:g} s, store sqlite, "
            f"389-DS {'real' if st['ds'] else 'none'}. Times in seconds, median / worst.",
            "",
            "| fault | runs ok | detection | decision | restart | total (history) | total (outside, polled) "
            "| floor det. / restart / total | total - floor (median) | failovers per run "
            "| master changes seen | invariant violations |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for kind, part in res["faults"].items():
            s = part["summary"]
            title = FAULT_TITLES[kind].format(
                ds=" + 389-DS" if st["ds"] else "",
                delay=st["slow_delay"],
                timeout=t["agent_timeout"],
                down=st["flap_down"],
                up=st["flap_up"],
                seconds=st["flap_seconds"],
            )
            fl = s.get("floor")
            floor = f"{fl['detection_s']:g} / {fl['restart_s']:g} / {fl['total_s']:g}" if fl else "-"
            tmf = s.get("total_minus_floor_s") or {}
            tmf_s = f"{tmf['median']:.2f}" if tmf.get("median") is not None else "-"
            lines.append(
                f"| {title} | {s['ok']}/{s['runs']} | {_mw(s['detection_s'])} | {_mw(s['decision_s'])} "
                f"| {_mw(s['restart_s'])} "
                f"| {_mw(s['total_s'])} | {_mw(s['external_total_s'])} | {floor} | {tmf_s} "
                f"| {', '.join(str(x) for x in s['failovers'])} "
                f"| {', '.join(str(x) for x in s['master_changes'])} "
                f"| {s['invariant_violations']} |"
            )
        lines.append("")
    bd = {
        k: p["summary"]["restart_breakdown_s"]
        for k, p in res["faults"].items()
        if "restart_breakdown_s" in p["summary"]
    }
    if bd:
        steps = list(next(iter(bd.values())))
        lines += [
            "Restart time (`decided_at` -> `running_at`) by step, median / worst:",
            "",
            "| fault | " + " | ".join(steps) + " |",
            "|---|" + "---|" * len(steps),
        ]
        for k, b in bd.items():
            lines.append(f"| {k} | " + " | ".join(_mw(b[st]) for st in steps) + " |")
        lines.append("")
    split = {k: p["summary"] for k, p in res["faults"].items() if (p["summary"].get("declared_s") or {}).get("n")}
    if split:
        lines += [
            "Detection split, median / worst: the probes (fault -> the old master's record shows "
            f"{t['failure_threshold']} failed probes, read from the store every {st['poll_s']:g} s) and the "
            "demotion (-> `released`: stop its CA, write CS.cfg, release the key):",
            "",
            "| fault | detection | probes | demotion |",
            "|---|---|---|---|",
        ]
        for k, sm in split.items():
            lines.append(f"| {k} | {_mw(sm['detection_s'])} | {_mw(sm['declared_s'])} | {_mw(sm['demote_s'])} |")
        lines.append("")
    gaps = {k: p["summary"] for k, p in res["faults"].items() if (p["summary"].get("renewal_gap_max_s") or {}).get("n")}
    if gaps:
        timing = TimingSettings(**{k: v for k, v in t.items() if k in TimingSettings.__dataclass_fields__})
        fence = timing.ttl - timing.safety_margin
        lines += [
            f"Lease renewals seen by the store (the leader record's `renewed_at`, read every {st['poll_s']:g} s), "
            f"largest gap between two successful renewals in a run, median / worst over the runs; the fence point "
            f"`ttl - safety_margin` is {fence:g} s, and a master decides to fence one cycle budget earlier, "
            f"{fence - timing.cycle_budget:g} s after its last renewal:",
            "",
            "| fault | renewals seen | largest gap | fence point / fence decision |",
            "|---|---|---|---|",
        ]
        for k, sm in gaps.items():
            lines.append(
                f"| {k} | {sm['renewals_seen']} | {_mw(sm['renewal_gap_max_s'])} "
                f"| {fence:g} / {fence - timing.cycle_budget:g} |"
            )
        lines.append("")
    if "idle" in res:
        i = res["idle"]
        lines += [
            f"Idle overhead over {i['seconds']:g} s at interval {i['interval']:g} s "
            f"({'with' if i['with_ds'] else 'without'} 389-DS probes):",
            "",
            "| daemon | role | CPU s | CPU % of one core | VmRSS MiB | VmHWM MiB |",
            "|---|---|---|---|---|---|",
        ]
        for n, d in i["daemons"].items():
            lines.append(
                f"| {n} | {d['role']} | {d['cpu_s']:.2f} | {d['cpu_pct_of_one_core']:.2f} "
                f"| {d['rss_mib']:.1f} | {d['hwm_mib']:.1f} |"
            )
        lines.append("")
    if "cycle" in res:
        lines += [
            "Cycle time (mean of ca_watchdog_cycle_duration_seconds sum/count over each window, median over "
            "rounds; 3 real daemons, the other members' fresh records published by the benchmark):",
            "",
            "| members | fresh records | master ca1 cycle ms | clone ca2 / ca3 cycle ms | cycles counted |",
            "|---|---|---|---|---|",
        ]
        for n, cy in res["cycle"].items():
            m = cy["median_cycle_ms"]
            lines.append(f"| {n} | {cy['fresh_records']} | {m['ca1']} | {m['ca2']} / {m['ca3']} | {cy['cycles']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="runs per fault type")
    p.add_argument("--out", type=Path, help="write the JSON results here")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--ds", action="store_true", help="give every node a real replicated 389-DS (DSLab)")
    p.add_argument("--ds-prefix", default="cwbench")
    p.add_argument("--ds-base-port", type=int, default=38300)
    p.add_argument("--keep-ds", action="store_true", help="leave the 389-DS lab running afterwards")
    p.add_argument("--base-port", type=int, default=21000)
    p.add_argument("--base-port-max", type=int, default=21990)
    p.add_argument("--start-delay", type=float, default=2.0, help="simulated CA start time (s)")
    p.add_argument(
        "--timing",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one [timing] setting of the lab's (repeatable), e.g. --timing agent_timeout=2.5",
    )
    p.add_argument("--poll", type=float, default=0.1, help="outside poller period (s)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds of steady state before a fault")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--slow-delay", type=float, default=0.7, help="getStatus delay for the slow-answer fault (s)")
    p.add_argument("--slow-seconds", type=float, default=30.0)
    p.add_argument("--flap-down", type=float, default=2.0)
    p.add_argument("--flap-up", type=float, default=4.0)
    p.add_argument("--flap-seconds", type=float, default=60.0)
    p.add_argument("--idle-seconds", type=float, default=60.0)
    p.add_argument("--cycle-seconds", type=float, default=30.0)
    p.add_argument("--cycle-members", default="3,10,30")
    p.add_argument("--cycle-rounds", type=int, default=2, help="windows per member count (median taken)")
    p.add_argument("--keep-logs", action="store_true")
    p.add_argument("--report", type=Path, help="only re-summarize and print the table of an earlier JSON result")
    a = p.parse_args(argv)
    if a.report:
        res = json.loads(a.report.read_text())
        for kind, part in res.get("faults", {}).items():
            part["summary"] = summarize(kind, part["runs"])
        res["table_markdown"] = markdown(res)
        print(res["table_markdown"])
        if a.out:
            a.out.write_text(json.dumps(res, indent=2, default=str) + "\n")
        return 0
    a.parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    bad = [x for x in a.parts if x not in PARTS]
    if bad:
        p.error(f"unknown parts {bad}; choose from {','.join(PARTS)}")
    a.cycle_members = [int(x) for x in a.cycle_members.split(",")]
    timing: dict[str, float | int] = {}
    for item in a.timing:
        key, sep, value = item.partition("=")
        if not sep or key not in LAB_TIMING:
            p.error(f"--timing {item!r}: expected KEY=VALUE with KEY one of {', '.join(LAB_TIMING)}")
        timing[key] = int(value) if key == "failure_threshold" else float(value)
    a.timing = timing
    res = Bench(a).run()
    table = markdown(res)
    print(table)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        res["table_markdown"] = table
        tmp = a.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=2, default=str) + "\n")
        os.replace(tmp, a.out)
        log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
