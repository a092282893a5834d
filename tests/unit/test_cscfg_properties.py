"""Property tests: promote/demote on random CS.cfg files.

Random files mix unrelated keys, comments, blank lines, CRL leaf keys (pageSize, _000), any number
of issuing points with any ids Dogtag accepts (a sub-store name: no '.', no separator characters),
present or missing enableCRL* keys, the four status keys or not, in random order, with random line
endings and with or without a final newline.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ca_watchdog.cscfg import CSCfgError, Role, classify, demote, is_role_key, parse, promote, unrelated_lines

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# issuing point ids: any sub-store name; letters of any script, digits, '_' and '-' (may start with '_')
ip_ids = st.text(
    alphabet=st.characters(categories=("L", "Nd"), include_characters="_-", exclude_characters="\x00"),
    min_size=1,
    max_size=12,
)
unrelated_keys = st.from_regex(r"[A-Za-z!][A-Za-z0-9_.\-]{0,24}", fullmatch=True).filter(lambda k: not is_role_key(k))
# every character that ends a line for Java (CR, LF) or for pki.util.load_properties (str.splitlines)
LINE_BREAKS = "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
# values: anything on one line; trailing whitespace, '=', ':', '#' and non-ASCII included
values = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters=LINE_BREAKS + "\x00"),
    max_size=30,
).filter(lambda v: (len(v) - len(v.rstrip("\\"))) % 2 == 0)
comments = st.builds(lambda indent, text: indent + "#" + text, st.sampled_from(["", " ", "\t"]), values)
blanks = st.sampled_from(["", " ", "\t  "])
booleans = st.sampled_from(["true", "false", "TRUE", "False"])
ENDINGS = st.sampled_from(["\n", "\r\n"])


@st.composite
def issuing_point_lines(draw: st.DrawFn, ip: str) -> list[str]:
    p = f"ca.crl.{ip}."
    lines = [f"{p}class=com.netscape.ca.CRLIssuingPoint"]
    if draw(st.booleans()):
        lines.append(f"{p}enable=true")
    for flag in ("enableCRLCache", "enableCRLUpdates"):
        if draw(st.booleans()):  # missing means true
            lines.append(f"{p}{flag}={draw(booleans)}")
    lines += [f"{p}{k}={draw(values)}" for k in draw(st.lists(st.sampled_from(["description", "dailyUpdates"])))]
    if draw(st.booleans()):
        lines.append(f"{p}extension.CRLNumber.enable=true")
    return lines


@dataclass
class Doc:
    bodies: list[str]
    endings: list[str]
    final_newline: bool

    def text(self) -> str:
        out = [b + e for b, e in zip(self.bodies, self.endings, strict=True)]
        if out and not self.final_newline:
            out[-1] = self.bodies[-1]
        return "".join(out)


@st.composite
def documents(draw: st.DrawFn) -> Doc:
    ids = draw(st.lists(ip_ids, min_size=1, max_size=4, unique=True))
    lines: list[str] = []
    for ip in ids:
        lines += draw(issuing_point_lines(ip))
    if draw(st.booleans()):
        lines += ["ca.crl._000=##", "ca.crl._001=## CA CRL", "ca.crl.pageSize=100"]
    for key, value in (
        ("ca.certStatusUpdateInterval", st.sampled_from(["0", "600", "300"])),
        ("ca.listenToCloneModifications", booleans),
        ("master.ca.agent.host", st.sampled_from(["ca1.example.com", ""])),
        ("master.ca.agent.port", st.sampled_from(["8443", ""])),
    ):
        if draw(st.booleans()):
            lines.append(f"{key}={draw(value)}")
    others = draw(
        st.lists(
            st.one_of(
                st.builds(lambda k, v, ws: f"{ws}{k}={v}", unrelated_keys, values, st.sampled_from(["", "  "])),
                comments,
                blanks,
            ),
            max_size=25,
        )
    )
    bodies = draw(st.permutations(lines + others))
    if draw(st.booleans()):
        endings = [draw(ENDINGS)] * len(bodies)
    else:
        endings = draw(st.lists(ENDINGS, min_size=len(bodies), max_size=len(bodies)))
    return Doc(bodies, endings, draw(st.booleans()))


def block_of(text: str) -> list[str]:
    return parse(text).crl_lines()


@SETTINGS
@given(documents())
def test_parse_render_is_byte_exact(doc: Doc) -> None:
    text = doc.text()
    assert parse(text).render() == text.encode("utf-8")


@SETTINGS
@given(documents(), st.sampled_from(["ca2.example.com", "10.0.0.2", "2001:db8::2"]), st.integers(1, 65535))
def test_demote_keeps_unrelated_lines_is_idempotent_and_gives_a_clone(doc: Doc, host: str, port: int) -> None:
    cfg = parse(doc.text())
    once = demote(cfg, host, port)
    assert unrelated_lines(once) == unrelated_lines(cfg)
    assert demote(once, host, port).render() == once.render()
    report = classify(once)
    assert report.role is Role.CLONE, report.problems
    assert report.master_agent == f"{host}:{port}"
    assert parse(once.render()).render() == once.render()


@SETTINGS
@given(documents(), documents())
def test_promote_keeps_unrelated_lines_is_idempotent_and_gives_a_master(doc: Doc, master_doc: Doc) -> None:
    cfg = parse(doc.text())
    block = block_of(master_doc.text())
    once = promote(cfg, block)
    assert unrelated_lines(once) == unrelated_lines(cfg)
    assert promote(once, block).render() == once.render()
    report = classify(once)
    assert report.role is Role.MASTER, report.problems
    assert {p.id for p in report.issuing_points} == set(parse(master_doc.text()).issuing_points())
    assert once.get("master.ca.agent.host") is None and once.get("master.ca.agent.port") is None
    assert parse(once.render()).render() == once.render()


@SETTINGS
@given(documents())
def test_demote_then_promote_gives_a_master_and_promote_then_demote_a_clone(doc: Doc) -> None:
    cfg = parse(doc.text())
    block = cfg.crl_lines()  # the pre-demotion block, as the master publishes it
    master = promote(demote(cfg, "ca2.example.com", 8443), block)
    assert classify(master).role is Role.MASTER
    assert unrelated_lines(master) == unrelated_lines(cfg)
    clone = demote(promote(cfg, block), "ca2.example.com", 8443)
    assert classify(clone).role is Role.CLONE
    assert unrelated_lines(clone) == unrelated_lines(cfg)
    # the issuing points survive both ways
    assert set(master.issuing_points()) == set(cfg.issuing_points()) == set(clone.issuing_points())


# a line that Dogtag's Python reader refuses: not blank, not a comment, no '='
bad_lines = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters=LINE_BREAKS + "\x00="),
    min_size=1,
    max_size=30,
).filter(lambda s: s.strip() != "" and not s.strip().startswith("#"))


@SETTINGS
@given(documents(), bad_lines, st.data())
def test_malformed_files_are_refused_with_the_right_line_number(doc: Doc, bad: str, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(doc.bodies)))
    doc.bodies.insert(at, bad)
    doc.endings.insert(at, "\n")
    with pytest.raises(CSCfgError) as err:
        parse(doc.text(), "/etc/pki/pki-tomcat/ca/CS.cfg")
    assert err.value.lineno == at + 1
    assert str(err.value).startswith(f"/etc/pki/pki-tomcat/ca/CS.cfg:{at + 1}: ")


@SETTINGS
@given(documents(), st.data())
def test_a_lone_carriage_return_is_refused(doc: Doc, data: st.DataObject) -> None:
    assume(doc.bodies)
    at = data.draw(st.integers(0, len(doc.bodies) - 1))
    doc.bodies[at] += "\rx=1"
    with pytest.raises(CSCfgError) as err:
        parse(doc.text())
    assert err.value.lineno == at + 1
