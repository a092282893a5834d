"""The real-systemd bed (beds/systemd/bed.sh) as a pytest fixture, and how tests talk to it.

``systemd_bed`` (session scope): builds the Debian 12 tree if it is not there yet (about a minute
from the host's mirror), boots it with a real systemd 252 as PID 1 of a systemd-nspawn container,
installs this checkout into it (the shipped units verbatim), and powers it off when the session
ends. Any failure there fails the tests (never a skip), naming the command to run by hand.

A test drives the bed through :class:`SystemdBed`: ``run``/``sh`` (a command inside, via
``nsenter -t <PID 1> -a`` with a clean environment), ``systemctl``, ``show`` (unit properties),
``cursor``/``journal`` (the bed's journal as JSON records after a cursor), ``wait_for`` and
``reset`` (both units stopped, no store, a master CS.cfg: the state ``bed.sh install`` leaves).

Environment: ``SDBED_ROOT``, ``SDBED_STATE``, ``SDBED_*_PORT`` as for bed.sh;
``SDBED_KEEP=1`` leaves the bed running after the session (a bed that was already running when
the session started is always left running).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

REPO = Path(__file__).resolve().parents[2]
BED_SH = REPO / "beds" / "systemd" / "bed.sh"
BUILD_HINT = f"sudo bash {BED_SH.relative_to(REPO)} up   (from {REPO}; or: build, boot, install one by one)"
INBED_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# names inside the bed (inbed-install.sh)
SERVICE = "ca-watchdog.service"
CA_UNIT = "pki-tomcatd@pki-tomcat.service"
GUARD_UNIT = "ca-watchdog-guard@pki-tomcat.service"  # the sandboxed guard oneshot the CA requires
CONFIG = "/etc/ca-watchdog/config.toml"
CS_CFG = "/etc/pki/pki-tomcat/ca/CS.cfg"
CREDENTIAL = "/etc/ca-watchdog/credentials/ldap-password"
CA_PORT = int(os.environ.get("SDBED_CA_PORT", "30443"))
PEER_PORT = int(os.environ.get("SDBED_PEER_PORT", "30444"))
API_PORT = int(os.environ.get("SDBED_API_PORT", "30099"))


class BedError(RuntimeError):
    """A command in (or about) the bed did not do what it had to."""


def _bed_sh(verb: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(BED_SH), verb, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@dataclass
class SystemdBed:
    """A booted bed: run commands in it, read its units and journal."""

    root: Path
    leader: int  # host PID of the bed's PID 1
    report: list[str] = field(default_factory=list)  # measurements, printed at the end of the session

    # ---- commands inside ----------------------------------------------------------------------------

    def run(
        self, *argv: str, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``argv`` inside the bed (all its namespaces, a clean environment), as root."""
        cmd = [
            "nsenter", "-t", str(self.leader), "-a",
            "env", "-i", f"PATH={INBED_PATH}", "HOME=/root", "TERM=dumb", "LANG=C.UTF-8",
            "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", *argv,
        ]  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input, check=False)
        if check and p.returncode != 0:
            raise BedError(
                f"in the bed: {shlex.join(argv)} -> exit {p.returncode}\nstdout: {p.stdout[-2000:]}\n"
                f"stderr: {p.stderr[-2000:]}"
            )
        return p

    def sh(self, script: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A bash script inside the bed."""
        return self.run("bash", "-c", script, check=check, timeout=timeout)

    def out(self, *argv: str, timeout: float = 60) -> str:
        """stdout of a command that must succeed, stripped."""
        return self.run(*argv, timeout=timeout).stdout.strip()

    def systemctl(self, *args: str, check: bool = True, timeout: float = 150) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show -p ...`` as a dict (the last value of a property listed more than once)."""
        args = [a for p in props for a in ("-p", p)]
        text = self.out("systemctl", "show", *args, unit)
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def prop_lines(self, unit: str, name: str) -> list[str]:
        """Every value of a property that systemctl show prints once per item (ExecStartPre=...)."""
        return self.out("systemctl", "show", "-p", name, "--value", unit).splitlines()

    def prop(self, unit: str, name: str) -> str:
        return self.show(unit, name).get(name, "")

    def is_active(self, unit: str) -> str:
        return self.run("systemctl", "is-active", unit, check=False).stdout.strip()

    def main_pid(self, unit: str) -> int:
        return int(self.prop(unit, "MainPID") or 0)

    def ca_watchdog(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("ca-watchdog", *args, check=check)

    def status_json(self) -> dict[str, Any]:
        """``ca-watchdog status --json``: leader and epoch as the store has them."""
        return json.loads(self.out("ca-watchdog", "status", "--config", CONFIG, "--json"))  # type: ignore[no-any-return]

    def cscfg(self) -> dict[str, Any]:
        """``ca-watchdog cscfg show --json`` of the bed's CS.cfg."""
        return json.loads(self.out("ca-watchdog", "cscfg", "show", "--json", CS_CFG))  # type: ignore[no-any-return]

    def read(self, path: str) -> str:
        return (self.root / path.lstrip("/")).read_text()

    # ---- journal ------------------------------------------------------------------------------------

    def cursor(self) -> str:
        """A cursor at the current end of the journal: ``journal(cursor)`` gives what came after."""
        text = self.out("journalctl", "-n", "0", "--show-cursor", "--no-pager")
        for line in text.splitlines():
            if line.startswith("-- cursor: "):
                return line.removeprefix("-- cursor: ")
        raise BedError(f"journalctl printed no cursor: {text!r}")

    def journal(self, cursor: str | None, *matches: str) -> list[dict[str, Any]]:
        """Journal records (JSON) after ``cursor``, filtered like ``journalctl MATCHES...``.

        ``--cursor`` and dropping the cursor's own record, not ``--after-cursor``: systemd 252's
        journalctl, given ``--after-cursor`` and matches with ``+``, skips the first matching record
        (it steps over "the cursor's record" even when that one did not match).
        """
        args = ["journalctl", "-o", "json", "--no-pager", "--all"]
        if cursor:
            args.append(f"--cursor={cursor}")
        p = self.run(*args, *matches, check=False)
        if p.returncode != 0:
            raise BedError(f"journalctl {shlex.join(matches)} failed: {p.stderr}")
        records = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
        return [r for r in records if r.get("__CURSOR") != cursor]

    def messages(self, cursor: str | None, *matches: str) -> list[str]:
        return [str(r.get("MESSAGE", "")) for r in self.journal(cursor, *matches)]

    def unit_log(self, cursor: str | None, *units: str) -> list[dict[str, Any]]:
        """What PID 1 says about ``units`` and what their processes log, in journal order."""
        matches: list[str] = []
        for unit in units:
            matches += [*(["+"] if matches else []), f"_SYSTEMD_UNIT={unit}", "+", "_PID=1", f"UNIT={unit}"]
        return self.journal(cursor, *matches)

    def wait_for_message(self, cursor: str | None, pred: Callable[[dict[str, Any]], bool], timeout: float,
                         *matches: str) -> dict[str, Any]:  # fmt: skip
        """The first journal record after ``cursor`` for which ``pred`` holds; BedError after ``timeout``."""
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [r for r in self.journal(cursor, *matches) if pred(r)]
            return bool(found)

        if not wait_for(seen, timeout):
            raise BedError(f"no such journal record within {timeout:g} s (matches {matches})")
        return found[0]

    # ---- state --------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Both units stopped, no store, master CS.cfg, fresh credential, no test drop-ins."""
        p = _bed_sh("reset", timeout=180)
        if p.returncode != 0:
            raise BedError(f"bed.sh reset failed:\n{p.stdout}\n{p.stderr}")

    def note(self, line: str) -> None:
        """A measurement for the end-of-session summary (also printed now, for -s)."""
        print(f"[systemd bed] {line}")
        self.report.append(line)


def wait_for(pred: Callable[[], bool], timeout: float, step: float = 0.2) -> bool:
    end = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(step)


def _fail(what: str, p: subprocess.CompletedProcess[str] | None = None) -> NoReturn:
    detail = f"\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}" if p is not None else ""
    pytest.fail(f"real-systemd bed: {what}. To see why, run it by hand:\n    {BUILD_HINT}{detail}", pytrace=False)


@pytest.fixture(scope="session")
def systemd_bed(request: pytest.FixtureRequest) -> Iterator[SystemdBed]:
    """The booted bed with this checkout installed (see the module docstring)."""
    if os.geteuid() != 0:
        _fail("needs root (debootstrap, systemd-nspawn, nsenter)")
    state = Path(os.environ.get("SDBED_STATE", "/run/cawd-sdbed"))
    state.mkdir(parents=True, exist_ok=True)
    # one session at a time on this machine: the second waits instead of rebooting the first's bed
    with open(state / "pytest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        t0 = time.monotonic()
        was_running = _bed_sh("pid", timeout=30).returncode == 0
        for verb in ("build", "boot", "install"):
            p = _bed_sh(verb)
            if p.returncode != 0:
                _fail(f"`bed.sh {verb}` failed (exit {p.returncode})", p)
        pid = _bed_sh("pid", timeout=30)
        if pid.returncode != 0 or not pid.stdout.strip().isdigit():
            _fail("the bed booted but `bed.sh pid` finds no PID 1", pid)
        root = Path(os.environ.get("SDBED_ROOT", "/srv/cawd-sdbed"))
        bed = SystemdBed(root=root, leader=int(pid.stdout.strip()))
        version = bed.out("systemctl", "--version").splitlines()[0]
        bed.note(f"bed built, booted and installed in {time.monotonic() - t0:.1f} s ({version})")
        try:
            yield bed
        finally:
            if not was_running and os.environ.get("SDBED_KEEP") != "1":
                _bed_sh("poweroff", timeout=120)
            _print_report(request.config, bed.report)


def _print_report(config: pytest.Config, lines: list[str]) -> None:
    """The session's measurements on the terminal, past output capture (they belong in CI logs)."""
    reporter = config.pluginmanager.getplugin("terminalreporter")
    capture = config.pluginmanager.getplugin("capturemanager")
    if reporter is None or not lines:
        return
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        reporter.write_line("")
        reporter.write_sep("-", "real-systemd bed measurements")
        for line in lines:
            reporter.write_line(line)
