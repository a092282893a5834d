"""CS.cfg: parse, classify, promote/demote, and write safely.

Parsing follows the strictest of Dogtag's readers (pki.util.load_properties): `key=value` lines,
`#` comments and blank lines kept verbatim, last duplicate wins. Every original line is kept
byte for byte, so an unchanged file renders back identically. The transforms edit in place
(FreeIPA's directive-setter style) and append new keys at the end.

Everything here except `write_cscfg` and `read_cscfg` is pure.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

CRL_PREFIX = "ca.crl."
KEY_STATUS_INTERVAL = "ca.certStatusUpdateInterval"
KEY_LISTEN_CLONES = "ca.listenToCloneModifications"
KEY_MASTER_HOST = "master.ca.agent.host"
KEY_MASTER_PORT = "master.ca.agent.port"
DEFAULT_STATUS_INTERVAL = 600
BACKUP_SUFFIX = ".ca-watchdog"
BACKUPS_KEPT = 5
# a real CS.cfg is about 100 KB; anything much bigger is not one (and must not cost a cycle's memory)
MAX_CSCFG_BYTES = 4 * 1024 * 1024

# Line breaks. Dogtag's Java reader (SimpleProperties.load: BufferedReader.readLine) ends a line at
# LF, CR or CRLF only, and counts " \t\r\n\f" as whitespace. pki.util.load_properties splits with
# str.splitlines, which also breaks at VT, FF, FS, GS, RS, NEL, LS and PS. Any of these inside a
# line makes the two readers see different keys, so a file holding one is refused.
_OTHER_BREAKS = {
    "\x0b": "vertical tab",
    "\x0c": "form feed",
    "\x1c": "file separator (U+001C)",
    "\x1d": "group separator (U+001D)",
    "\x1e": "record separator (U+001E)",
    "\x85": "next line (U+0085)",
    "\u2028": "line separator (U+2028)",
    "\u2029": "paragraph separator (U+2029)",
}
_OTHER_BREAKS_RE = re.compile("[" + "".join(_OTHER_BREAKS) + "]")
# what Java's reader skips before a key and around '=' (CR, LF and FF are refused before this)
_JAVA_BLANKS = " \t"
# key names that may be quoted in an error: only names this module itself looks at
_QUOTABLE_KEY = re.compile(r"[A-Za-z0-9._-]{1,120}")

_LINE = re.compile(r"[^\n]*\n|[^\n]+")
# ca.crl.<id>.<anything>: Dogtag loads every sub-store under ca.crl, whatever its name (an id may
# start with "_"); leaves such as ca.crl.pageSize and ca.crl._000 have no second dot.
_ISSUING_POINT_KEY = re.compile(r"^ca\.crl\.([^.]*)\.(.+)$")
# what Java's Integer.parseInt accepts (str.isdigit would also take "²" and "٣")
_JAVA_INT = re.compile(r"[+-]?[0-9]+")
_POSITIVE_INT = re.compile(r"[1-9][0-9]{0,8}")
# a real CA has one or a few (MasterCRL, sometimes a second); the transforms touch every one
MAX_ISSUING_POINTS = 64


class CSCfgError(ValueError):
    """A CS.cfg that cannot be parsed or read; names the file, the line and the kind of problem.

    The message never quotes the file's content: CS.cfg lives in a directory that the CA's own
    account can write, and these messages reach the log, the store and the unauthenticated API.
    """

    def __init__(self, path: str, lineno: int | None, message: str) -> None:
        self.path = path
        self.lineno = lineno
        self.message = message
        where = f"{path}:{lineno}" if lineno is not None else path
        super().__init__(f"{where}: {message}")


class CSCfgWriteError(OSError):
    """Writing failed. `original_intact` is False only when the new file is already in place but
    could not be made durable (the directory fsync failed after the rename)."""

    original_intact: bool = True


class Role(StrEnum):
    MASTER = "master"
    CLONE = "clone"
    INCONSISTENT = "inconsistent"


@dataclass(frozen=True)
class Line:
    """One physical line: `raw` is exactly what the file holds, line ending included."""

    raw: str
    key: str | None = None  # None for blank and comment lines
    value: str | None = None

    @property
    def ending(self) -> str:
        if self.raw.endswith("\r\n"):
            return "\r\n"
        return "\n" if self.raw.endswith("\n") else ""


@dataclass(frozen=True)
class CSCfg:
    path: str
    lines: tuple[Line, ...]

    # ---- reading -------------------------------------------------------------------------
    @functools.cached_property
    def _effective(self) -> dict[str, tuple[int, str | None]]:
        """key -> (1-based line, value) of its last occurrence: one pass, so that classifying a
        file with many keys stays linear."""
        return {line.key: (n, line.value) for n, line in enumerate(self.lines, 1) if line.key is not None}

    def get(self, key: str) -> str | None:
        """Effective value: the last occurrence wins, as in Dogtag."""
        found = self._effective.get(key)
        return found[1] if found else None

    def lineno(self, key: str) -> int | None:
        """1-based line number of the effective (last) occurrence of key."""
        found = self._effective.get(key)
        return found[0] if found else None

    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for line in self.lines:
            if line.key is not None:
                seen[line.key] = None
        return list(seen)

    def duplicates(self) -> dict[str, list[int]]:
        """Keys defined more than once, with their 1-based line numbers."""
        where: dict[str, list[int]] = {}
        for n, line in enumerate(self.lines, 1):
            if line.key is not None:
                where.setdefault(line.key, []).append(n)
        return {k: v for k, v in where.items() if len(v) > 1}

    def issuing_points(self) -> list[str]:
        """Every distinct X in ca.crl.X.<key>, in order of first appearance."""
        found: dict[str, None] = {}
        for line in self.lines:
            if line.key is not None and (m := _ISSUING_POINT_KEY.match(line.key)):
                found[m.group(1)] = None
        return list(found)

    def crl_lines(self) -> list[str]:
        """The `ca.crl.` block as `key=value` texts, without line endings (what the master publishes)."""
        return [
            _body(line.raw) for line in self.lines if line.key is not None and line.key.startswith(CRL_PREFIX)
        ]

    def render(self) -> bytes:
        return "".join(line.raw for line in self.lines).encode("utf-8")

    @property
    def newline(self) -> str:
        """The line ending for added lines: the majority among the lines no role change touches,
        so that promote and demote stay idempotent on files with mixed line endings."""
        stable = [line for line in self.lines if line.key is None or not is_role_key(line.key)]
        crlf = sum(1 for line in stable if line.ending == "\r\n")
        lf = sum(1 for line in stable if line.ending == "\n")
        return "\r\n" if crlf > lf else "\n"


def _body(raw: str) -> str:
    return raw.rstrip("\n").removesuffix("\r")


def _key_hint(key: str) -> str:
    """` (key K)` for the role keys this module reads; nothing for any other text of the file."""
    return f" (key {key})" if is_role_key(key) and _QUOTABLE_KEY.fullmatch(key) else ""


_SPACE = re.compile(r"\s")  # what str.isspace() calls whitespace, found in one C call


def _parse_line(path: str, lineno: int, raw: str) -> Line:
    body = _body(raw)
    content = raw.removesuffix("\n").removesuffix("\r") if raw.endswith("\n") else raw
    if "\r" in content:
        # Java and Python readers end a line at a lone CR; we would see one line where Dogtag sees two
        raise CSCfgError(
            path, lineno, "carriage return inside the line (a lone CR is a line break to Dogtag)"
        )
    if m := _OTHER_BREAKS_RE.search(content):
        raise CSCfgError(
            path,
            lineno,
            f"{_OTHER_BREAKS[m.group(0)]} inside the line (pki.util.load_properties breaks the line "
            "there, Dogtag's Java reader does not)",
        )
    stripped = body.strip(_JAVA_BLANKS)
    if not stripped or stripped.startswith("#"):
        return Line(raw)
    if "=" not in body:
        raise CSCfgError(path, lineno, "missing '=' (not a key=value line)")
    key, value = body.split("=", 1)
    # only what Java skips: U+00A0 and other Unicode blanks stay in the key and are refused below
    key = key.lstrip(_JAVA_BLANKS)
    if not key.strip():
        raise CSCfgError(path, lineno, "empty key before '='")
    if _SPACE.search(key):
        raise CSCfgError(path, lineno, "whitespace in key (Dogtag would split the key there)")
    java_key = key.split(":", 1)[0]
    if java_key != key and (is_role_key(key) or is_role_key(java_key)):
        # Java's reader ends the key at ':'; never guess which of the two keys Dogtag would see
        raise CSCfgError(path, lineno, "':' in key of a role setting (Dogtag would end the key at the ':')")
    if (len(value) - len(value.rstrip("\\"))) % 2 == 1:
        raise CSCfgError(
            path, lineno, f"continuation line (the value{_key_hint(key)} ends in a backslash) is not supported"
        )
    return Line(raw, key, value)


def parse(text: str | bytes, path: str = "<CS.cfg>") -> CSCfg:
    """Parse CS.cfg text. Raises CSCfgError naming the file and line on any malformed line."""
    if isinstance(text, bytes):
        data = text
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            lineno = data[: exc.start].count(b"\n") + 1
            raise CSCfgError(path, lineno, "not valid UTF-8") from exc
    if "\x00" in text:
        raise CSCfgError(path, text[: text.index("\x00")].count("\n") + 1, "NUL byte (binary file?)")
    lines = tuple(_parse_line(path, n, m.group(0)) for n, m in enumerate(_LINE.finditer(text), 1))
    return CSCfg(path, lines)


def read_cscfg(path: str | os.PathLike[str], max_bytes: int = MAX_CSCFG_BYTES) -> CSCfg:
    """Read and parse a CS.cfg safely (the final component is never followed; see _open_cscfg)."""
    p = str(path)
    dfd = _open_dir(p, os.path.dirname(p) or ".")
    try:
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                fd, _st = _open_cscfg(p, dfd, os.path.basename(p))
                break
            except _RenamedOver:
                # the daemon, the guard and the CA's start put CS.cfg in place by renaming a whole file over
                # it: read the new one (a rename storm that outlasts every attempt is still refused)
                if attempt == _OPEN_ATTEMPTS - 1:
                    raise
                time.sleep(0.001)
        try:
            data = _read_capped(p, fd, max_bytes)
        finally:
            os.close(fd)
    finally:
        os.close(dfd)
    return parse(data, p)


# ---- opening a file in a directory that the CA's account can write ---------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_LINK_HOPS = 40
_OPEN_ATTEMPTS = 5  # opens of a CS.cfg renamed over meanwhile (see read_cscfg)


def _refused(path: str, what: str) -> CSCfgError:
    return CSCfgError(path, None, f"refused: {what}")


class _RenamedOver(CSCfgError):
    """CS.cfg was renamed over between the check and the open, or between the open and its fstat."""

    def __init__(self, path: str) -> None:
        super().__init__(path, None, "refused: CS.cfg was replaced while it was being opened")


def _open_dir(path: str, directory: str) -> int:
    """Open the directory that holds CS.cfg, walking it one component at a time.

    A symlink on the way is followed only when it sits in a directory that root owns and that
    neither group nor others can write: only root can have put it there. A symlink in a directory
    that the CA's account (pkiuser owns /etc/pki/<instance> and everything under it) could change is
    refused, so that account cannot point the daemon at another directory. Every later step works
    relative to the returned descriptor, so a rename on the way after this check changes nothing.
    """
    parts = [c for c in os.path.abspath(directory).split("/") if c and c != "."]
    fd = os.open("/", _DIR_FLAGS)
    hops = 0
    walked = ""
    try:
        while parts:
            name = parts.pop(0)
            try:
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise CSCfgError(
                        path, None, f"cannot open the directory {walked}/{name}: {exc.strerror or exc}"
                    ) from None
                lst = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISLNK(lst.st_mode):
                    raise _refused(path, f"{walked}/{name} is not a directory") from None
                parent = os.fstat(fd)
                if parent.st_uid != 0 or parent.st_mode & 0o022:
                    raise _refused(
                        path,
                        f"{walked}/{name} is a symlink in a directory that a user other than root can "
                        "change; configure the real path",
                    ) from None
                hops += 1
                if hops > _MAX_LINK_HOPS:
                    raise _refused(path, "too many levels of symbolic links") from None
                target = os.readlink(name, dir_fd=fd)
                if target.startswith("/"):
                    os.close(fd)
                    fd = os.open("/", _DIR_FLAGS)
                    walked = ""
                parts[:0] = [c for c in target.split("/") if c and c != "."]
                continue
            os.close(fd)
            fd = nfd
            walked = f"{walked}/{name}"
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_cscfg(path: str, dfd: int, name: str) -> tuple[int, os.stat_result]:
    """Open `name` in the directory `dfd` for reading: never through a symlink (O_NOFOLLOW), only a
    regular file with a single link, and never a FIFO or a device (checked before the open, so a
    FIFO cannot block and a device is never opened; O_NONBLOCK as a backstop)."""
    try:
        lst = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except OSError as exc:
        raise CSCfgError(path, None, f"cannot read: {exc.strerror or exc}") from None
    if lst.st_nlink == 0:  # the name's old inode, renamed over while it was looked up
        raise _RenamedOver(path)
    _check_file(path, lst)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refused(path, "CS.cfg is a symlink (it must be a regular file)") from None
        raise CSCfgError(path, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (lst.st_dev, lst.st_ino) or st.st_nlink == 0:
            raise _RenamedOver(path)
        _check_file(path, st)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _check_file(path: str, st: os.stat_result, max_bytes: int = MAX_CSCFG_BYTES) -> None:
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        raise _refused(path, "CS.cfg is a symlink (it must be a regular file)")
    if not stat.S_ISREG(mode):
        kind = (
            "a FIFO" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a directory" if stat.S_ISDIR(mode)
            else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file"
        )
        raise _refused(path, f"CS.cfg is {kind} (it must be a regular file)")
    if st.st_nlink != 1:
        # a hard link to another file (fs.protected_hardlinks=0): it is that file, not a CS.cfg
        raise _refused(path, f"CS.cfg has {st.st_nlink} hard links (a CS.cfg has exactly one)")
    if st.st_size > max_bytes:
        raise _refused(path, f"CS.cfg is {st.st_size} bytes, more than the {max_bytes} bytes a CS.cfg can be")


def _read_capped(path: str, fd: int, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise _refused(path, f"CS.cfg is more than the {max_bytes} bytes a CS.cfg can be")
    except OSError as exc:
        raise CSCfgError(path, None, f"cannot read: {exc.strerror or exc}") from None
    return b"".join(chunks)


# ---- classification ---------------------------------------------------------------------------

_TRUE = {"true"}
_FALSE = {"false"}


@dataclass(frozen=True)
class IssuingPoint:
    id: str
    enable: bool
    crl_cache: bool
    crl_updates: bool


@dataclass(frozen=True)
class RoleReport:
    role: Role
    issuing_points: tuple[IssuingPoint, ...]
    status_update_interval: int | None
    listen_to_clones: bool | None
    master_agent_host: str | None
    master_agent_port: str | None
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    duplicates: dict[str, list[int]] = field(default_factory=dict)

    @property
    def master_agent(self) -> str | None:
        if self.master_agent_host and self.master_agent_port:
            return f"{self.master_agent_host}:{self.master_agent_port}"
        return None


def _bool(cfg: CSCfg, key: str, default: bool, problems: list[str]) -> bool | None:
    raw = cfg.get(key)
    if raw is None:
        return default
    # Java's reader skips the blanks after '=' but keeps those at the end, and Dogtag's getBoolean
    # compares the whole value ("true " throws there, pki.util reads it as true): neither is taken
    v = raw.lstrip(_JAVA_BLANKS).lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    # the value is not quoted: the message reaches the log, the store and the API
    problems.append(f"{key} (line {cfg.lineno(key)}) is not true or false")
    return None


def classify(cfg: CSCfg) -> RoleReport:
    """master / clone / inconsistent from effective values (missing keys take Dogtag's defaults).

    Like FreeIPA's is_crlgen_enabled(): the CRL keys of every issuing point and the status task
    must agree. A master is what generates CRLs; that is what must never run twice.
    """
    problems: list[str] = []
    warnings: list[str] = []
    points: list[IssuingPoint] = []
    if len(cfg.issuing_points()) > MAX_ISSUING_POINTS:
        return RoleReport(
            Role.INCONSISTENT, (), None, None, None, None,
            problems=(f"more than {MAX_ISSUING_POINTS} CRL issuing points (not a CA's CS.cfg)",),
        )  # fmt: skip
    for ip in cfg.issuing_points():
        enable = _bool(cfg, f"ca.crl.{ip}.enable", True, problems)
        cache = _bool(cfg, f"ca.crl.{ip}.enableCRLCache", True, problems)
        updates = _bool(cfg, f"ca.crl.{ip}.enableCRLUpdates", True, problems)
        if enable is None or cache is None or updates is None:
            continue
        points.append(IssuingPoint(ip, enable, cache, updates))

    interval: int | None
    raw_interval = cfg.get(KEY_STATUS_INTERVAL)
    if raw_interval is None:
        interval = DEFAULT_STATUS_INTERVAL
    elif _JAVA_INT.fullmatch(raw_interval.lstrip(_JAVA_BLANKS)) and len(raw_interval.lstrip(_JAVA_BLANKS)) <= 12:
        # getInteger is Integer.parseInt of the value as Java's reader keeps it (trailing blanks too)
        interval = int(raw_interval.lstrip(_JAVA_BLANKS))
        if interval < 0:
            problems.append(f"{KEY_STATUS_INTERVAL}={interval} is negative")
    else:
        interval = None
        problems.append(f"{KEY_STATUS_INTERVAL} (line {cfg.lineno(KEY_STATUS_INTERVAL)}) is not an integer")
    listen = _bool(cfg, KEY_LISTEN_CLONES, False, problems)
    # the servlets test for non-empty values; whitespace after '=' is skipped by Dogtag's readers
    host = (cfg.get(KEY_MASTER_HOST) or "").strip() or None
    port = (cfg.get(KEY_MASTER_PORT) or "").strip() or None

    if not cfg.issuing_points():
        problems.append("no CRL issuing point (no ca.crl.<id>.* keys)")
    generating = [p.id for p in points if p.crl_cache and p.crl_updates]
    quiet = [p.id for p in points if not p.crl_cache and not p.crl_updates]
    for p in points:
        if p.crl_cache != p.crl_updates:
            problems.append(
                f"issuing point {p.id}: enableCRLCache={str(p.crl_cache).lower()} but "
                f"enableCRLUpdates={str(p.crl_updates).lower()}"
            )
    if generating and quiet:
        problems.append(f"issuing points {', '.join(generating)} generate CRLs but {', '.join(quiet)} do not")

    role = Role.INCONSISTENT
    if not problems and points:
        if len(generating) == len(points):
            if interval == 0:
                problems.append(
                    f"CRL master with {KEY_STATUS_INTERVAL}=0 (the clone-modification listener cannot run)"
                )
            else:
                role = Role.MASTER
                if not listen:
                    warnings.append(
                        f"{KEY_LISTEN_CLONES} is false: revocations made on clones reach the CRL "
                        "only at a full update"
                    )
                if host and port:
                    warnings.append(
                        f"{KEY_MASTER_HOST}/{KEY_MASTER_PORT} are set: getInfo and displayCRL "
                        "answer as a clone would"
                    )
        elif len(quiet) == len(points):
            if interval != 0:
                problems.append(
                    f"clone runs the certificate status task ({KEY_STATUS_INTERVAL}={interval}, expected 0)"
                )
            if listen:
                problems.append(f"clone has {KEY_LISTEN_CLONES}=true")
            if not problems:
                role = Role.CLONE
                if not (host and port):
                    warnings.append(f"clone has no {KEY_MASTER_HOST}/{KEY_MASTER_PORT}")
    if role is Role.INCONSISTENT and not problems:
        problems.append("cannot tell master from clone")
    dups = cfg.duplicates()
    for key, where in dups.items():
        warnings.append(f"{key} is defined on lines {', '.join(map(str, where))}; the last one wins")
    return RoleReport(
        role=role,
        issuing_points=tuple(points),
        status_update_interval=interval,
        listen_to_clones=listen,
        master_agent_host=host,
        master_agent_port=port,
        problems=tuple(problems),
        warnings=tuple(warnings),
        duplicates=dups,
    )


# ---- transforms ---------------------------------------------------------------------------------


def _set(lines: list[Line], key: str, value: str, newline: str) -> None:
    """Set every occurrence of key in place; append it at the end when absent."""
    found = False
    for i, line in enumerate(lines):
        if line.key == key:
            found = True
            if line.value != value:
                lines[i] = Line(f"{key}={value}{line.ending or ''}", key, value)
    if not found:
        _append(lines, Line(f"{key}={value}{newline}", key, value), newline)


def _append(lines: list[Line], new: Line, newline: str) -> None:
    if lines and not lines[-1].ending:
        last = lines[-1]
        lines[-1] = Line(last.raw + newline, last.key, last.value)
    lines.append(new)


def _delete(lines: list[Line], key: str) -> None:
    lines[:] = [line for line in lines if line.key != key]


def _crl_block(master_crl_lines: Sequence[str], newline: str, origin: str) -> list[Line]:
    """Parse the published ca.crl. block and force CRL generation on in every issuing point."""
    block: list[Line] = []
    for n, text in enumerate(master_crl_lines, 1):
        body = text.removesuffix("\n").removesuffix("\r")
        if "\n" in body or "\r" in body:
            raise CSCfgError(origin, n, "line break inside one line of the ca.crl. block")
        line = _parse_line(origin, n, body + newline)
        if line.key is None:
            continue
        if not line.key.startswith(CRL_PREFIX):
            raise CSCfgError(origin, n, f"{line.key!r} is not a {CRL_PREFIX} key")
        block.append(line)
    if not block:
        raise CSCfgError(origin, None, "the master's ca.crl. block is empty")
    probe = CSCfg(origin, tuple(block))
    points = probe.issuing_points()
    if not points:
        raise CSCfgError(origin, None, "the master's ca.crl. block has no issuing point")
    if len(points) > MAX_ISSUING_POINTS:
        raise CSCfgError(origin, None, f"the master's ca.crl. block has more than {MAX_ISSUING_POINTS} issuing points")
    for ip in points:
        for flag in ("enableCRLCache", "enableCRLUpdates"):
            key = f"ca.crl.{ip}.{flag}"
            if probe.get(key) is None:
                # keep the forced flag inside the block, after the issuing point's last line,
                # so a second promote with the same block gives the same bytes
                last = max(
                    i for i, line in enumerate(block) if line.key and line.key.startswith(f"ca.crl.{ip}.")
                )
                block.insert(last + 1, Line(f"{key}=true{newline}", key, "true"))
            else:
                _set(block, key, "true", newline)
    return block


def promote(clone: CSCfg, master_crl_lines: Sequence[str], origin: str = "<master ca.crl. block>") -> CSCfg:
    """Make a clone's CS.cfg a master's (RHCS "Converting masters and clones", made exact).

    Every ca.crl. line is replaced by the former master's block (placed where the clone's block
    was), CRL cache and updates are forced on for every issuing point, the status task and the
    clone-modification listener are turned on, and master.ca.agent.host/port are removed.
    """
    nl = clone.newline
    block = _crl_block(master_crl_lines, nl, origin)
    lines = list(clone.lines)
    first = next((i for i, line in enumerate(lines) if line.key and line.key.startswith(CRL_PREFIX)), None)
    lines = [line for line in lines if not (line.key and line.key.startswith(CRL_PREFIX))]
    if first is None:
        for line in block:
            _append(lines, line, nl)
    else:
        if first == len(lines) and lines and not lines[-1].ending:
            lines[-1] = Line(lines[-1].raw + nl, lines[-1].key, lines[-1].value)
        lines[first:first] = block
    interval = clone.get(KEY_STATUS_INTERVAL)
    # keep an admin's own positive interval only when Dogtag reads it unambiguously; 0 would stop
    # the clone-modification listener
    if interval is None or not _POSITIVE_INT.fullmatch(interval):
        _set(lines, KEY_STATUS_INTERVAL, str(DEFAULT_STATUS_INTERVAL), nl)
    _set(lines, KEY_LISTEN_CLONES, "true", nl)
    _delete(lines, KEY_MASTER_HOST)
    _delete(lines, KEY_MASTER_PORT)
    result = CSCfg(clone.path, tuple(lines))
    report = classify(result)
    if report.role is not Role.MASTER:
        # e.g. a block with enable=yes: Dogtag would not read it as a CRL master
        raise CSCfgError(
            clone.path,
            None,
            f"promoting with {origin}: the result would be {report.role.value}, not master "
            f"({'; '.join(report.problems) or 'not a master'}); nothing written",
        )
    return result


def demote(master: CSCfg, new_master_host: str, new_master_port: int | str) -> CSCfg:
    """Make a master's CS.cfg a clone's of new_master_host:new_master_port.

    enableCRLCache/enableCRLUpdates are written explicitly as false on every issuing point:
    a missing key means true in Dogtag, and a demoted CA would generate CRLs again.
    """
    host = new_master_host.strip()
    # a trailing backslash would make Dogtag join the next line; control characters end lines
    if not host or any(c.isspace() or not c.isprintable() or c in "=/\\#" for c in host):
        raise ValueError(f"invalid new master host {new_master_host!r}")
    port_text = str(new_master_port).strip()
    port = int(port_text) if re.fullmatch(r"[0-9]{1,5}", port_text) else 0
    if not 0 < port < 65536:
        raise ValueError(f"invalid new master port {new_master_port!r}")
    if len(master.issuing_points()) > MAX_ISSUING_POINTS:
        raise CSCfgError(master.path, None, f"more than {MAX_ISSUING_POINTS} CRL issuing points; refusing to demote")
    if not master.issuing_points():
        # not a CS.cfg at all (a symlink to another file, a truncated file): never append role keys to it
        raise CSCfgError(
            master.path, None, "no CRL issuing point (no ca.crl.<id>.* keys): not a CS.cfg; refusing to demote"
        )
    nl = master.newline
    lines = list(master.lines)
    for ip in master.issuing_points():
        _set(lines, f"ca.crl.{ip}.enableCRLCache", "false", nl)
        _set(lines, f"ca.crl.{ip}.enableCRLUpdates", "false", nl)
    _set(lines, KEY_STATUS_INTERVAL, "0", nl)
    _set(lines, KEY_LISTEN_CLONES, "false", nl)
    _set(lines, KEY_MASTER_HOST, host, nl)
    _set(lines, KEY_MASTER_PORT, str(port), nl)
    return CSCfg(master.path, tuple(lines))


def is_role_key(key: str) -> bool:
    """Keys that promote/demote may change; every other line must survive untouched."""
    return key.startswith(CRL_PREFIX) or key in (
        KEY_STATUS_INTERVAL,
        KEY_LISTEN_CLONES,
        KEY_MASTER_HOST,
        KEY_MASTER_PORT,
    )


def unrelated_lines(cfg: CSCfg) -> list[str]:
    """The raw lines that no role change may touch, in order (line endings normalised away)."""
    return [_body(line.raw) for line in cfg.lines if line.key is None or not is_role_key(line.key)]


def unrelated_items(cfg: CSCfg) -> dict[str, str]:
    """The effective `key: value` of every key that no role change may touch.

    This is what "no line outside the role keys changed" means on a real CA: Dogtag rewrites
    CS.cfg at every start with its keys in sorted order (and duplicates collapsed), so the lines
    move while the keys and values stay.
    """
    return {k: v for k in cfg.keys() if not is_role_key(k) and (v := cfg.get(k)) is not None}  # noqa: SIM118


def _diff_lines(cfg: CSCfg) -> list[str]:
    # physical lines as the parser saw them (str.splitlines would also split at \f, \x1c, U+2028)
    out = [line.raw for line in cfg.lines]
    if out and not out[-1].endswith("\n"):
        out[-1] += "\n\\ No newline at end of file\n"
    return out


def unified_diff(before: CSCfg, after: CSCfg) -> str:
    import difflib

    a, b = _diff_lines(before), _diff_lines(after)
    return "".join(difflib.unified_diff(a, b, before.path, f"{after.path} (new)"))


# ---- writing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WriteResult:
    path: str  # the file written
    backup: str


def _backup_names(dfd: int, name: str) -> list[str]:
    pattern = re.compile(re.escape(name) + r"\.(\d+)" + re.escape(BACKUP_SUFFIX) + "$")
    found = [(int(m.group(1)), f) for f in os.listdir(dfd) if (m := pattern.match(f))]
    return [f for _, f in sorted(found)]


def _copy_selinux_label(src_fd: int, dst_fd: int) -> None:
    try:
        label = os.getxattr(src_fd, "security.selinux")
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    try:
        os.setxattr(dst_fd, "security.selinux", label)
    except OSError as exc:
        # a label left on a file by a host that had SELinux, on a kernel without it: nothing to keep
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) and not os.path.exists("/sys/fs/selinux/enforce"):
            return
        raise


def _not_a_cscfg(data: bytes, where: str) -> str | None:
    """Why these bytes are not a CS.cfg that may be written over or written, or None."""
    try:
        cfg = parse(data, where)
    except CSCfgError as exc:
        return f"it does not parse ({exc.message}, line {exc.lineno})"
    if not cfg.issuing_points():
        return "it has no CRL issuing point (no ca.crl.<id>.* keys)"
    return None


def write_cscfg(
    cfg: CSCfg,
    path: str | os.PathLike[str] | None = None,
    expected: bytes | None = None,
    backups_kept: int = BACKUPS_KEPT,
    role: Role | None = None,
) -> WriteResult:
    """Replace the CS.cfg at `path` (default cfg.path) atomically, with a backup.

    The file is opened as read_cscfg opens it: a symlink, a FIFO, a device, a file with more than
    one link or one over the size cap is refused, and so is a file that is not a CS.cfg (it does not
    parse or has no CRL issuing point) and new content that is not one (or, when `role` is given,
    does not classify as that role). Every step works relative to one descriptor of the directory.
    Owner, group, mode and SELinux label are carried over. If `expected` is given and the file no
    longer holds those bytes, nothing is written (someone else changed it). On any failure the
    original is intact.
    """
    target = str(path if path is not None else cfg.path)
    directory = os.path.dirname(target) or "."
    name = os.path.basename(target)
    data = cfg.render()
    why = _not_a_cscfg(data, target)
    if why is None and role is not None and (got := classify(parse(data, target)).role) is not role:
        why = f"it would be {got.value}, not {role.value}"
    if why is not None:
        raise CSCfgWriteError(errno.EINVAL, f"not writing {target}: the new content is not a CS.cfg: {why}")
    try:
        dfd = _open_dir(target, directory)
    except CSCfgError as exc:
        raise CSCfgWriteError(errno.EINVAL, f"not writing {exc}; the original is unchanged") from None
    except OSError as exc:
        raise CSCfgWriteError(exc.errno or 0, f"cannot write {target}: {exc.strerror or exc}") from exc
    try:
        backup = _replace(dfd, target, directory, name, data, expected)
        try:
            _fsync_dir(dfd)
        except OSError as exc:
            # the rename happened: saying "unchanged" here would be a lie
            err = CSCfgWriteError(
                exc.errno or 0,
                f"wrote {target} but could not fsync {directory}: {exc.strerror or exc}; "
                f"the new file is in place but may not survive a crash (backup {backup})",
            )
            err.original_intact = False
            raise err from exc
        with contextlib.suppress(OSError):  # pruning old backups must not fail a write that succeeded
            for old in _backup_names(dfd, name)[:-backups_kept] if backups_kept > 0 else []:
                with contextlib.suppress(OSError):
                    os.unlink(old, dir_fd=dfd)
    finally:
        os.close(dfd)
    return WriteResult(target, backup)


def _replace(dfd: int, target: str, directory: str, name: str, data: bytes, expected: bytes | None) -> str:
    """Back up `name` in `dfd` and rename a new file with `data` over it; returns the backup's path."""
    tmp: str | None = None
    step = "open the current file"
    try:
        fd, st = _open_cscfg(target, dfd, name)
        try:
            current = _read_capped(target, fd, MAX_CSCFG_BYTES)
            if expected is not None and current != expected:
                raise CSCfgWriteError(errno.ESTALE, f"{target} changed since it was read; not overwriting it")
            why = _not_a_cscfg(current, target)
            if why is not None:
                raise CSCfgWriteError(errno.EINVAL, f"{target} is not a CS.cfg: {why}; not overwriting it")
            backup = f"{name}.{time.time_ns() // 1_000_000}{BACKUP_SUFFIX}"
            while _exists(dfd, backup):  # two writes in one millisecond
                backup = f"{name}.{int(backup.rsplit('.', 2)[-2]) + 1}{BACKUP_SUFFIX}"
            step = f"write the backup {os.path.join(directory, backup)}"
            _write_file(dfd, backup, current, st, fd)
            step = f"write a temporary file in {directory}"
            tfd, tmp = _make_temp(dfd, name)
            with os.fdopen(tfd, "wb") as f:
                f.write(data)
                f.flush()
                step = "carry owner, group, mode and SELinux label over to the temporary file"
                _carry_metadata(f.fileno(), st, fd)
                step = "fsync the temporary file"
                os.fsync(f.fileno())
        finally:
            os.close(fd)
        step = f"rename the temporary file over {target}"
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        tmp = None
        return os.path.join(directory, backup)
    except CSCfgWriteError:
        raise
    except CSCfgError as exc:
        raise CSCfgWriteError(errno.EINVAL, f"not writing {exc}; the original is unchanged") from None
    except OSError as exc:
        raise CSCfgWriteError(
            exc.errno or 0,
            f"cannot write {target}: could not {step}: {exc.strerror or exc}; the original is unchanged",
        ) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)


