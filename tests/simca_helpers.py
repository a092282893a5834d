"""Shared helpers for tests that run simulated Dogtag CAs (ca_watchdog.lab.simca) as subprocesses.

- make_lab_pki(dir): a fresh lab CA, server/agent certificates, plus an unrelated "wrong" CA.
- write_cscfg(path, role=...): a master or clone CS.cfg made from tests/fixtures/CS.cfg.master.sample,
  with any issuing point ids (unique ids keep tests apart in a shared, replicated 389-DS).
- run_simca(...): start `ca-watchdog lab ca` on a free loopback port, wait for its listening
  line, SIGTERM it on exit (and check it stopped cleanly).
- read_crl_entry / parse_write_log / writer_switches: what the simca wrote in LDAP, and the
  split-brain signal (two writers interleaving on one issuing point record).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ca_watchdog import cscfg
from ca_watchdog.lab.pki import LabCA, LabPKIFiles, write_lab_pki

TESTS = Path(__file__).resolve().parent
MASTER_SAMPLE = TESTS / "fixtures" / "CS.cfg.master.sample"
LISTENING = re.compile(r"^simca (\S+) listening on https://127\.0\.0\.1:(\d+) ")
LOG_ATTR = "labCRLWriteLog"


@dataclass(frozen=True)
class LabPKI:
    files: LabPKIFiles
    wrong_ca_cert: Path  # a CA that signed nothing here: trusting only it must fail TLS
    wrong_client_cert: Path  # an agent cert from the wrong CA
    wrong_client_key: Path

    @property
    def ca_cert(self) -> Path:
        return self.files.ca_cert

    @property
    def ca_key(self) -> Path:
        return self.files.ca_key


def make_lab_pki(directory: Path) -> LabPKI:
    files = write_lab_pki(directory / "pki")
    wrong = LabCA.create("some other CA")
    wrong_ca_cert, _ = wrong.write(directory / "wrong", "ca")
    wrong_client_cert, wrong_client_key = wrong.issue_client("intruder").write(directory / "wrong", "agent")
    return LabPKI(files, wrong_ca_cert, wrong_client_cert, wrong_client_key)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique_ip(prefix: str = "T") -> str:
    """An issuing point id no other test uses (letters and digits only, as Dogtag ids are)."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def write_cscfg(
    path: Path,
    role: str = "master",
    issuing_points: Sequence[str] = ("MasterCRL",),
    master_host: str = "ca1.example.test",
    master_port: int = 8443,
    basedn: str = "o=pki-tomcat-CA",
    machine_name: str | None = None,
) -> Path:
    """A CS.cfg from the master sample: its MasterCRL block copied once per issuing point id."""
    lines = MASTER_SAMPLE.read_text(encoding="utf-8").splitlines()
    block = [ln for ln in lines if ln.startswith("ca.crl.MasterCRL.")]
    out: list[str] = []
    for ln in lines:
        if ln.startswith("ca.crl.MasterCRL."):
            if ln == block[0]:
                for ip in issuing_points:
                    out += [b.replace("ca.crl.MasterCRL.", f"ca.crl.{ip}.", 1) for b in block]
            continue
        if ln.startswith("internaldb.basedn="):
            ln = f"internaldb.basedn={basedn}"
        if machine_name and ln.startswith("machineName="):
            ln = f"machineName={machine_name}"
        out.append(ln)
    cfg = cscfg.parse("\n".join(out) + "\n", str(path))
    if role == "clone":
        cfg = cscfg.demote(cfg, master_host, master_port)
    elif role != "master":
        raise ValueError(role)
    assert cscfg.classify(cfg).role.value == role, cscfg.classify(cfg).problems
    path.write_bytes(cfg.render())
    return path


@dataclass
class SimCAProcess:
    proc: subprocess.Popen[bytes]
    name: str
    port: int
    stdout: Path
    stderr: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return f"stdout:\n{self.stdout.read_text()}\nstderr:\n{self.stderr.read_text()}"

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit code (SIGKILL, and an error, if it does not stop)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                msg = f"simca {self.name} ignored SIGTERM for {timeout} s\n{self.logs()}"
                raise AssertionError(msg) from None
        return int(self.proc.returncode)


