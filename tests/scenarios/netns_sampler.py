"""Sample how simulated CAs serve, from wherever this process runs (test_partition.py starts one
inside each network namespace with `ip netns exec`: the test's own namespace cannot reach them).

    python netns_sampler.py --out FILE --cafile CA [--period S] NAME=URL ...

Every `period` seconds one JSON line: {"t0": wall time before the probes, "t1": after,
"roles": {NAME: "master" | "clone" | other status}} (as LabCluster.serving classifies: running and
getInfo without master_host is a master). Runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from typing import TextIO

from ca_watchdog.probes.agent import AgentProbe


async def one(probe: AgentProbe, url: str) -> str:
    st = await probe.status(url)
    if st.status != "running":
        return str(st.status)
    info = await probe.info(url)
    if not info.ok:
        return "down"
    return "clone" if info.master_host else "master"


async def sample(out: TextIO, cafile: str, period: float, targets: dict[str, str]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with AgentProbe(cafile, timeout=1.0) as probe:
        while not stop.is_set():
            t0 = time.time()
            roles = await asyncio.gather(*(one(probe, u) for u in targets.values()))
            t1 = time.time()
            out.write(json.dumps({"t0": t0, "t1": t1, "roles": dict(zip(targets, roles, strict=True))}) + "\n")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, period - (t1 - t0)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--cafile", required=True)
    p.add_argument("--period", type=float, default=0.2)
    p.add_argument("targets", nargs="+", metavar="NAME=URL")
    a = p.parse_args()
    targets = dict(t.split("=", 1) for t in a.targets)
    with open(a.out, "a", buffering=1) as out:  # line-buffered: the test reads it while it runs
        asyncio.run(sample(out, a.cafile, a.period, targets))


if __name__ == "__main__":
    main()
