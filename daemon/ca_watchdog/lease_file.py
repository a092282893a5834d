"""The daemon's lease, handed to the guard on the same host (`node.lease_file`, on /run by default).

When the daemon starts its CA as master it has just renewed the key; if the guard (which runs right
before every CA start) cannot reach the store at that moment, it would demote the promotion in
progress. The daemon therefore publishes what it holds: its name, the epoch, and when it last renewed
(CLOCK_MONOTONIC, shared by every process of this boot). The guard counts such a proof like the daemon
counts its own lease: only until the self-fence point, and only while the store cannot say otherwise.

The file is input from disk, so hostile until checked: a regular file (no symlink), owned by this
process's user and writable by nobody else, small, with typed fields, from this boot. Anything else
proves nothing, and the guard says why.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import time
from dataclasses import dataclass

MAX_BYTES = 4096
BOOT_TOLERANCE = 2.0  # seconds; a wall-clock step larger than this between write and read rejects a proof


class LeaseFileError(Exception):
    """The file proves nothing; the message says why (never its content)."""


@dataclass(frozen=True)
class LeaseProof:
    name: str
    epoch: int
    renewed: float  # time.monotonic() when the renewal that succeeded was sent

    def age(self) -> float:
        return time.monotonic() - self.renewed


def _boot() -> float:
    """This boot's start on the wall clock: tells a proof of an earlier boot (monotonic restarts at 0)."""
    return time.time() - time.monotonic()


def publish(path: str, proof: LeaseProof) -> None:
    """Atomically replace the file (write a sibling, then rename): a reader sees the old or the new proof."""
    data = json.dumps({"name": proof.name, "epoch": proof.epoch, "renewed": proof.renewed, "boot": _boot()})
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data.encode())
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def withdraw(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def read(path: str, me: str) -> LeaseProof | None:
    """The proof in `path` for member `me`, or None when there is no file. LeaseFileError: it proves nothing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LeaseFileError(f"{path}: cannot open ({exc.strerror})") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LeaseFileError(f"{path}: not a regular file")
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            owner = f"uid {st.st_uid}, mode {st.st_mode & 0o777:o}"
            raise LeaseFileError(f"{path}: not owned by uid {os.geteuid()} alone ({owner})")
        if st.st_size > MAX_BYTES:
            raise LeaseFileError(f"{path}: {st.st_size} bytes, more than {MAX_BYTES}")
        raw = os.read(fd, MAX_BYTES + 1)
    finally:
        os.close(fd)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LeaseFileError(f"{path}: not JSON") from exc
    if not isinstance(data, dict):
        raise LeaseFileError(f"{path}: not a JSON object")
    name, epoch, renewed, boot = data.get("name"), data.get("epoch"), data.get("renewed"), data.get("boot")
    if not isinstance(name, str) or name != me:
        raise LeaseFileError(f"{path}: not a lease of {me}")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        raise LeaseFileError(f"{path}: key 'epoch' is not a positive integer")
    for key, value in (("renewed", renewed), ("boot", boot)):
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise LeaseFileError(f"{path}: key {key!r} is not a finite number")
    assert isinstance(renewed, int | float) and isinstance(boot, int | float)
    if abs(boot - _boot()) > BOOT_TOLERANCE:
        raise LeaseFileError(f"{path}: written in another boot (or the wall clock was stepped since)")
    if renewed > time.monotonic():
        raise LeaseFileError(f"{path}: renewed in the future")
    return LeaseProof(name, epoch, float(renewed))
