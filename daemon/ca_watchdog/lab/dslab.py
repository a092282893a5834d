"""A throw-away 389-DS lab: N suppliers in full-mesh multi-supplier replication on 127.0.0.1.

Used by the integration tests and by ``ca-watchdog demo``. Runs as root on a machine without
systemd as PID 1 (reference/lab.md): lib389 is told not to call systemctl (defaults.inf
``with_systemd = 0``), instances are created with ``dscreate`` and then run by this module as
foreground ``ns-slapd -d 0`` children, so their pid is known without racing a pid file. Replication
is configured over LDAP (ldap3) the way Dogtag's LDAPConfigurator does it: a replication manager,
the ``cn=replica`` entry, agreements, and a total init from the first supplier.

Only instances named ``<prefix>-<name>`` are touched, and only processes whose
``/proc/<pid>/comm`` is ``ns-slapd`` and whose command line names that instance are signalled.
Manual use: ``python -m ca_watchdog.lab.dslab up|down|status|kill|stop|start|freeze|thaw``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..probes.directory import CSN, RUV_FILTER, Seconds, parse_ruv

DEFAULT_SUFFIX = "o=pki-tomcat-CA"
DEFAULT_DM_PASSWORD = "Secret.123"
DEFAULT_REPL_PASSWORD = "Repl.Secret.123"
DM_DN = "cn=Directory Manager"
REPL_DN = "cn=replication manager,cn=config"

NS_SLAPD = "/usr/sbin/ns-slapd"
DSCREATE = "/usr/sbin/dscreate"
DSCTL = "/usr/sbin/dsctl"
DEFAULTS_INF = Path("/usr/share/dirsrv/inf/defaults.inf")
HOST = "127.0.0.1"

# LDAP calls made by the lab itself (never a test subject): short, always bounded
_CONNECT_TIMEOUT = 2.0
_RECEIVE_TIMEOUT = 5.0


class DSLabError(RuntimeError):
    """The lab could not be brought to the requested state; the message says why."""


@dataclass(frozen=True)
class DSMember:
    name: str
    instance: str
    port: int
    secure_port: int
    replica_id: int

    @property
    def ldap_url(self) -> str:
        return f"ldap://{HOST}:{self.port}"

    @property
    def config_dir(self) -> Path:
        return Path(f"/etc/dirsrv/slapd-{self.instance}")

    @property
    def pid_file(self) -> Path:
        return Path(f"/run/dirsrv/slapd-{self.instance}.pid")


def fix_lib389_systemd() -> None:
    """lib389 runs ``systemctl`` when defaults.inf says ``with_systemd = 1`` (lab.md pitfall 1).

    The file belongs to the package and an upgrade resets it, so this runs before every use.
    """
    try:
        text = DEFAULTS_INF.read_text()
    except FileNotFoundError:
        raise DSLabError(f"{DEFAULTS_INF} missing: is 389-ds-base installed?") from None
    fixed = "\n".join("with_systemd = 0" if line.strip() == "with_systemd = 1" else line for line in text.split("\n"))
    if fixed != text:
        tmp = DEFAULTS_INF.with_name(DEFAULTS_INF.name + ".ca-watchdog.tmp")
        tmp.write_text(fixed)
        os.replace(tmp, DEFAULTS_INF)


def _proc_comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _proc_state(pid: int) -> str | None:
    """One-letter state from /proc/<pid>/stat (R, S, T stopped, Z zombie...), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def _proc_cmdline(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


def _clean_env() -> dict[str, str]:
    # dscreate/dsctl are /usr/bin/python3 scripts; our venv's variables must not leak into them
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    return env


class DSLab:
    """N 389-DS suppliers replicating in a full mesh, suffix ``o=pki-tomcat-CA`` by default.

    Member ``names[i]`` is instance ``<prefix>-<name>``, LDAP port ``base_port + i``, replica id
    ``i + 1``. ``state_dir`` holds the .inf files, the password file, logs of the started
    servers and ``dslab.json`` (config fingerprint and pids), so another process (the CLI, a
    later test session) can find and reuse a running lab.
    """

    def __init__(
        self,
        names: Sequence[str],
        base_port: int,
        prefix: str,
        state_dir: Path | str,
        dm_password: str = DEFAULT_DM_PASSWORD,
        suffix: str = DEFAULT_SUFFIX,
        repl_password: str = DEFAULT_REPL_PASSWORD,
    ) -> None:
        if not names:
            raise ValueError("a lab needs at least one member")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate member names in {list(names)}")
        for n in (prefix, *names):
            if not n or not all(c.isalnum() or c in "_" for c in n):
                raise ValueError(f"prefix and names must be letters, digits or _: {n!r}")
        if not (base_port >= 1024 and base_port + 50 + len(names) < 65536):
            raise ValueError(f"base_port {base_port} out of range")
        self.prefix = prefix
        self.state_dir = Path(state_dir)
        self.suffix = suffix
        self.bind_dn = DM_DN
        self.dm_password = dm_password
        self.repl_password = repl_password
        self.members: dict[str, DSMember] = {
            n: DSMember(n, f"{prefix}-{n}", base_port + i, base_port + 50 + i, i + 1) for i, n in enumerate(names)
        }
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock_fd: int | None = None
        self._lock_depth = 0
        self._lock_path = Path(tempfile.gettempdir()) / f"ca-watchdog-dslab-{prefix}.lock"
        self.timings: dict[str, float] = {}

    # ---- small accessors -----------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.members)

    @property
    def password_file(self) -> Path:
        """A file holding the Directory Manager password (no trailing newline), mode 0600."""
        return self.state_dir / "dm-password"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "dslab.json"

    def member(self, name: str) -> DSMember:
        try:
            return self.members[name]
        except KeyError:
            raise KeyError(f"no lab member {name!r} (members: {', '.join(self.members)})") from None

    def ldap_url(self, name: str) -> str:
        return self.member(name).ldap_url

    def replica_id(self, name: str) -> int:
        return self.member(name).replica_id

    def port(self, name: str) -> int:
        return self.member(name).port

    def _config(self) -> dict[str, Any]:
        secret = hashlib.sha256(f"{self.dm_password}\0{self.repl_password}".encode()).hexdigest()
        return {
            "prefix": self.prefix,
            "suffix": self.suffix,
            "members": [[m.name, m.instance, m.port, m.secure_port, m.replica_id] for m in self.members.values()],
            "secret": secret,
            "version": 1,
        }

    def _read_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save_state(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        pids = {n: self.pid(n) for n in self.members}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": self._config(), "pids": pids}, indent=2))
        os.replace(tmp, self.state_file)

    # ---- exclusive use ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def exclusive(self, timeout: float = 600.0) -> Iterator[None]:
        """Hold the lab's lock (per prefix, across processes); reentrant within this object.

        Test sessions kill and freeze servers: two sessions sharing one lab would break each
        other, so a session holds this for its whole life and a second one waits.
        """
        if self._lock_depth == 0:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        os.close(fd)
                        raise
                    if time.monotonic() > deadline:
                        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                        os.close(fd)
                        raise DSLabError(
                            f"lab {self.prefix!r} is in use by pid {holder} ({self._lock_path}); waited {timeout:g} s"
                        ) from None
                    time.sleep(0.1)  # short: the gap between two queued sessions is brief
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._lock_fd = fd
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None

    # ---- processes -------------------------------------------------------------------------------

    def _is_ours(self, pid: int, m: DSMember) -> bool:
        """A live (not zombie) ns-slapd serving exactly this instance's config dir."""
        if pid <= 0 or _proc_comm(pid) != "ns-slapd":
            return False
        if _proc_state(pid) in (None, "Z", "X"):
            return False
        args = _proc_cmdline(pid)
        return str(m.config_dir) in args

    def pid(self, name: str) -> int | None:
        """The pid of the member's running ns-slapd, or None when it is not running."""
        m = self.member(name)
        p = self._procs.get(name)
        if p is not None and p.poll() is None and self._is_ours(p.pid, m):
            return p.pid
        candidates: list[int] = []
        with contextlib.suppress(OSError, ValueError):
            candidates.append(int(m.pid_file.read_text().strip()))
        saved = self._read_state().get("pids", {}).get(name)
        if isinstance(saved, int):
            candidates.append(saved)
        for pid in candidates:
            if self._is_ours(pid, m):
                return pid
        return None

    def is_running(self, name: str) -> bool:
        return self.pid(name) is not None

    def is_frozen(self, name: str) -> bool:
        pid = self.pid(name)
        return pid is not None and _proc_state(pid) in ("T", "t")

    def _signal(self, name: str, sig: signal.Signals) -> int:
        pid = self.pid(name)
        if pid is None:
            raise DSLabError(f"{name} is not running")
        os.kill(pid, sig)
        return pid

    def _wait_gone(self, name: str, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        p = self._procs.get(name)
        while time.monotonic() < deadline:
            if p is not None and p.pid == pid:
                if p.poll() is not None:  # reaps our child, so no zombie is left behind
                    return True
            elif _proc_state(pid) in (None, "Z", "X"):
                return True
            time.sleep(0.05)
        return False

    def kill(self, name: str) -> int:
        """SIGKILL the member's ns-slapd (a crash); returns the pid that was killed."""
        pid = self._signal(name, signal.SIGKILL)
        if not self._wait_gone(name, pid, 10):
            raise DSLabError(f"{name} (pid {pid}) still alive 10 s after SIGKILL")
        return pid

    def freeze(self, name: str) -> int:
        """SIGSTOP: the server keeps its sockets open but answers nothing (a hung host).

        Returns once the kernel shows the process stopped: the signal is delivered asynchronously."""
        pid = self._signal(name, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while _proc_state(pid) not in ("T", "t") and time.monotonic() < deadline:
            time.sleep(0.01)
        return pid

    def thaw(self, name: str) -> int:
        return self._signal(name, signal.SIGCONT)

    def stop(self, name: str, timeout: float = 60.0) -> None:
        """Clean shutdown (SIGTERM, about 5 s); SIGKILL after ``timeout``. No-op if not running."""
        pid = self.pid(name)
        if pid is None:
            return
        os.kill(pid, signal.SIGCONT)  # a frozen server cannot act on SIGTERM
        os.kill(pid, signal.SIGTERM)
        if not self._wait_gone(name, pid, timeout):
            os.kill(pid, signal.SIGKILL)
            self._wait_gone(name, pid, 10)

    def start(self, name: str, timeout: float = 60.0) -> int:
        """Start the member's ns-slapd (no-op if running) and wait until LDAP answers a bind."""
        m = self.member(name)
        pid = self.pid(name)
        if pid is None:
            self._spawn(m)
            pid = self._wait_ready(m, timeout)
            self._save_state()
        return pid

    def _spawn(self, m: DSMember) -> subprocess.Popen[bytes]:
        if not m.config_dir.is_dir():
            raise DSLabError(f"instance {m.instance} does not exist ({m.config_dir})")
        self._clear_stale_locks(m)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / f"{m.name}.ns-slapd.out", "ab") as out:
            # -d 0: stay in the foreground, so Popen.pid is the server's pid (no fork, no pid-file race)
            p = subprocess.Popen(
                [NS_SLAPD, "-D", str(m.config_dir), "-i", str(m.pid_file), "-d", "0"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C meant for pytest must not reach the servers
                env=_clean_env(),
            )
        self._procs[m.name] = p
        return p

    def _clear_stale_locks(self, m: DSMember) -> None:
        """Remove server lock files naming a pid that is gone or a zombie.

        ns-slapd refuses to start ("exited with 1", nothing in the errors log) while
        /run/lock/dirsrv/slapd-<inst>/server/<pid> names a pid that kill(pid, 0) finds. A
        SIGKILLed server that is not our child is reparented to PID 1, and PID 1 here (not an
        init) never reaps it: the zombie keeps its pid, and the lock, forever.
        """
        lock_dir = Path(f"/run/lock/dirsrv/slapd-{m.instance}/server")
        with contextlib.suppress(FileNotFoundError):
            for f in lock_dir.iterdir():
                if f.name.isdigit():
                    pid = int(f.name)
                    alive = _proc_state(pid) not in (None, "Z", "X") and _proc_comm(pid) == "ns-slapd"
                    if not alive:
                        f.unlink(missing_ok=True)

    def _wait_ready(self, m: DSMember, timeout: float) -> int:
        from ldap3.core.exceptions import (
            LDAPSessionTerminatedByServerError,
            LDAPSocketOpenError,
            LDAPSocketReceiveError,
        )

        deadline = time.monotonic() + timeout
        p = self._procs[m.name]
        last = "no attempt"
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise DSLabError(
                    f"ns-slapd for {m.name} exited with {p.returncode} during start; output:\n"
                    + _tail(self.state_dir / f"{m.name}.ns-slapd.out", 5)
                    + "\nerrors log:\n"
                    + _tail(Path(f"/var/log/dirsrv/slapd-{m.instance}/errors"))
                )
            try:
                with self.connection(m.name, connect_timeout=0.5, receive_timeout=2.0):
                    return p.pid
            except (LDAPSocketOpenError, LDAPSocketReceiveError, LDAPSessionTerminatedByServerError) as exc:
                # not listening yet, or still initialising; anything else is a real error
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
        raise DSLabError(f"{m.name} did not answer LDAP on {m.ldap_url} within {timeout:g} s ({last})")

    # ---- LDAP helpers ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def connection(
        self,
        name: str,
        connect_timeout: float = _CONNECT_TIMEOUT,
        receive_timeout: float = _RECEIVE_TIMEOUT,
    ) -> Iterator[Any]:
        """A bound ldap3 Connection as Directory Manager (raw string values), unbound on exit."""
        from ldap3 import NONE, Connection, Server

        m = self.member(name)
        server = Server(HOST, port=m.port, get_info=NONE, connect_timeout=connect_timeout)
        conn = Connection(
            server,
            DM_DN,
            self.dm_password,
            auto_bind=True,
            receive_timeout=Seconds(receive_timeout),
            raise_exceptions=True,
        )
        try:
            yield conn
        finally:
            with contextlib.suppress(Exception):
                conn.unbind()

    def ruv(self, name: str) -> dict[int, CSN | None]:
        """Max CSN per replica id in the member's RUV (subtree search, lab.md pitfall 6)."""
        from ldap3 import SUBTREE

        with self.connection(name) as c:
            c.search(self.suffix, RUV_FILTER, SUBTREE, attributes=["nsds50ruv"])
            for e in c.response or []:
                if e.get("type") == "searchResEntry":
                    return parse_ruv(e["attributes"].get("nsds50ruv", [])).max_csns()
        return {}

    def touch(self, name: str, value: str | None = None) -> str:
        """Make one replicated change on ``name``: replace ``description`` of the suffix entry."""
        from ldap3 import MODIFY_REPLACE

        value = value or f"dslab write on {name} at {time.time():.6f}"
        with self.connection(name) as c:
            c.modify(self.suffix, {"description": [(MODIFY_REPLACE, [value])]})
        return value

    def read_description(self, name: str) -> str | None:
        from ldap3 import BASE

        with self.connection(name) as c:
            c.search(self.suffix, "(objectClass=*)", BASE, attributes=["description"])
            for e in c.response or []:
                if e.get("type") == "searchResEntry":
                    vals = e["attributes"].get("description") or []
                    return str(vals[0]) if vals else None
        return None

    def wait_replicated(
        self, names: Sequence[str] | None = None, timeout: float = 30.0, interval: float = 0.2
    ) -> float:
        """Wait until the given members (default: all running, not frozen) hold equal max CSNs
        for every replica id any of them knows; returns the seconds waited.

        Equal max CSNs mean every change originated anywhere has reached all of them. A replica
        id with no CSN anywhere is ignored; one with a CSN on some member and none on another
        is not converged.
        """
        chosen = (
            list(names)
            if names is not None
            else [n for n in self.members if self.is_running(n) and not self.is_frozen(n)]
        )
        t0 = time.monotonic()
        last: dict[str, Any] = {}
        while True:
            try:
                ruvs = {n: self.ruv(n) for n in chosen}
                last = {n: {k: str(v) if v else None for k, v in r.items()} for n, r in ruvs.items()}
                rids = {rid for r in ruvs.values() for rid, csn in r.items() if csn is not None}
                if all(len({r.get(rid) for r in ruvs.values()}) == 1 for rid in rids):
                    return time.monotonic() - t0
            except Exception as exc:  # a member restarting: keep polling until the deadline
                last = {"error": f"{type(exc).__name__}: {exc}"}
            if time.monotonic() - t0 > timeout:
                raise DSLabError(f"replication did not converge within {timeout:g} s: {last}")
            time.sleep(interval)

    # ---- lifecycle -------------------------------------------------------------------------------

    def up(self, timeout: float = 300.0) -> float:
        """Bring the lab up; reuse a healthy lab of the same config, else (re)create it.

        Returns the seconds it took; ``self.timings`` has the steps.
        """
        if not Path(NS_SLAPD).exists():
            raise DSLabError(f"{NS_SLAPD} missing: install 389-ds-base (scripts/setup.sh)")
        t0 = time.monotonic()
        self.timings = {}
        with self.exclusive():
            fix_lib389_systemd()
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._write_password_file()
            reason = self._reuse()
            if reason is None:
                self.timings["reused"] = time.monotonic() - t0
            else:
                self.timings["reuse_rejected"] = time.monotonic() - t0
                self._log(f"creating lab {self.prefix!r}: {reason}")
                self._destroy()
                self._create(deadline=t0 + timeout)
        self.timings["total"] = time.monotonic() - t0
        return self.timings["total"]

    def down(self) -> float:
        """Stop this lab's servers (by verified pid) and remove its instances; returns seconds."""
        t0 = time.monotonic()
        with self.exclusive():
            fix_lib389_systemd()  # dsctl remove must not call systemctl either (pitfall 2)
            self._destroy()
            for f in (self.state_file, self.password_file):
                f.unlink(missing_ok=True)
        return time.monotonic() - t0

    def status(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for n, m in self.members.items():
            pid = self.pid(n)
            state = "stopped" if pid is None else ("frozen" if self.is_frozen(n) else "running")
            out[n] = {
                "instance": m.instance,
                "url": m.ldap_url,
                "replica_id": m.replica_id,
                "pid": pid,
                "state": state,
                "exists": m.config_dir.is_dir(),
            }
        return out

    def _log(self, msg: str) -> None:
        print(f"dslab: {msg}", file=sys.stderr)

    def _write_password_file(self) -> None:
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.dm_password)

    def _reuse(self) -> str | None:
        """None when the existing lab is healthy and ours (after starting stopped members);
        otherwise the reason it must be recreated."""
        state = self._read_state()
        if state.get("config") != self._config():
            return "no lab of this configuration in " + str(self.state_dir)
        for m in self.members.values():
            if not m.config_dir.is_dir():
                return f"instance {m.instance} missing"
        for n in self.members:
            pid = self.pid(n)
            if pid is not None:
                os.kill(pid, signal.SIGCONT)  # a session that died while a member was frozen
        try:
            for n in self.members:
                self.start(n, timeout=60)
            for n, m in self.members.items():
                problem = self._check_member(m)
                if problem:
                    return f"{n}: {problem}"
        except Exception as exc:
            return f"existing lab unhealthy: {type(exc).__name__}: {exc}"
        return None

    def _check_member(self, m: DSMember) -> str | None:
        from ldap3 import SUBTREE

        expected_ports = {o.port for o in self.members.values() if o.name != m.name}
        with self.connection(m.name) as c:
            c.search(
                "cn=mapping tree,cn=config",
                "(objectClass=nsds5Replica)",
                SUBTREE,
                attributes=["nsDS5ReplicaId", "nsDS5ReplicaRoot"],
            )
            rids = [
                e["attributes"].get("nsDS5ReplicaId", [""])[0]
                for e in c.response or []
                if e.get("type") == "searchResEntry"
            ]
            if rids != [str(m.replica_id)]:
                return f"replica id {rids}, expected {m.replica_id}"
            c.search(
                "cn=mapping tree,cn=config",
                "(objectClass=nsds5ReplicationAgreement)",
                SUBTREE,
                attributes=["nsds5replicaPort"],
            )
            ports = {
                int(e["attributes"]["nsds5replicaPort"][0])
                for e in c.response or []
                if e.get("type") == "searchResEntry"
            }
            if ports != expected_ports:
                return f"agreements to ports {sorted(ports)}, expected {sorted(expected_ports)}"
        return None

    def _destroy(self) -> None:
        """Kill our servers (data is thrown away, so no clean shutdown) and remove the instances."""
        t = time.monotonic()
        for n, m in self.members.items():
            pid = self.pid(n)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                if not self._wait_gone(n, pid, 10):
                    raise DSLabError(f"{m.instance} (pid {pid}) survived SIGKILL")
            self._procs.pop(n, None)
        removals: list[tuple[DSMember, subprocess.Popen[bytes]]] = []
        for m in self.members.values():
            if m.config_dir.is_dir():
                removals.append(
                    (
                        m,
                        subprocess.Popen(
                            [DSCTL, m.instance, "remove", "--do-it"],
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            env=_clean_env(),
                        ),
                    )
                )
        for m, p in removals:
            try:
                out, _ = p.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
            if p.returncode != 0:
                self._log(f"dsctl remove {m.instance} failed ({p.returncode}): {out.decode()[-500:]}")
        for m in self.members.values():
            self._remove_leftovers(m)
        self.timings["destroy"] = time.monotonic() - t

    def _remove_leftovers(self, m: DSMember) -> None:
        # `dsctl remove` leaves the pid and stats files; a failed one leaves everything
        inst = f"slapd-{m.instance}"
        for d in (
            Path("/etc/dirsrv") / inst,
            Path("/var/lib/dirsrv") / inst,
            Path("/var/log/dirsrv") / inst,
            Path("/run/lock/dirsrv") / inst,
        ):
            shutil.rmtree(d, ignore_errors=True)
        for f in (
            Path(f"/run/dirsrv/{inst}.pid"),
            Path(f"/run/dirsrv/{inst}.stats"),
            Path(f"/run/{inst}.socket"),
        ):
            f.unlink(missing_ok=True)

    def _inf(self, m: DSMember) -> str:
        return (
            "[general]\n"
            "full_machine_name = localhost\n"
            "strict_host_checking = False\n"
            "start = False\n"
            "systemd = False\n"
            "selinux = False\n\n"
            "[slapd]\n"
            f"instance_name = {m.instance}\n"
            f"port = {m.port}\n"
            f"secure_port = {m.secure_port}\n"
            f"root_password = {self.dm_password}\n"
            "self_sign_cert = False\n\n"
            "[backend-userroot]\n"
            f"suffix = {self.suffix}\n"
            "create_suffix_entry = True\n"
            "sample_entries = no\n"
        )

    def _create(self, deadline: float) -> None:
        busy = [m for m in self.members.values() if _port_busy(m.port)]
        if busy:
            raise DSLabError(f"ports already in use: {', '.join(f'{m.name}:{m.port}' for m in busy)}")
        # 1. dscreate, all instances at once (independent; measured faster than one by one)
        t = time.monotonic()
        jobs: list[tuple[DSMember, subprocess.Popen[bytes], Path]] = []
        for m in self.members.values():
            inf = self.state_dir / f"{m.name}.inf"
            fd = os.open(inf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the DM password
            with os.fdopen(fd, "w") as f:
                f.write(self._inf(m))
            log = self.state_dir / f"{m.name}.dscreate.log"
            with open(log, "wb") as out:
                p = subprocess.Popen(
                    [DSCREATE, "from-file", str(inf)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=_clean_env(),
                )
            jobs.append((m, p, log))
        failed = []
        for m, p, log in jobs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.returncode != 0:
                failed.append(f"dscreate {m.instance} exited {p.returncode}:\n{_tail(log)}")
        if failed:
            raise DSLabError("\n".join(failed))
        self.timings["dscreate"] = time.monotonic() - t

        # 2. listen on loopback only (pitfall 3), edited while the instance is stopped
        for m in self.members.values():
            dse = m.config_dir / "dse.ldif"
            text = dse.read_text()
            if "\nnsslapd-listenhost:" not in text:
                text = text.replace("dn: cn=config\n", f"dn: cn=config\nnsslapd-listenhost: {HOST}\n", 1)
                if f"nsslapd-listenhost: {HOST}" not in text:
                    raise DSLabError(f"could not pin nsslapd-listenhost in {dse}")
                dse.write_text(text)

        # 3. start all, then wait for each
        t = time.monotonic()
        for m in self.members.values():
            self._spawn(m)
        for m in self.members.values():
            self._wait_ready(m, max(1.0, deadline - time.monotonic()))
        self.timings["start"] = time.monotonic() - t

        # 4. replication
        t = time.monotonic()
        for m in self.members.values():
            self._enable_replication(m)
        first, *others = self.members.values()
        for o in others:
            self._add_agreement(first, o, init=True)
        for o in others:
            self._wait_init(first, o, deadline)
        for s in others:
            for c in self.members.values():
                if c.name != s.name:
                    self._add_agreement(s, c, init=False)
        self.timings["replication"] = time.monotonic() - t
        self._save_state()

        # 5. prove the mesh: one change from every supplier, seen everywhere
        t = time.monotonic()
        for n in self.members:
            self.touch(n, f"dslab {self.prefix} created; first write from {n}")
        self.wait_replicated(timeout=max(5.0, deadline - time.monotonic()))
        self.timings["converge"] = time.monotonic() - t

    def _replica_dn(self, c: Any) -> str:
        from ldap3 import LEVEL
        from ldap3.utils.conv import escape_filter_chars

        c.search(
            "cn=mapping tree,cn=config",
            f"(&(objectClass=nsMappingTree)(cn={escape_filter_chars(self.suffix)}))",
            LEVEL,
            attributes=["cn"],
        )
        for e in c.response or []:
            if e.get("type") == "searchResEntry":
                return f"cn=replica,{e['dn']}"
        raise DSLabError(f"no mapping tree entry for {self.suffix}")

    def _enable_replication(self, m: DSMember) -> None:
        with self.connection(m.name) as c:
            c.add(
                REPL_DN,
                ["top", "inetUser", "netscapeServer", "nsAccount"],
                {
                    "cn": "replication manager",
                    "uid": "replication manager",
                    "userPassword": self.repl_password,
                },
            )
            c.add(
                self._replica_dn(c),
                ["top", "nsds5Replica", "extensibleObject"],
                {
                    "cn": "replica",
                    "nsDS5ReplicaRoot": self.suffix,
                    "nsDS5ReplicaType": "3",  # supplier
                    "nsDS5Flags": "1",  # keeps a changelog
                    "nsDS5ReplicaId": str(m.replica_id),
                    "nsDS5ReplicaBindDN": REPL_DN,
                    # retry quickly after an outage (default 3..300 s) and write a keep-alive
                    # every 60 s (default 3600 s) so a dead peer turns red without writes (pitfall 5)
                    "nsds5ReplicaBackoffMin": "1",
                    "nsds5ReplicaBackoffMax": "5",
                    "nsds5ReplicaKeepAliveUpdateInterval": "60",
                },
            )

    def _add_agreement(self, s: DSMember, c: DSMember, init: bool) -> None:
        with self.connection(s.name) as conn:
            attrs: dict[str, Any] = {
                "cn": f"agmt-{s.name}-to-{c.name}",
                "nsDS5ReplicaRoot": self.suffix,
                "nsDS5ReplicaHost": HOST,
                "nsDS5ReplicaPort": str(c.port),
                "nsDS5ReplicaTransportInfo": "LDAP",
                "nsDS5ReplicaBindDN": REPL_DN,
                "nsDS5ReplicaBindMethod": "SIMPLE",
                "nsDS5ReplicaCredentials": self.repl_password,
                "description": f"dslab {self.prefix}: {s.name} -> {c.name}",
            }
            if init:
                attrs["nsds5BeginReplicaRefresh"] = "start"
            conn.add(
                f"cn=agmt-{s.name}-to-{c.name},{self._replica_dn(conn)}",
                ["top", "nsds5replicationagreement"],
                attrs,
            )

    def _wait_init(self, s: DSMember, c: DSMember, deadline: float) -> None:
        from ldap3 import SUBTREE

        status = ""
        while time.monotonic() < deadline:
            with self.connection(s.name) as conn:
                conn.search(
                    "cn=mapping tree,cn=config",
                    f"(&(objectClass=nsds5replicationagreement)(cn=agmt-{s.name}-to-{c.name}))",
                    SUBTREE,
                    attributes=["nsds5BeginReplicaRefresh", "nsds5replicaLastInitStatus"],
                )
                for e in conn.response or []:
                    if e.get("type") != "searchResEntry":
                        continue
                    a = e["attributes"]
                    running = bool(a.get("nsds5BeginReplicaRefresh"))
                    status = (a.get("nsds5replicaLastInitStatus") or [""])[0]
                    if not running and "Total update succeeded" in status:
                        return
                    if not running and status and not status.startswith("Error (0)"):
                        raise DSLabError(f"total init {s.name} -> {c.name} failed: {status}")
            time.sleep(0.2)
        raise DSLabError(f"total init {s.name} -> {c.name} timed out (last status {status!r})")


def _port_busy(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


# ---- python -m ca_watchdog.lab.dslab ------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ca_watchdog.lab.dslab", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=("up", "down", "status", "kill", "stop", "start", "freeze", "thaw"))
    ap.add_argument("member", nargs="?", help="member name for kill/stop/start/freeze/thaw")
    ap.add_argument("--names", default="ca1,ca2,ca3", help="comma-separated member names (default ca1,ca2,ca3)")
    ap.add_argument("--base-port", type=int, default=13800, help="LDAP port of the first member (default 13800)")
    ap.add_argument("--prefix", default="cwlab", help="instance name prefix (default cwlab)")
    ap.add_argument("--state-dir", help="default /tmp/ca-watchdog-dslab-<prefix>")
    ap.add_argument("--password", default=DEFAULT_DM_PASSWORD, help="Directory Manager password")
    ap.add_argument("--suffix", default=DEFAULT_SUFFIX)
    args = ap.parse_args(argv)
    lab = DSLab(
        [n.strip() for n in args.names.split(",") if n.strip()],
        args.base_port,
        args.prefix,
        Path(args.state_dir or Path(tempfile.gettempdir()) / f"ca-watchdog-dslab-{args.prefix}"),
        dm_password=args.password,
        suffix=args.suffix,
    )
    try:
        if args.command == "up":
            took = lab.up()
            print(json.dumps({"took": round(took, 3), "timings": lab.timings, "members": lab.status()}, indent=2))
        elif args.command == "down":
            print(json.dumps({"took": round(lab.down(), 3)}))
        elif args.command == "status":
            print(json.dumps(lab.status(), indent=2))
        else:
            if not args.member:
                ap.error(f"{args.command} needs a member name")
            actions: dict[str, Callable[[str], object]] = {
                "kill": lab.kill,
                "stop": lab.stop,
                "start": lab.start,
                "freeze": lab.freeze,
                "thaw": lab.thaw,
            }
            actions[args.command](args.member)
            print(json.dumps(lab.status()[args.member]))
    except (DSLabError, KeyError) as exc:
        print(f"dslab: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
