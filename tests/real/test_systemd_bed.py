"""Runbook: the shipped units under a REAL systemd keep their promises.

The bed (``beds/systemd/bed.sh``, fixture ``systemd_bed``) is Debian 12 with systemd 252 as PID 1
of a systemd-nspawn container. It runs ``systemd/ca-watchdog.service`` and
``systemd/pki-tomcatd@.service.d/ca-watchdog.conf`` byte for byte as shipped, no test drop-in,
next to a stand-in ``pki-tomcatd@.service`` of Dogtag's shape (User=pkiuser, its own
ExecStartPre=) whose "Tomcat" is the lab's simulated CA. One CA host, ca1, SQLite store, every
[timing] key at its default (interval 2 s, ttl 30 s); ca2 is a member with nothing behind it,
the "other member" the guard can point at.

Every test starts from ``bed.reset()``: both units stopped, no store, a master CS.cfg, a fresh
credential. What a test shows is read from systemd itself (``systemctl show``, the journal),
not from the daemon's opinion of itself.

The watchdog check uses the shipped WatchdogSec=30s as it is (no drop-in lowering it): it costs
about 40 s of the file's 2-3 minutes, and it is the unit's own number that is verified.

The lease hand-off tests change the guard's sandbox only through a drop-in in /run (the store out
of its reach); the daemon's unit stays as shipped.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from systemd_bed import (
    CA_PORT,
    CA_UNIT,
    CONFIG,
    CREDENTIAL,
    CS_CFG,
    GUARD_UNIT,
    PEER_PORT,
    REPO,
    SERVICE,
    SystemdBed,
    wait_for,
)

pytestmark = [
    pytest.mark.real,
    # the first test's setup may build the tree (about a minute here, more on a slow mirror)
    pytest.mark.timeout(900),
]

SECURITY_LIMIT = 2.4  # `systemd-analyze security` exposure of ca-watchdog.service; 2.2 when written
GUARD_SECURITY_LIMIT = 2.0  # ... of ca-watchdog-guard@pki-tomcat.service; 1.9 when written
WATCHDOG_SEC = 30  # the shipped WatchdogSec=
RESTART_SEC = 5  # the shipped RestartSec=
TTL = 30  # [timing].ttl in the bed's config (the default)
STORE_DIR = "/var/lib/ca-watchdog"
LEASE_FILE = "/run/ca-watchdog/lease.json"  # node.lease_file (the default): the daemon's hand-off to the guard
GUARD = "ca-watchdog guard:"

# ---- steps the tests share ---------------------------------------------------------------------------


@pytest.fixture
def bed(systemd_bed: SystemdBed) -> SystemdBed:
    """The session's bed, reset to the known state."""
    systemd_bed.reset()
    return systemd_bed


