"""The coordination store: one small async interface, records, and the record codec.

Both backends keep the same keys (relative to a prefix) with the same JSON values, so the codec
below is shared and the contract tests run unchanged against both:

    leader              {"name", "epoch", "acquired_at", "renewed_at", "reason"}   with a TTL
    epoch               {"epoch", "name", "at", "reason"}                          no TTL, never goes back
    members/<name>      {"name", "payload", "updated_at"}                          with a TTL
    crl                 {"name", "epoch", "lines", "updated_at"}
    flags/paused        {"at"}
    flags/switchover    {"target", "kind", "requested_at", "requested_by"}
    flags/cooldown_ack  {"at"}
    steps/<name>        the caller's JSON object
    history             {"at", "event"}  (sqlite: a table; etcd: history/<time_ns> keys)

A value that cannot be parsed, has wrong types or names a node outside `members` is treated as
absent and reported (never acted on); the leader CAS is on the key itself, so such a key still
blocks acquisition until it expires or an operator removes it.
"""

from __future__ import annotations

import abc
import json
import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

log = logging.getLogger(__name__)

SwitchoverKind = Literal["switchover", "failover"]
SWITCHOVER_KINDS: tuple[SwitchoverKind, ...] = ("switchover", "failover")

KEY_LEADER = "leader"
KEY_EPOCH = "epoch"
KEY_CRL = "crl"
KEY_PAUSED = "flags/paused"
KEY_SWITCHOVER = "flags/switchover"
KEY_COOLDOWN_ACK = "flags/cooldown_ack"
MEMBERS_DIR = "members/"
STEPS_DIR = "steps/"
HISTORY_DIR = "history/"
HISTORY_KEEP = 1000  # failovers are rare; this is years of history


class StoreUnavailable(Exception):
    """The store could not be reached or did not answer in time: nothing is known, nothing was won."""


@dataclass(frozen=True)
class LeaderRecord:
    name: str
    epoch: int
    acquired_at: float
    renewed_at: float
    expires_at: float  # local wall-clock estimate; the store decides expiry, never this field
    reason: str


@dataclass(frozen=True)
class MemberRecord:
    name: str
    payload: dict[str, Any]
    updated_at: float


@dataclass(frozen=True)
class MembersSnapshot:
    records: Mapping[str, MemberRecord]
    rejected: tuple[str, ...]  # one human-readable line per ignored record


@dataclass(frozen=True)
class CRLBlock:
    name: str
    epoch: int
    lines: tuple[str, ...]
    updated_at: float


@dataclass(frozen=True)
class SwitchoverRequest:
    target: str
    kind: SwitchoverKind
    requested_at: float
    requested_by: str


@dataclass(frozen=True)
class Flags:
    paused: bool
    paused_at: float | None
    switchover: SwitchoverRequest | None
    cooldown_ack_at: float | None


@dataclass(frozen=True)
class HistoryEvent:
    seq: int  # grows with every append (sqlite: 1, 2, 3...; etcd: the key's create revision)
    at: float
    event: dict[str, Any]


class RecordError(ValueError):
    """A stored value that is not a valid record; the message says why."""


# ---- codec -------------------------------------------------------------------------------------


def dumps(value: Mapping[str, Any]) -> str:
    """Compact JSON; NaN/inf and non-JSON types are caller bugs and raise here, before any write."""
    return json.dumps(dict(value), separators=(",", ":"), sort_keys=True, allow_nan=False)


def _obj(raw: str | bytes) -> dict[str, Any]:
    try:
        v = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"not JSON ({exc})") from None
    if not isinstance(v, dict):
        raise RecordError(f"not a JSON object but {type(v).__name__}")
    return v


def _str(d: Mapping[str, Any], k: str) -> str:
    v = d.get(k)
    if not isinstance(v, str):
        raise RecordError(f"{k!r} must be a string, not {v!r}")
    return v


def _num(d: Mapping[str, Any], k: str) -> float:
    v = d.get(k)
    # bool is an int in Python; a JSON true is not a time
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise RecordError(f"{k!r} must be a number, not {v!r}")
    return float(v)


def _int(d: Mapping[str, Any], k: str, minimum: int) -> int:
    v = d.get(k)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise RecordError(f"{k!r} must be an integer >= {minimum}, not {v!r}")
    return v


def _member_name(d: Mapping[str, Any], k: str, members: Collection[str]) -> str:
    name = _str(d, k)
    if name not in members:
        raise RecordError(f"{k!r} names {name!r}, which is not a cluster member")
    return name


def encode_leader(name: str, epoch: int, acquired_at: float, renewed_at: float, reason: str) -> str:
    return dumps(
        {"name": name, "epoch": epoch, "acquired_at": acquired_at, "renewed_at": renewed_at, "reason": reason}
    )


