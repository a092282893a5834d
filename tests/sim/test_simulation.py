"""Thousands of seeded fault histories through the real daemon code (tests/sim/world.py).

Every invariant is checked at every step of every history; a failing seed prints the one command that
replays it exactly. CAWD_SIM_SEEDS sets how many histories (default 10,000), CAWD_SIM_JOBS how many
processes (default: the machine's cores).
"""

from __future__ import annotations

import os

import pytest
from tests.sim.run import replay_command, run_many

SEEDS = int(os.environ.get("CAWD_SIM_SEEDS", "10000"))
JOBS = int(os.environ.get("CAWD_SIM_JOBS", str(os.cpu_count() or 1)))


@pytest.mark.timeout(3600)
def test_every_seeded_fault_history_keeps_one_master_a_lease_behind_it_and_recovers() -> None:
    results, took = run_many(range(SEEDS), JOBS)
    bad = [r for r in results if r.violations]
    promotions = sum(r.failovers for r in results)
    print(f"\n{len(results)} histories in {took:.0f}s ({JOBS} processes), {promotions} promotions, {len(bad)} failing")
    report = "\n".join(f"seed {r.seed}: {r.violations[0]}\n  replay: {replay_command(r.seed)}" for r in bad[:10])
    assert not bad, f"{len(bad)} of {len(results)} histories broke an invariant:\n{report}"
    assert promotions > SEEDS // 2, "the faults hardly ever forced a promotion: the simulation lost its teeth"


# a history where the first master's daemon never took the key and a guard then demoted the only master
# CS.cfg during a store outage (found as seed 5418 before the slow-start and hung-stop faults changed every
# history; any change to the simulation's use of its random numbers moves it: then find another with
# `grep -l "OPERATOR bootstrap"` over replayed logs)
NEVER_BOOTSTRAPPED_SEED = 5936


def test_a_guard_demotion_before_the_first_key_leaves_every_daemon_asking_for_bootstrap_then_it_serves() -> None:
    """A store that never had a master has nothing to fail over from: every daemon must name the command,
    and once the operator runs it, a master must serve within the bound."""
    from tests.sim.world import run_history

    r = run_history(NEVER_BOOTSTRAPPED_SEED, keep_log=True)
    assert not r.violations, r.violations
    asked = [line for line in r.log if "OPERATOR bootstrap --master" in line]
    assert asked, f"seed {NEVER_BOOTSTRAPPED_SEED} no longer reaches the never-bootstrapped state: pick another"
    assert "run `ca-watchdog bootstrap --master NAME`" in asked[0], asked


def test_a_history_replays_exactly_from_its_seed() -> None:
    from tests.sim.world import run_history

    a, b = run_history(7, keep_log=True), run_history(7, keep_log=True)
    assert a.log == b.log and a.log, "the same seed gave two different histories"
