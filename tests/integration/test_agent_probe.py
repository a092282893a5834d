"""Runbook: the agent-port probe against a simulated Dogtag CA over real TLS, for every outcome."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: simca_helpers
from ca_watchdog.probes.agent import AgentProbe
from simca_helpers import LabPKI, free_port, make_lab_pki, run_simca, write_cscfg


@pytest.fixture
def pki(tmp_path: Path) -> LabPKI:
    return make_lab_pki(tmp_path)


@pytest.fixture
def master_cfg(tmp_path: Path) -> Path:
    return write_cscfg(tmp_path / "master.CS.cfg", role="master")


@pytest.mark.parametrize(("fmt", "version"), [("json", "11.5.0"), ("xml", "10.10.5")])
async def test_running_ca_is_running_in_both_formats(
    tmp_path: Path, pki: LabPKI, master_cfg: Path, fmt: str, version: str
) -> None:
    with run_simca(tmp_path, pki, master_cfg, status_format=fmt) as sim:
        async with AgentProbe(str(pki.ca_cert), timeout=3.0) as probe:
            st = await probe.status(sim.url)
    assert (st.status, st.reason, st.http_status, st.version, st.state) == ("running", None, 200, version, "1")
    assert 0 < st.latency < 3.0


async def test_a_starting_ca_accepts_connections_and_answers_nothing_until_it_runs(
    tmp_path: Path, pki: LabPKI, master_cfg: Path
) -> None:
    """Like a real 10.10 start: no `starting` status, a silent port (the probe times out), then running."""
    with run_simca(tmp_path, pki, master_cfg, start_delay=3.0, status_format="xml") as sim:
        async with AgentProbe(str(pki.ca_cert), timeout=0.5) as probe:
            first = await probe.status(sim.url)
            await asyncio.sleep(3.0)
            later = await probe.status(sim.url)
    assert (first.status, first.http_status, first.reason) == ("down", None, "timeout")
    assert later.status == "running"


async def test_connection_refused_is_down() -> None:
    port = free_port()  # nothing listens there
    async with AgentProbe(timeout=2.0) as probe:
        st = await probe.status(f"https://127.0.0.1:{port}")
    assert (st.status, st.reason, st.http_status) == ("down", "connection refused", None)


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """Accepts TCP connections and never says a word (a hung JVM, a SIGSTOPped process)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    try:
        yield port
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


async def test_server_that_accepts_and_never_answers_times_out(silent_server: int, pki: LabPKI) -> None:
    async with AgentProbe(str(pki.ca_cert), timeout=0.5) as probe:
        t0 = time.monotonic()
        st = await probe.status(f"https://127.0.0.1:{silent_server}")
        took = time.monotonic() - t0
    assert (st.status, st.reason) == ("down", "timeout")
    assert 0.4 < took < 2.0 and 0.4 < st.latency < 2.0


async def test_slow_getstatus_answer_times_out(tmp_path: Path, pki: LabPKI, master_cfg: Path) -> None:
    with run_simca(tmp_path, pki, master_cfg, status_delay=3.0) as sim:
        async with AgentProbe(str(pki.ca_cert), timeout=0.5) as probe:
            slow = await probe.status(sim.url)
        async with AgentProbe(str(pki.ca_cert), timeout=5.0) as patient:
            answered = await patient.status(sim.url)
    assert (slow.status, slow.reason) == ("down", "timeout")
    assert answered.status == "running" and answered.latency >= 3.0


async def test_wrong_ca_is_a_tls_failure(tmp_path: Path, pki: LabPKI, master_cfg: Path) -> None:
    with run_simca(tmp_path, pki, master_cfg) as sim:
        async with AgentProbe(str(pki.wrong_ca_cert), timeout=3.0) as probe:
            st = await probe.status(sim.url)
            info = await probe.info(sim.url)
    assert st.status == "down" and st.reason is not None and st.reason.startswith("TLS failure: ")
    assert "certificate verify failed" in st.reason or "self-signed" in st.reason or "unable" in st.reason
    assert not info.ok and info.error is not None and info.error.startswith("TLS failure")


