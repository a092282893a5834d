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
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

CRL_PREFIX = "ca.crl."
KEY_STATUS_INTERVAL = "ca.certStatusUpdateInterval"
KEY_LISTEN_CLONES = "ca.listenToCloneModifications"
KEY_MASTER_HOST = "master.ca.agent.host"
KEY_MASTER_PORT = "master.ca.agent.port"
DEFAULT_STATUS_INTERVAL = 600
BACKUP_SUFFIX = ".ca-watchdog"
BACKUPS_KEPT = 5

_LINE = re.compile(r"[^\n]*\n|[^\n]+")
# ca.crl.<id>.<anything>: Dogtag loads every sub-store under ca.crl, whatever its name (an id may
# start with "_"); leaves such as ca.crl.pageSize and ca.crl._000 have no second dot.
_ISSUING_POINT_KEY = re.compile(r"^ca\.crl\.([^.]*)\.(.+)$")
# what Java's Integer.parseInt accepts (str.isdigit would also take "²" and "٣")
_JAVA_INT = re.compile(r"[+-]?[0-9]+")
_POSITIVE_INT = re.compile(r"[1-9][0-9]{0,8}")


class CSCfgError(ValueError):
    """A CS.cfg that cannot be parsed; names the file and line."""

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
    def get(self, key: str) -> str | None:
        """Effective value: the last occurrence wins, as in Dogtag."""
        for line in reversed(self.lines):
            if line.key == key:
                return line.value
        return None

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


