"""A tiny service manager for the lab, standing in for systemd's pki-tomcatd@ unit.

    python -m ca_watchdog.lab.service start --pidfile F --log F [--guard-config CFG] -- ARGV...
    python -m ca_watchdog.lab.service stop --pidfile F [--timeout S]

`start` runs the guard first (as the unit's ExecStartPre= does), then starts ARGV detached and
returns at once (like a Type=simple unit); `stop` sends SIGTERM (and SIGCONT, as systemd does, so
a frozen process can act on it), then SIGKILL after the timeout. Only the recorded pid is touched.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path


def read_pid(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@contextlib.contextmanager
def _locked(pidfile: Path) -> Iterator[None]:
    """One start or stop at a time per service, across processes (check, launch and record as one)."""
    with open(pidfile.with_name(pidfile.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def start(pidfile: Path, log: Path, argv: Sequence[str], guard_config: str | None) -> int:
    with _locked(pidfile):
        return _start(pidfile, log, argv, guard_config)


def _start(pidfile: Path, log: Path, argv: Sequence[str], guard_config: str | None) -> int:
    if read_pid(pidfile) is not None:
        print(f"already running (pid {read_pid(pidfile)})")
        return 0
    if guard_config:
        from ..config import load_settings
        from ..guard import run_guard

        result = asyncio.run(run_guard(load_settings(guard_config)))
        print(f"guard: {result.message}")
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    pidfile.write_text(f"{proc.pid}\n")
    print(f"started pid {proc.pid}")
    return 0


def stop(pidfile: Path, timeout: float) -> int:
    with _locked(pidfile):
        return _stop(pidfile, timeout)


def _stop(pidfile: Path, timeout: float) -> int:
    pid = read_pid(pidfile)
    if pid is None:
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()
        print("not running")
        return 0
    for sig in (signal.SIGTERM, signal.SIGCONT):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while alive(pid):
            time.sleep(0.05)
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    print(f"stopped pid {pid}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ca_watchdog.lab.service")
    sub = p.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("start")
    s.add_argument("--pidfile", required=True, type=Path)
    s.add_argument("--log", required=True, type=Path)
    s.add_argument("--guard-config")
    s.add_argument("argv", nargs=argparse.REMAINDER)
    t = sub.add_parser("stop")
    t.add_argument("--pidfile", required=True, type=Path)
    t.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args(argv)
    if args.verb == "start":
        cmd = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not cmd:
            p.error("start needs a command after --")
        return start(args.pidfile, args.log, cmd, args.guard_config)
    return stop(args.pidfile, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