def _exists(dfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _make_temp(dfd: int, name: str) -> tuple[int, str]:
    """A new file `.<name>.<random>.tmp` in the directory, never through a symlink."""
    while True:
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            return os.open(tmp, flags, 0o600, dir_fd=dfd), tmp
        except FileExistsError:
            continue


def _carry_metadata(fd: int, st: os.stat_result, src_fd: int) -> None:
    """Mode and SELinux label first, while the writer still owns the new file, ownership last.

    The other order needs CAP_FOWNER: once the file is pkiuser's, root changes its mode or its
    security.selinux label only as a non-owner (fchmod and SELinux's setxattr check ownership).
    (fchown clears set-user/group-ID bits, which a CS.cfg never has.)
    """
    os.fchmod(fd, st.st_mode & 0o7777)
    _copy_selinux_label(src_fd, fd)
    own = os.fstat(fd)
    if (own.st_uid, own.st_gid) != (st.st_uid, st.st_gid):
        os.fchown(fd, st.st_uid, st.st_gid)


def _write_file(dfd: int, dest: str, data: bytes, st: os.stat_result, src_fd: int) -> None:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            _carry_metadata(f.fileno(), st, src_fd)
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(dest, dir_fd=dfd)
        raise


def _fsync_dir(dfd: int) -> None:
    os.fsync(dfd)


def changed_role_keys(before: CSCfg, after: CSCfg) -> list[str]:
    """Keys whose effective value differs (for one-line log reasons)."""
    keys: Iterable[str] = dict.fromkeys([*before.keys(), *after.keys()])
    return [k for k in keys if before.get(k) != after.get(k)]
