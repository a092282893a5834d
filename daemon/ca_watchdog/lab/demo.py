"""`ca-watchdog demo`: a local three-node cluster whose master CA is killed and replaced, live.

A thin script over the lab (lab/ctl.py: `lab up`, `lab kill ca1 ca`, `lab down`): simulated Dogtag
CAs over TLS, the SQLite store, three `ca-watchdog run` daemons, and a real replicated 389-DS per
node when 389-DS is installed. Everything runs on 127.0.0.1 in a temporary directory and is removed
at the end (--keep leaves the lab running).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import cscfg
from ..config import load_settings
from ..control import format_status
from ..store import open_store
from . import ctl

CA_BASE_PORT = 18340  # 389-DS at +40: below the ephemeral range (32768+), no clash with outgoing connections


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


def _history(lab: ctl.Lab) -> list[dict[str, Any]]:
    s = load_settings(lab.config)

    async def go() -> list[dict[str, Any]]:
        store = open_store(s.store, [m.name for m in s.members], s.timing.store_timeout)
        try:
            return [{"at": e.at, **e.event} for e in await store.get_history(100)]
        finally:
            await store.close()

    return asyncio.run(go())


def run_demo(quiet: bool, keep: bool) -> dict[str, Any]:
    tl = Timeline(quiet)
    root = Path(tempfile.mkdtemp(prefix="ca-watchdog-demo-"))
    tl.show(f"ca-watchdog demo in {root}")
    with_ds = _ds_available()
    if not with_ds:
        tl.show("389-DS not installed: the CAs run without a directory (no replication checks)")
    lab: ctl.Lab | None = None
    try:
        lab, master = ctl.up(root, tl.show, members=3, base_port=CA_BASE_PORT, with_ds=with_ds, store="sqlite")
        if master != "ca1":
            raise ctl.LabError(f"the cluster came up with {master} as master, not ca1")
        return _scenario(lab, tl)
    finally:
        if lab is None:
            shutil.rmtree(root, ignore_errors=True)  # a failed `up` removed its lab; the empty directory is left
        elif keep:
            tl.show(f"the lab keeps running: ca-watchdog lab status --dir {root}; ca-watchdog lab down --dir {root}")
        else:
            lab.destroy()


def _serving(lab: ctl.Lab) -> dict[str, str]:
    return asyncio.run(lab.cluster.serving())


def _leader(lab: ctl.Lab) -> str | None:
    leader = lab.store_status()["leader"]
    return str(leader) if leader else None


def _scenario(lab: ctl.Lab, tl: Timeline) -> dict[str, Any]:
    c = lab.cluster
    time.sleep(2 * float(c.timing["interval"]))  # one more cycle so every member has published
    tl.show("\n" + format_status(lab.store_status()) + "\n")
    before = {n: c.nodes[n].cs_cfg.read_bytes() for n in c.names}
    tl.show("killing the master CA (ca1) with SIGKILL:")
    tl.reset()
    lab.kill("ca1", "ca")
    tl.say("ca1's CA killed")
    detected = elected = started = running = None
    new: str | None = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and running is None:
        events = _history(lab)
        if detected is None and any(e.get("type") == "released" and e.get("name") == "ca1" for e in events):
            reason = next(e["reason"] for e in events if e.get("type") == "released" and e.get("name") == "ca1")
            detected = tl.say(f"detected: ca1 {reason}")
        leader = _leader(lab)
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
        if new is not None and _serving(lab).get(new) == "master":
            running = tl.say(f"{new} is running as master")
        time.sleep(0.2)
    if running is None or new is None:
        raise ctl.LabError("no new master within 60 s")
    c.wait_for(lambda: _serving(lab).get("ca1") == "clone", 30, 0.3)
    tl.say("ca1 restarted as a clone of " + new)
    time.sleep(2 * float(c.timing["interval"]))
    tl.show("\n" + format_status(lab.store_status()) + "\n")
    return {
        "dir": str(lab.root),
        "old_master": "ca1",
        "new_master": new,
        "detected_after_s": round(detected, 2) if detected is not None else None,
        "elected_after_s": round(elected, 2) if elected is not None else None,
        "running_after_s": round(running, 2),
        "roles": c.roles(),
        "with_389ds": lab.spec.with_ds,
        "store": lab.spec.store,
        "timeline": [{"t": round(t, 2), "event": e} for t, e in tl.events],
    }


def cli_main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, ctl.exit_on_sigterm)
    t0 = time.monotonic()
    try:
        summary = run_demo(quiet=args.json, keep=args.keep)
    except ctl.ERRORS as exc:
        print(f"ca-watchdog demo: {exc}", file=sys.stderr)
        return 1
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
