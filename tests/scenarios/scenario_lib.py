"""The runbook toolkit of the scenario tests: a running lab cluster and ways to look at it."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from ca_watchdog.lab.cluster import LabCluster
from ca_watchdog.lab.dslab import DSLab
from ca_watchdog.lab.invariants import InvariantChecker, crl_violations, crl_write_log


class Scenario:
    """A running cluster plus the tools a runbook test needs."""

    def __init__(self, cluster: LabCluster, ds: DSLab, started_at: float) -> None:
        self.c = cluster
        self.ds = ds
        self.started_at = started_at
        self.checker: InvariantChecker | None = None

    def serving(self) -> dict[str, str]:
        return asyncio.run(self.c.serving())

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

    def crl_problems(self) -> list[str]:
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(self.started_at))
        log = [e for e in crl_write_log(self.ds, self.ds.names) if e[0] >= stamp]
        return crl_violations(log)

    def crl_writers(self) -> list[str]:
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(self.started_at))
        order: list[str] = []
        for _, w, _ in (e for e in crl_write_log(self.ds, self.ds.names) if e[0] >= stamp):
            if not order or order[-1] != w:
                order.append(w)
        return order

    def debug(self) -> str:
        parts = []
        for n, node in self.c.nodes.items():
            if node.daemon_log.exists():
                tail = node.daemon_log.read_text(errors="replace").splitlines()[-12:]
                parts.append(f"--- {n} daemon.log\n" + "\n".join(tail))
        return "\n".join(parts)
