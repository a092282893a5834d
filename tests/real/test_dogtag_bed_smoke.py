"""The real-Dogtag bed is what the tests on it assume: a master and a clone, replicating.

Needs the bed (``bash beds/dogtag/bed.sh build``); the ``dogtag_bed`` fixture starts it when it
is stopped and fails when it is missing.
"""

from __future__ import annotations

import time

import pytest
from dogtag_bed import DogtagBed

pytestmark = pytest.mark.real

MASTER, CLONE = "pki-tomcat", "pki-tomcat-clone"


def test_both_cas_running(dogtag_bed: DogtagBed) -> None:
    for inst in (MASTER, CLONE):
        st = dogtag_bed.get_status(inst)
        assert st.running, (inst, st)
        assert st.state == "1"
        assert st.version is not None and st.version.startswith("10.")
        assert st.body.startswith("<?xml"), st.body[:100]  # 10.10: getStatus is XML only
        assert dogtag_bed.jvm_pid(inst) is not None


def test_roles_in_getinfo_and_cscfg(dogtag_bed: DogtagBed) -> None:
    master, clone = dogtag_bed.get_info(MASTER), dogtag_bed.get_info(CLONE)
    assert master.master == ""
    assert clone.master == "localhost:8443"
    assert "MasterCRL" in master.crl_numbers
    master_cfg, clone_cfg = dogtag_bed.cs_cfg_items(MASTER), dogtag_bed.cs_cfg_items(CLONE)
    assert master_cfg["ca.crl.MasterCRL.enableCRLUpdates"] == "true"
    assert "master.ca.agent.host" not in master_cfg
    assert clone_cfg["ca.crl.MasterCRL.enableCRLUpdates"] == "false"
    assert (clone_cfg["master.ca.agent.host"], clone_cfg["master.ca.agent.port"]) == ("localhost", "8443")


def test_update_crl_on_master_and_clone(dogtag_bed: DogtagBed) -> None:
    before = dogtag_bed.ldap_crl_number("ds-master")
    assert dogtag_bed.ldap_crl_number("ds-clone") == before

    on_clone = dogtag_bed.update_crl(CLONE)
    assert on_clone.crl_update == "notInitialized", on_clone
    on_master = dogtag_bed.update_crl(MASTER)
    assert on_master.time is not None and on_master.time.isdigit(), on_master

    assert dogtag_bed.ldap_crl_number("ds-master") == before + 1
    deadline = time.monotonic() + 30
    while dogtag_bed.ldap_crl_number("ds-clone") != before + 1:
        assert time.monotonic() < deadline, "the new CRL number did not replicate to ds-clone within 30 s"
        time.sleep(0.25)
    # the clone reads its numbers from LDAP
    assert dogtag_bed.get_info(CLONE).crl_numbers["MasterCRL"] == before + 1
    assert dogtag_bed.get_info(MASTER).crl_numbers["MasterCRL"] == before + 1
