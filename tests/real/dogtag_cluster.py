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

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dogtag_bed import CAFacts, DogtagBed

REPO = Path(__file__).resolve().parents[2]
# name -> (instance, API port); ports below the ephemeral range, clear of the other labs
MEMBERS = {"ca1": ("pki-tomcat", 28091), "ca2": ("pki-tomcat-clone", 28092)}


def _toml(v: Any) -> str:
    return json.dumps(v)


@dataclass
class Sample:
    at: float
    masters: list[str]  # CAs whose getInfo answered without master_host
    crl_times: list[str]  # CAs whose updateCRL generated a CRL (answered a time)
    crl_numbers: dict[str, int]  # LDAP crlNumber per DS


@dataclass
class Invariants:
    """Sampled every 200 ms: at most one CA serving as master (getInfo); updateCRL generates on at
    most one CA and answers notInitialized on the other running one; the LDAP crlNumber of each DS
    never goes back."""

    bed: DogtagBed
    period: float = 0.2
    samples: list[Sample] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Invariants:
        self._thread = threading.Thread(target=self._run, name="dogtag-invariants", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _one(self) -> Sample:
        masters: list[str] = []
        crl_times: list[str] = []
        not_initialized: list[str] = []
        for name, (inst, _) in MEMBERS.items():
            try:
                if not self.bed.get_status(inst, timeout=2).running:
                    continue
                if not self.bed.get_info(inst, timeout=2).master:
                    masters.append(name)
            except Exception:
                continue  # down or starting: serves nothing
            upd = self.bed.update_crl(inst, timeout=5)
            if upd.time:
                crl_times.append(name)
            elif upd.crl_update == "notInitialized":
                not_initialized.append(name)
        numbers: dict[str, int] = {}
        for ds in ("ds-master", "ds-clone"):
            try:
                numbers[ds] = self.bed.ldap_crl_number(ds)
            except Exception:
                continue
        return Sample(time.monotonic(), masters, crl_times, numbers)

    def _run(self) -> None:
        last: dict[str, int] = {}
        while not self._stop.is_set():
            s = self._one()
            self.samples.append(s)
            if len(s.masters) > 1:
                self.violations.append(f"two CAs serving as master: {s.masters}")
            if len(s.crl_times) > 1:
                self.violations.append(f"updateCRL generated a CRL on two CAs: {s.crl_times}")
            for ds, n in s.crl_numbers.items():
                if n < last.get(ds, n):
                    self.violations.append(f"{ds}: crlNumber went back from {last[ds]} to {n}")
                last[ds] = max(n, last.get(ds, n))
            self._stop.wait(self.period)

    def saw(self, predicate: Callable[[Sample], bool]) -> bool:
        return any(predicate(s) for s in list(self.samples))


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
                f"service = {_toml('pki-tomcatd@' + inst + '.service')}",
                'service_control = "command"',
                f"start_command = {_toml(self.bed.ca_start_command(inst, guard_config=cfg))}",
                f"stop_command = {_toml(self.bed.ca_stop_command(inst))}",
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
