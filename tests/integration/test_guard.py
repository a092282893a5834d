"""The guard (ExecStartPre= of pki-tomcatd@): before the CA starts, CS.cfg is made to agree with the
store. Real CS.cfg files, a real SQLite store; an unreachable etcd endpoint for "store down"."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ca_watchdog import cscfg, lease_file
from ca_watchdog.config import Settings, parse_settings
from ca_watchdog.guard import guard, run_guard
from ca_watchdog.lab.etcdlab import free_ports
from ca_watchdog.store import open_store
from ca_watchdog.store.base import Store

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def settings(tmp_path: Path, me: str = "ca1", store: dict[str, Any] | None = None) -> Settings:
    members = [
        {"name": n, "agent_url": f"https://{n}.example.test:8443", "priority": p}
        for n, p in (("ca1", 100), ("ca2", 200), ("ca3", 100))
    ]
    return parse_settings(
        {
            "node": {"name": me, "cs_cfg": str(tmp_path / "CS.cfg")},
            "cluster": {"members": members},
            "store": store or {"backend": "sqlite", "path": str(tmp_path / "state.db")},
            "timing": {"store_timeout": 0.5, "interval": 1.0, "ttl": 10.0, "agent_timeout": 1.0, "safety_margin": 3.0},
        },
        "test",
    )


def store_of(s: Settings) -> Store:
    return open_store(s.store, [m.name for m in s.members], s.timing.store_timeout)


@pytest.fixture
def master_file(tmp_path: Path) -> Path:
    p = tmp_path / "CS.cfg"
    shutil.copy(FIXTURES / "CS.cfg.master.sample", p)
    return p


def role_and_target(path: Path) -> tuple[str, str | None]:
    cfg = cscfg.read_cscfg(path)
    return cscfg.classify(cfg).role.value, cfg.get(cscfg.KEY_MASTER_HOST)


async def test_bootstrap_empty_store_leaves_the_master_cscfg_as_it_is(tmp_path: Path, master_file: Path) -> None:
    s = settings(tmp_path)
    before = master_file.read_bytes()
    async with store_of(s) as st:
        result = await guard(s, st)
    assert not result.changed and "bootstrap" in result.message
    assert master_file.read_bytes() == before


async def test_this_node_holds_the_key_its_master_cscfg_is_left_alone(tmp_path: Path, master_file: Path) -> None:
    s = settings(tmp_path)
    before = master_file.read_bytes()
    async with store_of(s) as st:
        assert await st.acquire_leader("ca1", 10, "test")
        result = await guard(s, st)
    assert not result.changed and "ca1 holds the leader key" in result.message
    assert master_file.read_bytes() == before


async def test_old_master_returning_while_another_holds_the_key_starts_as_its_clone(
    tmp_path: Path, master_file: Path
) -> None:
    s = settings(tmp_path)
    before = cscfg.unrelated_lines(cscfg.read_cscfg(master_file))
    async with store_of(s) as st:
        assert await st.acquire_leader("ca3", 10, "failover")
        result = await guard(s, st)
    assert result.changed and "ca3 holds the leader key" in result.message and "was master" in result.message
    assert role_and_target(master_file) == ("clone", "ca3.example.test")
    assert cscfg.unrelated_lines(cscfg.read_cscfg(master_file)) == before
    assert list(tmp_path.glob("CS.cfg.*.ca-watchdog")), "no backup was made"


async def test_no_master_holds_the_key_after_a_release_the_master_cscfg_becomes_a_clone_of_the_best_candidate(
    tmp_path: Path, master_file: Path
) -> None:
    s = settings(tmp_path)
    async with store_of(s) as st:
        rec = await st.acquire_leader("ca3", 10, "earlier")
        assert rec is not None
        await st.append_history({"type": "acquired", "name": "ca3", "epoch": rec.epoch})
        assert await st.release_leader("ca3", rec.epoch, "test")
        result = await guard(s, st)
    assert result.changed and "no master holds the key" in result.message
    # ca3 stepped down; with no fresh member records the highest-priority other member is the best guess
    assert role_and_target(master_file) == ("clone", "ca2.example.test")


async def test_store_unreachable_the_ca_starts_as_a_clone_of_the_highest_priority_peer(
    tmp_path: Path, master_file: Path
) -> None:
    (port,) = free_ports(1, 24990)
    s = settings(tmp_path, store={"backend": "etcd", "etcd": {"endpoints": [f"http://127.0.0.1:{port}"]}})
    result = await run_guard(s)
    assert result.changed and "store unreachable" in result.message
    assert role_and_target(master_file) == ("clone", "ca2.example.test")


async def test_guard_twice_is_a_no_op_the_second_time(tmp_path: Path, master_file: Path) -> None:
    s = settings(tmp_path)
    async with store_of(s) as st:
        assert await st.acquire_leader("ca2", 10, "x")
        assert (await guard(s, st)).changed
        after = master_file.read_bytes()
        second = await guard(s, st)
    assert not second.changed and "ca2 holds the leader key" in second.message and "left as clone" in second.message
    assert master_file.read_bytes() == after


def test_guard_command_refuses_a_malformed_cscfg_with_exit_2_and_touches_nothing(tmp_path: Path) -> None:
    p = tmp_path / "CS.cfg"
    shutil.copy(FIXTURES / "CS.cfg.malformed.sample", p)
    before = p.read_bytes()
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[node]\nname = "ca1"\ncs_cfg = "{p}"\n[store]\npath = "{tmp_path / "s.db"}"\n'
        '[[cluster.members]]\nname = "ca1"\nagent_url = "https://ca1.example.test:8443"\n'
        '[[cluster.members]]\nname = "ca2"\nagent_url = "https://ca2.example.test:8443"\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "ca_watchdog.cli", "guard", "--config", str(cfg), "pki-tomcat"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert str(p) in out.stderr and ":42:" in out.stderr
    assert p.read_bytes() == before


async def test_defect13_a_ca_started_before_any_daemon_ran_on_a_fresh_sqlite_host_keeps_its_master_cscfg(
    tmp_path: Path, master_file: Path
) -> None:
    # no store file at all (and no directory for it): nobody was ever master here, so this is a bootstrap,
    # not an unreachable store; demoting the only master would leave the cluster without one
    s = settings(tmp_path, store={"path": str(tmp_path / "not-yet" / "state.db")})
    before = master_file.read_bytes()
    result = await run_guard(s)
    assert not result.changed and "bootstrap" in result.message, result.message
    assert master_file.read_bytes() == before
    assert not (tmp_path / "not-yet").exists(), "the guard must not create the daemon's store"


async def test_a_store_directory_the_guard_cannot_search_is_an_unreachable_store_not_a_bootstrap(
    tmp_path: Path, master_file: Path
) -> None:
    """ca2 holds the key; the guard may not look into the store's directory (a sandbox, SELinux, a
    mode): that is a store it cannot read, so the master CS.cfg is demoted, never kept as a bootstrap
    (found in the real-systemd bed with InaccessiblePaths= on the directory)."""
    s = settings(tmp_path, store={"path": str(tmp_path / "store" / "state.db")})
    (tmp_path / "store").mkdir()
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[node]\nname = "ca1"\ncs_cfg = "{master_file}"\n[store]\npath = "{s.store.path}"\n'
        '[[cluster.members]]\nname = "ca1"\nagent_url = "https://ca1.example.test:8443"\n'
        '[[cluster.members]]\nname = "ca2"\nagent_url = "https://ca2.example.test:8443"\n'
    )
    async with store_of(s) as st:
        assert await st.acquire_leader("ca2", 60, "test")
    os.chmod(tmp_path / "store", 0)
    # root searches a mode-0 directory through CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH: drop every capability
    no_caps = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"] if os.geteuid() == 0 else []
    try:
        out = await asyncio.to_thread(
            subprocess.run,
            [*no_caps, sys.executable, "-m", "ca_watchdog.cli", "guard", "--config", str(cfg), "pki-tomcat"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.chmod(tmp_path / "store", 0o700)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"store unreachable ({s.store.path}: Permission denied)" in out.stdout, out.stdout
    assert role_and_target(master_file) == ("clone", "ca2.example.test"), out.stdout


# ---- the daemon's lease hand-off (the daemon starts its CA as master during a store blip) -------------


def unreachable_etcd(tmp_path: Path) -> Settings:
    (port,) = free_ports(1, 24990)
    s = settings(tmp_path, store={"backend": "etcd", "etcd": {"endpoints": [f"http://127.0.0.1:{port}"]}})
    return replace(s, node=replace(s.node, lease_file=str(tmp_path / "run" / "lease.json")))


def hand_off(s: Settings, epoch: int, renewed_ago: float, name: str = "ca1") -> None:
    Path(s.node.lease_file).parent.mkdir(mode=0o700, exist_ok=True)
    lease_file.publish(s.node.lease_file, lease_file.LeaseProof(name, epoch, time.monotonic() - renewed_ago))


async def test_store_blip_while_the_daemon_starts_its_ca_as_master_the_guard_keeps_the_promotion(
    tmp_path: Path, master_file: Path
) -> None:
    """The daemon renewed its lease (epoch 7) a second ago and starts its CA as master; the guard cannot
    reach the store. The daemon's hand-off proves the lease: the promotion is not demoted under it."""
    s = unreachable_etcd(tmp_path)
    before = master_file.read_bytes()
    hand_off(s, 7, renewed_ago=1.0)
    result = await run_guard(s)
    assert not result.changed and "epoch 7" in result.message, result.message
    assert master_file.read_bytes() == before


