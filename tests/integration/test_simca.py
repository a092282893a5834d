"""Runbook: the simulated Dogtag CA behaves like one, as far as a watchdog (and Dogtag's own client) can see.

Tests marked `lab` use the replicated 389-DS lab (`ds_lab`: suppliers ca1..ca3). Every LDAP test
uses its own issuing point id, so tests sharing the lab never see each other's CRL records.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import ssl
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: simca_helpers
from ca_watchdog.probes.agent import INFO_PATH, AgentProbe
from ca_watchdog.probes.directory import parse_dogtag_number
from simca_helpers import (
    LabPKI,
    SimCAProcess,
    make_lab_pki,
    parse_write_log,
    read_crl_entry,
    run_simca,
    start_simca,
    unique_ip,
    wait_for,
    write_cscfg,
    writer_switches,
)


@pytest.fixture
def pki(tmp_path: Path) -> LabPKI:
    return make_lab_pki(tmp_path)


def _ctx(pki: LabPKI, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    if client:
        ctx.load_cert_chain(str(client[0]), str(client[1]))
    return ctx


async def _request(
    url: str, ctx: ssl.SSLContext, method: str = "GET", data: dict[str, str] | None = None
) -> tuple[int, bytes]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(timeout=timeout) as s,
        s.request(method, url, ssl=ctx, data=data) as r,
    ):
        return r.status, await r.read()


# ---- without LDAP ------------------------------------------------------------------------------------


def test_listening_line_and_clean_sigterm(tmp_path: Path, pki: LabPKI) -> None:
    cfg = write_cscfg(tmp_path / "CS.cfg", role="master", machine_name="ca7.example.test")
    sim = start_simca(tmp_path, pki, cfg, name="ca7")
    try:
        lines = sim.stdout.read_text().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith(f"simca ca7 listening on https://127.0.0.1:{sim.port} role=master format=json")
    finally:
        rc = sim.stop()
    assert rc == 0
    assert "ca7 stopped" in sim.stderr.read_text()


def _official_status(sim: SimCAProcess, accept: str, cert_paths: str | None) -> str:
    import pki.client
    import pki.system

    conn = pki.client.PKIConnection(
        protocol="https",
        hostname="127.0.0.1",
        port=str(sim.port),
        accept=accept,
        verify=True,
        cert_paths=cert_paths,
    )
    text: str = pki.system.SystemStatusClient(conn, subsystem="ca").get_status(timeout=5)
    return text


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_official_dogtag_client_accepts_getstatus(tmp_path: Path, pki: LabPKI, fmt: str) -> None:
    import requests

    cfg = write_cscfg(tmp_path / "CS.cfg", role="master")
    accept = "application/json" if fmt == "json" else "application/xml"
    with run_simca(tmp_path, pki, cfg, status_format=fmt) as sim:
        text = _official_status(sim, accept, str(pki.ca_cert))
        # real TLS: the same client without the lab CA must refuse the server
        with pytest.raises(requests.exceptions.SSLError):
            _official_status(sim, accept, None)
    # read the answer the way Dogtag/FreeIPA tooling does (JSON Response.Status, else XMLResponse/Status)
    if fmt == "json":
        resp = json.loads(text)["Response"]
        assert (resp["Status"], resp["State"], resp["Type"]) == ("running", "1", "CA")
    else:
        root = ET.fromstring(text)
        assert root.tag == "XMLResponse"
        assert [root.findtext(k) for k in ("State", "Type", "Status")] == ["1", "CA", "running"]
        assert text.startswith('<?xml version="1.0" encoding="UTF-8" standalone="no"?>')


async def test_getstatus_content_types(tmp_path: Path, pki: LabPKI) -> None:
    cfg = write_cscfg(tmp_path / "CS.cfg", role="master")
    for fmt, ctype in (("json", "application/json"), ("xml", "application/xml")):
        with run_simca(tmp_path, pki, cfg, status_format=fmt) as sim:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s,
                s.get(sim.url + "/ca/admin/ca/getStatus", ssl=_ctx(pki)) as r,
            ):
                assert r.status == 200 and r.content_type == ctype


async def test_getinfo_reflects_cscfg_read_once_at_start(tmp_path: Path, pki: LabPKI) -> None:
    cfg = write_cscfg(
        tmp_path / "CS.cfg", role="clone", issuing_points=("MasterCRL", "UserCRL"), master_host="ca2.example.test"
    )
    with run_simca(tmp_path, pki, cfg) as sim:
        async with AgentProbe(str(pki.ca_cert), timeout=3) as probe:
            before = await probe.info(sim.url)
            # promote the file under the running CA: like Tomcat, it must not notice until restarted
            write_cscfg(cfg, role="master", issuing_points=("MasterCRL", "UserCRL"))
            after = await probe.info(sim.url)
            code, body = await _request(sim.url + INFO_PATH, _ctx(pki))
    assert (before.master_host, before.master_port) == ("ca2.example.test", 8443)
    assert after == before
    root = ET.fromstring(body)
    assert code == 200 and root.tag == "xml" and root.find("header/masterCRLIssuingPoint") is not None
    with run_simca(tmp_path, pki, cfg, crl_interval=60) as sim:  # restarted: now a master
        async with AgentProbe(str(pki.ca_cert), timeout=3) as probe:
            promoted = await probe.info(sim.url)
    assert (promoted.master_host, promoted.master_port) == (None, None)
    assert promoted.crl_numbers == {"MasterCRL": 1, "UserCRL": 1}


async def test_agent_path_needs_a_verified_client_certificate(tmp_path: Path, pki: LabPKI) -> None:
    f = pki.files
    cfg = write_cscfg(tmp_path / "CS.cfg", role="master")
    url_path = "/ca/agent/ca/updateCRL"
    form = {"crlIssuingPoint": "MasterCRL", "waitForUpdate": "true", "xml": "true"}
    with run_simca(tmp_path, pki, cfg, crl_interval=60) as sim:
        url = sim.url + url_path
        anonymous = await _request(url, _ctx(pki), "POST", form)
        agent = await _request(url, _ctx(pki, (f.client_cert, f.client_key)), "POST", form)
        async with AgentProbe(str(pki.ca_cert), timeout=3) as probe:
            info = await probe.info(sim.url)
        # a client certificate from another CA fails the TLS handshake itself
        with pytest.raises(aiohttp.ClientError):
            await _request(url, _ctx(pki, (pki.wrong_client_cert, pki.wrong_client_key)), "POST", form)
    assert anonymous[0] in (401, 403)
    assert agent[0] == 200
    root = ET.fromstring(agent[1])
    assert root.findtext("header/time") is not None and root.findtext("header/crlUpdate") is None  # as 10.10
    assert info.crl_numbers == {"MasterCRL": 2}  # 1 at start, 2 forced by the agent


async def test_clone_refuses_crl_update_even_for_an_agent(tmp_path: Path, pki: LabPKI) -> None:
    f = pki.files
    cfg = write_cscfg(tmp_path / "CS.cfg", role="clone")
    with run_simca(tmp_path, pki, cfg) as sim:
        code, body = await _request(
            sim.url + "/ca/agent/ca/updateCRL?crlIssuingPoint=MasterCRL", _ctx(pki, (f.client_cert, f.client_key))
        )
        crl_code, _ = await _request(sim.url + "/ca/ee/ca/getCRL?op=getCRL&crlIssuingPoint=MasterCRL", _ctx(pki))
    assert code == 200 and ET.fromstring(body).findtext("header/crlUpdate") == "notInitialized"  # as 10.10
    assert crl_code == 404  # a clone without LDAP has no CRL record to serve


async def test_getcrl_is_a_der_crl_signed_by_the_lab_ca(tmp_path: Path, pki: LabPKI) -> None:
    cfg = write_cscfg(tmp_path / "CS.cfg", role="master")
    with run_simca(tmp_path, pki, cfg, crl_interval=60) as sim:
        async with AgentProbe(str(pki.ca_cert), timeout=3) as probe:
            info = await probe.info(sim.url)
        code, der = await _request(sim.url + "/ca/ee/ca/getCRL?op=getCRL&crlIssuingPoint=MasterCRL", _ctx(pki))
        missing, _ = await _request(sim.url + "/ca/ee/ca/getCRL?op=getCRL&crlIssuingPoint=Nope", _ctx(pki))
    assert code == 200 and missing == 404
    crl = x509.load_der_x509_crl(der)
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    assert crl.issuer == ca.subject
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(ca_key)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == info.crl_numbers["MasterCRL"] == 1


# ---- with the replicated 389-DS lab ---------------------------------------------------------------------


def _ldap(ds_lab: Any, name: str) -> dict[str, Any]:
    return {"ldap_url": ds_lab.ldap_url(name), "ldap_password_file": Path(ds_lab.password_file)}


def _entry(ds_lab: Any, name: str, ip: str) -> dict[str, list[str]] | None:
    password = Path(ds_lab.password_file).read_text().strip()
    return read_crl_entry(ds_lab.ldap_url(name), ds_lab.bind_dn, password, ip, ds_lab.suffix)


def _norm(entry: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
    # multi-valued attributes may come back in any order from different suppliers
    return {k: sorted(v) for k, v in entry.items()} if entry else None


def _number(entry: dict[str, list[str]] | None) -> int:
    return parse_dogtag_number(entry["crlnumber"][0]) if entry else -1


@pytest.mark.lab
async def test_master_advances_crl_record_and_names_itself(tmp_path: Path, pki: LabPKI, ds_lab: Any) -> None:
    ip = unique_ip()
    cfg = write_cscfg(tmp_path / "CS.cfg", role="master", issuing_points=(ip,), basedn=ds_lab.suffix)
    with run_simca(tmp_path, pki, cfg, name="ca1", crl_interval=0.5, **_ldap(ds_lab, "ca1")) as sim:
        entry = wait_for(lambda: (e := _entry(ds_lab, "ca1", ip)) and _number(e) >= 3 and e, 15, what="3 CRLs")
        async with AgentProbe(str(pki.ca_cert), timeout=3) as probe:
            info = await probe.info(sim.url)
    assert entry["description"] == ["writer=ca1"]
    this_update = dt.datetime.strptime(entry["thisupdate"][0], "%Y%m%d%H%M%SZ").replace(tzinfo=dt.UTC)
    next_update = dt.datetime.strptime(entry["nextupdate"][0], "%Y%m%d%H%M%SZ").replace(tzinfo=dt.UTC)
    assert abs((dt.datetime.now(dt.UTC) - this_update).total_seconds()) < 30 and next_update > this_update
    writes = parse_write_log(entry["labcrlwritelog"])
    assert [w.number for w in writes] == list(range(1, len(writes) + 1))  # starts at startingCrlNumber+1
    assert {w.writer for w in writes} == {"ca1"} and writer_switches(writes) == 0
    assert info.crl_numbers[ip] >= 3
    final = _entry(ds_lab, "ca1", ip)
    assert _number(final) >= info.crl_numbers[ip]


@pytest.mark.lab
async def test_clone_never_writes_and_serves_the_replicated_record(tmp_path: Path, pki: LabPKI, ds_lab: Any) -> None:
    ip = unique_ip()
    master = write_cscfg(tmp_path / "m.cfg", role="master", issuing_points=(ip,), basedn=ds_lab.suffix)
    clone = write_cscfg(tmp_path / "c.cfg", role="clone", issuing_points=(ip,), basedn=ds_lab.suffix)
    # a clone alone on a record that does not exist: creates nothing
    with run_simca(tmp_path, pki, clone, name="ca2", crl_interval=0.3, **_ldap(ds_lab, "ca2")):
        await asyncio.sleep(1.5)
        assert _entry(ds_lab, "ca2", ip) is None
    # the master writes on ca1; stop it, let replication settle
    with run_simca(tmp_path, pki, master, name="ca1", crl_interval=0.3, **_ldap(ds_lab, "ca1")):
        wait_for(lambda: _number(_entry(ds_lab, "ca1", ip)) >= 2, 15, what="master writes")
    ds_lab.wait_replicated(timeout=30)
    settled = _entry(ds_lab, "ca2", ip)
    assert settled is not None and _norm(settled) == _norm(_entry(ds_lab, "ca1", ip))
    with run_simca(tmp_path, pki, clone, name="ca2", crl_interval=0.3, **_ldap(ds_lab, "ca2")) as sim:
        await asyncio.sleep(1.5)  # five CRL intervals: a master would have written five times
        async with AgentProbe(str(pki.ca_cert), timeout=3) as probe:
            info = await probe.info(sim.url)
        code, der = await _request(sim.url + f"/ca/ee/ca/getCRL?op=getCRL&crlIssuingPoint={ip}", _ctx(pki))
    assert _norm(_entry(ds_lab, "ca2", ip)) == _norm(settled)  # not one attribute changed
    assert info.master_host == "ca1.example.test"
    assert info.crl_numbers == {ip: _number(settled)}
    assert code == 200
    crl = x509.load_der_x509_crl(der)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == _number(settled)


@pytest.mark.lab
def test_numbering_continues_across_a_change_of_master(tmp_path: Path, pki: LabPKI, ds_lab: Any) -> None:
    ip = unique_ip()
    cfg = write_cscfg(tmp_path / "m.cfg", role="master", issuing_points=(ip,), basedn=ds_lab.suffix)
    with run_simca(tmp_path, pki, cfg, name="ca1", crl_interval=0.3, **_ldap(ds_lab, "ca1")):
        wait_for(lambda: _number(_entry(ds_lab, "ca1", ip)) >= 3, 15, what="ca1 writes")
    ds_lab.wait_replicated(timeout=30)
    last_of_ca1 = _number(_entry(ds_lab, "ca2", ip))
    with run_simca(tmp_path, pki, cfg, name="ca2", crl_interval=0.3, **_ldap(ds_lab, "ca2")):
        wait_for(lambda: _number(_entry(ds_lab, "ca2", ip)) >= last_of_ca1 + 2, 15, what="ca2 writes")
    ds_lab.wait_replicated(timeout=30)
    entry = _entry(ds_lab, "ca3", ip)
    assert entry is not None and entry["description"] == ["writer=ca2"]
    writes = parse_write_log(entry["labcrlwritelog"])
    first_of_ca2 = min(w.number for w in writes if w.writer == "ca2")
    assert first_of_ca2 == last_of_ca1 + 1
    assert len({w.number for w in writes}) == len(writes)  # no number issued twice
    assert writer_switches(writes) == 1  # a clean change of master: one switch, no split brain


@pytest.mark.lab
async def test_two_masters_on_two_suppliers_conflict_visibly(tmp_path: Path, pki: LabPKI, ds_lab: Any) -> None:
    """Split brain made visible: the signal later tests use to prove it never happens."""
    ip = unique_ip()
    cfg = write_cscfg(tmp_path / "m.cfg", role="master", issuing_points=(ip,), basedn=ds_lab.suffix)
    seen_writers: list[str] = []
    with (
        run_simca(tmp_path, pki, cfg, name="ca1", crl_interval=0.3, **_ldap(ds_lab, "ca1")),
        run_simca(tmp_path, pki, cfg, name="ca2", crl_interval=0.3, **_ldap(ds_lab, "ca2")),
    ):
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:  # a third supplier watching the replicated record
            e = await asyncio.to_thread(_entry, ds_lab, "ca3", ip)
            if e and e.get("description"):
                seen_writers.append(e["description"][0])
            await asyncio.sleep(0.1)
    ds_lab.wait_replicated(timeout=30)
    entry = _entry(ds_lab, "ca3", ip)
    assert entry is not None
    writes = parse_write_log(entry["labcrlwritelog"])
    assert {w.writer for w in writes} == {"ca1", "ca2"}
    assert writer_switches(writes) >= 2, writes  # interleaved writers, unlike a change of master
    flips = sum(1 for a, b in itertools.pairwise(seen_writers) if a != b)
    assert set(seen_writers) == {"writer=ca1", "writer=ca2"} and flips >= 2, seen_writers