def start_simca(
    workdir: Path,
    pki: LabPKI,
    cs_cfg: Path,
    *,
    name: str = "sim",
    status_format: str = "json",
    start_delay: float = 0.0,
    status_delay: float = 0.0,
    status_fault: str | None = None,
    ldap_url: str | None = None,
    ldap_bind_dn: str | None = None,
    ldap_password_file: Path | None = None,
    crl_interval: float = 1.0,
    with_cafile: bool = True,
    startup_timeout: float = 20.0,
    port: int = 0,
    wait_listening: bool = True,
) -> SimCAProcess:
    """Start a simulated CA; with port 0 (any free port) it binds at once and there is no period in
    which it refuses connections. wait_listening=False returns right after the process started."""
    f = pki.files
    args = [sys.executable, "-m", "ca_watchdog.cli", "lab", "ca", "--cs-cfg", str(cs_cfg), "--port", str(port)]
    args += ["--cert", str(f.server_cert), "--key", str(f.server_key), "--status-format", status_format]
    args += ["--start-delay", str(start_delay), "--status-delay", str(status_delay)]
    args += ["--crl-interval", str(crl_interval), "--name", name]
    if with_cafile:
        args += ["--cafile", str(f.ca_cert), "--signing-key", str(f.ca_key)]
    if status_fault:
        args += ["--status-fault", status_fault]
    if ldap_url:
        assert ldap_password_file is not None
        args += ["--ldap-url", ldap_url, "--ldap-password-file", str(ldap_password_file)]
        if ldap_bind_dn:
            args += ["--ldap-bind-dn", ldap_bind_dn]
    stem = f"simca-{name}-{uuid.uuid4().hex[:6]}"
    out, err = workdir / f"{stem}.out", workdir / f"{stem}.err"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(args, stdout=o, stderr=e, stdin=subprocess.DEVNULL, env=dict(os.environ))
    sim = SimCAProcess(proc, name, port, out, err)
    if not wait_listening:
        return sim
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        m = LISTENING.match(out.read_text())
        if m:
            sim.port = int(m.group(2))
            return sim
        if proc.poll() is not None:
            raise AssertionError(f"simca {name} exited with {proc.returncode} before listening\n{sim.logs()}")
        time.sleep(0.05)
    sim.stop()
    raise AssertionError(f"simca {name} printed no listening line in {startup_timeout} s\n{sim.logs()}")


@contextlib.contextmanager
def run_simca(workdir: Path, pki: LabPKI, cs_cfg: Path, **kw: Any) -> Iterator[SimCAProcess]:
    sim = start_simca(workdir, pki, cs_cfg, **kw)
    try:
        yield sim
    finally:
        rc = sim.stop()
        assert rc == 0, f"simca {sim.name} exited with {rc}\n{sim.logs()}"


# ---- what the simulated CAs wrote in LDAP -----------------------------------------------------------


def crl_dn(issuing_point: str, basedn: str = "o=pki-tomcat-CA") -> str:
    return f"cn={issuing_point},ou=crlIssuingPoints,ou=ca,{basedn}"


def read_crl_entry(
    ldap_url: str, bind_dn: str, password: str, issuing_point: str, basedn: str = "o=pki-tomcat-CA"
) -> dict[str, list[str]] | None:
    """The issuing point entry's attributes (names lower-cased), or None if it does not exist."""
    from urllib.parse import urlsplit

    from ldap3 import BASE, NONE, Connection, Server

    u = urlsplit(ldap_url)
    server = Server(u.hostname, port=u.port, get_info=NONE, connect_timeout=3)
    conn = Connection(server, bind_dn, password, auto_bind=True, receive_timeout=5)
    try:
        if not conn.search(crl_dn(issuing_point, basedn), "(objectClass=*)", BASE, attributes=["*"]):
            if conn.result.get("result") == 32:
                return None
            raise AssertionError(f"LDAP search failed: {conn.result}")
        attrs = conn.entries[0].entry_attributes_as_dict
        return {k.lower(): [str(v) for v in vals] for k, vals in attrs.items()}
    finally:
        conn.unbind()


@dataclass(frozen=True, order=True)
class Write:
    at: dt.datetime
    writer: str
    number: int


_LOG = re.compile(r"^(\d{14})\.(\d{3})Z writer=(\S+) crlNumber=(\d+)$")


def parse_write_log(values: Sequence[str]) -> list[Write]:
    """`labCRLWriteLog` values, oldest first."""
    out: list[Write] = []
    for v in values:
        m = _LOG.match(v)
        if not m:
            raise AssertionError(f"unexpected {LOG_ATTR} value {v!r}")
        at = dt.datetime.strptime(m.group(1), "%Y%m%d%H%M%S").replace(microsecond=int(m.group(2)) * 1000, tzinfo=dt.UTC)
        out.append(Write(at, m.group(3), int(m.group(4))))
    return sorted(out)


def writer_switches(writes: Sequence[Write]) -> int:
    """How often the writer changes in time order: 0 one master, 1 a clean change of master,
    2 or more two masters writing at the same time (split brain)."""
    ordered = sorted(writes)
    return sum(1 for a, b in itertools.pairwise(ordered) if a.writer != b.writer)


def wait_for(predicate: Any, timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
