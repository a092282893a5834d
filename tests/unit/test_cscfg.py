"""CS.cfg engine: parsing, classification, promote/demote, with golden files.

Golden files live in tests/fixtures/golden/. After a reviewed, intended change of the output,
regenerate them with `CA_WATCHDOG_REGOLD=1 .venv/bin/python -m pytest tests/unit/test_cscfg.py`
and read the git diff before committing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ca_watchdog.cscfg import (
    CSCfg,
    CSCfgError,
    Role,
    changed_role_keys,
    classify,
    demote,
    is_role_key,
    parse,
    promote,
    read_cscfg,
    unified_diff,
    unrelated_lines,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GOLDEN = FIXTURES / "golden"
MASTER_FIXTURES = [
    "CS.cfg.master.sample",
    "CS.cfg.master.two-ip.sample",
    "CS.cfg.master.no-enable-keys.sample",
    "CS.cfg.master.crlf.sample",
    "CS.cfg.master.messy.sample",
]
ALL_FIXTURES = sorted(p.name for p in FIXTURES.glob("CS.cfg.*.sample") if "malformed" not in p.name)


def load(name: str) -> CSCfg:
    return read_cscfg(FIXTURES / name)


def golden(name: str, data: bytes) -> None:
    path = GOLDEN / name
    if os.environ.get("CA_WATCHDOG_REGOLD"):
        path.write_bytes(data)
    assert path.exists(), f"golden file {path} missing (CA_WATCHDOG_REGOLD=1 creates it)"
    assert data == path.read_bytes(), f"output differs from {path}"


def stem(name: str) -> str:
    return name.removeprefix("CS.cfg.").removesuffix(".sample")


def raw_unrelated(cfg: CSCfg) -> list[str]:
    """Unrelated lines with their line endings, exactly as stored."""
    return [line.raw for line in cfg.lines if line.key is None or not is_role_key(line.key)]


def same_unrelated_bytes(before: CSCfg, after: CSCfg) -> None:
    a, b = raw_unrelated(before), raw_unrelated(after)
    assert len(a) == len(b)
    for x, y in zip(a[:-1], b[:-1], strict=True):
        assert x == y
    # the file's last line may gain a line ending when keys are appended after it, nothing else
    if a:
        assert b[-1] == a[-1] or (not a[-1].endswith("\n") and b[-1].rstrip("\r\n") == a[-1])


# ---- golden: demote, promote, round trip --------------------------------------------------------


@pytest.mark.parametrize("name", MASTER_FIXTURES)
def test_demote_golden(name: str) -> None:
    master = load(name)
    assert classify(master).role is Role.MASTER
    demoted = demote(master, "secondary.example.com", 8443)
    golden(f"{stem(name)}.demoted", demoted.render())
    report = classify(demoted)
    assert report.role is Role.CLONE, report.problems
    assert report.master_agent == "secondary.example.com:8443"
    same_unrelated_bytes(master, demoted)


def test_demote_is_exactly_the_pkispawn_clone_diff() -> None:
    master, clone = load("CS.cfg.master.sample"), load("CS.cfg.clone.sample")
    demoted = demote(master, "primary.example.com", 8443)
    # dogtag.md 2.1: the complete master -> clone difference made by pkispawn
    assert {k: demoted.get(k) for k in changed_role_keys(master, demoted)} == {
        "ca.crl.MasterCRL.enableCRLCache": "false",
        "ca.crl.MasterCRL.enableCRLUpdates": "false",
        "ca.certStatusUpdateInterval": "0",
        "ca.listenToCloneModifications": "false",
        "master.ca.agent.host": "primary.example.com",
        "master.ca.agent.port": "8443",
    }
    # against the real pkispawn clone only the clone's own identity differs
    assert set(changed_role_keys(demoted, clone)) == {
        "installDate",
        "internaldb.ldapconn.host",
        "machineName",
        "securitydomain.host",
    }
    # edits in place, new keys at the end (FreeIPA directive-setter style)
    old = master.render().decode().splitlines()
    new = demoted.render().decode().splitlines()
    assert new[len(old) :] == [
        "ca.certStatusUpdateInterval=0",
        "master.ca.agent.host=primary.example.com",
        "master.ca.agent.port=8443",
    ]
    changed_lines = {i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b}
    assert {old[i] for i in changed_lines} == {
        "ca.crl.MasterCRL.enableCRLCache=true",
        "ca.crl.MasterCRL.enableCRLUpdates=true",
        "ca.listenToCloneModifications=true",
    }


def test_promote_pkispawn_clone_golden() -> None:
    master, clone = load("CS.cfg.master.sample"), load("CS.cfg.clone.sample")
    assert classify(clone).role is Role.CLONE
    promoted = promote(clone, master.crl_lines())
    golden("clone.promoted", promoted.render())
    report = classify(promoted)
    assert report.role is Role.MASTER, report.problems
    assert report.warnings == ()
    assert promoted.crl_lines() == master.crl_lines()
    assert promoted.get("ca.certStatusUpdateInterval") == "600"
    assert promoted.get("ca.listenToCloneModifications") == "true"
    assert promoted.get("master.ca.agent.host") is None
    assert promoted.get("master.ca.agent.port") is None
    assert unrelated_lines(promoted) == unrelated_lines(clone)
    # the clone keeps its own identity: nothing but role keys came from the master
    assert promoted.get("machineName") == "secondary.example.com"
    assert promoted.get("internaldb.ldapconn.host") == "secondary.example.com"


@pytest.mark.parametrize("name", MASTER_FIXTURES)
def test_round_trip_master_demote_promote(name: str) -> None:
    master = load(name)
    demoted = demote(master, "secondary.example.com", 8443)
    back = promote(demoted, master.crl_lines())
    golden(f"{stem(name)}.round-trip", back.render())
    assert classify(back).role is Role.MASTER
    same_unrelated_bytes(master, back)
    assert back.crl_lines() == forced_on(master).crl_lines()


def forced_on(cfg: CSCfg) -> CSCfg:
    """What promote must leave in the ca.crl. block: the master's, generation forced on."""
    return promote(cfg, cfg.crl_lines())


