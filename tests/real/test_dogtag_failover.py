"""Runbook on the real Dogtag 10.10 CAs: two ca-watchdog daemons drive the bed's master and clone.

Invariants are sampled every 200 ms during every scenario (tests/real/dogtag_cluster.py): never two
CAs serving as master by getInfo, updateCRL generating on at most one CA, the LDAP crlNumber never
going back. The scenarios run in order on one cluster and each starts from a steady state (one
master serving, one clone serving); the module ends with the bed in its built roles again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from dogtag_bed import DogtagBed
from dogtag_cluster import MEMBERS, Invariants, RealCluster, wait_until

pytestmark = [pytest.mark.real, pytest.mark.timeout(900)]

STEADY_TIMEOUT = 300.0  # two CAs starting at once take 28-36 s here; a failover stops and starts both
OTHER = {"ca1": "ca2", "ca2": "ca1"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    bed = DogtagBed()
    if not bed.is_built():
        pytest.fail(f"no real-Dogtag bed at {bed.root}; build it: bash beds/dogtag/bed.sh build", pytrace=False)
    bed.ensure_running()
    c = RealCluster(bed, tmp_path_factory.mktemp("real-cluster"), restart_before_failover=True)
    c.start()
    try:
        wait_until(c.steady, STEADY_TIMEOUT, message="the daemons took over the bed (bootstrap)\n" + c.logs())
        yield c
        # leave the bed as it was built: pki-tomcat (ca1) master
        if c.steady() != "ca1":
            c.cli("ca1", "switchover", "--to", "ca1")
            wait_until(lambda: c.steady() == "ca1", STEADY_TIMEOUT, message="switch back to ca1\n" + c.logs())
    finally:
        c.stop()
        bed.ensure_running()


def steady_master(c: RealCluster) -> str:
    master: str = wait_until(c.steady, STEADY_TIMEOUT, message="a steady cluster\n" + c.logs())
    return master


def crl_generated_by(c: RealCluster, name: str, after: int) -> bool:
    """updateCRL on `name` answers a time and the LDAP number of its DS moves past `after`."""
    inst = MEMBERS[name][0]
    return bool(c.bed.update_crl(inst).time) and c.bed.ldap_crl_number(c.bed.ca(inst).ds) > after


def assert_roles_after_failover(c: RealCluster, new_master: str, number_before: int) -> None:
    old = OTHER[new_master]
    new_inst, old_inst = MEMBERS[new_master][0], MEMBERS[old][0]
    assert c.leader() == new_master
    assert not c.bed.get_info(new_inst).master, "the new master's getInfo names a master"
    assert wait_until(lambda: crl_generated_by(c, new_master, number_before), 60, 2, "the new master makes CRLs")
    assert c.bed.get_info(old_inst).master == f"localhost:{c.ca(new_master).https_port}"
    assert c.bed.update_crl(old_inst).crl_update == "notInitialized"


def test_master_jvm_killed_the_clone_is_promoted_and_the_old_master_returns_as_its_clone(
    cluster: RealCluster,
) -> None:
    c = cluster
    master = steady_master(c)
    inst = MEMBERS[master][0]
    number_before = c.bed.ldap_crl_number(c.ca(master).ds)
    with Invariants(c.bed) as inv:
        t0 = time.monotonic()
        c.bed.kill_ca(inst)
        # the policy restarts it once: kill that start too, once its port accepts (the JVM is up)
        wait_until(lambda: c.port_accepts(inst), 120, 0.2, "the restart of the master CA")
        c.bed.kill_ca(inst)
        new = wait_until(lambda: (m := c.steady()) and m != master and m, STEADY_TIMEOUT, message=c.logs())
        took = time.monotonic() - t0
        assert_roles_after_failover(c, new, number_before)
    assert inv.violations == [], inv.violations
    assert inv.cadence_problem() is None, inv.cadence_problem()
    assert inv.saw_master(new)
    print(inv.summary())
    print(f"kill -9 of {master}'s JVM (twice) to a steady cluster with {new} master: {took:.1f} s")


def test_master_ds_killed_is_seen_by_the_functional_probe_and_restarted_then_failed_over(
    cluster: RealCluster,
) -> None:
    c = cluster
    master = steady_master(c)
    inst = MEMBERS[master][0]
    ds = c.ca(master).ds
    number_before = c.bed.ldap_crl_number(c.ca(OTHER[master]).ds)
    with Invariants(c.bed) as inv:
        c.bed.kill_ds(ds)
        assert c.bed.get_status(inst).running  # getStatus does not notice: the probe must
        # nothing here starts that DS again before the failover: if it answers, something outside the
        # test drives the bed (a second test run, a bed.sh start), and the scenario means nothing
        back = "<the DS answers again>"
        new = wait_until(
            lambda: c.master_serving(other_than=master) or (c.bed.ds_up(ds) and back),
            STEADY_TIMEOUT,
            message=c.logs(),
        )
        assert new != back, f"{ds} was started again by something else while the test had it down\n{c.logs()}"
        log = c.log(master).read_text()
        assert "cannot serve" in log, "the master's daemon never said why its CA was down"
        assert "restart" in log
        c.bed.start_ds(ds)
        # the old master was started while its DS was down (404 for good): its daemon restarts it as a clone
        wait_until(lambda: c.steady() == new, STEADY_TIMEOUT, message="the old master back as a clone\n" + c.logs())
        assert_roles_after_failover(c, new, number_before)
    assert inv.violations == [], inv.violations
    assert inv.cadence_problem() is None, inv.cadence_problem()
    print(inv.summary())


def test_planned_switchover_to_the_clone_and_back(cluster: RealCluster) -> None:
    c = cluster
    master = steady_master(c)
    with Invariants(c.bed) as inv:
        for target in (OTHER[master], master):
            number_before = c.bed.ldap_crl_number(c.ca(target).ds)
            r = c.cli(target, "switchover", "--to", target)
            assert r.returncode == 0, r.stdout + r.stderr
            wait_until(lambda t=target: c.steady() == t, STEADY_TIMEOUT, message=f"switchover to {target}\n" + c.logs())
            assert_roles_after_failover(c, target, number_before)
    assert inv.violations == [], inv.violations
    assert inv.cadence_problem() is None, inv.cadence_problem()
    assert inv.saw_master(OTHER[master]) and inv.saw_master(master)
    print(inv.summary())
