"""Operator commands against a real SQLite store: what an administrator types and sees."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ca_watchdog.config import load_settings
from ca_watchdog.model import MemberState
from ca_watchdog.store import open_store


@pytest.fixture
def config(tmp_path: Path) -> Path:
    cfg = tmp_path / "config.toml"
    members = "".join(
        f'[[cluster.members]]\nname = "{n}"\nagent_url = "https://{n}.example.test:8443"\n'
        for n in ("ca1", "ca2", "ca3")
    )
    cfg.write_text(
        f'[node]\nname = "ca1"\ncs_cfg = "{tmp_path / "CS.cfg"}"\n[store]\npath = "{tmp_path / "state.db"}"\n{members}'
    )
    return cfg


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ca_watchdog.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def publish(config: Path, name: str, **kw: object) -> None:
    s = load_settings(config)
    st = MemberState(name=name, updated_at=time.time(), **kw)  # type: ignore[arg-type]
    async with open_store(s.store, [m.name for m in s.members], 2.0) as store:
        await store.put_member(name, st.to_payload(), 30)


def test_empty_store_status_says_no_master_and_bootstrap_names_one(config: Path) -> None:
    out = cli(config, "status")
    assert out.returncode == 0, out.stderr
    assert "no master holds the key" in out.stdout and "no record" in out.stdout
    out = cli(config, "bootstrap", "--master", "ca2")
    assert out.returncode == 0 and "ca2 holds the key (epoch 1)" in out.stdout
    st = json.loads(cli(config, "status", "--json").stdout)
    assert st["leader"] == "ca2" and st["epoch"] == 1
    again = cli(config, "bootstrap", "--master", "ca1")
    assert again.returncode == 2 and "already holds the key" in again.stderr


def test_bootstrap_of_an_unknown_member_is_refused(config: Path) -> None:
    out = cli(config, "bootstrap", "--master", "ca9")
    assert out.returncode == 2 and "not a cluster member" in out.stderr


async def test_status_table_shows_roles_ca_state_replication_lag_and_the_leader(config: Path) -> None:
    assert cli(config, "bootstrap", "--master", "ca1").returncode == 0
    await publish(config, "ca1", ca_status="running", cscfg_role="master", ds_ok=True, replication="green",
                  replica_id=1, max_csn={1: "6b0a0391000000010000"})  # fmt: skip
    await publish(config, "ca2", ca_status="running", cscfg_role="clone", ds_ok=True, replication="green",
                  replica_id=2, max_csn={1: "6b0a038b000000010000"})  # fmt: skip
    out = cli(config, "status")
    rows = {line.split("|")[1].strip(): line for line in out.stdout.splitlines() if line.startswith("| ca")}
    assert "master" in rows["ca1"] and "*" in rows["ca1"] and "| 1 " in rows["ca1"]
    assert "clone" in rows["ca2"] and "6s" in rows["ca2"]  # 0x91 - 0x8b seconds behind ca1's changes
    assert "no record" in rows["ca3"]


def test_pause_resume_ack_and_switchover_are_recorded_in_the_store_and_history(config: Path) -> None:
    assert cli(config, "bootstrap", "--master", "ca1").returncode == 0
    assert "paused" in cli(config, "pause").stdout
    assert json.loads(cli(config, "status", "--json").stdout)["paused"] is True
    assert "PAUSED" in cli(config, "status").stdout
    assert cli(config, "resume").returncode == 0
    assert json.loads(cli(config, "status", "--json").stdout)["paused"] is False
    assert "acknowledged" in cli(config, "ack").stdout
    out = cli(config, "switchover", "--to", "ca3")
    assert out.returncode == 0 and "requested" in out.stdout
    assert json.loads(cli(config, "status", "--json").stdout)["switchover"] == {"target": "ca3", "kind": "switchover"}
    assert "already master" in cli(config, "switchover", "--to", "ca1").stdout
    types = [e["type"] for e in json.loads(cli(config, "history", "--json").stdout)]
    assert types == ["acquired", "pause", "resume", "ack", "switchover"]
    text = cli(config, "history").stdout
    assert "switchover" in text and "target=ca3" in text


def test_switchover_without_a_master_points_to_failover(config: Path) -> None:
    out = cli(config, "switchover", "--to", "ca2")
    assert out.returncode == 2 and "failover --to" in out.stderr
    assert cli(config, "failover", "--to", "ca2").returncode == 0


def test_store_that_cannot_be_opened_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    missing = tmp_path / "no" / "dir" / "s.db"
    cfg.write_text(
        f'[node]\nname = "ca1"\ncs_cfg = "{tmp_path / "CS.cfg"}"\n[store]\npath = "{missing}"\n'
        '[[cluster.members]]\nname = "ca1"\nagent_url = "https://ca1.example.test:8443"\n'
    )
    out = cli(cfg, "status")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "ca-watchdog:" in out.stdout + out.stderr


async def test_defect2_bootstrap_is_refused_on_a_store_that_has_had_a_master(config: Path) -> None:
    # ca1 was master (epoch 1) and its lease ended; its CA may still serve as master: bootstrapping ca2
    # would make two masters. Only `failover --to`, with its checks, may move the role now.
    s = load_settings(config)
    async with open_store(s.store, [m.name for m in s.members], 2.0) as store:
        rec = await store.acquire_leader("ca1", 1.0, "bootstrap", kind="bootstrap")
        assert rec is not None
    await asyncio.sleep(1.2)  # the lease ends; the key is free again
    out = cli(config, "bootstrap", "--master", "ca2")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "has had a master (epoch 1)" in out.stderr and "failover --to" in out.stderr
    async with open_store(s.store, [m.name for m in s.members], 2.0) as store:
        assert await store.get_leader() is None and await store.get_epoch() == 1