async def test_a_hand_off_past_the_fence_point_proves_nothing_the_guard_demotes(
    tmp_path: Path, master_file: Path
) -> None:
    s = unreachable_etcd(tmp_path)
    hand_off(s, 7, renewed_ago=s.timing.ttl)  # the daemon stopped renewing a ttl ago
    result = await run_guard(s)
    assert result.changed and role_and_target(master_file) == ("clone", "ca2.example.test")


async def test_a_hand_off_naming_another_member_or_planted_by_another_account_is_ignored(
    tmp_path: Path, master_file: Path
) -> None:
    s = unreachable_etcd(tmp_path)
    hand_off(s, 7, renewed_ago=0.5, name="ca2")
    result = await run_guard(s)
    assert result.changed and "ignored" in result.message and role_and_target(master_file)[0] == "clone"
    shutil.copy(FIXTURES / "CS.cfg.master.sample", master_file)
    hand_off(s, 7, renewed_ago=0.5)
    os.chmod(s.node.lease_file, 0o666)  # writable by anyone: pkiuser could have forged it
    result = await run_guard(s)
    assert result.changed and "ignored" in result.message and role_and_target(master_file)[0] == "clone"


async def test_the_store_outranks_a_hand_off_another_member_holds_the_key_the_master_cscfg_is_demoted(
    tmp_path: Path, master_file: Path
) -> None:
    s = settings(tmp_path)
    s = replace(s, node=replace(s.node, lease_file=str(tmp_path / "run" / "lease.json")))
    hand_off(s, 1, renewed_ago=0.5)
    async with store_of(s) as st:
        assert await st.acquire_leader("ca3", 10, "failover")
        result = await guard(s, st)
    assert result.changed and role_and_target(master_file) == ("clone", "ca3.example.test")


