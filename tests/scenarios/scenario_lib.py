"""The runbook toolkit of the scenario tests: a running lab cluster and ways to look at it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ca_watchdog.lab.cluster import LabCluster
from ca_watchdog.lab.dslab import DSLab
from ca_watchdog.lab.invariants import InvariantChecker, crl_violations, crl_write_log

# How long the tests' own look at a CA (getStatus, then getInfo, each on a fresh TLS connection) may take: the
# daemons' shipped agent_timeout, not the lab's 1 s. Many asserts take one look (`serving() == {...}`, 20 looks
# at a master whose getStatus takes 0.6 s), and this 2-core CI machine, loaded by the other suites, holds
# threads for up to 0.7 s now and then (tests/real/dogtag_cluster.py, STALL): a look that waited that long
# must not fail a test as "down". A longer wait never turns a clone into a master; the invariant checker
# keeps its own 1 s samples.
SERVING_TIMEOUT = 3.0


class ShippedFile:
    """A shipped example file (examples/...) adapted to the lab: each substitution must match exactly as
    often as expected, so a changed example fails the test instead of being tested half-adapted."""

    def __init__(self, path: Path) -> None:
        self.name = f"{path.parent.name}/{path.name}"
        self.text = path.read_text()

    def sub(self, pattern: str, repl: str, count: int) -> None:
        self.text, n = re.subn(pattern, repl, self.text, flags=re.M)
        assert n == count, f"{self.name}: expected {count} x {pattern!r}, found {n}"


class Scenario:
    """A running cluster plus the tools a runbook test needs."""

    def __init__(self, cluster: LabCluster, ds: DSLab, started_at: float) -> None:
        self.c = cluster
        self.ds = ds
        self.started_at = started_at
        self.checker: InvariantChecker | None = None
        # per directory kill, (killed member, kill stamp, CRL writes its survivors held): see `forget_unreplicated`
        self._unreplicated: list[tuple[str, str, set[tuple[str, str, int]]]] = []

    def serving(self) -> dict[str, str]:
        return asyncio.run(self.c.serving(timeout=SERVING_TIMEOUT))

    def wait(self, what: Callable[[], bool], timeout: float, why: str) -> float:
        t0 = time.monotonic()
        if not self.c.wait_for(what, timeout, 0.2):
            raise AssertionError(f"timed out after {timeout:g}s waiting for: {why}\n{self.debug()}")
        return time.monotonic() - t0

    def wait_master(self, name: str, timeout: float = 60) -> float:
        return self.wait(
            lambda: self.serving().get(name) == "master" and self.leader() == name, timeout, f"{name} serving as master"
        )

    def status(self, name: str = "ca1") -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "ca_watchdog.cli", "status", "--json", "--config", str(self.c.nodes[name].config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return dict(json.loads(out.stdout))

    def leader(self) -> str | None:
        try:
            return self.status(self.c.names[-1])["leader"]
        except subprocess.CalledProcessError:
            return None

    def cli(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ca_watchdog.cli", *args, "--config", str(self.c.nodes[name].config)],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def cluster_json(self, name: str) -> dict[str, Any]:
        assert self.c.pki is not None
        ctx = ssl.create_default_context(cafile=str(self.c.pki.ca_cert))
        url = f"https://127.0.0.1:{self.c.nodes[name].api_port}/cluster"
        with urllib.request.urlopen(url, context=ctx, timeout=5) as r:
            return dict(json.loads(r.read()))

    def history(self) -> list[dict[str, Any]]:
        out = self.cli(self.c.names[-1], "history", "--json")
        return list(json.loads(out.stdout))

    def crl_log(self) -> list[tuple[str, str, int]]:
        """The CRL writes since this scenario's cluster started. The directories outlive one scenario, so
        the cut is to the millisecond the write stamps carry: the previous scenario's master may have
        written within the same second."""
        ms = int(self.started_at * 1000)
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"
        return [e for e in crl_write_log(self.ds, self.ds.names) if e[0] >= stamp]

    def crl_problems(self) -> list[str]:
        log = self.crl_log()
        for killed, until, survivors in self._unreplicated:
            log = [e for e in log if not (e[1] == killed and e[0] <= until and e not in survivors)]
        return crl_violations(log)

    def forget_unreplicated(self, killed: str, killed_at: float) -> None:
        """Call while `killed`'s directory is still dead (before it is started again), once per kill. A
        write `killed`'s CA made up to the kill that no surviving server holds now never left the dead
        directory (389-DS replicates asynchronously): no software above the directory could see it, and a
        new master reusing its number is the directory's lost write, not a split brain. Such writes
        reappear when the dead server returns and replicates; the CRL checks leave them out."""
        survivors = set(crl_write_log(self.ds, [n for n in self.ds.names if n != killed]))
        until = time.strftime("%Y%m%d%H%M%S.999Z", time.gmtime(killed_at))
        self._unreplicated.append((killed, until, survivors))

    def crl_writers(self) -> list[str]:
        order: list[str] = []
        for _, w, _ in self.crl_log():
            if not order or order[-1] != w:
                order.append(w)
        return order

    def serving_master(self) -> str | None:
        """The one CA serving as master while every other serves as its clone, and it holds the key."""
        s = self.serving()
        masters = [n for n, v in s.items() if v == "master"]
        if len(masters) != 1 or any(v != "clone" for n, v in s.items() if n != masters[0]):
            return None
        return masters[0] if self.leader() == masters[0] else None

    def wait_converged(self, timeout: float = 90) -> str:
        """Wait until exactly one CA serves as master (the key holder) and the others as its clones."""
        found: list[str] = []

        def ok() -> bool:
            m = self.serving_master()
            if m:
                found[:] = [m]
            return m is not None

        self.wait(ok, timeout, "exactly one serving master holding the key, the others serving clones")
        return found[0]

    def events(self, *types: str) -> list[dict[str, Any]]:
        return [e for e in self.history() if e.get("type") in types]

    def debug(self) -> str:
        parts = []
        for n, node in self.c.nodes.items():
            if node.daemon_log.exists():
                tail = node.daemon_log.read_text(errors="replace").splitlines()[-12:]
                parts.append(f"--- {n} daemon.log\n" + "\n".join(tail))
        return "\n".join(parts)


# the fault suites' clusters: base ports 20000..20960 (agent base+i, API base+20+i), never the
# ports of conftest's `scenario` fixture (18500..)
_fault_ports = itertools.count(0)


def next_fault_port() -> int:
    return 20000 + (next(_fault_ports) * 40) % 1000


@contextlib.contextmanager
def fault_scenario(
    root: Path,
    ds: DSLab,
    store_backend: str = "sqlite",
    etcd_endpoint: str | None = None,
    *,
    expect_unreadable: frozenset[str] = frozenset(),
    prepare: Callable[[Scenario], None] | None = None,
    period: float = 0.2,
    **options: Any,
) -> Iterator[Scenario]:
    """Like conftest's `scenario` fixture (3 nodes, ca1 master, invariants checked throughout and at
    the end), with the fault suites' ports, a `prepare` step run before the checker starts (e.g.
    corrupting a CS.cfg) and CS.cfg files that are expected to be unreadable."""
    c = LabCluster(
        root, base_port=next_fault_port(), ds=ds, store_backend=store_backend, etcd_endpoint=etcd_endpoint, **options
    )
    c.build()
    sc = Scenario(c, ds, time.time())
    try:
        c.start()
        sc.wait_master("ca1", 60)
        if sc.wait_converged(60) != "ca1":
            raise AssertionError("the lab did not start with ca1 as master")
        if prepare is not None:
            prepare(sc)
        sc.checker = InvariantChecker(c, period=period, expect_unreadable=expect_unreadable).start()
        checker = sc.checker
        sc.wait(lambda: bool(checker.samples), 30, "the invariant checker's first sample")
        yield sc
        violations = sc.checker.stop()
        assert not violations, "safety invariants violated:\n" + "\n".join(violations) + "\n" + sc.debug()
        problems = sc.crl_problems()
        assert not problems, "\n".join(problems)
    finally:
        if sc.checker is not None:
            sc.checker.stop()
        c.stop()
