"""`ca-watchdog doctor`: the preflight an admin runs on each host before enabling the service.

One line per check, OK / WARN / FAIL, with what to do. The checks use the daemon's own pieces
(config validation, the CS.cfg reader, the store, the agent and LDAP probes), so they see what
`run` will see. Nothing here changes the cluster: the store write goes to this node's own
`doctor/<name>` key with a short TTL, never to the leader key or a member record.

The judgements are pure functions over what was observed (unit-tested); `run_doctor` gathers
the observations.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from . import cscfg
from .config import (
    ConfigError,
    FailoverSettings,
    SecretError,
    Settings,
    TimingSettings,
    check_material,
    load_settings,
)
from .probes.agent import AgentInfo, AgentProbe, AgentStatus
from .probes.directory import DirectoryObservation, probe_directory
from .store import open_store
from .store.base import MembersSnapshot, Store, StoreState, StoreUnavailable

Status = Literal["OK", "WARN", "FAIL"]
OK: Status = "OK"
WARN: Status = "WARN"
FAIL: Status = "FAIL"

SYSTEMD_DIR = "/etc/systemd/system"
DROPIN = "ca-watchdog.conf"
GUARD_UNIT = "ca-watchdog-guard@.service"
CERT_WARN_DAYS = 28  # ipa-healthcheck's default: certmonger renews 28 days before the end
CLOCK_WARN = 1.0  # s: logs, history and `status` times stop lining up between hosts
CLOCK_FAIL = 300.0  # s: a certificate issued on one host is not yet valid on the other (5 min backdating)
DOCTOR_TTL = 10.0  # s the doctor/<name> token lives
CLOCK_POLL = 0.1  # s between two reads of the member records while comparing clocks
REAL_DOGTAG_START = "a real Dogtag 10.10 starts in 17-21 s"  # reference/real-dogtag


@dataclass(frozen=True)
class Check:
    status: Status
    name: str
    detail: str
    hint: str | None = None  # what to do (only when the status is not OK)

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name}: {self.detail}"
        return f"{text}  => {self.hint}" if self.hint else text


# ---- configuration ------------------------------------------------------------------------------


def config_checks(path: str) -> tuple[list[Check], Settings | None]:
    """The file as `run` reads it (files are checked one by one below, so one missing file does not
    hide the others); None when the daemon could not start with it."""
    try:
        s = load_settings(path)
    except ConfigError as exc:
        checks = [Check(FAIL, "config", str(exc), f"fix {exc.key or 'the file'}; the daemon refuses to start")]
        if exc.key == "node.name":
            checks.append(
                Check(FAIL, "node in members", str(exc), "set node.name to this host's [[cluster.members]] name")
            )
        return checks, None
    detail = (
        f"{path}: valid; {len(s.members)} members, {s.store.backend} store, "
        f"interval {s.timing.interval:g} s, ttl {s.timing.ttl:g} s"
    )
    if s.insecure:
        detail += f"; cleartext allowed by cluster.insecure: {', '.join(s.insecure)}"
    return [Check(WARN if s.insecure else OK, "config", detail, "use https:// and ldaps://" if s.insecure else None)], s


def local_addresses(host: str) -> list[tuple[str, bool]]:
    """Each address `host` resolves to, and whether this host owns it (it can bind it)."""
    out: list[tuple[str, bool]] = []
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM):
        addr = str(sockaddr[0])
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((addr, 0))
                out.append((addr, True))
            except OSError:
                out.append((addr, False))
    return out


def member_check(s: Settings, resolve: Callable[[str], list[tuple[str, bool]]] = local_addresses) -> Check:
    me = s.me
    index = [m.name for m in s.members].index(me.name) + 1
    where = f"{me.name} is member {index} of {len(s.members)} ({', '.join(m.name for m in s.members)})"
    host = me.agent_host
    try:
        addrs = resolve(host)
    except OSError as exc:
        return Check(
            WARN,
            "node in members",
            f"{where}; its agent_url host {host} does not resolve: {exc}",
            "check DNS or /etc/hosts",
        )
    if any(local for _, local in addrs):
        return Check(OK, "node in members", f"{where}; agent_url host {host} is this host")
    shown = ", ".join(a for a, _ in addrs)
    return Check(
        WARN,
        "node in members",
        f"{where}; but its agent_url host {host} ({shown}) is not an address of this host",
        "is node.name the right member for this host?",
    )


def material_check(s: Settings) -> Check:
    try:
        check_material(s)
    except ConfigError as exc:
        hint = f"fix {exc.key}"
        if "CREDENTIALS_DIRECTORY" in str(exc):
            hint = "run as CREDENTIALS_DIRECTORY=/etc/ca-watchdog/credentials ca-watchdog doctor"
        return Check(FAIL, "TLS and credentials", str(exc), hint)
    return Check(OK, "TLS and credentials", "certificates, keys and credentials load as `run` loads them")


def certificate_files(s: Settings) -> list[tuple[str, str]]:
    """(config key, path) of every certificate file the daemon uses."""
    files = [
        ("tls.ca_file", s.tls.ca_file),
        ("tls.cert_file", s.tls.cert_file),
        ("api.cert_file", s.api.cert_file),
        ("api.client_ca_file", s.api.client_ca_file),
    ]
    if s.store.backend == "etcd" and s.store.etcd is not None:
        files += [("store.etcd.ca_file", s.store.etcd.ca_file), ("store.etcd.cert_file", s.store.etcd.cert_file)]
    return [(k, p) for k, p in files if p is not None]


@dataclass(frozen=True)
class CertValidity:
    subject: str
    not_before: dt.datetime
    not_after: dt.datetime


def read_certificates(path: str) -> list[CertValidity]:
    """Every PEM certificate in `path` (OSError / ValueError if it cannot be read or parsed)."""
    from cryptography import x509

    certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    return [CertValidity(c.subject.rfc4514_string(), c.not_valid_before_utc, c.not_valid_after_utc) for c in certs]


def expiry_check(key: str, path: str, certs: Sequence[CertValidity], now: dt.datetime) -> Check:
    """FAIL if any certificate is expired or not yet valid, WARN under CERT_WARN_DAYS, else the soonest end."""
    name = f"certificate {key}"
    if not certs:
        return Check(FAIL, name, f"{path}: no PEM certificate", f"put the PEM certificate(s) for {key} there")
    bad = [c for c in certs if c.not_after <= now]
    if bad:
        c = bad[0]
        ago = (now - c.not_after).total_seconds() / 86400
        return Check(
            FAIL,
            name,
            f"{path}: {c.subject} expired {ago:.0f} days ago ({c.not_after:%Y-%m-%d})",
            f"renew it and replace {path}",
        )
    early = [c for c in certs if c.not_before > now]
    if early:
        c = early[0]
        return Check(
            FAIL,
            name,
            f"{path}: {c.subject} is not valid before {c.not_before:%Y-%m-%d %H:%M:%S} UTC",
            "check this host's clock (NTP)",
        )
    soonest = min(certs, key=lambda c: c.not_after)
    days = (soonest.not_after - now).total_seconds() / 86400
    many = f"{len(certs)} certificates, the first to expire: " if len(certs) > 1 else ""
    detail = f"{path}: {many}{soonest.subject} expires in {days:.0f} days ({soonest.not_after:%Y-%m-%d})"
    if days < CERT_WARN_DAYS:
        return Check(WARN, name, detail, f"renew it before {soonest.not_after:%Y-%m-%d}")
    return Check(OK, name, detail)


def certificate_checks(s: Settings, now: dt.datetime) -> list[Check]:
    out = []
    for key, path in certificate_files(s):
        try:
            certs = read_certificates(path)
        except (OSError, ValueError) as exc:
            out.append(
                Check(FAIL, f"certificate {key}", f"{path}: {getattr(exc, 'strerror', None) or exc}", f"fix {key}")
            )
            continue
        out.append(expiry_check(key, path, certs, now))
    return out


# ---- CS.cfg -------------------------------------------------------------------------------------


def cscfg_file_check(path: str) -> tuple[Check, cscfg.CSCfg | None]:
    """Real (a regular file, not a symlink), readable and parseable, read as the daemon reads it."""
    try:
        cfg = cscfg.read_cscfg(path)
    except cscfg.CSCfgError as exc:
        if exc.lineno is not None:
            hint = f"fix line {exc.lineno} (Dogtag reads key=value lines only)"
        else:
            hint = "set node.cs_cfg to the CA instance's CS.cfg (/etc/pki/<instance>/ca/CS.cfg), a regular file"
        return Check(FAIL, "CS.cfg file", str(exc), hint), None
    return Check(OK, "CS.cfg file", f"{path}: readable, {len(cfg.keys())} keys parsed"), cfg


def cscfg_role_check(me: str, cfg: cscfg.CSCfg, state: StoreState | None) -> Check:
    """master or clone, and whether that agrees with the leader key (when the store answered)."""
    report = cscfg.classify(cfg)
    role = report.role.value
    if report.role is cscfg.Role.INCONSISTENT:
        return Check(
            FAIL,
            "CS.cfg role",
            f"inconsistent: {'; '.join(report.problems)}",
            "make it all master or all clone: ca-watchdog cscfg promote/demote (see --dry-run)",
        )
    detail = role + (f", master.ca.agent {report.master_agent}" if report.master_agent else "")
    leader = state.leader.name if state is not None and state.leader is not None else None
    if leader is not None and (leader == me) != (report.role is cscfg.Role.MASTER):
        holder = "this node" if leader == me else leader
        return Check(
            WARN,
            "CS.cfg role",
            f"{detail}, but {holder} holds the leader key",
            "the guard rewrites it at the next CA start; `ca-watchdog status` shows the cluster",
        )
    return Check(OK, "CS.cfg role", detail + (f"; agrees with the leader key ({leader})" if leader else ""))


# ---- the store ----------------------------------------------------------------------------------


def store_where(s: Settings) -> str:
    if s.store.backend == "etcd" and s.store.etcd is not None:
        return f"etcd {', '.join(s.store.etcd.endpoints)}"
    return f"sqlite {s.store.path}"


async def store_check(s: Settings, store: Store) -> tuple[Check, StoreState | None]:
    """Read everything a cycle reads, then write a token to doctor/<node> and read it back."""
    budget = s.timing.store_timeout + 0.5
    where = store_where(s)
    token = uuid.uuid4().hex
    try:
        t0 = time.monotonic()
        state = await asyncio.wait_for(store.read_state(), budget)
        t1 = time.monotonic()
        await asyncio.wait_for(store.put_doctor_token(s.node.name, token, DOCTOR_TTL), budget)
        back = await asyncio.wait_for(store.get_doctor_token(s.node.name), budget)
        t2 = time.monotonic()
    except (StoreUnavailable, TimeoutError, OSError) as exc:
        why = str(exc).removeprefix(f"{where}: ") or f"no answer within {budget:g} s"
        return Check(
            FAIL,
            "store",
            f"{where}: unreachable: {why}",
            "start the store or fix [store] (path, endpoints, TLS, credentials)",
        ), None
    if back != token:
        return Check(
            FAIL,
            "store",
            f"{where}: a written token did not read back ({back!r})",
            "another writer on doctor/" + s.node.name + "? check the store",
        ), state
    rtt = t2 - t1
    detail = f"{where}: read {1000 * (t1 - t0):.1f} ms, write + read back {1000 * rtt:.1f} ms"
    if rtt > s.timing.store_timeout / 2:
        return Check(
            WARN,
            "store",
            f"{detail} (over half of store_timeout {s.timing.store_timeout:g} s)",
            "a slow store fails renewals: check its load and network",
        ), state
    return Check(OK, "store", detail), state


def leader_check(state: StoreState) -> Check:
    notes = list(state.problems)
    if state.flags.paused:
        notes.append("the cluster is paused (`ca-watchdog resume` ends it)")
    if state.leader is not None:
        detail = f"{state.leader.name} holds the leader key, epoch {state.leader.epoch}"
    elif state.epoch is None and not state.epoch_unreadable:
        detail = "empty store: at the first start the member whose CS.cfg says master takes the key"
    else:
        last = f" (last: {state.epoch.name}, epoch {state.epoch.epoch})" if state.epoch else ""
        detail = f"no master holds the key{last}"
        notes.append("a failover or bootstrap is pending")
    if notes:
        return Check(WARN, "leader", f"{detail}; {'; '.join(notes)}", "see `ca-watchdog status`")
    return Check(OK, "leader", detail)


# ---- the members' CAs and directories ---------------------------------------------------------------


def agent_check(name: str, url: str, st: AgentStatus, info: AgentInfo | None) -> tuple[Check, str | None]:
    """getStatus + the functional probe (`st`, from AgentProbe.serving) and getInfo; also the role served."""
    label = f"agent {name}"
    if st.status == "starting":
        return Check(WARN, label, f"{url}: starting", "wait for the CA to finish starting, then run doctor again"), None
    if st.status != "running":
        return Check(FAIL, label, f"{url}: {st.reason}", f"start {name}'s CA, or fix its agent_url / tls.ca_file"), None
    if info is None or not info.ok:
        why = info.error if info is not None else "not asked"
        return Check(
            FAIL,
            label,
            f"{url}: getStatus and the functional probe pass, getInfo fails: {why}",
            f"check {name}'s CA log",
        ), None
    role = "clone" if info.master_host else "master"
    of = f" of {info.master_host}:{info.master_port}" if info.master_host else ""
    version = f", PKI {st.version}" if st.version else ""
    detail = f"{url}: running{version}, serves as {role}{of}, functional probe ok, {1000 * st.latency:.0f} ms"
    return Check(OK, label, detail), role


def serving_master_check(roles: Mapping[str, str | None], leader: str | None) -> Check:
    masters = sorted(n for n, r in roles.items() if r == "master")
    if len(masters) > 1:
        return Check(
            FAIL,
            "serving master",
            f"several CAs serve as master: {', '.join(masters)}",
            "demote all but one (ca-watchdog cscfg demote), before enabling the service",
        )
    if not masters:
        return Check(WARN, "serving master", "no CA serves as master (or none answered)", "start the master CA")
    m = masters[0]
    if leader is not None and leader != m:
        return Check(
            WARN,
            "serving master",
            f"{m} serves as master but {leader} holds the leader key",
            "see `ca-watchdog status`; the daemons converge or `ca-watchdog failover --to` settles it",
        )
    key = " and holds the leader key" if leader == m else ""
    return Check(OK, "serving master", f"{m} is the only CA serving as master{key}")


def directory_check(name: str, obs: DirectoryObservation, local: bool, replicated: bool) -> Check:
    """Bind, replica, every agreement's last update, the RUV. `replicated`: other members have a directory."""
    label = f"389-DS {name}"
    if not obs.ok:
        error = obs.error or "failed"
        if not local and "invalidCredentials" in error:
            # the daemon binds only to its own directory: another member's may have its own password
            return Check(
                WARN,
                label,
                f"{obs.url}: {error} (with this node's bind DN and password)",
                f"run doctor on {name} to check its directory",
            )
        return Check(
            FAIL,
            label,
            f"{obs.url}: {error}",
            "start the directory, or fix ldap_url, ldap_bind_dn, ldap_password_file, tls.ca_file",
        )
    if obs.replica_id is None:
        return Check(
            FAIL,
            label,
            f"{obs.url}: no replica for the CA suffix",
            "set up replication (a Dogtag clone is made with pkispawn's clone options)",
        )
    states = {st: [a.name for a in obs.agreements if a.state == st] for st in ("green", "amber", "red", "unknown")}
    shown = ", ".join(f"{len(names)} {st}" for st, names in states.items() if names)
    ruv = sorted(obs.ruv_max_csn)
    detail = (
        f"{obs.url}: replica id {obs.replica_id}, agreements: {shown or 'none'}, "
        f"RUV replica ids {', '.join(map(str, ruv)) or 'none'}, {1000 * obs.latency:.0f} ms"
    )
    if states["amber"]:
        # busy or backoff: another supplier holds the consumer for a moment (normal in a full mesh)
        detail += f" (amber is transient: {', '.join(states['amber'])})"
    red = [a for a in obs.agreements if a.state == "red"]
    if red:
        why = "; ".join(f"{a.name}: {a.message[:120]}" for a in red)
        return Check(FAIL, label, f"{detail}; red: {why}", "repair replication before enabling the service")
    notes = [f"{n}: no update status yet" for n in states["unknown"]]
    if replicated and not obs.agreements:
        notes.append("no replication agreement: nothing leaves this directory")
    if not ruv:
        notes.append("empty RUV: election cannot rank this member")
    notes += list(obs.problems)
    if notes:
        return Check(WARN, label, f"{detail}; {'; '.join(notes)}", "check replication (dsconf ... repl-agmt status)")
    return Check(OK, label, detail)


