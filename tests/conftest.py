"""Shared fixtures for the real lab.

``ds_lab``: three 389-DS suppliers (ca1, ca2, ca3; replica ids 1..3; LDAP ports 13890..13892 on
127.0.0.1; suffix o=pki-tomcat-CA) in full-mesh replication, created once per test session and
removed at its end. Instance names start with ``cwtest-`` so the demo and manual labs never
collide with it. A session holds the lab's lock for its whole life: a second pytest run on the
same machine waits instead of killing servers under the first one.

``CA_WATCHDOG_DSLAB_PREFIX`` and ``CA_WATCHDOG_DSLAB_BASE_PORT`` choose another lab. Set
``CA_WATCHDOG_KEEP_DSLAB=1`` to leave the lab running after the session; the next session
then reuses it (``DSLab.up`` checks it is healthy) instead of spending ~11 s creating it.

``CAWD_NO_SKIPS=1`` (set by scripts/test.sh, the suite CI runs) turns every skip into a failure: there,
scripts/setup.sh has installed every program and built every bed, so a test that would skip (a missing
etcd, 389-DS, promtool, network namespaces...) is a broken setup, and it must fail loudly.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ca_watchdog.lab.dslab import NS_SLAPD, DSLab

NO_SKIPS = os.environ.get("CAWD_NO_SKIPS") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if NO_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped where nothing may skip (CAWD_NO_SKIPS=1; setup.sh must provide it): {reason}"


DS_NAMES = ("ca1", "ca2", "ca3")
# overridable so that developers sharing one machine can each run a lab (e.g. prefix cwalice,
# ports 39100..): sessions on the same prefix queue on its lock instead
DS_BASE_PORT = int(os.environ.get("CA_WATCHDOG_DSLAB_BASE_PORT", "13890"))
DS_PREFIX = os.environ.get("CA_WATCHDOG_DSLAB_PREFIX", "cwtest")
# a fixed place (not tmp_path) so that a session that crashed leaves a lab the next one can find
DS_STATE_DIR = Path(tempfile.gettempdir()) / f"ca-watchdog-dslab-{DS_PREFIX}"


@pytest.fixture(scope="session")
def ds_lab() -> Iterator[DSLab]:
    """The session's 3-supplier 389-DS mesh (see the module docstring)."""
    if not os.access(NS_SLAPD, os.X_OK):
        pytest.skip(f"{NS_SLAPD} not installed (389-ds-base; scripts/setup.sh installs it)")
    lab = DSLab(DS_NAMES, DS_BASE_PORT, DS_PREFIX, DS_STATE_DIR)
    with lab.exclusive(timeout=240):
        lab.up()
        try:
            yield lab
        finally:
            if os.environ.get("CA_WATCHDOG_KEEP_DSLAB") == "1":
                restore_ds_lab(lab)
            else:
                lab.down()


def restore_ds_lab(lab: DSLab, timeout: float = 60.0) -> None:
    """Every member running, none frozen, replication converged: the state each test expects."""
    for name in lab.names:
        if lab.is_frozen(name):
            lab.thaw(name)
        if not lab.is_running(name):
            lab.start(name)
    lab.wait_replicated(timeout=timeout)


@pytest.fixture
def ds_mesh(ds_lab: DSLab) -> Iterator[DSLab]:
    """``ds_lab``, checked healthy before the test and restored after it (also if it failed)."""
    restore_ds_lab(ds_lab)
    try:
        yield ds_lab
    finally:
        restore_ds_lab(ds_lab)
