"""A random (seeded, reproducible) schedule of faults against one 3-node lab for about three
minutes, with the invariant checker running throughout: after every fault is healed the cluster
must converge to exactly one serving master (the key holder) with the others serving as its clones,
and at the end no invariant may have been violated.

The seed is printed; `CA_WATCHDOG_FAULT_SEED=N` replays a schedule. `failover_cooldown = 0` so
that one run can go through several automatic failovers. SQLite store only: the store backend is
exercised by the targeted runbooks (test_faults.py, test_failover_e2e.py), and one random run
per CI job is what the time budget allows.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from scenario_lib import Scenario, fault_scenario

from ca_watchdog.lab.dslab import DSLab

pytestmark = [pytest.mark.lab, pytest.mark.slow]

SEED = int(os.environ.get("CA_WATCHDOG_FAULT_SEED", "7101"))
SCHEDULE_SECONDS = 180.0
MAX_FAULTS = 14


class Faults:
    def __init__(self, sc: Scenario, ds: DSLab, rng: random.Random) -> None:
        self.sc, self.c, self.ds, self.rng = sc, sc.c, ds, rng

    def _hold(self, lo: float, hi: float) -> float:
        d = round(self.rng.uniform(lo, hi), 1)
        time.sleep(d)
        return d

    def kill_master_ca(self, m: str) -> str:
        self.c.kill_ca(m)
        return f"SIGKILL {m}'s CA"

    def freeze_master_ca(self, m: str) -> str:
        self.c.freeze_ca(m)
        d = self._hold(2, 12)
        self.c.thaw_ca(m)
        return f"SIGSTOP {m}'s CA for {d}s, then SIGCONT"

    def kill_master_daemon(self, m: str) -> str:
        self.c.kill_daemon(m)
        d = self._hold(2, 15)
        self.c.start_daemon(m)
        return f"SIGKILL {m}'s daemon, restarted after {d}s"

    def kill_master_ds(self, m: str) -> str:
        self.ds.kill(m)
        killed_at = time.time()
        d = self._hold(2, 15)
        # the master's last CRL write may not have left its directory; a clone promoted meanwhile reuses
        # its number: the directory's lost write, not a split brain (see Scenario.forget_unreplicated)
        self.sc.forget_unreplicated(m, killed_at)
        self.ds.start(m)
        return f"SIGKILL {m}'s 389-DS, restarted after {d}s"

    def kill_master_host(self, m: str) -> str:
        self.c.kill_daemon(m)
        self.c.kill_ca(m)
        self.ds.kill(m)
        killed_at = time.time()
        d = self._hold(4, 22)
        self.sc.forget_unreplicated(m, killed_at)  # as in kill_master_ds
        self.ds.start(m)
        self.c.start_ca(m)  # through the guard, as at boot
        self.c.start_daemon(m)
        return f"killed {m}'s host (daemon, CA, 389-DS), rebooted after {d}s"

    def flap_master_ca(self, m: str) -> str:
        n = 0
        for _ in range(3):
            if self.c.ca_pid(m) is None:
                break
            self.c.kill_ca(m)
            n += 1
            self._hold(0.5, 2.0)
            # systemd's Restart=: only a unit nobody stopped meanwhile
            if self.c.nodes[m].ca_pidfile.exists() and self.c.ca_pid(m) is None:
                self.c.start_ca(m)
            self._hold(2.0, 4.0)
        return f"{m}'s CA crashed and restarted {n} times"

    def kill_clone_ca(self, m: str) -> str:
        clone = self.rng.choice([n for n in self.c.names if n != m])
        self.c.kill_ca(clone)
        return f"SIGKILL clone {clone}'s CA"

    def freeze_master_daemon(self, m: str) -> str:
        self.c.kill_daemon(m, signal.SIGSTOP)
        d = self._hold(2, 15)
        self.c.kill_daemon(m, signal.SIGCONT)
        return f"SIGSTOP {m}'s daemon for {d}s, then SIGCONT"


def test_random_fault_schedule_converges_to_one_master_and_keeps_the_invariants(ds_mesh: DSLab, tmp_path: Path) -> None:
    print(f"\nrandom fault schedule: seed {SEED} (CA_WATCHDOG_FAULT_SEED={SEED} replays it)")
    rng = random.Random(SEED)
    with fault_scenario(
        tmp_path / "lab", ds_mesh, failover={"restart_before_failover": False, "failover_cooldown": 0}
    ) as sc:
        faults = Faults(sc, ds_mesh, rng)
        kinds: list[Callable[[str], str]] = [
            faults.kill_master_ca,
            faults.freeze_master_ca,
            faults.kill_master_daemon,
            faults.kill_master_ds,
            faults.kill_master_host,
            faults.flap_master_ca,
            faults.kill_clone_ca,
            faults.freeze_master_daemon,
        ]
        master = "ca1"
        end = time.monotonic() + SCHEDULE_SECONDS
        done: list[str] = []
        while time.monotonic() < end and len(done) < MAX_FAULTS:
            fault = rng.choice(kinds)
            t0 = time.monotonic()
            what = fault(master)
            took = sc.wait_converged(120)
            line = f"{len(done) + 1:2d}. {what}: master {master} -> {took}, converged in {time.monotonic() - t0:.0f}s"
            print(line, flush=True)
            done.append(line)
            master = took
            time.sleep(rng.uniform(1, 3))
        final = sc.wait_converged(120)
        assert sc.checker is not None
        print("serving masters over the run:", " -> ".join(sc.checker.master_sequence()))
        print("promotions:", [(e["name"], e.get("kind")) for e in sc.events("promoted")])
        assert len(done) >= 5, done
        assert sc.c.roles() == {n: ("master" if n == final else "clone") for n in sc.c.names}
