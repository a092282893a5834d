"""Issue 6: a network partition that isolates the master host together with its daemon.

Two network namespaces made by this test, joined by a veth pair whose ends live only inside
them (nothing but loopback is ever configured in the test's own namespace):

    cwpA  10.77.0.1/30   the master host: ca1's simulated CA and ca1's daemon
    cwpB  10.77.0.2/30   the rest: etcd (the store), ca2's and ca3's CAs and daemons

Every process is started with `ip netns exec`, and every look at the cluster is taken from inside
a namespace (a sampler process per side probes its CAs every 0.2 s; the CLI runs in cwpB). No
389-DS (members have no ldap_url) and etcd as the store: a SQLite file would be shared through
the file system and a partition could not cut it.

The partition takes cwpB's end of the link down. For cwpA that is a black hole (its end stays
up without carrier, its neighbour entries are static: every packet to cwpB is silently dropped and
every connection times out), for cwpB an unreachable network. The master must self-fence (the
README's rule 1: no renewal, and no failsafe acknowledgement since no peer can be asked) before its
lease ends, and only then may a clone take the key. On healing, ca1 comes back as a clone of the
new master.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ca_watchdog import cscfg, lease_file
from ca_watchdog.config import TimingSettings
from ca_watchdog.lab.cluster import LAB_TIMING, LabCluster
from ca_watchdog.lab.etcdlab import ETCD_BINARY, EtcdLab
from ca_watchdog.lab.service import alive

pytestmark = pytest.mark.lab

ADDR_A, ADDR_B = "10.77.0.1", "10.77.0.2"
LINK_A, LINK_B = "cwpa0", "cwpb0"
BASE_PORT = 22000  # agents 22000..22002, APIs 22020..22022
ETCD_PORTS = (22050, 22051)
SAMPLER = Path(__file__).with_name("netns_sampler.py")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@dataclass
class Net:
    a: str
    b: str

    def prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def run(self, ns: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.prefix(ns), *argv], capture_output=True, text=True, timeout=timeout)

    def cut(self) -> None:
        _ip("-n", self.b, "link", "set", LINK_B, "down")

    def heal(self) -> None:
        _ip("-n", self.b, "link", "set", LINK_B, "up")


@contextlib.contextmanager
def two_namespaces() -> Iterator[Net]:
    tag = f"{os.getpid() % 100000}"
    net = Net(f"cwpA{tag}", f"cwpB{tag}")
    made: list[str] = []
    try:
        for ns in (net.a, net.b):
            try:
                done = _ip("netns", "add", ns, check=False)
            except OSError as exc:  # no iproute2
                pytest.skip(f"cannot create network namespaces: {exc}")
            if done.returncode != 0:
                pytest.skip(f"`ip netns add {ns}` failed: {done.stderr.strip()}")
            made.append(ns)
        # both ends are created directly inside their namespaces: the root namespace never has them
        _ip("link", "add", LINK_A, "netns", net.a, "type", "veth", "peer", "name", LINK_B, "netns", net.b)
        for ns, link, addr in ((net.a, LINK_A, ADDR_A), (net.b, LINK_B, ADDR_B)):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", link)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", link, "up")
        # static neighbours: across the cut, packets are dropped silently (a black hole), never refused by
        # a failed ARP resolution ("no route to host" at once), so every store call waits its full timeout
        for ns, link, peer_ns, peer_link, peer_addr in (
            (net.a, LINK_A, net.b, LINK_B, ADDR_B),
            (net.b, LINK_B, net.a, LINK_A, ADDR_A),
        ):
            mac = json.loads(_ip("-n", peer_ns, "-j", "link", "show", peer_link).stdout)[0]["address"]
            _ip("-n", ns, "neigh", "replace", peer_addr, "lladdr", mac, "dev", link, "nud", "permanent")
        yield net
    finally:
        for ns in made:
            _ip("netns", "del", ns, check=False)


@dataclass
class Sampler:
    proc: subprocess.Popen[bytes]
    out: Path

    def samples(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        lines = self.out.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def last(self) -> dict[str, str]:
        s = self.samples()
        return dict(s[-1]["roles"]) if s else {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _log_lines(path: Path) -> list[tuple[float, str]]:
    """(wall time, message) of each timestamped line of a daemon log (`asctime member LEVEL msg`)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        m = LOG_TIME.match(line)
        if m:
            t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
            out.append((t, line[m.end() :].split(" ", 2)[-1]))
    return out