def decode_leader(raw: str | bytes, members: Collection[str], expires_at: float) -> LeaderRecord:
    d = _obj(raw)
    return LeaderRecord(
        name=_member_name(d, "name", members),
        epoch=_int(d, "epoch", 1),
        acquired_at=_num(d, "acquired_at"),
        renewed_at=_num(d, "renewed_at"),
        expires_at=expires_at,
        reason=_str(d, "reason"),
    )


def encode_epoch(epoch: int, name: str, at: float, reason: str) -> str:
    return dumps({"epoch": epoch, "name": name, "at": at, "reason": reason})


def decode_epoch(raw: str | bytes | None) -> int:
    """The last epoch handed out; 0 on an empty store."""
    if raw is None:
        return 0
    return _int(_obj(raw), "epoch", 0)


def encode_member(name: str, payload: Mapping[str, Any], updated_at: float) -> str:
    return dumps({"name": name, "payload": dict(payload), "updated_at": updated_at})


def decode_member(key_name: str, raw: str | bytes, members: Collection[str]) -> MemberRecord:
    if key_name not in members:
        raise RecordError(f"{key_name!r} is not a cluster member")
    d = _obj(raw)
    name = _str(d, "name")
    if name != key_name:
        raise RecordError(f"record names {name!r} under the key of {key_name!r}")
    payload = d.get("payload")
    if not isinstance(payload, dict):
        raise RecordError(f"'payload' must be a JSON object, not {payload!r}")
    return MemberRecord(name=name, payload=payload, updated_at=_num(d, "updated_at"))


def encode_crl(name: str, epoch: int, lines: Sequence[str], updated_at: float) -> str:
    if isinstance(lines, str) or not all(isinstance(x, str) for x in lines):
        raise TypeError("lines must be a sequence of strings")
    return dumps({"name": name, "epoch": epoch, "lines": list(lines), "updated_at": updated_at})


def decode_crl(raw: str | bytes, members: Collection[str]) -> CRLBlock:
    d = _obj(raw)
    lines = d.get("lines")
    if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
        raise RecordError(f"'lines' must be a list of strings, not {lines!r}")
    return CRLBlock(
        name=_member_name(d, "name", members),
        epoch=_int(d, "epoch", 1),
        lines=tuple(lines),
        updated_at=_num(d, "updated_at"),
    )


def encode_at(at: float) -> str:
    return dumps({"at": at})


def decode_at(raw: str | bytes) -> float:
    return _num(_obj(raw), "at")


def encode_switchover(req: SwitchoverRequest) -> str:
    return dumps(
        {
            "target": req.target,
            "kind": req.kind,
            "requested_at": req.requested_at,
            "requested_by": req.requested_by,
        }
    )


def decode_switchover(raw: str | bytes, members: Collection[str]) -> SwitchoverRequest:
    d = _obj(raw)
    kind = d.get("kind")
    if kind == "switchover" or kind == "failover":
        return SwitchoverRequest(
            target=_member_name(d, "target", members),
            kind=kind,
            requested_at=_num(d, "requested_at"),
            requested_by=_str(d, "requested_by"),
        )
    raise RecordError(f"'kind' must be one of {', '.join(SWITCHOVER_KINDS)}, not {kind!r}")


def encode_history(at: float, event: Mapping[str, Any]) -> str:
    return dumps({"at": at, "event": dict(event)})


def decode_history(seq: int, raw: str | bytes) -> HistoryEvent:
    d = _obj(raw)
    event = d.get("event")
    if not isinstance(event, dict):
        raise RecordError(f"'event' must be a JSON object, not {event!r}")
    return HistoryEvent(seq=seq, at=_num(d, "at"), event=event)


def decode_step(raw: str | bytes) -> dict[str, Any]:
    return _obj(raw)


def decode_flags(
    paused: str | bytes | None,
    switchover: str | bytes | None,
    cooldown_ack: str | bytes | None,
    members: Collection[str],
    problems: list[str],
) -> Flags:
    """Flags from the three raw values; an unreadable flag counts as unset and is reported."""

    def read(key: str, raw: str | bytes | None) -> float | None:
        if raw is None:
            return None
        try:
            return decode_at(raw)
        except RecordError as exc:
            problems.append(f"{key}: ignored: {exc}")
            return None

    paused_at = read(KEY_PAUSED, paused)
    if paused is not None and paused_at is None:
        # an unreadable pause flag still means somebody paused the cluster: fail safe, stay paused
        paused_at = 0.0
    req = None
    if switchover is not None:
        try:
            req = decode_switchover(switchover, members)
        except RecordError as exc:
            problems.append(f"{KEY_SWITCHOVER}: ignored: {exc}")
    return Flags(
        paused=paused is not None,
        paused_at=paused_at,
        switchover=req,
        cooldown_ack_at=read(KEY_COOLDOWN_ACK, cooldown_ack),
    )


