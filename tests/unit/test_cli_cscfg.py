"""`ca-watchdog cscfg show|promote|demote` and `ca-watchdog check-config`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ca_watchdog.cli import main
from ca_watchdog.cscfg import Role, classify, demote, promote, read_cscfg

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"


def copy(tmp_path: Path, name: str, as_name: str = "CS.cfg") -> Path:
    dest = tmp_path / as_name
    shutil.copyfile(FIXTURES / name, dest)
    return dest


class Snapshot:
    """Bytes, mtime and directory listing: 'nothing written' means all three are unchanged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = path.read_bytes()
        self.mtime = path.stat().st_mtime_ns
        self.listing = sorted(p.name for p in path.parent.iterdir())

    def unchanged(self) -> bool:
        return (
            self.path.read_bytes() == self.data
            and self.path.stat().st_mtime_ns == self.mtime
            and sorted(p.name for p in self.path.parent.iterdir()) == self.listing
        )


def backups(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".ca-watchdog")]


# ---- show ----------------------------------------------------------------------------------------


def test_show_text(capsys: pytest.CaptureFixture[str]) -> None:
    path = FIXTURES / "CS.cfg.clone.sample"
    assert main(["cscfg", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{path}: clone"
    assert "issuing point MasterCRL: enable=true enableCRLCache=false enableCRLUpdates=false" in out
    assert "master.ca.agent: primary.example.com:8443" in out


def test_show_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cscfg", "show", str(FIXTURES / "CS.cfg.master.two-ip.sample"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["role"] == "master"
    assert [p["id"] for p in data["issuing_points"]] == ["CACertsCRL", "MasterCRL"]
    assert data["issuing_points"][0] == {
        "id": "CACertsCRL",
        "enable": True,
        "enableCRLCache": True,
        "enableCRLUpdates": True,
    }
    assert data["certStatusUpdateInterval"] == 600
    assert data["listenToCloneModifications"] is True
    assert data["master_agent"] is None
    assert data["problems"] == []


def test_show_inconsistent_lists_problems(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cscfg", "show", str(FIXTURES / "CS.cfg.inconsistent.sample")]) == 0
    out = capsys.readouterr().out
    assert ": inconsistent" in out.splitlines()[0]
    assert "  problem: issuing point MasterCRL: enableCRLCache=true but enableCRLUpdates=false" in out
    assert main(["cscfg", "show", str(FIXTURES / "CS.cfg.master.messy.sample"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data["duplicates"]) == ["https.port"]
    assert any("https.port" in w for w in data["warnings"])


# ---- malformed input: exit 2, file and line named, nothing written --------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["cscfg", "show", "{bad}"],
        ["cscfg", "demote", "{bad}", "--new-master", "ca2.example.com:8443"],
        ["cscfg", "promote", "{bad}", "--crl-from", "{master}"],
        ["cscfg", "promote", "{bad}", "--crl-from", "{master}", "--dry-run"],
    ],
)
def test_malformed_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    bad = copy(tmp_path, "CS.cfg.malformed.sample")
    master = FIXTURES / "CS.cfg.master.sample"
    snap = Snapshot(bad)
    rc = main([a.format(bad=bad, master=master) for a in argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{bad}:42: missing '='" in err
    assert snap.unchanged()


def test_malformed_crl_source_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clone = copy(tmp_path, "CS.cfg.clone.sample")
    bad = copy(tmp_path, "CS.cfg.malformed.sample", "old-master.cfg")
    snap = Snapshot(clone)
    assert main(["cscfg", "promote", str(clone), "--crl-from", str(bad)]) == 2
    assert f"{bad}:42:" in capsys.readouterr().err
    assert snap.unchanged()


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cscfg", "show", str(tmp_path / "nope")]) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["ca2.example.com", "ca2:port", ":8443", "ca2:0", "ca2:70000", "ca2:٨٤٤٣"])
def test_bad_new_master_is_a_usage_error(tmp_path: Path, target: str) -> None:
    path = copy(tmp_path, "CS.cfg.master.sample")
    snap = Snapshot(path)
    with pytest.raises(SystemExit) as exc:
        main(["cscfg", "demote", str(path), "--new-master", target])
    assert exc.value.code == 2
    assert snap.unchanged()


def test_a_result_that_is_not_the_wanted_role_is_not_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clone = copy(tmp_path, "CS.cfg.clone.sample")
    block = tmp_path / "block.cfg"
    block.write_text("ca.crl.MasterCRL.class=com.netscape.ca.CRLIssuingPoint\nca.crl.MasterCRL.enable=maybe\n")
    snap = Snapshot(clone)
    assert main(["cscfg", "promote", str(clone), "--crl-from", str(block)]) == 2
    err = capsys.readouterr().err
    assert "would be inconsistent" in err and "nothing written" in err
    assert snap.unchanged()


# ---- dry run: a unified diff, nothing written ------------------------------------------------------


def test_demote_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = copy(tmp_path, "CS.cfg.master.sample")
    snap = Snapshot(path)
    assert main(["cscfg", "demote", str(path), "--new-master", "ca2.example.com:8443", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"--- {path}\n+++ {path} (new)\n@@ ")
    assert "\n-ca.crl.MasterCRL.enableCRLCache=true\n" in out
    assert "\n+ca.crl.MasterCRL.enableCRLCache=false\n" in out
    assert "\n+master.ca.agent.host=ca2.example.com\n+master.ca.agent.port=8443\n" in out
    assert snap.unchanged()


def test_promote_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = copy(tmp_path, "CS.cfg.clone.sample")
    snap = Snapshot(path)
    assert main(["cscfg", "promote", str(path), "--crl-from", str(FIXTURES / "CS.cfg.master.sample"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "\n-master.ca.agent.host=primary.example.com\n" in out
    assert "\n+ca.certStatusUpdateInterval=600\n" in out
    assert snap.unchanged()


# ---- real conversions ------------------------------------------------------------------------------


def test_demote_writes_with_a_backup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = copy(tmp_path, "CS.cfg.master.sample")
    before = read_cscfg(path)
    assert main(["cscfg", "demote", str(path), "--new-master", "ca2.example.com:8443"]) == 0
    out = capsys.readouterr().out
    assert f"{path}: now clone (6 keys changed); backup {path}." in out
    assert path.read_bytes() == demote(before, "ca2.example.com", 8443).render()
    (backup,) = backups(tmp_path)
    assert backup.read_bytes() == before.render()


def test_demote_ipv6_target(tmp_path: Path) -> None:
    path = copy(tmp_path, "CS.cfg.master.sample")
    assert main(["cscfg", "demote", str(path), "--new-master", "[2001:db8::2]:8443"]) == 0
    assert classify(read_cscfg(path)).master_agent == "2001:db8::2:8443"


def test_promote_writes_with_a_backup(tmp_path: Path) -> None:
    path = copy(tmp_path, "CS.cfg.clone.sample")
    master = FIXTURES / "CS.cfg.master.sample"
    before = read_cscfg(path)
    assert main(["cscfg", "promote", str(path), "--crl-from", str(master)]) == 0
    after = read_cscfg(path)
    assert after.render() == promote(before, read_cscfg(master).crl_lines()).render()
    assert classify(after).role is Role.MASTER
    assert len(backups(tmp_path)) == 1


def test_inconsistent_file_is_repaired_by_an_explicit_demote(tmp_path: Path) -> None:
    path = copy(tmp_path, "CS.cfg.inconsistent.sample")
    assert main(["cscfg", "demote", str(path), "--new-master", "ca2.example.com:8443"]) == 0
    assert classify(read_cscfg(path)).role is Role.CLONE


def test_finding2_a_symlinked_path_is_refused_and_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = copy(tmp_path, "CS.cfg.master.sample")
    link = tmp_path / "link.cfg"
    link.symlink_to(real)
    snap = Snapshot(real)
    assert main(["cscfg", "demote", str(link), "--new-master", "ca2.example.com:8443"]) == 2
    assert "symlink" in capsys.readouterr().err
    assert link.is_symlink() and snap.unchanged()
    assert classify(read_cscfg(real)).role is Role.MASTER


# ---- already in the requested role: exit 0, "nothing to do", nothing written ------------------------


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        ("CS.cfg.master.sample", ["promote", "{path}", "--crl-from", "{master}"]),
        ("CS.cfg.master.two-ip.sample", ["promote", "{path}", "--crl-from", "{master}", "--dry-run"]),
        ("CS.cfg.clone.sample", ["demote", "{path}", "--new-master", "primary.example.com:8443"]),
        ("CS.cfg.clone.sample", ["demote", "{path}", "--new-master", "primary.example.com:8443", "--dry-run"]),
    ],
)
def test_nothing_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, argv: list[str]) -> None:
    path = copy(tmp_path, name)
    snap = Snapshot(path)
    master = FIXTURES / "CS.cfg.master.sample"
    assert main(["cscfg", *(a.format(path=path, master=master) for a in argv)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert snap.unchanged()
    assert backups(tmp_path) == []


def test_a_clone_of_another_master_is_repointed(tmp_path: Path) -> None:
    path = copy(tmp_path, "CS.cfg.clone.sample")
    before = read_cscfg(path)
    assert main(["cscfg", "demote", str(path), "--new-master", "ca3.example.com:8443"]) == 0
    after = read_cscfg(path)
    assert classify(after).master_agent == "ca3.example.com:8443"
    old, new = before.render().decode().splitlines(), after.render().decode().splitlines()
    assert [(a, b) for a, b in zip(old, new, strict=True) if a != b] == [
        ("master.ca.agent.host=primary.example.com", "master.ca.agent.host=ca3.example.com")
    ]


# ---- the installed command -------------------------------------------------------------------------


def test_console_script_exit_codes(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "ca-watchdog"
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    bad = copy(tmp_path, "CS.cfg.malformed.sample")
    run = subprocess.run([str(exe), "cscfg", "show", str(bad)], capture_output=True, text=True)
    assert run.returncode == 2
    assert f"{bad}:42:" in run.stderr
    good = copy(tmp_path, "CS.cfg.master.sample", "good.cfg")
    run = subprocess.run([str(exe), "cscfg", "show", str(good), "--json"], capture_output=True, text=True)
    assert run.returncode == 0 and json.loads(run.stdout)["role"] == "master"


# ---- check-config ----------------------------------------------------------------------------------


def test_check_config_example_needs_its_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the example points at /etc/pki/...; check-config also checks that files exist
    if os.path.exists("/etc/pki/pki-tomcat/ca/CS.cfg"):
        pytest.skip("a real CA is installed here")
    assert main(["check-config", str(EXAMPLE)]) == 2
    assert "node.cs_cfg: file '/etc/pki/pki-tomcat/ca/CS.cfg' does not exist" in capsys.readouterr().err


def test_check_config_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cs = copy(tmp_path, "CS.cfg.master.sample")
    config = tmp_path / "config.toml"
    config.write_text(EXAMPLE.read_text().replace('"/etc/pki/pki-tomcat/ca/CS.cfg"', f'"{cs}"'))
    assert main(["check-config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{config}: valid; node ca1, 3 members, sqlite store")


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (("interval = 2.0", "interval = 27.0"), "timing.ttl"),
        (("priority = 50", "priority = -5"), "cluster.members[2].priority"),
        (("[api]", "[api]\nport = 1"), "api.port"),
        (('name = "ca1"', 'name = "ca7"'), "node.name"),
    ],
)
def test_check_config_invalid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: tuple[str, str], key: str
) -> None:
    cs = copy(tmp_path, "CS.cfg.master.sample")
    text = EXAMPLE.read_text().replace('"/etc/pki/pki-tomcat/ca/CS.cfg"', f'"{cs}"')
    assert edit[0] in text
    config = tmp_path / "config.toml"
    config.write_text(text.replace(edit[0], edit[1], 1))
    assert main(["check-config", str(config)]) == 2
    assert f"{config}: {key}: " in capsys.readouterr().err


def test_check_config_bad_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[node\n")
    assert main(["check-config", str(config)]) == 2
    assert "invalid TOML" in capsys.readouterr().err
