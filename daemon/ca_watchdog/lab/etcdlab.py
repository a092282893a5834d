"""A throw-away single-member etcd on 127.0.0.1, without systemd (tests, scripts, the demo).

(Or on another address, started through an argv prefix such as `ip netns exec NS`: `host`,
`exec_prefix`; the health check then runs through the same prefix.)

Everything lives in one directory: `etcd-data/`, `etcd.log`, `etcd.pid`, `etcd.endpoint`. Only the
process this module started (recorded in `etcd.pid`, and still named `etcd` in /proc) is ever
signalled. Command line, for scripts:

    python -m ca_watchdog.lab.etcdlab start DIR [--port N]   # prints the client URL
    python -m ca_watchdog.lab.etcdlab stop DIR
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from .service import alive

ETCD_BINARY = "/usr/bin/etcd"
HOST = "127.0.0.1"
DEFAULT_PORT = 24790


class EtcdLabError(RuntimeError):
    pass


@dataclass(frozen=True)
class EtcdTLS:
    """Server TLS; with `client_cert_auth` every client must present a certificate from `ca_file`."""

    cert_file: str
    key_file: str
    ca_file: str
    client_cert_auth: bool = False
    client_cert_file: str | None = None  # used by the health check when client_cert_auth is on
    client_key_file: str | None = None


def port_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, start: int = DEFAULT_PORT, host: str = HOST) -> list[int]:
    """`count` free TCP ports at or above `start` (a range keeps parallel labs out of each other's way)."""
    out: list[int] = []
    port = start
    while len(out) < count:
        if port > 65535:
            raise EtcdLabError(f"no {count} free ports from {start}")
        if port_free(port, host):
            out.append(port)
        port += 1
    return out


def _probe_health(url: str, timeout: float, ctx: ssl.SSLContext | None) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout, context=ctx) as r:
            return r.status == 200 and b'"true"' in r.read()
    except (OSError, ValueError):
        return False


def _ssl_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext | None:
    if not ca_file:
        return None
    ctx = ssl.create_default_context(cafile=ca_file)
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file or None)
    return ctx


# run through `exec_prefix` (e.g. inside a network namespace): argv URL TIMEOUT CA CERT KEY ('' = none)
_HEALTH_SNIPPET = (
    "import sys; from ca_watchdog.lab.etcdlab import _probe_health, _ssl_context; a = sys.argv[1:]; "
    "sys.exit(0 if _probe_health(a[0], float(a[1]), _ssl_context(a[2], a[3], a[4])) else 1)"
)


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _running_etcd(pid: int) -> bool:
    """Not a zombie either: an etcd started by another process (`lab up`) is not our child, and a
    PID 1 that does not reap (a container's) keeps it, dead, as a zombie still named etcd."""
    return _comm(pid) == "etcd" and alive(pid)


