"""Runbook: the shipped systemd units load cleanly (`systemd-analyze verify`) and keep their promises.

The units are copied into a scratch directory next to a stand-in `pki-tomcatd@.service` (Dogtag's
shape: User=pkiuser), with their executables pointed at stand-in scripts, so verify resolves
everything without the real packages or systemd as PID 1. Verify must print nothing at all: an
unknown key or a bad value only gives a warning (exit status 0), so any output fails the test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "systemd" / "ca-watchdog.service"
DROPIN = ROOT / "systemd" / "pki-tomcatd@.service.d" / "ca-watchdog.conf"
GUARD_UNIT = ROOT / "systemd" / "ca-watchdog-guard@.service"

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")

FAKE_TOMCAT_UNIT = """\
[Unit]
Description=PKI Tomcat Server %i (stand-in for Dogtag's unit)

[Service]
Type=simple
ExecStart={bin}/tomcat-server start
ExecStop={bin}/tomcat-server stop
SuccessExitStatus=143
User=pkiuser
Group=pkiuser

[Install]
WantedBy=multi-user.target
"""


def _stage(
    tmp_path: Path, service_text: str | None = None, dropin_text: str | None = None, guard_text: str | None = None
) -> Path:
    """Units dir with the shipped units (optionally replaced), executables pointed at stand-ins."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for exe in ("ca-watchdog", "tomcat-server"):
        p = bindir / exe
        p.write_text("#!/bin/sh\nexit 0\n")
        p.chmod(0o755)
    units = tmp_path / "units"
    (units / "pki-tomcatd@.service.d").mkdir(parents=True)
    service = (service_text or SERVICE.read_text()).replace("/usr/bin/ca-watchdog", f"{bindir}/ca-watchdog")
    dropin = (dropin_text or DROPIN.read_text()).replace("/usr/bin/ca-watchdog", f"{bindir}/ca-watchdog")
    (units / "ca-watchdog.service").write_text(service)
    (units / "pki-tomcatd@.service.d" / "ca-watchdog.conf").write_text(dropin)
    guard = (guard_text or GUARD_UNIT.read_text()).replace("/usr/bin/ca-watchdog", f"{bindir}/ca-watchdog")
    (units / "ca-watchdog-guard@.service").write_text(guard)
    (units / "pki-tomcatd@.service").write_text(FAKE_TOMCAT_UNIT.format(bin=bindir))
    return units


def _analyze_verify(paths: list[Path], debug: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "debug" if debug else "notice"}
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--generators=no", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def dumped_unit(output: str, unit: str) -> str:
    """The `-> Unit <unit>:` section of a debug verify's dump."""
    start = output.index(f"-> Unit {unit}:")
    end = output.find("-> Unit ", start + 1)
    return output[start : end if end > 0 else len(output)]


def problems(units: Path) -> list[str]:
    """Everything systemd objects to, and every way its reading of the units differs from the intent.

    - the service and an instance of pki-tomcatd@ (the drop-in with %i expanded) must verify silently;
    - the template alone too: only then does systemd print the drop-in's own warnings;
    - systemd's dump of what it parsed: unknown capability names, for one, are dropped without a word.
    """
    bindir = units.parent / "bin"
    found = []
    for paths in (
        [units / "ca-watchdog.service", units / "pki-tomcatd@pki-tomcat.service"],
        [units / "ca-watchdog-guard@pki-tomcat.service"],
        [units / "pki-tomcatd@.service"],
        [units / "ca-watchdog-guard@.service"],
    ):
        r = _analyze_verify(paths)
        if r.returncode != 0 or (r.stdout + r.stderr).strip():
            found.append(f"verify {[p.name for p in paths]} (exit {r.returncode}):\n{r.stdout}{r.stderr}")
    r = _analyze_verify(
        [
            units / "ca-watchdog.service",
            units / "pki-tomcatd@pki-tomcat.service",
            units / "ca-watchdog-guard@pki-tomcat.service",
        ],
        debug=True,
    )
    out = r.stdout + r.stderr
    try:
        svc = dumped_unit(out, "ca-watchdog.service")
        tomcat = dumped_unit(out, "pki-tomcatd@pki-tomcat.service")
        guard = dumped_unit(out, "ca-watchdog-guard@pki-tomcat.service")
    except ValueError:
        return [*found, f"no unit dump from systemd-analyze verify:\n{out[-2000:]}"]
    for line in (
        "Type: notify\n",
        "NotifyAccess: main\n",
        "Restart: on-failure\n",
        "WatchdogSec: 30s\n",
        "ProtectSystem: strict\n",
        "ProtectHome: yes\n",
        "PrivateTmp: yes\n",
        # issue 10: mode and label before fchown, so no CAP_FOWNER
        "CapabilityBoundingSet: cap_chown cap_dac_override\n",
        # issue 10, finding 12: only the instance's ca/ directory and the state directory
        "ReadWritePaths: /etc/pki/pki-tomcat/ca /var/lib/ca-watchdog\n",
        "InaccessiblePaths: -/etc/pki/pki-tomcat/alias -/etc/pki/pki-tomcat/password.conf"
        " -/etc/ca-watchdog/credentials\n",
        "StateDirectory: ca-watchdog\n",
        f"Command Line: {bindir}/ca-watchdog run --config /etc/ca-watchdog/config.toml\n",
    ):
        if line not in svc:
            found.append(f"systemd's view of ca-watchdog.service lacks {line!r}")
    # the guard: its own sandboxed oneshot with %i expanded (issue 10, finding 12)
    for line in (
        "Type: oneshot\n",
        "ProtectSystem: strict\n",
        "CapabilityBoundingSet: cap_chown\n",
        "ReadWritePaths: /etc/pki/pki-tomcat/ca -/var/lib/ca-watchdog\n",
        "InaccessiblePaths: -/etc/pki/pki-tomcat/alias -/etc/pki/pki-tomcat/password.conf"
        " -/etc/ca-watchdog/credentials\n",
        f"Command Line: {bindir}/ca-watchdog guard --config /etc/ca-watchdog/config.toml pki-tomcat\n",
    ):
        if line not in guard:
            found.append(f"systemd's view of ca-watchdog-guard@pki-tomcat.service lacks {line!r}")
    # the CA requires the guard and is ordered after it; no unsandboxed ExecStartPre=+ is left
    for dep in ("Requires", "After"):
        if f"{dep}: ca-watchdog-guard@pki-tomcat.service" not in tomcat:
            found.append(f"systemd's view of pki-tomcatd@pki-tomcat.service has no {dep}= on the guard unit")
    if "ca-watchdog guard" in tomcat:
        found.append("pki-tomcatd@pki-tomcat.service still runs the guard itself")
    return found


def test_both_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    assert problems(_stage(tmp_path)) == []


def _settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if m:
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


def test_the_service_is_a_hardened_notify_service_with_a_watchdog() -> None:
    s = _settings(SERVICE.read_text())
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] and s["WatchdogSec"][0] not in ("0", "infinity")
    assert s["Restart"] == ["on-failure"]
    assert s["ExecStart"] == ["/usr/bin/ca-watchdog run --config /etc/ca-watchdog/config.toml"]
    for dep in ("network-online.target", "dirsrv.target"):
        assert any(dep in v.split() for v in s["After"])
        assert any(dep in v.split() for v in s["Wants"])
    assert s["ProtectSystem"] == ["strict"]
    # only what it writes: CS.cfg (and backups) in the instance's ca/, the SQLite store (finding 12)
    assert sorted(" ".join(s["ReadWritePaths"]).split()) == ["/etc/pki/pki-tomcat/ca", "/var/lib/ca-watchdog"]
    assert s["StateDirectory"] == ["ca-watchdog"]
    for key in ("ProtectHome", "PrivateTmp", "NoNewPrivileges"):
        assert s[key] == ["yes"], key
    assert set(" ".join(s["CapabilityBoundingSet"]).split()) == {"CAP_CHOWN", "CAP_DAC_OVERRIDE"}
    assert any(v.startswith("ldap-password:") for v in s["LoadCredential"])
    # systemctl must still reach PID 1 over AF_UNIX; UID 0 must stay UID 0
    assert "AF_UNIX" in " ".join(s["RestrictAddressFamilies"]).split()
    assert "PrivateUsers" not in s and "User" not in s and "DynamicUser" not in s