@pytest.mark.parametrize("target", ["environment", "master-cscfg"])
def test_finding2_the_guard_command_refuses_a_symlinked_cscfg_and_writes_nothing_through_it(
    tmp_path: Path, target: str
) -> None:
    # the CA's account replaced CS.cfg with a symlink (to a fake /etc/environment, or to a master
    # CS.cfg elsewhere); ca2 holds the key, so the guard would demote: it must refuse, write nothing
    # and keep the CA from starting (exit status not 0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    real = elsewhere / "file"
    if target == "environment":
        real.write_text('PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"\n')
    else:
        shutil.copy(FIXTURES / "CS.cfg.master.sample", real)
    before = real.read_bytes()
    link = tmp_path / "CS.cfg"
    link.symlink_to(real)
    s = settings(tmp_path)

    async def take() -> None:
        async with store_of(s) as st:
            assert await st.acquire_leader("ca2", 30, "test")

    asyncio.run(take())
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[node]\nname = "ca1"\ncs_cfg = "{link}"\n[store]\npath = "{tmp_path / "state.db"}"\n'
        '[[cluster.members]]\nname = "ca1"\nagent_url = "https://ca1.example.test:8443"\n'
        '[[cluster.members]]\nname = "ca2"\nagent_url = "https://ca2.example.test:8443"\n'
        '[[cluster.members]]\nname = "ca3"\nagent_url = "https://ca3.example.test:8443"\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "ca_watchdog.cli", "guard", "--config", str(cfg), "pki-tomcat"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0, out.stdout + out.stderr
    assert "symlink" in out.stderr, out.stdout + out.stderr
    assert real.read_bytes() == before, "the guard wrote through the symlink"
    assert link.is_symlink() and sorted(p.name for p in elsewhere.iterdir()) == ["file"]
    assert not list(tmp_path.glob("CS.cfg.*")), "a backup or temp file was left"