def test_round_trip_of_the_sample_only_adds_the_explicit_interval() -> None:
    master = load("CS.cfg.master.sample")
    back = promote(demote(master, "secondary.example.com", 8443), master.crl_lines())
    assert back.render() == master.render() + b"ca.certStatusUpdateInterval=600\n"
    crlf = load("CS.cfg.master.crlf.sample")
    back = promote(demote(crlf, "secondary.example.com", 8443), crlf.crl_lines())
    assert back.render() == crlf.render() + b"ca.certStatusUpdateInterval=600\r\n"


def test_demote_writes_missing_enable_keys_explicitly_false() -> None:
    master = load("CS.cfg.master.no-enable-keys.sample")
    report = classify(master)
    assert report.role is Role.MASTER  # missing means true: this file generates CRLs
    assert [(p.id, p.crl_cache, p.crl_updates) for p in report.issuing_points] == [
        ("CACertsCRL", True, True),
        ("MasterCRL", True, True),
    ]
    demoted = demote(master, "ca2.example.com", 8443)
    for ip in ("CACertsCRL", "MasterCRL"):
        assert demoted.get(f"ca.crl.{ip}.enableCRLCache") == "false"
        assert demoted.get(f"ca.crl.{ip}.enableCRLUpdates") == "false"
    assert classify(demoted).role is Role.CLONE


def test_second_issuing_point_is_demoted_and_promoted() -> None:
    master = load("CS.cfg.master.two-ip.sample")
    assert master.issuing_points() == ["CACertsCRL", "MasterCRL"]
    demoted = demote(master, "ca2.example.com", 8443)
    assert demoted.get("ca.crl.CACertsCRL.enableCRLCache") == "false"
    assert demoted.get("ca.crl.CACertsCRL.enableCRLUpdates") == "false"
    # promote from the demoted file's own block: every flag is forced back on
    promoted = promote(demoted, demoted.crl_lines())
    for ip in ("CACertsCRL", "MasterCRL"):
        assert promoted.get(f"ca.crl.{ip}.enableCRLCache") == "true"
        assert promoted.get(f"ca.crl.{ip}.enableCRLUpdates") == "true"
    assert classify(promoted).role is Role.MASTER


