"""Issue 10, findings 1 and 4, over the real daemon: what the CA's account can do to CS.cfg.

A two-node lab cluster (simulated CAs, real `ca-watchdog run` daemons, the SQLite store, no
389-DS). The clone's CS.cfg is replaced by a symlink to a secret file, a FIFO, a 200 MB file and
a symlink to /dev/zero; the daemons must keep answering and cycling, and the secret must appear
nowhere they publish.
"""

from __future__ import annotations

import json
import os
import random
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from ca_watchdog.lab.cluster import LabCluster

SECRET = "hunter2-Tr0ub4dor-" + os.urandom(6).hex()


def _free_base_port() -> int:
    for _ in range(50):
        base = random.randrange(30000, 40000, 50)
        socks = []
        try:
            for p in range(base, base + 30):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LabCluster]:
    c = LabCluster(tmp_path / "lab", names=("ca1", "ca2"), base_port=_free_base_port(), start_delay=0.5)
    c.build()
    with c.running():
        yield c


def get(c: LabCluster, name: str, path: str, timeout: float = 5.0) -> tuple[int, bytes, float]:
    assert c.pki is not None
    ctx = ssl.create_default_context(cafile=str(c.pki.ca_cert))
    url = f"https://127.0.0.1:{c.nodes[name].api_port}{path}"
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as r:
            return r.status, r.read(), time.monotonic() - t0
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), time.monotonic() - t0


def member(c: LabCluster, observer: str, name: str) -> dict[str, object]:
    doc = json.loads(get(c, observer, "/cluster")[1])
    members = doc.get("members")
    found = members.get(name) if isinstance(members, dict) else next(m for m in members if m.get("name") == name)
    return dict(found)


def last_cycle(c: LabCluster, name: str) -> float:
    for line in get(c, name, "/metrics")[1].decode().splitlines():
        if line.startswith("ca_watchdog_last_cycle_timestamp_seconds "):
            return float(line.split()[1])
    raise AssertionError("no last_cycle_timestamp_seconds")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def wait_settled(c: LabCluster) -> None:
    def ok() -> bool:
        try:
            return get(c, "ca1", "/master")[0] == 200 and get(c, "ca2", "/clone")[0] == 200
        except OSError:
            return False

    assert c.wait_for(ok, 60), "the cluster did not settle (ca1 master, ca2 clone)"


def test_finding1_a_symlink_to_a_secret_file_leaks_nowhere(cluster: LabCluster, tmp_path: Path) -> None:
    c = cluster
    wait_settled(c)
    secret = tmp_path / "password.conf"
    secret.write_text(f"{SECRET}\n")
    cs = c.nodes["ca2"].cs_cfg
    original = cs.read_bytes()
    cs.unlink()
    cs.symlink_to(secret)
    # the daemon sees it and says what is wrong, without reading it
    assert c.wait_for(lambda: "symlink" in json.dumps(member(c, "ca2", "ca2")), 30), member(c, "ca2", "ca2")
    time.sleep(3)  # a few more cycles: history, store and log writes
    published = b""
    for name in c.names:
        for path in ("/cluster", "/history", "/metrics", "/health", "/master", "/clone"):
            published += get(c, name, path)[1]
    for f in sorted((c.root / "store").iterdir()):
        published += f.read_bytes()
    for node in c.nodes.values():
        published += node.daemon_log.read_bytes()
    assert SECRET.encode() not in published
    assert SECRET.encode("utf-16-le") not in published
    assert secret.read_text() == f"{SECRET}\n", "the secret file was written to"
    assert cs.is_symlink()
    # the CA's account puts the real file back: the daemon reads it again
    cs.unlink()
    cs.write_bytes(original)
    assert c.wait_for(lambda: member(c, "ca2", "ca2").get("cscfg_role") == "clone", 30), member(c, "ca2", "ca2")


def test_finding4_fifo_huge_file_and_dev_zero_as_cscfg_keep_the_daemon_answering(
    cluster: LabCluster, tmp_path: Path
) -> None:
    c = cluster
    wait_settled(c)
    cs = c.nodes["ca2"].cs_cfg
    original = cs.read_bytes()
    pid = c.daemon_pid("ca2")
    assert pid is not None
    measurements: dict[str, tuple[float, float]] = {}
    for kind in ("fifo", "200MB", "dev-zero"):
        cs.unlink()
        if kind == "fifo":
            os.mkfifo(cs)
        elif kind == "200MB":
            with open(cs, "wb") as f:
                f.write(b"a=1\n" * (200 * 1024 * 1024 // 4))  # real data, not a hole
        else:
            cs.symlink_to("/dev/zero")
        t_end = time.monotonic() + 12
        slowest = 0.0
        peak = 0.0
        first_cycle = last_cycle(c, "ca2")
        while time.monotonic() < t_end:
            _code, _body, took = get(c, "ca2", "/health", timeout=2.0)
            assert took < 2.0, f"{kind}: /health took {took:.2f} s"
            slowest = max(slowest, took)
            peak = max(peak, rss_mb(pid))
            time.sleep(0.5)
        assert last_cycle(c, "ca2") > first_cycle + 5, f"{kind}: the daemon stopped cycling"
        assert peak < 300, f"{kind}: RSS {peak:.0f} MB"
        problem = json.dumps(member(c, "ca2", "ca2"))
        assert "refused" in problem, problem
        measurements[kind] = (slowest, peak)
        cs.unlink()
        cs.write_bytes(original)
    print(f"\n/health slowest answer and daemon peak RSS per case: {measurements}")
    assert c.daemon_pid("ca2") == pid
    assert c.wait_for(lambda: member(c, "ca2", "ca2").get("cscfg_role") == "clone", 30)
