#!/usr/bin/env python3
"""Measurements on the real-Dogtag bed (results in ../NOTES.md). Run as root from the repo:

    .venv/bin/python beds/dogtag/experiments/measure.py startstop [--runs 3]
    .venv/bin/python beds/dogtag/experiments/measure.py reload --method enable|touch

startstop: per CA and run, `bed.sh ca-stop` (time until the JVM is gone), then `bed.sh ca-start`
(time until it returns) while getStatus is polled on https and http (every ~0.1 s, 1 s timeout);
every change of what a client sees is printed with its time after the start command.

reload: can a role change reload only the CA web application instead of restarting Tomcat?
Both CRL issuing points get autoUpdateInterval=1 (minutes; full restart, the baseline), then the
master is demoted and the clone promoted, each by editing CS.cfg while its CA webapp is
undeployed and deployed again in the running Tomcat:
  --method enable: `pki-server subsystem-disable -i INST ca`, edit, `pki-server subsystem-enable`
  --method touch:  edit, then touch conf/Catalina/localhost/ca.xml (Tomcat's autoDeploy redeploys)
Then: updateCRL on both, LDAP crlNumber, 'CRL update' lines in the debug logs over 2.5 minutes,
and a JVM thread dump (SIGQUIT) of each for CRLIssuingPoint threads. At the end the original roles
are put back (CS.cfg edits + a full restart of both CAs).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests" / "real"))
from dogtag_bed import DogtagBed

MASTER, CLONE = "pki-tomcat", "pki-tomcat-clone"
bed = DogtagBed()


def now() -> str:
    return datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]


def log(msg: str) -> None:
    print(f"{now()} {msg}", flush=True)


def chroot(*argv: str) -> subprocess.CompletedProcess[str]:
    env = ["env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"]
    return subprocess.run(["chroot", str(bed.root), *env, *argv], capture_output=True, text=True, check=False)


def seen(inst: str, https: bool) -> str:
    st = bed.get_status(inst, timeout=1, https=https)
    if st.running:
        return "running"
    if st.status:
        return f"status {st.status}"
    return st.error or "?"


def poll_until_running(inst: str, t0: float, timeout: float = 180) -> float:
    """Print every change of (https, http) getStatus until https says running; seconds after t0."""
    last = None
    while time.monotonic() - t0 < timeout:
        cur = (seen(inst, True), seen(inst, False))
        if cur != last:
            log(f"  +{time.monotonic() - t0:6.2f} s  https: {cur[0]:<10} http: {cur[1]}")
            last = cur
        if cur[0] == "running":
            return time.monotonic() - t0
        time.sleep(0.1)
    raise TimeoutError(f"{inst} not running after {timeout} s")


def startstop(runs: int) -> None:
    bed.ensure_running()
    for inst in (CLONE, MASTER):
        for run in range(1, runs + 1):
            t = time.monotonic()
            bed.stop_ca(inst)
            stop_s = time.monotonic() - t
            t0 = time.monotonic()
            proc = subprocess.Popen(bed.ca_start_command(inst), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            log(f"{inst} run {run}: stop took {stop_s:.2f} s; start command issued")
            returned = None
            last = None
            while True:
                if returned is None and proc.poll() is not None:
                    returned = time.monotonic() - t0
                    log(f"  +{returned:6.2f} s  start command returned ({proc.returncode})")
                cur = (seen(inst, True), seen(inst, False))
                if cur != last:
                    log(f"  +{time.monotonic() - t0:6.2f} s  https: {cur[0]:<10} http: {cur[1]}")
                    last = cur
                if cur[0] == "running":
                    break
                if time.monotonic() - t0 > 180:
                    raise TimeoutError(inst)
                time.sleep(0.1)
            proc.wait()
            log(
                f"RESULT {inst} run {run}: stop {stop_s:.2f} s, start returned {returned or 0:.2f} s, "
                f"running {time.monotonic() - t0:.2f} s"
            )


# ---- CS.cfg role edits (README "Manual failover") --------------------------------------------


def read_lines(inst: str) -> list[str]:
    return bed.ca(inst).cs_cfg.read_text().splitlines(keepends=True)


def write_lines(inst: str, lines: list[str]) -> None:
    with bed.ca(inst).cs_cfg.open("r+") as f:  # in place: owner and mode stay
        f.write("".join(lines))
        f.truncate()


def key_of(line: str) -> str:
    return line.split("=", 1)[0] if "=" in line and not line.startswith("#") else ""


def set_keys(lines: list[str], want: dict[str, str], drop: frozenset[str] = frozenset()) -> list[str]:
    out: list[str] = []
    done: set[str] = set()
    for line in lines:
        k = key_of(line)
        if k in drop:
            continue
        if k in want:
            line = f"{k}={want[k]}\n"
            done.add(k)
        out.append(line)
    out.extend(f"{k}={v}\n" for k, v in want.items() if k not in done)
    return out


def issuing_points(lines: list[str]) -> list[str]:
    return sorted({m.group(1) for ln in lines if (m := re.match(r"ca\.crl\.([^.=]+)\.enable=", ln))})


def demote(lines: list[str], master_host: str, master_port: int) -> list[str]:
    want = {}
    for ip in issuing_points(lines):
        want[f"ca.crl.{ip}.enableCRLCache"] = want[f"ca.crl.{ip}.enableCRLUpdates"] = "false"
    want |= {
        "ca.certStatusUpdateInterval": "0",
        "ca.listenToCloneModifications": "false",
        "master.ca.agent.host": master_host,
        "master.ca.agent.port": str(master_port),
    }
    return set_keys(lines, want)


def promote(lines: list[str], crl_block: list[str]) -> list[str]:
    first = next(i for i, ln in enumerate(lines) if key_of(ln).startswith("ca.crl."))
    rest = [ln for ln in lines if not key_of(ln).startswith("ca.crl.")]
    lines = rest[:first] + crl_block + rest[first:]
    want = {}
    for ip in issuing_points(lines):
        want[f"ca.crl.{ip}.enableCRLCache"] = want[f"ca.crl.{ip}.enableCRLUpdates"] = "true"
    want |= {"ca.certStatusUpdateInterval": "600", "ca.listenToCloneModifications": "true"}
    return set_keys(lines, want, drop=frozenset({"master.ca.agent.host", "master.ca.agent.port"}))


def crl_block(lines: list[str]) -> list[str]:
    return [ln for ln in lines if key_of(ln).startswith("ca.crl.")]


def set_interval(inst: str, minutes: int) -> None:
    lines = read_lines(inst)
    write_lines(
        inst, set_keys(lines, {f"ca.crl.{ip}.autoUpdateInterval": str(minutes) for ip in issuing_points(lines)})
    )


# ---- evidence ---------------------------------------------------------------------------------


def crl_lines_since(inst: str, since: str) -> list[str]:
    """Debug log lines about CRL updates whose timestamp (HH:MM:SS) is >= since."""
    out = []
    for ln in bed.debug_log_lines(inst):
        if not re.search(r"CRL [Uu]pdate|automatic CRL update thread", ln):
            continue
        m = re.search(r"\d\d:\d\d:\d\d", ln)
        if m and m.group(0) >= since:
            out.append(ln)
    return out


def crl_threads(inst: str) -> list[str]:
    """Names of the JVM's CRLIssuingPoint threads, from a SIGQUIT thread dump in the console log."""
    pid = bed.jvm_pid(inst)
    assert pid is not None, inst
    shim = bed.ca(inst).shim_log
    start = shim.stat().st_size
    os.kill(pid, signal.SIGQUIT)
    time.sleep(2)
    with shim.open(errors="replace") as f:
        f.seek(start)
        dump = f.read()
    return re.findall(r'^"([^"]*CRL[^"]*)"', dump, flags=re.M)