def ttl_seconds(ttl: float) -> int:
    """TTLs are whole seconds in etcd; round up so a lease never ends before the caller asked."""
    if not math.isfinite(ttl) or ttl <= 0:
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
    return max(1, math.ceil(ttl))


# ---- the interface -----------------------------------------------------------------------------


class Store(abc.ABC):
    """The coordination store. Every method either answers or raises `StoreUnavailable` within
    about `timeout` seconds; a `None`/`False` answer means the store said no (lost the race, not
    the holder), never "could not ask"."""

    def __init__(self, members: Collection[str], timeout: float) -> None:
        if not members:
            raise ValueError("members must not be empty")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, not {timeout!r}")
        self.members: frozenset[str] = frozenset(members)
        self.timeout = float(timeout)
        self._problems: tuple[str, ...] = ()
        self._logged: dict[str, float] = {}

    # -- leader key
    @abc.abstractmethod
    async def get_leader(self) -> LeaderRecord | None:
        """The live, valid leader record, or None (no key, expired, or unusable: see last_problems())."""

    @abc.abstractmethod
    async def acquire_leader(self, name: str, ttl: float, reason: str) -> LeaderRecord | None:
        """Take the key if no live key exists (valid or not); epoch = last epoch + 1. None: lost."""

    @abc.abstractmethod
    async def renew_leader(self, name: str, epoch: int, ttl: float) -> LeaderRecord | None:
        """Extend the key's TTL if `name` holds it with `epoch`; None if not (any more)."""

    @abc.abstractmethod
    async def release_leader(self, name: str, epoch: int, reason: str) -> bool:
        """Delete the key at once if `name` holds it with `epoch`; the epoch is kept."""

    @abc.abstractmethod
    async def get_epoch(self) -> int:
        """The last epoch handed out (0 on an empty store), whether or not the key is held now."""

    # -- members
    @abc.abstractmethod
    async def put_member(self, name: str, payload: Mapping[str, Any], ttl: float) -> None: ...

    @abc.abstractmethod
    async def get_members(self) -> MembersSnapshot: ...

    # -- the master's CS.cfg ca.crl. block
    @abc.abstractmethod
    async def put_crl_block(self, name: str, epoch: int, lines: Sequence[str]) -> bool:
        """Publish, only while `name` holds the key with `epoch` (a stale master cannot overwrite)."""

    @abc.abstractmethod
    async def get_crl_block(self) -> CRLBlock | None: ...

    # -- control flags
    @abc.abstractmethod
    async def get_flags(self) -> Flags: ...

    @abc.abstractmethod
    async def set_paused(self, paused: bool) -> None:
        """Pause keeps the first pause time; resume clears it."""

    @abc.abstractmethod
    async def request_switchover(
        self, target: str, kind: SwitchoverKind, requested_by: str
    ) -> SwitchoverRequest:
        """Replaces any pending request."""

    @abc.abstractmethod
    async def clear_switchover(self) -> None: ...

    @abc.abstractmethod
    async def ack_cooldown(self) -> float:
        """Record an operator's acknowledgement of the last failover; returns its time."""

    # -- history
    @abc.abstractmethod
    async def append_history(self, event: Mapping[str, Any]) -> HistoryEvent: ...

    @abc.abstractmethod
    async def get_history(self, limit: int = 50) -> list[HistoryEvent]:
        """The newest `limit` events, oldest first."""

    # -- promotion journal
    @abc.abstractmethod
    async def put_step(self, name: str, step: Mapping[str, Any] | None) -> None:
        """Record the node's current promotion step; None clears it."""

    @abc.abstractmethod
    async def get_step(self, name: str) -> dict[str, Any] | None: ...

    # -- misc
    @abc.abstractmethod
    async def watch_leader(self, timeout: float) -> None:
        """Wait up to `timeout` s; return early once the leader key differs from what the last
        get_leader() through this store saw (holder, epoch, presence; renewals do not count)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    def last_problems(self) -> tuple[str, ...]:
        """Why the last read ignored records (empty when everything it read was valid)."""
        return self._problems

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- helpers for backends
    def _check_member(self, name: str, what: str = "name") -> None:
        if name not in self.members:
            raise ValueError(f"{what} {name!r} is not a cluster member ({', '.join(sorted(self.members))})")

    def _report(self, problems: Sequence[str]) -> None:
        """Remember and log what a read ignored; each distinct line is logged at most every 5 min."""
        self._problems = tuple(problems)
        now = time.monotonic()
        for p in problems:
            if now - self._logged.get(p, -1e9) >= 300:
                self._logged[p] = now
                log.warning("store: %s", p)
        if len(self._logged) > 1000:
            self._logged = {k: v for k, v in self._logged.items() if now - v < 300}