def _last_renewal(path: str, seconds: float) -> float | None:
    """When the daemon sent its last successful lease renewal (wall time), read from its lease hand-off file
    for `seconds` (the latest proof seen counts; lease_file.py rewrites it after every successful renewal with
    the renewal's CLOCK_MONOTONIC send time and removes it at the self-fence).

    The lease cannot end before that send time + ttl (etcd restarts the TTL when it receives the keep-alive).
    The cycle's "renew:" decision line is no measure of it: the renewals run on their own 1 s timer, so the
    last such line before the cut may follow the last renewal by up to a second."""
    offset = time.time() - time.monotonic()  # CLOCK_MONOTONIC is shared by every process of this boot
    latest: float | None = None
    end = time.monotonic() + seconds
    while True:
        proof = lease_file.read(path, "ca1")
        if proof is not None and (latest is None or proof.renewed > latest):
            latest = proof.renewed
        if time.monotonic() >= end:
            return None if latest is None else latest + offset
        time.sleep(0.05)


def _wait(what: Callable[[], bool], timeout: float, why: str, debug: Callable[[], str]) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if what():
            return time.monotonic() - t0
        time.sleep(0.2)
    if what():
        return time.monotonic() - t0
    raise AssertionError(f"timed out after {timeout:g}s waiting for: {why}\n{debug()}")


@dataclass
class Run:
    """What one partition run measured (wall times) and saw."""

    ttl: float
    margin: float
    store_timeout: float
    cycle_budget: float = 0.0  # TimingSettings.cycle_budget: the self-fence comes this much early
    new: str = ""
    renewed: float = 0.0  # when ca1's daemon sent the last lease renewal that succeeded (its lease hand-off file)
    cut_at: float = 0.0
    fence_decided: float = 0.0
    fence_reason: str = ""
    ca1_last_master: float = 0.0  # ca1 was seen serving as master until at most here
    ca1_down: float = 0.0  # ... and seen no longer serving as master by here
    cscfg_demoted: float = 0.0  # mtime of ca1's CS.cfg once it became a clone's
    acquired_at: float = 0.0  # the new master's `acquired` history event
    new_first_master: float = 0.0  # the new master was not seen serving as master before this
    healed_at: float = 0.0
    a_samples: list[dict[str, Any]] = field(default_factory=list)
    b_samples: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    final_serving: dict[str, str] = field(default_factory=dict)
    final_roles: dict[str, str] = field(default_factory=dict)
    debug: str = ""

    def table(self) -> str:
        rel = {
            "last renewal": self.renewed,
            "partition": self.cut_at,
            "self-fence decided": self.fence_decided,
            "ca1 CA last seen master": self.ca1_last_master,
            "ca1 CA seen stopped": self.ca1_down,
            "ca1 CS.cfg demoted (mtime)": self.cscfg_demoted,
            "lease end (last renewal + ttl)": self.renewed + self.ttl,
            f"{self.new} acquired the key": self.acquired_at,
            f"{self.new} first seen master": self.new_first_master,
            "partition healed": self.healed_at,
        }
        lines = [
            f"ttl {self.ttl:g}s, safety margin {self.margin:g}s, store timeout {self.store_timeout:g}s; "
            "seconds after ca1's last renewal:"
        ]
        lines += [f"  {t - self.renewed:7.2f}  {what}" for what, t in sorted(rel.items(), key=lambda kv: kv[1])]
        return "\n".join(lines)


# store_timeout 2 s is valid (interval + 2*store_timeout < ttl) and the shipped default: the fence
# must still come in time with it, since the daemon fences one worst-case cycle early and does no
# store I/O before its CA is down.
TIMINGS = {
    "lab": dict(LAB_TIMING),
    "store_timeout_2s": {**LAB_TIMING, "store_timeout": 2.0},
}