def tomcat_warnings(inst: str, since_size: int) -> list[str]:
    shim = bed.ca(inst).shim_log
    with shim.open(errors="replace") as f:
        f.seek(since_size)
        text = f.read()
    return [ln for ln in text.splitlines() if re.search(r"failed to stop|memory leak|SEVERE", ln)][:20]


def report(tag: str) -> None:
    for inst in (MASTER, CLONE):
        info = bed.get_info(inst)
        log(f"  [{tag}] {inst}: getInfo master={info.master or '(empty)'} crlNumbers={info.crl_numbers}")
    log(
        f"  [{tag}] LDAP crlNumber ds-master={bed.ldap_crl_number('ds-master')} "
        f"ds-clone={bed.ldap_crl_number('ds-clone')}"
    )


def reload_webapp(inst: str, method: str, edit: Callable[[], None]) -> float:
    """Edit CS.cfg via a webapp reload; returns seconds from the first action to getStatus running."""
    ctx = bed.root / "etc" / "pki" / inst / "Catalina" / "localhost" / "ca.xml"
    t0 = time.monotonic()
    if method == "enable":
        r = chroot("pki-server", "subsystem-disable", "-i", inst, "ca")
        log(f"{inst}: subsystem-disable rc={r.returncode} {r.stdout.strip()} {r.stderr.strip()[-200:]}")
        # the webapp goes away once Tomcat's background check sees ca.xml gone
        while bed.get_status(inst, timeout=1).running:
            time.sleep(0.1)
        log(
            f"{inst}: +{time.monotonic() - t0:.2f} s getStatus no longer running "
            f"({bed.get_status(inst, timeout=1).error})"
        )
        edit()
        r = chroot("pki-server", "subsystem-enable", "-i", inst, "ca")
        log(
            f"{inst}: +{time.monotonic() - t0:.2f} s CS.cfg edited; subsystem-enable rc={r.returncode} "
            f"{r.stdout.strip()} {r.stderr.strip()[-200:]}"
        )
    else:
        edit()
        os.utime(ctx)
        log(f"{inst}: CS.cfg edited, ca.xml touched")
        while bed.get_status(inst, timeout=1).running:
            if time.monotonic() - t0 > 60:
                log(f"{inst}: still running 60 s after the touch: no redeploy")
                return -1.0
            time.sleep(0.1)
        log(
            f"{inst}: +{time.monotonic() - t0:.2f} s getStatus no longer running "
            f"({bed.get_status(inst, timeout=1).error})"
        )
    took = poll_until_running(inst, t0)
    log(f"RESULT {inst}: reload ({method}) -> running in {took:.2f} s")
    return took