def test_promote_and_demote_are_idempotent_on_fixtures() -> None:
    for name in MASTER_FIXTURES:
        master = load(name)
        once = demote(master, "h.example.com", 8443)
        assert demote(once, "h.example.com", 8443).render() == once.render()
        p1 = promote(once, master.crl_lines())
        assert promote(p1, master.crl_lines()).render() == p1.render()


# ---- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*ALL_FIXTURES, "golden"])
def test_unchanged_file_renders_byte_for_byte(name: str) -> None:
    paths = sorted(GOLDEN.iterdir()) if name == "golden" else [FIXTURES / name]
    for path in paths:
        data = path.read_bytes()
        assert parse(data, str(path)).render() == data


@pytest.mark.parametrize(
    "text",
    [
        "a=1\r\nb=2\r\n",
        "a=1\nb=2",  # no final newline
        "a=1 \nb=2\t\n",  # trailing whitespace belongs to the value in Java
        "# comment\n\n   \n\t# indented comment\na=1\n",
        "a=1\r\nb=2\nc=3",  # mixed endings
        "",
        "\n",
        "a=x=y:z # not a comment\n",
        "ключ=значение ✓\n",
        "\ufeffa=1\n",
    ],
)
def test_render_is_exact(text: str) -> None:
    cfg = parse(text)
    assert cfg.render() == text.encode()
    assert cfg.render().decode() == "".join(line.raw for line in cfg.lines)


def test_values_and_comments() -> None:
    cfg = parse("# k=v is a comment\na=1 \n  b=2 \n")
    assert cfg.get("k") is None
    assert cfg.get("a") == "1 "  # Java keeps trailing whitespace
    assert cfg.get("b") == "2 "
    assert cfg.keys() == ["a", "b"]


def test_malformed_fixture_names_file_and_line() -> None:
    path = FIXTURES / "CS.cfg.malformed.sample"
    with pytest.raises(CSCfgError) as err:
        read_cscfg(path)
    assert err.value.lineno == 42
    assert err.value.path == str(path)
    assert str(err.value).startswith(f"{path}:42: ")
    assert "'='" in str(err.value)


@pytest.mark.parametrize(
    ("text", "lineno", "fragment"),
    [
        ("a=1\nno separator here\n", 2, "missing '='"),
        ("no-equals", 1, "missing '='"),
        ("a=1\r\nb=2\r\nc\r\n", 3, "missing '='"),
        ("a=1\n=value\n", 2, "empty key"),
        ("a b=1\n", 1, "whitespace in key"),
        ("a =1\n", 1, "whitespace in key"),
        ("a=1\nb=ends in backslash\\\nc=3\n", 2, "continuation"),
        ("a=1\rca.crl.MasterCRL.enableCRLCache=true\n", 1, "carriage return"),
        ("a=1\nca.crl.MasterCRL.enableCRLCache:x=false\n", 2, "':' in key"),
        ("ca.listenToCloneModifications:true=1\n", 1, "':' in key"),
        (b"a=1\nb=\xff\n", 2, "UTF-8"),
        ("a=1\nb=\x00\n", 2, "NUL"),
    ],
)
def test_malformed_lines(text: str | bytes, lineno: int, fragment: str) -> None:
    with pytest.raises(CSCfgError) as err:
        parse(text, "/etc/pki/pki-tomcat/ca/CS.cfg")
    assert err.value.lineno == lineno
    assert f"/etc/pki/pki-tomcat/ca/CS.cfg:{lineno}:" in str(err.value)
    assert fragment in str(err.value)


def test_even_backslashes_and_colon_in_unrelated_keys_are_accepted() -> None:
    cfg = parse("a=C:\\\\\nweird:key=1\nb=2\n")
    assert cfg.get("a") == "C:\\\\"
    assert cfg.get("weird:key") == "1"


def test_duplicates_last_wins_and_are_reported() -> None:
    cfg = load("CS.cfg.master.messy.sample")
    assert cfg.get("https.port") == "8443"
    dups = cfg.duplicates()
    assert list(dups) == ["https.port"]
    lines = cfg.render().decode().split("\n")
    assert [lines[n - 1] for n in dups["https.port"]] == ["https.port=8444", "https.port=8443"]
    report = classify(cfg)
    assert report.duplicates == dups
    assert any("https.port" in w and "last one wins" in w for w in report.warnings)


