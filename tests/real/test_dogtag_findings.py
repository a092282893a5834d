"""The six findings of the first contact with a real Dogtag 10.10 CA (issue 11), each seen on the
real CAs of the bed and read by the daemon's own code (probes, StartupWatch, cscfg).

The same findings are tested on recorded real answers (tests/unit/test_real_dogtag_answers.py) and
on the simulated CA (tests/integration/test_simca_fidelity.py). The tests that stop or break
something do it to the CA that is a clone now (whatever the failover tests left), and leave both
CAs running in their roles. About 2 minutes (four CA starts).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest
from dogtag_bed import DM_DN, DM_PASSWORD, SUFFIX, DogtagBed

from ca_watchdog import cscfg
from ca_watchdog.probes.agent import REASON_NO_ANSWER, REASON_REFUSED, AgentProbe, parse_info_body
from ca_watchdog.probes.directory import format_dogtag_number, probe_directory
from ca_watchdog.startup import StartupWatch

pytestmark = [pytest.mark.real, pytest.mark.timeout(600)]


def roles(bed: DogtagBed) -> tuple[str, str]:
    """(master instance, clone instance) as getInfo says now."""
    clones = [inst for inst in bed.cas if bed.get_info(inst).master]
    masters = [inst for inst in bed.cas if inst not in clones]
    assert len(masters) == 1 and len(clones) == 1, (masters, clones)
    return masters[0], clones[0]


def url(bed: DogtagBed, inst: str) -> str:
    return f"https://localhost:{bed.ca(inst).https_port}"


@pytest.fixture
def probe(dogtag_bed: DogtagBed) -> Iterator[AgentProbe]:
    # what the daemon builds from [tls] ca_file: no client certificate, the bed's CA certificate
    yield AgentProbe(ca_file=str(dogtag_bed.ca_pem), timeout=3.0)


def items(text: str) -> dict[str, str]:
    """CS.cfg as key -> value (Dogtag's reading: key=value lines, the last of a repeated key wins)."""
    return {k: v for k, _, v in (line.partition("=") for line in text.splitlines() if "=" in line)}


def keys(text: str) -> list[str]:
    return [line.partition("=")[0] for line in text.splitlines() if line.strip()]


def wait(what: Callable[[], bool], timeout: float, message: str, step: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {message}"
        time.sleep(step)


# ---- finding 1: getInfo without a template answers 200 with an error ------------------------------


async def test_1_getinfo_without_template_is_an_error_and_with_it_tells_master_from_clone(
    dogtag_bed: DogtagBed, probe: AgentProbe
) -> None:
    master, clone = roles(dogtag_bed)
    for inst in (master, clone):
        code, body = dogtag_bed.request(inst, "GET", "/ca/ee/ca/getInfo?xml=true")
        assert code == 200 and "<unexpectedError>" in body, body[:300]
        assert not parse_info_body(body.encode()).ok, "an error body read as an answer (as serving as master)"
    async with probe:
        m, c = await probe.info(url(dogtag_bed, master)), await probe.info(url(dogtag_bed, clone))
    assert m.ok and m.master_host is None and m.master_port is None, m
    assert c.ok and (c.master_host, c.master_port) == ("localhost", dogtag_bed.ca(master).https_port), c
    assert "MasterCRL" in m.crl_numbers and "MasterCRL" in c.crl_numbers


# ---- finding 2: CRL numbers in LDAP carry a digit-count prefix ------------------------------------


async def test_2_the_directory_probe_decodes_dogtags_length_prefixed_crl_number(dogtag_bed: DogtagBed) -> None:
    master, _ = roles(dogtag_bed)
    assert dogtag_bed.update_crl(master).time, "the master did not generate a CRL"
    ds = dogtag_bed.ca(master).ds
    raw = dogtag_bed.ldap_crl_entry(ds)["crlNumber"]
    obs = await probe_directory(dogtag_bed.ds(ds).url, DM_DN, DM_PASSWORD, SUFFIX, timeout=5.0)
    assert obs.ok, obs.error
    record = next(r for r in obs.crl_records if r.issuing_point == "MasterCRL")
    assert record.crl_number is not None and record.crl_number >= 1
    assert raw == format_dogtag_number(record.crl_number), (raw, record.crl_number)
    assert int(raw) != record.crl_number  # read as a plain number it would be wrong ("011" is 1)
    # the CA itself says the same number (getInfo reads it from its records)
    assert dogtag_bed.get_info(master).crl_numbers["MasterCRL"] == record.crl_number


# ---- finding 3: getStatus says running while the CA cannot serve ----------------------------------


async def test_3a_ds_down_getstatus_still_running_the_functional_probe_says_it_cannot_serve(
    dogtag_bed: DogtagBed, probe: AgentProbe
) -> None:
    _, clone = roles(dogtag_bed)
    ds = dogtag_bed.ca(clone).ds
    dogtag_bed.kill_ds(ds)
    try:
        async with probe:
            st = await probe.status(url(dogtag_bed, clone))
            assert st.status == "running", st  # getStatus does not notice
            serving = await probe.serving(url(dogtag_bed, clone))
            info = await probe.info(url(dogtag_bed, clone))
        assert serving.status == "down" and serving.reason and "cannot serve" in serving.reason, serving
        assert serving.http_status == 500, serving
        assert not info.ok, info  # getInfo: 200 with an empty body, not "serving as master"
    finally:
        dogtag_bed.start_ds(ds)
    # the running CA reconnects to its directory once it is back
    async with probe:

        async def serves() -> bool:
            return (await probe.serving(url(dogtag_bed, clone))).status == "running"

        deadline = time.monotonic() + 120
        while not await serves():
            assert time.monotonic() < deadline, "the CA did not serve again within 120 s of its DS coming back"
            await asyncio.sleep(1)


async def test_3b_a_ca_started_while_its_ds_is_down_answers_404_until_restarted(
    dogtag_bed: DogtagBed, probe: AgentProbe
) -> None:
    _, clone = roles(dogtag_bed)
    ds = dogtag_bed.ca(clone).ds
    dogtag_bed.stop_ca(clone)
    dogtag_bed.kill_ds(ds)
    watch = StartupWatch(start_timeout=180.0)
    try:
        dogtag_bed.start_ca(clone)
        watch.start_issued(time.monotonic())
        wait(lambda: dogtag_bed.get_status(clone, timeout=2).http_status == 404, 120, "getStatus 404")
    finally:
        dogtag_bed.start_ds(ds)
    # its database is back, and still: 404, read as starting for the grace, then as a failed engine
    seen: list[str] = []
    async with probe:
        deadline = time.monotonic() + watch.failed_start_grace + 15
        while time.monotonic() < deadline:
            st = watch.classify(await probe.serving(url(dogtag_bed, clone)), time.monotonic())
            assert st.http_status == 404, st
            seen.append(st.status)
            await asyncio.sleep(1)
    assert seen[0] == "starting" and seen[-1] == "down", seen
    assert "down" in seen and "running" not in seen
    # only a restart recovers it
    dogtag_bed.stop_ca(clone)
    dogtag_bed.start_ca(clone)
    dogtag_bed.wait_running(clone, timeout=300)
    async with probe:
        assert (await probe.serving(url(dogtag_bed, clone))).status == "running"


# ---- finding 4: no "starting" status: refused, then silent, then running --------------------------


async def test_4_a_start_refuses_then_accepts_silently_then_runs_and_is_starting_throughout(
    dogtag_bed: DogtagBed, probe: AgentProbe
) -> None:
    _, clone = roles(dogtag_bed)
    dogtag_bed.stop_ca(clone)
    watch = StartupWatch(start_timeout=180.0)
    raw: list[str] = []
    classified: list[str] = []
    dogtag_bed.start_ca(clone)
    t0 = time.monotonic()
    watch.start_issued(t0)
    async with probe:
        while time.monotonic() - t0 < 300:
            st = await probe.status(url(dogtag_bed, clone))
            raw.append(st.status if st.status == "running" else (st.reason or "?"))
            classified.append(watch.classify(st, time.monotonic()).status)
            if st.status == "running":
                break
            await asyncio.sleep(0.2)
    took = time.monotonic() - t0
    assert raw[-1] == "running", raw[-5:]
    # what a client sees, in this order: refused, then accepted with no answer, then running
    kinds = [r for i, r in enumerate(raw) if i == 0 or raw[i - 1] != r]
    assert kinds == [REASON_REFUSED, REASON_NO_ANSWER, "running"], kinds
    assert "starting" not in raw  # 10.10 never says <Status>starting</Status>
    # and the daemon reads all of it as a start in progress, never as a failure
    assert set(classified[:-1]) == {"starting"}, classified
    print(f"start of {clone}: running after {took:.1f} s; {len(raw)} polls")


# ---- finding 5: getStatus is XML only ---------------------------------------------------------------


async def test_5_getstatus_is_xml_even_when_json_is_asked_for(dogtag_bed: DogtagBed, probe: AgentProbe) -> None:
    for inst in dogtag_bed.cas:
        code, body, ctype = dogtag_bed.request_with_headers(
            inst, "GET", "/ca/admin/ca/getStatus", {"Accept": "application/json"}
        )
        assert code == 200 and ctype.startswith("application/xml"), (code, ctype)
        assert body.startswith("<?xml") and "<Status>running</Status>" in body, body[:200]
    async with probe:  # the probe asks for JSON first
        for inst in dogtag_bed.cas:
            st = await probe.status(url(dogtag_bed, inst))
            assert st.status == "running" and st.state == "1", st
            assert st.version is not None and st.version.startswith("10.10"), st


# ---- finding 6: the CA rewrites CS.cfg in sorted order at every start ------------------------------


def test_6_a_start_sorts_a_key_written_at_the_end_and_keeps_every_key_and_value(dogtag_bed: DogtagBed) -> None:
    _, clone = roles(dogtag_bed)
    path = dogtag_bed.ca(clone).cs_cfg
    dogtag_bed.stop_ca(clone)
    before = path.read_text()
    lines = before.splitlines(keepends=True)
    # what our writer does with a key it adds: append it at the end
    moved = next(i for i, line in enumerate(lines) if line.startswith("master.ca.agent.host="))
    edited = "".join(lines[:moved] + lines[moved + 1 :] + [lines[moved]])
    assert keys(edited) != sorted(keys(edited))
    st = path.stat()
    path.write_text(edited)  # in place: owner and mode stay
    dogtag_bed.start_ca(clone)
    # already when the start command returns, before the JVM has read it: the unit's ExecStartPre
    # (pki-server upgrade / migrate) loads and stores CS.cfg; so pkidaemon's archive step, which
    # copies CS.cfg to archives/ only when it differs from the last copy, finds nothing new
    assert keys(path.read_text()) == sorted(keys(path.read_text())), "not sorted by the ExecStartPre"
    dogtag_bed.wait_running(clone, timeout=300)
    after = path.read_text()
    assert keys(after) == sorted(keys(after)), "the CA did not write CS.cfg back in sorted order"
    assert after != edited  # the appended key moved back into place
    # the keys and values are all there, the role with them: what the daemon's invariant compares
    cfg_before, cfg_after = cscfg.parse(before, "before"), cscfg.parse(after, "after")
    assert cscfg.unrelated_items(cfg_after) == cscfg.unrelated_items(cfg_before)
    assert items(after) == items(before)
    assert cscfg.classify(cfg_after).role is cscfg.Role.CLONE
    assert (path.stat().st_uid, path.stat().st_gid, path.stat().st_mode) == (st.st_uid, st.st_gid, st.st_mode)
    # the last archived copy has the same keys and values too
    archived = (path.parent / "archives").glob("CS.cfg.bak.*")
    assert items(max(archived).read_text()) == items(before)
