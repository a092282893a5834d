"""Runbook: the simulated CA behaves as the real Dogtag 10.10 CA does (reference/real-dogtag), finding
by finding, so that the fast tests stay faithful. The same behaviours are checked on the real CA in
tests/real/test_dogtag_findings.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ca_watchdog import cscfg
from ca_watchdog.probes.agent import INFO_PATH, AgentProbe, parse_info_body
from ca_watchdog.probes.directory import parse_dogtag_number
from ca_watchdog.startup import StartupWatch
from simca_helpers import (
    LabPKI,
    free_port,
    make_lab_pki,
    read_crl_entry,
    run_simca,
    start_simca,
    unique_ip,
    write_cscfg,
)


@pytest.fixture
def pki(tmp_path: Path) -> LabPKI:
    return make_lab_pki(tmp_path / "pki")


async def _get(url: str, pki: LabPKI, accept: str = "*/*") -> tuple[int, str | None, bytes]:
    import ssl

    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s,
        s.get(url, ssl=ctx, headers={"Accept": accept}) as r,
    ):
        return r.status, r.headers.get("Content-Type"), await r.read()


# ---- finding 1: getInfo needs a template ------------------------------------------------------


async def test_getinfo_without_template_answers_200_with_an_error_that_is_not_read_as_master(
    tmp_path: Path, pki: LabPKI
) -> None:
    clone = write_cscfg(tmp_path / "CS.cfg", role="clone")
    with run_simca(tmp_path, pki, clone) as sim:
        code, _, body = await _get(sim.url + "/ca/ee/ca/getInfo?xml=true", pki)
        async with AgentProbe(str(pki.ca_cert), timeout=3) as probe:
            info = await probe.info(sim.url)
    assert code == 200 and b"<unexpectedError>" in body
    bare = parse_info_body(body)
    assert not bare.ok and bare.master_host is None  # an error, not "no master_host: a master"
    assert info.ok and info.master_host == "ca1.example.test"  # with the template: the clone it is


# ---- finding 2: LDAP numbers in Dogtag's encoding -----------------------------------------------


@pytest.mark.lab
async def test_master_writes_crl_numbers_in_dogtag_length_prefixed_encoding(
    tmp_path: Path, pki: LabPKI, ds_lab: Any
) -> None:
    ip = unique_ip()
    cfg = write_cscfg(tmp_path / "CS.cfg", role="master", issuing_points=(ip,), basedn=ds_lab.suffix)
    password = Path(ds_lab.password_file).read_text().strip()

    def entry() -> dict[str, list[str]] | None:
        return read_crl_entry(ds_lab.ldap_url("ca1"), ds_lab.bind_dn, password, ip, ds_lab.suffix)

    ldap = {"ldap_url": ds_lab.ldap_url("ca1"), "ldap_password_file": Path(ds_lab.password_file)}
    with run_simca(tmp_path, pki, cfg, name="ca1", crl_interval=0.3, **ldap) as sim:
        deadline = time.monotonic() + 15
        while (e := entry()) is None or parse_dogtag_number(e["crlnumber"][0]) < 2:
            assert time.monotonic() < deadline, "no second CRL in 15 s"
            await asyncio.sleep(0.1)
        async with AgentProbe(str(pki.ca_cert), timeout=3) as probe:
            info = await probe.info(sim.url)
    stored = e["crlnumber"][0]
    assert stored.startswith("0") and int(stored[:2]) == len(stored) - 2  # "012" is 2, never "2"
    assert info.crl_numbers[ip] >= parse_dogtag_number(stored)


# ---- finding 3: running while it cannot serve; a CA started without its database 404s for good ----


class TcpGate:
    """A loopback TCP forwarder in front of a 389-DS: closing it is the DS going down for this CA."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            w.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        try:
            await asyncio.gather(pipe(r, uw), pipe(ur, w))
        finally:
            self.tasks.discard(task)
            w.close()
            uw.close()


@pytest.fixture
async def ds_gate(ds_lab: Any) -> AsyncIterator[TcpGate]:
    gate = TcpGate(ds_lab.port("ca1"))
    await gate.open()
    try:
        yield gate
    finally:
        await gate.close()


@pytest.mark.lab
async def test_ca_whose_database_goes_down_still_says_running_but_the_functional_probe_sees_it(
    tmp_path: Path, pki: LabPKI, ds_lab: Any, ds_gate: TcpGate
) -> None:
    cfg = write_cscfg(tmp_path / "CS.cfg", role="master", basedn=ds_lab.suffix)
    ldap = {"ldap_url": f"ldap://127.0.0.1:{ds_gate.port}", "ldap_password_file": Path(ds_lab.password_file)}
    with run_simca(tmp_path, pki, cfg, name="ca1", crl_interval=60, **ldap) as sim:
        async with AgentProbe(str(pki.ca_cert), timeout=3) as probe:
            assert (await probe.serving(sim.url)).status == "running"
            await ds_gate.close()  # the CA's own 389-DS is gone
            status = await probe.status(sim.url)
            serving = await probe.serving(sim.url)
            info = await probe.info(sim.url)
            crl = await _get(sim.url + "/ca/ee/ca/getCRL?op=getCRL&crlIssuingPoint=MasterCRL", pki)
            certs = await _get(sim.url + "/ca/rest/certs?size=1", pki, "application/json")
            await ds_gate.open()
            back = await probe.serving(sim.url)
    assert status.status == "running"  # getStatus does not touch the database
    assert serving.status == "down" and serving.reason is not None
    assert "cannot serve" in serving.reason and "HTTP 500" in serving.reason
    assert not info.ok and info.error == "bad answer: empty body"
    assert crl[0] == 200 and crl[1] is not None and crl[1].startswith("text/html") and b"Unauthorized" in crl[2]
    assert certs[0] == 500 and b"PKIException" in certs[2]
    assert back.status == "running"  # the database is back: it serves again at once


