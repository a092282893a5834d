"""Issue 10, findings 7 and 10, over the real daemon: one hostile answer from a CA stops nothing.

A two-node lab cluster (simulated CAs, real `ca-watchdog run` daemons, the SQLite store). The
clone's CA is restarted answering getStatus with deep JSON (RecursionError in json.loads before
the fix) and with UTF-16 XML whose DTD defines `&r;` as "running" (accepted as running before the
fix). The daemon must keep answering and cycling, report the CA down with "bad answer", never
count it running, and log no traceback.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_hostile_cscfg import _free_base_port, get, last_cycle, member, wait_settled

from ca_watchdog.lab.cluster import LabCluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LabCluster]:
    c = LabCluster(tmp_path / "lab", names=("ca1", "ca2"), base_port=_free_base_port(), start_delay=0.5)
    c.build()
    with c.running():
        yield c


def _restart_ca(c: LabCluster, name: str, args: list[str]) -> None:
    """Restart `name`'s CA with these simca options, and its daemon, so that a CA restart the daemon
    itself does (a clone's CA seen down) keeps them."""
    c.set_ca_args(name, args)
    c.kill_daemon(name, signal.SIGTERM)
    c.stop_ca(name)
    c.start_ca(name)
    c.start_daemon(name)


@pytest.mark.parametrize("fault", ["deep-json", "utf16-dtd"])
def test_finding7_and_10_a_hostile_getstatus_is_a_bad_answer_and_the_daemon_keeps_cycling(
    cluster: LabCluster, fault: str
) -> None:
    c = cluster
    wait_settled(c)
    log = c.nodes["ca2"].daemon_log
    _restart_ca(c, "ca2", ["--status-fault", fault])
    size = log.stat().st_size
    pid = c.daemon_pid("ca2")

    def bad_answer() -> bool:
        try:
            m = member(c, "ca2", "ca2")
        except (OSError, ValueError, TypeError, StopIteration):  # the restarted daemon's API or view not up yet
            return False
        return m.get("ca_status") != "running" and "bad answer" in json.dumps(m)

    assert c.wait_for(bad_answer, 30), get(c, "ca2", "/cluster")[1][:2000]
    first_cycle = last_cycle(c, "ca2")
    t_end = time.monotonic() + 6
    while time.monotonic() < t_end:
        code, body, took = get(c, "ca2", "/health", timeout=2.0)
        assert took < 2.0, f"/health took {took:.2f} s"
        assert code == 503, (code, body)  # never "running" on a hostile answer
        assert member(c, "ca2", "ca2").get("ca_status") != "running"
        time.sleep(0.5)
    assert last_cycle(c, "ca2") > first_cycle + 3, "the daemon stopped cycling"
    assert c.daemon_pid("ca2") == pid
    with open(log, "rb") as f:
        f.seek(size)
        text = f.read()
    assert b"Traceback" not in text and b"cycle failed" not in text, text[-3000:].decode("utf-8", "replace")
    # the CA answers like Dogtag again: the daemon sees it running
    _restart_ca(c, "ca2", [])

    def clone_again() -> bool:
        try:
            return get(c, "ca2", "/clone")[0] == 200
        except OSError:  # the restarted daemon's API is not up yet
            return False

    assert c.wait_for(clone_again, 60), member(c, "ca2", "ca2")
