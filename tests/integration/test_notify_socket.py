"""Runbook: under systemd (Type=notify, WatchdogSec=, NotifyAccess=main) the daemon tells PID 1 what it does.

A real `ca-watchdog run` talks to a real NOTIFY_SOCKET (an AF_UNIX datagram socket this test
binds, standing in for PID 1, with SO_PASSCRED so every datagram's sender pid is known):

- `READY=1` exactly once, right after the first cycle;
- `WATCHDOG=1` together with `STATUS=<the cycle's reason line>` every cycle, from the main pid;
- `STOPPING=1` on SIGTERM, as the last message, and a clean exit;
- without JOURNAL_STREAM/INVOCATION_ID (not started by systemd) the log goes to stderr and has
  the same reason lines.

Lab ports: 19480-19502.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ca_watchdog.lab.cluster import LabCluster

BASE_PORT = 19480
INTERVAL = 1.0  # the lab's [timing].interval


@dataclass
class Datagram:
    at: float
    pid: int
    fields: dict[str, str]


class FakeSystemd:
    """The NOTIFY_SOCKET end of sd_notify: a datagram socket that records who sent what."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages: list[Datagram] = []

    def receive(self, until: float) -> None:
        """Read datagrams until the monotonic deadline `until`."""
        while (left := until - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
            except TimeoutError:
                return
            pid = -1
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid, _uid, _gid = struct.unpack("3i", payload[: struct.calcsize("3i")])
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(Datagram(time.monotonic(), pid, fields))

    def wait_for(self, predicate: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(predicate in m.fields for m in self.messages):
                return True
            self.receive(min(deadline, time.monotonic() + 0.5))
        return any(predicate in m.fields for m in self.messages)

    def count(self, key: str) -> int:
        return sum(1 for m in self.messages if key in m.fields)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[LabCluster]:
    c = LabCluster(tmp_path / "lab", base_port=BASE_PORT)
    c.build()
    try:
        c.start(daemons=False)  # the CAs only: the test runs ca1's daemon itself
        yield c
    finally:
        c.stop()


@pytest.fixture
def fake_systemd() -> Iterator[FakeSystemd]:
    # a short directory: AF_UNIX paths are limited to 107 bytes
    d = Path(tempfile.mkdtemp(prefix="cw-notify-"))
    fs = FakeSystemd(d)
    try:
        yield fs
    finally:
        fs.close()
        fs.path.unlink(missing_ok=True)
        d.rmdir()


def start_daemon(lab: LabCluster, name: str, notify_socket: Path, stderr: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID", "NOTIFY_SOCKET")}
    env["NOTIFY_SOCKET"] = str(notify_socket)
    with open(stderr, "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "ca_watchdog.cli", "run", "--config", str(lab.nodes[name].config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def test_the_daemon_reports_ready_watchdog_status_and_stopping_over_notify_socket(
    lab: LabCluster, fake_systemd: FakeSystemd, tmp_path: Path
) -> None:
    stderr = tmp_path / "daemon.stderr"
    proc = start_daemon(lab, "ca1", fake_systemd.path, stderr)
    try:
        assert fake_systemd.wait_for("READY", 30), f"no READY=1 within 30 s; stderr:\n{stderr.read_text()}"
        # a few more cycles
        fake_systemd.receive(time.monotonic() + 5 * INTERVAL + 0.5)
        proc.send_signal(signal.SIGTERM)
        assert fake_systemd.wait_for("STOPPING", 10), "no STOPPING=1 after SIGTERM"
        assert proc.wait(timeout=15) == 0
        fake_systemd.receive(time.monotonic() + 0.5)  # anything sent after STOPPING
    finally:
        stop(proc)

    msgs = fake_systemd.messages
    log = stderr.read_text()
    # every datagram comes from the daemon's main process (NotifyAccess=main accepts nothing else)
    assert {m.pid for m in msgs} == {proc.pid}, [(m.pid, m.fields) for m in msgs]

    # READY=1 exactly once, and only after the first cycle has reported
    assert fake_systemd.count("READY") == 1
    ready_at = next(i for i, m in enumerate(msgs) if "READY" in m.fields)
    assert msgs[ready_at].fields["READY"] == "1"
    cycles_before_ready = [m for m in msgs[:ready_at] if "WATCHDOG" in m.fields]
    assert len(cycles_before_ready) == 1, [m.fields for m in msgs[:ready_at]]

    # WATCHDOG=1 with STATUS=<reason line> in the same datagram, every cycle
    cycles = [m for m in msgs if "WATCHDOG" in m.fields]
    assert len(cycles) >= 5, [m.fields for m in msgs]
    for m in cycles:
        assert m.fields["WATCHDOG"] == "1"
        status = m.fields.get("STATUS")
        assert status, f"a WATCHDOG=1 without STATUS: {m.fields}"
        assert status.split(":", 1)[0] in {"bootstrap", "renew", "wait", "promote"}, status
        # the status is the reason line the cycle logged
        assert f" INFO {status}\n" in log, f"STATUS {status!r} is not a logged reason line"
    # the loop pings every interval: no gap anywhere near WatchdogSec
    gaps = [b.at - a.at for a, b in itertools.pairwise(cycles)]
    assert max(gaps) < 4 * INTERVAL, gaps
    # the single node bootstraps, then renews its lease as master
    assert cycles[0].fields["STATUS"].startswith("bootstrap"), cycles[0].fields
    assert cycles[-1].fields["STATUS"].startswith("renew"), cycles[-1].fields

    # STOPPING=1 once, and nothing after it
    assert fake_systemd.count("STOPPING") == 1
    assert "STOPPING" in msgs[-1].fields and msgs[-1].fields["STOPPING"] == "1"


def test_without_systemd_the_log_goes_to_stderr_with_the_reason_lines(
    lab: LabCluster, fake_systemd: FakeSystemd, tmp_path: Path
) -> None:
    stderr = tmp_path / "daemon.stderr"
    proc = start_daemon(lab, "ca1", fake_systemd.path, stderr)
    try:
        assert fake_systemd.wait_for("READY", 30), stderr.read_text()
        fake_systemd.receive(time.monotonic() + 2 * INTERVAL)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        stop(proc)
    lines = stderr.read_text().splitlines()
    # "<asctime> <member> <LEVEL> <message>": the member name in every line, one reason line per cycle
    reasons = [
        ln for ln in lines if " ca1 INFO " in ln and ln.split(" INFO ", 1)[1].split(":", 1)[0] in ("renew", "bootstrap")
    ]
    assert any(" ca1 INFO bootstrap: " in ln for ln in reasons), lines
    assert sum(" ca1 INFO renew: " in ln for ln in reasons) >= 2, lines
    assert any(ln.endswith(" ca1 INFO stopping") for ln in lines), lines
