"""A local N-node cluster on loopback: simulated CAs over TLS, one `ca-watchdog run` per node,
the SQLite (or etcd) store, and optionally a real replicated 389-DS per node. (A node may instead
listen on another address and run inside a network namespace: `hosts`, `exec_prefix`.)

Used by `ca-watchdog demo` and the end-to-end tests. Everything lives under one directory and
every process it starts is tracked by pid, so `stop()` removes exactly what it made.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .. import cscfg
from ..config import Settings, is_loopback, load_settings
from ..probes.agent import AgentProbe
from .dslab import DSLab
from .pki import LabPKIFiles, write_lab_pki
from .service import alive, read_pid

LAB_TIMING = {
    "interval": 1.0,
    "agent_timeout": 1.0,
    "ldap_timeout": 1.5,
    "store_timeout": 1.0,
    "failure_threshold": 3,
    "ttl": 10.0,
    "safety_margin": 3.0,
    "start_timeout": 30.0,
    "stop_timeout": 10.0,
}


def wait_until(what: Callable[[], bool], timeout: float, step: float = 0.2) -> bool:
    """Poll `what` every `step` s until it holds or `timeout` s have passed; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return True
        time.sleep(step)
    return what()


def _ancestry() -> set[int]:
    """This process and its ancestors (a `sudo ca-watchdog lab down --dir D/` names D/ too)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def pids_naming(directory: Path) -> list[int]:
    """Live processes (but not this one or its ancestors) with a path under `directory` on their
    command line: every process a lab starts names its directory so."""
    marker = str(directory).encode() + b"/"
    mine = _ancestry()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in mine:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline and alive(int(proc.name)):
            found.append(int(proc.name))
    return found


@dataclass
class LabNode:
    name: str
    agent_port: int
    api_port: int
    dir: Path
    host: str = "127.0.0.1"  # where its CA and API listen and are reached

    @property
    def cs_cfg(self) -> Path:
        return self.dir / "CS.cfg"

    @property
    def config(self) -> Path:
        return self.dir / "ca-watchdog.toml"

    @property
    def ca_pidfile(self) -> Path:
        return self.dir / "ca.pid"

    @property
    def ca_log(self) -> Path:
        return self.dir / "ca.log"

    @property
    def daemon_log(self) -> Path:
        return self.dir / "daemon.log"

    @property
    def agent_url(self) -> str:
        return f"https://{self.host}:{self.agent_port}"

    @property
    def api_url(self) -> str:
        return f"https://{self.host}:{self.api_port}"


def _set_keys(cfg: cscfg.CSCfg, values: dict[str, str]) -> cscfg.CSCfg:
    """Set existing keys in a template (lab only: every key must already be present)."""
    text = cfg.render().decode()
    out = []
    for line in text.splitlines(keepends=True):
        key = line.split("=", 1)[0]
        if key in values:
            line = f"{key}={values[key]}\n"
        out.append(line)
    return cscfg.parse("".join(out), cfg.path)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(type(value))


@dataclass
class LabCluster:
    root: Path
    names: Sequence[str] = ("ca1", "ca2", "ca3")
    base_port: int = 18440
    ds: DSLab | None = None
    store_backend: str = "sqlite"
    etcd_endpoint: str | None = None
    start_delay: float = 2.0
    timing: dict[str, float | int] = field(default_factory=lambda: dict(LAB_TIMING))
    failover: dict[str, Any] = field(default_factory=lambda: {"restart_before_failover": False})
    priorities: dict[str, int] = field(default_factory=dict)
    status_format: str = "json"
    ca_args: dict[str, list[str]] = field(default_factory=dict)  # extra simca options per node (faults)
    nodes: dict[str, LabNode] = field(default_factory=dict)
    daemons: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    pki: LabPKIFiles | None = None
    # per node: the address its CA and API listen on (default 127.0.0.1; the server certificate gets
    # every one as an IP SAN), and an argv prefix for the processes the lab starts for it (its daemon,
    # its CA's start/stop commands), e.g. ["ip", "netns", "exec", "ns1"] to run a node in a namespace
    hosts: dict[str, str] = field(default_factory=dict)
    exec_prefix: dict[str, list[str]] = field(default_factory=dict)
    # extra [api] keys (operators, peers, crl_file, max_connections, ...)
    api_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.cluster_id = uuid.uuid4().hex[:12]  # its own etcd prefix: clusters may share one etcd
        for i, n in enumerate(self.names):
            host = self.hosts.get(n, "127.0.0.1")
            api_base = self.base_port + max(20, len(self.names))  # agent ports first, then the API ports
            self.nodes[n] = LabNode(n, self.base_port + i, api_base + i, self.root / n, host)

    # ---- build -------------------------------------------------------------------------------------

    def build(self, master: str | None = None) -> None:
        """Write the PKI, every node's CS.cfg (one master, the others its clones) and config."""
        master = master or self.names[0]
        self.root.mkdir(parents=True, exist_ok=True)
        ips = list(dict.fromkeys(["127.0.0.1", *(node.host for node in self.nodes.values())]))
        self.pki = write_lab_pki(self.root / "pki", server_ips=ips)
        template = cscfg.parse(resources.files("ca_watchdog.lab").joinpath("CS.cfg.template").read_bytes(), "template")
        (self.root / "store").mkdir(exist_ok=True)
        for n, node in self.nodes.items():
            node.dir.mkdir(parents=True, exist_ok=True)
            values = {"machineName": n, "securitydomain.host": n, "internaldb.ldapconn.host": "127.0.0.1"}
            if self.ds is not None:
                values["internaldb.ldapconn.port"] = str(self.ds.port(n))
            cfg = _set_keys(template, values)
            if n != master:
                m = self.nodes[master]
                cfg = cscfg.demote(cfg, m.host, m.agent_port)
            node.cs_cfg.write_bytes(cfg.render())
            node.cs_cfg.chmod(0o660)
            node.config.write_text(self._config_text(node))

    def _ca_argv(self, node: LabNode) -> list[str]:
        assert self.pki is not None
        argv = [
            sys.executable, "-m", "ca_watchdog.cli", "lab", "ca",
            "--cs-cfg", str(node.cs_cfg), "--port", str(node.agent_port), "--host", node.host,
            "--name", node.name,
            "--cert", str(self.pki.server_cert), "--key", str(self.pki.server_key), "--cafile", str(self.pki.ca_cert),
            "--status-format", self.status_format, "--start-delay", str(self.start_delay),
        ]  # fmt: skip
        if self.ds is not None:
            argv += [
                "--ldap-url", self.ds.ldap_url(node.name), "--ldap-bind-dn", self.ds.bind_dn,
                "--ldap-password-file", str(self.ds.password_file), "--crl-interval", "1",
            ]  # fmt: skip
        return argv + list(self.ca_args.get(node.name, ()))

    def _config_text(self, node: LabNode) -> str:
        assert self.pki is not None
        svc = [sys.executable, "-m", "ca_watchdog.lab.service"]
        start = [
            *svc, "start", "--pidfile", str(node.ca_pidfile), "--log", str(node.ca_log),
            "--guard-config", str(node.config), "--", *self._ca_argv(node),
        ]  # fmt: skip
        stop = [*svc, "stop", "--pidfile", str(node.ca_pidfile), "--timeout", "5"]
        lines = [
            "# written by ca_watchdog.lab.cluster",
            "[node]",
            f"name = {_toml(node.name)}",
            f"cs_cfg = {_toml(str(node.cs_cfg))}",
            f"lease_file = {_toml(str(node.dir / 'lease.json'))}",
            f"service = {_toml('lab CA ' + node.name)}",
            'service_control = "command"',
            f"start_command = {_toml(start)}",
            f"stop_command = {_toml(stop)}",
        ]
        if self.ds is not None:
            lines += [
                f"ldap_bind_dn = {_toml(self.ds.bind_dn)}",
                f"ldap_password_file = {_toml(str(self.ds.password_file))}",
            ]
        lines += [
            "",
            "[store]",
            f"backend = {_toml(self.store_backend)}",
            f"path = {_toml(str(self.root / 'store' / 'state.db'))}",
        ]
        if self.store_backend == "etcd":
            assert self.etcd_endpoint is not None
            lines += [
                "",
                "[store.etcd]",
                f"endpoints = {_toml([self.etcd_endpoint])}",
                f"prefix = {_toml('/ca-watchdog-lab-' + self.cluster_id + '/')}",
            ]
        lines += ["", "[timing]", *(f"{k} = {_toml(v)}" for k, v in self.timing.items())]
        lines += ["", "[failover]", *(f"{k} = {_toml(v)}" for k, v in self.failover.items())]
        lines += [
            "",
            "[tls]",
            f"ca_file = {_toml(str(self.pki.ca_cert))}",
            f"cert_file = {_toml(str(self.pki.client_cert))}",
            f"key_file = {_toml(str(self.pki.client_key))}",
            "",
            "[api]",
            f"listen_host = {_toml(node.host)}",
            f"listen_port = {node.api_port}",
            f"cert_file = {_toml(str(self.pki.server_cert))}",
            f"key_file = {_toml(str(self.pki.server_key))}",
            f"client_ca_file = {_toml(str(self.pki.ca_cert))}",
            *(f"{k} = {_toml(v)}" for k, v in self._api_options().items()),
        ]
        if self.etcd_endpoint and self.etcd_endpoint.startswith("http://"):
            host = urlsplit(self.etcd_endpoint).hostname or ""
            if not is_loopback(host):  # the lab's etcd speaks plain HTTP (a netns address in the partition tests)
                lines += ["", "[cluster]", "insecure = true"]
        for n, other in self.nodes.items():
            lines += [
                "",
                "[[cluster.members]]",
                f"name = {_toml(n)}",
                f"agent_url = {_toml(other.agent_url)}",
                f"api_url = {_toml(other.api_url)}",
                f"priority = {self.priorities.get(n, 100)}",
            ]
            if self.ds is not None:
                lines.append(f"ldap_url = {_toml(self.ds.ldap_url(n))}")
        return "\n".join(lines) + "\n"

    def _api_options(self) -> dict[str, Any]:
        """The lab agent certificate is every node's peer identity and the operators' (issue 10:
        state-changing calls need an allow-listed certificate); `api_options` adds or overrides keys."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        assert self.pki is not None
        cert = x509.load_pem_x509_certificate(self.pki.client_cert.read_bytes())
        options: dict[str, Any] = {
            "operators": [cert.subject.rfc4514_string()],
            "peers": ["sha256:" + cert.fingerprint(hashes.SHA256()).hex()],
        }
        return {**options, **self.api_options}

    def settings(self, name: str) -> Settings:
        return load_settings(self.nodes[name].config)

    # ---- processes ---------------------------------------------------------------------------------------

    def _service(self, name: str, verb: str) -> None:
        s = self.settings(name)
        argv = s.node.start_command if verb == "start" else s.node.stop_command
        subprocess.run([*self.exec_prefix.get(name, ()), *argv], check=True, capture_output=True, timeout=60)

    def start_ca(self, name: str) -> None:
        self._service(name, "start")

    def stop_ca(self, name: str) -> None:
        self._service(name, "stop")

    def ca_pid(self, name: str) -> int | None:
        return read_pid(self.nodes[name].ca_pidfile)

    def kill_ca(self, name: str, sig: int = signal.SIGKILL) -> int:
        pid = self.ca_pid(name)
        if pid is None:
            raise RuntimeError(f"CA of {name} is not running")
        os.kill(pid, sig)
        return pid

    def freeze_ca(self, name: str) -> int:
        """SIGSTOP the CA: the port still accepts connections, nothing answers (a hung Tomcat)."""
        return self.kill_ca(name, signal.SIGSTOP)

    def thaw_ca(self, name: str) -> int | None:
        """SIGCONT the CA if it still runs (its daemon may have stopped it meanwhile)."""
        pid = self.ca_pid(name)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        return pid

    def daemon_pid(self, name: str) -> int | None:
        proc = self.daemons.get(name)
        return proc.pid if proc is not None and proc.poll() is None else None

    def set_ca_args(self, name: str, args: Sequence[str]) -> None:
        """Extra simca options for the next start of `name`'s CA (rewrites its daemon config)."""
        self.ca_args[name] = list(args)
        node = self.nodes[name]
        node.config.write_text(self._config_text(node))

    def start_daemon(self, name: str) -> None:
        node = self.nodes[name]
        if name in self.daemons and self.daemons[name].poll() is None:
            return
        with open(node.daemon_log, "ab") as log:
            self.daemons[name] = subprocess.Popen(
                [
                    *self.exec_prefix.get(name, ()),
                    *(sys.executable, "-m", "ca_watchdog.cli", "run", "--config", str(node.config)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill_daemon(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.daemons.get(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                proc.wait(timeout=30)

    def start(self, daemons: bool = True) -> None:
        for n in self.names:
            self.start_ca(n)
        if daemons:
            for n in self.names:
                self.start_daemon(n)

    def stop(self) -> None:
        for n in list(self.daemons):
            proc = self.daemons[n]
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
                    proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        for n in self.names:
            pid = self.ca_pid(n)
            if pid is not None and alive(pid):
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    self.stop_ca(n)
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        """A daemon stopped mid-action can leave its start command running, which then starts a CA
        after the stop above. Every process of this cluster names its directory on its command line."""
        for _ in range(3):
            time.sleep(0.3)
            found = pids_naming(self.root)
            for pid in found:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not found:
                return

    @contextlib.contextmanager
    def running(self) -> Iterator[LabCluster]:
        try:
            self.start()
            yield self
        finally:
            self.stop()

    # ---- looking at it -------------------------------------------------------------------------------------

    def roles(self) -> dict[str, str]:
        out = {}
        for n, node in self.nodes.items():
            try:
                out[n] = cscfg.classify(cscfg.read_cscfg(node.cs_cfg)).role.value
            except cscfg.CSCfgError:
                out[n] = "unreadable"
        return out

    async def serving(self, timeout: float = 1.0) -> dict[str, str]:
        """Each CA as a client sees it: 'master' (running, getInfo without master_host), 'clone', or down."""
        assert self.pki is not None
        out: dict[str, str] = {}
        async with AgentProbe(str(self.pki.ca_cert), timeout=timeout) as probe:

            async def one(n: str) -> tuple[str, str]:
                st = await probe.status(self.nodes[n].agent_url)
                if st.status != "running":
                    return n, st.status
                info = await probe.info(self.nodes[n].agent_url)
                if not info.ok:
                    return n, "down"
                return n, "clone" if info.master_host else "master"

            for n, s in await asyncio.gather(*(one(n) for n in self.names)):
                out[n] = s
        return out

    def wait_for(self, what: Callable[[], bool], timeout: float, step: float = 0.2) -> bool:
        return wait_until(what, timeout, step)
