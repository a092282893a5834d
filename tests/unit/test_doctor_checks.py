"""`ca-watchdog doctor`'s judgements, without a cluster: what each observation makes of a check line.

(tests/scenarios/test_doctor.py runs the whole preflight against a running lab.)
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

from ca_watchdog import cscfg, doctor
from ca_watchdog.cli import main
from ca_watchdog.config import FailoverSettings, MemberSettings, NodeSettings, Settings, TimingSettings
from ca_watchdog.doctor import FAIL, OK, WARN, CertValidity, Check, ClockSample
from ca_watchdog.probes.agent import AgentInfo, AgentStatus
from ca_watchdog.probes.directory import Agreement, DirectoryObservation
from ca_watchdog.store.base import (
    Flags,
    LeaderRecord,
    MemberRecord,
    MembersSnapshot,
    StoreState,
)

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
NOW = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


def settings(service: str = "pki-tomcatd@pki-tomcat.service", control: str = "systemd") -> Settings:
    node = NodeSettings(name="ca1", cs_cfg="/x/CS.cfg", service=service, service_control=control)  # type: ignore[arg-type]
    members = (MemberSettings("ca1", "https://127.0.0.1:8443"), MemberSettings("ca2", "https://ca2.example:8443"))
    return Settings(source="test.toml", node=node, members=members)


def state(leader: str | None = "ca1", problems: Sequence[str] = (), paused: bool = False) -> StoreState:
    rec = LeaderRecord(leader, 3, 0.0, 0.0, 30.0, "test") if leader else None
    flags = Flags(paused, 1.0 if paused else None, None, None)
    return StoreState(rec, None, False, MembersSnapshot({}, ()), flags, None, tuple(problems))


# ---- the line ----------------------------------------------------------------------------------


def test_a_check_prints_as_one_line_with_its_status_name_detail_and_what_to_do() -> None:
    assert Check(OK, "store", "fine").line() == "OK    store: fine"
    assert Check(FAIL, "store", "down", "start it").line() == "FAIL  store: down  => start it"


# ---- configuration and this node ------------------------------------------------------------------


def test_a_node_name_outside_the_member_list_fails_both_the_config_and_the_member_check(tmp_path: Path) -> None:
    text = (REPO / "config.example.toml").read_text().replace('name = "ca1"', 'name = "ca9"', 1)
    path = tmp_path / "c.toml"
    path.write_text(text)
    checks, s = doctor.config_checks(str(path))
    assert s is None
    assert [(c.status, c.name) for c in checks] == [(FAIL, "config"), (FAIL, "node in members")]
    assert "ca9" in checks[1].detail and "node.name" in (checks[1].hint or "")


def test_invalid_toml_fails_the_config_check_alone_and_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[node\n")
    checks, s = doctor.config_checks(str(path))
    assert s is None and len(checks) == 1 and checks[0].status == FAIL and str(path) in checks[0].detail


def test_a_member_whose_agent_host_is_not_an_address_of_this_host_is_a_warning() -> None:
    s = settings()
    assert doctor.member_check(s, lambda host: [("127.0.0.1", True)]).status == OK
    other = doctor.member_check(s, lambda host: [("10.9.9.9", False)])
    assert other.status == WARN and "10.9.9.9" in other.detail and "node.name" in (other.hint or "")


def test_the_own_agent_host_is_found_among_this_hosts_addresses() -> None:
    assert ("127.0.0.1", True) in doctor.local_addresses("127.0.0.1")


# ---- certificates ----------------------------------------------------------------------------------


def cert(subject: str, days_left: float, days_old: float = 100) -> CertValidity:
    return CertValidity(subject, NOW - dt.timedelta(days=days_old), NOW + dt.timedelta(days=days_left))


def test_an_expired_certificate_fails_and_says_how_long_ago() -> None:
    c = doctor.expiry_check("tls.cert_file", "/a.pem", [cert("CN=a", -12.2)], NOW)
    assert c.status == FAIL and "CN=a expired 12 days ago" in c.detail and c.name == "certificate tls.cert_file"


def test_a_certificate_not_yet_valid_fails_and_points_at_the_clock() -> None:
    c = doctor.expiry_check("tls.cert_file", "/a.pem", [cert("CN=a", 300, days_old=-2)], NOW)
    assert c.status == FAIL and "not valid before" in c.detail and "clock" in (c.hint or "")


def test_a_certificate_ending_within_28_days_warns_and_one_ending_later_passes() -> None:
    assert doctor.expiry_check("k", "/a.pem", [cert("CN=a", 27)], NOW).status == WARN
    ok = doctor.expiry_check("k", "/a.pem", [cert("CN=a", 29)], NOW)
    assert ok.status == OK and "expires in 29 days" in ok.detail


def test_a_bundle_is_judged_by_its_first_certificate_to_expire() -> None:
    c = doctor.expiry_check("tls.ca_file", "/b.pem", [cert("CN=late", 900), cert("CN=soon", 10)], NOW)
    assert c.status == WARN and "2 certificates, the first to expire: CN=soon" in c.detail


def test_a_file_without_certificates_fails() -> None:
    assert doctor.expiry_check("tls.ca_file", "/b.pem", [], NOW).status == FAIL


def test_an_unreadable_certificate_file_fails_its_line(tmp_path: Path) -> None:
    s = settings()
    s = Settings(s.source, s.node, s.members, tls=type(s.tls)(ca_file=str(tmp_path / "missing.pem")))
    (c,) = doctor.certificate_checks(s, NOW)
    assert c.status == FAIL and c.name == "certificate tls.ca_file" and "missing.pem" in c.detail


# ---- CS.cfg -------------------------------------------------------------------------------------------


def test_a_missing_cscfg_fails_the_file_check_and_says_which_key_to_set(tmp_path: Path) -> None:
    c, cfg = doctor.cscfg_file_check(str(tmp_path / "CS.cfg"))
    assert cfg is None and c.status == FAIL and "node.cs_cfg" in (c.hint or "")


def test_a_malformed_cscfg_fails_the_file_check_naming_the_line() -> None:
    c, cfg = doctor.cscfg_file_check(str(FIXTURES / "CS.cfg.malformed.sample"))
    assert cfg is None and c.status == FAIL and (c.hint or "").startswith("fix line ")


def test_a_symlinked_cscfg_is_refused_as_the_daemon_refuses_it(tmp_path: Path) -> None:
    real = tmp_path / "real.cfg"
    shutil.copy(FIXTURES / "CS.cfg.master.sample", real)
    (tmp_path / "CS.cfg").symlink_to(real)
    c, _ = doctor.cscfg_file_check(str(tmp_path / "CS.cfg"))
    assert c.status == FAIL and "symlink" in c.detail


def test_the_cscfg_role_agrees_with_the_leader_key_or_warns() -> None:
    master = cscfg.read_cscfg(FIXTURES / "CS.cfg.master.sample")
    clone = cscfg.read_cscfg(FIXTURES / "CS.cfg.clone.sample")
    assert doctor.cscfg_role_check("ca1", master, state("ca1")).status == OK
    assert doctor.cscfg_role_check("ca1", clone, state("ca2")).status == OK
    assert doctor.cscfg_role_check("ca1", master, None).status == OK  # no store: nothing to compare with
    stale = doctor.cscfg_role_check("ca1", master, state("ca2"))
    assert stale.status == WARN and "ca2 holds the leader key" in stale.detail


def test_an_inconsistent_cscfg_fails_the_role_check() -> None:
    c = doctor.cscfg_role_check("ca1", cscfg.read_cscfg(FIXTURES / "CS.cfg.inconsistent.sample"), state())
    assert c.status == FAIL and c.detail.startswith("inconsistent")


# ---- the store's facts ---------------------------------------------------------------------------------


def test_the_leader_line_passes_with_a_holder_or_an_empty_store_and_warns_otherwise() -> None:
    assert doctor.leader_check(state("ca1")).status == OK
    empty = doctor.leader_check(state(None))
    assert empty.status == OK and "empty store" in empty.detail
    assert doctor.leader_check(state("ca1", paused=True)).status == WARN
    assert doctor.leader_check(state("ca1", problems=["members/x: ignored"])).status == WARN


# ---- agents and directories ------------------------------------------------------------------------------


def status(s: str, reason: str | None = None) -> AgentStatus:
    return AgentStatus(s, reason, 200 if s == "running" else None, "11.5.0", "1", 0.01)  # type: ignore[arg-type]


def test_an_agent_port_is_judged_by_getstatus_the_functional_probe_and_getinfo() -> None:
    ok, role = doctor.agent_check("ca1", "https://h:8443", status("running"), AgentInfo(None, None))
    assert ok.status == OK and role == "master" and "functional probe ok" in ok.detail
    _, role = doctor.agent_check("ca2", "https://h:8443", status("running"), AgentInfo("ca1", 8443))
    assert role == "clone"
    down, role = doctor.agent_check("ca2", "https://h:8443", status("down", "connection refused"), None)
    assert down.status == FAIL and role is None and "connection refused" in down.detail
    bad_info = AgentInfo(None, None, ok=False, error="bad answer: empty body")
    info_fail, _ = doctor.agent_check("ca2", "https://h:8443", status("running"), bad_info)
    assert info_fail.status == FAIL and "empty body" in info_fail.detail
    assert doctor.agent_check("ca2", "https://h:8443", status("starting"), None)[0].status == WARN


def test_exactly_one_serving_master_that_holds_the_key_passes() -> None:
    assert doctor.serving_master_check({"ca1": "master", "ca2": "clone"}, "ca1").status == OK
    assert doctor.serving_master_check({"ca1": "master", "ca2": "master"}, "ca1").status == FAIL
    assert doctor.serving_master_check({"ca1": None, "ca2": "clone"}, None).status == WARN
    assert doctor.serving_master_check({"ca1": "clone", "ca2": "master"}, "ca1").status == WARN


def agreement(name: str, state: str, message: str = "") -> Agreement:
    return Agreement(name, "h", 389, state, 0, message, None, None, False)  # type: ignore[arg-type]


def ds(*agreements: Agreement, ok: bool = True, error: str | None = None, rid: int | None = 1) -> DirectoryObservation:
    return DirectoryObservation(
        "ldap://h:389", ok, error, 0.02, rid if ok else None, agreements, {1: None, 2: None} if ok else {}
    )


def test_a_directory_with_green_or_transiently_amber_agreements_passes() -> None:
    assert doctor.directory_check("ca1", ds(agreement("a", "green")), True, True).status == OK
    busy = doctor.directory_check("ca1", ds(agreement("a", "green"), agreement("b", "amber")), True, True)
    assert busy.status == OK and "amber is transient: b" in busy.detail


def test_a_red_agreement_fails_with_its_message_and_an_unknown_one_warns() -> None:
    red = doctor.directory_check("ca1", ds(agreement("a", "red", "Error (-1) can't contact")), True, True)
    assert red.status == FAIL and "can't contact" in red.detail
    assert doctor.directory_check("ca1", ds(agreement("a", "unknown")), True, True).status == WARN


def test_a_directory_without_replica_or_agreements_is_reported() -> None:
    assert doctor.directory_check("ca1", ds(rid=None), True, True).status == FAIL
    lonely = doctor.directory_check("ca1", ds(), True, True)
    assert lonely.status == WARN and "no replication agreement" in lonely.detail


def test_a_refused_bind_fails_on_this_node_but_only_warns_for_another_members_directory() -> None:
    refused = ds(ok=False, error="bind failed: invalidCredentials")
    assert doctor.directory_check("ca1", refused, True, True).status == FAIL
    other = doctor.directory_check("ca2", refused, False, True)
    assert other.status == WARN and "run doctor on ca2" in (other.hint or "")
    assert doctor.directory_check("ca2", ds(ok=False, error="connection refused"), False, True).status == FAIL


# ---- the guard drop-in ------------------------------------------------------------------------------------


def test_the_shipped_drop_in_makes_the_ca_start_wait_for_the_guard() -> None:
    assert doctor.dropin_problems((REPO / "systemd/pki-tomcatd@.service.d/ca-watchdog.conf").read_text()) == []


def test_a_drop_in_without_the_guard_dependencies_in_its_unit_section_is_refused() -> None:
    assert doctor.dropin_problems("[Unit]\nAfter=ca-watchdog-guard@%i.service\n") == [
        "no Requires=ca-watchdog-guard@%i.service in [Unit]"
    ]
    in_service = "[Service]\nRequires=ca-watchdog-guard@%i.service\nAfter=ca-watchdog-guard@%i.service\n"
    assert len(doctor.dropin_problems(in_service)) == 2
    commented = "[Unit]\n#Requires=ca-watchdog-guard@%i.service\nAfter=network.target ca-watchdog-guard@x.service\n"
    assert doctor.dropin_problems(commented) == ["no Requires=ca-watchdog-guard@%i.service in [Unit]"]


def install(root: Path, dropin_dir: str, guard_unit: bool = True) -> None:
    (root / dropin_dir).mkdir(parents=True)
    shutil.copy(REPO / "systemd/pki-tomcatd@.service.d/ca-watchdog.conf", root / dropin_dir)
    if guard_unit:
        shutil.copy(REPO / "systemd/ca-watchdog-guard@.service", root)


def test_the_guard_drop_in_counts_for_every_instance_or_for_this_one(tmp_path: Path) -> None:
    install(tmp_path / "all", "pki-tomcatd@.service.d")
    install(tmp_path / "one", "pki-tomcatd@pki-tomcat.service.d")
    assert doctor.guard_check(settings(), str(tmp_path / "all")).status == OK
    assert doctor.guard_check(settings(), str(tmp_path / "one")).status == OK
    other = doctor.guard_check(settings("pki-tomcatd@other.service"), str(tmp_path / "one"))
    assert other.status == FAIL and "would start without the guard" in other.detail


def test_a_drop_in_without_the_guard_unit_fails(tmp_path: Path) -> None:
    install(tmp_path, "pki-tomcatd@.service.d", guard_unit=False)
    c = doctor.guard_check(settings(), str(tmp_path))
    assert c.status == FAIL and "ca-watchdog-guard@.service is not" in c.detail


def test_a_ca_not_under_pki_tomcatd_cannot_be_checked_and_warns(tmp_path: Path) -> None:
    assert doctor.guard_check(settings(control="command"), str(tmp_path)).status == WARN
    assert doctor.guard_check(settings("tomcat.service"), str(tmp_path)).status == WARN


# ---- clocks -------------------------------------------------------------------------------------------------


def test_a_clock_offset_is_bounded_by_the_two_reads_around_the_write() -> None:
    # written at 100.05 by this host's clock, stamped 100.05 + 0.2 by the member's
    c = doctor.clock_check("ca2", ClockSample(100.25, before=100.0, after=100.1), True, 5.0)
    assert c.status == OK and c.detail.startswith("+0.200 s (± 0.050 s)")


def test_a_skewed_clock_warns_and_a_grossly_skewed_one_fails() -> None:
    assert doctor.clock_check("ca2", ClockSample(105.0, 100.0, 100.1), True, 5.0).status == WARN
    assert doctor.clock_check("ca2", ClockSample(100.0 - 400, 100.0, 100.1), True, 5.0).status == FAIL


def test_an_offset_the_reads_cannot_tell_from_zero_passes() -> None:
    # 1.5 s apart, but the write may have come anywhere in a 2 s window: no proof of a skew over 1 s
    assert doctor.clock_check("ca2", ClockSample(101.5, 99.0, 101.0), True, 5.0).status == OK


def test_a_member_without_a_fresh_record_is_not_compared() -> None:
    absent = doctor.clock_check("ca3", None, False, 5.0)
    assert absent.status == WARN and "not running" in absent.detail
    stuck = doctor.clock_check("ca3", None, True, 5.0)
    assert stuck.status == WARN and "did not change within 5 s" in stuck.detail


async def test_watching_the_records_takes_a_sample_once_a_record_changes() -> None:
    reads = 0

    async def read() -> MembersSnapshot:
        nonlocal reads
        reads += 1
        stamp = 1000.0 if reads < 3 else 2000.0  # ca2 rewrites its record between the 2nd and 3rd read
        return MembersSnapshot({"ca2": MemberRecord("ca2", {}, stamp)}, ())

    samples, present = await doctor.watch_clocks(read, ["ca2", "ca3"], window=1.0)
    assert present == {"ca2"} and set(samples) == {"ca2"}
    s = samples["ca2"]
    assert s.updated_at == 2000.0 and s.before < s.after


# ---- timing ------------------------------------------------------------------------------------------------


def test_the_default_timing_spells_out_the_fence_point_and_the_failover_time() -> None:
    rules, fence, failover = doctor.timing_checks(TimingSettings(), FailoverSettings())
    assert [c.status for c in (rules, fence, failover)] == [OK, OK, OK]
    assert "= 14.5 s old" in fence.detail and "ttl - safety_margin = 25 s" in fence.detail
    assert "3 failed probes x interval 2 s = 6 s" in failover.detail and "host lost: ttl 30 s" in failover.detail


def test_a_fence_point_one_missed_renewal_away_warns() -> None:
    thin = TimingSettings(interval=2.0, agent_timeout=1.0, store_timeout=1.0, ttl=11.0, safety_margin=2.0)
    _, fence, _ = doctor.timing_checks(thin, FailoverSettings(restart_before_failover=False))
    assert fence.status == WARN and "= 3.5 s old" in fence.detail


# ---- the command ------------------------------------------------------------------------------------------------


def test_doctor_json_with_a_broken_config_exits_1_and_says_not_ok(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[node]\nname = 'ca1'\n")
    assert main(["doctor", "--config", str(path), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["checks"][0]["status"] == FAIL and out["checks"][0]["name"] == "config"
