"""`ca-watchdog lab up|down|status|kill`: a local lab cluster that outlives the command.

`up` builds a LabCluster in one directory (simulated CAs, one `ca-watchdog run` per member, the
SQLite store or a lab etcd, real replicated 389-DS with --with-ds), waits until one master serves,
and returns with everything running detached. Everything is found again from that directory
alone: `lab.json` holds the options, pid files sit beside each process's log. `down` stops exactly
those processes, removes the 389-DS instances the lab created, then the directory. `up` on a lab
that is already there starts whatever of it is stopped (a host coming back after `lab kill ... host`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..control import cluster_status, with_store
from . import service
from .cluster import LabCluster, pids_naming, wait_until
from .dslab import DSCREATE, NS_SLAPD, DSLab, DSLabError
from .etcdlab import ETCD_BINARY, EtcdLab, EtcdLabError, free_ports
from .pki import LabPKIFiles

DEFAULT_DIR = Path("/tmp/ca-watchdog-lab")  # also in cli.py (which must not import this module)
DEFAULT_BASE_PORT = 17640
STATE_FILE = "lab.json"
KILLS = ("ca", "daemon", "host", "freeze")  # also in cli.py
CONVERGE_TIMEOUT = 120.0  # a 389-DS lab's CAs connect to freshly created servers: give them time

Say = Callable[[str], None]


class LabError(RuntimeError):
    """The lab cannot do what was asked; the message says why."""


@dataclass(frozen=True)
class LabSpec:
    """What `lab up` was asked for; saved as lab.json so later commands rebuild the same lab."""

    members: int = 3
    base_port: int = DEFAULT_BASE_PORT  # CA agent ports from here, API +20, 389-DS LDAP +40, etcd from +60
    with_ds: bool = False
    store: str = "sqlite"
    ds_prefix: str = ""  # 389-DS instance names <prefix>-<member>: one per lab directory
    etcd_ports: tuple[int, int] = (0, 0)  # client, peer

    @property
    def names(self) -> list[str]:
        return [f"ca{i}" for i in range(1, self.members + 1)]

    def describe(self) -> str:
        ds = "real 389-DS" if self.with_ds else "no 389-DS"
        return f"{self.members} members ({' '.join(self.names)}), {self.store} store, {ds}"


def _proc_state(pid: int | None) -> str:
    if pid is None:
        return "stopped"
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "stopped"
    return {"Z": "stopped", "X": "stopped", "T": "frozen", "t": "frozen"}.get(state, "running")


def _listening(port: int) -> bool:
    """Someone listens on 127.0.0.1:port. (A plain bind test would also fail on the TIME_WAIT
    connections a lab that just went down leaves behind; its servers bind with SO_REUSEADDR.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """service.start/stop report on stdout, for their command line; the lab says it better."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


class Lab:
    """A lab in `root`: the cluster, its 389-DS and its etcd, as `spec` describes them."""

    def __init__(self, root: Path, spec: LabSpec) -> None:
        self.root, self.spec = root, spec
        self.ds = DSLab(spec.names, spec.base_port + 40, spec.ds_prefix, root / "ds") if spec.with_ds else None
        self.etcd = EtcdLab(root / "etcd", *spec.etcd_ports) if spec.store == "etcd" else None
        self.cluster = LabCluster(
            root,
            spec.names,
            base_port=spec.base_port,
            ds=self.ds,
            store_backend=spec.store,
            etcd_endpoint=self.etcd.endpoint if self.etcd else None,
        )

    @classmethod
    def open(cls, root: Path) -> Lab:
        try:
            data = json.loads((root / STATE_FILE).read_text())
            spec = LabSpec(**{**data, "etcd_ports": tuple(data["etcd_ports"])})
        except FileNotFoundError:
            raise LabError(f"no lab in {root} (no {STATE_FILE}); `ca-watchdog lab up --dir {root}` makes one") from None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise LabError(f"{root / STATE_FILE}: unreadable ({exc})") from None
        lab = cls(root, spec)
        lab.cluster.pki = LabPKIFiles.at(root / "pki")
        return lab

    def save(self) -> None:
        (self.root / STATE_FILE).write_text(json.dumps(asdict(self.spec), indent=2) + "\n")

    @property
    def config(self) -> Path:
        """The configuration every operator command can use (`ca-watchdog status --config ...`)."""
        return self.cluster.nodes[self.spec.names[0]].config

    def _check_member(self, name: str) -> None:
        if name not in self.cluster.nodes:
            raise LabError(f"no member {name!r} in the lab in {self.root} (members: {' '.join(self.spec.names)})")

    # ---- daemons: run like the CAs, through the lab's service manager, so any process finds them ----

    def _daemon_pidfile(self, name: str) -> Path:
        return self.cluster.nodes[name].dir / "daemon.pid"

    def daemon_pid(self, name: str) -> int | None:
        return service.read_pid(self._daemon_pidfile(name))

    def start_daemon(self, name: str) -> None:
        node = self.cluster.nodes[name]
        argv = [sys.executable, "-m", "ca_watchdog.cli", "run", "--config", str(node.config)]
        with _quiet():
            service.start(self._daemon_pidfile(name), node.daemon_log, argv, None)

    def stop_daemon(self, name: str) -> None:
        with _quiet():
            service.stop(self._daemon_pidfile(name), timeout=10)

    # ---- the cluster as a whole ---------------------------------------------------------------------

    def store_status(self) -> dict[str, Any]:
        return with_store(self.config, cluster_status)

    def master(self) -> str | None:
        """The master once the lab has converged: exactly one CA serves as master, every other as a
        clone, the store's leader is that one and every member has published a running CA."""
        serving = asyncio.run(self.cluster.serving())
        masters = [n for n, s in serving.items() if s == "master"]
        if len(masters) != 1 or any(s not in ("master", "clone") for s in serving.values()):
            return None
        try:
            st = self.store_status()
        except Exception:  # the store not answering yet (etcd starting): not converged
            return None
        if st["leader"] != masters[0] or any(r["ca"] != "running" for r in st["members"]):
            return None
        return masters[0]

    def wait_converged(self, timeout: float = CONVERGE_TIMEOUT) -> str:
        found: list[str] = []

        def done() -> bool:
            m = self.master()
            if m is not None:
                found.append(m)
            return m is not None

        if not wait_until(done, timeout, 0.5):
            raise LabError(f"no single master within {timeout:g} s\n{self._diagnosis()}")
        return found[-1]

    def _diagnosis(self) -> str:
        lines = [self.status_table()]
        for name, node in self.cluster.nodes.items():
            with contextlib.suppress(OSError):
                tail = node.daemon_log.read_text(errors="replace").splitlines()[-5:]
                lines += [f"{name} daemon log ({node.daemon_log}):", *("  " + t for t in tail)]
        return "\n".join(lines)

    def processes(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        roles = self.cluster.roles()
        for name in self.spec.names:
            ca, daemon = self.cluster.ca_pid(name), self.daemon_pid(name)
            row: dict[str, Any] = {
                "cscfg": roles[name],
                "ca": _proc_state(ca),
                "ca_pid": ca,
                "daemon": _proc_state(daemon),
                "daemon_pid": daemon,
            }
            if self.ds is not None:
                ds = self.ds.pid(name)
                row |= {"ds": _proc_state(ds), "ds_pid": ds}
            out[name] = row
        return out

    def status_table(self) -> str:
        procs = self.processes()
        lines = [f"lab in {self.root}: {self.spec.describe()}", f"config: {self.config}"]
        if self.etcd is not None:
            lines.append(f"etcd {self.etcd.endpoint}: {_proc_state(self.etcd.pid)} (pid {self.etcd.pid or '-'})")

        def cell(row: dict[str, Any], what: str) -> str:
            return f"{row[what]} ({row[what + '_pid']})" if row[what + "_pid"] else row[what]

        cols = ["ca", "daemon", *(["ds"] if self.ds is not None else [])]
        head = ["Member", "CS.cfg", "CA", "Daemon", *(["389-DS"] if self.ds is not None else [])]
        rows = [[n, r["cscfg"], *(cell(r, c) for c in cols)] for n, r in procs.items()]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        for r in [head, *rows]:
            lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
        return "\n".join(lines)

    # ---- starting and stopping ----------------------------------------------------------------------

    def _check_prerequisites(self) -> None:
        if self.ds is not None:
            for program in (DSCREATE, NS_SLAPD):
                if not os.access(program, os.X_OK):
                    raise LabError(
                        f"--with-ds needs 389-DS: {program} not found "
                        "(Debian: apt-get install 389-ds-base python3-lib389, or run scripts/setup.sh)"
                    )
            if os.geteuid() != 0:
                raise LabError("--with-ds needs root (dscreate makes system-wide 389-DS instances)")
        if self.etcd is not None and not os.access(ETCD_BINARY, os.X_OK):
            raise LabError(f"--store etcd needs {ETCD_BINARY} (Debian: apt-get install etcd-server)")
        nodes = self.cluster.nodes.values()
        ports = [p for n in nodes for p in (n.agent_port, n.api_port)]
        if self.ds is not None:
            ports += [self.ds.port(n) for n in self.spec.names]
        busy = [p for p in ports if _listening(p)]
        if busy:
            raise LabError(f"ports in use: {', '.join(map(str, busy))} (another lab? choose another --base-port)")

    def create(self, say: Say) -> str:
        """Build and start a new lab; its master's name once converged."""
        self._check_prerequisites()
        self.root.mkdir(parents=True, exist_ok=True)
        self.save()  # first, so that `down` can clean up whatever the steps below leave
        if self.ds is not None:
            say(f"creating {self.spec.members} replicating 389-DS suppliers on 127.0.0.1 ...")
            say(f"389-DS up in {self.ds.up():.1f} s")
        if self.etcd is not None:
            self.etcd.start()
            say(f"etcd up on {self.etcd.endpoint}")
        self.cluster.build()
        say(f"starting {self.spec.members} simulated CAs ({self.spec.names[0]} master) and their daemons ...")
        self._start_missing()
        return self.wait_converged()

    def revive(self, say: Say) -> str:
        """Start whatever of an existing lab is stopped or frozen, as after a host reboot."""
        if self.etcd is not None and self.etcd.pid is None:
            self.etcd.start(fresh=False)
            say("etcd restarted")
        if self.ds is not None:
            for name in self.spec.names:
                if self.ds.is_frozen(name):
                    self.ds.thaw(name)
                    say(f"{name}'s 389-DS thawed")
                elif not self.ds.is_running(name):
                    self.ds.start(name)
                    say(f"{name}'s 389-DS restarted")
        for name in self.spec.names:
            pid = self.cluster.ca_pid(name)
            if _proc_state(pid) == "frozen":
                self.cluster.thaw_ca(name)
                say(f"{name}'s CA thawed")
        self._start_missing(say)
        return self.wait_converged()

    def _start_missing(self, say: Say | None = None) -> None:
        # the CAs first, through their start command (so the guard runs first), as `LabCluster.start`
        for name in self.spec.names:
            if self.cluster.ca_pid(name) is None:
                try:
                    self.cluster.start_ca(name)
                except subprocess.CalledProcessError as exc:
                    raise LabError(f"{name}'s CA did not start: {exc.stderr.decode(errors='replace')[-500:]}") from None
                if say:
                    say(f"{name}'s CA restarted")
        for name in self.spec.names:
            if self.daemon_pid(name) is None:
                self.start_daemon(name)
                if say:
                    say(f"{name}'s daemon restarted")

    def destroy(self) -> None:
        """Stop everything the lab started and remove it, the directory last."""
        for name in self.spec.names:
            if self.cluster.nodes[name].dir.is_dir():  # a lab that failed early has none
                self.stop_daemon(name)  # first: a daemon would restart its CA
        self.cluster.stop()  # the CAs by their stop command, then anything else naming the directory
        if self.ds is not None:
            self.ds.down()
            # the lock file of this lab's instance prefix (one per lab directory)
            Path(tempfile.gettempdir(), f"ca-watchdog-dslab-{self.spec.ds_prefix}.lock").unlink(missing_ok=True)
        if self.etcd is not None:
            self.etcd.stop()
        left = pids_naming(self.root)
        if left:
            raise LabError(f"processes of the lab in {self.root} survived: {left}; nothing removed")
        shutil.rmtree(self.root)

    # ---- faults -------------------------------------------------------------------------------------

    def kill(self, name: str, what: str) -> str:
        """Inject a fault into member `name`; what was done, in words."""
        self._check_member(name)
        if what not in KILLS:
            raise LabError(f"no fault {what!r} (faults: {', '.join(KILLS)})")
        if what in ("ca", "freeze"):
            pid = self.cluster.ca_pid(name)
            if pid is None:
                raise LabError(f"{name}'s CA is not running")
            os.kill(pid, signal.SIGKILL if what == "ca" else signal.SIGSTOP)
            return f"{name}'s CA (pid {pid}) " + ("killed (SIGKILL)" if what == "ca" else "frozen (SIGSTOP)")
        if what == "daemon":
            pid = self.daemon_pid(name)
            if pid is None:
                raise LabError(f"{name}'s daemon is not running")
            os.kill(pid, signal.SIGKILL)
            return f"{name}'s daemon (pid {pid}) killed (SIGKILL); its CA runs on unwatched"
        # host: every process of the member at once (its daemon, its CA, a start command in flight)
        pids = pids_naming(self.cluster.nodes[name].dir)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.ds is not None and self.ds.is_running(name):
            pids.append(self.ds.kill(name))
        return f"{name}'s host is down: {len(pids)} processes killed (SIGKILL); `lab up` brings it back"


def _ds_prefix(root: Path) -> str:
    # 389-DS instances are system-wide: their names must tell labs in different directories apart
    return "cwlab" + hashlib.sha256(str(root).encode()).hexdigest()[:8]


def exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # run the cleanup in `finally`/`except` blocks on SIGTERM too


def up(root: Path, say: Say, members: int | None = None, base_port: int | None = None,
       with_ds: bool | None = None, store: str | None = None) -> tuple[Lab, str]:  # fmt: skip
    """Make (or, if `root` holds one, restart) a lab; the lab and its master's name once converged.
    A lab that could not be made is removed again."""
    root = root.resolve()
    given: dict[str, Any] = {"members": members, "base_port": base_port, "with_ds": with_ds, "store": store}
    asked = {k: v for k, v in given.items() if v is not None}
    if (root / STATE_FILE).exists():
        lab = Lab.open(root)
        differ = [f"{k} {getattr(lab.spec, k)} (not {v})" for k, v in asked.items() if getattr(lab.spec, k) != v]
        if differ:
            raise LabError(f"{root} already holds a lab with {', '.join(differ)}: `ca-watchdog lab down` it first")
        return lab, lab.revive(say)
    if root.exists() and any(root.iterdir()):
        raise LabError(f"{root} exists and is not a lab (no {STATE_FILE}): choose another --dir")
    spec = replace(LabSpec(ds_prefix=_ds_prefix(root)), **asked)
    if not 2 <= spec.members <= 9:
        raise LabError(f"--members {spec.members}: a lab has 2 to 9 members")
    if not 1024 <= spec.base_port <= 65400:
        raise LabError(f"--base-port {spec.base_port}: the lab needs ports from 1024 up to 65535 (base + 100)")
    if spec.store == "etcd":
        client, peer = free_ports(2, spec.base_port + 60)
        spec = replace(spec, etcd_ports=(client, peer))
    lab = Lab(root, spec)
    try:
        return lab, lab.create(say)
    except BaseException:
        if root.exists():
            say("lab up failed: removing what it started ...")
            lab.destroy()
        raise


# ---- the command line -----------------------------------------------------------------------------

ERRORS = (LabError, DSLabError, EtcdLabError)


def _reported(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A lab command's failure is a message naming what went wrong, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except ERRORS as exc:
            print(f"ca-watchdog lab {args.lab_command}: {exc}", file=sys.stderr)
            return 1

    return run


def _dir(args: argparse.Namespace) -> Path:
    return Path(args.dir).resolve()


def _dir_option(args: argparse.Namespace) -> str:
    return "" if _dir(args) == DEFAULT_DIR.resolve() else f" --dir {_dir(args)}"


@_reported
def cli_up(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    t0 = time.monotonic()
    lab, master = up(_dir(args), lambda s: print(s, flush=True), args.members, args.base_port, args.with_ds, args.store)
    d = _dir_option(args)
    print(
        f"lab up in {lab.root}: {lab.spec.describe()}; {master} master after {time.monotonic() - t0:.1f} s\n"
        f"config: {lab.config}\n"
        f"  ca-watchdog status --config {lab.config}\n"
        f"  ca-watchdog switchover --config {lab.config} --to NAME\n"
        f"  ca-watchdog lab status{d}\n"
        f"  ca-watchdog lab kill MEMBER [ca|daemon|host|freeze]{d}\n"
        f"  ca-watchdog lab down{d}"
    )
    return 0


@_reported
def cli_down(args: argparse.Namespace) -> int:
    root = _dir(args)
    if not root.exists():
        print(f"no lab in {root}: nothing to do")
        return 0
    Lab.open(root).destroy()
    print(f"lab in {root} stopped and removed")
    return 0


@_reported
def cli_status(args: argparse.Namespace) -> int:
    lab = Lab.open(_dir(args))
    if args.json:
        out = {"dir": str(lab.root), "config": str(lab.config), **asdict(lab.spec), "members": lab.processes()}
        if lab.etcd is not None:
            out["etcd"] = {"endpoint": lab.etcd.endpoint, "state": _proc_state(lab.etcd.pid), "pid": lab.etcd.pid}
        print(json.dumps(out, indent=2))
    else:
        print(lab.status_table())
    return 0


@_reported
def cli_kill(args: argparse.Namespace) -> int:
    print(Lab.open(_dir(args)).kill(args.member, args.what))
    return 0