def decisions(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The daemon's per-cycle decision lines (the ones with an ACTION field)."""
    return [r for r in records if "ACTION" in r and r.get("SYSLOG_IDENTIFIER") == "ca-watchdog"]


def pid1(records: list[dict[str, Any]], unit: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("_PID") == "1" and r.get("UNIT") == unit]


def first(records: list[dict[str, Any]], pred: Any, what: str) -> tuple[int, dict[str, Any]]:
    """Index and record of the first record matching ``pred``; a failure names ``what``."""
    for i, r in enumerate(records):
        if pred(r):
            return i, r
    shown = "\n  ".join(str(r.get("MESSAGE", ""))[:160] for r in records[-40:])
    pytest.fail(f"no journal record: {what}; the records were:\n  {shown}")


def mono(record: dict[str, Any]) -> float:
    return int(record["__MONOTONIC_TIMESTAMP"]) / 1e6


def healthy_master(bed: SystemdBed) -> None:
    """ca1 in charge, the README's order: the daemon first (bootstraps on the empty store), then the CA."""
    bed.systemctl("start", SERVICE)
    bed.systemctl("start", CA_UNIT)
    ok = wait_for(lambda: bed.prop(SERVICE, "StatusText").startswith("renew: healthy master"), 40)
    assert ok, f"ca1 never became a healthy master: {bed.prop(SERVICE, 'StatusText')!r}"


def store_says(bed: SystemdBed, master: str) -> int:
    """An empty store in which ``master`` holds the leader key (``ca-watchdog bootstrap``); its epoch.

    The directory is what StateDirectory= would make at the daemon's first start; the store file
    does not exist before that, and bootstrap does not create the directory.
    """
    bed.run("install", "-d", "-m", "0700", STORE_DIR)
    bed.ca_watchdog("bootstrap", "--config", CONFIG, "--master", master)
    st = bed.status_json()
    assert st["leader"] == master, st
    return int(st["epoch"])


def require(condition: bool, message: str) -> None:
    """A precondition of a test: a plain failure with the message."""
    if not condition:
        pytest.fail(message)


def stat(bed: SystemdBed, path: str) -> str:
    return bed.out("stat", "-c", "%U:%G:%a", path)


def probe_ca(bed: SystemdBed) -> dict[str, Any]:
    """``ca-watchdog probe agent`` of the bed's CA (what the daemon sees of it)."""
    p = bed.ca_watchdog(
        "probe", "agent", f"https://127.0.0.1:{CA_PORT}", "--cafile", "/etc/ca-watchdog/lab/ca.pem",
        "--cert", "/etc/ca-watchdog/lab/agent.pem", "--key", "/etc/ca-watchdog/lab/agent.key",
        check=False,
    )  # fmt: skip
    return json.loads(p.stdout)  # type: ignore[no-any-return]


# ---- the units as systemd loads them -------------------------------------------------------------------


def test_the_bed_runs_the_shipped_units_byte_for_byte_with_no_drop_in_on_the_daemon(bed: SystemdBed) -> None:
    shipped = {
        "etc/systemd/system/ca-watchdog.service": REPO / "systemd" / "ca-watchdog.service",
        "etc/systemd/system/ca-watchdog-guard@.service": REPO / "systemd" / "ca-watchdog-guard@.service",
        "etc/systemd/system/pki-tomcatd@.service.d/ca-watchdog.conf": REPO
        / "systemd"
        / "pki-tomcatd@.service.d"
        / "ca-watchdog.conf",
    }
    for in_bed, repo_file in shipped.items():
        assert (bed.root / in_bed).read_bytes() == repo_file.read_bytes(), f"/{in_bed} differs from {repo_file}"
    svc = bed.show(SERVICE, "FragmentPath", "DropInPaths", "LoadState")
    assert svc == {"FragmentPath": "/etc/systemd/system/ca-watchdog.service", "DropInPaths": "", "LoadState": "loaded"}
    ca = bed.show(CA_UNIT, "FragmentPath", "DropInPaths")
    assert ca["DropInPaths"] == "/etc/systemd/system/pki-tomcatd@.service.d/ca-watchdog.conf"
    guard = bed.show(GUARD_UNIT, "FragmentPath", "DropInPaths", "LoadState")
    assert guard == {
        "FragmentPath": "/etc/systemd/system/ca-watchdog-guard@.service",
        "DropInPaths": "",
        "LoadState": "loaded",
    }
    # the units' ExecStart= path is the distribution's; the bed links it to its venv, which holds
    # this checkout's code (bed.sh install reinstalls it every session)
    assert bed.out("readlink", "/usr/bin/ca-watchdog") == "/opt/cawd/bin/ca-watchdog"
    site = bed.out(
        "/opt/cawd/bin/python3", "-c", "import ca_watchdog, os; print(os.path.dirname(ca_watchdog.__file__))"
    )
    package = REPO / "daemon" / "ca_watchdog"
    stale = [
        str(f.relative_to(package))
        for f in package.rglob("*.py")
        if (bed.root / site.lstrip("/") / f.relative_to(package)).read_bytes() != f.read_bytes()
    ]
    assert stale == [], f"the bed runs other code than this checkout ({stale}): bed.sh install"


def test_systemd_analyze_verify_of_both_units_prints_nothing(bed: SystemdBed) -> None:
    # in the booted system, as installed: an unknown key or a bad value is only a warning (exit 0),
    # so any output at all is a failure
    p = bed.run("systemd-analyze", "verify", SERVICE, CA_UNIT, GUARD_UNIT, check=False)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", ""), f"verify: rc {p.returncode}\n{p.stdout}{p.stderr}"
    for template in ("pki-tomcatd@.service", "ca-watchdog-guard@.service"):
        p = bed.run("systemd-analyze", "verify", f"/etc/systemd/system/{template}", check=False)
        assert (p.returncode, p.stdout, p.stderr) == (0, "", ""), f"verify {template}: {p.stdout}{p.stderr}"


def exposure(bed: SystemdBed, unit: str) -> tuple[float, list[str]]:
    text = bed.out("systemd-analyze", "security", "--no-pager", unit)
    m = re.search(rf"Overall exposure level for {re.escape(unit)}: ([0-9.]+) (\w+)", text)
    assert m, f"no overall exposure line in:\n{text[-1500:]}"
    score = float(m.group(1))
    flagged = [re.sub(r"\s{2,}", "  ", line).strip() for line in text.splitlines() if line.startswith("✗")]
    bed.note(f"systemd-analyze security {unit}: {score} {m.group(2)} ({len(flagged)} settings flagged)")
    print("\n".join(flagged))
    return score, flagged


def test_security_exposure_of_ca_watchdog_service_is_no_worse_than_2_4(bed: SystemdBed) -> None:
    score, flagged = exposure(bed, SERVICE)
    assert score <= SECURITY_LIMIT, f"exposure {score} > {SECURITY_LIMIT}; flagged:\n" + "\n".join(flagged)


def test_security_exposure_of_the_guard_unit_is_no_worse_than_2_0(bed: SystemdBed) -> None:
    score, flagged = exposure(bed, GUARD_UNIT)
    assert score <= GUARD_SECURITY_LIMIT, f"exposure {score} > {GUARD_SECURITY_LIMIT}; flagged:\n" + "\n".join(flagged)


# ---- Type=notify -----------------------------------------------------------------------------------------


def test_the_unit_stays_activating_until_the_first_decision_and_is_active_right_after_it(bed: SystemdBed) -> None:
    # hold the first cycle: something accepts TCP on the CA's port and never answers TLS, so the
    # first probe takes [timing].agent_timeout (3 s) before the daemon can decide anything
    bed.run(
        "systemd-run", "--unit=sdbed-blackhole", "--quiet", "python3", "-c",
        "import socket, time\n"
        f"s = socket.create_server(('127.0.0.1', {CA_PORT}), backlog=16)\n"
        "time.sleep(600)",
    )  # fmt: skip
    try:
        assert wait_for(lambda: bed.run("ss", "-Hltn", f"sport = :{CA_PORT}").stdout.strip() != "", 10)
        c = bed.cursor()
        seen: list[tuple[float, str]] = []
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                seen.append((time.monotonic(), bed.is_active(SERVICE)))
                time.sleep(0.1)

        poller = threading.Thread(target=poll)
        poller.start()
        t0 = time.monotonic()
        start = bed.systemctl("start", SERVICE, check=False)
        took = time.monotonic() - t0
        status_at_ready = bed.prop(SERVICE, "StatusText")
        done.set()
        poller.join()
    finally:
        bed.run("systemctl", "stop", "sdbed-blackhole", check=False)
    assert start.returncode == 0, start.stderr
    ts = bed.show(SERVICE, "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    forked, active = (int(ts[k]) / 1e6 for k in ("ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic"))
    records = bed.journal(c)
    _, decided = first(decisions(records), lambda r: True, "the first decision line")
    bed.note(
        f"Type=notify: activating for {active - forked:.2f} s (first cycle held by a 3 s probe); "
        f"first decision -> active {1000 * (active - mono(decided)):+.1f} ms; `systemctl start` took {took:.2f} s"
    )
    assert "activating" in {s for _, s in seen}, f"never saw the unit activating: {seen}"
    assert active - forked >= 2.5, "active before the first cycle could have ended: READY=1 came too early"
    assert took >= 2.5, "`systemctl start` returned before the first cycle ended"
    # READY=1 is sent after the first cycle's line (the journal receives it over another socket:
    # allow it a little lag behind PID 1)
    assert mono(decided) <= active + 0.25, "the unit was active before the first decision was logged"
    assert active - mono(decided) < 1.0, "the unit became active long after the first decision"
    # the status read right after `systemctl start` returns: the first decision, or a later one when the next
    # cycle already ran (a failed probe answer wakes it at once: here the blackhole's timeout does)
    later = [r["MESSAGE"] for r in decisions(bed.journal(c)) if mono(r) >= mono(decided)]
    assert status_at_ready in later, f"at READY the status line was no decision of this start: {status_at_ready!r}"


def test_status_shows_the_last_decision_line(bed: SystemdBed) -> None:
    healthy_master(bed)

    def agree() -> bool:
        status = bed.prop(SERVICE, "StatusText")
        last = decisions(bed.journal(None, f"_SYSTEMD_UNIT={SERVICE}"))[-1]["MESSAGE"]
        return bool(status) and status == last

    assert wait_for(agree, 10), "StatusText never equalled the last decision line in the journal"
    status = bed.prop(SERVICE, "StatusText")
    assert re.fullmatch(r"renew: healthy master; lease renewed \(epoch \d+\)", status), status
    text = bed.systemctl("status", SERVICE).stdout
    assert re.search(r'^\s+Status: "renew: healthy master; lease renewed \(epoch \d+\)"$', text, re.M), text


# ---- WatchdogSec ---------------------------------------------------------------------------------------


def test_a_frozen_daemon_is_killed_by_the_watchdog_30s_after_its_last_ping_and_restarted(bed: SystemdBed) -> None:
    healthy_master(bed)
    assert bed.prop(SERVICE, "WatchdogUSec") == f"{WATCHDOG_SEC}s"
    frozen = bed.main_pid(SERVICE)
    c = bed.cursor()
    bed.run("kill", "-STOP", str(frozen))
    t_stop = time.monotonic()
    last_ping = int(bed.prop(SERVICE, "WatchdogTimestampMonotonic")) / 1e6  # no ping after SIGSTOP

    def pid1_says(text: str, timeout: float) -> dict[str, Any]:
        return bed.wait_for_message(c, lambda r: text in r["MESSAGE"], timeout, "_PID=1", f"UNIT={SERVICE}")

    expired = pid1_says(f"Watchdog timeout (limit {WATCHDOG_SEC}s)!", WATCHDOG_SEC + 15)
    pid1_says(f"Killing process {frozen} (ca-watchdog) with signal SIGABRT", 5)
    failed = pid1_says("Failed with result 'watchdog'", 10)
    scheduled = pid1_says("Scheduled restart job", RESTART_SEC + 10)
    assert wait_for(lambda: bed.main_pid(SERVICE) not in (0, frozen) and bed.is_active(SERVICE) == "active", 30)
    back = time.monotonic() - t_stop
    killed_after = mono(expired) - last_ping
    records = bed.journal(c)
    restarted_ca = [r for r in pid1(records, CA_UNIT) if r["MESSAGE"].startswith("Stopping ")]
    bed.note(
        f"WatchdogSec={WATCHDOG_SEC}s: SIGABRT {killed_after:.1f} s after the last ping, restart scheduled "
        f"{mono(scheduled) - mono(failed):.1f} s later, active again {back:.1f} s after SIGSTOP; "
        f"the restarted daemon restarted the CA: {'yes' if restarted_ca else 'no'}"
    )
    assert WATCHDOG_SEC - 0.5 <= killed_after <= WATCHDOG_SEC + 1.5
    assert RESTART_SEC - 0.5 <= mono(scheduled) - mono(failed) <= RESTART_SEC + 1.5
    assert bed.prop(SERVICE, "NRestarts") == "1"
    # the kill is the daemon's cgroup only: the CA was not stopped by it (a stop, if any, comes from
    # the new daemon, after its start)
    _, started_again = first(
        pid1(records, SERVICE), lambda r: mono(r) > mono(scheduled) and r["MESSAGE"].startswith("Started "),
        "the restarted daemon's Started line",
    )  # fmt: skip
    assert all(mono(r) > mono(started_again) for r in restarted_ca), "the watchdog kill stopped the CA"


# ---- LoadCredential ------------------------------------------------------------------------------------


def test_the_credential_arrives_in_credentials_directory_readable_only_by_root(bed: SystemdBed) -> None:
    bed.systemctl("start", SERVICE)
    pid = bed.main_pid(SERVICE)
    environ = dict(kv.split("=", 1) for kv in bed.out("cat", f"/proc/{pid}/environ").split("\0") if "=" in kv)
    creds = environ.get("CREDENTIALS_DIRECTORY")
    assert creds == f"/run/credentials/{SERVICE}", environ
    # seen from inside the daemon's own mount namespace
    inside = bed.run("nsenter", "-t", str(pid), "-m", "cat", f"{creds}/ldap-password").stdout
    assert inside == bed.read(CREDENTIAL) != ""
    mode = bed.out("nsenter", "-t", str(pid), "-m", "stat", "-c", "%a %U:%G", f"{creds}/ldap-password")
    assert mode == "400 root:root"
    fs = bed.out("nsenter", "-t", str(pid), "-m", "findmnt", "-n", "-o", "FSTYPE,OPTIONS", "-T", creds)
    assert fs.split()[0] in ("ramfs", "tmpfs") and "ro" in fs.split()[1].split(","), fs


def test_the_unit_refuses_to_start_when_the_credential_file_is_missing(bed: SystemdBed) -> None:
    bed.run("mv", CREDENTIAL, "/root/ldap-password.away")
    try:
        c = bed.cursor()
        p = bed.systemctl("start", SERVICE, check=False)
        # Restart=on-failure would try again every RestartSec= (10 times); an explicit stop ends that
        bed.systemctl("stop", SERVICE)
    finally:
        bed.run("mv", "/root/ldap-password.away", CREDENTIAL)
    assert p.returncode != 0, "systemctl start succeeded without the credential file"
    records = bed.journal(c)
    first(
        records, lambda r: "Main process exited, code=exited, status=243/CREDENTIALS" in r["MESSAGE"],
        "PID 1 reports exit status 243/CREDENTIALS",
    )  # fmt: skip
    assert decisions(records) == [], "the daemon ran a cycle without its credential"
    # once the file is back, the same unit starts
    bed.systemctl("reset-failed", SERVICE, check=False)  # (it may be unloaded already: inactive)
    bed.systemctl("start", SERVICE)
    assert bed.is_active(SERVICE) == "active"


# ---- the guard drop-in -----------------------------------------------------------------------------------


# "; lease hand-off: ..." when the daemon holds the key and has handed it over in LEASE_FILE
GUARD_LEFT_MASTER = re.compile(
    rf"{GUARD} ca1 holds the leader key \(epoch (\d+)\)(?:; lease hand-off: epoch (\d+), renewed [0-9.]+s ago)? "
    r"\[.*\]: CS\.cfg left as master"
)


def is_pid1(r: dict[str, Any], unit: str, start: str) -> bool:
    return r["_PID"] == "1" and r.get("UNIT") == unit and r["MESSAGE"].startswith(start)


@contextlib.contextmanager
def guard_dropin(bed: SystemdBed, name: str, service_lines: str) -> Iterator[None]:
    """A test drop-in in the guard unit's [Service] (in /run: bed.reset() removes it too)."""
    dropin = f"/run/systemd/system/{GUARD_UNIT}.d"
    bed.run("mkdir", "-p", dropin)
    bed.run("tee", f"{dropin}/{name}.conf", input=f"[Service]\n{service_lines}\n")
    bed.systemctl("daemon-reload")
    try:
        yield
    finally:
        bed.run("rm", "-f", f"{dropin}/{name}.conf")
        bed.systemctl("daemon-reload")


def guard_line(bed: SystemdBed, cursor: str) -> str:
    """The guard's one line after ``cursor``."""
    _, line = first(bed.unit_log(cursor, GUARD_UNIT), lambda r: r["MESSAGE"].startswith(GUARD), "the guard's line")
    return str(line["MESSAGE"])


def test_the_guard_runs_in_its_own_sandboxed_unit_before_the_ca_at_every_start(bed: SystemdBed) -> None:
    # the CA's unit requires the guard's and is ordered after it; it runs nothing of ca-watchdog
    # itself, and nothing with full privileges ("+")
    deps = bed.show(CA_UNIT, "Requires", "After")
    assert GUARD_UNIT in deps["Requires"].split() and GUARD_UNIT in deps["After"].split(), deps
    pre = bed.prop_lines(CA_UNIT, "ExecStartPreEx")
    assert len(pre) == 1 and "argv[]=/bin/echo stand-in" in pre[0] and "privileged" not in pre[0], pre
    sandbox = bed.show(
        GUARD_UNIT, "Type", "ProtectSystem", "NoNewPrivileges", "CapabilityBoundingSet", "ReadWritePaths",
        "InaccessiblePaths", "User", "SupplementaryGroups",
    )  # fmt: skip
    assert sandbox == {
        "Type": "oneshot",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "cap_chown",
        "ReadWritePaths": "/etc/pki/pki-tomcat/ca -/var/lib/ca-watchdog",
        "InaccessiblePaths": "-/etc/pki/pki-tomcat/alias -/etc/pki/pki-tomcat/password.conf"
        " -/etc/ca-watchdog/credentials",
        "User": "",
        "SupplementaryGroups": "pkiuser",
    }, sandbox
    epoch = store_says(bed, "ca1")
    before = (bed.read(CS_CFG), stat(bed, CS_CFG))
    c = bed.cursor()
    bed.systemctl("start", CA_UNIT)
    assert wait_for(lambda: any("listening on" in m for m in bed.messages(c, f"_SYSTEMD_UNIT={CA_UNIT}")), 15)
    log = bed.unit_log(c, GUARD_UNIT, CA_UNIT)
    i_gstart, _ = first(log, lambda r: is_pid1(r, GUARD_UNIT, "Starting "), "PID 1 starting the guard")
    i_guard, guard = first(log, lambda r: r["MESSAGE"].startswith(GUARD), "the guard's line")
    i_gdone, _ = first(log, lambda r: is_pid1(r, GUARD_UNIT, "Finished "), "PID 1: the guard finished")
    i_starting, _ = first(log, lambda r: is_pid1(r, CA_UNIT, "Starting "), "PID 1 starting the CA")
    _, own = first(log, lambda r: r["MESSAGE"].startswith("stand-in pki-tomcatd@pki-tomcat: own"), "own pre")
    i_started, _ = first(log, lambda r: is_pid1(r, CA_UNIT, "Started "), "Started")
    i_ca, ca = first(log, lambda r: r["MESSAGE"].startswith("simca ca1 listening on"), "the CA's first line")
    # the whole guard unit is over before PID 1 even begins the CA's start. (Not compared: the CA's own
    # ExecStartPre= line with PID 1's "Starting": journald reads them from two sockets, and under load
    # records a line a process printed right after PID 1's before PID 1's.)
    assert i_gstart < i_guard < i_gdone < i_starting < i_started < i_ca, [r["MESSAGE"][:80] for r in log]
    assert own["_SYSTEMD_UNIT"] == CA_UNIT
    assert guard["_SYSTEMD_UNIT"] == GUARD_UNIT and ca["_SYSTEMD_UNIT"] == CA_UNIT
    left = GUARD_LEFT_MASTER.fullmatch(guard["MESSAGE"])
    assert left and left[2] is None, guard["MESSAGE"]  # no daemon ran: no hand-off, the store alone
    # when this member holds the key the CA starts as master and CS.cfg is not touched
    assert (bed.read(CS_CFG), stat(bed, CS_CFG)) == before
    assert bed.out("sh", "-c", f"ls {CS_CFG}.*.ca-watchdog 2>/dev/null || true") == "", "a backup was written"
    assert "role=master" in ca["MESSAGE"]
    assert bed.status_json()["epoch"] == epoch
    # root for the guard, pkiuser for the CA itself
    pkiuser = bed.out("id", "-u", "pkiuser")
    assert (guard["_UID"], ca["_UID"]) == ("0", pkiuser)
    assert bed.is_active(GUARD_UNIT) == "inactive"  # a oneshot without RemainAfterExit: done
    # a restart of the CA runs the guard again, before the CA's new start
    c = bed.cursor()
    bed.systemctl("restart", CA_UNIT)
    log = bed.unit_log(c, GUARD_UNIT, CA_UNIT)
    i_guard, _ = first(log, lambda r: r["MESSAGE"].startswith(GUARD), "the guard's line at the restart")
    i_starting, _ = first(log, lambda r: is_pid1(r, CA_UNIT, "Starting "), "PID 1 starting the CA again")
    assert i_guard < i_starting


def test_the_guard_sandbox_hides_keys_and_credentials_and_lets_it_write_only_the_ca_directory(
    bed: SystemdBed,
) -> None:
    """What the guard's processes can do, seen from inside its sandbox: a test drop-in adds an
    ExecStartPre= to the guard unit (it runs with the unit's sandbox, before the guard itself)."""
    inst = "/etc/pki/pki-tomcat"
    bed.sh(f"install -d -m 0700 -o pkiuser -g pkiuser {inst}/alias && echo nss-key >{inst}/alias/key4.db"
           f" && echo internal=sdbed-nss-pin >{inst}/password.conf && chown pkiuser: {inst}/password.conf")  # fmt: skip
    probe = f"""\
for f in /etc/ca-watchdog/credentials/ldap-password {inst}/alias/key4.db {inst}/password.conf; do
  if cat "$f" >/dev/null 2>&1; then echo "PROBE read $f: yes"; else echo "PROBE read $f: no"; fi
done
for d in {inst}/ca {inst} /etc/ca-watchdog /etc /usr/bin; do
  if touch "$d/.p" 2>/dev/null; then rm -f "$d/.p"; echo "PROBE write $d: yes"; else echo "PROBE write $d: no"; fi
done
grep -E '^(CapBnd|CapEff|NoNewPrivs):' /proc/self/status | sed 's/^/PROBE /'
echo "PROBE groups: $(id -Gn)"
"""
    script = "/usr/local/lib/sdbed-guard-probe.sh"
    bed.run("tee", script, input=probe)
    try:
        with guard_dropin(bed, "probe", f"ExecStartPre=/bin/sh {script}"):
            store_says(bed, "ca1")
            c = bed.cursor()
            bed.systemctl("start", CA_UNIT)
        lines = [m.removeprefix("PROBE ") for m in bed.messages(c, f"_SYSTEMD_UNIT={GUARD_UNIT}") if m[:6] == "PROBE "]
        seen = {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}
    finally:
        bed.run("rm", "-rf", script, f"{inst}/alias", f"{inst}/password.conf")
    caps = {k: v for k, v in seen.items() if k in ("CapBnd", "CapEff", "NoNewPrivs")}
    seen = {k: v for k, v in seen.items() if k not in caps}
    assert seen == {
        "read /etc/ca-watchdog/credentials/ldap-password": "no",
        f"read {inst}/alias/key4.db": "no",
        f"read {inst}/password.conf": "no",
        f"write {inst}/ca": "yes",
        f"write {inst}": "no",
        "write /etc/ca-watchdog": "no",
        "write /etc": "no",
        "write /usr/bin": "no",
        "groups": "root pkiuser",
    }, seen
    # CAP_CHOWN (bit 0) only, no new privileges
    assert (int(caps["CapBnd"], 16), int(caps["CapEff"], 16), caps["NoNewPrivs"]) == (1, 1, "1"), caps
    assert bed.is_active(CA_UNIT) == "active"  # and the guard itself still did its job


def test_the_guard_demotes_a_master_cscfg_when_another_member_holds_the_key(bed: SystemdBed) -> None:
    store_says(bed, "ca2")
    assert bed.cscfg()["role"] == "master"
    original, owner_mode = bed.read(CS_CFG), stat(bed, CS_CFG)
    assert owner_mode == "pkiuser:pkiuser:660"
    c = bed.cursor()
    bed.systemctl("start", CA_UNIT)
    assert wait_for(lambda: any("listening on" in m for m in bed.messages(c, f"_SYSTEMD_UNIT={CA_UNIT}")), 15)
    log = bed.unit_log(c, GUARD_UNIT, CA_UNIT)
    i_guard, guard = first(log, lambda r: r["MESSAGE"].startswith(GUARD), "the guard's line")
    i_starting, _ = first(log, lambda r: is_pid1(r, CA_UNIT, "Starting "), "PID 1 starting the CA")
    i_ca, ca = first(log, lambda r: r["MESSAGE"].startswith("simca ca1 listening on"), "the CA's first line")
    assert guard["_SYSTEMD_UNIT"] == GUARD_UNIT
    assert re.fullmatch(
        rf"{GUARD} ca2 holds the leader key \(epoch \d+\) \[.*\]: "
        r"CS\.cfg was master, now a clone of ca2 \(backup (\S+)\)",
        guard["MESSAGE"],
    ), guard["MESSAGE"]
    backup = guard["MESSAGE"].rsplit("(backup ", 1)[1].rstrip(")")
    cfg = bed.cscfg()
    assert (cfg["role"], cfg["master_agent"]) == ("clone", f"127.0.0.1:{PEER_PORT}"), cfg
    # written from the sandbox with CAP_CHOWN only: owner, group and mode kept, on the backup too
    assert stat(bed, CS_CFG) == owner_mode, "the guard changed CS.cfg's owner or mode"
    assert stat(bed, backup) == owner_mode, "the backup does not have CS.cfg's owner or mode"
    assert bed.read(backup) == original, "the backup is not the master CS.cfg"
    # the CA read the clone CS.cfg: it starts as a clone of ca2
    assert i_guard < i_starting < i_ca and "role=clone" in ca["MESSAGE"], ca["MESSAGE"]
    assert wait_for(lambda: probe_ca(bed)["status"] == "running", 15)
    info = probe_ca(bed)["info"]
    assert (info["master_host"], info["master_port"]) == ("127.0.0.1", PEER_PORT), info


def test_a_guard_that_cannot_write_cscfg_keeps_the_ca_from_starting(bed: SystemdBed) -> None:
    store_says(bed, "ca2")
    d = CS_CFG.rsplit("/", 1)[0]
    bed.sh(f"mount --bind {d} {d} && mount -o remount,bind,ro {d}")
    try:
        c = bed.cursor()
        p = bed.systemctl("start", CA_UNIT, check=False)
    finally:
        bed.run("umount", d)
    assert p.returncode != 0, "the CA started although the guard could not demote CS.cfg"
    log = bed.unit_log(c, GUARD_UNIT, CA_UNIT)
    _, guard = first(log, lambda r: r["MESSAGE"].startswith(GUARD), "the guard's line")
    assert guard["MESSAGE"].endswith("refusing to let the CA start"), guard["MESSAGE"]
    assert "Read-only file system" in guard["MESSAGE"], guard["MESSAGE"]
    first(log, lambda r: is_pid1(r, GUARD_UNIT, "Failed to start "), "PID 1: the guard unit failed")
    first(log, lambda r: is_pid1(r, CA_UNIT, "Dependency failed for "), "PID 1: the CA's start failed on it")
    assert not any(is_pid1(r, CA_UNIT, "Starting ") for r in log), "PID 1 began starting the CA"
    assert not any(r["MESSAGE"].startswith(("simca", "stand-in")) for r in log), "a CA process ran"
    assert bed.cscfg()["role"] == "master"  # unchanged, and never served
    assert bed.is_active(CA_UNIT) != "active"
    assert bed.prop(GUARD_UNIT, "Result") == "exit-code"


# ---- the lease hand-off: the daemon's proof of its lease, for the guard, in /run ----------------------


def test_the_key_holder_hands_its_lease_to_the_sandboxed_guard_in_a_root_only_file_on_run(bed: SystemdBed) -> None:
    """The daemon holds the key: /run/ca-watchdog (RuntimeDirectory=, 0700) holds lease.json (0600),
    its name and epoch; a `systemctl restart` of the CA runs the guard, which reads it through its
    sandbox (ProtectSystem=strict, CAP_CHOWN only). No proof outlives the daemon."""
    healthy_master(bed)
    epoch = int(bed.status_json()["epoch"])
    assert bed.out("stat", "-c", "%U:%G:%a:%F", LEASE_FILE.rsplit("/", 1)[0]) == "root:root:700:directory"
    assert bed.out("stat", "-c", "%U:%G:%a:%F", LEASE_FILE) == "root:root:600:regular file"
    proof = json.loads(bed.out("cat", LEASE_FILE))
    assert (proof["name"], proof["epoch"]) == ("ca1", epoch), proof
    before = (bed.read(CS_CFG), stat(bed, CS_CFG))
    c = bed.cursor()
    bed.systemctl("restart", CA_UNIT)
    line = guard_line(bed, c)
    m = re.fullmatch(
        rf"{GUARD} ca1 holds the leader key \(epoch {epoch}\); lease hand-off: epoch {epoch}, "
        r"renewed ([0-9.]+)s ago \[.*\]: CS\.cfg left as master",
        line,
    )
    assert m, f"the guard did not use the hand-off: {line}"
    bed.note(f"lease hand-off read by the sandboxed guard at a CA restart: renewed {m[1]} s before")
    assert float(m[1]) < 5, "the daemon renews every 2 s (interval): the proof should be that fresh"
    assert (bed.read(CS_CFG), stat(bed, CS_CFG)) == before
    bed.systemctl("stop", SERVICE)
    gone = bed.run("test", "-e", LEASE_FILE.rsplit("/", 1)[0], check=False).returncode != 0
    assert gone, "/run/ca-watchdog outlived the daemon (RuntimeDirectory= removes it at the stop)"


def test_a_store_the_guard_cannot_reach_keeps_the_key_holders_ca_master_by_the_hand_off_and_demotes_it_without(
    bed: SystemdBed,
) -> None:
    """The store is out of the guard's reach only (a test drop-in: InaccessiblePaths= on the store's
    directory; the daemon still renews). A CA restart while the daemon holds the key: the hand-off
    proves the lease, CS.cfg stays master. The daemon stopped (its /run directory goes with it), the
    same restart: nothing proves a lease, the master CS.cfg becomes a clone of ca2."""
    healthy_master(bed)
    epoch = int(bed.status_json()["epoch"])
    before = (bed.read(CS_CFG), stat(bed, CS_CFG))
    unreachable = rf"{GUARD} store unreachable \({STORE_DIR}/state\.db: Permission denied\)"
    with guard_dropin(bed, "no-store", f"InaccessiblePaths={STORE_DIR}"):
        c = bed.cursor()
        bed.systemctl("restart", CA_UNIT)
        line = guard_line(bed, c)
        kept = rf"{unreachable}; lease hand-off: epoch {epoch}, renewed [0-9.]+s ago \[.*\]: CS\.cfg left as master"
        assert re.fullmatch(kept, line), line
        assert (bed.read(CS_CFG), stat(bed, CS_CFG)) == before
        assert bed.out("sh", "-c", f"ls {CS_CFG}.*.ca-watchdog 2>/dev/null || true") == "", "a backup was written"
        assert wait_for(lambda: any("role=master" in m for m in bed.messages(c, f"_SYSTEMD_UNIT={CA_UNIT}")), 15)

        bed.systemctl("stop", SERVICE)
        assert bed.run("test", "-e", LEASE_FILE, check=False).returncode != 0, "the hand-off outlived the daemon"
        c = bed.cursor()
        bed.systemctl("restart", CA_UNIT)
        line = guard_line(bed, c)
    demoted = rf"{unreachable} \[.*\]: CS\.cfg was master, now a clone of ca2 \(backup \S+\)"
    assert re.fullmatch(demoted, line), line
    cfg = bed.cscfg()
    assert (cfg["role"], cfg["master_agent"]) == ("clone", f"127.0.0.1:{PEER_PORT}"), cfg


# ---- stop ------------------------------------------------------------------------------------------------


def test_stopping_ca_watchdog_leaves_the_ca_running(bed: SystemdBed) -> None:
    healthy_master(bed)
    ca_pid = bed.main_pid(CA_UNIT)
    c = bed.cursor()
    t0 = time.monotonic()
    bed.systemctl("stop", SERVICE)
    took = time.monotonic() - t0
    assert bed.is_active(SERVICE) == "inactive"
    assert bed.prop(SERVICE, "Result") == "success"
    assert "stopping" in bed.messages(c, f"_SYSTEMD_UNIT={SERVICE}"), "the daemon did not log its SIGTERM handling"
    assert took < 10, f"stop took {took:.1f} s"
    time.sleep(2)  # a cycle's worth: nothing stops the CA later either
    assert (bed.is_active(CA_UNIT), bed.main_pid(CA_UNIT)) == ("active", ca_pid)
    assert probe_ca(bed)["status"] == "running"
    assert pid1(bed.journal(c), CA_UNIT) == [], "PID 1 did something to the CA unit"


# ---- a promotion, end to end, and the journal fields -----------------------------------------------


@pytest.fixture(scope="module")
def promotion(systemd_bed: SystemdBed) -> dict[str, Any]:
    """ca2 holds the key (nothing renews it); ca1's CA starts (guard: clone of ca2), then its daemon
    waits for ca2's lease to end, takes the key and promotes ca1 through systemctl."""
    bed = systemd_bed
    bed.reset()
    old_epoch = store_says(bed, "ca2")
    c = bed.cursor()
    bed.systemctl("start", CA_UNIT)
    bed.systemctl("start", SERVICE)
    t0 = time.monotonic()
    done = bed.wait_for_message(
        c, lambda r: r["MESSAGE"].startswith("promotion done"), TTL + 60, f"_SYSTEMD_UNIT={SERVICE}"
    )
    took = time.monotonic() - t0
    assert wait_for(lambda: bed.prop(SERVICE, "StatusText").startswith("renew: healthy master"), 30)
    bed.note(f"promotion after ca2's lease ended: {done['MESSAGE']} ({took:.1f} s after the daemon's start)")
    return {
        "cursor": c,
        "old_epoch": old_epoch,
        "records": bed.journal(c),
        "status": bed.status_json(),
        "cscfg": bed.cscfg(),
        "stat": stat(bed, CS_CFG),
        "daemon_pid": str(bed.main_pid(SERVICE)),
        "capbnd": bed.prop(SERVICE, "CapabilityBoundingSet"),
        "proc_capbnd": bed.out("awk", "/^CapBnd:/ {print $2}", f"/proc/{bed.main_pid(SERVICE)}/status"),
        # after the cursor: the bed's journal is persistent, and a daemon of an earlier boot (earlier
        # session) may have had the same PID and promoted to the same epoch
        "journal_promote": lambda epoch: bed.journal(
            c, f"_SYSTEMD_UNIT={SERVICE}", "ACTION=promote", f"EPOCH={epoch}", "MEMBER=ca1"
        ),
    }


def test_the_daemon_promotes_its_ca_through_systemctl_from_inside_its_sandbox(promotion: dict[str, Any]) -> None:
    records, st = promotion["records"], promotion["status"]
    _, waited = first(decisions(records), lambda r: r["ACTION"] == "wait", "a wait line while ca2 held the key")
    assert waited["MESSAGE"] == f"wait: clone of ca2 (epoch {promotion['old_epoch']})", waited["MESSAGE"]
    i_promote, promote = first(records, lambda r: r.get("ACTION") == "promote", "the promote decision")
    assert promote["MESSAGE"] == "promote: ca2's lease ended; elected ca1 from ca1", promote["MESSAGE"]
    after = records[i_promote:]
    # the sandboxed daemon stopped and started pki-tomcatd@ (PID 1 did it), and the guard agreed
    first(pid1(after, CA_UNIT), lambda r: r["MESSAGE"].startswith("Stopping "), "PID 1 stopping the CA")
    first(pid1(after, CA_UNIT), lambda r: r["MESSAGE"].startswith("Started "), "PID 1 starting the CA again")
    _, guard = first(after, lambda r: bool(GUARD_LEFT_MASTER.fullmatch(r["MESSAGE"])), "the guard leaving master")
    # the store answered, and the daemon had handed the guard the key it had just taken
    new_epoch = str(promotion["old_epoch"] + 1)
    left = GUARD_LEFT_MASTER.fullmatch(guard["MESSAGE"])
    assert left and left.groups() == (new_epoch, new_epoch), guard["MESSAGE"]
    first(after, lambda r: "listening on" in r["MESSAGE"] and "role=master" in r["MESSAGE"], "the CA as master")
    assert (st["leader"], st["epoch"]) == ("ca1", promotion["old_epoch"] + 1), st
    assert promotion["cscfg"]["role"] == "master"
    assert promotion["stat"] == "pkiuser:pkiuser:660", "the daemon's write changed CS.cfg's owner or mode"
    # ... written by a daemon without CAP_FOWNER (issue 10: mode and label before fchown)
    assert promotion["capbnd"] == "cap_chown cap_dac_override", promotion["capbnd"]
    assert not int(promotion["proc_capbnd"], 16) & (1 << 3), promotion["proc_capbnd"]  # CAP_FOWNER = 3


def test_journalctl_finds_the_promote_line_by_action_and_the_epoch_it_created(promotion: dict[str, Any]) -> None:
    # the operator's query: `journalctl -u ca-watchdog ACTION=promote EPOCH=N` for the epoch the
    # member holds after the promotion. The decision line is logged when the promotion is decided,
    # before its task takes the key (so it carries the epoch in force then: 0, the key was free); the
    # line the query must find is the task's, logged as it takes the key, with the epoch it created.
    epoch = promotion["status"]["epoch"]
    found = [r for r in promotion["journal_promote"](epoch) if r["_PID"] == promotion["daemon_pid"]]
    promote_lines = [r for r in decisions(promotion["records"]) if r["ACTION"] == "promote"]
    logged = [(r["_PID"], r["EPOCH"], r["MESSAGE"]) for r in promote_lines]
    assert found, f"`journalctl ACTION=promote EPOCH={epoch}` finds nothing; the promote lines carry {logged}"
    assert [r["MESSAGE"] for r in found] == [f"promote: took the key (epoch {epoch}, automatic)"], logged
    # ... and it leads to this promotion's reason: the promote line just before it is the decision
    cursors = [r["__CURSOR"] for r in promote_lines]
    i_took = cursors.index(found[0]["__CURSOR"])  # in the fixture's records: it came before "promotion done"
    decided = (promotion["daemon_pid"], "promote: ca2's lease ended; elected ca1 from ca1")
    assert i_took >= 1 and logged[i_took - 1][0::2] == decided, logged


def test_journalctl_finds_the_bootstrap_line_by_action_and_the_epoch_it_created(bed: SystemdBed) -> None:
    c = bed.cursor()
    bed.systemctl("start", SERVICE)  # empty store, master CS.cfg: the first cycle bootstraps ca1
    pid = str(bed.main_pid(SERVICE))
    st = bed.status_json()
    require((st["leader"], st["epoch"]) == ("ca1", 1), f"the daemon did not bootstrap ca1 at epoch 1: {st}")
    _, line = first(decisions(bed.journal(c)), lambda r: r["ACTION"] == "bootstrap", "the bootstrap line")
    require((line["MEMBER"], line["_PID"]) == ("ca1", pid), f"the bootstrap line is not this daemon's: {line}")
    # the renewals after it carry the epoch
    renewed = wait_for(lambda: bed.journal(c, f"_SYSTEMD_UNIT={SERVICE}", "ACTION=renew", "EPOCH=1") != [], 10)
    require(renewed, "no renew line with EPOCH=1")
    # the operator's query, for the epoch the member holds after the bootstrap
    # (after the cursor: the journal is persistent, an earlier boot's daemon may have had this PID)
    found = bed.journal(c, f"_SYSTEMD_UNIT={SERVICE}", "ACTION=bootstrap", "EPOCH=1", "MEMBER=ca1")
    assert [r for r in found if r["_PID"] == pid], (
        f"`journalctl ACTION=bootstrap EPOCH=1` finds nothing; the line carries EPOCH={line['EPOCH']}"
    )
