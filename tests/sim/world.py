"""Deterministic simulation of a ca-watchdog cluster: the real daemon code on a virtual clock.

What is real: `Watchdog` (loop.py) with its Observer, view builder, decide(), Actuator and Reporter,
`LocalCA` (node.py: stop/start/promote/demote with the real CS.cfg transforms and the safe writer on
real files), and the guard (guard.py), which runs before every CA start as the unit's ExecStartPre does.
What is simulated, all driven by one seed: the clock (an event loop whose selector advances virtual time
instead of waiting), the store (linearizable, in memory, with per-member partitions, stalls and lost
answers), the CA processes (start delay, failed starts, crashes, freezes, hung stops, their 389-DS
dying: getStatus running, the database read 500, getInfo empty), the network between
members (probe partitions), wall-clock skew per host, daemon crashes at any store, service or probe
await point (the task then never runs another line, as with SIGKILL) and their restart, host reboots, and
operator commands (pause, resume, switchover, failover, ack).

Invariants are checked after every simulated I/O and CA state change: never two CAs serving as
master; never a CA serving as master for longer than the stated bound without its member holding
the key while its daemon runs and the cluster is not paused (a pause hands the controls to the
operator); CS.cfg keys outside the role keys never change; and once faults stop (and the operator
has resumed the cluster), a master serves within the stated bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import random
import re
import selectors
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from ca_watchdog import actuator as actuator_mod
from ca_watchdog import cscfg, guard, lease_file, loop, node, observe, report, view
from ca_watchdog.config import Settings, parse_settings
from ca_watchdog.loop import Watchdog
from ca_watchdog.metrics import Metrics
from ca_watchdog.probes.agent import REASON_NO_ANSWER, REASON_REFUSED, AgentInfo, AgentStatus
from ca_watchdog.service import ServiceError
from ca_watchdog.store.base import (
    ENDED_RELEASED,
    Cooldown,
    CRLBlock,
    EpochRecord,
    Flags,
    HistoryEvent,
    LeaderRecord,
    MemberRecord,
    MembersSnapshot,
    Store,
    StoreState,
    StoreUnavailable,
    SwitchoverKind,
    SwitchoverRequest,
    acquired_record,
    released_record,
)

T = TypeVar("T")
HOST: contextvars.ContextVar[str] = contextvars.ContextVar("sim_host", default="world")
# the generation of the daemon whose task this is (every task it creates inherits it): after a restart, a
# killed daemon's tasks (a probe or the renewer on its own cadence) must not do I/O as the new daemon
DAEMON_GEN: contextvars.ContextVar[int | None] = contextvars.ContextVar("sim_daemon_generation", default=None)

TIMING = {
    "interval": 1.0,
    "agent_timeout": 0.5,
    "ldap_timeout": 0.5,
    "store_timeout": 0.5,
    "ttl": 10.0,
    "safety_margin": 2.0,
    "failure_threshold": 2,
    "start_timeout": 12.0,
    "stop_timeout": 5.0,
}
FAULT_PHASE = 35.0  # virtual seconds of faults
QUIET_PHASE = 50.0  # then no faults: a master must serve within LIVENESS_BOUND
STABLE_TAIL = TIMING["ttl"]  # after the first serving master, watch it hold this long
MAX_START = 4.0  # the slowest CA start the simulation makes
# once faults stop: a lease to expire, the fence point, detection, one election round, two CA starts
LIVENESS_BOUND = 2 * TIMING["ttl"] + 2 * MAX_START + 8 * TIMING["interval"] + TIMING["stop_timeout"]
# a CA serving as master without its member holding the key, while its daemon runs: at most until its
# daemon's next decision after a start or a lost lease (one cycle budget, the stop, the probes)
UNLEASED_BOUND = TIMING["ttl"] + TIMING["stop_timeout"] + 3 * TIMING["interval"]


_BACKUP_STAMP = re.compile(r"\.\d+\.ca-watchdog")


class Violation(AssertionError):
    pass


# ---- the clock -------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.skew: dict[str, float] = {}

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_800_000_000.0 + self.now + self.skew.get(HOST.get(), 0.0)


class VirtualSelector(selectors.BaseSelector):
    """No file descriptors ever become ready; waiting means moving the virtual clock to the next timer."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._map: dict[Any, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = selectors.SelectorKey(fileobj, id(fileobj), events, data)
        self._map[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._map.pop(fileobj)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise Violation("deadlock: nothing scheduled and nothing ready")
        self.clock.now += max(0.0, timeout)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._map

    def close(self) -> None:
        self._map.clear()


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: Clock) -> None:
        super().__init__(VirtualSelector(clock))
        self.clock = clock

    def time(self) -> float:
        return self.clock.now


