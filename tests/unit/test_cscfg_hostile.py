"""Issue 10, findings 1, 2, 4 and 11: CS.cfg as the CA's own account (pkiuser) can leave it.

pkiuser owns the CS.cfg directory; the daemon and the guard run as root. Whatever that account puts
there (a symlink to a secret, a hard link, a FIFO, a device, a huge file, a file that is not a
CS.cfg, a line that Dogtag's readers split differently) must be refused at once, naming the file
and the line, never quoting what the file holds.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path

import pki.util
import pytest

from ca_watchdog import cscfg
from ca_watchdog.cscfg import (
    CSCfgError,
    CSCfgWriteError,
    Role,
    classify,
    demote,
    parse,
    promote,
    read_cscfg,
    write_cscfg,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SECRET = "hunter2-Tr0ub4dor-secret"
PKIUSER = 65534  # any uid but root: the CA's account


@pytest.fixture
def instance(tmp_path: Path) -> Path:
    conf = tmp_path / "etc" / "pki" / "pki-tomcat" / "ca"
    conf.mkdir(parents=True)
    real = conf / "CS.cfg"
    shutil.copyfile(FIXTURES / "CS.cfg.master.sample", real)
    return real


def refused_at_once(path: Path, *words: str) -> CSCfgError:
    t0 = time.monotonic()
    with pytest.raises(CSCfgError) as err:
        read_cscfg(path)
    elapsed = time.monotonic() - t0
    assert elapsed < 0.5, f"took {elapsed:.3f} s"
    assert str(path) in str(err.value)
    for word in words:
        assert word in str(err.value), str(err.value)
    return err.value


# ---- finding 1: pkiuser -> root file read ----------------------------------------------------------


@pytest.mark.parametrize(
    "secret_line", [SECRET, f"{SECRET}\n", f"password={SECRET}\n", f"root:{SECRET}:19000:0:99999:7:::\n"]
)
def test_finding1_a_symlink_to_a_secret_file_is_refused_without_reading_it(
    instance: Path, tmp_path: Path, secret_line: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_text(secret_line)
    instance.unlink()
    instance.symlink_to(secret)
    err = refused_at_once(instance, "symlink")
    assert SECRET not in str(err)


@pytest.mark.parametrize(
    "line",
    [
        SECRET,
        f"  {SECRET}",
        f"{SECRET} x=1",
        f"\xa0{SECRET}=1",
        f"a{SECRET}=ends in a backslash\\",
        f"ca.crl.MasterCRL.{SECRET}:x=1",
        f"ca.crl.MasterCRL.enable={SECRET}\\",
        f"x={SECRET}\x0cca.crl.MasterCRL.enable=true",
        f"x={SECRET}\rca.crl.MasterCRL.enable=true",
    ],
)
def test_finding1_parse_errors_name_file_and_line_but_never_the_content(line: str) -> None:
    with pytest.raises(CSCfgError) as err:
        parse(f"a=1\n{line}\nb=2\n", "/etc/pki/pki-tomcat/ca/CS.cfg")
    assert err.value.lineno == 2
    assert str(err.value).startswith("/etc/pki/pki-tomcat/ca/CS.cfg:2: ")
    assert SECRET not in str(err.value)


def test_finding1_classification_problems_name_the_key_and_line_never_the_value() -> None:
    text = (FIXTURES / "CS.cfg.master.sample").read_text()
    text += f"ca.crl.MasterCRL.enableCRLCache={SECRET}\nca.certStatusUpdateInterval={SECRET}\n"
    report = classify(parse(text))
    assert report.role is Role.INCONSISTENT
    problems = "; ".join(report.problems)
    assert "ca.crl.MasterCRL.enableCRLCache (line" in problems
    assert "ca.certStatusUpdateInterval (line" in problems
    assert SECRET not in problems + "; ".join(report.warnings)


def test_finding1_a_symlinked_directory_that_pkiuser_can_change_is_refused(instance: Path, tmp_path: Path) -> None:
    # /var/lib/pki/pki-tomcat is pkiuser's: a `conf` link in it could be pointed anywhere
    var = tmp_path / "var" / "lib" / "pki" / "pki-tomcat"
    var.mkdir(parents=True)
    (var / "conf").symlink_to(instance.parent, target_is_directory=True)
    assert read_cscfg(var / "conf" / "CS.cfg").render() == instance.read_bytes()  # root's directory: followed
    os.chown(var, PKIUSER, PKIUSER)
    refused_at_once(var / "conf" / "CS.cfg", f"{var}/conf is a symlink in a directory that a user other than root")
    os.chown(var, 0, 0)
    os.chmod(var, 0o777)
    refused_at_once(var / "conf" / "CS.cfg", "symlink in a directory")


def test_finding1_a_hard_link_is_refused(instance: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(f"password={SECRET}\n")
    instance.unlink()
    os.link(secret, instance)
    err = refused_at_once(instance, "2 hard links")
    assert SECRET not in str(err)


def test_finding1_the_real_cli_refuses_a_symlink_to_a_secret(
    instance: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ca_watchdog.cli import main

    secret = tmp_path / "secret"
    secret.write_text(f"{SECRET}\n")
    instance.unlink()
    instance.symlink_to(secret)
    for argv in (["cscfg", "show", str(instance)], ["cscfg", "show", "--json", str(instance)]):
        assert main(argv) == 2
        out = capsys.readouterr()
        assert "symlink" in out.err
        assert SECRET not in out.out + out.err


# ---- finding 2: pkiuser -> root file write ---------------------------------------------------------


def test_finding2_the_writer_refuses_a_file_that_is_not_a_cscfg(tmp_path: Path) -> None:
    # a fake /etc/environment where CS.cfg should be: not a single role key may be appended
    env = tmp_path / "CS.cfg"
    env.write_text('PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"\n')
    before = env.read_bytes()
    master = read_cscfg(FIXTURES / "CS.cfg.master.sample")
    new = cscfg.CSCfg(str(env), demote(master, "ca2", 8443).lines)
    with pytest.raises(CSCfgWriteError) as err:
        write_cscfg(new, env)
    assert "is not a CS.cfg" in str(err.value) and "no CRL issuing point" in str(err.value)
    assert env.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CS.cfg"]


def test_finding2_the_writer_refuses_new_content_that_is_not_a_cscfg_or_not_the_role(instance: Path) -> None:
    before = instance.read_bytes()
    with pytest.raises(CSCfgWriteError, match=r"the new content is not a CS\.cfg"):
        write_cscfg(parse("PATH=/usr/bin\n", str(instance)))
    clone = demote(read_cscfg(instance), "ca2", 8443)
    with pytest.raises(CSCfgWriteError, match="it would be clone, not master"):
        write_cscfg(clone, role=Role.MASTER)
    assert instance.read_bytes() == before
    write_cscfg(clone, role=Role.CLONE)
    assert classify(read_cscfg(instance)).role is Role.CLONE


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_finding2_the_writer_refuses_a_target_that_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "CS.cfg"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    else:
        os.mknod(target, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero
    master = read_cscfg(FIXTURES / "CS.cfg.master.sample")
    t0 = time.monotonic()
    with pytest.raises(CSCfgWriteError) as err:
        write_cscfg(demote(master, "ca2", 8443), target)
    assert time.monotonic() - t0 < 0.5
    assert "(it must be a regular file)" in str(err.value) and str(target) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CS.cfg"]


def test_finding2_demote_refuses_a_file_with_no_issuing_point() -> None:
    env = parse('PATH="/usr/bin"\nLANG=C.UTF-8\n', "/etc/pki/pki-tomcat/ca/CS.cfg")
    with pytest.raises(CSCfgError, match="no CRL issuing point"):
        demote(env, "ca2.example.com", 8443)


def test_finding2_promote_refuses_a_block_that_gives_an_inconsistent_file() -> None:
    clone = read_cscfg(FIXTURES / "CS.cfg.clone.sample")
    block = ["ca.crl.MasterCRL.class=com.netscape.ca.CRLIssuingPoint", "ca.crl.MasterCRL.enable=yes"]
    with pytest.raises(CSCfgError) as err:
        promote(clone, block)
    assert "would be inconsistent" in str(err.value)
    assert "ca.crl.MasterCRL.enable (line" in str(err.value)


# ---- finding 4: a FIFO, a device or a huge file as CS.cfg -----------------------------------------


def test_finding4_fifo_as_cscfg_is_refused_at_once_naming_the_file(instance: Path) -> None:
    instance.unlink()
    os.mkfifo(instance)  # nobody writes to it: a blocking open or read would never return
    refused_at_once(instance, "is a FIFO")


def test_finding4_dev_zero_is_refused_at_once_as_a_symlink_and_as_a_device_node(instance: Path) -> None:
    instance.unlink()
    instance.symlink_to("/dev/zero")
    refused_at_once(instance, "symlink")
    instance.unlink()
    os.mknod(instance, 0o660 | stat.S_IFCHR, os.makedev(1, 5))  # a /dev/zero node of its own
    refused_at_once(instance, "is a device")


def test_finding4_a_200mb_cscfg_is_refused_at_once_naming_the_file(instance: Path) -> None:
    with instance.open("r+b") as f:
        f.truncate(200 * 1024 * 1024)
    refused_at_once(instance, "209715200 bytes", f"more than the {cscfg.MAX_CSCFG_BYTES} bytes")


def test_finding4_a_file_that_grows_past_the_cap_while_read_is_cut_off(instance: Path) -> None:
    data = instance.read_bytes()
    with pytest.raises(CSCfgError, match="more than the 1000 bytes"):
        read_cscfg(instance, max_bytes=1000)
    assert len(data) > 1000


# ---- finding 11: parser disagreement ---------------------------------------------------------------

# pki.util.load_properties splits with str.splitlines; Dogtag's Java reader (SimpleProperties.load,
# BufferedReader.readLine) ends lines at LF, CR and CRLF only
SPLITLINES_ONLY = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


@pytest.mark.parametrize("brk", SPLITLINES_ONLY, ids=lambda c: f"U+{ord(c):04X}")
def test_finding11_a_line_break_only_pki_util_sees_is_refused_naming_file_and_line(
    instance: Path, brk: str
) -> None:
    clone = (FIXTURES / "CS.cfg.clone.sample").read_text()
    assert "ca.crl.MasterCRL.enableCRLUpdates=false" in clone
    text = clone + f"ca.crl.MasterCRL.description=CRL{brk}ca.crl.MasterCRL.enableCRLUpdates=true\n"
    instance.write_text(text, encoding="utf-8")
    props: dict[str, str] = {}
    pki.util.load_properties(str(instance), props)
    # the disagreement: Dogtag's Python tools read the flag as true
    assert props["ca.crl.MasterCRL.enableCRLUpdates"] == "true"
    lineno = text.count("\n")
    with pytest.raises(CSCfgError) as err:
        read_cscfg(instance)
    assert err.value.lineno == lineno
    assert str(err.value).startswith(f"{instance}:{lineno}: ")
    assert "inside the line" in str(err.value)


@pytest.mark.parametrize("blank", ["\xa0", "\u3000", "\u2003", "\x1f"])
def test_finding11_a_unicode_blank_before_a_key_is_refused(blank: str) -> None:
    # Java skips only space, tab and form feed before a key: it would read a different key
    with pytest.raises(CSCfgError, match="whitespace in key"):
        parse(f"a=1\n{blank}ca.crl.MasterCRL.enableCRLUpdates=true\n")


def test_finding4_a_file_under_the_cap_with_many_keys_is_classified_in_linear_time(tmp_path: Path) -> None:
    # 4 MiB of distinct issuing points: one quadratic lookup per key would hold the event loop for hours
    line = "ca.crl.IP{:06d}.enableCRLCache=true\n"
    count = (cscfg.MAX_CSCFG_BYTES - 100) // len(line.format(0))
    path = tmp_path / "CS.cfg"
    path.write_text("".join(line.format(i) for i in range(count)))
    t0 = time.monotonic()
    report = classify(read_cscfg(path))
    assert time.monotonic() - t0 < 3.0
    assert report.role is Role.INCONSISTENT and "more than 64 CRL issuing points" in report.problems[0]
    with pytest.raises(CSCfgError, match="more than 64"):
        demote(read_cscfg(path), "ca2", 8443)


@pytest.mark.parametrize("value", ["true ", "true\t", "false ", "false\t"])
def test_finding11_a_flag_with_a_trailing_blank_is_neither_true_nor_false(value: str) -> None:
    # Dogtag 10.10 keeps trailing blanks in a value and PropConfigStore.getBoolean compares the whole
    # value with equalsIgnoreCase: "true " throws (verified on the bed's Dogtag:
    # tests/real/test_cscfg_java_reader.py), while pki.util strips it to "true". Neither reading is
    # taken: the flag is a problem, the file inconsistent.
    flag = "ca.crl.MasterCRL.enableCRLUpdates"
    clone = (FIXTURES / "CS.cfg.clone.sample").read_text()
    report = classify(parse(clone.replace(f"{flag}=false", f"{flag}={value}")))
    assert report.role is Role.INCONSISTENT
    assert any(flag in p and "not true or false" in p for p in report.problems)
    # blanks before the value are skipped by every reader
    assert classify(parse(clone.replace(f"{flag}=false", f"{flag}= \tfalse"))).role is Role.CLONE


def test_finding11_an_interval_with_a_trailing_blank_is_not_an_integer() -> None:
    # PropConfigStore.getInteger is Integer.parseInt of the whole value: "600 " throws in the CA
    clone = (FIXTURES / "CS.cfg.clone.sample").read_text()
    assert "ca.certStatusUpdateInterval=0\n" in clone
    key = "ca.certStatusUpdateInterval"
    report = classify(parse(clone.replace(f"{key}=0\n", f"{key}=0 \n")))
    assert report.role is Role.INCONSISTENT
    assert any(key in p and "not an integer" in p for p in report.problems)
    assert classify(parse(clone.replace(f"{key}=0\n", f"{key}=\t0\n"))).role is Role.CLONE
