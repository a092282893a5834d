"""The coordination store: one small async interface, records, and the record codec.

Both backends keep the same keys (relative to a prefix) with the same JSON values, so the codec
below is shared and the contract tests run unchanged against both:

    leader              {"name", "epoch", "acquired_at", "renewed_at", "reason"}   with a TTL
    epoch               the epoch record (EpochRecord), written in the same transaction as every
                        acquisition and release of the key; no TTL, never goes back
    cooldown            {"name", "epoch", "at"}  with a TTL of failover_cooldown: present = cooldown on
    members/<name>      {"name", "payload", "updated_at"}                          with a TTL
    crl                 {"name", "epoch", "lines", "updated_at"}
    flags/paused        {"at"}
    flags/switchover    {"id", "target", "kind", "requested_at", "requested_by"}
    flags/cooldown_ack  {"at"}
    steps/<name>        the caller's JSON object
    doctor/<name>       a random token with a short TTL: `ca-watchdog doctor`'s write check; nothing reads it
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
import reprlib
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Literal, Self

log = logging.getLogger(__name__)

SwitchoverKind = Literal["switchover", "failover"]
# how a holder got the key: an election, an operator's switchover or failover, bootstrap, or taking its
# own expired lease back while its CA kept serving (resume)
ACQUIRE_KINDS = ("automatic", "switchover", "failover", "bootstrap", "resume")
ENDED_RELEASED = "released"  # the holder deleted the key itself, its CA confirmed stopped
ENDED_EXPIRED = "expired"  # the lease ran out (only ever inferred by the next acquirer or a reader)
SWITCHOVER_KINDS: tuple[SwitchoverKind, ...] = ("switchover", "failover")

KEY_LEADER = "leader"
KEY_EPOCH = "epoch"
KEY_CRL = "crl"
KEY_PAUSED = "flags/paused"
KEY_SWITCHOVER = "flags/switchover"
KEY_COOLDOWN_ACK = "flags/cooldown_ack"
KEY_COOLDOWN = "cooldown"
MEMBERS_DIR = "members/"
STEPS_DIR = "steps/"
DOCTOR_DIR = "doctor/"
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
class EpochRecord:
    """The last epoch handed out and how it went: who got the key, how, and how it ended.

    Decisions read "who was master and did it step down cleanly" from here, never from history.
    """

    epoch: int
    name: str
    kind: str  # one of ACQUIRE_KINDS
    acquired_at: float  # store time
    reason: str
    ended: str | None = None  # None while held (or once expired: the key is gone, nobody wrote it); "released"
    ended_at: float | None = None
    ended_reason: str | None = None
    target: str | None = None  # whom a release handed over to
    previous: str | None = None  # the holder of epoch - 1
    previous_ended: str | None = None  # "released" | "expired" | None (no previous holder)


@dataclass(frozen=True)
class Cooldown:
    """The last completed automatic failover; the key lives failover_cooldown seconds in the store."""

    name: str
    epoch: int
    at: float
    expires_at: float


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
    id: str  # clearing names the request, so an old request can never delete a newer one
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


@dataclass(frozen=True)
class StoreState:
    """Every store fact one cycle's decision reads, read together (one transaction where possible)."""

    leader: LeaderRecord | None
    epoch: EpochRecord | None
    epoch_unreadable: bool  # an epoch key exists but cannot be read: never treated as an empty store
    members: MembersSnapshot
    flags: Flags
    cooldown: Cooldown | None
    problems: tuple[str, ...]


class RecordError(ValueError):
    """A stored value that is not a valid record; the message says why."""


# ---- codec -------------------------------------------------------------------------------------


def dumps(value: Mapping[str, Any]) -> str:
    """Compact JSON; NaN/inf and non-JSON types are caller bugs and raise here, before any write."""
    return json.dumps(dict(value), separators=(",", ":"), sort_keys=True, allow_nan=False)


_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong = 2, 60, 60, 60
_SHOW.maxlist = _SHOW.maxdict = _SHOW.maxtuple = 4


def _show(v: object) -> str:
    """A short, bounded repr of a hostile value for an error message (never its whole text, never
    a RecursionError on a deeply nested one)."""
    try:
        return _SHOW.repr(v)
    except Exception:  # a message must not fail: say what it was instead
        return f"a {type(v).__name__}"


def _obj(raw: str | bytes) -> dict[str, Any]:
    try:
        v = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"not JSON ({_show(str(exc))})") from None
    except RecursionError:
        raise RecordError("not a record: JSON nested too deeply") from None
    if not isinstance(v, dict):
        raise RecordError(f"not a JSON object but {type(v).__name__}")
    return v


def _str(d: Mapping[str, Any], k: str) -> str:
    v = d.get(k)
    if not isinstance(v, str):
        raise RecordError(f"{_show(k)} must be a string, not {_show(v)}")
    return v


def _num(d: Mapping[str, Any], k: str) -> float:
    v = d.get(k)
    # bool is an int in Python; a JSON true is not a time
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise RecordError(f"{_show(k)} must be a number, not {_show(v)}")
    return float(v)