def test_finding12_the_service_hides_keys_and_other_credentials_and_bounds_its_resources() -> None:
    s = _settings(SERVICE.read_text())
    hidden = " ".join(s["InaccessiblePaths"]).split()
    for path in ("/etc/pki/pki-tomcat/alias", "/etc/pki/pki-tomcat/password.conf", "/etc/ca-watchdog/credentials"):
        assert f"-{path}" in hidden, path
    assert s["PrivateMounts"] == ["yes"]
    assert s["LimitNOFILE"] == ["65536"]
    assert s["MemoryMax"] and s["MemoryMax"][0] not in ("infinity", "")
    assert s["TasksMax"] and s["TasksMax"][0] not in ("infinity", "")


def test_the_service_keeps_a_low_systemd_security_exposure(tmp_path: Path) -> None:
    units = _stage(tmp_path)
    r = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            "--threshold=30",
            "--no-pager",
            str(units / "ca-watchdog.service"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, f"exposure above 3.0:\n{r.stdout[-600:]}{r.stderr}"


def test_the_guard_is_its_own_sandboxed_oneshot_that_the_ca_requires_and_follows() -> None:
    d = _settings(DROPIN.read_text())
    assert "[Unit]" in DROPIN.read_text() and "[Service]" not in DROPIN.read_text()
    assert d["Requires"] == ["ca-watchdog-guard@%i.service"]
    assert d["After"] == ["ca-watchdog-guard@%i.service"]
    assert "ExecStartPre" not in d and "ExecStart" not in d  # nothing runs in the CA's unit, nothing "+"
    g = _settings(GUARD_UNIT.read_text())
    assert g["Type"] == ["oneshot"] and "RemainAfterExit" not in g  # runs again at every CA start
    assert g["ExecStart"] == ["/usr/bin/ca-watchdog guard --config /etc/ca-watchdog/config.toml %i"]
    assert g["Before"] == ["pki-tomcatd@%i.service"]
    assert g["ProtectSystem"] == ["strict"]
    assert sorted(" ".join(g["ReadWritePaths"]).split()) == ["-/var/lib/ca-watchdog", "/etc/pki/%i/ca"]
    hidden = " ".join(g["InaccessiblePaths"]).split()
    for path in ("/etc/pki/%i/alias", "/etc/pki/%i/password.conf", "/etc/ca-watchdog/credentials"):
        assert f"-{path}" in hidden, path
    for key in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectHome", "PrivateMounts"):
        assert g[key] == ["yes"], key
    assert g["CapabilityBoundingSet"] == ["CAP_CHOWN"]
    assert "LoadCredential" not in g  # the guard reads no credential unless an etcd password is added


@pytest.mark.parametrize(
    ("what", "service_edit", "dropin_edit", "guard_edit"),
    [
        ("a missing executable", ("/usr/bin/ca-watchdog run", "/nonexistent/ca-watchdog run"), None, None),
        ("an unknown key", ("\n[Service]\n", "\n[Service]\nWatchdogSecs=30s\n"), None, None),
        ("a bad value", ("Type=notify", "Type=notifyy"), None, None),
        ("a bad capability", ("=CAP_CHOWN CAP_DAC_OVERRIDE", "=CAP_CHOWN CAP_DAC_OVERRIDES"), None, None),
        ("a broken guard unit", None, None, ("/usr/bin/ca-watchdog guard", "/nonexistent/ca-watchdog guard")),
        ("a guard with a bad capability", None, None, ("=CAP_CHOWN\n", "=CAP_CHOWNS\n")),
        ("a typo in the drop-in", None, ("\nRequires=", "\nRequire="), None),
        ("a drop-in that no longer requires the guard", None, ("\nRequires=", "\nWants="), None),
    ],
)
def test_verify_catches_a_broken_unit(
    tmp_path: Path,
    what: str,
    service_edit: tuple[str, str] | None,
    dropin_edit: tuple[str, str] | None,
    guard_edit: tuple[str, str] | None,
) -> None:
    service, dropin, guard = SERVICE.read_text(), DROPIN.read_text(), GUARD_UNIT.read_text()
    if service_edit:
        assert service_edit[0] in service
        service = service.replace(service_edit[0], service_edit[1], 1)
    if dropin_edit:
        assert dropin_edit[0] in dropin
        dropin = dropin.replace(dropin_edit[0], dropin_edit[1], 1)
    if guard_edit:
        assert guard_edit[0] in guard
        guard = guard.replace(guard_edit[0], guard_edit[1], 1)
    assert problems(_stage(tmp_path, service, dropin, guard)), f"verify did not notice {what}"