class _TimeModule:
    """Stands in for the `time` module inside the daemon's modules."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def monotonic(self) -> float:
        return self.clock.monotonic()

    def time(self) -> float:
        return self.clock.time()


async def _inline_to_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    return fn(*args, **kwargs)  # no threads in a deterministic run


@contextlib.contextmanager
def virtual_time(clock: Clock) -> Any:
    fake = _TimeModule(clock)
    mods = [actuator_mod, loop, observe, view, node, report, guard, lease_file]
    saved = [(m, m.time) for m in mods if hasattr(m, "time")]
    saved_thread = asyncio.to_thread
    for m, _ in saved:
        m.time = fake  # type: ignore[assignment]
    asyncio.to_thread = _inline_to_thread  # type: ignore[assignment]
    try:
        yield
    finally:
        for m, t in saved:
            m.time = t  # type: ignore[assignment]
        asyncio.to_thread = saved_thread  # type: ignore[assignment]


# ---- the world ---------------------------------------------------------------------------------------------


@dataclass
class CAProcess:
    state: str = "stopped"  # stopped | starting | running | failed
    loaded_role: str | None = None  # the role its CS.cfg had when it started (what it serves)
    accept_at: float = 0.0  # when a starting CA's port accepts (then it answers nothing until running_at)
    running_at: float = 0.0
    frozen: bool = False
    fails: bool = False  # this start ends in `failed` (the JVM exits) instead of `running`


@dataclass
class Host:
    name: str
    settings: Settings
    ca: CAProcess = field(default_factory=CAProcess)
    daemon: Watchdog | None = None
    daemon_task: asyncio.Task[None] | None = None
    daemon_since: float = 0.0
    alive: bool = False  # the daemon process runs
    generation: int = 0  # bumped at every daemon death: I/O of an older generation never returns
    store_cut: bool = False  # partitioned from the store
    cut_from: set[str] = field(default_factory=set)  # members whose CAs it cannot reach
    ds_down: bool = False  # its CA's own 389-DS is down (getStatus running, no database, empty getInfo)
    unleased_since: float | None = None


class World:
    def __init__(self, seed: int, workdir: Path, members: int | None = None, log: list[str] | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.clock = Clock()
        self.dir = workdir
        self.log = log if log is not None else []
        n = members or self.rng.choice((3, 3, 4, 5))
        self.names = [f"ca{i + 1}" for i in range(n)]
        self.store = SimStoreState(self)
        self.hosts: dict[str, Host] = {}
        self.violations: list[str] = []
        self.faults_on = True
        # 389-DS deaths draw from their own stream: a history they do not touch stays what it was
        self.ds_rng = random.Random(f"389-ds {seed}")
        self.cooldown = self.rng.choice((0.0, 0.0, 30.0))
        # in some histories the daemon's own starts skip the guard: its own lease check must suffice
        self.guard_on_daemon_starts = self.rng.random() < 0.7
        self.template = cscfg.parse(
            resources.files("ca_watchdog.lab").joinpath("CS.cfg.template").read_bytes(), "template"
        )
        for name in self.names:
            self.clock.skew[name] = self.rng.uniform(-30.0, 30.0) if self.rng.random() < 0.5 else 0.0
            self.hosts[name] = Host(name, self._settings(name))
        self.baseline = {n: self._non_role(self._read(n)) for n in self.names}

    # ---- setup ----

    def _settings(self, name: str) -> Settings:
        d = self.dir / name
        d.mkdir(parents=True, exist_ok=True)
        store_file = self.dir / "store.db"
        store_file.touch()  # the guard reads a missing SQLite file as an empty store; this one is simulated
        cs = d / "CS.cfg"
        cfg = self.template
        if name != self.names[0]:
            cfg = cscfg.demote(cfg, f"{self.names[0]}.sim.test", 8443)
        cs.write_bytes(cfg.render())
        raw: dict[str, Any] = {
            "node": {"name": name, "cs_cfg": str(cs), "lease_file": str(d / "lease.json")},
            "store": {"path": str(store_file)},
            "timing": dict(TIMING),
            "failover": {
                "restart_before_failover": self.rng.random() < 0.5,
                "failover_cooldown": self.cooldown,
                "fence_command": ["/bin/true"],  # replaced by the simulated STONITH (sim_fence)
            },
            "cluster": {
                "members": [{"name": n, "agent_url": f"https://{n}.sim.test:8443", "priority": 100} for n in self.names]
            },
        }
        return parse_settings(raw, source=f"sim {name}")

    def _read(self, name: str) -> cscfg.CSCfg:
        return cscfg.read_cscfg(self.dir / name / "CS.cfg")

    @staticmethod
    def _non_role(cfg: cscfg.CSCfg) -> dict[str, str | None]:
        return {k: cfg.get(k) for k in cfg.keys() if not cscfg.is_role_key(k) and not k.startswith("ca.crl.")}  # noqa: SIM118

    def note(self, text: str) -> None:
        # the same seed, the same log: no temporary directory name, no wall-clock backup name
        text = _BACKUP_STAMP.sub(".<t>.ca-watchdog", text.replace(str(self.dir), "$SIM"))
        self.log.append(f"{self.clock.now - 1000:8.2f} {text}")

    # ---- invariants ----

    def serving_masters(self) -> list[str]:
        return [n for n, h in self.hosts.items() if h.ca.state == "running" and h.ca.loaded_role == "master"]

    def check(self, where: str) -> None:
        now = self.clock.now
        masters = self.serving_masters()
        if len(masters) > 1:
            self._violate(f"two CAs serving as master: {masters} ({where})")
        leader = self.store.live_leader()
        for n, h in self.hosts.items():
            serving = n in masters
            leased = leader is not None and leader.name == n
            # a paused cluster is in the operator's hands: the master keeps serving as it is, by design
            if serving and not leased and h.alive and self.store.paused_at is None:
                h.unleased_since = h.unleased_since if h.unleased_since is not None else now
                since = max(h.unleased_since, h.daemon_since)
                if now - since > UNLEASED_BOUND:
                    self._violate(
                        f"{n} serves as master without the key for {now - since:.1f}s while its daemon runs "
                        f"(bound {UNLEASED_BOUND:g}s)"
                    )
            else:
                h.unleased_since = None

    def _violate(self, text: str) -> None:
        line = f"t={self.clock.now - 1000:.2f}: {text}"
        if len(self.violations) < 20:
            self.note("VIOLATION " + text)
            self.violations.append(line)
        raise Violation(line)

    def final_checks(self) -> None:
        for n in self.names:
            try:
                now = self._non_role(self._read(n))
            except cscfg.CSCfgError as exc:
                self.violations.append(f"{n}: CS.cfg unreadable at the end: {exc}")
                continue
            if now != self.baseline[n]:
                changed = sorted(k for k in set(now) | set(self.baseline[n]) if now.get(k) != self.baseline[n].get(k))
                self.violations.append(f"{n}: CS.cfg keys outside the role keys changed: {changed[:5]}")

    # ---- I/O gates: where a daemon can die, stall or be cut off ----

    async def gate(self, host: str, what: str) -> None:
        """Every simulated I/O of a daemon passes here: a dead daemon's I/O never returns, and a crash
        may happen right here (the process dies at this await point)."""
        h = self.hosts.get(host)
        if h is None:
            return
        gen = DAEMON_GEN.get()
        gen = h.generation if gen is None else gen
        if not h.alive or h.generation != gen:
            await asyncio.Event().wait()
        if self.faults_on and self.rng.random() < self.p_crash:
            self.note(f"{host}: daemon crashes at {what}")
            self.kill_daemon(host)
            await asyncio.Event().wait()
        await asyncio.sleep(0)
        if h.generation != gen or not h.alive:
            await asyncio.Event().wait()

    p_crash = 0.0005
    p_slow_start = 0.0  # a start slower than start_timeout (two JVMs at once on the real Dogtag: 22-33 s)
    p_stop_hang = 0.03  # a JVM that does not stop within stop_timeout: systemctl gives up, the CA runs on
    # False: the daemon's own starts skip the guard (a start_command without it), to test the daemon alone;
    # starts at boot always run it (without a guard nothing keeps a returning master's CS.cfg off)
    guard_on_daemon_starts = True

    # ---- daemons ----

    def start_daemon(self, name: str) -> None:
        h = self.hosts[name]
        if h.alive:
            return
        h.alive = True
        h.daemon_since = self.clock.now
        token, gen_token = HOST.set(name), DAEMON_GEN.set(h.generation)
        try:
            wd = Watchdog(h.settings, SimStore(self, name), SimProbe(self, name), Metrics(name))  # type: ignore[arg-type]
            wd.ca.service = SimService(self, name)
            h.daemon = wd
            h.daemon_task = asyncio.get_running_loop().create_task(wd.run_forever(), name=f"daemon {name}")
        finally:
            DAEMON_GEN.reset(gen_token)
            HOST.reset(token)
        self.note(f"{name}: daemon started")

    def kill_daemon(self, name: str) -> None:
        h = self.hosts[name]
        if not h.alive:
            return
        h.alive = False
        h.generation += 1
        h.daemon = None
        if h.daemon_task is not None:
            # its main loop no longer waits on a probe (those run on their own tasks) and every store call
            # times out: it would go on deciding in memory. Its I/O is blocked anyway; this saves the CPU.
            h.daemon_task.cancel()
        self.note(f"{name}: daemon killed")

    # ---- CAs ----

    def ca_start(self, name: str) -> None:
        """The unit's start after the guard: the JVM reads CS.cfg; port refuses, then accepts silently,
        then serves (a real Dogtag never says `starting`)."""
        ca = self.hosts[name].ca
        if ca.state in ("starting", "running"):
            return
        try:
            role = cscfg.classify(self._read(name)).role.value
        except cscfg.CSCfgError:
            role = "unreadable"
        delay = self.rng.uniform(0.5, MAX_START)
        if self.faults_on and self.rng.random() < self.p_slow_start:
            delay = self.rng.uniform(TIMING["start_timeout"], 2.5 * TIMING["start_timeout"])
        ca.state, ca.loaded_role, ca.frozen = "starting", role, False
        ca.fails = self.faults_on and self.rng.random() < 0.05
        self.note(f"{name}: CA starting as {role} ({delay:.1f}s{', will fail' if ca.fails else ''})")
        self._ca_up_at(name, self.clock.now + delay, self.clock.now + delay / 2)
        p_ds = P_DS_DIES_IN_MASTER_START if role == "master" else P_DS_DIES_IN_START
        if self.faults_on and self.ds_rng.random() < p_ds:
            # the JVM's memory peaks as its CA engine comes up (likelier for a master: it also builds the CRL cache and
            # runs the certificate-status task), and the OOM killer takes the host's 389-DS: just before
            # the engine is up (it then fails for good) or just after (running, but every database read
            # and getInfo fails), when a promotion's checks fail while the CA may serve as master
            at = max(0.0, delay + self.ds_rng.uniform(-0.5, 0.3))
            asyncio.get_running_loop().call_later(at, ds_dies, self, name)

    def _ca_up_at(self, name: str, at: float, accept_at: float) -> None:
        ca = self.hosts[name].ca
        ca.accept_at, ca.running_at = accept_at, at
        asyncio.get_running_loop().call_at(at, self._ca_up, name, at)

    def _ca_up(self, name: str, expected: float) -> None:
        h = self.hosts[name]
        ca = h.ca
        if ca.state != "starting" or ca.running_at != expected:
            return
        # a CA engine that starts while its 389-DS is down fails for good (404 until the next restart)
        ca.state = "failed" if ca.fails or h.ds_down else "running"
        self.note(f"{name}: CA {ca.state} ({ca.loaded_role})")
        self.safe_check(f"{name} CA up")

    def ca_stop(self, name: str) -> None:
        ca = self.hosts[name].ca
        if ca.state != "stopped":
            self.note(f"{name}: CA stopped")
        ca.state, ca.frozen = "stopped", False

    def safe_check(self, where: str) -> None:
        with contextlib.suppress(Violation):
            self.check(where)

    # ---- faults ----

    async def faults(self) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + FAULT_PHASE
        while loop.time() < end:
            await asyncio.sleep(self.rng.uniform(0.5, 6.0))
            fault = self.rng.choice(FAULTS)
            fault(self)
            if self.ds_rng.random() < P_DS_DIES:
                ds_dies(self, self.ds_rng.choice(self.names))
            self.safe_check(f"after {fault.__name__}")
        await self.heal()

    async def heal(self) -> None:
        """Faults stop: partitions heal, frozen CAs thaw, dead daemons restart; the operator resumes."""
        self.faults_on = False
        self.note("faults stop")
        for n, h in self.hosts.items():
            h.store_cut = False
            h.cut_from.clear()
            h.ds_down = False
            if h.ca.frozen:
                h.ca.frozen = False
            if h.ca.state == "starting" and h.ca.running_at > self.clock.now + MAX_START:
                up = self.clock.now + self.rng.uniform(0.5, MAX_START)  # slow starts end too
                self._ca_up_at(n, up, min(h.ca.accept_at, up))
            if not h.alive:
                self.start_daemon(n)
        self.store.stall_until = 0.0
        self.store.paused_at = None
        self.store.switchover = None
        self.heal_at = self.clock.now

    heal_at = 0.0


# ---- faults -------------------------------------------------------------------------------------------------


def kill_master_ca(w: World) -> None:
    for n in w.serving_masters():
        w.note(f"FAULT kill -9 {n}'s CA")
        w.ca_stop(n)


def kill_random_ca(w: World) -> None:
    n = w.rng.choice(w.names)
    w.note(f"FAULT kill -9 {n}'s CA")
    w.ca_stop(n)


def freeze_ca(w: World) -> None:
    n = w.rng.choice(w.names)
    if w.hosts[n].ca.state == "running":
        w.note(f"FAULT freeze {n}'s CA")
        w.hosts[n].ca.frozen = True
        asyncio.get_running_loop().call_later(w.rng.uniform(1, 15), _thaw, w, n)


def _thaw(w: World, n: str) -> None:
    if w.hosts[n].ca.frozen:
        w.note(f"{n}: CA thaws")
        w.hosts[n].ca.frozen = False
        w.safe_check(f"{n} thaws")


def kill_daemon(w: World) -> None:
    n = w.rng.choice(w.names)
    w.note(f"FAULT kill -9 {n}'s daemon")
    w.kill_daemon(n)
    asyncio.get_running_loop().call_later(w.rng.uniform(0.5, 25), _restart_daemon, w, n)


def _restart_daemon(w: World, n: str) -> None:
    if not w.hosts[n].alive:
        w.start_daemon(n)


def restart_dead_daemons(w: World) -> None:
    for n, h in w.hosts.items():
        if not h.alive:
            w.start_daemon(n)


def reboot_host(w: World) -> None:
    n = w.rng.choice(w.names)
    w.note(f"FAULT reboot {n}")
    w.kill_daemon(n)
    w.ca_stop(n)
    lease_file.withdraw(w.hosts[n].settings.node.lease_file)  # /run is emptied at boot
    asyncio.get_running_loop().call_later(w.rng.uniform(3, 30), _boot, w, n)


def _boot(w: World, n: str) -> None:
    """At boot systemd starts the CA (guard first) and the daemon, in no particular order."""
    w.note(f"{n}: boots")
    asyncio.get_running_loop().create_task(_boot_ca(w, n))
    w.start_daemon(n)


async def _boot_ca(w: World, n: str) -> None:
    token = HOST.set(f"{n}-systemd")
    try:
        await SimService(w, n, gated=False).start(30)
    except ServiceError as exc:
        w.note(f"{n}: CA not started at boot: {exc}")
    finally:
        HOST.reset(token)


P_DS_DIES = 0.05  # per fault drawn: some member's 389-DS dies as well
P_DS_DIES_IN_START = 0.03  # per CA start as clone: its 389-DS dies as the CA engine comes up
P_DS_DIES_IN_MASTER_START = 0.3  # per CA start as master


def ds_dies(w: World, n: str) -> None:
    h = w.hosts[n]
    if not w.faults_on or h.ds_down:
        return
    h.ds_down = True
    seconds = w.ds_rng.uniform(2, 20)
    w.note(f"FAULT {n}'s 389-DS dies for {seconds:.1f}s (CA {h.ca.state})")
    asyncio.get_running_loop().call_later(seconds, _ds_back, w, n)


def _ds_back(w: World, n: str) -> None:
    if w.hosts[n].ds_down:
        w.hosts[n].ds_down = False
        w.note(f"{n}'s 389-DS is back")


def cut_store(w: World) -> None:
    n = w.rng.choice(w.names)
    w.note(f"FAULT {n} cut from the store")
    w.hosts[n].store_cut = True
    asyncio.get_running_loop().call_later(w.rng.uniform(1, 30), _uncut_store, w, n)


def _cut_store_of(w: World, n: str, seconds: float) -> None:
    if w.faults_on:
        w.note(f"FAULT {n} cut from the store (just after taking the key)")
        w.hosts[n].store_cut = True
        asyncio.get_running_loop().call_later(seconds, _uncut_store, w, n)


def _uncut_store(w: World, n: str) -> None:
    w.hosts[n].store_cut = False


def stall_store(w: World) -> None:
    w.store.stall_until = w.clock.now + w.rng.uniform(0.5, 12)
    w.note(f"FAULT store stalls until {w.store.stall_until - 1000:.1f}")


def cut_peers(w: World) -> None:
    n = w.rng.choice(w.names)
    others = [m for m in w.names if m != n]
    cut = set(w.rng.sample(others, w.rng.randint(1, len(others))))
    w.note(f"FAULT {n} cannot reach the CAs of {sorted(cut)}")
    w.hosts[n].cut_from |= cut
    asyncio.get_running_loop().call_later(w.rng.uniform(1, 25), _uncut_peers, w, n, cut)


def _uncut_peers(w: World, n: str, cut: set[str]) -> None:
    w.hosts[n].cut_from -= cut


def lose_answers(w: World) -> None:
    w.store.p_lost = w.rng.choice((0.0, 0.05, 0.2))
    w.note(f"FAULT the store loses {w.store.p_lost:.0%} of its answers")


def skew_clock(w: World) -> None:
    n = w.rng.choice(w.names)
    w.clock.skew[n] = w.rng.uniform(-120, 120)
    w.note(f"FAULT {n}'s wall clock off by {w.clock.skew[n]:.0f}s")


def operator_pause(w: World) -> None:
    w.note("OPERATOR pause")
    w.store.paused_at = w.store.paused_at or w.clock.now


def operator_resume(w: World) -> None:
    w.note("OPERATOR resume")
    w.store.paused_at = None


def operator_switchover(w: World) -> None:
    target = w.rng.choice(w.names)
    kind: SwitchoverKind = w.rng.choice(("switchover", "failover"))
    w.note(f"OPERATOR {kind} --to {target}")
    w.store.switchover = SwitchoverRequest(f"r{w.rng.getrandbits(32):08x}", target, kind, w.clock.now, "operator")


def operator_ack(w: World) -> None:
    w.note("OPERATOR ack")
    w.store.cooldown = None
    w.store.cooldown_ack_at = w.clock.now


def slow_starts(w: World) -> None:
    w.p_slow_start = w.rng.choice((0.0, 0.2, 0.5))
    w.note(f"FAULT {w.p_slow_start:.0%} of CA starts take longer than start_timeout")


def stops_hang(w: World) -> None:
    w.p_stop_hang = w.rng.choice((0.03, 0.2, 0.5))
    w.note(f"FAULT {w.p_stop_hang:.0%} of CA stops hang past stop_timeout")


def crash_more(w: World) -> None:
    w.p_crash = w.rng.choice((0.0005, 0.005, 0.02))
    w.note(f"FAULT daemons crash at {w.p_crash:.1%} of their await points")


FAULTS: Sequence[Callable[[World], None]] = (
    kill_master_ca,
    kill_master_ca,
    kill_random_ca,
    freeze_ca,
    kill_daemon,
    kill_daemon,
    restart_dead_daemons,
    reboot_host,
    reboot_host,
    cut_store,
    cut_store,
    stall_store,
    cut_peers,
    lose_answers,
    skew_clock,
    operator_pause,
    operator_resume,
    operator_resume,
    operator_switchover,
    operator_ack,
    crash_more,
    slow_starts,
    stops_hang,
)


# ---- the CA service and probe ------------------------------------------------------------------------------------


class SimService:
    """systemctl start/stop of pki-tomcatd@: the guard runs first (ExecStartPre), then the JVM."""

    def __init__(self, world: World, host: str, gated: bool = True) -> None:
        self.w, self.host, self.gated = world, host, gated
        self.name = f"pki-tomcatd@{host}"

    async def start(self, timeout: float) -> None:
        if self.gated:
            await self.w.gate(self.host, "systemctl start")
        h = self.w.hosts[self.host]
        if h.ca.state in ("starting", "running") and not h.ca.frozen:
            return  # start of an active unit does nothing
        settings = h.settings
        if self.gated and not self.w.guard_on_daemon_starts:
            self.w.note(f"{self.host}: started without the guard")
        else:
            try:
                result = await guard.guard(settings, SimStore(self.w, self.host, gated=self.gated))
            except (guard.GuardRefusal, cscfg.CSCfgError) as exc:
                raise ServiceError(f"guard refused: {exc}") from None
            self.w.note(f"{self.host}: guard: {result.message}")
        h.ca.state = "stopped"
        self.w.ca_start(self.host)
        self.w.safe_check(f"{self.host} start")

    async def alive(self, timeout: float) -> bool | None:
        """Whether the CA's process runs (systemd's ActiveState): a JVM that answers 404 still runs."""
        if self.gated:
            await self.w.gate(self.host, "systemctl show")
        return self.w.hosts[self.host].ca.state != "stopped"

    async def stop(self, timeout: float) -> None:
        if self.gated:
            await self.w.gate(self.host, "systemctl stop")
        if self.w.faults_on and self.w.rng.random() < self.w.p_stop_hang:
            # the JVM does not stop in time: systemctl gives up, the CA keeps running as it was
            await asyncio.sleep(min(timeout, 2.0))
            self.w.note(f"{self.host}: stop timed out, CA still {self.w.hosts[self.host].ca.state}")
            raise ServiceError(f"systemctl stop {self.name} timed out")
        await asyncio.sleep(self.w.rng.uniform(0.1, 1.5))
        self.w.ca_stop(self.host)
        self.w.safe_check(f"{self.host} stop")


class SimProbe:
    def __init__(self, world: World, host: str) -> None:
        self.w, self.host = world, host
        self.timeout = TIMING["agent_timeout"]

    def _target(self, url: str) -> str:
        return url.split("//", 1)[1].split(".", 1)[0]

    async def status(self, url: str) -> AgentStatus:
        await self.w.gate(self.host, "probe")
        target = self._target(url)
        h = self.w.hosts[target]
        ca = h.ca
        now = self.w.clock.now
        if target in self.w.hosts[self.host].cut_from or ca.frozen:
            await asyncio.sleep(self.timeout)
            return AgentStatus("down", REASON_NO_ANSWER, None, None, None, self.timeout)
        if ca.state == "running":
            # a running CA whose 389-DS is down still says running (seen on the real Dogtag 10.10)
            return AgentStatus("running", None, 200, "10.10.2", "1", 0.01)
        if ca.state == "starting" and now >= ca.accept_at:
            await asyncio.sleep(self.timeout)
            return AgentStatus("down", REASON_NO_ANSWER, None, None, None, self.timeout)
        if ca.state == "failed":
            return AgentStatus("down", "HTTP 404", 404, None, None, 0.01)
        return AgentStatus("down", REASON_REFUSED, None, None, None, 0.001)

    async def serving(self, url: str) -> AgentStatus:
        """getStatus, then the database read, which a CA with its 389-DS down answers with a 500."""
        st = await self.status(url)
        if st.status == "running" and self.w.hosts[self._target(url)].ds_down:
            reason = "getStatus running, but the CA cannot serve: /ca/rest/certs HTTP 500: LDAP server down"
            return AgentStatus("down", reason, 500, st.version, st.state, 0.02)
        return st

    async def info(self, url: str) -> AgentInfo:
        st = await self.status(url)
        if st.status != "running":
            return AgentInfo(None, None, ok=False, error=st.reason)
        if self.w.hosts[self._target(url)].ds_down:
            return AgentInfo(None, None, ok=False, error="bad answer: empty body")  # 10.10 with its DS down
        if self.w.faults_on and self.w.rng.random() < 0.03:
            # a loaded CA that just started: getInfo times out once (seen on the real Dogtag bed)
            await asyncio.sleep(self.timeout)
            return AgentInfo(None, None, ok=False, error=REASON_NO_ANSWER)
        ca = self.w.hosts[self._target(url)].ca
        if ca.loaded_role == "master":
            return AgentInfo(None, None)
        return AgentInfo("somewhere.sim.test", 8443)


async def sim_fence(argv: Sequence[str], old_master: str, timeout: float) -> None:
    """STONITH: fence_command powers the old master's CA off (its daemon goes with the host)."""
    w = WORLD.get()
    await w.gate(HOST.get(), "fence_command")
    w.note(f"{HOST.get()}: fence_command powers {old_master} off")
    w.kill_daemon(old_master)
    w.ca_stop(old_master)
    asyncio.get_running_loop().call_later(w.rng.uniform(5, 20), _boot, w, old_master)


