"""Runbook: a probe that waits for its timeout does not stretch the HA cycle.

A frozen CA (SIGSTOP: the kernel still accepts the TCP connection, nothing answers) makes every probe
wait for the whole `agent_timeout`. When the cycle waited for its probe, each cycle took the timeout, so
`failure_threshold` failed probes took threshold x timeout. Probes now run on their own cadence (one
every `interval`, overlapping while they wait): the frozen CA is declared failed about
threshold x interval + one timeout after the freeze. Here the timeout (2.5 s) is five intervals long, so the
two are far apart: at most 3 x 0.5 + 2.5 + 1 s of scheduling slack = 5 s, where the old cycle took at
least 3 x 2.5 = 7.5 s. A probe still counts as failed only at its own timeout, never earlier: a CA that
answers every probe later than one interval but within the timeout is never counted down.

One member (no failover to watch), the real daemon and simulated CA processes, the SQLite store, read every
20 ms: the failures count from the moment the daemon publishes `ca_down_streak` >= threshold.
Lab ports: 19520-19541.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ca_watchdog.lab.cluster import LAB_TIMING, LabCluster

BASE_PORT = 19520
INTERVAL, TIMEOUT, THRESHOLD = 0.5, 2.5, 3
TIMING = {
    **LAB_TIMING,
    "interval": INTERVAL,
    "agent_timeout": TIMEOUT,
    "failure_threshold": THRESHOLD,
    "store_timeout": 0.5,
    "ttl": 12.0,
}
SLACK = 1.0  # scheduling on a loaded 2-core machine


def _record(c: LabCluster) -> dict[str, Any] | None:
    from ca_watchdog.store import open_store

    async def read() -> dict[str, Any] | None:
        s = c.settings("ca1")
        store = open_store(s.store, ["ca1"], s.timing.store_timeout)
        try:
            rec = (await store.get_members()).records.get("ca1")
            return dict(rec.payload) if rec is not None else None
        finally:
            await store.close()

    return asyncio.run(read())


def _watch(c: LabCluster, seconds: float) -> list[dict[str, Any]]:
    """Every distinct member record of ca1 published in `seconds`, with `seen_at` (when it was first read;
    its `updated_at` is its cycle's start, which can precede the probe it reports by the probe's wait)."""
    seen: list[dict[str, Any]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rec = _record(c)
        if rec is not None and (not seen or rec["updated_at"] != seen[-1]["updated_at"]):
            seen.append({**rec, "seen_at": time.time()})
        time.sleep(0.02)
    return seen


def _steady(c: LabCluster) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rec = _record(c)
        if rec is not None and rec.get("ca_status") == "running" and rec.get("cscfg_role") == "master":
            time.sleep(2 * INTERVAL)
            return
        time.sleep(0.2)
    raise AssertionError(f"ca1 never reported its CA running: {_record(c)}")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[LabCluster]:
    c = LabCluster(tmp_path / "lab", names=("ca1",), base_port=BASE_PORT, timing=dict(TIMING), start_delay=0.2)
    yield c
    c.thaw_ca("ca1")
    c.stop()


def test_a_frozen_ca_is_declared_failed_threshold_intervals_plus_one_timeout_after_the_freeze(
    lab: LabCluster,
) -> None:
    lab.build()
    lab.start()
    _steady(lab)
    frozen_at = time.time()
    lab.freeze_ca("ca1")
    records = _watch(lab, 3 * TIMEOUT + 2)
    failed = next((r for r in records if r["ca_down_streak"] >= THRESHOLD), None)
    assert failed is not None, f"never counted {THRESHOLD} failed probes: {[r['ca_down_streak'] for r in records]}"
    took = failed["seen_at"] - frozen_at
    bound = THRESHOLD * INTERVAL + TIMEOUT + SLACK
    print(f"frozen CA declared failed {took:.2f}s after the freeze (bound {bound:g}s)")
    assert took <= bound, (
        f"frozen CA declared failed {took:.2f}s after the freeze, over {bound:g}s: the probes that wait for "
        f"their {TIMEOUT:g}s timeout still stretch the cycle (threshold x timeout = {THRESHOLD * TIMEOUT:g}s)"
    )
    # each failure is a probe that reached its own timeout: the last one started (threshold - 1) intervals
    # after the first, so no earlier than that plus one timeout (less the in-flight probe's head start)
    earliest = (THRESHOLD - 1) * INTERVAL + TIMEOUT - 0.2
    assert took >= earliest, f"declared failed after {took:.2f}s: a probe was counted failed before its timeout"
    assert failed["ca_status"] == "down" and failed["ca_reason"] == "timeout", failed


def test_a_ca_answering_slower_than_the_interval_within_the_timeout_is_never_counted_down_nor_slows_the_cycle(
    lab: LabCluster,
) -> None:
    lab.ca_args["ca1"] = ["--status-delay", str(3 * INTERVAL)]  # 1.5 s: three intervals, under the 2.5 s timeout
    lab.build()
    lab.start()
    _steady(lab)
    records = _watch(lab, 6.0)
    assert len(records) >= 6 / INTERVAL - 3, f"the cycle stalled: {len(records)} records in 6 s"
    down = [(r["ca_status"], r["ca_down_streak"], r.get("ca_reason")) for r in records if r["ca_status"] != "running"]
    assert not down, f"a slow but healthy CA was counted down: {down}"