def test_duplicate_role_keys_are_all_rewritten() -> None:
    text = (
        "ca.crl.MasterCRL.enableCRLCache=false\n"
        "ca.crl.MasterCRL.enableCRLUpdates=true\n"
        "x=1\n"
        "ca.crl.MasterCRL.enableCRLCache=true\n"
    )
    cfg = parse(text)
    assert cfg.get("ca.crl.MasterCRL.enableCRLCache") == "true"
    demoted = demote(cfg, "h", 8443)
    assert [line.raw for line in demoted.lines][:4] == [
        "ca.crl.MasterCRL.enableCRLCache=false\n",
        "ca.crl.MasterCRL.enableCRLUpdates=false\n",
        "x=1\n",
        "ca.crl.MasterCRL.enableCRLCache=false\n",
    ]


def test_issuing_points() -> None:
    assert load("CS.cfg.master.sample").issuing_points() == ["MasterCRL"]
    assert load("CS.cfg.master.two-ip.sample").issuing_points() == ["CACertsCRL", "MasterCRL"]
    cfg = parse(
        "ca.crl._000=##\n"
        "ca.crl.pageSize=100\n"
        "ca.crl.MasterCRL.enable=true\n"
        "ca.crl.MasterCRL.extension.CRLNumber.enable=true\n"
        "ca.crl.Sub-CA_2.class=com.netscape.ca.CRLIssuingPoint\n"
        "ca.crl._private.class=com.netscape.ca.CRLIssuingPoint\n"
        "ca.crlFoo.bar.x=1\n"
        "xca.crl.Other.enable=true\n"
    )
    # Dogtag loads every sub-store under ca.crl, also one whose name starts with "_"
    assert cfg.issuing_points() == ["MasterCRL", "Sub-CA_2", "_private"]


def test_underscore_issuing_point_is_demoted() -> None:
    cfg = parse(
        "ca.crl.MasterCRL.enableCRLCache=true\nca.crl.MasterCRL.enableCRLUpdates=true\n"
        "ca.crl._x.class=com.netscape.ca.CRLIssuingPoint\n"
    )
    demoted = demote(cfg, "h", 1)
    assert demoted.get("ca.crl._x.enableCRLCache") == "false"
    assert classify(demoted).role is Role.CLONE


# ---- classification ------------------------------------------------------------------------------

MASTER_BODY = (
    "ca.crl.MasterCRL.class=com.netscape.ca.CRLIssuingPoint\n"
    "ca.crl.MasterCRL.enableCRLCache=true\n"
    "ca.crl.MasterCRL.enableCRLUpdates=true\n"
)
CLONE_BODY = (
    "ca.crl.MasterCRL.class=com.netscape.ca.CRLIssuingPoint\n"
    "ca.crl.MasterCRL.enableCRLCache=false\n"
    "ca.crl.MasterCRL.enableCRLUpdates=false\n"
    "ca.certStatusUpdateInterval=0\n"
    "ca.listenToCloneModifications=false\n"
    "master.ca.agent.host=ca1.example.com\n"
    "master.ca.agent.port=8443\n"
)


def test_classify_fixtures() -> None:
    m = classify(load("CS.cfg.master.sample"))
    assert (m.role, m.problems, m.warnings) == (Role.MASTER, (), ())
    assert m.status_update_interval == 600  # missing means 600
    assert m.listen_to_clones is True
    c = classify(load("CS.cfg.clone.sample"))
    assert (c.role, c.problems) == (Role.CLONE, ())
    assert c.master_agent == "primary.example.com:8443"
    i = classify(load("CS.cfg.inconsistent.sample"))
    assert i.role is Role.INCONSISTENT
    assert any("enableCRLCache=true but enableCRLUpdates=false" in p for p in i.problems)


def test_pkispawn_master_without_the_status_keys() -> None:
    report = classify(parse(MASTER_BODY))
    assert report.role is Role.MASTER
    assert report.status_update_interval == 600
    assert report.listen_to_clones is False  # missing means false
    assert any("listenToCloneModifications is false" in w for w in report.warnings)


