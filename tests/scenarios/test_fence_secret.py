"""Issue 10, finding 9, over the real daemon: what a fence agent prints (its `-P password`) reaches
neither /history nor promote_failed.error, /cluster, /metrics, the store or the log.

A two-node lab cluster (simulated CAs, real `ca-watchdog run` daemons, the SQLite store) whose
fence_command prints a fence agent's command line with a password and fails. ca1, the master, is
killed with its daemon (no release): after its lease ends ca2 must fence it before promoting, the
fence fails, the promotion is refused and recorded as promote_failed.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_hostile_cscfg import _free_base_port, get, wait_settled

from ca_watchdog.lab.cluster import LabCluster

SECRET = "Fence-" + os.urandom(6).hex()
SCRIPT = f'echo "fence_ipmilan -a 10.0.0.9 -l admin -P {SECRET} --password={SECRET}"; echo "passwd={SECRET}"; exit 3'


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LabCluster]:
    c = LabCluster(
        tmp_path / "lab",
        names=("ca1", "ca2"),
        base_port=_free_base_port(),
        start_delay=0.5,
        failover={"restart_before_failover": False, "fence_command": ["sh", "-c", SCRIPT, "fence"]},
    )
    c.build()
    with c.running():
        yield c


def test_finding9_fence_command_output_with_a_password_reaches_no_history_api_store_or_log(cluster: LabCluster) -> None:
    c = cluster
    wait_settled(c)
    c.kill_daemon("ca1", signal.SIGKILL)  # no release: ca2 must fence ca1 before it promotes
    c.kill_ca("ca1")

    def history() -> list[dict[str, object]]:
        doc = json.loads(get(c, "ca2", "/history")[1])
        return list(doc if isinstance(doc, list) else doc.get("events", []))

    assert c.wait_for(lambda: any(e.get("type") == "promote_failed" for e in history()), 90), history()
    failed = [e for e in history() if e.get("type") == "promote_failed"]
    assert "fence_command failed for ca1" in str(failed[-1].get("error")), failed[-1]
    published = b""
    for path in ("/cluster", "/history", "/metrics", "/health", "/master", "/clone"):
        published += get(c, "ca2", path)[1]
    for f in sorted((c.root / "store").iterdir()):
        published += f.read_bytes()
    for node in c.nodes.values():
        published += node.daemon_log.read_bytes()
    assert SECRET.encode() not in published
    log = c.nodes["ca2"].daemon_log.read_text(errors="replace")
    assert "-P ***" in log, "the fence output is not in the journal (redacted)"