def full_restart(*insts: str) -> None:
    for inst in insts:
        bed.stop_ca(inst)
    t0 = time.monotonic()
    for inst in insts:
        bed.start_ca(inst)
    for inst in insts:
        bed.wait_running(inst)
    log(f"full restart of {', '.join(insts)}: running {time.monotonic() - t0:.2f} s after the start commands")


def reload_experiment(method: str, observe: float) -> None:
    bed.ensure_running()
    orig = {i: read_lines(i) for i in (MASTER, CLONE)}
    log(f"== baseline: autoUpdateInterval=1 on both, full restart (method under test: {method})")
    for inst in (MASTER, CLONE):
        set_interval(inst, 1)
    full_restart(MASTER, CLONE)
    report("baseline")
    log(f"  threads: master {crl_threads(MASTER)} clone {crl_threads(CLONE)}")

    log("== demote the master by a webapp reload")
    sizes = {i: bed.ca(i).shim_log.stat().st_size for i in (MASTER, CLONE)}
    master_crl = crl_block(read_lines(MASTER))
    pid_before = {i: bed.jvm_pid(i) for i in (MASTER, CLONE)}
    reload_webapp(MASTER, method, lambda: write_lines(MASTER, demote(read_lines(MASTER), "localhost", 9443)))
    since = datetime.now(UTC).strftime("%H:%M:%S")
    log("== promote the clone by a webapp reload")
    reload_webapp(CLONE, method, lambda: write_lines(CLONE, promote(read_lines(CLONE), master_crl)))
    pid_after = {i: bed.jvm_pid(i) for i in (MASTER, CLONE)}
    log(f"JVM pids before {pid_before} after {pid_after} (same = Tomcat was not restarted)")

    report("after reload")
    old = bed.update_crl(MASTER)
    new = bed.update_crl(CLONE)
    log(f"updateCRL on the demoted {MASTER}: {old.outcome}; on the promoted {CLONE}: {new.outcome}")
    report("after updateCRL")
    log(f"  threads: demoted {MASTER} {crl_threads(MASTER)}; promoted {CLONE} {crl_threads(CLONE)}")
    log(f"observing {observe:.0f} s (autoUpdateInterval 1 min)")
    time.sleep(observe)
    report("after observing")
    for inst in (MASTER, CLONE):
        lines = crl_lines_since(inst, since)
        log(f"  {inst}: {len(lines)} CRL update lines in the debug log since {since}:")
        for ln in lines[-12:]:
            log(f"     {ln[:200]}")
        log(f"  {inst}: Tomcat warnings since the reload: {tomcat_warnings(inst, sizes[inst]) or 'none'}")

    log("== restore the original roles (CS.cfg role edits, autoUpdateInterval back, full restart)")
    for inst in (MASTER, CLONE):
        bed.stop_ca(inst)
    write_lines(MASTER, promote(read_lines(MASTER), crl_block(orig[MASTER])))
    # the clone: demoted toward 8443, with its ca.crl. block as pkispawn wrote it
    lines = demote(read_lines(CLONE), "localhost", 8443)
    first = next(i for i, ln in enumerate(lines) if key_of(ln).startswith("ca.crl."))
    rest = [ln for ln in lines if not key_of(ln).startswith("ca.crl.")]
    write_lines(CLONE, rest[:first] + crl_block(orig[CLONE]) + rest[first:])
    full_restart(MASTER, CLONE)
    for inst in (MASTER, CLONE):
        a = {key_of(ln): ln for ln in orig[inst] if key_of(ln)}
        b = {key_of(ln): ln for ln in read_lines(inst) if key_of(ln)}
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        log(f"  {inst}: keys differing from before the experiment: {diff or 'none'}")
    report("restored")
    log(f"updateCRL after restore: master {bed.update_crl(MASTER).outcome}, clone {bed.update_crl(CLONE).outcome}")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("startstop")
    sp.add_argument("--runs", type=int, default=3)
    sp = sub.add_parser("reload")
    sp.add_argument("--method", choices=["enable", "touch"], default="enable")
    sp.add_argument("--observe", type=float, default=150)
    a = ap.parse_args()
    if a.cmd == "startstop":
        startstop(a.runs)
    else:
        reload_experiment(a.method, a.observe)


if __name__ == "__main__":
    main()