@pytest.fixture(
    scope="module",
    params=[
        "lab",
        pytest.param("store_timeout_2s", marks=pytest.mark.slow),
    ],
)
def partition_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The whole scenario, once per timing: a healthy cluster, the cut, the failover, the heal."""
    if not os.access(ETCD_BINARY, os.X_OK):
        pytest.skip(f"{ETCD_BINARY} not installed")
    tmp_path = tmp_path_factory.mktemp("partition")
    timing = dict(TIMINGS[request.param])
    run = Run(float(timing["ttl"]), float(timing["safety_margin"]), float(timing["store_timeout"]))
    t = TimingSettings(**{k: float(v) if k != "failure_threshold" else int(v) for k, v in timing.items()})
    run.cycle_budget = t.cycle_budget
    samplers: list[Sampler] = []
    with two_namespaces() as net:
        etcd = EtcdLab(tmp_path / "etcd", *ETCD_PORTS, host=ADDR_B, exec_prefix=net.prefix(net.b))
        c = LabCluster(
            tmp_path / "lab",
            base_port=BASE_PORT,
            ds=None,
            store_backend="etcd",
            etcd_endpoint=etcd.endpoint,
            timing=timing,
            hosts={"ca1": ADDR_A, "ca2": ADDR_B, "ca3": ADDR_B},
            exec_prefix={"ca1": net.prefix(net.a), "ca2": net.prefix(net.b), "ca3": net.prefix(net.b)},
        )
        try:
            etcd.start()
            c.build()
            assert c.pki is not None
            c.start()

            def sampler(ns: str, names: tuple[str, ...]) -> Sampler:
                assert c.pki is not None
                out = tmp_path / f"samples-{ns}.jsonl"
                targets = [f"{n}={c.nodes[n].agent_url}" for n in names]
                argv = [sys.executable, str(SAMPLER), "--out", str(out), "--cafile", str(c.pki.ca_cert), *targets]
                with open(tmp_path / f"sampler-{ns}.log", "ab") as log:
                    proc = subprocess.Popen(
                        [*net.prefix(ns), *argv], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                    )
                s = Sampler(proc, out)
                samplers.append(s)
                return s

            side_a, side_b = sampler(net.a, ("ca1",)), sampler(net.b, ("ca2", "ca3"))

            def cli(*args: str) -> subprocess.CompletedProcess[str]:
                # from inside cwpB, with ca3's configuration (it reaches etcd there)
                cmd = [sys.executable, "-m", "ca_watchdog.cli", *args, "--config", str(c.nodes["ca3"].config)]
                return net.run(net.b, *cmd)

            def status() -> dict[str, Any]:
                done = cli("status", "--json")
                return dict(json.loads(done.stdout)) if done.returncode == 0 else {}

            def serving() -> dict[str, str]:
                return {**side_a.last(), **side_b.last()}

            def debug() -> str:
                parts = [f"serving: {serving()}", f"etcd: {etcd.log_tail(5)}"]
                for n, node in c.nodes.items():
                    if node.daemon_log.exists():
                        tail = node.daemon_log.read_text(errors="replace").splitlines()[-15:]
                        parts.append(f"--- {n} daemon.log\n" + "\n".join(tail))
                return "\n".join(parts)

            # ---- a healthy cluster, seen from both sides ------------------------------------------
            healthy = {"ca1": "master", "ca2": "clone", "ca3": "clone"}
            _wait(lambda: serving() == healthy, 60, "ca1 serving as master, ca2 and ca3 as its clones", debug)

            def settled() -> bool:
                st = status()
                return st.get("leader") == "ca1" and all(r.get("ca") == "running" for r in st.get("members", []))

            _wait(settled, 60, "ca1 holds the key and every member reports its CA running", debug)
            time.sleep(3)  # a few renewals, and the clones watching the master
            assert serving() == healthy

            # ---- the partition ---------------------------------------------------------------------
            lease_path = c.settings("ca1").node.lease_file
            before_cut = _last_renewal(lease_path, 0.0)
            net.cut()
            run.cut_at = time.time()
            # no renewal can succeed after the cut, and the file stays until the self-fence (2.5 s or more
            # after the last renewal): a second of reads sees the last one published before the cut
            after_cut = _last_renewal(lease_path, 1.0)
            renewals = [t for t in (before_cut, after_cut) if t is not None]
            assert renewals, f"ca1's daemon published no lease renewal\n{debug()}"
            run.renewed = max(renewals)
            # ca1 from its own side: its CA stops, its CS.cfg becomes a clone's (self-fence)
            _wait(lambda: side_a.last().get("ca1") != "master", 3 * run.ttl, "ca1's CA no longer serving", debug)
            _wait(lambda: c.roles()["ca1"] == "clone", 3 * run.ttl, "ca1's CS.cfg demoted", debug)
            run.cscfg_demoted = c.nodes["ca1"].cs_cfg.stat().st_mtime

            def new_master() -> str | None:
                b = side_b.last()
                masters = [n for n in ("ca2", "ca3") if b.get(n) == "master"]
                return masters[0] if len(masters) == 1 and status().get("leader") == masters[0] else None

            _wait(lambda: new_master() is not None, 6 * run.ttl, "ca2 or ca3 serving as master with the key", debug)
            new = new_master()
            assert new is not None
            run.new = new
            time.sleep(3)
            assert side_a.last().get("ca1") != "master", debug()
            assert c.roles()["ca1"] == "clone", debug()

            # ---- healing ----------------------------------------------------------------------------
            net.heal()
            run.healed_at = time.time()
            target = f"{c.nodes[new].host}:{c.nodes[new].agent_port}"

            def ca1_follows() -> bool:
                if side_a.last().get("ca1") != "clone":
                    return False
                report = cscfg.classify(cscfg.read_cscfg(c.nodes["ca1"].cs_cfg))
                return f"{report.master_agent_host}:{report.master_agent_port}" == target

            _wait(ca1_follows, 6 * run.ttl, f"ca1 serving again as a clone of {new} ({target})", debug)

            def ca1_reported() -> bool:
                st = status()
                return st.get("leader") == new and {r["member"]: r["ca"] for r in st["members"]}.get("ca1") == "running"

            _wait(ca1_reported, 30, "ca1 reporting its CA running again through the store", debug)
            time.sleep(2)
            for s in samplers:
                s.stop()
            run.final_serving, run.final_roles = serving(), c.roles()
            run.events = list(json.loads(cli("history", "--json").stdout))
            run.a_samples, run.b_samples = side_a.samples(), side_b.samples()
            run.debug = debug()
        finally:
            for s in samplers:
                s.stop()
            c.stop()
            for n in c.names:  # whatever the lab's stop could not reach
                pid = c.ca_pid(n)
                if pid is not None and alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            etcd.stop()

    # ---- the times ---------------------------------------------------------------------------------
    ca1_master = [s for s in run.a_samples if s["roles"]["ca1"] == "master"]
    ca1_stopped = [s for s in run.a_samples if s["roles"]["ca1"] != "master" and s["t0"] > run.cut_at]
    new_master_samples = [s for s in run.b_samples if s["roles"][run.new] == "master"]
    assert ca1_master and ca1_stopped and new_master_samples
    run.ca1_last_master = max(s["t1"] for s in ca1_master)
    run.ca1_down = min(s["t1"] for s in ca1_stopped)
    run.new_first_master = min(s["t0"] for s in new_master_samples)

    assert run.renewed <= run.cut_at, run.debug
    log = _log_lines(c.nodes["ca1"].daemon_log)
    fences = [(t, msg) for t, msg in log if msg.startswith("self_fence: ") and t > run.cut_at]
    assert fences, f"ca1's daemon never decided to self-fence\n{run.debug}"
    run.fence_decided, run.fence_reason = fences[0]
    acquired = [e for e in run.events if e.get("type") == "acquired" and float(e["at"]) > run.cut_at]
    assert [e["name"] for e in acquired] == [run.new], run.events
    run.acquired_at = float(acquired[0]["at"])
    print("\n" + run.table())
    return run


def test_partitioned_master_host_self_fences_before_a_clone_promotes(partition_run: Run) -> None:
    r = partition_run
    why = "\n" + r.table() + "\n" + r.debug
    # never two serving masters: on cwpB's side never two in one sample, none before the cut; and every
    # sample of ca1 as master (cwpA's side) ended before the new master was first seen serving
    for s in r.b_samples:
        masters = [n for n, role in s["roles"].items() if role == "master"]
        assert len(masters) <= 1, f"two masters at once: {s}"
        assert not masters or s["t0"] > r.cut_at, f"a clone serving as master before the partition: {s}"
    assert r.ca1_last_master < r.new_first_master, "ca1 and the new master both served as master" + why
    # the master fenced itself (no renewal, no peer could acknowledge it) one worst-case cycle before
    # ttl - safety_margin, and not before that point: a store blip shorter than it costs nothing
    assert "no failsafe acknowledgement from ca2, ca3" in r.fence_reason, r.fence_reason
    fence_at = r.ttl - r.margin - r.cycle_budget
    assert r.fence_decided - r.renewed >= fence_at - 0.1, f"self-fenced before {fence_at:g}s" + why
    # its CA stopped before its lease could end; a clone took the key only after it ended, after the stop
    assert r.ca1_down < r.renewed + r.ttl, "ca1's CA still served as master after its lease ended" + why
    # (0.1 s: timestamp rounding; the renewal is the daemon's own send time, so the lease ends no earlier)
    assert r.acquired_at >= r.renewed + r.ttl - 0.1, "the key was taken while ca1's lease still ran" + why
    assert r.ca1_down < r.acquired_at < r.new_first_master, why
    promoted = [(e["name"], e.get("old_master")) for e in r.events if e.get("type") == "promoted"]
    assert promoted == [(r.new, "ca1")], r.events
    # healed: ca1 back as a clone of the new master (checked live against its CS.cfg's master.ca.agent)
    expected = {n: ("master" if n == r.new else "clone") for n in ("ca1", "ca2", "ca3")}
    assert r.final_serving == expected, why
    assert r.final_roles == expected, why
    assert not [s for s in r.a_samples if s["roles"]["ca1"] == "master" and s["t0"] > r.ca1_down], "ca1 master again"


def test_partitioned_master_demotes_its_cscfg_before_its_lease_ends(partition_run: Run) -> None:
    r = partition_run
    assert r.cscfg_demoted < r.renewed + r.ttl, "\n" + r.table()
    assert r.cscfg_demoted < r.acquired_at, "\n" + r.table()