def _int(d: Mapping[str, Any], k: str, minimum: int) -> int:
    v = d.get(k)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise RecordError(f"{_show(k)} must be an integer >= {minimum}, not {_show(v)}")
    return v


def _member_name(d: Mapping[str, Any], k: str, members: Collection[str]) -> str:
    name = _str(d, k)
    if name not in members:
        raise RecordError(f"{_show(k)} names {_show(name)}, which is not a cluster member")
    return name


def encode_leader(name: str, epoch: int, acquired_at: float, renewed_at: float, reason: str) -> str:
    return dumps({"name": name, "epoch": epoch, "acquired_at": acquired_at, "renewed_at": renewed_at, "reason": reason})


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


def encode_epoch_record(r: EpochRecord) -> str:
    return dumps(
        {
            "epoch": r.epoch,
            "name": r.name,
            "kind": r.kind,
            "at": r.acquired_at,
            "reason": r.reason,
            "ended": r.ended,
            "ended_at": r.ended_at,
            "ended_reason": r.ended_reason,
            "target": r.target,
            "previous": r.previous,
            "previous_ended": r.previous_ended,
        }
    )


def _opt_str(d: Mapping[str, Any], k: str) -> str | None:
    v = d.get(k)
    if v is not None and not isinstance(v, str):
        raise RecordError(f"{_show(k)} must be a string or null, not {_show(v)}")
    return v


def decode_epoch_record(raw: str | bytes, members: Collection[str]) -> EpochRecord:
    d = _obj(raw)
    kind = d.get("kind", "automatic")
    if kind not in ACQUIRE_KINDS:
        raise RecordError(f"'kind' must be one of {', '.join(ACQUIRE_KINDS)}, not {_show(kind)}")
    ended = _opt_str(d, "ended")
    reason = _str(d, "reason")
    if "ended" not in d and reason.startswith("released: "):  # the first version's release marker
        ended = ENDED_RELEASED
    if ended not in (None, ENDED_RELEASED):
        raise RecordError(f"'ended' must be null or {_show(ENDED_RELEASED)}, not {_show(ended)}")
    previous_ended = _opt_str(d, "previous_ended")
    if previous_ended not in (None, ENDED_RELEASED, ENDED_EXPIRED):
        raise RecordError(f"'previous_ended' must be null, released or expired, not {_show(previous_ended)}")
    ended_at = d.get("ended_at")
    previous = _opt_str(d, "previous")
    target = _opt_str(d, "target")
    return EpochRecord(
        epoch=_int(d, "epoch", 1),
        name=_member_name(d, "name", members),
        kind=kind,
        acquired_at=_num(d, "at"),
        reason=reason,
        ended=ended,
        ended_at=None if ended_at is None else _num(d, "ended_at"),
        ended_reason=_opt_str(d, "ended_reason"),
        target=target if target in members else None,
        previous=previous if previous in members else None,
        previous_ended=previous_ended,
    )


def acquired_record(last: EpochRecord | None, name: str, now: float, reason: str, kind: str) -> EpochRecord:
    """The epoch record an acquisition writes, given the one it replaces (in the same transaction)."""
    if kind not in ACQUIRE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(ACQUIRE_KINDS)}, not {kind!r}")
    return EpochRecord(
        epoch=(last.epoch if last else 0) + 1,
        name=name,
        kind=kind,
        acquired_at=now,
        reason=reason,
        previous=last.name if last else None,
        previous_ended=(last.ended or ENDED_EXPIRED) if last else None,
    )


def released_record(cur: EpochRecord, now: float, reason: str, target: str | None) -> EpochRecord:
    return replace(cur, ended=ENDED_RELEASED, ended_at=now, ended_reason=reason, target=target)


def decode_epoch(raw: str | bytes | None) -> int:
    """The last epoch handed out; 0 on an empty store."""
    if raw is None:
        return 0
    return _int(_obj(raw), "epoch", 0)


def encode_cooldown(name: str, epoch: int, at: float) -> str:
    return dumps({"name": name, "epoch": epoch, "at": at})


def decode_cooldown(raw: str | bytes, members: Collection[str], expires_at: float) -> Cooldown:
    d = _obj(raw)
    return Cooldown(
        name=_member_name(d, "name", members), epoch=_int(d, "epoch", 1), at=_num(d, "at"), expires_at=expires_at
    )


def encode_member(name: str, payload: Mapping[str, Any], updated_at: float) -> str:
    return dumps({"name": name, "payload": dict(payload), "updated_at": updated_at})


def decode_member(key_name: str, raw: str | bytes, members: Collection[str]) -> MemberRecord:
    if key_name not in members:
        raise RecordError(f"{_show(key_name)} is not a cluster member")
    d = _obj(raw)
    name = _str(d, "name")
    if name != key_name:
        raise RecordError(f"record names {_show(name)} under the key of {_show(key_name)}")
    payload = d.get("payload")
    if not isinstance(payload, dict):
        raise RecordError(f"'payload' must be a JSON object, not {_show(payload)}")
    return MemberRecord(name=name, payload=payload, updated_at=_num(d, "updated_at"))


