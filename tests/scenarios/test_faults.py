"""Fault-injection runbooks on the 3-node lab (simulated CAs on the shared replicated 389-DS,
one `ca-watchdog run` per node). The invariant checker samples the cluster every 0.2 s for the
whole test: never two CAs serving as master, never two serving master CS.cfg files, no CS.cfg
line outside the role keys changed, every CS.cfg parseable (unless expected otherwise), and the
CRL numbers in LDAP growing from one writer at a time. Any violation fails the test at teardown.

Backends: the store matters for the frozen master (a failover through release/acquire and the
etcd watch), the crash in the middle of a promotion (journal, lease of a dead daemon) and, of
course, the lost store (etcd only). The other runbooks only look at the CAs and the 389-DS, and
run on SQLite only.

(The master CA killed, the whole master host killed and the master's daemon killed are in
test_failover_e2e.py and are not repeated here.)
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import pytest
from scenario_lib import Scenario, fault_scenario

from ca_watchdog.lab.cluster import LAB_TIMING
from ca_watchdog.lab.dslab import DSLab
from ca_watchdog.lab.etcdlab import ETCD_BINARY, EtcdLab, free_ports

pytestmark = pytest.mark.lab

FLAP_SEED = 20240611


def _endpoint(request: pytest.FixtureRequest, backend: str) -> str | None:
    return request.getfixturevalue("etcd_for_scenarios").endpoint if backend == "etcd" else None


def _no_failover(sc: Scenario) -> None:
    events = sc.events("released", "promoted", "self_fence")
    assert not events, f"unexpected failover events: {events}"
    assert sc.leader() == "ca1"
    assert sc.serving() == {"ca1": "master", "ca2": "clone", "ca3": "clone"}
    assert sc.c.roles() == {"ca1": "master", "ca2": "clone", "ca3": "clone"}


# ---- the master's CA frozen, then thawed ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "etcd"])
def test_frozen_master_ca_is_replaced_stopped_and_returns_as_a_clone(
    request: pytest.FixtureRequest, ds_mesh: DSLab, tmp_path: Path, backend: str
) -> None:
    with fault_scenario(tmp_path / "lab", ds_mesh, backend, _endpoint(request, backend)) as sc:
        c = sc.c
        frozen_pid = c.freeze_ca("ca1")
        sc.wait(lambda: sc.leader() in ("ca2", "ca3"), 40, "a clone takes the key from the frozen master")
        new = sc.leader()
        assert new is not None
        sc.wait_master(new, 40)
        # its daemon demoted it: CS.cfg a clone's, and the frozen Tomcat stopped (SIGTERM + SIGCONT), not
        # merely written around while it still holds a master configuration in memory
        sc.wait(lambda: c.roles()["ca1"] == "clone", 20, "ca1's CS.cfg demoted")
        sc.wait(lambda: c.ca_pid("ca1") != frozen_pid, 20, "the frozen ca1 process stopped by its daemon")
        # thaw whatever still runs there: a stale master must not come back
        c.thaw_ca("ca1")
        sc.wait(lambda: sc.serving()["ca1"] == "clone", 40, "ca1 serving as a clone of the new master")
        time.sleep(4)
        assert sc.serving_master() == new
        assert c.roles() == {n: ("master" if n == new else "clone") for n in c.names}
        assert sc.checker is not None and sc.checker.master_sequence() == ["ca1", new]
        promoted = sc.events("promoted")
        assert [(e["name"], e["old_master"]) for e in promoted] == [(new, "ca1")]


# ---- the master's 389-DS killed while its CA runs ------------------------------------------------------


def test_master_ds_killed_while_its_ca_runs_the_functional_probe_fails_it_over(ds_mesh: DSLab, tmp_path: Path) -> None:
    """Policy, from the real Dogtag 10.10: with its 389-DS down a CA still answers getStatus
    `running`, but it cannot serve (getInfo empty, getCRL "Unauthorized", /ca/rest/certs 500) and
    writes no CRL. The functional probe sees it; the master steps down (no restart here: the lab runs
    with restart_before_failover = false) and a clone with a live directory takes over. When the DS
    returns, the old master comes back as a clone."""
    with fault_scenario(tmp_path / "lab", ds_mesh) as sc:
        ds_mesh.kill("ca1")
        killed_at = time.time()

        def clone_took_over() -> bool:
            leader = sc.leader()
            return leader in ("ca2", "ca3") and sc.serving().get(leader) == "master"

        sc.wait(clone_took_over, 90, "a clone holds the key and serves as master")
        new = sc.leader()
        assert new is not None
        sc.wait(lambda: new in sc.crl_writers(), 30, f"{new} writing CRLs")
        sc.forget_unreplicated("ca1", killed_at)
        released = [e for e in sc.events("released") if e.get("name") == "ca1"]
        assert released and "cannot serve" in json.dumps(released[0]), released
        ds_mesh.start("ca1")
        sc.wait(lambda: sc.serving().get("ca1") == "clone", 90, "ca1 back as a clone of the new master")
        assert sc.serving_master() == new
        assert sc.checker is not None and sc.checker.master_sequence() == ["ca1", new]


# ---- the store lost (etcd) while every CA is healthy ---------------------------------------------------


@pytest.fixture
def private_etcd(tmp_path: Path) -> EtcdLab:
    import os

    if not os.access(ETCD_BINARY, os.X_OK):
        pytest.skip(f"{ETCD_BINARY} not installed")
    return EtcdLab(tmp_path / "etcd", *free_ports(2, 24960))


def test_store_killed_master_keeps_its_role_by_failsafe_and_continues_after(
    ds_mesh: DSLab, tmp_path: Path, private_etcd: EtcdLab
) -> None:
    etcd = private_etcd
    etcd.start()
    try:
        with fault_scenario(tmp_path / "lab", ds_mesh, "etcd", etcd.endpoint) as sc:
            c = sc.c
            ttl, margin = float(c.timing["ttl"]), float(c.timing["safety_margin"])
            etcd.kill()
            lost = time.monotonic()
            reasons: set[str] = set()
            # well past the point where a master without its lease would self-fence
            while time.monotonic() - lost < ttl + 15:
                assert sc.serving() == {"ca1": "master", "ca2": "clone", "ca3": "clone"}, sc.debug()
                if time.monotonic() - lost > ttl - margin + 2:
                    reasons.add(sc.cluster_json("ca1")["decision"]["reason"])
                time.sleep(1)
            assert reasons and all("failsafe" in r for r in reasons), reasons
            assert c.roles() == {"ca1": "master", "ca2": "clone", "ca3": "clone"}
            # the store returns with its data: the master is still the master, nothing moved
            etcd.start(fresh=False)
            sc.wait(lambda: sc.leader() == "ca1", 40, "ca1 holds the key again after etcd is back")
            time.sleep(5)
            _no_failover(sc)
            assert sc.cluster_json("ca1")["store_ok"] is True
    finally:
        etcd.stop()


# ---- a flapping master ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_flapping_master_fails_over_at_most_once(ds_mesh: DSLab, tmp_path: Path) -> None:
    """The master's CA crashes and comes back every few seconds for a minute (systemd's Restart=,
    which an explicit stop cancels: the flapper restarts only a CA that nobody stopped)."""
    rng = random.Random(FLAP_SEED)
    print(f"flapping seed {FLAP_SEED}")
    with fault_scenario(tmp_path / "lab", ds_mesh) as sc:
        c = sc.c
        start = time.monotonic()
        target = "ca1"
        flaps = 0
        # a minute, and at least 8 crashes: a round also runs two CLI processes (status, then the lab's
        # service start with its guard), which the loaded CI machine stretches to seconds, and a round whose
        # target CA is not running crashes nothing; the seeded sleeps alone fit 11 rounds in 60 s, 8 at 2 s more
        while time.monotonic() - start < 60 or (flaps < 8 and time.monotonic() - start < 120):
            target = sc.leader() or target
            if c.ca_pid(target) is not None:
                c.kill_ca(target)
                flaps += 1
            time.sleep(rng.uniform(1.0, 4.0))
            # Restart= of systemd: only if the unit was not stopped meanwhile (the lab's stop removes the pidfile)
            if c.nodes[target].ca_pidfile.exists() and c.ca_pid(target) is None:
                c.start_ca(target)
            time.sleep(rng.uniform(2.5, 5.0))
        print(f"{flaps} crashes of the master CA")
        final = sc.wait_converged(90)
        assert sc.checker is not None
        sequence = sc.checker.master_sequence()
        promoted = sc.events("promoted")
        print("serving masters:", sequence, "promotions:", [e["name"] for e in promoted])
        assert len(promoted) <= 1, f"more than one failover while flapping: {promoted}"
        assert sequence in (["ca1"], ["ca1", final]), f"ping-pong: {sequence}"
        assert flaps >= 8


# ---- the daemon killed in the middle of a promotion ----------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "crash_at"),
    [
        ("sqlite", "stopped"),
        ("etcd", "stopped"),
        ("sqlite", "written"),
    ],
)
def test_daemon_killed_between_stop_and_start_of_a_promotion(
    request: pytest.FixtureRequest, ds_mesh: DSLab, tmp_path: Path, backend: str, crash_at: str
) -> None:
    """crash_at=stopped: right after the CA stopped (CS.cfg still a clone's); written: once the master
    CS.cfg is on disk and before the CA runs (the daemon may already have launched its start)."""
    with fault_scenario(tmp_path / "lab", ds_mesh, backend, _endpoint(request, backend)) as sc:
        c = sc.c
        c.kill_ca("ca1")
        victim = None
        deadline = time.monotonic() + 40
        while victim is None and time.monotonic() < deadline:
            for n in ("ca2", "ca3"):
                # its CA stopped: the promotion's first step (and, for "written", its CS.cfg rewritten)
                if c.ca_pid(n) is None and (crash_at == "stopped" or c.roles()[n] == "master"):
                    c.kill_daemon(n, signal.SIGKILL)
                    victim = n
                    break
            time.sleep(0.005)
        assert victim is not None, "no clone started a promotion\n" + sc.debug()
        role_at_crash = c.roles()[victim]
        print(f"killed {victim}'s daemon after its CA stopped; its CS.cfg was {role_at_crash}")
        print(f"its CA: {'down' if c.ca_pid(victim) is None else 'already started again'}")
        time.sleep(1)
        c.start_daemon(victim)
        final = sc.wait_converged(90)
        print(f"in the end {final} is master ({'resumed' if final == victim else 'rolled back'})")
        assert c.roles() == {n: ("master" if n == final else "clone") for n in c.names}
        assert any(e["name"] == final for e in sc.events("promoted"))


# ---- a clone whose CS.cfg is corrupt -------------------------------------------------------------------------

CORRUPT_LINE = b"this line has no equals sign\n"


def _corrupt_ca3(sc: Scenario) -> None:
    with open(sc.c.nodes["ca3"].cs_cfg, "ab") as f:
        f.write(CORRUPT_LINE)


@pytest.mark.parametrize("backend", ["sqlite"])
def test_clone_with_corrupt_cscfg_is_never_elected_and_its_file_is_untouched(
    ds_mesh: DSLab, tmp_path: Path, backend: str
) -> None:
    # ca3 has the highest priority: with a readable CS.cfg it would win a tie
    with fault_scenario(
        tmp_path / "lab",
        ds_mesh,
        backend,
        priorities={"ca3": 300, "ca2": 100},
        prepare=_corrupt_ca3,
        expect_unreadable=frozenset({"ca3"}),
    ) as sc:
        c = sc.c
        corrupt = c.nodes["ca3"].cs_cfg.read_bytes()
        assert corrupt.endswith(CORRUPT_LINE)
        sc.wait(
            lambda: next(r for r in sc.status()["members"] if r["member"] == "ca3")["role"] == "unreadable",
            20,
            "status shows ca3's CS.cfg unreadable",
        )
        table = sc.cli("ca1", "status").stdout
        assert "unreadable" in next(line for line in table.splitlines() if "ca3" in line), table
        view = sc.cluster_json("ca3")
        me = next(m for m in view["members"] if m["name"] == "ca3")
        assert me["cscfg_role"] == "unreadable" and "=" in (me["cscfg_problem"] or ""), me
        assert "never elected" in view["decision"]["reason"], view["decision"]
        c.kill_ca("ca1")
        sc.wait(lambda: sc.leader() not in ("ca1", None), 40, "failover away from ca1")
        assert sc.leader() == "ca2"
        sc.wait_master("ca2", 40)
        time.sleep(5)
        assert sc.leader() == "ca2" and sc.serving()["ca3"] == "clone"
        assert [e["name"] for e in sc.events("promoted")] == ["ca2"]
        assert c.nodes["ca3"].cs_cfg.read_bytes() == corrupt, "ca3's corrupt CS.cfg was modified"
        backups = list(c.nodes["ca3"].dir.glob("CS.cfg.*.ca-watchdog"))
        assert not backups, backups
        assert "never elected" in sc.cluster_json("ca3")["decision"]["reason"]


# ---- slow answers ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_slow_master_answers_below_the_timeout_cause_no_failover(ds_mesh: DSLab, tmp_path: Path) -> None:
    """getStatus of the master takes 0.6 s, the agent timeout is 1 s: slow is not down."""
    assert float(LAB_TIMING["agent_timeout"]) == 1.0
    with fault_scenario(tmp_path / "lab", ds_mesh, ca_args={"ca1": ["--status-delay", "0.6"]}) as sc:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            assert sc.leader() == "ca1"
            assert sc.serving()["ca1"] == "master"
            time.sleep(3)
        _no_failover(sc)
        log = sc.c.nodes["ca1"].daemon_log.read_text(errors="replace")
        assert "healthy master" in log
        print("failed probes of the slow master:", log.count("master CA failed probe"))