WORLD: contextvars.ContextVar[World] = contextvars.ContextVar("sim_world")


# ---- the store -----------------------------------------------------------------------------------------------------


@dataclass
class SimLeader:
    name: str
    epoch: int
    acquired_at: float
    renewed_at: float
    expires_at: float
    reason: str


class SimStoreState:
    """One linearizable store; time is its own (virtual, no skew)."""

    def __init__(self, w: World) -> None:
        self.w = w
        self.leader: SimLeader | None = None
        self.epoch: EpochRecord | None = None
        self.members: dict[str, tuple[dict[str, Any], float, float]] = {}
        self.crl: CRLBlock | None = None
        self.paused_at: float | None = None
        self.switchover: SwitchoverRequest | None = None
        self.cooldown_ack_at: float | None = None
        self.cooldown: tuple[Cooldown, float] | None = None
        self.steps: dict[str, dict[str, Any]] = {}
        self.doctor: dict[str, tuple[str, float]] = {}  # name -> (token, expires at)
        self.history: list[HistoryEvent] = []
        self.stall_until = 0.0
        self.p_lost = 0.0
        self._version = 0
        self.changed = asyncio.Event()

    @property
    def version(self) -> int:
        return self._version

    @version.setter
    def version(self, value: int) -> None:
        self._version = value
        self.changed.set()  # wake every watcher; the next waiters get a fresh event
        self.changed = asyncio.Event()

    def live_leader(self) -> SimLeader | None:
        if self.leader is not None and self.leader.expires_at <= self.w.clock.now:
            self.leader = None
            self.version += 1
        return self.leader

    def record(self, ld: SimLeader) -> LeaderRecord:
        return LeaderRecord(ld.name, ld.epoch, ld.acquired_at, ld.renewed_at, ld.expires_at, ld.reason)


