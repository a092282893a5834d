"""Regressions found by the fault-injection scenarios (tests/scenarios/test_faults.py), pinned
down without the lab: a fake service unit and a fake agent probe around the real LocalCA."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

from ca_watchdog import cscfg
from ca_watchdog.config import parse_settings
from ca_watchdog.node import LocalCA
from ca_watchdog.probes.agent import AgentStatus

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


class HungUnit:
    """A service whose process is hung (SIGSTOPped): it answers nothing, but still runs until stopped."""

    name = "fake pki-tomcatd@pki-tomcat"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.process = "hung"  # hung | stopped | running

    async def start(self, timeout: float) -> None:
        self.calls.append("start")
        if self.process == "stopped":  # a unit that is still active is not started again
            self.process = "running"

    async def stop(self, timeout: float) -> None:
        self.calls.append("stop")
        self.process = "stopped"


class Probe:
    def __init__(self, unit: HungUnit) -> None:
        self.unit = unit

    async def status(self, url: str) -> AgentStatus:
        if self.unit.process == "running":
            return AgentStatus("running", None, 200, "11.5.0", "1", 0.01)
        return AgentStatus("down", "timeout", None, None, None, 1.0)

    serving = status  # this fake CA's database is always up


def _local_ca(tmp_path: Path, sample: str) -> tuple[LocalCA, HungUnit, Path]:
    path = tmp_path / "CS.cfg"
    shutil.copy(FIXTURES / sample, path)
    settings = parse_settings(
        {
            "node": {"name": "ca1", "cs_cfg": str(path)},
            "cluster": {
                "members": [
                    {"name": "ca1", "agent_url": "https://ca1.example:8443"},
                    {"name": "ca2", "agent_url": "https://ca2.example:8443"},
                ]
            },
        }
    )
    unit = HungUnit()
    probe: Any = Probe(unit)
    return LocalCA(settings, unit, probe), unit, path


def test_demoting_a_hung_master_stops_it_before_writing_the_clone_cscfg(tmp_path: Path) -> None:
    """A frozen master CA looks down, but still holds its master configuration in memory: demotion
    used to write the clone CS.cfg around it without stopping it, and it came back as a second
    master when it was thawed."""
    ca, unit, path = _local_ca(tmp_path, "CS.cfg.master.sample")
    asyncio.run(ca.demote("ca2", start=False))
    assert unit.calls[:1] == ["stop"], unit.calls
    assert unit.process == "stopped"
    assert cscfg.classify(cscfg.read_cscfg(path)).role is cscfg.Role.CLONE