def test_missing_enable_keys_mean_true() -> None:
    report = classify(parse("ca.crl.MasterCRL.class=com.netscape.ca.CRLIssuingPoint\n"))
    assert report.role is Role.MASTER
    assert report.issuing_points[0].crl_cache and report.issuing_points[0].crl_updates


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (MASTER_BODY.replace("Updates=true", "Updates=false"), "enableCRLCache=true but enableCRLUpdates=false"),
        (MASTER_BODY + "ca.certStatusUpdateInterval=0\n", "CRL master with ca.certStatusUpdateInterval=0"),
        (MASTER_BODY + "ca.certStatusUpdateInterval=-5\n", "negative"),
        (MASTER_BODY + "ca.certStatusUpdateInterval=²\n", "not an integer"),
        (MASTER_BODY + "ca.certStatusUpdateInterval=ten\n", "not an integer"),
        (MASTER_BODY + "ca.listenToCloneModifications=yes\n", "is not true or false"),
        (MASTER_BODY.replace("Cache=true", "Cache=maybe"), "is not true or false"),
        (
            MASTER_BODY + "ca.crl.Second.enableCRLCache=false\nca.crl.Second.enableCRLUpdates=false\n",
            "generate CRLs but Second do not",
        ),
        # a second point lacking the keys generates CRLs (missing means true): half master
        (CLONE_BODY + "ca.crl.Second.class=com.netscape.ca.CRLIssuingPoint\n", "generate CRLs but MasterCRL do not"),
        (CLONE_BODY.replace("ca.certStatusUpdateInterval=0\n", ""), "clone runs the certificate status task"),
        (CLONE_BODY.replace("Modifications=false", "Modifications=true"), "clone has ca.listenToCloneModifications"),
        ("a=1\nca.crl.pageSize=100\n", "no CRL issuing point"),
    ],
)
def test_classify_inconsistent(text: str, fragment: str) -> None:
    report = classify(parse(text))
    assert report.role is Role.INCONSISTENT
    assert any(fragment in p for p in report.problems), report.problems


def test_clone_defaults_and_agent() -> None:
    report = classify(parse(CLONE_BODY.replace("ca.listenToCloneModifications=false\n", "")))
    assert report.role is Role.CLONE
    assert report.listen_to_clones is False
    no_agent = classify(parse(CLONE_BODY.replace("master.ca.agent.host=ca1.example.com\n", "")))
    assert no_agent.role is Role.CLONE
    assert no_agent.master_agent is None
    assert any("no master.ca.agent" in w for w in no_agent.warnings)
    blank = classify(parse(CLONE_BODY.replace("host=ca1.example.com", "host= ")))
    assert blank.master_agent_host is None


# ---- transforms in detail ------------------------------------------------------------------------


def test_promote_keeps_a_positive_interval_and_fixes_bad_ones() -> None:
    block = load("CS.cfg.master.sample").crl_lines()
    for value, expected in (("300", "300"), ("0", "600"), ("²", "600"), (" 60", "600"), ("-1", "600")):
        clone = parse(CLONE_BODY.replace("ca.certStatusUpdateInterval=0", f"ca.certStatusUpdateInterval={value}"))
        assert promote(clone, block).get("ca.certStatusUpdateInterval") == expected


def test_promote_removes_every_master_agent_line_and_places_block() -> None:
    clone = parse("a=1\n" + CLONE_BODY + "master.ca.agent.host=old\nz=9")
    promoted = promote(clone, ["ca.crl.MasterCRL.enableCRLCache=false", "ca.crl.MasterCRL.description=x\r\n"])
    assert promoted.render().decode() == (
        "a=1\n"
        "ca.crl.MasterCRL.enableCRLCache=true\n"
        "ca.crl.MasterCRL.description=x\n"
        "ca.crl.MasterCRL.enableCRLUpdates=true\n"
        "ca.certStatusUpdateInterval=600\n"
        "ca.listenToCloneModifications=true\n"
        "z=9"
    )


def test_promote_of_a_file_without_crl_lines_appends_the_block() -> None:
    promoted = promote(parse("a=1"), ["ca.crl.MasterCRL.class=c"])
    assert promoted.render() == (
        b"a=1\nca.crl.MasterCRL.class=c\nca.crl.MasterCRL.enableCRLCache=true\n"
        b"ca.crl.MasterCRL.enableCRLUpdates=true\nca.certStatusUpdateInterval=600\n"
        b"ca.listenToCloneModifications=true\n"
    )