def _parse_line(path: str, lineno: int, raw: str) -> Line:
    body = _body(raw)
    content = raw.removesuffix("\n").removesuffix("\r") if raw.endswith("\n") else raw
    if "\r" in content:
        # Java and Python readers end a line at a lone CR; we would see one line where Dogtag sees two
        raise CSCfgError(
            path, lineno, "carriage return inside the line (a lone CR is a line break to Dogtag)"
        )
    stripped = body.strip()
    if not stripped or stripped.startswith("#"):
        return Line(raw)
    if "=" not in body:
        raise CSCfgError(path, lineno, f"missing '=' in {stripped[:60]!r}")
    key, value = body.split("=", 1)
    key = key.lstrip()
    if not key.strip():
        raise CSCfgError(path, lineno, "empty key before '='")
    if key != key.rstrip() or any(c.isspace() for c in key):
        raise CSCfgError(
            path, lineno, f"whitespace in key {key.strip()!r} (Dogtag would split the key there)"
        )
    java_key = key.split(":", 1)[0]
    if java_key != key and (is_role_key(key) or is_role_key(java_key)):
        # Java's reader ends the key at ':'; never guess which of the two keys Dogtag would see
        raise CSCfgError(path, lineno, f"':' in key {key!r} (Dogtag would read the key {java_key!r})")
    if (len(value) - len(value.rstrip("\\"))) % 2 == 1:
        raise CSCfgError(
            path, lineno, f"continuation line (value of {key!r} ends in a backslash) is not supported"
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


def read_cscfg(path: str | os.PathLike[str]) -> CSCfg:
    p = str(path)
    try:
        data = Path(p).read_bytes()
    except OSError as exc:
        raise CSCfgError(p, None, f"cannot read: {exc.strerror or exc}") from exc
    return parse(data, p)


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
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    problems.append(f"{key}={raw!r} is not true or false")
    return None


def classify(cfg: CSCfg) -> RoleReport:
    """master / clone / inconsistent from effective values (missing keys take Dogtag's defaults).

    Like FreeIPA's is_crlgen_enabled(): the CRL keys of every issuing point and the status task
    must agree. A master is what generates CRLs; that is what must never run twice.
    """
    problems: list[str] = []
    warnings: list[str] = []
    points: list[IssuingPoint] = []
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
    elif _JAVA_INT.fullmatch(raw_interval.strip()):
        interval = int(raw_interval.strip())
        if interval < 0:
            problems.append(f"{KEY_STATUS_INTERVAL}={interval} is negative")
    else:
        interval = None
        problems.append(f"{KEY_STATUS_INTERVAL}={raw_interval!r} is not an integer")
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
    return CSCfg(clone.path, tuple(lines))


def demote(master: CSCfg, new_master_host: str, new_master_port: int | str) -> CSCfg:
    """Make a master's CS.cfg a clone's of new_master_host:new_master_port.

    enableCRLCache/enableCRLUpdates are written explicitly as false on every issuing point:
    a missing key means true in Dogtag, and a demoted CA would generate CRLs again.
    """
    host = new_master_host.strip()
    # a trailing backslash would make Dogtag join the next line; control characters end lines
    if not host or any(c.isspace() or not c.isprintable() or c in "=/\\#" for c in host):
        raise ValueError(f"invalid new master host {new_master_host!r}")
    try:
        port = int(str(new_master_port).strip())
    except ValueError:
        raise ValueError(f"invalid new master port {new_master_port!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"invalid new master port {new_master_port!r}")
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
    path: str  # the real file written (symlinks resolved)
    backup: str


def _backups(real: str) -> list[Path]:
    p = Path(real)
    pattern = re.compile(re.escape(p.name) + r"\.(\d+)" + re.escape(BACKUP_SUFFIX) + "$")
    found = [(int(m.group(1)), f) for f in p.parent.iterdir() if (m := pattern.match(f.name))]
    return [f for _, f in sorted(found)]


def _copy_selinux_label(src: str, dst_fd: int) -> None:
    try:
        label = os.getxattr(src, "security.selinux")
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


def write_cscfg(
    cfg: CSCfg,
    path: str | os.PathLike[str] | None = None,
    expected: bytes | None = None,
    backups_kept: int = BACKUPS_KEPT,
) -> WriteResult:
    """Replace the CS.cfg at `path` (default cfg.path) atomically, with a backup.

    Symlinks are resolved and the real file is replaced; owner, group, mode and SELinux label
    are carried over. If `expected` is given and the file no longer holds those bytes, nothing
    is written (someone else changed it). On any failure the original is intact.
    """
    target = str(path if path is not None else cfg.path)
    real = os.path.realpath(target)
    directory = os.path.dirname(real)
    data = cfg.render()
    tmp: str | None = None
    step = "read the current file"
    try:
        st = os.stat(real)
        if not stat.S_ISREG(st.st_mode):
            raise CSCfgWriteError(errno.EINVAL, f"{real} is not a regular file; not overwriting it")
        current = Path(real).read_bytes()
        if expected is not None and current != expected:
            raise CSCfgWriteError(errno.ESTALE, f"{real} changed since it was read; not overwriting it")
        backup = f"{real}.{time.time_ns() // 1_000_000}{BACKUP_SUFFIX}"
        while os.path.exists(backup):  # two writes in one millisecond
            backup = f"{real}.{int(backup.rsplit('.', 2)[-2]) + 1}{BACKUP_SUFFIX}"
        step = f"write the backup {backup}"
        _write_file(backup, current, st, real)
        step = f"write a temporary file in {directory}"
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(real)}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            step = "carry owner, group, mode and SELinux label over to the temporary file"
            _carry_metadata(f.fileno(), st, real)
            step = "fsync the temporary file"
            os.fsync(f.fileno())
        step = f"rename the temporary file over {real}"
        os.replace(tmp, real)
        tmp = None
    except CSCfgWriteError:
        raise
    except OSError as exc:
        raise CSCfgWriteError(
            exc.errno or 0,
            f"cannot write {real}: could not {step}: {exc.strerror or exc}; the original is unchanged",
        ) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    try:
        _fsync_dir(directory)
    except OSError as exc:
        # the rename happened: saying "unchanged" here would be a lie
        err = CSCfgWriteError(
            exc.errno or 0,
            f"wrote {real} but could not fsync {directory}: {exc.strerror or exc}; "
            f"the new file is in place but may not survive a crash (backup {backup})",
        )
        err.original_intact = False
        raise err from exc
    with contextlib.suppress(OSError):  # pruning old backups must not fail a write that succeeded
        for old in _backups(real)[:-backups_kept] if backups_kept > 0 else []:
            with contextlib.suppress(OSError):
                old.unlink()
    return WriteResult(real, backup)


def _carry_metadata(fd: int, st: os.stat_result, src: str) -> None:
    own = os.fstat(fd)
    if (own.st_uid, own.st_gid) != (st.st_uid, st.st_gid):
        os.fchown(fd, st.st_uid, st.st_gid)
    os.fchmod(fd, st.st_mode & 0o7777)
    _copy_selinux_label(src, fd)


def _write_file(dest: str, data: bytes, st: os.stat_result, src: str) -> None:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            _carry_metadata(f.fileno(), st, src)
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(dest)
        raise


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def changed_role_keys(before: CSCfg, after: CSCfg) -> list[str]:
    """Keys whose effective value differs (for one-line log reasons)."""
    keys: Iterable[str] = dict.fromkeys([*before.keys(), *after.keys()])
    return [k for k in keys if before.get(k) != after.get(k)]
