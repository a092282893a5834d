"""write_cscfg with real files: symlinks, owner and mode, backups, failures in the middle."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ca_watchdog import cscfg
from ca_watchdog.cscfg import CSCfgWriteError, demote, read_cscfg, write_cscfg

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "CS.cfg.master.sample"
BACKUP = re.compile(r"^CS\.cfg\.(\d{13,})\.ca-watchdog$")


@pytest.fixture
def instance(tmp_path: Path) -> Path:
    """/etc/pki/pki-tomcat/ca/CS.cfg, as pkispawn leaves it."""
    conf = tmp_path / "etc" / "pki" / "pki-tomcat" / "ca"
    conf.mkdir(parents=True)
    real = conf / "CS.cfg"
    shutil.copyfile(FIXTURE, real)
    os.chmod(real, 0o660)
    return real


def backups(directory: Path) -> list[Path]:
    return sorted((p for p in directory.iterdir() if BACKUP.match(p.name)), key=lambda p: int(p.name.split(".")[2]))


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_write_replaces_content_and_makes_a_backup(instance: Path) -> None:
    before = instance.read_bytes()
    cfg = read_cscfg(instance)
    new = demote(cfg, "ca2.example.com", 8443)
    result = write_cscfg(new, expected=before)
    assert result.path == str(instance)
    assert instance.read_bytes() == new.render()
    (backup,) = backups(instance.parent)
    assert str(backup) == result.backup
    assert backup.read_bytes() == before
    assert leftovers(instance.parent) == []


def test_a_directory_symlink_that_only_root_can_change_is_followed(instance: Path, tmp_path: Path) -> None:
    # /var/lib/pki/pki-tomcat/conf -> /etc/pki/pki-tomcat, in a directory that only root can write
    var = tmp_path / "var" / "lib" / "pki" / "pki-tomcat"
    var.mkdir(parents=True)
    (var / "conf").symlink_to(instance.parent.parent, target_is_directory=True)
    link = var / "conf" / "ca" / "CS.cfg"
    cfg = read_cscfg(link)
    new = demote(cfg, "ca2.example.com", 8443)
    result = write_cscfg(new, link)
    assert result.path == str(link)
    assert (var / "conf").is_symlink()
    assert not instance.is_symlink()
    assert instance.read_bytes() == new.render()
    assert Path(result.backup).parent.resolve() == instance.parent  # next to the real file


def test_finding2_a_symlinked_cscfg_is_refused_and_its_target_untouched(instance: Path, tmp_path: Path) -> None:
    link = tmp_path / "CS.cfg.link"
    link.symlink_to(instance)
    before = instance.read_bytes()
    new = demote(cscfg.parse(before, str(link)), "ca2.example.com", 8443)
    with pytest.raises(CSCfgWriteError) as err:
        write_cscfg(new, link)
    assert "symlink" in str(err.value) and str(link) in str(err.value)
    assert instance.read_bytes() == before and link.is_symlink()
    assert backups(instance.parent) == [] and backups(tmp_path) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_owner_group_and_mode_are_kept(instance: Path) -> None:
    os.chown(instance, 1234, 1234)
    os.chmod(instance, 0o660)
    result = write_cscfg(demote(read_cscfg(instance), "ca2", 8443))
    for path in (instance, Path(result.backup)):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (1234, 1234), path
        assert st.st_mode & 0o7777 == 0o660, path


def test_an_unusual_mode_is_kept(instance: Path) -> None:
    os.chmod(instance, 0o640)
    write_cscfg(demote(read_cscfg(instance), "ca2", 8443))
    assert instance.stat().st_mode & 0o7777 == 0o640


def test_newest_five_backups_are_kept_and_others_left_alone(instance: Path) -> None:
    dogtag_backup = instance.parent / "CS.cfg.1700000000000"  # FileConfigStorage's own backup
    dogtag_backup.write_text("x=1\n")
    other = instance.parent / "CS.cfg.bak"
    other.write_text("y=2\n")
    contents = []
    for i in range(8):
        contents.append(instance.read_bytes())
        cfg = read_cscfg(instance)
        write_cscfg(demote(cfg, f"ca{i}.example.com", 8443), expected=cfg.render())
    kept = backups(instance.parent)
    assert len(kept) == 5
    assert [p.read_bytes() for p in kept] == contents[-5:]
    stamps = [int(p.name.split(".")[2]) for p in kept]
    assert stamps == sorted(set(stamps))  # distinct even within one millisecond
    assert dogtag_backup.exists() and other.exists()


def test_expected_mismatch_refuses_and_writes_nothing(instance: Path) -> None:
    cfg = read_cscfg(instance)
    with instance.open("ab") as f:
        f.write(b"changed.by.someone=else\n")
    changed = instance.read_bytes()
    with pytest.raises(CSCfgWriteError) as err:
        write_cscfg(demote(cfg, "ca2", 8443), expected=cfg.render())
    assert err.value.errno == errno.ESTALE
    assert "changed since it was read" in str(err.value)
    assert instance.read_bytes() == changed
    assert backups(instance.parent) == []


def _assert_failed_cleanly(instance: Path, before: bytes, err: CSCfgWriteError, *words: str) -> None:
    assert instance.read_bytes() == before
    assert leftovers(instance.parent) == []
    assert err.original_intact
    assert "the original is unchanged" in str(err)
    for word in words:
        assert word in str(err), str(err)


@pytest.mark.parametrize(
    ("target", "step"),
    [
        ("os.replace", "rename the temporary file"),
        ("os.fsync", "fsync the temporary file"),
        ("os.fchmod", "carry owner, group, mode"),
    ],
)
def test_a_failure_in_the_middle_leaves_the_original(
    instance: Path, monkeypatch: pytest.MonkeyPatch, target: str, step: str
) -> None:
    before = instance.read_bytes()
    new = demote(read_cscfg(instance), "ca2", 8443)

    # fail only on the temporary file (the backup is written with the same calls)
    made: list[object] = []
    real_make_temp = cscfg._make_temp

    def make_temp(dfd: int, name: str) -> tuple[int, str]:
        fd, tmp = real_make_temp(dfd, name)
        made.extend((fd, tmp))
        return fd, tmp

    real = getattr(os, target.split(".")[1])

    def fail_on_temp(*args: Any, **kwargs: Any) -> Any:
        if args and args[0] in made:
            raise OSError(errno.EIO, "Input/output error")
        return real(*args, **kwargs)

    monkeypatch.setattr(cscfg, "_make_temp", make_temp)
    monkeypatch.setattr(target, fail_on_temp)
    with pytest.raises(CSCfgWriteError) as err:
        write_cscfg(new)
    _assert_failed_cleanly(instance, before, err.value, step, "Input/output error")
    assert made, "the temporary file was never made"


def test_a_failing_backup_leaves_the_original(instance: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = instance.read_bytes()

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cscfg, "_write_file", no_space)
    with pytest.raises(CSCfgWriteError) as err:
        write_cscfg(demote(read_cscfg(instance), "ca2", 8443))
    _assert_failed_cleanly(instance, before, err.value, "write the backup", "No space left on device")
    assert err.value.errno == errno.ENOSPC


@pytest.fixture
def immutable_dir(instance: Path) -> Iterator[Path]:
    """The CS.cfg directory made immutable; root ignores mode bits but not this."""
    directory = instance.parent
    if shutil.which("chattr") is None:
        pytest.skip("chattr not installed")
    if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
        pytest.skip("the file system does not support chattr +i here")
    try:
        yield directory
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_an_unwritable_directory_leaves_the_original(instance: Path, immutable_dir: Path) -> None:
    before = instance.read_bytes()
    mtime = instance.stat().st_mtime_ns
    with pytest.raises(CSCfgWriteError) as err:
        write_cscfg(demote(read_cscfg(instance), "ca2", 8443))
    _assert_failed_cleanly(instance, before, err.value, "Operation not permitted", str(instance))
    assert instance.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in immutable_dir.iterdir()) == ["CS.cfg"]


@pytest.fixture
def full_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_file_system_leaves_the_original(full_tmpfs: Path) -> None:
    real = full_tmpfs / "CS.cfg"
    shutil.copyfile(FIXTURE, real)
    before = real.read_bytes()
    filler = full_tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    with pytest.raises(CSCfgWriteError) as err:
        write_cscfg(demote(read_cscfg(real), "ca2", 8443))
    assert err.value.errno == errno.ENOSPC
    _assert_failed_cleanly(real, before, err.value, "No space left on device")
    assert sorted(p.name for p in full_tmpfs.iterdir()) == ["CS.cfg", "filler"]


def test_directory_fsync_failure_says_the_new_file_is_in_place(instance: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(directory: str) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cscfg, "_fsync_dir", fail)
    new = demote(read_cscfg(instance), "ca2", 8443)
    with pytest.raises(CSCfgWriteError) as err:
        write_cscfg(new)
    assert not err.value.original_intact
    assert "unchanged" not in str(err.value)
    assert "in place" in str(err.value)
    assert instance.read_bytes() == new.render()


def test_a_dangling_link_or_a_directory_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "CS.cfg"
    link.symlink_to(tmp_path / "missing")
    cfg = cscfg.parse("a=1\nca.crl.M.class=c\n", str(link))
    with pytest.raises(CSCfgWriteError) as err:
        write_cscfg(cfg)
    assert "symlink" in str(err.value)
    assert link.is_symlink() and not (tmp_path / "missing").exists()
    (tmp_path / "dir").mkdir()
    with pytest.raises(CSCfgWriteError) as err:
        write_cscfg(cfg, tmp_path / "dir")
    assert "is a directory (it must be a regular file)" in str(err.value)


def test_selinux_label_is_copied_when_the_file_has_one(instance: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    label = b"system_u:object_r:pki_tomcat_etc_rw_t:s0\0"
    seen: list[bytes] = []

    def getxattr(path: str, name: str) -> bytes:
        assert name == "security.selinux"
        return label

    def setxattr(fd: int, name: str, value: bytes) -> None:
        seen.append(value)

    monkeypatch.setattr(os, "getxattr", getxattr)
    monkeypatch.setattr(os, "setxattr", setxattr)
    write_cscfg(demote(read_cscfg(instance), "ca2", 8443))
    assert seen == [label, label]  # the backup and the new file


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_mode_and_label_are_set_before_ownership_so_cap_fowner_is_not_needed(
    instance: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # issue 10: once the new file is pkiuser's, root may change its mode or SELinux label only
    # with CAP_FOWNER; done while root still owns it, CAP_CHOWN is enough
    label = b"system_u:object_r:pki_tomcat_etc_rw_t:s0\0"
    calls: list[str] = []
    real_fchown = os.fchown
    monkeypatch.setattr(os, "getxattr", lambda path, name: label)
    monkeypatch.setattr(os, "setxattr", lambda fd, name, value: calls.append("label"))
    real_fchmod = os.fchmod
    monkeypatch.setattr(os, "fchmod", lambda fd, mode: (calls.append("mode"), real_fchmod(fd, mode))[1])
    monkeypatch.setattr(os, "fchown", lambda fd, uid, gid: (calls.append("owner"), real_fchown(fd, uid, gid))[1])
    os.chown(instance, 1234, 1234)  # pkiuser's: the writer (root) must hand the new files over
    write_cscfg(demote(read_cscfg(instance), "ca2", 8443))
    # the backup, then the new file: each mode, label, then owner
    assert calls == ["mode", "label", "owner", "mode", "label", "owner"], calls


WRITE_WITHOUT_FOWNER = """
import os, sys
from ca_watchdog.cscfg import demote, read_cscfg, write_cscfg
status = open("/proc/self/status").read()
cap_eff = int(next(l for l in status.splitlines() if l.startswith("CapEff:")).split()[1], 16)
assert cap_eff & (1 << 0) and not cap_eff & (1 << 3), hex(cap_eff)  # CAP_CHOWN yes, CAP_FOWNER no
print(write_cscfg(demote(read_cscfg(sys.argv[1]), "ca2", 8443)).backup)
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_owner_group_and_mode_are_kept_by_a_root_writer_without_cap_fowner(instance: Path) -> None:
    # what ca-watchdog.service and the guard unit run with: CapabilityBoundingSet= without CAP_FOWNER
    os.chown(instance.parent, 1234, 1234)
    os.chmod(instance.parent, 0o770)
    os.chown(instance, 1234, 1234)
    os.chmod(instance, 0o640)
    p = subprocess.run(
        ["setpriv", "--bounding-set", "-fowner", os.sys.executable, "-c", WRITE_WITHOUT_FOWNER, str(instance)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(os.sys.path)},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert read_cscfg(instance).get("ca.crl.MasterCRL.enableCRLUpdates") == "false"
    for path in (instance, Path(p.stdout.strip())):
        st = path.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 1234, 0o640), path