@pytest.mark.parametrize(
    ("block", "fragment"),
    [
        ([], "empty"),
        (["# only a comment"], "empty"),
        (["ca.crl.pageSize=100"], "no issuing point"),
        (["ca.crl.MasterCRL.enable=true", "internaldb.basedn=o=x"], "is not a ca.crl. key"),
        (["ca.crl.MasterCRL.enable=true", "ca.crl.MasterCRL.x"], "missing '='"),
        (["ca.crl.MasterCRL.enable=true\nca.listenToCloneModifications=false"], "line break"),
    ],
)
def test_promote_refuses_bad_blocks(block: list[str], fragment: str) -> None:
    with pytest.raises(CSCfgError) as err:
        promote(parse(CLONE_BODY), block, origin="store:/ca-watchdog/crl-block")
    assert "store:/ca-watchdog/crl-block" in str(err.value)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("host", "port"),
    [
        ("", 8443),
        ("a b", 8443),
        ("h\\", 8443),  # Dogtag would join the next line to the value
        ("h\nx", 1),
        ("h\x07", 1),
        ("a=b", 1),
        ("h#x", 1),
        ("h", 0),
        ("h", 65536),
        ("h", "x"),
    ],
)
def test_demote_refuses_bad_targets(host: str, port: int | str) -> None:
    with pytest.raises(ValueError):
        demote(parse(MASTER_BODY), host, port)


def test_demote_accepts_ipv6_and_string_port() -> None:
    demoted = demote(parse(MASTER_BODY), "2001:db8::1", "8443")
    assert demoted.get("master.ca.agent.host") == "2001:db8::1"
    assert demoted.get("master.ca.agent.port") == "8443"


def test_appending_to_a_file_without_final_newline() -> None:
    demoted = demote(parse(MASTER_BODY.rstrip("\n")), "h", 8443)
    text = demoted.render().decode()
    assert "ca.crl.MasterCRL.enableCRLUpdates=false\nca.certStatusUpdateInterval=0\n" in text
    assert parse(text).render() == text.encode()


def test_unified_diff() -> None:
    master = load("CS.cfg.master.sample")
    diff = unified_diff(master, demote(master, "ca2.example.com", 8443))
    assert "\n-ca.crl.MasterCRL.enableCRLCache=true\n" in diff
    assert "\n+ca.crl.MasterCRL.enableCRLCache=false\n" in diff
    assert "+master.ca.agent.host=ca2.example.com\n" in diff
    assert diff.startswith(f"--- {master.path}\n+++ {master.path} (new)\n")
    assert unified_diff(master, master) == ""
    nofinal = parse("a=1\nb=2", "x")
    diff = unified_diff(nofinal, demote(parse("a=1\nb=2\nca.crl.M.class=c", "x"), "h", 1))
    assert "\\ No newline at end of file" in diff
    # a form feed inside a line is refused outright (finding 11), so it can never split a diff line
    with pytest.raises(CSCfgError):
        parse("a=x\x0cy\nca.crl.M.class=c\n", "ff")


def test_changed_role_keys() -> None:
    master = load("CS.cfg.master.sample")
    changed = changed_role_keys(master, demote(master, "h", 1))
    assert all(is_role_key(k) for k in changed)
    assert len(changed) == 6


def test_promote_is_idempotent_when_role_lines_and_other_lines_use_different_line_endings() -> None:
    # found by hypothesis in CI: the ending for added lines used to be the majority of all lines,
    # which the first promote itself could flip
    text = (
        "a=1\nb=2\n"
        + "".join(f"ca.crl.X.k{i}=v\r\n" for i in range(5))
        + "ca.crl.X.enableCRLCache=false\r\nca.crl.X.enableCRLUpdates=false\r\n"
        + "ca.certStatusUpdateInterval=0\r\nmaster.ca.agent.host=h\r\nmaster.ca.agent.port=1\r\n"
    )
    clone = parse(text)
    once = promote(clone, ["ca.crl.X.class=com.netscape.ca.CRLIssuingPoint"])
    assert promote(once, ["ca.crl.X.class=com.netscape.ca.CRLIssuingPoint"]).render() == once.render()
    assert once.render().startswith(b"a=1\nb=2\nca.crl.X.class=com.netscape.ca.CRLIssuingPoint\n")
