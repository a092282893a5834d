"""The lease the daemon hands to the guard is read from disk: hostile until checked. Whatever is wrong
with the file, it proves nothing (LeaseFileError, naming the file and never quoting it)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from ca_watchdog import lease_file
from ca_watchdog.lease_file import LeaseFileError, LeaseProof


def test_a_published_proof_reads_back_with_its_age(tmp_path: Path) -> None:
    p = str(tmp_path / "lease.json")
    lease_file.publish(p, LeaseProof("ca1", 4, time.monotonic() - 2.0))
    proof = lease_file.read(p, "ca1")
    assert proof is not None and proof.epoch == 4 and 2.0 <= proof.age() < 3.0
    assert os.stat(p).st_mode & 0o777 == 0o600
    lease_file.withdraw(p)
    lease_file.withdraw(p)  # twice is fine
    assert lease_file.read(p, "ca1") is None


def write(path: Path, data: Any) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    path.chmod(0o600)
    return str(path)


def good(**over: Any) -> dict[str, Any]:
    return {"name": "ca1", "epoch": 3, "renewed": time.monotonic() - 1, "boot": time.time() - time.monotonic(), **over}


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (lambda: good(name="ca2"), "not a lease of ca1"),
        (lambda: good(epoch=0), "'epoch'"),
        (lambda: good(epoch=True), "'epoch'"),
        (lambda: good(epoch="3"), "'epoch'"),
        (lambda: good(renewed="NaN"), "'renewed'"),
        (lambda: good(renewed=float("inf")), "'renewed'"),
        (lambda: good(renewed=time.monotonic() + 60), "in the future"),
        (lambda: good(boot=time.time() - time.monotonic() - 3600), "another boot"),
        (lambda: "[1, 2]", "not a JSON object"),
        (lambda: "{", "not JSON"),
        (lambda: "\x00\xff", "not JSON"),
    ],
)
def test_a_malformed_or_foreign_proof_proves_nothing(tmp_path: Path, data: Callable[[], Any], why: str) -> None:
    p = write(tmp_path / "lease.json", data())  # made when the test runs: the clocks move
    with pytest.raises(LeaseFileError, match=why) as err:
        lease_file.read(p, "ca1")
    assert p in str(err.value)


def test_a_symlink_a_fifo_a_huge_or_group_writable_file_proves_nothing(tmp_path: Path) -> None:
    real = write(tmp_path / "real.json", good())
    link = tmp_path / "link.json"
    link.symlink_to(real)
    with pytest.raises(LeaseFileError, match="cannot open"):
        lease_file.read(str(link), "ca1")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(LeaseFileError, match="not a regular file"):
        lease_file.read(str(fifo), "ca1")
    huge = write(tmp_path / "huge.json", json.dumps(good()) + " " * 10_000)
    with pytest.raises(LeaseFileError, match="more than"):
        lease_file.read(huge, "ca1")
    os.chmod(real, 0o620)
    with pytest.raises(LeaseFileError, match="alone"):
        lease_file.read(real, "ca1")


@settings(max_examples=300, deadline=None)
@given(raw=hs.binary(max_size=300))
def test_any_bytes_give_a_proof_or_a_lease_file_error_never_another_exception(
    tmp_path_factory: Any, raw: bytes
) -> None:
    p = tmp_path_factory.mktemp("lf") / "lease.json"
    p.write_bytes(raw)
    p.chmod(0o600)
    with contextlib.suppress(LeaseFileError):
        lease_file.read(str(p), "ca1")