def test_a_read_that_crosses_a_whole_file_renamed_over_cscfg_reads_the_new_file_not_an_error(instance: Path) -> None:
    """The daemon, the guard and the CA's start all put a new CS.cfg in place by renaming a whole file over
    it. A read that crosses such a rename (between its check and its open, or between its open and its
    fstat) saw a file "replaced while it was being opened" or with "0 hard links": a CS.cfg unreadable for
    one cycle, which a key holder whose CA is down acts on. It must read again and get one whole file, here
    with 2,000 renames a second, far more than any real rewrite."""
    master = instance.read_bytes()
    clone = demote(read_cscfg(instance), "ca2.example.com", 8443).render()
    clone_file = instance.parent / "clone.sample"
    clone_file.write_bytes(clone)
    renamer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys, time\n"
            "cs, a, b = sys.argv[1:]\n"
            "data = [open(a, 'rb').read(), open(b, 'rb').read()]\n"
            "i = 0\n"
            "while True:\n"
            "    with open(cs + '.tmp', 'wb') as f: f.write(data[i % 2])\n"
            "    os.replace(cs + '.tmp', cs)\n"
            "    i += 1\n"
            "    time.sleep(0.0005)\n",
            str(instance),
            str(FIXTURE),
            str(clone_file),
        ]
    )
    seen: set[bytes] = set()
    errors: list[str] = []
    try:
        for _ in range(4000):
            try:
                seen.add(read_cscfg(instance).render())
            except cscfg.CSCfgError as exc:
                errors.append(exc.message)
    finally:
        renamer.kill()
        renamer.wait()
    assert errors == [], f"{len(errors)} of 4000 reads refused, e.g. {errors[:3]}"
    assert seen <= {master, clone} and len(seen) == 2, "a read returned something other than one whole file"
