"""Runbook: Prometheus can scrape every daemon, and the alert rules say what they claim to say.

- `promtool check metrics` accepts a real scrape of `/metrics` from running lab daemons;
- every metric the alert rules use is one a daemon exports (no rule watches a name that does not exist);
- `promtool check rules` accepts prometheus/alerts.yml and `promtool test rules` passes alerts_test.yml;
- every rule has a case where it fires and one where it stays quiet, and a rule that never fires
  makes the unit tests fail (they really test it).

Lab ports: 19400-19422.
"""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from ca_watchdog.lab.cluster import LabCluster
from ca_watchdog.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "prometheus" / "alerts_test.yml"
BASE_PORT = 19400


def promtool(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # a missing promtool fails every test that needs it, loudly (never a skip)
    assert shutil.which("promtool"), "promtool missing: scripts/setup.sh installs the Debian package prometheus"
    return subprocess.run(
        ["promtool", *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def alert_names(rules_text: str) -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)\s*$", rules_text, re.M)


def exported_families(exposition: str) -> set[str]:
    """Metric family names of a text exposition, and the sample names prometheus-client derives."""
    names = set(re.findall(r"^# TYPE (\S+) ", exposition, re.M))
    names |= set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{| )", exposition, re.M))
    return names


# ---- the lab: three daemons to scrape -------------------------------------------------------------


def _get(url: str, ctx: ssl.SSLContext) -> bytes:
    with urllib.request.urlopen(url, context=ctx, timeout=3) as r:
        body: bytes = r.read()
        return body


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    c = LabCluster(tmp_path_factory.mktemp("prom-lab"), base_port=BASE_PORT)
    c.build()
    try:
        c.start()
        assert c.pki is not None
        ctx = ssl.create_default_context(cafile=str(c.pki.ca_cert))

        def master_serving() -> bool:
            try:
                _get(f"https://127.0.0.1:{c.nodes['ca1'].api_port}/master", ctx)
                return True
            except OSError:
                return False

        assert c.wait_for(master_serving, 60), "ca1 never answered /master 200"
        time.sleep(2.5)  # a few cycles on every daemon, so every member is in every view
        yield {n: _get(f"https://127.0.0.1:{c.nodes[n].api_port}/metrics", ctx).decode() for n in c.names}
    finally:
        c.stop()


def test_a_scrape_of_every_running_daemon_passes_promtool_check_metrics(scrapes: dict[str, str]) -> None:
    for name, body in scrapes.items():
        r = promtool("check", "metrics", stdin=body.encode())
        assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), (
            f"promtool check metrics on {name}'s /metrics:\n{r.stdout}{r.stderr}"
        )


def test_a_running_daemon_exports_the_operator_metrics(scrapes: dict[str, str]) -> None:
    body = scrapes["ca2"]
    # every daemon exports its view of all members
    for m in ("ca1", "ca2", "ca3"):
        assert f'ca_watchdog_member_up{{member="{m}"}} 1.0' in body
        assert f'ca_watchdog_cscfg_role{{member="{m}",role="{"master" if m == "ca1" else "clone"}"}} 1.0' in body
    assert 'ca_watchdog_leader{member="ca2"} 0.0' in body
    assert "ca_watchdog_leader_present 1.0" in body
    assert "ca_watchdog_masters_seen 1.0" in body
    assert "ca_watchdog_paused 0.0" in body
    # the failover counters exist at 0 before the first failover, so increase() sees the first one
    assert 'ca_watchdog_failovers_total{kind="automatic",result="success"} 0.0' in body
    assert 'ca_watchdog_failovers_total{kind="automatic",result="failed"} 0.0' in body
    assert 'ca_watchdog_probe_latency_seconds_count{probe="agent"}' in body
    assert 'ca_watchdog_leader{member="ca1"} 1.0' in scrapes["ca1"]
    last = float(re.search(r"^ca_watchdog_last_cycle_timestamp_seconds (\S+)$", body, re.M).group(1))  # type: ignore[union-attr]
    assert abs(time.time() - last) < 30


def test_every_metric_an_alert_rule_uses_is_exported(scrapes: dict[str, str]) -> None:
    used = set(re.findall(r"\bca_watchdog_[a-z_]+\b", ALERTS.read_text()))
    # families without samples yet (replication, CRL: no 389-DS in this lab) are still declared by TYPE lines
    exported = exported_families(scrapes["ca1"])
    missing = sorted(used - exported)
    assert not missing, f"alerts.yml uses metrics no daemon exports: {missing}"


def test_the_metric_definitions_alone_pass_promtool_check_metrics() -> None:
    m = Metrics("ca1")
    m.failovers.labels("automatic", "success").inc()
    m.replication_state.labels("ca1", "ca1-to-ca2").set(2)
    m.replication_lag.labels("ca1", "2").set(float("nan"))
    m.crl_age.labels("MasterCRL").set(12.5)
    m.crl_next_update.labels("MasterCRL").set(time.time() + 3600)
    m.probe_latency.labels("ldap").observe(0.01)
    body = generate_latest(m.registry)
    r = promtool("check", "metrics", stdin=body)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
    counters = re.findall(r"^# TYPE (\S+) counter$", body.decode(), re.M)
    assert counters and all(c.endswith("_total") for c in counters), counters


# ---- the alert rules --------------------------------------------------------------------------------


def test_the_alert_rules_pass_promtool_check_rules() -> None:
    r = promtool("check", "rules", str(ALERTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alert_names(ALERTS.read_text()))} rules found" in r.stdout


def test_the_alert_rule_unit_tests_pass() -> None:
    r = promtool("test", "rules", str(ALERTS_TEST))
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_every_rule_the_brief_asks_for_exists() -> None:
    names = set(alert_names(ALERTS.read_text()))
    for wanted in (
        "CAWatchdogNoMaster",
        "CAWatchdogMultipleMasters",
        "CAWatchdogMasterUnmanaged",
        "CAWatchdogNoServingMaster",
        "CAWatchdogSeveralServingMasters",
        "CAWatchdogFailoverHappened",
        "CAWatchdogFailoverFailed",
        "CAWatchdogReplicationRed",
        "CAWatchdogReplicationLag",
        "CAWatchdogCRLOverdue",
        "CAWatchdogCRLTooOld",
        "CAWatchdogNotReporting",
        "CAWatchdogPausedTooLong",
    ):
        assert wanted in names


def test_every_rule_has_a_firing_and_a_quiet_case() -> None:
    text = ALERTS_TEST.read_text()
    quiet = set(re.findall(r"alertname: (\w+), exp_alerts: \[\]", text))
    firing = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels", text))
    for name in alert_names(ALERTS.read_text()):
        assert name in firing, f"{name}: no test where it fires"
        assert name in quiet, f"{name}: no test where it stays quiet"


def _mutate(tmp_path: Path, name: str, new_expr: str) -> Path:
    """A copy of alerts.yml and alerts_test.yml where rule `name` has another expression."""
    text = ALERTS.read_text()
    start = text.index(f"- alert: {name}\n")
    expr_at = text.index("expr:", start)
    nxt = min(text.index(k, expr_at) for k in ("for:", "labels:") if k in text[expr_at:])
    indent = text[expr_at - 8 : expr_at].replace(" ", "")
    assert indent == "", "expr: is expected at 8 spaces"
    mutated = text[:expr_at] + f"expr: {new_expr}\n        " + text[nxt:]
    (tmp_path / "alerts.yml").write_text(mutated)
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")
    return tmp_path / "alerts_test.yml"


@pytest.mark.parametrize("name", alert_names(ALERTS.read_text()))
def test_a_rule_that_never_fires_fails_the_unit_tests(tmp_path: Path, name: str) -> None:
    test_file = _mutate(tmp_path, name, "vector(1) == 2")
    assert promtool("check", "rules", str(tmp_path / "alerts.yml")).returncode == 0
    r = promtool("test", "rules", str(test_file), cwd=tmp_path)
    assert r.returncode != 0, f"alerts_test.yml does not notice that {name} never fires"
    assert name in r.stdout + r.stderr


@pytest.mark.parametrize("name", alert_names(ALERTS.read_text()))
def test_a_rule_that_always_fires_fails_the_unit_tests(tmp_path: Path, name: str) -> None:
    # keep the rule's output labels (job and friends) so only the quiet cases can catch it
    test_file = _mutate(tmp_path, name, 'label_replace(vector(1), "job", "ca-watchdog", "", "")')
    r = promtool("test", "rules", str(test_file), cwd=tmp_path)
    assert r.returncode != 0, f"alerts_test.yml does not notice that {name} always fires"
    assert name in r.stdout + r.stderr