class EtcdLab:
    def __init__(
        self,
        directory: str | os.PathLike[str],
        client_port: int | None = None,
        peer_port: int | None = None,
        name: str = "lab",
        tls: EtcdTLS | None = None,
        binary: str = ETCD_BINARY,
        host: str = HOST,
        exec_prefix: Sequence[str] = (),
    ) -> None:
        """`host`: the address to listen on; `exec_prefix`: argv before etcd's (and before the health
        check's, which then runs as a separate process), e.g. ["ip", "netns", "exec", NS]. With a
        prefix, give both ports: free ones cannot be looked up from here."""
        self.dir = Path(directory)
        self.host, self.exec_prefix = host, list(exec_prefix)
        if client_port is None or peer_port is None:
            ports = free_ports(2, client_port or DEFAULT_PORT, host)
            client_port, peer_port = client_port or ports[0], peer_port or ports[1]
        self.client_port, self.peer_port = client_port, peer_port
        self.name, self.tls, self.binary = name, tls, binary
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.client_port}"

    @property
    def pid_file(self) -> Path:
        return self.dir / "etcd.pid"

    @property
    def pid(self) -> int | None:
        """The pid we started, if that process is still an etcd."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _running_etcd(pid) else None

    def _tls_files(self) -> tuple[str, str, str]:
        if self.tls is None:
            return "", "", ""
        return self.tls.ca_file, self.tls.client_cert_file or "", self.tls.client_key_file or ""

    def _ssl(self) -> ssl.SSLContext | None:
        return _ssl_context(*self._tls_files())

    def healthy(self, timeout: float = 1.0) -> bool:
        if not self.exec_prefix:
            return _probe_health(self.endpoint, timeout, self._ssl())
        argv = [*self.exec_prefix, sys.executable, "-c", _HEALTH_SNIPPET, self.endpoint, str(timeout)]
        try:
            done = subprocess.run([*argv, *self._tls_files()], capture_output=True, timeout=timeout + 10)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0

    def start(self, timeout: float = 20.0, fresh: bool = True) -> None:
        """Start etcd and wait until /health says true. `fresh` wipes the data directory first."""
        if not os.access(self.binary, os.X_OK):
            raise EtcdLabError(f"{self.binary} not found (Debian: apt-get install etcd-server)")
        if self.pid is not None:
            raise EtcdLabError(f"an etcd started from {self.dir} still runs (pid {self.pid})")
        self.dir.mkdir(parents=True, exist_ok=True)
        data = self.dir / "etcd-data"
        if fresh and data.exists():
            shutil.rmtree(data)
        data.mkdir(mode=0o700, exist_ok=True)  # etcd warns about anything looser
        peer = f"http://{self.host}:{self.peer_port}"
        args = [
            *self.exec_prefix,
            self.binary,
            "--name", self.name,
            "--data-dir", str(data),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--log-level", "warn",
        ]  # fmt: skip
        if self.tls is not None:
            args += ["--cert-file", self.tls.cert_file, "--key-file", self.tls.key_file]
            args += ["--trusted-ca-file", self.tls.ca_file]
            if self.tls.client_cert_auth:
                args.append("--client-cert-auth")
        with open(self.dir / "etcd.log", "ab") as logf:
            # own session: a Ctrl-C in the test runner's terminal is not delivered to etcd
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.pid_file.write_text(f"{self._proc.pid}\n")
        (self.dir / "etcd.endpoint").write_text(self.endpoint + "\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EtcdLabError(f"etcd exited with {self._proc.returncode}: {self.log_tail()}")
            if self.healthy(timeout=0.5):
                return
            time.sleep(0.1)
        self.stop()
        raise EtcdLabError(f"etcd not healthy on {self.endpoint} within {timeout:g} s: {self.log_tail()}")

    def log_tail(self, lines: int = 10) -> str:
        try:
            return " | ".join((self.dir / "etcd.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _signal(self, sig: signal.Signals) -> int | None:
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pid

    def _reap(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.pid == pid:
                if self._proc.poll() is not None:
                    return True
            elif not _running_etcd(pid):
                return True
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (after SIGCONT, in case it was frozen), then SIGKILL if it lingers."""
        pid = self._signal(signal.SIGCONT)
        if pid is None:
            self._reap_child()
            return
        self._signal(signal.SIGTERM)
        if not self._reap(pid, timeout):
            self._signal(signal.SIGKILL)
            self._reap(pid, 5.0)
        self._reap_child()
        with contextlib.suppress(OSError):
            self.pid_file.unlink()

    def kill(self) -> None:
        """SIGKILL: a crashed store."""
        pid = self._signal(signal.SIGKILL)
        if pid is not None:
            self._reap(pid, 5.0)
        self._reap_child()

    def freeze(self) -> None:
        """SIGSTOP: a hung store (connections are accepted by the kernel, nothing answers)."""
        if self._signal(signal.SIGSTOP) is None:
            raise EtcdLabError("etcd is not running")

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def _reap_child(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=1)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ca_watchdog.lab.etcdlab", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("start", "stop", "status"))
    p.add_argument("directory")
    p.add_argument("--port", type=int, default=None, help=f"client port (default: first free from {DEFAULT_PORT})")
    a = p.parse_args(argv)
    if a.action == "start":
        lab = EtcdLab(a.directory, a.port, None)
        try:
            lab.start()
        except EtcdLabError as exc:
            print(f"etcdlab: {exc}", file=sys.stderr)
            return 1
        print(lab.endpoint)
        return 0
    ep_file = Path(a.directory) / "etcd.endpoint"
    port = int(ep_file.read_text().strip().rsplit(":", 1)[1]) if ep_file.exists() else 0
    lab = EtcdLab(a.directory, port or 1, 1)
    if a.action == "stop":
        lab.stop()
        return 0
    up = lab.pid is not None and lab.healthy()
    print(f"{lab.endpoint} pid {lab.pid}: {'healthy' if up else 'down'}")
    return 0 if up else 1


if __name__ == "__main__":
    sys.exit(main())
