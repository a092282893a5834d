"""Two `ca-watchdog run` daemons (SQLite store) driving the real Dogtag master and clone of the bed,
and an invariant sampler, for the scenarios in test_dogtag_failover.py.

The daemons run on the host and control the CAs through `service_control = "command"`: the bed's
`ca-start` (which runs `ca-watchdog guard` first, as the unit's ExecStartPre= drop-in does) and
`ca-stop`, that is the same systemctl stand-in that pkispawn used in the chroot. Why not systemd
units in an nspawn tree: the bullseye tree is not booted (pkispawn needed only a stand-in), and
booting it would double the bed's build and the CI time; the units themselves are checked under a
real systemd in test_systemd_bed.py.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ldap3
from dogtag_bed import CRL_DN, INFO_PATH, UPDATE_CRL_PATH, CAFacts, DogtagBed, _LoopbackHTTPS, _parse_xml, _text

from ca_watchdog.probes.directory import parse_dogtag_number

REPO = Path(__file__).resolve().parents[2]
# name -> (instance, API port); ports below the ephemeral range, clear of the other labs
MEMBERS = {"ca1": ("pki-tomcat", 28091), "ca2": ("pki-tomcat-clone", 28092)}


def _toml(v: Any) -> str:
    return json.dumps(v)


@dataclass
class Sample:
    """One look at one CA: getInfo, then updateCRL, asked from `at` until `done`."""

    name: str
    at: float
    done: float
    master: bool | None  # serving as master (getInfo without master_host), clone, or None: serves nothing
    crl: str | None  # updateCRL: "time" (generated a CRL), "notInitialized", another answer, or None

    def overlaps(self, other: Sample, slack: float) -> bool:
        return self.at - slack <= other.done and other.at - slack <= self.done


# How long a sampling thread may be held up beyond its period: the scheduler of this 2-core machine, with
# other suites running (load average 5-8), held threads of this process for 0.52-0.71 s now and then
# (three runs on 2026-12-07, each a single gap). A CA that serves as master when it must not does so for
# at least a JVM start (9 s and more on this bed), far longer than one such gap.
STALL = 0.8


@dataclass
class Invariants:
    """Sampled every 200 ms: at most one CA serving as master (getInfo); updateCRL generates on at
    most one CA (notInitialized on the other running one: asserted by the scenarios in a steady
    cluster); the LDAP crlNumber of each DS never goes back.

    Each CA has its own sampling thread (getInfo, then updateCRL with the agent certificate,
    waiting for the update) on one kept-alive TLS connection, started every `period`; LDAP is read
    by a third thread as often. A fresh TLS handshake per request and overlapping samples loaded
    the 2-core machine so much (load 10) that a CA just promoted timed out on getInfo: the sampler
    must not be what fails the failover. Two observations of different CAs count as "at the same
    time" when their request windows are less than one `period` apart.
    """

    bed: DogtagBed
    period: float = 0.2
    samples: list[Sample] = field(default_factory=list)
    numbers: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    started: float = 0.0
    stopped: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _last: dict[str, Sample] = field(default_factory=dict)

    def __enter__(self) -> Invariants:
        self.started = time.monotonic()
        targets: list[tuple[Callable[..., None], tuple[str, ...], str]] = [
            (self._sample_ca, (name,), name) for name in MEMBERS
        ]
        targets.append((self._read_numbers, (), "ldap"))
        for target, args, label in targets:
            t = threading.Thread(target=target, args=args, name=f"dogtag-invariants-{label}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.stopped = time.monotonic()
        for t in self._threads:
            t.join(30)

    def _ask(self, conn: KeptConnection) -> tuple[bool | None, str | None]:
        try:
            code, body = conn.request("GET", INFO_PATH)
        except (OSError, http.client.HTTPException):
            return None, None  # down or starting: serves nothing
        root = _parse_xml(body)
        if code != 200 or root is None or root.find("header") is None:
            return None, None
        master = not _text(root, "master_host")
        form = urllib.parse.urlencode({"crlIssuingPoint": "MasterCRL", "waitForUpdate": "true", "xml": "true"})
        try:
            code, body = conn.request("POST", UPDATE_CRL_PATH, form)
        except (OSError, http.client.HTTPException) as exc:
            return master, f"{type(exc).__name__}"
        root = _parse_xml(body)
        if code != 200 or root is None:
            return master, f"HTTP {code}"
        return master, ("time" if _text(root, "time") else _text(root, "crlUpdate") or "?")

    def _sample_ca(self, name: str) -> None:
        inst = MEMBERS[name][0]
        conn = KeptConnection(self.bed.ca(inst).https_port, self.bed.tls_context(agent=True), timeout=5)
        next_at = time.monotonic()
        try:
            while not self._stop.is_set():
                at = time.monotonic()
                master, crl = self._ask(conn)
                self._judge(Sample(name, at, time.monotonic(), master, crl))
                next_at = max(next_at + self.period, time.monotonic())
                self._stop.wait(max(0.0, next_at - time.monotonic()))
        finally:
            conn.close()

    def _judge(self, s: Sample) -> None:
        with self._lock:
            self.samples.append(s)
            self._last[s.name] = s
            for other in self._last.values():
                if other.name == s.name or not s.overlaps(other, self.period):
                    continue
                when = f"+{s.at - self.started:.1f} s"
                if s.master and other.master:
                    self.violations.append(f"{when}: two CAs serving as master: {s.name}, {other.name}")
                if s.crl == "time" and other.crl == "time":
                    self.violations.append(f"{when}: updateCRL made a CRL on two CAs: {s.name}, {other.name}")

    @staticmethod
    def _crl_number(conn: ldap3.Connection) -> int:
        if not conn.search(CRL_DN, "(objectClass=*)", search_scope=ldap3.BASE, attributes=["crlNumber"]):
            raise LookupError(f"{CRL_DN}: {conn.result}")
        return parse_dogtag_number(str(conn.entries[0].crlNumber.value))

    def _read_numbers(self) -> None:
        """On one kept LDAP connection per DS (reopened after an error)."""
        conns: dict[str, ldap3.Connection] = {}
        last: dict[str, int] = {}
        next_at = time.monotonic()
        while not self._stop.is_set():
            at = time.monotonic()
            numbers: dict[str, int] = {}
            for ds in ("ds-master", "ds-clone"):
                try:
                    if ds not in conns:
                        conns[ds] = self.bed.ldap_connection(ds, timeout=2)
                    numbers[ds] = self._crl_number(conns[ds])
                except Exception:
                    with contextlib.suppress(Exception):
                        conns.pop(ds).unbind()
                    continue
            with self._lock:
                self.numbers.append((at, numbers))
                for ds, n in numbers.items():
                    if n < last.get(ds, n):
                        back = f"{ds}: crlNumber went back from {last[ds]} to {n}"
                        self.violations.append(f"+{at - self.started:.1f} s: {back}")
                    last[ds] = max(n, last.get(ds, n))
            next_at = max(next_at + self.period, time.monotonic())
            self._stop.wait(max(0.0, next_at - time.monotonic()))
        for conn in conns.values():
            with contextlib.suppress(Exception):
                conn.unbind()

    def saw_master(self, name: str) -> bool:
        """`name` was seen serving as master, and the other CA as a clone, at the same time."""
        with self._lock:
            mine = [s for s in self.samples if s.name == name and s.master]
            clones = [s for s in self.samples if s.name != name and s.master is False]
        return any(m.overlaps(c, self.period) for m in mine for c in clones)

    def cadence_problem(self) -> str | None:
        """None when every CA was asked every `period` (unless a request was still waiting for an
        answer: a CA that is starting holds it until the timeout) and LDAP was read as often."""
        span = (self.stopped or time.monotonic()) - self.started
        with self._lock:
            samples = list(self.samples)
            reads = [at for at, _ in self.numbers]
        for name in MEMBERS:
            mine = sorted((s for s in samples if s.name == name), key=lambda s: s.at)
            late = [
                f"{b.at - a.at:.2f} s at +{a.at - self.started:.1f} s"
                for a, b in itertools.pairwise(mine)
                if b.at - a.done > self.period + STALL  # started later than its period after the answer
            ]
            if not mine or late:
                return f"{name}: {len(mine)} samples in {span:.1f} s; late: {', '.join(late[:5])}"
        ldap_late = [b - a for a, b in itertools.pairwise(reads) if b - a > 2 * self.period + STALL]
        if len(reads) < 0.5 * span / self.period or ldap_late:
            return f"{len(reads)} LDAP reads in {span:.1f} s; gaps {', '.join(f'{g:.2f}' for g in ldap_late[:5])}"
        return None

    def summary(self) -> str:
        with self._lock:
            samples, reads = list(self.samples), len(self.numbers)
        span = (self.stopped or time.monotonic()) - self.started
        parts = []
        for name in MEMBERS:
            mine = sorted((s for s in samples if s.name == name), key=lambda s: s.at)
            gaps = sorted(b.at - a.at for a, b in itertools.pairwise(mine))
            median = gaps[len(gaps) // 2] if gaps else 0.0
            parts.append(
                f"{name} {len(mine)} samples (every {median:.2f} s median, widest {max(gaps, default=0):.2f} s)"
            )
        return f"{span:.0f} s: " + "; ".join(parts) + f"; {reads} LDAP reads"


class KeptConnection:
    """One kept-alive https connection to a CA (with the agent certificate); reopened after an error.
    A request that fails on a reused connection (the server closed it) is retried once on a new one."""

    def __init__(self, port: int, context: ssl.SSLContext, timeout: float) -> None:
        self.port, self.context, self.timeout = port, context, timeout
        self.conn: http.client.HTTPSConnection | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def request(self, method: str, path: str, body: str | None = None) -> tuple[int, str]:
        for attempt in (1, 2):
            reused = self.conn is not None
            if self.conn is None:
                self.conn = _LoopbackHTTPS(self.port, self.context, self.timeout)
            try:
                headers = {"Content-Type": "application/x-www-form-urlencoded"} if body is not None else {}
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read().decode("utf-8", "replace")
                if resp.will_close:
                    self.close()
                return resp.status, data
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if not reused or attempt == 2 or isinstance(exc, TimeoutError):
                    raise
        raise AssertionError("unreachable")


class RealCluster:
    """The two daemons, their configs and their store, in `workdir`."""

    def __init__(self, bed: DogtagBed, workdir: Path, restart_before_failover: bool = False) -> None:
        self.bed, self.dir = bed, workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = self.dir / "state.db"
        self.password = self.dir / "ldap-password"
        self.password.write_text("Secret.123\n")
        self.password.chmod(0o600)
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}
        self.configure(restart_before_failover)

    def ca(self, name: str) -> CAFacts:
        return self.bed.ca(MEMBERS[name][0])

    def config(self, name: str) -> Path:
        return self.dir / f"{name}.toml"

    def log(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    def configure(self, restart_before_failover: bool) -> None:
        for name, (inst, api_port) in MEMBERS.items():
            ca = self.bed.ca(inst)
            cfg = self.config(name)
            lines = [
                "[node]",
                f"name = {_toml(name)}",
                f"cs_cfg = {_toml(str(ca.cs_cfg))}",
                f"lease_file = {_toml(str(cfg.parent / ('lease-' + name + '.json')))}",
                f"service = {_toml('pki-tomcatd@' + inst + '.service')}",
                'service_control = "command"',
                f"start_command = {_toml(self.bed.ca_start_command(inst, guard_config=cfg))}",
                f"stop_command = {_toml(self.bed.ca_stop_command(inst))}",
                f"pid_file = {_toml(str(ca.pid_file))}",
                'ldap_bind_dn = "cn=Directory Manager"',
                f"ldap_password_file = {_toml(str(self.password))}",
                "",
                "[store]",
                'backend = "sqlite"',
                f"path = {_toml(str(self.store))}",
                "",
                "[timing]",
                "interval = 2.0",
                "agent_timeout = 3.0",
                "ldap_timeout = 3.0",
                "store_timeout = 2.0",
                "failure_threshold = 3",
                "ttl = 30.0",
                "safety_margin = 5.0",
                "start_timeout = 180.0",
                "stop_timeout = 90.0",
                "",
                "[failover]",
                f"restart_before_failover = {_toml(restart_before_failover)}",
                "failover_cooldown = 0.0",
                "",
                "[tls]",
                f"ca_file = {_toml(str(self.bed.root / 'root' / 'lab' / 'ca.pem'))}",
                "",
                "[api]",
                'listen_host = "127.0.0.1"',
                f"listen_port = {api_port}",
            ]
            for other, (oinst, oport) in MEMBERS.items():
                o = self.bed.ca(oinst)
                lines += [
                    "",
                    "[[cluster.members]]",
                    f"name = {_toml(other)}",
                    # the CAs' server certificates name "localhost" (CN only); /etc/hosts maps it to 127.0.0.1
                    f"agent_url = {_toml(f'https://localhost:{o.https_port}')}",
                    f"ldap_url = {_toml(self.bed.ds_of(oinst).url)}",
                    f"api_url = {_toml(f'http://127.0.0.1:{oport}')}",
                    "priority = 100",
                ]
            cfg.write_text("\n".join(lines) + "\n")

    def cli(self, name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "ca_watchdog.cli", args[0], "--config", str(self.config(name)), *args[1:]]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def start(self) -> None:
        for name in MEMBERS:
            if name in self.daemons and self.daemons[name].poll() is None:
                continue
            out = self.log(name).open("ab")
            self.daemons[name] = subprocess.Popen(
                [sys.executable, "-m", "ca_watchdog.cli", "run", "--config", str(self.config(name))],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
            )

    def stop(self) -> None:
        for p in self.daemons.values():
            if p.poll() is None:
                p.terminate()
        for p in self.daemons.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.daemons.clear()

    def status(self) -> dict[str, Any]:
        r = self.cli("ca1", "status", "--json")
        if r.returncode not in (0, 1):
            raise AssertionError(f"status failed ({r.returncode}): {r.stderr}")
        doc: dict[str, Any] = json.loads(r.stdout)
        return doc

    def leader(self) -> str | None:
        try:
            leader = self.status().get("leader")
        except (AssertionError, ValueError, subprocess.TimeoutExpired):
            return None
        if isinstance(leader, dict):
            name = leader.get("name")
            return name if isinstance(name, str) else None
        return leader if isinstance(leader, str) else None

    def serving_roles(self) -> dict[str, str]:
        """Per member: 'master' / 'clone' as its CA answers getInfo, or 'down'."""
        out: dict[str, str] = {}
        for name, (inst, _) in MEMBERS.items():
            try:
                if not self.bed.get_status(inst, timeout=3).running:
                    out[name] = "down"
                    continue
                out[name] = "clone" if self.bed.get_info(inst, timeout=3).master else "master"
            except Exception:
                out[name] = "down"
        return out

    def steady(self) -> str | None:
        """The master's name when the cluster is steady: the key held, its CA serving as master, the
        other CA serving as a clone; else None."""
        leader = self.leader()
        if leader is None:
            return None
        roles = self.serving_roles()
        others = [n for n in MEMBERS if n != leader]
        if roles.get(leader) == "master" and all(roles.get(o) == "clone" for o in others):
            return leader
        return None

    def port_accepts(self, inst: str) -> bool:
        """The CA's https port accepts TCP (its JVM is up, answering or not)."""
        try:
            with socket.create_connection(("127.0.0.1", self.bed.ca(inst).https_port), timeout=1):
                return True
        except OSError:
            return False

    def master_serving(self, other_than: str) -> str | None:
        """The key holder, when it is not `other_than` and its CA serves as master."""
        leader = self.leader()
        if leader is None or leader == other_than:
            return None
        return leader if self.serving_roles().get(leader) == "master" else None

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n" + self.log(n).read_text(errors="replace")[-6000:] for n in MEMBERS)


def wait_until(what: Callable[[], Any], timeout: float, step: float = 1.0, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {message}")
        time.sleep(step)