class SimStore(Store):
    """One member's client of the simulated store."""

    def __init__(self, w: World, host: str, gated: bool = True) -> None:
        super().__init__(w.names, TIMING["store_timeout"])
        self.w, self.host, self.s, self.gated = w, host, w.store, gated
        self._seen_version = -1

    async def _op(self, what: str, fn: Callable[[float], T]) -> T:
        if self.gated:
            await self.w.gate(self.host, f"store {what}")
        h = self.w.hosts[self.host]
        now = self.w.clock.now
        if h.store_cut or now < self.s.stall_until:
            await asyncio.sleep(self.timeout)
            raise StoreUnavailable(f"sim: {what}: no answer within {self.timeout:g}s")
        await asyncio.sleep(self.w.rng.uniform(0.001, 0.02))
        result = fn(self.w.clock.now)
        self.w.safe_check(f"{self.host} store {what}")
        if self.w.faults_on and self.w.rng.random() < self.s.p_lost:
            raise StoreUnavailable(f"sim: {what}: the answer was lost")
        return result

    # -- leader
    async def get_leader(self) -> LeaderRecord | None:
        def op(now: float) -> LeaderRecord | None:
            ld = self.s.live_leader()
            self._seen_version = self.s.version
            return self.s.record(ld) if ld else None

        return await self._op("get_leader", op)

    async def acquire_leader(
        self, name: str, ttl: float, reason: str, kind: str = "automatic", expect_epoch: int | None = None
    ) -> LeaderRecord | None:
        def op(now: float) -> LeaderRecord | None:
            if self.s.live_leader() is not None:
                return None
            if expect_epoch is not None and (self.s.epoch.epoch if self.s.epoch else 0) != expect_epoch:
                return None
            rec = acquired_record(self.s.epoch, name, now, reason, kind)
            self.s.epoch = rec
            self.s.leader = SimLeader(name, rec.epoch, now, now, now + ttl, reason)
            self.s.version += 1
            self.w.note(f"store: {name} acquires epoch {rec.epoch} ({kind})")
            if self.w.faults_on and self.w.rng.random() < 0.15:
                # the adversary's favourite moment: cut the new holder off right in its promotion
                loop = asyncio.get_running_loop()
                loop.call_later(self.w.rng.uniform(0.05, 3.0), _cut_store_of, self.w, name, self.w.rng.uniform(3, 25))
            return self.s.record(self.s.leader)

        return await self._op("acquire", op)

    async def renew_leader(self, name: str, epoch: int, ttl: float) -> LeaderRecord | None:
        def op(now: float) -> LeaderRecord | None:
            ld = self.s.live_leader()
            if ld is None or ld.name != name or ld.epoch != epoch:
                return None
            ld.renewed_at, ld.expires_at = now, now + ttl
            return self.s.record(ld)

        return await self._op("renew", op)

    async def release_leader(self, name: str, epoch: int, reason: str, target: str | None = None) -> bool:
        def op(now: float) -> bool:
            ld = self.s.live_leader()
            if ld is None or ld.name != name or ld.epoch != epoch:
                return False
            self.s.leader = None
            self.s.version += 1
            if self.s.epoch is not None and self.s.epoch.epoch == epoch:
                self.s.epoch = released_record(self.s.epoch, now, reason, target)
            self.w.note(f"store: {name} releases epoch {epoch}")
            return True

        return await self._op("release", op)

    async def get_epoch_record(self) -> EpochRecord | None:
        return await self._op("get_epoch", lambda now: self.s.epoch)

    # -- cooldown
    async def start_cooldown(self, name: str, epoch: int, ttl: float) -> bool:
        def op(now: float) -> bool:
            ld = self.s.live_leader()
            if ld is None or ld.name != name or ld.epoch != epoch:
                return False
            self.s.cooldown = (Cooldown(name, epoch, self.w.clock.time(), now + ttl), now + ttl)
            return True

        return await self._op("start_cooldown", op)

    def _cooldown(self, now: float) -> Cooldown | None:
        if self.s.cooldown is not None and self.s.cooldown[1] <= now:
            self.s.cooldown = None
        return self.s.cooldown[0] if self.s.cooldown else None

    async def get_cooldown(self) -> Cooldown | None:
        return await self._op("get_cooldown", self._cooldown)

    # -- members
    async def put_member(self, name: str, payload: Mapping[str, Any], ttl: float) -> None:
        def op(now: float) -> None:
            self.s.members[name] = (dict(payload), self.w.clock.time(), now + ttl)

        await self._op("put_member", op)

    def _members(self, now: float) -> MembersSnapshot:
        live = {n: MemberRecord(n, p, at) for n, (p, at, exp) in self.s.members.items() if exp > now}
        return MembersSnapshot(live, ())

    async def get_members(self) -> MembersSnapshot:
        return await self._op("get_members", self._members)

    # -- crl
    async def put_crl_block(self, name: str, epoch: int, lines: Sequence[str]) -> bool:
        def op(now: float) -> bool:
            ld = self.s.live_leader()
            if ld is None or ld.name != name or ld.epoch != epoch:
                return False
            self.s.crl = CRLBlock(name, epoch, tuple(lines), now)
            return True

        return await self._op("put_crl", op)

    async def get_crl_block(self) -> CRLBlock | None:
        return await self._op("get_crl", lambda now: self.s.crl)

    # -- flags
    def _flags(self) -> Flags:
        return Flags(self.s.paused_at is not None, self.s.paused_at, self.s.switchover, self.s.cooldown_ack_at)

    async def get_flags(self) -> Flags:
        return await self._op("get_flags", lambda now: self._flags())

    async def set_paused(self, paused: bool) -> None:
        def op(now: float) -> None:
            self.s.paused_at = (self.s.paused_at or now) if paused else None

        await self._op("set_paused", op)

    async def request_switchover(self, target: str, kind: SwitchoverKind, requested_by: str) -> SwitchoverRequest:
        def op(now: float) -> SwitchoverRequest:
            self.s.switchover = SwitchoverRequest(f"r{self.w.rng.getrandbits(32):08x}", target, kind, now, requested_by)
            return self.s.switchover

        return await self._op("request_switchover", op)

    async def clear_switchover(self, request_id: str | None = None) -> None:
        def op(now: float) -> None:
            if self.s.switchover is not None and (request_id is None or self.s.switchover.id == request_id):
                self.s.switchover = None

        await self._op("clear_switchover", op)

    async def ack_cooldown(self) -> float:
        def op(now: float) -> float:
            self.s.cooldown, self.s.cooldown_ack_at = None, now
            return now

        return await self._op("ack", op)

    # -- history, journal
    async def append_history(self, event: Mapping[str, Any]) -> HistoryEvent:
        def op(now: float) -> HistoryEvent:
            e = HistoryEvent(len(self.s.history) + 1, now, dict(event))
            self.s.history.append(e)
            return e

        return await self._op("append_history", op)

    async def get_history(self, limit: int = 50) -> list[HistoryEvent]:
        return await self._op("get_history", lambda now: list(self.s.history[-limit:]))

    async def put_step(self, name: str, step: Mapping[str, Any] | None) -> None:
        def op(now: float) -> None:
            if step is None:
                self.s.steps.pop(name, None)
            else:
                self.s.steps[name] = dict(step)

        await self._op("put_step", op)

    async def get_step(self, name: str) -> dict[str, Any] | None:
        return await self._op("get_step", lambda now: self.s.steps.get(name))

    # -- `ca-watchdog doctor`'s write check (the simulation never runs doctor; the interface needs it)
    async def put_doctor_token(self, name: str, token: str, ttl: float) -> None:
        def op(now: float) -> None:
            self.s.doctor[name] = (token, now + ttl)

        await self._op("put_doctor_token", op)

    async def get_doctor_token(self, name: str) -> str | None:
        def op(now: float) -> str | None:
            token, expires = self.s.doctor.get(name, ("", 0.0))
            return token if expires > now else None

        return await self._op("get_doctor_token", op)

    # -- one consistent read
    async def read_state(self) -> StoreState:
        def op(now: float) -> StoreState:
            ld = self.s.live_leader()
            self._seen_version = self.s.version
            return StoreState(
                self.s.record(ld) if ld else None,
                self.s.epoch,
                False,
                self._members(now),
                self._flags(),
                self._cooldown(now),
                (),
            )

        return await self._op("read_state", op)

    async def watch_leader(self, timeout: float) -> None:
        """Returns once the key changes (holder, epoch, presence; expiry included) or at the timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            self.s.live_leader()
            if self.s.version != self._seen_version:
                return
            wait = deadline - loop.time()
            if self.s.leader is not None:
                wait = min(wait, max(0.0, self.s.leader.expires_at - loop.time()) + 0.001)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.s.changed.wait(), wait)

    async def close(self) -> None:
        return None


# ---- one history ----------------------------------------------------------------------------------------------


@dataclass
class Result:
    seed: int
    violations: list[str]
    log: list[str]
    members: int
    failovers: int


async def _history(w: World) -> None:
    WORLD.set(w)
    loop = asyncio.get_running_loop()

    def on_error(lp: asyncio.AbstractEventLoop, ctx: dict[str, Any]) -> None:
        exc = ctx.get("exception")
        if isinstance(exc, Violation) or "destroyed but it is pending" in str(ctx.get("message")):
            return  # a killed daemon's tasks are dropped on purpose
        w.note(f"loop error: {ctx.get('message')} {exc!r}")

    loop.set_exception_handler(on_error)
    for n in w.names:
        await _boot_ca(w, n)
    for n in w.names:
        w.start_daemon(n)

    async def checker() -> None:
        while True:
            await asyncio.sleep(0.25)
            w.safe_check("periodic")

    check_task = loop.create_task(checker())
    await w.faults()
    deadline = w.clock.now + QUIET_PHASE
    served_at: float | None = None
    while w.clock.now < deadline:
        await asyncio.sleep(0.5)
        await _operator_bootstraps_if_asked(w)
        leader = w.store.live_leader()
        masters = w.serving_masters()
        if masters and leader is not None and leader.name == masters[0]:
            served_at = w.clock.now if served_at is None else served_at
            if w.clock.now - served_at >= STABLE_TAIL:
                break  # live, and stayed so: the rest of the quiet phase would only repeat itself
        else:
            served_at = None
    if served_at is None or served_at - w.heal_at > LIVENESS_BOUND:
        took = "never" if served_at is None else f"after {served_at - w.heal_at:.1f}s"
        eligible = [n for n, h in w.hosts.items() if h.ca.state != "failed"]
        if eligible:
            w.violations.append(
                f"liveness: no master serving {took} once faults stopped (bound {LIVENESS_BOUND:g}s); "
                f"CAs {[(n, h.ca.state, h.ca.loaded_role) for n, h in w.hosts.items()]}"
            )
    check_task.cancel()
    for h in w.hosts.values():
        w.kill_daemon(h.name)


OPERATOR_READS_STATUS = 5.0  # after faults stop, the operator looks at what the daemons say


async def _operator_bootstraps_if_asked(w: World) -> None:
    """A store that never had a master cannot fail over: there is no master to replace, and only a CS.cfg
    master (or the operator) names the first one. When faults (say, a guard's demotion during a store
    outage before the first key was ever taken) leave every CS.cfg a clone, every daemon says so and
    names the command; the operator runs it, as the runbook says, and the liveness bound counts from
    there. Nothing else in the simulation does what the tool did not ask for."""
    if w.store.epoch is not None or w.clock.now - w.heal_at < OPERATOR_READS_STATUS:
        return
    daemons = [h.daemon for h in w.hosts.values() if h.alive and h.daemon is not None]
    reasons = [d.snapshot.decision.reason if d.snapshot.decision else "" for d in daemons]
    if not reasons or not all("ca-watchdog bootstrap --master" in r for r in reasons):
        return
    running = [n for n, h in w.hosts.items() if h.ca.state == "running"]
    if not running:
        return
    target = w.rng.choice(running)
    w.note(f"OPERATOR bootstrap --master {target} (every daemon asks for it: {reasons[0]})")
    rec = await SimStore(w, target, gated=False).acquire_leader(
        target, TIMING["ttl"], "bootstrap by operator", kind="bootstrap", expect_epoch=0
    )
    if rec is not None:
        w.heal_at = w.clock.now


def run_history(seed: int, members: int | None = None, keep_log: bool = False) -> Result:
    logging.getLogger("ca_watchdog").setLevel(logging.CRITICAL)
    # on tmpfs where there is one, like /run on a CA host: each history renames its files hundreds of times
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix=f"cawd-sim-{seed}-", dir=shm) as tmp:
        log: list[str] = []
        w = World(seed, Path(tmp), members, log)
        clock = w.clock
        loop = VirtualLoop(clock)
        with virtual_time(clock), _patched_fence(), _memoized_cscfg():
            try:
                loop.run_until_complete(_history(w))
            except Violation:
                pass
            finally:
                for t in asyncio.all_tasks(loop):
                    t.cancel()
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(asyncio.sleep(0))
                loop.close()
        w.final_checks()
        failovers = sum(1 for e in w.store.history if e.event.get("type") == "promoted")
        return Result(seed, w.violations, log if (keep_log or w.violations) else [], len(w.names), failovers)


@contextlib.contextmanager
def _memoized_cscfg() -> Any:
    """Every daemon reads its CS.cfg every cycle, mostly the same bytes: `cscfg.parse` and `cscfg.classify`
    are pure over immutable values, so the same input gets the same (frozen) result, without the CPU
    that 10,000 histories would spend on parsing it again (about a tenth of a history's cost)."""
    parse, classify = cscfg.parse, cscfg.classify
    parsed: dict[tuple[str, bytes], cscfg.CSCfg] = {}
    reports: dict[int, tuple[cscfg.CSCfg, cscfg.RoleReport]] = {}

    def memo_parse(text: str | bytes, path: str = "<CS.cfg>") -> cscfg.CSCfg:
        if not isinstance(text, bytes):
            return parse(text, path)
        key = (path, text)
        cfg = parsed.get(key)
        if cfg is None:
            cfg = parse(text, path)  # an error is raised every time, as the real parse does
            if len(parsed) > 64:
                parsed.clear()
                reports.clear()
            parsed[key] = cfg
        return cfg

    def memo_classify(cfg: cscfg.CSCfg) -> cscfg.RoleReport:
        hit = reports.get(id(cfg))
        if hit is not None and hit[0] is cfg:  # the entry holds cfg alive: its id cannot be reused meanwhile
            return hit[1]
        report = classify(cfg)
        if len(reports) > 256:
            reports.clear()
        reports[id(cfg)] = (cfg, report)
        return report

    cscfg.parse, cscfg.classify = memo_parse, memo_classify  # type: ignore[assignment]
    try:
        yield
    finally:
        cscfg.parse, cscfg.classify = parse, classify  # type: ignore[assignment]


@contextlib.contextmanager
def _patched_fence() -> Any:
    """fence_command is the simulated STONITH; a cycle that raises is a violation (it is logged and the
    daemon goes on, but in the simulation nothing may raise: every input is well formed)."""
    saved = actuator_mod.run_fence_command
    saved_failed = Watchdog._cycle_failed

    def cycle_failed(self: Watchdog, exc: Exception) -> None:
        w = WORLD.get()
        if len(w.violations) < 20:
            w.violations.append(f"t={w.clock.now - 1000:.2f}: {self.me}: a cycle raised {exc!r}")
        saved_failed(self, exc)

    actuator_mod.run_fence_command = sim_fence  # type: ignore[assignment]
    Watchdog._cycle_failed = cycle_failed  # type: ignore[method-assign]
    try:
        yield
    finally:
        actuator_mod.run_fence_command = saved  # type: ignore[assignment]
        Watchdog._cycle_failed = saved_failed  # type: ignore[method-assign]


__all__ = ["ENDED_RELEASED", "LIVENESS_BOUND", "UNLEASED_BOUND", "Result", "World", "run_history"]
