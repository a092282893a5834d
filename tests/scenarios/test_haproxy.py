"""Runbook: the shipped examples/haproxy.cfg, run by Debian's real HAProxy in front of a 3-node lab
(simulated CAs over TLS, three `ca-watchdog run` daemons, SQLite store).

The config is the example with only addresses, ports and file paths replaced. HAProxy health-checks
each daemon's API over TLS (verifying the lab CA and the host name) and forwards client TLS to the
CAs unchanged. "Traffic" is what an agent would send: getInfo requests through the `ca_master`
frontend. Which CA received each connection is HAProxy's own count (`stot` in `show stat`), and each
answer says whether the CA that gave it serves as master (getInfo without master_host).

- every check method HAProxy can send (OPTIONS, its documented default, HEAD, GET) marks exactly
  the master UP in ca_master and every running CA UP in ca_any;
- the master CA is killed: requests go only to ca1 before, only to the new master after, and no
  request through ca_master is ever answered by a clone.

Lab ports: 19600.. (agents), 19620.. (APIs), HAProxy frontends from 19640.
"""

from __future__ import annotations

import asyncio
import csv
import io
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from scenario_lib import SERVING_TIMEOUT, ShippedFile

from ca_watchdog.lab.cluster import LabCluster, wait_until
from ca_watchdog.lab.etcdlab import free_ports
from ca_watchdog.probes.agent import AgentProbe

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "haproxy.cfg"
HAPROXY = "/usr/sbin/haproxy"
BASE_PORT = 19600


def haproxy_config(c: LabCluster, master_port: int, any_port: int, stats: Path, method: str = "OPTIONS") -> str:
    """examples/haproxy.cfg for the lab: addresses, ports and paths replaced, nothing else (except the
    check method, when a test asks for another)."""
    assert c.pki is not None
    f = ShippedFile(EXAMPLE)
    sub = f.sub
    sub(r"^(\s+bind) :8443$", rf"\1 127.0.0.1:{master_port}", 1)
    sub(r"^(\s+bind) :8444$", rf"\1 127.0.0.1:{any_port}", 1)
    for n, node in c.nodes.items():
        server = rf"\1 127.0.0.1:{node.agent_port} check port {node.api_port} "
        sub(rf"^(\s+server {n}) {n}\.example\.com:8443 check port 8099 ", server, 2)
        sub(rf"\b{n}\.example\.com\b", "localhost", 4)  # the lab server certificate's DNS name
    sub(r"/etc/haproxy/ca-watchdog-ca\.pem", str(c.pki.ca_cert), 2)
    sub(r"/run/haproxy/admin\.sock", str(stats), 1)
    if method != "OPTIONS":
        sub(r"meth OPTIONS", f"meth {method}", 2)
    return f.text


def show_stat(sock_path: Path) -> dict[tuple[str, str], dict[str, str]]:
    """HAProxy's `show stat` over its stats socket, by (proxy, server)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock_path))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
    return {(r["pxname"], r["svname"]): r for r in rows}


class HAProxy:
    def __init__(self, root: Path, c: LabCluster, method: str = "OPTIONS") -> None:
        if shutil.which(HAPROXY) is None:
            raise AssertionError(f"{HAPROXY} missing: scripts/setup.sh installs the Debian package haproxy")
        self.master_port, self.any_port = free_ports(2, 19640)
        self.stats = root / "haproxy.sock"
        self.cfg = root / "haproxy.cfg"
        self.cfg.write_text(haproxy_config(c, self.master_port, self.any_port, self.stats, method))
        check = subprocess.run([HAPROXY, "-c", "-f", str(self.cfg)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"haproxy -c rejects the config:\n{check.stdout}{check.stderr}"
        self.log = root / "haproxy.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.cfg)], stdout=log, stderr=subprocess.STDOUT)
        assert wait_until(self.stats.exists, 10), f"HAProxy did not start:\n{self.log.read_text()}"

    def _servers(self, backend: str) -> dict[str, dict[str, str]]:
        return {sv: r for (px, sv), r in show_stat(self.stats).items() if px == backend and sv.startswith("ca")}

    def status(self, backend: str) -> dict[str, str]:
        """Each server's check status in `backend`: UP, DOWN, ..."""
        return {sv: r["status"] for sv, r in self._servers(backend).items()}

    def sessions(self, backend: str) -> dict[str, int]:
        """Connections HAProxy sent to each server of `backend` so far."""
        return {sv: int(r["stot"]) for sv, r in self._servers(backend).items()}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabCluster]:
    c = LabCluster(tmp_path_factory.mktemp("haproxy-lab"), base_port=BASE_PORT)
    c.build()
    try:
        c.start()
        assert c.wait_for(lambda: asyncio.run(c.serving()) == {"ca1": "master", "ca2": "clone", "ca3": "clone"}, 60)
        yield c
    finally:
        c.stop()


