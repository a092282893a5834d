"""Runbook: the probe cadence (observe.Cadence) that keeps probes from stretching the HA cycle.

Probes are fakes whose answers the test releases one by one, so nothing here depends on timing except
the overlap test, whose interval (20 ms) is far below the hanging probe's wait.
"""

from __future__ import annotations

import asyncio

import pytest

from ca_watchdog.observe import Cadence

HOUR = 3600.0  # an interval that never ticks during a test: only aim/reset start probes


class Probes:
    """Each call is one probe; it answers its number once the test releases it."""

    def __init__(self) -> None:
        self.started = 0
        self.release: dict[int, asyncio.Event] = {}

    async def __call__(self) -> int:
        self.started += 1
        n = self.started
        self.release[n] = asyncio.Event()
        await self.release[n].wait()
        return n

    async def answer(self, n: int) -> None:
        self.release[n].set()
        await asyncio.sleep(0)  # let the probe's task finish
        await asyncio.sleep(0)


async def test_a_probe_waiting_for_its_timeout_does_not_delay_the_next_ones() -> None:
    probes = Probes()
    cadence: Cadence[int] = Cadence(0.02, max_pending=100)
    cadence.aim("ca", probes)
    await asyncio.sleep(0.3)
    try:
        # the first probe never answered, yet one started about every interval
        assert probes.started >= 5, f"only {probes.started} probes in 0.3 s at a 20 ms interval"
    finally:
        cadence.close()


async def test_waiting_probes_are_capped_so_a_dead_target_cannot_pile_them_up() -> None:
    probes = Probes()
    cadence: Cadence[int] = Cadence(0.01, max_pending=3)
    cadence.aim("ca", probes)
    await asyncio.sleep(0.2)
    try:
        assert probes.started == 3
    finally:
        cadence.close()


async def test_a_newer_answer_supersedes_older_probes_still_waiting() -> None:
    probes = Probes()
    cadence: Cadence[int] = Cadence(HOUR, max_pending=10)
    cadence.aim("ca", probes)
    await asyncio.sleep(0)
    cadence.reset()  # a second probe (and the first dropped) ...
    await asyncio.sleep(0)
    cadence._launch()  # ... and a third, both waiting
    await asyncio.sleep(0)
    await probes.answer(3)
    assert await cadence.answers() == [3]
    await probes.answer(2)  # started before 3, answered after: cancelled, never counted
    assert await cadence.answers() == []
    assert cadence.latest == 3
    cadence.close()


async def test_the_cycle_waits_for_a_first_answer_after_a_reset_but_not_afterwards() -> None:
    probes = Probes()
    cadence: Cadence[int] = Cadence(HOUR, max_pending=10)
    cadence.aim("ca", probes)
    first = asyncio.ensure_future(cadence.answers())
    await asyncio.sleep(0)
    assert not first.done(), "answers() returned before any probe answered"
    await probes.answer(1)
    assert await first == [1]
    assert await asyncio.wait_for(cadence.answers(), 0.1) == []  # no new answer: no wait
    cadence._launch()  # probe 2, still waiting when ...
    await asyncio.sleep(0)
    cadence.reset()  # ... a start is issued: probe 3 starts, and what was started before no longer counts
    await asyncio.sleep(0)
    await probes.answer(2)
    after = asyncio.ensure_future(cadence.answers())
    await asyncio.sleep(0)
    assert not after.done(), "an answer from before the reset was taken"
    await probes.answer(3)
    assert await after == [3]
    cadence.close()


async def test_a_new_target_drops_the_old_targets_answers() -> None:
    probes = Probes()
    cadence: Cadence[int] = Cadence(HOUR, max_pending=10)
    cadence.aim("ca1", probes)
    await asyncio.sleep(0)
    await probes.answer(1)
    cadence.aim("ca1", probes)  # same target: nothing happens
    assert probes.started == 1
    cadence.aim("ca2", probes)
    await asyncio.sleep(0)
    assert probes.started == 2
    await probes.answer(2)
    assert await cadence.answers() == [2]
    cadence.close()


async def test_a_probe_that_raises_fails_the_cycle_that_takes_its_answers() -> None:
    async def broken() -> int:
        raise RuntimeError("bug in a probe")

    cadence: Cadence[int] = Cadence(HOUR, max_pending=10)
    cadence.aim("ca", broken)
    with pytest.raises(RuntimeError, match="bug in a probe"):
        await asyncio.wait_for(cadence.answers(), 1.0)
    cadence.close()
