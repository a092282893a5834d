"""Run or replay simulated histories.

    .venv/bin/python -m tests.sim.run --seed 1234            # replay one seed, print its event log
    .venv/bin/python -m tests.sim.run --seeds 0:1000 --jobs 2 # many seeds, report the failing ones

A history depends only on its seed (and the member count, which the seed picks unless --members says).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from tests.sim.world import Result, run_history


def replay_command(seed: int) -> str:
    return f"PYTHONHASHSEED=0 .venv/bin/python -m tests.sim.run --seed {seed}"


def run_many(seeds: range, jobs: int) -> tuple[list[Result], float]:
    os.environ["PYTHONHASHSEED"] = "0"
    t0 = time.monotonic()
    if jobs <= 1:
        results = [run_history(s) for s in seeds]
    else:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            results = list(ex.map(run_history, seeds, chunksize=50))
    return results, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--seeds", default="0:100", help="START:STOP")
    ap.add_argument("--members", type=int)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    if args.seed is not None:
        r = run_history(args.seed, args.members, keep_log=True)
        print("\n".join(r.log))
        print(f"seed {r.seed}: {r.members} members, {r.failovers} promotions, violations: {r.violations or 'none'}")
        return 1 if r.violations else 0
    start, stop = (int(x) for x in args.seeds.split(":"))
    results, took = run_many(range(start, stop), args.jobs)
    bad = [r for r in results if r.violations]
    for r in bad:
        print(f"seed {r.seed}: {r.violations[0]}\n  replay: {replay_command(r.seed)}")
    print(
        f"{len(results)} histories in {took:.0f}s, {len(bad)} failing, {sum(r.failovers for r in results)} promotions"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