async def test_503_with_html_body_is_down(tmp_path: Path, pki: LabPKI, master_cfg: Path) -> None:
    with run_simca(tmp_path, pki, master_cfg, status_fault="http503") as sim:
        async with AgentProbe(str(pki.ca_cert), timeout=3.0) as probe:
            st = await probe.status(sim.url)
    assert (st.status, st.reason, st.http_status, st.version) == ("down", "HTTP 503", 503, None)


async def test_garbage_body_is_down(tmp_path: Path, pki: LabPKI, master_cfg: Path) -> None:
    with run_simca(tmp_path, pki, master_cfg, status_fault="garbage") as sim:
        async with AgentProbe(str(pki.ca_cert), timeout=3.0) as probe:
            st = await probe.status(sim.url)
    assert (st.status, st.http_status) == ("down", 200)
    assert st.reason is not None and st.reason.startswith("bad answer: "), st.reason


async def test_getinfo_of_master_and_clone(tmp_path: Path, pki: LabPKI) -> None:
    master = write_cscfg(tmp_path / "m.cfg", role="master")
    clone = write_cscfg(tmp_path / "c.cfg", role="clone", master_host="ca9.example.test", master_port=8443)
    with (
        run_simca(tmp_path, pki, master, name="m", crl_interval=60) as m,
        run_simca(tmp_path, pki, clone, name="c") as c,
    ):
        async with AgentProbe(str(pki.ca_cert), timeout=3.0) as probe:
            mi, ci = await asyncio.gather(probe.info(m.url), probe.info(c.url))
    assert (mi.ok, mi.master_host, mi.master_port, mi.crl_numbers) == (True, None, None, {"MasterCRL": 1})
    # a clone without LDAP has no issuing point records to show
    assert (ci.ok, ci.master_host, ci.master_port, ci.crl_numbers) == (True, "ca9.example.test", 8443, {})


async def test_probe_with_client_certificate_and_one_session(tmp_path: Path, pki: LabPKI, master_cfg: Path) -> None:
    f = pki.files
    with run_simca(tmp_path, pki, master_cfg) as sim:
        async with AgentProbe(str(pki.ca_cert), str(f.client_cert), str(f.client_key), timeout=3.0) as probe:
            a = await probe.status(sim.url)
            session = probe._session
            b = await probe.status(sim.url + "/")
            assert probe._session is session and session is not None and not session.closed
        assert probe._session is None and _closed(session)  # the context manager closes it
    assert a.status == b.status == "running"


def _closed(session: aiohttp.ClientSession) -> bool:
    return session.closed


def _cli(*args: str) -> tuple[int, dict[str, object]]:
    p = subprocess.run(
        [sys.executable, "-m", "ca_watchdog.cli", "probe", "agent", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, (p.stdout, p.stderr)  # exactly one JSON object
    return p.returncode, json.loads(lines[0])


def test_cli_prints_one_json_object_and_exit_code(tmp_path: Path, pki: LabPKI) -> None:
    clone = write_cscfg(tmp_path / "c.cfg", role="clone", master_host="ca1.example.test", master_port=8443)
    with run_simca(tmp_path, pki, clone, status_format="xml") as sim:
        rc, out = _cli(sim.url, "--cafile", str(pki.ca_cert), "--timeout", "3")
        rc_wrong, out_wrong = _cli(sim.url, "--cafile", str(pki.wrong_ca_cert), "--timeout", "3")
    assert rc == 0
    assert (out["status"], out["http_status"], out["version"], out["reason"]) == ("running", 200, "10.10.5", None)
    assert isinstance(out["latency"], float)
    assert out["info"] == {
        "master_host": "ca1.example.test",
        "master_port": 8443,
        "crl_numbers": {},
        "ok": True,
        "error": None,
    }
    assert rc_wrong == 1 and out_wrong["status"] == "down"
    assert str(out_wrong["reason"]).startswith("TLS failure")
    rc_refused, out_refused = _cli(f"https://127.0.0.1:{free_port()}", "--timeout", "2")
    assert (rc_refused, out_refused["status"], out_refused["reason"]) == (1, "down", "connection refused")
