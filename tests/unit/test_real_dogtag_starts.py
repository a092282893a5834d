"""Weaknesses of starts and promotions found on the real Dogtag bed (beds/dogtag/NOTES.md), pinned
down with a fake service and a fake agent probe around the real LocalCA.

- A JVM that dies before its port ever accepts was waited for until start_timeout: "connection
  refused" after a start command reads as "starting". The service's own view of the process (a pid
  file for service_control = "command", the unit's ActiveState for systemd) now ends that start.
- One getInfo timeout right after the promoted CA said running rolled the whole promotion back.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ca_watchdog import cscfg, service
from ca_watchdog.config import parse_settings
from ca_watchdog.node import LocalCA, NodeError
from ca_watchdog.probes.agent import REASON_NO_ANSWER, REASON_REFUSED, AgentInfo, AgentStatus
from ca_watchdog.service import CommandService, SystemdService, pid_file_alive, service_for
from ca_watchdog.startup import StartupWatch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
RUNNING = AgentStatus("running", None, 200, "10.10.2", "1", 0.01)


def refused() -> AgentStatus:
    return AgentStatus("down", REASON_REFUSED, None, None, None, 0.001)


class Unit:
    """A CA service whose process dies during the start (alive: False), runs (True) or cannot be
    told (None)."""

    name = "fake pki-tomcatd@pki-tomcat"

    def __init__(self, alive: bool | None) -> None:
        self.process_alive = alive
        self.calls: list[str] = []

    async def start(self, timeout: float) -> None:
        self.calls.append("start")

    async def stop(self, timeout: float) -> None:
        self.calls.append("stop")

    async def alive(self, timeout: float) -> bool | None:
        self.calls.append("alive")
        return self.process_alive


class Probe:
    """getStatus answers from a list (the last one repeats); getInfo from another."""

    def __init__(self, statuses: list[AgentStatus], infos: list[AgentInfo] | None = None) -> None:
        self.statuses = statuses
        self.infos = infos or [AgentInfo(None, None)]
        self.info_calls = 0

    async def status(self, url: str) -> AgentStatus:
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    serving = status

    async def info(self, url: str) -> AgentInfo:
        self.info_calls += 1
        return self.infos.pop(0) if len(self.infos) > 1 else self.infos[0]


def local_ca(
    tmp_path: Path, unit: Any, probe: Any, start_timeout: float = 60, sample: str = "CS.cfg.clone.sample"
) -> LocalCA:
    path = tmp_path / "CS.cfg"
    shutil.copy(FIXTURES / sample, path)
    settings = parse_settings(
        {
            "node": {"name": "ca1", "cs_cfg": str(path)},
            "timing": {"start_timeout": start_timeout},
            "cluster": {
                "members": [
                    {"name": "ca1", "agent_url": "https://ca1.example:8443"},
                    {"name": "ca2", "agent_url": "https://ca2.example:8443"},
                ]
            },
        }
    )
    return LocalCA(settings, unit, probe)


# ---- a) a JVM that dies before its port ever accepts --------------------------------------------


def test_a_start_whose_process_is_gone_before_its_port_accepts_fails_at_once(tmp_path: Path) -> None:
    unit = Unit(alive=False)
    ca = local_ca(tmp_path, unit, Probe([refused()]), start_timeout=60)

    async def go() -> float:
        await ca.start()
        t0 = time.monotonic()
        with pytest.raises(NodeError, match="died starting"):
            await asyncio.wait_for(ca.wait_running(), 5)  # not start_timeout (60 s), not the 10 s grace
        return time.monotonic() - t0

    assert asyncio.run(go()) < 1.0
    st = asyncio.run(ca.status())
    assert st.status == "down" and "died starting" in (st.reason or "")


class SlowStartUnit(Unit):
    """A start command that takes a while (bed.sh ca-start: 1.6 s; ExecStartPre under systemd): until
    it returns there is no pid file yet and the unit may still read inactive."""

    def __init__(self) -> None:
        super().__init__(alive=False)
        self.returned = asyncio.Event()
        self.go_on = asyncio.Event()

    async def start(self, timeout: float) -> None:
        self.calls.append("start")
        await self.go_on.wait()
        self.process_alive = True
        self.returned.set()


def test_a_ca_probed_while_its_start_command_still_runs_is_starting_not_dead(tmp_path: Path) -> None:
    """Seen on the real bed: the cycle's probe ran during `bed.sh ca-start`, found no pid file yet, and
    every start was read as a death; promotions rolled back one after the other."""
    unit = SlowStartUnit()
    ca = local_ca(tmp_path, unit, Probe([refused()]))

    async def go() -> tuple[AgentStatus, AgentStatus]:
        start = asyncio.create_task(ca.start())
        await asyncio.sleep(0.05)
        during = await ca.status()
        unit.go_on.set()
        await start
        return during, await ca.status()

    during, after = asyncio.run(go())
    assert during.status == "starting", during
    assert after.status == "starting", after
    assert unit.calls.count("alive") == 1  # asked once the command had returned, not before


def test_a_refused_port_of_a_start_whose_process_runs_is_still_starting(tmp_path: Path) -> None:
    for alive in (True, None):  # None: the service cannot tell, which never reads as dead
        unit = Unit(alive=alive)
        ca = local_ca(tmp_path, unit, Probe([refused()]))
        asyncio.run(ca.start())
        st = asyncio.run(ca.status())
        assert st.status == "starting", (alive, st)


def test_the_process_is_only_asked_about_while_the_port_has_never_accepted(tmp_path: Path) -> None:
    unit = Unit(alive=True)
    silent = AgentStatus("down", REASON_NO_ANSWER, None, None, None, 1.0)
    ca = local_ca(tmp_path, unit, Probe([silent, RUNNING]))
    asyncio.run(ca.start())
    assert asyncio.run(ca.status()).status == "starting"  # accepted, no answer: no question to the service
    assert asyncio.run(ca.status()).status == "running"
    assert asyncio.run(ca.status()).status == "running"  # no start in progress: never asked either
    assert "alive" not in unit.calls


def test_the_startup_watch_reads_a_dead_process_as_a_failed_start() -> None:
    w = StartupWatch(start_timeout=180)
    w.start_issued(0.0)
    assert not w.needs_liveness(refused(), 0.5)  # the start command still runs: nothing to ask yet
    w.start_returned()
    assert w.needs_liveness(refused(), 1.0)
    w.process_died(1.0)
    assert not w.needs_liveness(refused(), 2.0)  # asked once
    st = w.classify(refused(), 2.0)
    assert st.status == "down" and "died starting" in (st.reason or "")
    w.start_issued(10.0)  # the next start is a new one
    assert not w.died and w.classify(refused(), 11.0).status == "starting"


def test_a_pid_file_tells_a_running_process_from_a_dead_one(tmp_path: Path) -> None:
    pid_file = tmp_path / "ca.pid"
    assert pid_file_alive(str(pid_file)) is False  # a start leaves it; none is a process that is gone
    pid_file.write_text(f"{os.getpid()}\n")
    assert pid_file_alive(str(pid_file)) is True
    dead = subprocess.Popen(["true"])
    dead.wait()
    pid_file.write_text(f"{dead.pid}\n")
    assert pid_file_alive(str(pid_file)) is False
    pid_file.write_text("")
    assert pid_file_alive(str(pid_file)) is False
    pid_file.write_text("not a pid")
    assert pid_file_alive(str(pid_file)) is None
    assert asyncio.run(CommandService(("true",), ("true",)).alive(1)) is None  # no pid_file: cannot tell


def test_the_pid_file_setting_reaches_the_command_service(tmp_path: Path) -> None:
    settings = parse_settings(
        {
            "node": {
                "name": "ca1",
                "cs_cfg": str(tmp_path / "CS.cfg"),
                "service_control": "command",
                "start_command": ["true"],
                "stop_command": ["true"],
                "pid_file": str(tmp_path / "ca.pid"),
            },
            "cluster": {"members": [{"name": "ca1", "agent_url": "https://ca1.example:8443"}]},
        }
    )
    svc = service_for(settings.node)
    assert isinstance(svc, CommandService) and svc.pid_file == str(tmp_path / "ca.pid")


@pytest.mark.parametrize(
    ("answer", "alive"),
    [
        ("ActiveState=failed\nMainPID=0", False),
        ("ActiveState=inactive\nMainPID=0", False),
        ("ActiveState=active\nMainPID=4242", True),
        ("ActiveState=activating\nMainPID=0", True),
        ("ActiveState=\nMainPID=0", None),
    ],
)
def test_systemd_unit_state_tells_whether_the_ca_process_runs(
    monkeypatch: pytest.MonkeyPatch, answer: str, alive: bool | None
) -> None:
    seen: list[list[str]] = []

    async def fake_run(argv: list[str], timeout: float) -> tuple[int, str]:
        seen.append(list(argv))
        return 0, answer

    monkeypatch.setattr(service, "run_argv", fake_run)
    assert asyncio.run(SystemdService("pki-tomcatd@pki-tomcat.service").alive(5)) is alive
    assert seen == [["systemctl", "show", "-p", "ActiveState,MainPID", "pki-tomcatd@pki-tomcat.service"]]


# ---- b) one getInfo timeout right after the promoted CA says running ------------------------------

TIMEOUT = AgentInfo(None, None, ok=False, error="timeout")


def promote(ca: LocalCA) -> None:
    asyncio.run(ca.promote(["ca.crl.MasterCRL.enable=true"]))


def test_one_getinfo_timeout_after_the_promoted_ca_runs_is_retried_not_rolled_back(tmp_path: Path) -> None:
    probe = Probe([refused(), RUNNING], [TIMEOUT, AgentInfo(None, None)])
    ca = local_ca(tmp_path, Unit(alive=True), probe)
    promote(ca)
    assert probe.info_calls == 2
    assert cscfg.classify(ca.read()).role is cscfg.Role.MASTER


def test_a_getinfo_that_names_a_master_host_fails_the_promotion_at_once(tmp_path: Path) -> None:
    probe = Probe([refused(), RUNNING], [AgentInfo("ca2.example", 8443), AgentInfo(None, None)])
    ca = local_ca(tmp_path, Unit(alive=True), probe)
    with pytest.raises(NodeError, match="master_host"):
        promote(ca)
    assert probe.info_calls == 1


def test_a_getinfo_that_keeps_failing_fails_the_promotion_by_start_timeout(tmp_path: Path) -> None:
    probe = Probe([refused(), RUNNING], [TIMEOUT])
    ca = local_ca(tmp_path, Unit(alive=True), probe, start_timeout=2)
    t0 = time.monotonic()
    with pytest.raises(NodeError, match="getInfo failed"):
        promote(ca)
    assert time.monotonic() - t0 < 4
