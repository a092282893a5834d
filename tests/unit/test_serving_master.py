"""Runbook: /master and ca_watchdog_serving_master say what is true now, not what the last cycle saw.

Issue 12: /master answered from the last completed cycle, one cycle late after the key was taken, and
no metric said "this member serves as master". Both now read the actuator's lease as it is held at
the moment of the request (or scrape) and the CA and CS.cfg as last probed. The daemon here is the
real API app, the real Actuator's lease bookkeeping and the real metrics; no cycle runs.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from ca_watchdog.actuator import Actuator
from ca_watchdog.api import make_app
from ca_watchdog.metrics import Metrics
from ca_watchdog.model import CA_DOWN, CA_RUNNING, MemberState, Policy

POLICY = Policy(interval=1.0, ttl=10.0, safety_margin=3.0, fence_lead=1.0)  # fence point: 6 s after a renewal


def daemon() -> Any:
    """What the API reads of a Watchdog: its name, metrics, actuator and last observation."""
    actuator = Actuator(SimpleNamespace(node=SimpleNamespace(name="ca1")), None, None, None, POLICY)  # type: ignore[arg-type]
    local = MemberState("ca1", time.time(), ca_status=CA_RUNNING, cscfg_role="master")
    return SimpleNamespace(me="ca1", metrics=Metrics("ca1"), actuator=actuator, last_local=local)


@pytest.fixture
async def api() -> Any:
    wd = daemon()
    async with TestClient(TestServer(make_app(wd))) as client:
        yield wd, client


async def answers(client: TestClient[Any, Any]) -> tuple[int, int, int, str]:
    """/master by GET, OPTIONS and HEAD, and the serving_master line of /metrics."""
    codes = []
    for method in ("GET", "OPTIONS", "HEAD"):
        async with client.request(method, "/master") as r:
            codes.append(r.status)
    async with client.get("/metrics") as r:
        line = next(x for x in (await r.text()).splitlines() if x.startswith("ca_watchdog_serving_master{"))
    return codes[0], codes[1], codes[2], line


async def test_a_key_just_taken_makes_master_200_and_the_metric_1_without_waiting_for_a_cycle(api: Any) -> None:
    wd, client = api
    assert await answers(client) == (503, 503, 503, 'ca_watchdog_serving_master{member="ca1"} 0.0')
    wd.actuator.held_epoch, wd.actuator.last_renew = 4, time.monotonic()  # what _acquire() records
    assert await answers(client) == (200, 200, 200, 'ca_watchdog_serving_master{member="ca1"} 1.0')


async def test_a_released_key_makes_master_503_at_once(api: Any) -> None:
    wd, client = api
    wd.actuator.held_epoch, wd.actuator.last_renew = 4, time.monotonic()
    assert (await answers(client))[0] == 200
    wd.actuator.held_epoch, wd.actuator.last_renew = None, None  # what _release() records
    assert await answers(client) == (503, 503, 503, 'ca_watchdog_serving_master{member="ca1"} 0.0')


async def test_a_lease_not_renewed_up_to_the_fence_point_is_not_serving(api: Any) -> None:
    wd, client = api
    wd.actuator.held_epoch, wd.actuator.last_renew = 4, time.monotonic() - 5.5
    assert (await answers(client))[0] == 200
    wd.actuator.last_renew = time.monotonic() - 6.5  # past ttl - safety_margin - fence_lead: fencing
    assert (await answers(client))[0] == 503


@pytest.mark.parametrize(
    ("ca_status", "role"),
    [(CA_DOWN, "master"), ("starting", "master"), (CA_RUNNING, "clone"), (CA_RUNNING, "unreadable")],
)
async def test_with_the_key_a_ca_not_running_as_master_is_not_serving(api: Any, ca_status: str, role: str) -> None:
    wd, client = api
    wd.actuator.held_epoch, wd.actuator.last_renew = 4, time.monotonic()
    wd.last_local = MemberState("ca1", time.time(), ca_status=ca_status, cscfg_role=role)
    assert await answers(client) == (503, 503, 503, 'ca_watchdog_serving_master{member="ca1"} 0.0')


async def test_before_the_first_observation_nothing_is_serving(api: Any) -> None:
    wd, client = api
    wd.actuator.held_epoch, wd.actuator.last_renew = 4, time.monotonic()
    wd.last_local = None
    assert (await answers(client))[0] == 503
    for path in ("/health", "/clone"):
        async with client.options(path) as r:
            assert r.status == 503


async def test_while_a_promotion_stops_and_starts_the_ca_it_is_not_serving_whatever_the_last_probe_said(
    api: Any,
) -> None:
    """A promotion stops the clone's CA, writes the master CS.cfg and starts the CA. A cycle between the
    write and the next probe answer saw a master CS.cfg and the last answer "running", from the clone's
    JVM before the stop: /master said 200 and the metric 1 while the CA was stopped or starting (the
    Prometheus runbook saw the new master report 1 a second before a client could be served). Any long
    action stops or starts the CA: until it ends, the last probe cannot say the CA serves."""
    wd, client = api
    wd.actuator.held_epoch, wd.actuator.last_renew = 4, time.monotonic()  # the key, taken for the promotion
    done = asyncio.Event()
    wd.actuator.busy, wd.actuator.task = "promote: starting", asyncio.create_task(done.wait())
    assert await answers(client) == (503, 503, 503, 'ca_watchdog_serving_master{member="ca1"} 0.0')
    done.set()
    await wd.actuator.task  # the promotion verified the CA as master; the last observation says running
    assert await answers(client) == (200, 200, 200, 'ca_watchdog_serving_master{member="ca1"} 1.0')