@pytest.fixture
def haproxy(tmp_path: Path, lab: LabCluster, request: pytest.FixtureRequest) -> Iterator[HAProxy]:
    h = HAProxy(tmp_path, lab, getattr(request, "param", "OPTIONS"))
    try:
        yield h
    finally:
        h.stop()


@pytest.mark.parametrize("haproxy", ["OPTIONS", "HEAD", "GET"], indirect=True)
def test_every_check_method_marks_only_the_master_up_for_master_traffic_and_every_running_ca_for_any(
    haproxy: HAProxy,
) -> None:
    want_master = {"ca1": "UP", "ca2": "DOWN", "ca3": "DOWN"}
    want_any = {"ca1": "UP", "ca2": "UP", "ca3": "UP"}
    settled = wait_until(
        lambda: haproxy.status("ca_master") == want_master and haproxy.status("ca_any") == want_any, 15
    )
    assert settled, (haproxy.status("ca_master"), haproxy.status("ca_any"), haproxy.log.read_text()[-2000:])


class Traffic(threading.Thread):
    """An agent's requests through HAProxy, one every 0.1 s: (time, 'master' | 'clone' | failure)."""

    def __init__(self, lab: LabCluster, port: int) -> None:
        super().__init__(daemon=True)
        assert lab.pki is not None
        self.ca_file = str(lab.pki.ca_cert)
        self.url = f"https://127.0.0.1:{port}"
        self.answers: list[tuple[float, str]] = []
        self.done = threading.Event()

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        async with AgentProbe(self.ca_file, timeout=1.0) as probe:
            while not self.done.is_set():
                info = await probe.info(self.url)
                answer = ("clone" if info.master_host else "master") if info.ok else "failed"
                self.answers.append((time.monotonic(), answer))
                await asyncio.sleep(0.1)


def test_master_ca_killed_haproxy_sends_agent_traffic_only_to_the_master_then_only_to_the_new_one(
    lab: LabCluster, haproxy: HAProxy
) -> None:
    assert wait_until(lambda: haproxy.status("ca_master") == {"ca1": "UP", "ca2": "DOWN", "ca3": "DOWN"}, 15)
    traffic = Traffic(lab, haproxy.master_port)
    traffic.start()
    try:
        # more than 10 requests before the kill: a count, not a time, since each is a fresh TCP and TLS
        # connection plus 0.1 s, and on the loaded CI machine 2 s may hold fewer than 11
        time.sleep(2)
        wait_until(lambda: haproxy.sessions("ca_master")["ca1"] > 10, 20)
        before = haproxy.sessions("ca_master")
        assert before["ca1"] > 10 and before["ca2"] == before["ca3"] == 0, before
        killed_at = time.monotonic()
        lab.kill_ca("ca1")

        def new_master_up() -> str | None:
            up = [sv for sv, st in haproxy.status("ca_master").items() if st == "UP"]
            return up[0] if up in (["ca2"], ["ca3"]) else None

        assert wait_until(lambda: new_master_up() is not None, 60), (haproxy.status("ca_master"), lab.roles())
        new = new_master_up()
        assert new is not None
        up_after = time.monotonic() - killed_at
        at_switch = haproxy.sessions("ca_master")
        time.sleep(3)
        wait_until(lambda: haproxy.sessions("ca_master")[new] - at_switch[new] > 10, 20)  # as before the kill
        after = haproxy.sessions("ca_master")
    finally:
        traffic.done.set()
        traffic.join(10)
    gained = {sv: after[sv] - at_switch[sv] for sv in after}
    assert gained[new] > 10 and all(n == 0 for sv, n in gained.items() if sv != new), gained
    assert asyncio.run(lab.serving(timeout=SERVING_TIMEOUT))[new] == "master"
    answers = [a for _, a in traffic.answers]
    assert "clone" not in answers, "a request through ca_master reached a clone"
    gap = [t for t, a in traffic.answers if a != "master" and t > killed_at]
    print(
        f"HAProxy: {new} UP {up_after:.1f}s after the kill; {len(gap)} of {len(answers)} requests failed "
        f"(no server for {gap[-1] - gap[0] if gap else 0:.1f}s); sessions before {before}, after {after}"
    )