def encode_crl(name: str, epoch: int, lines: Sequence[str], updated_at: float) -> str:
    if isinstance(lines, str) or not all(isinstance(x, str) for x in lines):
        raise TypeError("lines must be a sequence of strings")
    return dumps({"name": name, "epoch": epoch, "lines": list(lines), "updated_at": updated_at})


def decode_crl(raw: str | bytes, members: Collection[str]) -> CRLBlock:
    d = _obj(raw)
    lines = d.get("lines")
    if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
        raise RecordError(f"'lines' must be a list of strings, not {_show(lines)}")
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
            "id": req.id,
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
            id=_str(d, "id") if "id" in d else "",
            target=_member_name(d, "target", members),
            kind=kind,
            requested_at=_num(d, "requested_at"),
            requested_by=_str(d, "requested_by"),
        )
    raise RecordError(f"'kind' must be one of {', '.join(SWITCHOVER_KINDS)}, not {_show(kind)}")


def encode_history(at: float, event: Mapping[str, Any]) -> str:
    return dumps({"at": at, "event": dict(event)})


def decode_history(seq: int, raw: str | bytes) -> HistoryEvent:
    d = _obj(raw)
    event = d.get("event")
    if not isinstance(event, dict):
        raise RecordError(f"'event' must be a JSON object, not {_show(event)}")
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
    async def acquire_leader(
        self, name: str, ttl: float, reason: str, kind: str = "automatic", expect_epoch: int | None = None
    ) -> LeaderRecord | None:
        """Take the key if no live key exists (valid or not), and, with `expect_epoch`, only if the
        last epoch handed out is that one; epoch = last epoch + 1. The epoch record (how, and how the
        previous holder ended) is written in the same transaction. None: lost."""

    @abc.abstractmethod
    async def renew_leader(self, name: str, epoch: int, ttl: float) -> LeaderRecord | None:
        """Extend the key's TTL if `name` holds it with `epoch`; None if not (any more)."""

    @abc.abstractmethod
    async def release_leader(self, name: str, epoch: int, reason: str, target: str | None = None) -> bool:
        """Delete the key at once if `name` holds it with `epoch`, and mark the epoch record released
        (same transaction); the epoch is kept. False: not the holder (any more)."""

    @abc.abstractmethod
    async def get_epoch_record(self) -> EpochRecord | None:
        """The last epoch handed out and how it went; None on an empty store. Unreadable: RecordError."""

    async def get_epoch(self) -> int:
        """The last epoch handed out (0 on an empty store), whether or not the key is held now."""
        try:
            rec = await self.get_epoch_record()
        except RecordError as exc:
            raise StoreUnavailable(f"{KEY_EPOCH} record unreadable: {exc}") from None
        return rec.epoch if rec else 0

    # -- the anti-flapping cooldown
    @abc.abstractmethod
    async def start_cooldown(self, name: str, epoch: int, ttl: float) -> bool:
        """A completed automatic failover: the cooldown key for `ttl` s, only while `name` holds `epoch`."""

    @abc.abstractmethod
    async def get_cooldown(self) -> Cooldown | None: ...

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
    async def request_switchover(self, target: str, kind: SwitchoverKind, requested_by: str) -> SwitchoverRequest:
        """Replaces any pending request."""

    @abc.abstractmethod
    async def clear_switchover(self, request_id: str | None = None) -> None:
        """Delete the pending request; with `request_id`, only that request (never a newer one)."""

    @abc.abstractmethod
    async def ack_cooldown(self) -> float:
        """An operator's acknowledgement of the last failover: ends the cooldown; returns its time."""

    async def read_state(self) -> StoreState:
        """Every fact a decision reads. Backends override this with one consistent read."""
        problems: list[str] = []
        leader = await self.get_leader()
        problems.extend(self.last_problems())
        epoch: EpochRecord | None = None
        unreadable = False
        try:
            epoch = await self.get_epoch_record()
        except RecordError as exc:
            unreadable = True
            problems.append(f"{KEY_EPOCH}: unreadable ({exc}); no bootstrap and no election until repaired")
        members = await self.get_members()
        problems.extend(members.rejected)
        flags = await self.get_flags()
        problems.extend(self.last_problems())
        cooldown = await self.get_cooldown()
        problems.extend(self.last_problems())
        return StoreState(leader, epoch, unreadable, members, flags, cooldown, tuple(problems))

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

    # -- `ca-watchdog doctor`: a write round trip that no decision reads (never the leader key)
    @abc.abstractmethod
    async def put_doctor_token(self, name: str, token: str, ttl: float) -> None:
        """doctor/<name> = token for `ttl` s."""

    @abc.abstractmethod
    async def get_doctor_token(self, name: str) -> str | None: ...

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