async def test_ca_started_while_its_database_is_down_answers_404_for_good(tmp_path: Path, pki: LabPKI) -> None:
    cfg = write_cscfg(tmp_path / "CS.cfg", role="master")
    password = tmp_path / "pw"
    password.write_text("secret\n")
    dead_ds = f"ldap://127.0.0.1:{free_port()}"  # nothing listens there
    with run_simca(tmp_path, pki, cfg, ldap_url=dead_ds, ldap_password_file=password) as sim:
        async with AgentProbe(str(pki.ca_cert), timeout=3) as probe:
            watch = StartupWatch(start_timeout=180, failed_start_grace=1.0)
            watch.start_issued(time.monotonic())
            first = watch.classify(await probe.serving(sim.url), time.monotonic())
            await asyncio.sleep(1.5)
            later = watch.classify(await probe.serving(sim.url), time.monotonic())
            status = await probe.status(sim.url)
    assert (first.status, first.http_status) == ("starting", 404)  # could still be a deploying web app
    assert (later.status, later.http_status) == ("down", 404) and "database" in (later.reason or "")
    assert (status.status, status.reason) == ("down", "HTTP 404")


# ---- finding 4: refused, then accepted without an answer, then running ------------------------------


async def test_a_start_refuses_then_accepts_silently_then_runs_and_is_starting_throughout(
    tmp_path: Path, pki: LabPKI
) -> None:
    cfg = write_cscfg(tmp_path / "CS.cfg", role="master")
    port = free_port()
    watch = StartupWatch(start_timeout=180)
    watch.start_issued(time.monotonic())
    sim = start_simca(tmp_path, pki, cfg, port=port, start_delay=4.0, wait_listening=False)
    seen: list[tuple[str, str | None]] = []
    try:
        async with AgentProbe(str(pki.ca_cert), timeout=0.4) as probe:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                raw = await probe.status(sim.url)
                st = watch.classify(raw, time.monotonic())
                seen.append((st.status, raw.reason))
                if st.status == "running":
                    break
                await asyncio.sleep(0.1)
    finally:
        assert sim.stop() == 0, sim.logs()
    phases = [reason for _, reason in seen]
    assert "connection refused" in phases and "timeout" in phases, seen
    assert phases.index("connection refused") < phases.index("timeout"), seen
    assert seen[-1][0] == "running"
    assert {status for status, _ in seen[:-1]} == {"starting"}, seen  # never a failure, never "starting" sent


# ---- finding 5: getStatus is XML only in 10.x mode ---------------------------------------------------


async def test_pki10_getstatus_is_xml_even_when_json_is_asked_for(tmp_path: Path, pki: LabPKI) -> None:
    cfg = write_cscfg(tmp_path / "CS.cfg", role="master")
    with run_simca(tmp_path, pki, cfg, status_format="xml") as sim:
        code, ctype, body = await _get(sim.url + "/ca/admin/ca/getStatus", pki, "application/json")
    assert code == 200 and ctype is not None and ctype.startswith("application/xml")
    assert ET.fromstring(body).findtext("Status") == "running"


# ---- finding 6: CS.cfg rewritten in sorted order at every start, the old one archived -------------


async def test_start_rewrites_cscfg_sorted_keeping_keys_values_owner_and_mode(tmp_path: Path, pki: LabPKI) -> None:
    (tmp_path / "ca").mkdir()
    path = write_cscfg(tmp_path / "ca" / "CS.cfg", role="clone")
    clone = cscfg.read_cscfg(path)
    promoted = cscfg.promote(clone, clone.crl_lines())  # appends keys at the end, as our writer does
    path.write_bytes(promoted.render())
    os.chmod(path, 0o640)
    archives = path.parent / "archives"
    with run_simca(tmp_path, pki, path) as sim:
        async with AgentProbe(str(pki.ca_cert), timeout=3) as probe:
            info = await probe.info(sim.url)
    after = cscfg.read_cscfg(path)
    keys = [line.key for line in after.lines if line.key is not None]
    assert keys == sorted(keys) and len(keys) == len(set(keys))
    assert after.render() != promoted.render()  # the lines moved...
    assert cscfg.unrelated_items(after) == cscfg.unrelated_items(promoted)  # ...keys and values stayed
    assert cscfg.classify(after).role is cscfg.Role.MASTER and info.master_host is None
    assert os.stat(path).st_mode & 0o777 == 0o640
    first = sorted(archives.iterdir())
    assert len(first) == 1 and first[0].read_bytes() == promoted.render()
    assert os.path.realpath(path.parent / "CS.cfg.bak") == str(first[0])
    # pkidaemon archives only a file that differs from CS.cfg.bak: the sorted one once, then nothing
    for _ in range(2):
        await asyncio.sleep(1.1)  # archive names have one-second resolution
        with run_simca(tmp_path, pki, path):
            pass
    assert len(list(archives.iterdir())) == 2


def test_info_path_asks_for_the_display_crl_template() -> None:
    assert "template=/ee/ca/toDisplayCRL" in INFO_PATH and "xml=true" in INFO_PATH
