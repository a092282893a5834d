"""Issue 10, finding 11: the same CS.cfg read by Dogtag's own Java reader, by pki.util.load_properties
and by ca-watchdog.

The Java side is the real thing: a `PropConfigStore` over a `FileConfigStore`, loaded as the CA
does at start (SimpleProperties.load: BufferedReader.readLine over the bytes read as ISO-8859-1),
from the bed's pki-cms.jar, run in the bed's own JVM (Dogtag 10.10, OpenJDK 11, through `jjs`:
nothing to compile). For every character that is a
line break or a blank to one of the readers (the C0 controls, DEL, NEL, NBSP, the Unicode spaces,
LS, PS) in every place of a line (inside a value, before a key, inside a key, around `=`, at the
end), appended to a clone's CS.cfg: whatever ca-watchdog accepts, both Dogtag readers read with
the same keys and values (pki.util strips the value's ends); a file on which they disagree is
refused, naming file and line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pki.util
import pytest
from dogtag_bed import DogtagBed

from ca_watchdog import cscfg

pytestmark = pytest.mark.real

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FLAG = "ca.crl.MasterCRL.enableCRLUpdates"
PLACES = {
    "inside a value": "ca.crl.MasterCRL.description=CRL{c}" + FLAG + "=true",
    "before a key": "{c}" + FLAG + "=true",
    "inside a key": "ca.crl.Master{c}CRL.enableCRLUpdates=true",
    "before =": FLAG + "{c}=true",
    "after =": FLAG + "={c}true",
    "end of a value": FLAG + "=true{c}",
}
CHARS = [chr(c) for c in range(0x21) if c != 0x0A] + ["\x7f", "\x85", "\xa0", "\u2003", "\u3000", "\u2028", "\u2029"]
JS = Path(__file__).with_name("dogtag_props.js")
CLASSPATH = ":".join(
    [
        "/usr/share/java/pki/pki-cms.jar",
        "/usr/share/java/pki/pki-certsrv.jar",
        "/usr/share/java/pki/pki-cmsutil.jar",
        "/usr/share/java/slf4j-api.jar",
        "/usr/share/java/slf4j-nop.jar",
    ]
)


def java_read(bed: DogtagBed, files: list[Path]) -> list[dict[str, str]]:
    """Each file as Dogtag's PropConfigStore reads it, in the bed's JVM."""
    inside = ["/" + str(f.relative_to(bed.root)) for f in files]
    p = subprocess.run(
        [
            "chroot", str(bed.root), "/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8",
            "jjs", "-J-Dnashorn.args=--no-deprecation-warning", "-cp", CLASSPATH,
            "/" + str((bed.root / "tmp" / JS.name).relative_to(bed.root)), "--", *inside,
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(files), p.stdout[-2000:] + p.stderr[-2000:]
    return [{_utf8(k): _utf8(v) for k, v in json.loads(line).items()} for line in lines]


def _utf8(latin1: str) -> str:
    """Dogtag 10.10 reads CS.cfg as ISO-8859-1: its units are the file's bytes, UTF-8 encoded."""
    return latin1.encode("latin-1").decode("utf-8", "surrogateescape")


def python_read(path: Path) -> dict[str, str] | str:
    props: dict[str, str] = {}
    try:
        pki.util.load_properties(str(path), props)
    except Exception as exc:  # "Missing delimiter" and the like: a refusal
        return f"refused: {type(exc).__name__}"
    return props


def test_finding11_whatever_ca_watchdog_accepts_dogtags_java_reader_and_pki_util_read_alike() -> None:
    bed = DogtagBed()
    if not (bed.root / "usr" / "share" / "java" / "pki" / "pki-cms.jar").exists():
        pytest.fail(f"no real-Dogtag bed at {bed.root}: bash beds/dogtag/bed.sh build", pytrace=False)
    clone = (FIXTURES / "CS.cfg.clone.sample").read_text()
    assert f"{FLAG}=false" in clone
    work = bed.root / "tmp" / f"cawd-finding11-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    shutil.copy(JS, bed.root / "tmp" / JS.name)
    try:
        cases: list[tuple[str, str, Path]] = []
        for place, template in PLACES.items():
            for c in CHARS:
                f = work / f"CS.cfg.{len(cases)}"
                f.write_bytes((clone + template.format(c=c) + "\n").encode("utf-8"))
                cases.append((place, c, f))
        java = java_read(bed, [f for _, _, f in cases])
        refused: dict[str, list[str]] = {}
        unsure: dict[str, list[str]] = {}
        disagreements = 0
        for (place, c, f), jall in zip(cases, java, strict=True):
            jmap = {k: v for k, v in jall.items() if not k.startswith("bool ")}
            pmap = python_read(f)
            agree = isinstance(pmap, dict) and set(pmap) == set(jmap) and all(pmap[k] == jmap[k].strip() for k in jmap)
            disagreements += not agree
            try:
                ours = cscfg.read_cscfg(f)
            except cscfg.CSCfgError as exc:
                assert str(exc).startswith(f"{f}:{clone.count(chr(10)) + 1}: "), str(exc)
                refused.setdefault(place, []).append(f"U+{ord(c):04X}")
                continue
            # accepted: every reader sees the same keys, and ca-watchdog the values Java sees
            case = (place, f"U+{ord(c):04X}")
            assert isinstance(pmap, dict), (*case, pmap)
            assert set(ours.keys()) == set(jmap) == set(pmap), case
            for k in jmap:
                # Java skips blanks after '=' and keeps them at the end; pki.util strips both ends
                assert (ours.get(k) or "").lstrip(" \t\f") == jmap[k], (*case, k, ours.get(k), jmap[k])
                assert (ours.get(k) or "").strip() == pmap[k], (*case, k)
            # the flag: what ca-watchdog makes of it is what the CA (getBoolean) and pki.util make of it,
            # or it is reported as not true or false and nothing is decided on it
            problems: list[str] = []
            flag = cscfg._bool(ours, FLAG, True, problems)
            if flag is None:
                assert any(FLAG in p for p in cscfg.classify(ours).problems), case
                unsure.setdefault(place, []).append(f"U+{ord(c):04X}")
            else:
                assert jall[f"bool {FLAG}"] == str(flag).lower(), (*case, jall[f"bool {FLAG}"], flag)
                assert (pmap[FLAG].lower() == "true") is flag, (*case, pmap[FLAG], flag)
        print(f"\n{len(cases)} files, {disagreements} on which Dogtag's two readers disagree; refused:")
        for place, chars in refused.items():
            print(f"  {place}: {' '.join(chars)}")
        print(f"accepted, the flag reported as not true or false (no decision on it): {unsure}")
        assert disagreements > 0  # the finding is real on this Dogtag
        # the finding's own cases: a line break only pki.util sees, inside a value, is refused
        for c in ("\u2028", "\x1c", "\x0c", "\x85"):
            assert f"U+{ord(c):04X}" in refused["inside a value"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        (bed.root / "tmp" / JS.name).unlink(missing_ok=True)
