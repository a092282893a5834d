"""Failover time on the real Dogtag 10.10 bed (beds/dogtag): kill -9 of the master's JVM to the new
master answering `running` as master, split into detection, decision, stop, write and start.

    .venv/bin/python bench/real_dogtag.py [--runs 3] [--json results.json]

Two `ca-watchdog run` daemons drive the bed's CAs (tests/real/dogtag_cluster.py), with the shipped
timing defaults and `restart_before_failover = false` (a restart would hide the failover). The
split comes from the promoting daemon's own history event (`promoted`: decided, stopped, written,
started, running) and the old master's `released` event; total is seen from outside too (getInfo
polled every 0.25 s). The floor is the detection setting (interval x failure_threshold) plus the
start time of this CA alone, measured here first; the manual procedure done by hand on this
machine took 35.9 s (reference/real-dogtag). Runs alternate the master.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "real"))

from dogtag_bed import DogtagBed
from dogtag_cluster import MEMBERS, RealCluster, wait_until

MANUAL_S = 35.9  # reference/real-dogtag/README.md: first stop to the new master running, by hand


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def history(c: RealCluster) -> list[dict[str, Any]]:
    r = c.cli("ca1", "history", "--json")
    events: list[dict[str, Any]] = json.loads(r.stdout)
    return events


def measure_start(bed: DogtagBed, inst: str) -> float:
    """Stop then start one CA alone: start command to getStatus running."""
    bed.stop_ca(inst)
    t0 = time.monotonic()
    bed.start_ca(inst)
    bed.wait_running(inst, timeout=300, interval=0.1)
    return time.monotonic() - t0


def one_run(c: RealCluster, master: str) -> dict[str, Any]:
    inst = MEMBERS[master][0]
    fault_wall = time.time()
    fault = time.monotonic()
    c.bed.kill_ca(inst)
    seen: float | None = None
    deadline = fault + 400
    while time.monotonic() < deadline:
        if c.master_serving(other_than=master):
            seen = time.monotonic() - fault
            break
        time.sleep(0.25)
    if seen is None:
        return {"ok": False, "error": "no new master within 400 s", "logs": c.logs()[-3000:]}
    time.sleep(1.0)
    events = [e for e in history(c) if float(e.get("at", 0)) >= fault_wall]
    promoted = next((e for e in events if e.get("type") == "promoted" and e.get("name") != master), None)
    released = next((e for e in events if e.get("type") == "released" and e.get("name") == master), None)
    if promoted is None:
        return {"ok": False, "error": "no promoted event", "events": events}
    out: dict[str, Any] = {"ok": True, "old_master": master, "new_master": promoted["name"]}
    decided = float(promoted["decided_at"])
    if released is not None:
        out["detection_s"] = float(released["at"]) - fault_wall
        out["decision_s"] = decided - float(released["at"])
    else:
        out["detection_s"] = decided - fault_wall
        out["decision_s"] = 0.0
    out["stop_s"] = float(promoted["stopped_at"]) - decided
    out["write_s"] = float(promoted["written_at"]) - float(promoted["stopped_at"])
    out["start_s"] = float(promoted["running_at"]) - float(promoted["written_at"])
    out["total_s"] = float(promoted["running_at"]) - fault_wall
    out["seen_from_outside_s"] = seen
    # and the old master back as a clone (a steady cluster): its clone start now waits for the new master
    wait_until(lambda: c.steady() == promoted["name"], 400, 0.25, "the old master back as a clone\n" + c.logs())
    out["clone_back_s"] = time.monotonic() - fault
    for k, v in list(out.items()):
        if isinstance(v, float):
            out[k] = round(v, 2)
    return out


def med(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [float(r[key]) for r in runs if r.get("ok") and r.get(key) is not None]
    return round(statistics.median(values), 2) if values else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    bed = DogtagBed()
    bed.ensure_running()
    start_alone = [measure_start(bed, "pki-tomcat-clone") for _ in range(2)]
    log(f"start of the clone CA alone: {', '.join(f'{s:.1f}' for s in start_alone)} s")
    with tempfile.TemporaryDirectory(prefix="cawd-bench-real-") as tmp:
        c = RealCluster(bed, Path(tmp), restart_before_failover=False)
        c.start()
        runs: list[dict[str, Any]] = []
        try:
            for i in range(a.runs):
                master = wait_until(c.steady, 400, message="a steady cluster\n" + c.logs())
                log(f"run {i + 1}: kill -9 the JVM of {master}")
                r = one_run(c, master)
                log(json.dumps(r))
                runs.append(r)
                if not r.get("ok"):
                    break
            wait_until(c.steady, 400, message="a steady cluster\n" + c.logs())
            if c.steady() != "ca1":
                c.cli("ca1", "switchover", "--to", "ca1")
                wait_until(lambda: c.steady() == "ca1", 400, message="back to ca1\n" + c.logs())
        finally:
            c.stop()
    detection_setting = 2.0 * 3  # interval x failure_threshold (the shipped defaults)
    floor = detection_setting + statistics.median(start_alone)
    result = {
        "runs": runs,
        "median": {
            k: med(runs, k)
            for k in ("detection_s", "decision_s", "stop_s", "write_s", "start_s", "total_s", "clone_back_s")
        },
        "start_alone_s": [round(s, 2) for s in start_alone],
        "floor_s": round(floor, 2),
        "manual_s": MANUAL_S,
    }
    print(json.dumps(result, indent=2))
    total = result["median"]["total_s"]
    if total is not None:
        print(
            f"median total {total} s; floor {floor:.1f} s (detection {detection_setting:g} s + start alone); "
            f"manual procedure {MANUAL_S} s"
        )
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    return 0 if runs and all(r.get("ok") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
