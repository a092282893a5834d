"""Scenario fixtures: a 3-node lab cluster (simulated CAs + daemons) on the shared real 389-DS
lab, with the SQLite or the etcd store, and a continuous invariant checker."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scenario_lib import Scenario

from ca_watchdog.lab.cluster import LabCluster
from ca_watchdog.lab.dslab import DSLab
from ca_watchdog.lab.etcdlab import ETCD_BINARY, EtcdLab, free_ports
from ca_watchdog.lab.invariants import InvariantChecker

_ports = itertools.count(18500, 40)


@pytest.fixture(scope="session")
def etcd_for_scenarios(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdLab]:
    if not os.access(ETCD_BINARY, os.X_OK):
        pytest.skip(f"{ETCD_BINARY} not installed")
    lab = EtcdLab(tmp_path_factory.mktemp("etcd-scenarios"), *free_ports(2, 24900))
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()


@pytest.fixture(params=["sqlite", "etcd"])
def store_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def scenario(request: pytest.FixtureRequest, ds_mesh: DSLab, store_backend: str, tmp_path: Path) -> Iterator[Scenario]:
    """A running 3-node cluster with ca1 master; the invariant checker runs the whole time."""
    endpoint = None
    if store_backend == "etcd":
        endpoint = request.getfixturevalue("etcd_for_scenarios").endpoint
    marker = request.node.get_closest_marker("cluster")
    options: dict[str, Any] = dict(marker.kwargs) if marker else {}
    c = LabCluster(
        tmp_path / "lab",
        base_port=next(_ports),
        ds=ds_mesh,
        store_backend=store_backend,
        etcd_endpoint=endpoint,
        **options,
    )
    c.build()
    sc = Scenario(c, ds_mesh, time.time())
    try:
        c.start()
        sc.wait_master("ca1", 60)
        # every member up and published: a runbook starts from a healthy cluster
        sc.wait(lambda: all(r["ca"] == "running" for r in sc.status()["members"]), 60, "every CA running")
        sc.checker = InvariantChecker(c, period=0.2).start()
        yield sc
        violations = sc.checker.stop()
        assert not violations, "safety invariants violated:\n" + "\n".join(violations)
        assert not sc.crl_problems(), "\n".join(sc.crl_problems())
    finally:
        if sc.checker is not None:
            sc.checker.stop()
        c.stop()
