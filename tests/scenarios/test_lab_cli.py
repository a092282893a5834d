"""The operator's day on a local lab, through the real command line only: `ca-watchdog lab up`, the
operator commands against the config it prints (`status`, `switchover`), faults with `lab kill`,
and `lab down`, which must leave no process and no directory behind. Each command is its own
process, as an operator's would be."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ca_watchdog.lab.cluster import pids_naming
from ca_watchdog.lab.dslab import DSCREATE, NS_SLAPD
from ca_watchdog.lab.etcdlab import ETCD_BINARY

# below the scenario fixtures' ports (18500..) and the fault suites' (20000..), apart from the
# demo's (18340..) and `lab up`'s default (17640..)
DS_LAB_PORT = 17240  # CA agent 17240.., API 17260.., 389-DS 17280..
ETCD_LAB_PORT = 17340  # CA agent 17340.., API 17360.., etcd from 17400


def cli(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ca_watchdog.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def ok(*args: str | Path, timeout: float = 300) -> str:
    out = cli(*args, timeout=timeout)
    assert out.returncode == 0, (
        f"ca-watchdog {' '.join(map(str, args))}: rc {out.returncode}\n{out.stdout}\n{out.stderr}"
    )
    return out.stdout


def status(config: str) -> dict[str, Any]:
    return dict(json.loads(ok("status", "--json", "--config", config)))


def wait(what: Callable[[], bool], timeout: float, why: str, show: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for: {why}\n{show()}")
        time.sleep(0.5)


def master_is(config: str, name: str) -> Callable[[], bool]:
    """`status` shows `name` holding the key with a master CS.cfg and a running CA, every other
    member a clone with a running CA."""

    def check() -> bool:
        st = status(config)
        return st["leader"] == name and all(
            m["ca"] == "running" and m["role"] == ("master" if m["member"] == name else "clone") for m in st["members"]
        )

    return check


def assert_nothing_left(lab_dir: Path, ds_prefix: str | None = None) -> None:
    assert not lab_dir.exists(), f"`lab down` left {lab_dir}: {sorted(p.name for p in lab_dir.iterdir())}"
    assert pids_naming(lab_dir) == [], "`lab down` left processes of the lab running"
    if ds_prefix is not None:
        slapd = [
            pid
            for pid in (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
            if f"slapd-{ds_prefix}-".encode() in _cmdline(pid)
        ]
        assert slapd == [], f"`lab down` left ns-slapd of the lab running: {slapd}"
        for parent in ("/etc/dirsrv", "/var/lib/dirsrv", "/var/log/dirsrv", "/run/lock/dirsrv"):
            left = sorted(Path(parent).glob(f"slapd-{ds_prefix}-*"))
            assert left == [], f"`lab down` left 389-DS instance directories: {left}"
        assert not Path(f"/tmp/ca-watchdog-dslab-{ds_prefix}.lock").exists()


def _cmdline(pid: int) -> bytes:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return b"" if state == "Z" else Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return b""


def test_lab_up_status_switchover_kill_ca1_ca_fails_over_and_lab_down_leaves_no_process_and_no_directory(
    tmp_path: Path,
) -> None:
    for program in (DSCREATE, NS_SLAPD):
        assert os.access(program, os.X_OK), f"{program} missing: `lab up --with-ds` needs 389-DS (scripts/setup.sh)"
    lab_dir = tmp_path / "lab"
    up = cli("lab", "up", "--dir", lab_dir, "--with-ds", "--base-port", DS_LAB_PORT)
    ds_prefix = None
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert re.search(r"ca1 master after [0-9.]+ s", up.stdout), up.stdout
        config = re.search(r"^config: (\S+)$", up.stdout, re.M)
        assert config, up.stdout
        cfg = config.group(1)
        lab = json.loads(ok("lab", "status", "--json", "--dir", lab_dir))
        ds_prefix = lab["ds_prefix"]
        assert lab["config"] == cfg
        assert {(m["ca"], m["daemon"], m["ds"]) for m in lab["members"].values()} == {("running",) * 3}, lab

        def show() -> str:
            return ok("status", "--config", cfg) + ok("lab", "status", "--dir", lab_dir)

        # the operator's status works against the lab's config: ca1 master, holding the key
        table = ok("status", "--config", cfg)
        assert re.search(r"^\| ca1 +\| master +\| running .*\| \* +\|", table, re.M), table
        assert master_is(cfg, "ca1")(), show()

        # a planned switchover to ca2, and back
        assert "switchover to ca2 requested" in ok("switchover", "--config", cfg, "--to", "ca2")
        wait(master_is(cfg, "ca2"), 60, "ca2 master after the switchover", show)
        ok("switchover", "--config", cfg, "--to", "ca1")
        wait(master_is(cfg, "ca1"), 60, "ca1 master again after the switchover back", show)

        # the master's CA dies: another member takes over, ca1 comes back as its clone
        assert "ca1's CA" in ok("lab", "kill", "ca1", "ca", "--dir", lab_dir)

        def failed_over() -> bool:
            leader = status(cfg)["leader"]
            return leader in ("ca2", "ca3") and master_is(cfg, leader)()

        wait(failed_over, 90, "a failover away from ca1, ca1 back as a running clone", show)
        assert status(cfg)["epoch"] >= 4, show()  # bootstrap, two switchovers, the failover
    finally:
        down = cli("lab", "down", "--dir", lab_dir)
    assert down.returncode == 0, down.stdout + down.stderr
    assert_nothing_left(lab_dir, ds_prefix)


def test_lab_kill_host_on_an_etcd_lab_fails_over_lab_up_brings_the_host_back_as_a_clone_and_down_stops_etcd(
    tmp_path: Path,
) -> None:
    assert os.access(ETCD_BINARY, os.X_OK), f"{ETCD_BINARY} missing: `lab up --store etcd` needs it (scripts/setup.sh)"
    lab_dir = tmp_path / "lab"
    try:
        up = ok("lab", "up", "--dir", lab_dir, "--store", "etcd", "--base-port", ETCD_LAB_PORT)
        cfg = re.search(r"^config: (\S+)$", up, re.M).group(1)  # type: ignore[union-attr]
        etcd_pid = json.loads(ok("lab", "status", "--json", "--dir", lab_dir))["etcd"]["pid"]
        assert etcd_pid

        def show() -> str:
            return ok("lab", "status", "--dir", lab_dir)

        assert "ca1's host is down" in ok("lab", "kill", "ca1", "host", "--dir", lab_dir)
        lab = json.loads(ok("lab", "status", "--json", "--dir", lab_dir))
        assert (lab["members"]["ca1"]["ca"], lab["members"]["ca1"]["daemon"]) == ("stopped", "stopped"), lab
        cfg2 = cfg.replace("/ca1/", "/ca2/")  # ca1's host is gone; ask from another member's config

        def someone_else_master() -> bool:
            return status(cfg2)["leader"] in ("ca2", "ca3")

        wait(someone_else_master, 60, "ca2 or ca3 holding the key after ca1's host died", show)
        new = status(cfg2)["leader"]
        up = ok("lab", "up", "--dir", lab_dir)  # the host comes back: its guard keeps it a clone
        assert f"{new} master" in up, up
        assert master_is(cfg, new)(), show()
    finally:
        down = cli("lab", "down", "--dir", lab_dir)
    assert down.returncode == 0, down.stdout + down.stderr
    assert_nothing_left(lab_dir)
    assert _cmdline(etcd_pid) == b"", "`lab down` left etcd running"


def test_demo_kills_master_ca1_a_clone_takes_over_ca1_returns_as_its_clone_and_nothing_is_left() -> None:
    out = ok("demo", "--json", timeout=600)
    summary = json.loads(out)
    assert summary["new_master"] in ("ca2", "ca3"), summary
    assert summary["roles"] == {n: "master" if n == summary["new_master"] else "clone" for n in ("ca1", "ca2", "ca3")}
    assert summary["with_389ds"] is True, "389-DS is installed here: the demo must use it"
    assert summary["running_after_s"] < 60, summary
    assert_nothing_left(Path(summary["dir"]))


def without(module: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """The CLI in a Python where importing `module` fails, as on a machine without it."""
    code = f"import sys; sys.modules[{module!r}] = None; from ca_watchdog.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=60)


def test_a_missing_lab_dependency_is_one_line_naming_the_extra_not_a_traceback_and_starts_nothing(
    tmp_path: Path,
) -> None:
    lab_dir = tmp_path / "lab"
    for args in (("lab", "up", "--dir", lab_dir), ("demo",), ("lab", "kill", "ca1", "--dir", lab_dir)):
        out = without("cryptography", *args)
        assert out.returncode == 1, out
        assert out.stdout == "", out.stdout
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
        assert "'cryptography'" in out.stderr and "pip install 'ca-watchdog[lab]'" in out.stderr, out.stderr
    assert not lab_dir.exists()


def test_lab_down_refuses_a_directory_that_holds_no_lab_and_removes_nothing(tmp_path: Path) -> None:
    precious = tmp_path / "data" / "keep.txt"
    precious.parent.mkdir()
    precious.write_text("not a lab")
    out = cli("lab", "down", "--dir", precious.parent)
    assert out.returncode == 1 and "no lab in" in out.stderr, out
    assert precious.read_text() == "not a lab"
    out = cli("lab", "up", "--dir", precious.parent, "--base-port", ETCD_LAB_PORT)
    assert out.returncode == 1 and "is not a lab" in out.stderr, out
    assert sorted(p.name for p in precious.parent.iterdir()) == ["keep.txt"]
