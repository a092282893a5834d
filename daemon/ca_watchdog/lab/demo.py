"""`ca-watchdog demo`: a local three-node cluster whose master CA is killed and replaced, live.

Simulated Dogtag CAs over TLS, the SQLite store, three `ca-watchdog run` daemons, and a real
replicated 389-DS per node when 389-DS is installed. Everything runs on 127.0.0.1 in a temporary
directory and is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import cscfg
from ..control import cluster_status, format_status
from ..store import open_store
from .cluster import LabCluster
from .dslab import DSLab

DS_BASE_PORT = 13860  # below the ephemeral range (32768+): no clash with outgoing connections
CA_BASE_PORT = 18340


class Timeline:
    def __init__(self, quiet: bool) -> None:
        self.t0 = time.monotonic()
        self.quiet = quiet
        self.events: list[tuple[float, str]] = []

    def reset(self) -> None:
        self.t0 = time.monotonic()

    def say(self, text: str) -> float:
        t = time.monotonic() - self.t0
        self.events.append((t, text))
        if not self.quiet:
            print(f"  [{t:6.2f}s] {text}", flush=True)
        return t

    def show(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)


def _ds_available() -> bool:
    return os.access("/usr/sbin/ns-slapd", os.X_OK) and shutil.which("dscreate") is not None and os.geteuid() == 0


def _status_table(c: LabCluster) -> str:
    s = c.settings(c.names[0])

    async def go() -> str:
        store = open_store(s.store, [m.name for m in s.members], s.timing.store_timeout)
        try:
            return format_status(await cluster_status(s, store))
        finally:
            await store.close()

    return asyncio.run(go())


def _history(c: LabCluster) -> list[dict[str, Any]]:
    s = c.settings(c.names[0])

    async def go() -> list[dict[str, Any]]:
        store = open_store(s.store, [m.name for m in s.members], s.timing.store_timeout)
        try:
            return [{"at": e.at, **e.event} for e in await store.get_history(100)]
        finally:
            await store.close()

    return asyncio.run(go())


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ca-watchdog-demo-"))
    try:
        yield d
    finally:
        if not keep:
            shutil.rmtree(d, ignore_errors=True)


def run_demo(quiet: bool, keep: bool) -> dict[str, Any]:
    tl = Timeline(quiet)
    with _workdir(keep) as root:
        ds: DSLab | None = None
        tl.show(f"ca-watchdog demo in {root}")
        try:
            if _ds_available():
                ds = DSLab(["ca1", "ca2", "ca3"], DS_BASE_PORT, "cwdemo", root / "ds")
                tl.show("creating three replicating 389-DS suppliers on 127.0.0.1 ...")
                took = ds.up()
                tl.show(f"389-DS lab up in {took:.1f}s")
            else:
                tl.show("389-DS not installed: the CAs run without a directory (no replication checks)")
            c = LabCluster(root / "cluster", base_port=CA_BASE_PORT, ds=ds, start_delay=2.0)
            c.build()
            try:
                return _scenario(c, tl, ds is not None)
            finally:
                c.stop()
        finally:
            if ds is not None:
                ds.down()


def _serving(c: LabCluster) -> dict[str, str]:
    return asyncio.run(c.serving())


def _scenario(c: LabCluster, tl: Timeline, with_ds: bool) -> dict[str, Any]:
    tl.show("starting three simulated CAs (ca1 master) and three ca-watchdog daemons ...")
    c.start()
    if not c.wait_for(lambda: _serving(c).get("ca1") == "master" and _leader(c) == "ca1", 60, 0.3):
        raise RuntimeError("the cluster did not come up with ca1 as master")
    c.wait_for(lambda: all(v in ("master", "clone") for v in _serving(c).values()), 30, 0.3)
    time.sleep(2 * float(c.timing["interval"]))  # one more cycle so every member has published
    tl.show("\n" + _status_table(c) + "\n")
    before = {n: c.nodes[n].cs_cfg.read_bytes() for n in c.names}
    tl.show("killing the master CA (ca1) with SIGKILL:")
    tl.reset()
    c.kill_ca("ca1")
    tl.say("ca1's CA killed")
    detected = elected = started = running = None
    new: str | None = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and running is None:
        events = _history(c)
        if detected is None and any(e.get("type") == "released" and e.get("name") == "ca1" for e in events):
            reason = next(e["reason"] for e in events if e.get("type") == "released" and e.get("name") == "ca1")
            detected = tl.say(f"detected: ca1 {reason}")
        leader = _leader(c)
        if elected is None and leader not in (None, "ca1"):
            new = leader
            elected = tl.say(f"elected: {new} took the leader key")
        if new is not None and started is None:
            after = c.nodes[new].cs_cfg.read_bytes()
            if after != before[new]:
                started = tl.say(f"{new}'s CS.cfg rewritten to master; CA restarting:")
                diff = cscfg.unified_diff(
                    cscfg.parse(before[new], f"{new}/CS.cfg"), cscfg.parse(after, f"{new}/CS.cfg")
                )
                tl.show("\n".join("      " + line for line in diff.splitlines()))
        if new is not None and _serving(c).get(new) == "master":
            running = tl.say(f"{new} is running as master")
        time.sleep(0.2)
    if running is None or new is None:
        raise RuntimeError("no new master within 60 s")
    c.wait_for(lambda: _serving(c).get("ca1") == "clone", 30, 0.3)
    tl.say("ca1 restarted as a clone of " + new)
    time.sleep(2 * float(c.timing["interval"]))
    tl.show("\n" + _status_table(c) + "\n")
    return {
        "old_master": "ca1",
        "new_master": new,
        "detected_after_s": round(detected, 2) if detected is not None else None,
        "elected_after_s": round(elected, 2) if elected is not None else None,
        "running_after_s": round(running, 2),
        "roles": c.roles(),
        "with_389ds": with_ds,
        "store": c.store_backend,
        "timeline": [{"t": round(t, 2), "event": e} for t, e in tl.events],
    }


def _leader(c: LabCluster) -> str | None:
    s = c.settings(c.names[0])

    async def go() -> str | None:
        store = open_store(s.store, [m.name for m in s.members], s.timing.store_timeout)
        try:
            rec = await store.get_leader()
            return rec.name if rec else None
        finally:
            await store.close()

    return asyncio.run(go())


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # run the cleanup in `finally` blocks on SIGTERM too


def cli_main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    t0 = time.monotonic()
    summary = run_demo(quiet=args.json, keep=args.keep)
    summary["demo_seconds"] = round(time.monotonic() - t0, 1)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"failover: {summary['old_master']} -> {summary['new_master']}; detected after "
            f"{summary['detected_after_s']}s, new master running after {summary['running_after_s']}s "
            f"(demo took {summary['demo_seconds']}s)"
        )
    sys.stdout.flush()
    return 0