# ---- the guard drop-in ----------------------------------------------------------------------------

_INSTANCE = re.compile(r"pki-tomcatd@([^/\s]+)\.service")


def dropin_problems(text: str) -> list[str]:
    """What keeps a drop-in from making the CA's start wait for the guard and fail with it."""
    section = ""
    deps: dict[str, set[str]] = {"requires": set(), "after": set()}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        if sep and section == "Unit" and key.strip().lower() in deps:
            deps[key.strip().lower()].update(value.split())
    guard = re.compile(r"ca-watchdog-guard@[^\s]*\.service")
    return [
        f"no {key.capitalize()}=ca-watchdog-guard@%i.service in [Unit]"
        for key, units in deps.items()
        if not any(guard.fullmatch(u) for u in units)
    ]


def guard_check(s: Settings, systemd_dir: str) -> Check:
    name = "guard drop-in"
    if s.node.service_control == "command":
        return Check(
            WARN,
            name,
            "service_control = command: no systemd unit to check",
            "make sure start_command runs `ca-watchdog guard` before the CA starts",
        )
    m = _INSTANCE.fullmatch(s.node.service)
    if m is None:
        return Check(
            WARN,
            name,
            f"node.service {s.node.service!r} is not pki-tomcatd@<instance>.service",
            "the shipped drop-in is for pki-tomcatd@; install an equivalent for this unit",
        )
    root = Path(systemd_dir)
    candidates = [root / f"pki-tomcatd@{m.group(1)}.service.d" / DROPIN, root / "pki-tomcatd@.service.d" / DROPIN]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        return Check(
            FAIL,
            name,
            f"neither {candidates[0]} nor {candidates[1]} exists: {s.node.service} would start without the guard",
            f"install systemd/pki-tomcatd@.service.d/{DROPIN} to {candidates[1].parent}/, then systemctl daemon-reload",
        )
    try:
        problems = dropin_problems(found.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        return Check(FAIL, name, f"{found}: cannot read: {exc}", "fix its permissions")
    if problems:
        return Check(
            FAIL,
            name,
            f"{found}: {'; '.join(problems)}",
            f"replace it with the shipped systemd/pki-tomcatd@.service.d/{DROPIN}",
        )
    guard_units = [root / GUARD_UNIT, root / GUARD_UNIT.replace("@.", f"@{m.group(1)}.")]
    if not any(p.is_file() for p in guard_units):
        return Check(
            FAIL,
            name,
            f"{found} is installed, but {guard_units[0]} is not: the CA's start would fail",
            f"install systemd/{GUARD_UNIT} to {root}/, then systemctl daemon-reload",
        )
    return Check(OK, name, f"{found}: {s.node.service} starts only after ca-watchdog-guard@{m.group(1)}.service")


# ---- clocks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClockSample:
    """A member's record changed between two reads: it was written between `before` (the start of
    the earlier read) and `after` (the end of the later one), by this host's clock, and carries
    the writer's clock `updated_at`."""

    updated_at: float
    before: float
    after: float


def clock_check(name: str, sample: ClockSample | None, present: bool, window: float) -> Check:
    label = f"clock {name}"
    if sample is None:
        if not present:
            return Check(
                WARN,
                label,
                "no member record in the store: its daemon is not running; clock not compared",
                f"run doctor again once {name}'s daemon runs",
            )
        return Check(
            WARN,
            label,
            f"its member record did not change within {window:g} s: its daemon is stuck",
            f"check ca-watchdog on {name}",
        )
    low = sample.updated_at - sample.after
    high = sample.updated_at - sample.before
    offset, spread = (low + high) / 2, (high - low) / 2
    at_least = max(0.0, abs(offset) - spread)  # the smallest skew these two reads allow
    detail = f"{offset:+.3f} s (± {spread:.3f} s) from this host's clock, compared through the store"
    if at_least > CLOCK_FAIL:
        return Check(FAIL, label, detail, f"synchronise the clocks (chrony/NTP) of {name} and this host")
    if at_least > CLOCK_WARN:
        return Check(WARN, label, detail, f"synchronise the clocks (chrony/NTP) of {name} and this host")
    return Check(OK, label, detail)


async def watch_clocks(
    read: Callable[[], Awaitable[MembersSnapshot]], names: Sequence[str], window: float
) -> tuple[dict[str, ClockSample], set[str]]:
    """Read the member records until each of `names` has been seen rewritten (or `window` s passed):
    (samples, the names that had a record at the first read)."""
    t_start = time.time()
    snap = await read()
    previous = {n: (r.updated_at, t_start) for n, r in snap.records.items() if n in names}
    present = set(previous)
    samples: dict[str, ClockSample] = {}
    deadline = time.monotonic() + window
    while time.monotonic() < deadline and len(samples) < len(names):
        await asyncio.sleep(CLOCK_POLL)
        t0 = time.time()
        snap = await read()
        t1 = time.time()
        for n, r in snap.records.items():
            if n not in names or n in samples:
                continue
            present.add(n)
            seen = previous.get(n)
            if seen is not None and r.updated_at != seen[0]:
                samples[n] = ClockSample(r.updated_at, seen[1], t1)
            previous[n] = (r.updated_at, t0)
    return samples, present


def clock_window(t: TimingSettings) -> float:
    """Long enough for every running daemon to publish twice: two cycles and two slow writes."""
    return 2 * (t.interval + t.store_timeout) + 1.0


# ---- timing ----------------------------------------------------------------------------------------


def timing_checks(t: TimingSettings, f: FailoverSettings) -> list[Check]:
    """The rules config.py enforces, with their numbers, and what they mean in seconds."""
    rules = (
        f"interval + 2*store_timeout = {t.interval + 2 * t.store_timeout:g} < ttl {t.ttl:g}; "
        f"safety_margin {t.safety_margin:g} < ttl - interval {t.ttl - t.interval:g}; "
        f"agent_timeout {t.agent_timeout:g} and ldap_timeout {t.ldap_timeout:g} < ttl"
    )
    out = [Check(OK, "timing rules", rules)]
    decide_at = t.ttl - t.safety_margin - t.cycle_budget
    fence = (
        f"a master that cannot renew self-fences once its last renewal is ttl - safety_margin - one worst cycle "
        f"({t.ttl:g} - {t.safety_margin:g} - {t.cycle_budget:g}) = {decide_at:g} s old, stopped by "
        f"ttl - safety_margin = {t.ttl - t.safety_margin:g} s; the lease ends at ttl = {t.ttl:g} s"
    )
    if decide_at < 2 * t.interval:
        out.append(
            Check(
                WARN,
                "fence point",
                f"{fence}: one missed renewal short of fencing the master",
                "raise ttl (or lower safety_margin, interval or the timeouts)",
            )
        )
    else:
        out.append(Check(OK, "fence point", fence))
    detect = t.interval * t.failure_threshold
    restart = (
        f" + one restart first (restart_before_failover: its CA start + {detect:g} s)"
        if f.restart_before_failover
        else ""
    )
    out.append(
        Check(
            OK,
            "failover time",
            f"CA failure: {t.failure_threshold} failed probes x interval {t.interval:g} s = {detect:g} s{restart} "
            f"+ stop of the old master (at most stop_timeout {t.stop_timeout:g} s) + the new master's CA start; "
            f"host lost: ttl {t.ttl:g} s + up to one interval {t.interval:g} s + the new master's CA start "
            f"(at most start_timeout {t.start_timeout:g} s; {REAL_DOGTAG_START})",
        )
    )
    return out


# ---- all together -----------------------------------------------------------------------------------


async def _members_checks(s: Settings, store: Store | None, state: StoreState | None) -> list[Check]:
    """Every member's CA and directory, and the clocks through the store, all at once."""
    t = s.timing
    out: list[Check] = []
    try:
        probe = AgentProbe(s.tls.ca_file, s.tls.cert_file, s.tls.key_file, t.agent_timeout)
    except (OSError, ssl.SSLError, ValueError) as exc:
        return [Check(FAIL, f"agent {m.name}", f"cannot load [tls]: {exc}", "fix [tls]") for m in s.members]
    try:
        password = s.ldap_password() or ""
        ldap_error = None
    except SecretError as exc:
        password, ldap_error = "", str(exc)

    async def agent(url: str) -> tuple[AgentStatus, AgentInfo | None]:
        st = await probe.serving(url)
        return st, (await probe.info(url) if st.status == "running" else None)

    async def directory(url: str, starttls: bool) -> DirectoryObservation:
        return await probe_directory(
            url, s.node.ldap_bind_dn, password, timeout=t.ldap_timeout, ca_file=s.tls.ca_file, starttls=starttls
        )

    others = [m.name for m in s.members if m.name != s.node.name]
    window = clock_window(t)

    async def clocks() -> tuple[dict[str, ClockSample], set[str]] | str:
        """The samples, or why the store could not give them."""
        if store is None or state is None:
            return "no store"

        async def read() -> MembersSnapshot:
            return await asyncio.wait_for(store.get_members(), t.store_timeout + 0.5)

        try:
            return await watch_clocks(read, others, window)
        except (StoreUnavailable, TimeoutError) as exc:
            return f"the store stopped answering while the clocks were compared: {exc or 'timeout'}"

    with_ds = [m for m in s.members if m.ldap_url]
    async with probe:
        agents, dirs, clock_samples = await asyncio.gather(
            asyncio.gather(*(agent(m.agent_url) for m in s.members)),
            asyncio.gather(*(directory(m.ldap_url or "", m.ldap_starttls) for m in with_ds if ldap_error is None)),
            clocks(),
        )
    roles: dict[str, str | None] = {}
    for m, (st, info) in zip(s.members, agents, strict=True):
        check, roles[m.name] = agent_check(m.name, m.agent_url, st, info)
        out.append(check)
    leader = state.leader.name if state is not None and state.leader is not None else None
    out.append(serving_master_check(roles, leader))
    if ldap_error is not None:
        out += [Check(FAIL, f"389-DS {m.name}", ldap_error, "fix node.ldap_password_file") for m in with_ds]
    else:
        for m, obs in zip(with_ds, dirs, strict=True):
            out.append(directory_check(m.name, obs, m.name == s.node.name, len(with_ds) > 1))
    if isinstance(clock_samples, tuple):
        samples, present = clock_samples
        out += [clock_check(n, samples.get(n), n in present, window) for n in others]
    elif store is not None and state is not None:
        out.append(Check(WARN, "clocks", clock_samples, "run doctor again"))
    return out


async def run_doctor(path: str, systemd_dir: str = SYSTEMD_DIR) -> list[Check]:
    checks, s = config_checks(path)
    if s is None:
        return checks
    checks.append(await asyncio.to_thread(member_check, s))
    checks.append(material_check(s))
    checks += certificate_checks(s, dt.datetime.now(dt.UTC))
    file_check, cfg = await asyncio.to_thread(cscfg_file_check, s.node.cs_cfg)
    checks.append(file_check)
    store: Store | None = None
    state: StoreState | None = None
    try:
        store = open_store(s.store, [m.name for m in s.members], s.timing.store_timeout)
    except (OSError, ValueError) as exc:
        checks.append(Check(FAIL, "store", f"{store_where(s)}: cannot open: {exc}", "fix [store]"))
    try:
        if store is not None:
            check, state = await store_check(s, store)
            checks.append(check)
            if state is not None:
                checks.append(leader_check(state))
        if cfg is not None:
            checks.append(cscfg_role_check(s.node.name, cfg, state))
        checks += await _members_checks(s, store, state)
    finally:
        if store is not None:
            await store.close()
    checks.append(guard_check(s, systemd_dir))
    checks += timing_checks(s.timing, s.failover)
    return checks


def cli_doctor(args: argparse.Namespace) -> int:
    """`ca-watchdog doctor`: exit 0 when no check FAILs, 1 otherwise."""
    checks = asyncio.run(run_doctor(args.config, args.systemd_dir))
    failed = any(c.status == FAIL for c in checks)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        for c in checks:
            print(c.line())
        counts = {st: sum(c.status == st for c in checks) for st in (OK, WARN, FAIL)}
        print(f"{counts[OK]} OK, {counts[WARN]} WARN, {counts[FAIL]} FAIL")
    return 1 if failed else 0
