"""`ca-watchdog doctor` on a running 3-node lab (simulated CAs, the shared replicated 389-DS, one
daemon per node), SQLite and etcd: a healthy node passes every check, and each broken piece of a
host (CS.cfg path, store, certificate, guard drop-in) shows up as its own FAIL line, and only that.

Doctor runs with a copy of ca1's configuration rewritten as on a production host: the CA under
systemd (`pki-tomcatd@lab-ca1.service`), the guard drop-in and unit installed in a systemd
directory of the test's own (`--systemd-dir`). It must change nothing: the invariant checker runs
throughout, and the leader, its epoch and the history are the same at the end.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from scenario_lib import Scenario

from ca_watchdog.lab.cluster import LabCluster
from ca_watchdog.lab.dslab import DSLab
from ca_watchdog.lab.etcdlab import free_ports
from ca_watchdog.lab.invariants import InvariantChecker
from ca_watchdog.lab.pki import Issued, LabCA, new_key

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
BASE_PORTS = {"sqlite": 21400, "etcd": 21440}  # agents base+0..2, APIs base+20..22
INSTANCE = "lab-ca1"


@dataclass
class DoctorLab:
    sc: Scenario
    backend: str
    tmp: Path
    config: Path  # ca1's configuration as on a systemd host
    systemd_dir: Path  # the drop-in and the guard unit installed, as README's step 4 says

    def variant(self, name: str, *edits: tuple[str, str, object]) -> Path:
        """A copy of `config` with each (section, key, value) set."""
        lines = self.config.read_text().splitlines()
        for section, key, value in edits:
            current, done = "", False
            for i, line in enumerate(lines):
                if line.startswith("["):
                    current = line.strip("[] ")
                if current == section and line.startswith(f"{key} = "):
                    lines[i], done = f"{key} = {json.dumps(value)}", True
            assert done, f"no {key} in [{section}]"
        path = self.tmp / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def doctor(self, config: Path | None = None, systemd_dir: Path | None = None) -> tuple[int, list[str]]:
        proc = subprocess.run(
            [
                sys.executable, "-m", "ca_watchdog.cli", "doctor",
                "--config", str(config or self.config), "--systemd-dir", str(systemd_dir or self.systemd_dir),
            ],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert not proc.stderr, proc.stderr
        return proc.returncode, proc.stdout.splitlines()


def install_guard(systemd_dir: Path) -> None:
    dropin = systemd_dir / "pki-tomcatd@.service.d"
    dropin.mkdir(parents=True)
    shutil.copy(REPO / "systemd/pki-tomcatd@.service.d/ca-watchdog.conf", dropin)
    shutil.copy(REPO / "systemd/ca-watchdog-guard@.service", systemd_dir)


@pytest.fixture(scope="module", params=["sqlite", "etcd"])
def lab(request: pytest.FixtureRequest, ds_lab: DSLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DoctorLab]:
    backend = str(request.param)
    endpoint = request.getfixturevalue("etcd_for_scenarios").endpoint if backend == "etcd" else None
    ds_lab.wait_replicated(timeout=60)  # every test that faults the directory restores it; check it is so
    tmp = tmp_path_factory.mktemp(f"doctor-{backend}")
    c = LabCluster(tmp / "lab", base_port=BASE_PORTS[backend], ds=ds_lab, store_backend=backend, etcd_endpoint=endpoint)
    c.build()
    sc = Scenario(c, ds_lab, time.time())
    try:
        c.start()
        sc.wait_master("ca1", 60)
        assert sc.wait_converged(60) == "ca1"
        sc.checker = InvariantChecker(c, period=0.5).start()
        lab = DoctorLab(sc, backend, tmp, c.nodes["ca1"].config, tmp / "systemd")
        lab.config = lab.variant(
            "ca1-systemd",
            ("node", "service_control", "systemd"),
            ("node", "service", f"pki-tomcatd@{INSTANCE}.service"),
        )
        install_guard(lab.systemd_dir)
        before = sc.status()
        history = len(sc.history())
        yield lab
        after = sc.status()
        assert (after["leader"], after["epoch"]) == (before["leader"], before["epoch"]), "doctor disturbed the leader"
        assert len(sc.history()) == history, "doctor wrote history"
        violations = sc.checker.stop()
        assert not violations, "safety invariants violated:\n" + "\n".join(violations)
    finally:
        if sc.checker is not None:
            sc.checker.stop()
        c.stop()


def checks(lines: list[str]) -> dict[str, list[str]]:
    """Check names by status ("STATUS  name: detail" lines; the last line is the summary)."""
    out: dict[str, list[str]] = {"OK": [], "WARN": [], "FAIL": []}
    for line in lines[:-1]:
        status, _, rest = line.partition("  ")
        out[status.strip()].append(rest.strip().split(": ", 1)[0])
    return out


def only_fail(lines: list[str], name: str) -> str:
    """The one FAIL line, which must be the check `name`."""
    failed = [line for line in lines if line.startswith("FAIL")]
    assert len(failed) == 1 and failed[0].startswith(f"FAIL  {name}: "), "\n".join(lines)
    return failed[0]


def test_doctor_on_a_healthy_node_prints_only_ok_lines_and_exits_0(lab: DoctorLab) -> None:
    rc, lines = lab.doctor()
    by = checks(lines)
    assert rc == 0 and not by["WARN"] and not by["FAIL"], "\n".join(lines)
    assert lines[-1] == f"{len(by['OK'])} OK, 0 WARN, 0 FAIL"
    names = set(by["OK"])
    expected = {
        "config", "node in members", "TLS and credentials", "CS.cfg file", "CS.cfg role", "store", "leader",
        "serving master", "guard drop-in", "timing rules", "fence point", "failover time",
        "certificate tls.ca_file", "certificate tls.cert_file", "certificate api.cert_file",
        "certificate api.client_ca_file",
        *(f"agent {n}" for n in ("ca1", "ca2", "ca3")), *(f"389-DS {n}" for n in ("ca1", "ca2", "ca3")),
        "clock ca2", "clock ca3",
    }  # fmt: skip
    assert names == expected, "\n".join(lines)
    text = "\n".join(lines)
    assert "ca1 is the only CA serving as master and holds the leader key" in text
    assert "master; agrees with the leader key (ca1)" in text


def test_doctor_with_a_wrong_cscfg_path_fails_the_cscfg_file_check(lab: DoctorLab) -> None:
    wrong = lab.tmp / "no-such-instance" / "CS.cfg"
    rc, lines = lab.doctor(lab.variant("wrong-cscfg", ("node", "cs_cfg", str(wrong))))
    line = only_fail(lines, "CS.cfg file")
    assert rc == 1 and str(wrong) in line and "set node.cs_cfg" in line


def test_doctor_with_an_unreachable_store_fails_the_store_check(lab: DoctorLab) -> None:
    if lab.backend == "etcd":
        (port,) = free_ports(1, 24930)  # nothing listens there
        config = lab.variant("no-store", ("store.etcd", "endpoints", [f"http://127.0.0.1:{port}"]))
    else:
        config = lab.variant("no-store", ("store", "path", str(lab.tmp / "no-such-dir" / "state.db")))
    rc, lines = lab.doctor(config)
    line = only_fail(lines, "store")
    assert rc == 1 and "unreachable" in line
    # what only the store can tell is not claimed without it
    assert not any(n == "leader" or n.startswith("clock") for n in checks(lines)["OK"]), "\n".join(lines)


def test_doctor_with_an_expired_certificate_fails_that_certificates_check(lab: DoctorLab) -> None:
    pki = lab.sc.c.pki
    assert pki is not None
    ca = LabCA.load(pki.ca_cert, pki.ca_key)
    key = new_key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string("CN=expired api,O=ca-watchdog lab"))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=400))
        .not_valid_after(now - dt.timedelta(days=35))
        .sign(ca.key, hashes.SHA256())
    )
    cert_file, key_file = Issued(cert, key).write(lab.tmp / "expired", "api")
    config = lab.variant("expired", ("api", "cert_file", str(cert_file)), ("api", "key_file", str(key_file)))
    rc, lines = lab.doctor(config)
    line = only_fail(lines, "certificate api.cert_file")
    assert rc == 1 and "CN=expired api" in line and "expired 35 days ago" in line


def test_doctor_without_the_guard_drop_in_fails_the_guard_check(lab: DoctorLab) -> None:
    bare = lab.tmp / "systemd-bare"
    bare.mkdir(exist_ok=True)
    shutil.copy(REPO / "systemd/ca-watchdog-guard@.service", bare)  # the unit alone guards nothing
    rc, lines = lab.doctor(systemd_dir=bare)
    line = only_fail(lines, "guard drop-in")
    assert rc == 1 and f"pki-tomcatd@{INSTANCE}.service would start without the guard" in line
