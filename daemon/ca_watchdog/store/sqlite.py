"""The embedded store: one SQLite file shared by every node (and process) on one host.

Every operation is one transaction (writes take the write lock up front with BEGIN IMMEDIATE, so a
read-then-write can never interleave with another writer); WAL lets readers run beside a writer.
Time is the wall clock: all users share the host's clock. Expiry is passive: a row whose
`expires_at` has passed is absent for every reader and writer, whether or not it was purged yet.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

from .base import (
    DOCTOR_DIR,
    HISTORY_KEEP,
    KEY_COOLDOWN,
    KEY_COOLDOWN_ACK,
    KEY_CRL,
    KEY_EPOCH,
    KEY_LEADER,
    KEY_PAUSED,
    KEY_SWITCHOVER,
    MEMBERS_DIR,
    STEPS_DIR,
    Cooldown,
    CRLBlock,
    EpochRecord,
    Flags,
    HistoryEvent,
    LeaderRecord,
    MemberRecord,
    MembersSnapshot,
    RecordError,
    Store,
    StoreState,
    StoreUnavailable,
    SwitchoverKind,
    SwitchoverRequest,
    acquired_record,
    decode_cooldown,
    decode_crl,
    decode_epoch_record,
    decode_flags,
    decode_history,
    decode_leader,
    decode_member,
    decode_step,
    decode_switchover,
    dumps,
    encode_at,
    encode_cooldown,
    encode_crl,
    encode_epoch_record,
    encode_history,
    encode_leader,
    encode_member,
    encode_switchover,
    released_record,
)

T = TypeVar("T")

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires_at REAL)",
    "CREATE TABLE IF NOT EXISTS history (seq INTEGER PRIMARY KEY AUTOINCREMENT, value TEXT NOT NULL)",
)
# s between data_version checks in watch_leader: a released key is seen this much later at most;
# 0.1 s cost an idle clone 0.5 % of a core (docs/benchmarks.md)
WATCH_POLL = 0.25

_LIVE = "(expires_at IS NULL OR expires_at > ?)"
Row = tuple[str, float | None]


def leader_identity(value: str | None) -> object:
    """What a watcher compares: holder and epoch, not the renewal time."""
    if value is None:
        return None
    try:
        d = json.loads(value)
    except ValueError:
        return ("raw", value)
    if not isinstance(d, dict):
        return ("raw", value)
    return (d.get("name"), d.get("epoch"), d.get("acquired_at"))


class SQLiteStore(Store):
    def __init__(self, path: str | os.PathLike[str], members: Collection[str], timeout: float) -> None:
        super().__init__(members, timeout)
        self.path = os.fspath(path)
        self._conn: sqlite3.Connection | None = None
        # one connection, used by one thread at a time; a threading lock (not an asyncio one)
        # because a timed-out call leaves its thread running with the connection
        self._lock = threading.Lock()
        self._writes = 0  # own commits: data_version does not count them
        self._leader_seen: object = None
        self._leader_seen_set = False

    # ---- plumbing ------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        if not os.path.exists(self.path):
            # the file decides who may pause or steer the cluster: owner only
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        busy = max(0.05, self.timeout * 0.8)  # give up on the lock before the caller's timeout
        conn = sqlite3.connect(self.path, timeout=busy, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout={int(busy * 1000)}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a won lock must survive a power cut
            conn.execute("BEGIN IMMEDIATE")
            for stmt in SCHEMA:
                conn.execute(stmt)
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if not self._lock.acquire(timeout=self.timeout):
            raise StoreUnavailable(f"sqlite {self.path}: previous operation still running")
        try:
            conn = self._connect()
            return fn(conn)
        except (sqlite3.Error, OSError) as exc:  # OSError: the file or its directory is gone
            raise StoreUnavailable(f"sqlite {self.path}: {exc}") from exc
        finally:
            self._lock.release()

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._call, fn), self.timeout)
        except TimeoutError:
            conn = self._conn
            if conn is not None:
                conn.interrupt()  # stop the stuck statement so the thread lets go of the connection
            raise StoreUnavailable(f"sqlite {self.path}: no answer within {self.timeout:g} s") from None

    def _write(self, fn: Callable[[sqlite3.Connection, float], T]) -> Callable[[sqlite3.Connection], T]:
        def tx(c: sqlite3.Connection) -> T:
            c.execute("BEGIN IMMEDIATE")
            try:
                r = fn(c, time.time())  # the clock is read once the write lock is ours
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
            self._writes += 1
            return r

        return tx

    @staticmethod
    def _read(fn: Callable[[sqlite3.Connection, float], T]) -> Callable[[sqlite3.Connection], T]:
        def tx(c: sqlite3.Connection) -> T:
            c.execute("BEGIN")  # one snapshot for all the reads of this operation
            try:
                return fn(c, time.time())
            finally:
                if c.in_transaction:
                    c.execute("COMMIT")

        return tx

    @staticmethod
    def _get(c: sqlite3.Connection, key: str, now: float) -> Row | None:
        row = c.execute(f"SELECT value, expires_at FROM kv WHERE key = ? AND {_LIVE}", (key, now)).fetchone()
        return None if row is None else (str(row[0]), row[1])

    @staticmethod
    def _put(c: sqlite3.Connection, key: str, value: str, expires_at: float | None = None) -> None:
        c.execute("INSERT OR REPLACE INTO kv (key, value, expires_at) VALUES (?, ?, ?)", (key, value, expires_at))

    def _leader(self, row: Row | None, problems: list[str]) -> LeaderRecord | None:
        if row is None:
            return None
        value, expires_at = row
        if expires_at is None:
            problems.append(f"{KEY_LEADER}: ignored: the key has no expiry (written by hand?); it blocks elections")
            return None
        try:
            return decode_leader(value, self.members, expires_at)
        except RecordError as exc:
            problems.append(f"{KEY_LEADER}: ignored: {exc}; it blocks elections until it expires")
            return None

    # ---- leader --------------------------------------------------------------------------------

    async def get_leader(self) -> LeaderRecord | None:
        row = await self._run(self._read(lambda c, now: self._get(c, KEY_LEADER, now)))
        problems: list[str] = []
        rec = self._leader(row, problems)
        self._leader_seen, self._leader_seen_set = leader_identity(row[0] if row else None), True
        self._report(problems)
        return rec

    def _epoch_record(self, c: sqlite3.Connection, now: float) -> EpochRecord | None:
        """Raises RecordError on an unreadable record."""
        row = self._get(c, KEY_EPOCH, now)
        return None if row is None else decode_epoch_record(row[0], self.members)

    async def acquire_leader(
        self, name: str, ttl: float, reason: str, kind: str = "automatic", expect_epoch: int | None = None
    ) -> LeaderRecord | None:
        self._check_member(name)
        if not ttl > 0:
            raise ValueError(f"ttl must be > 0, not {ttl!r}")
        problems: list[str] = []

        def op(c: sqlite3.Connection, now: float) -> LeaderRecord | None:
            if self._get(c, KEY_LEADER, now) is not None:
                return None  # live key, valid or not: the CAS is on the key
            try:
                last = self._epoch_record(c, now)
            except RecordError as exc:
                problems.append(f"{KEY_EPOCH}: unreadable ({exc}): refusing to hand out an epoch")
                return None
            if expect_epoch is not None and (last.epoch if last else 0) != expect_epoch:
                return None
            rec = acquired_record(last, name, now, reason, kind)
            self._put(c, KEY_LEADER, encode_leader(name, rec.epoch, now, now, reason), now + ttl)
            self._put(c, KEY_EPOCH, encode_epoch_record(rec))
            return LeaderRecord(name, rec.epoch, now, now, now + ttl, reason)

        rec = await self._run(self._write(op))
        self._report(problems)
        return rec

    async def renew_leader(self, name: str, epoch: int, ttl: float) -> LeaderRecord | None:
        if not ttl > 0:
            raise ValueError(f"ttl must be > 0, not {ttl!r}")

        def op(c: sqlite3.Connection, now: float) -> LeaderRecord | None:
            cur = self._leader(self._get(c, KEY_LEADER, now), [])
            if cur is None or cur.name != name or cur.epoch != epoch:
                return None
            value = encode_leader(name, epoch, cur.acquired_at, now, cur.reason)
            self._put(c, KEY_LEADER, value, now + ttl)
            return LeaderRecord(name, epoch, cur.acquired_at, now, now + ttl, cur.reason)

        return await self._run(self._write(op))

    async def release_leader(self, name: str, epoch: int, reason: str, target: str | None = None) -> bool:
        def op(c: sqlite3.Connection, now: float) -> bool:
            cur = self._leader(self._get(c, KEY_LEADER, now), [])
            if cur is None or cur.name != name or cur.epoch != epoch:
                return False
            c.execute("DELETE FROM kv WHERE key = ?", (KEY_LEADER,))
            # keep the epoch; record that its holder stepped down itself
            try:
                last = self._epoch_record(c, now)
            except RecordError:
                last = None
            if last is not None and last.epoch == epoch:
                self._put(c, KEY_EPOCH, encode_epoch_record(released_record(last, now, reason, target)))
            return True

        return await self._run(self._write(op))

    async def get_epoch_record(self) -> EpochRecord | None:
        return await self._run(self._read(self._epoch_record))

    # ---- cooldown ------------------------------------------------------------------------------

    async def start_cooldown(self, name: str, epoch: int, ttl: float) -> bool:
        if not ttl > 0:
            raise ValueError(f"ttl must be > 0, not {ttl!r}")

        def op(c: sqlite3.Connection, now: float) -> bool:
            cur = self._leader(self._get(c, KEY_LEADER, now), [])
            if cur is None or cur.name != name or cur.epoch != epoch:
                return False
            self._put(c, KEY_COOLDOWN, encode_cooldown(name, epoch, now), now + ttl)
            return True

        return await self._run(self._write(op))

    def _cooldown(self, c: sqlite3.Connection, now: float, problems: list[str]) -> Cooldown | None:
        row = self._get(c, KEY_COOLDOWN, now)
        if row is None:
            return None
        try:
            return decode_cooldown(row[0], self.members, row[1] if row[1] is not None else float("inf"))
        except RecordError as exc:
            # an unreadable cooldown still says a failover happened: keep the anti-flapping rule
            problems.append(f"{KEY_COOLDOWN}: unreadable ({exc}); the cooldown counts as on until it expires")
            return Cooldown("", 0, now, row[1] if row[1] is not None else float("inf"))

    async def get_cooldown(self) -> Cooldown | None:
        problems: list[str] = []
        cd = await self._run(self._read(lambda c, now: self._cooldown(c, now, problems)))
        self._report(problems)
        return cd

    # ---- everything a cycle reads, in one snapshot ------------------------------------------------

    async def read_state(self) -> StoreState:
        problems: list[str] = []

        def op(c: sqlite3.Connection, now: float) -> tuple[StoreState, object]:
            row = self._get(c, KEY_LEADER, now)
            leader = self._leader(row, problems)
            epoch: EpochRecord | None = None
            unreadable = False
            try:
                epoch = self._epoch_record(c, now)
            except RecordError as exc:
                unreadable = True
                problems.append(f"{KEY_EPOCH}: unreadable ({exc}); no bootstrap and no election until repaired")
            members = self._members(c, now)
            problems.extend(members.rejected)
            flags = self._flags(c, now, problems)
            cooldown = self._cooldown(c, now, problems)
            return StoreState(leader, epoch, unreadable, members, flags, cooldown, ()), leader_identity(
                None if row is None else row[0]
            )

        st, ident = await self._run(self._read(op))
        self._leader_seen, self._leader_seen_set = ident, True
        self._report(problems)
        return StoreState(st.leader, st.epoch, st.epoch_unreadable, st.members, st.flags, st.cooldown, tuple(problems))

    # ---- members -------------------------------------------------------------------------------

    async def put_member(self, name: str, payload: Mapping[str, Any], ttl: float) -> None:
        self._check_member(name)
        if not ttl > 0:
            raise ValueError(f"ttl must be > 0, not {ttl!r}")

        def op(c: sqlite3.Connection, now: float) -> None:
            value = encode_member(name, payload, now)
            self._put(c, MEMBERS_DIR + name, value, now + ttl)
            # purge what nobody can see any more, so the table does not grow with dead rows
            c.execute("DELETE FROM kv WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))

        await self._run(self._write(op))

    def _members(self, c: sqlite3.Connection, now: float) -> MembersSnapshot:
        q = f"SELECT key, value FROM kv WHERE key >= ? AND key < ? AND {_LIVE} ORDER BY key"
        rows = [(str(k), str(v)) for k, v in c.execute(q, (MEMBERS_DIR, MEMBERS_DIR[:-1] + "0", now))]
        records: dict[str, MemberRecord] = {}
        rejected: list[str] = []
        for key, value in rows:
            try:
                records[key[len(MEMBERS_DIR) :]] = decode_member(key[len(MEMBERS_DIR) :], value, self.members)
            except RecordError as exc:
                rejected.append(f"{key}: ignored: {exc}")
        return MembersSnapshot(records=records, rejected=tuple(rejected))

    async def get_members(self) -> MembersSnapshot:
        snap = await self._run(self._read(self._members))
        self._report(snap.rejected)
        return snap

    # ---- CRL block -----------------------------------------------------------------------------

    async def put_crl_block(self, name: str, epoch: int, lines: Sequence[str]) -> bool:
        def op(c: sqlite3.Connection, now: float) -> bool:
            cur = self._leader(self._get(c, KEY_LEADER, now), [])
            if cur is None or cur.name != name or cur.epoch != epoch:
                return False
            self._put(c, KEY_CRL, encode_crl(name, epoch, lines, now))
            return True

        encode_crl(name, epoch, lines, 0.0)  # type errors surface before the transaction
        return await self._run(self._write(op))

    async def get_crl_block(self) -> CRLBlock | None:
        row = await self._run(self._read(lambda c, now: self._get(c, KEY_CRL, now)))
        problems: list[str] = []
        block = None
        if row is not None:
            try:
                block = decode_crl(row[0], self.members)
            except RecordError as exc:
                problems.append(f"{KEY_CRL}: ignored: {exc}")
        self._report(problems)
        return block

    # ---- flags ---------------------------------------------------------------------------------

    def _flags(self, c: sqlite3.Connection, now: float, problems: list[str]) -> Flags:
        paused, switchover, ack = (
            None if (r := self._get(c, k, now)) is None else r[0]
            for k in (KEY_PAUSED, KEY_SWITCHOVER, KEY_COOLDOWN_ACK)
        )
        return decode_flags(paused, switchover, ack, self.members, problems)

    async def get_flags(self) -> Flags:
        problems: list[str] = []
        flags = await self._run(self._read(lambda c, now: self._flags(c, now, problems)))
        self._report(problems)
        return flags

    async def set_paused(self, paused: bool) -> None:
        def op(c: sqlite3.Connection, now: float) -> None:
            if paused:
                # keep the first pause time
                c.execute(
                    "INSERT OR IGNORE INTO kv (key, value, expires_at) VALUES (?, ?, NULL)",
                    (KEY_PAUSED, encode_at(now)),
                )
            else:
                c.execute("DELETE FROM kv WHERE key = ?", (KEY_PAUSED,))

        await self._run(self._write(op))

    async def request_switchover(self, target: str, kind: SwitchoverKind, requested_by: str) -> SwitchoverRequest:
        self._check_member(target, "target")
        if kind not in ("switchover", "failover"):
            raise ValueError(f"kind must be switchover or failover, not {kind!r}")

        def op(c: sqlite3.Connection, now: float) -> SwitchoverRequest:
            req = SwitchoverRequest(
                id=uuid.uuid4().hex, target=target, kind=kind, requested_at=now, requested_by=requested_by
            )
            self._put(c, KEY_SWITCHOVER, encode_switchover(req))
            return req

        return await self._run(self._write(op))

    async def clear_switchover(self, request_id: str | None = None) -> None:
        def op(c: sqlite3.Connection, now: float) -> None:
            if request_id is not None:
                row = self._get(c, KEY_SWITCHOVER, now)
                try:
                    current = None if row is None else decode_switchover(row[0], self.members)
                except RecordError:
                    current = None  # unreadable: nobody can honour it, clearing it is safe
                if current is not None and current.id != request_id:
                    return  # a newer request replaced the one being cleared
            c.execute("DELETE FROM kv WHERE key = ?", (KEY_SWITCHOVER,))

        await self._run(self._write(op))

    async def ack_cooldown(self) -> float:
        def op(c: sqlite3.Connection, now: float) -> float:
            self._put(c, KEY_COOLDOWN_ACK, encode_at(now))
            c.execute("DELETE FROM kv WHERE key = ?", (KEY_COOLDOWN,))
            return now

        return await self._run(self._write(op))

    # ---- history -------------------------------------------------------------------------------

    async def append_history(self, event: Mapping[str, Any]) -> HistoryEvent:
        dumps(event)  # not JSON-able: the caller's bug, raised before the transaction

        def op(c: sqlite3.Connection, now: float) -> HistoryEvent:
            cur = c.execute("INSERT INTO history (value) VALUES (?)", (encode_history(now, event),))
            seq = int(cur.lastrowid or 0)
            c.execute("DELETE FROM history WHERE seq <= ?", (seq - HISTORY_KEEP,))
            return HistoryEvent(seq=seq, at=now, event=json.loads(dumps(event)))

        return await self._run(self._write(op))

    async def get_history(self, limit: int = 50) -> list[HistoryEvent]:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit}")

        def op(c: sqlite3.Connection, now: float) -> list[tuple[int, str]]:
            q = "SELECT seq, value FROM history ORDER BY seq DESC LIMIT ?"
            return [(int(s), str(v)) for s, v in c.execute(q, (limit,))]

        out: list[HistoryEvent] = []
        problems: list[str] = []
        for seq, value in reversed(await self._run(self._read(op))):
            try:
                out.append(decode_history(seq, value))
            except RecordError as exc:
                problems.append(f"history #{seq}: ignored: {exc}")
        self._report(problems)
        return out

    # ---- promotion journal ---------------------------------------------------------------------

    async def put_step(self, name: str, step: Mapping[str, Any] | None) -> None:
        self._check_member(name)
        value = None if step is None else dumps(step)

        def op(c: sqlite3.Connection, now: float) -> None:
            if value is None:
                c.execute("DELETE FROM kv WHERE key = ?", (STEPS_DIR + name,))
            else:
                self._put(c, STEPS_DIR + name, value)

        await self._run(self._write(op))

    async def get_step(self, name: str) -> dict[str, Any] | None:
        row = await self._run(self._read(lambda c, now: self._get(c, STEPS_DIR + name, now)))
        problems: list[str] = []
        step = None
        if row is not None:
            try:
                step = decode_step(row[0])
            except RecordError as exc:
                problems.append(f"{STEPS_DIR}{name}: ignored: {exc}")
        self._report(problems)
        return step

    # ---- doctor --------------------------------------------------------------------------------

    async def put_doctor_token(self, name: str, token: str, ttl: float) -> None:
        self._check_member(name)
        if not ttl > 0:
            raise ValueError(f"ttl must be > 0, not {ttl!r}")
        await self._run(self._write(lambda c, now: self._put(c, DOCTOR_DIR + name, token, now + ttl)))

    async def get_doctor_token(self, name: str) -> str | None:
        row = await self._run(self._read(lambda c, now: self._get(c, DOCTOR_DIR + name, now)))
        return None if row is None else row[0]

    # ---- watch / close -------------------------------------------------------------------------

    async def watch_leader(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        state: dict[str, Any] = {"dv": None, "writes": None}

        def poll(c: sqlite3.Connection) -> tuple[bool, object]:
            # data_version moves when another connection commits; our own commits are counted apart
            dv = c.execute("PRAGMA data_version").fetchone()[0]
            now = time.time()
            if dv == state["dv"] and self._writes == state["writes"] and now < state.get("expires", float("inf")):
                return False, None
            state["dv"], state["writes"] = dv, self._writes
            row = self._get(c, KEY_LEADER, now)
            state["expires"] = float("inf") if row is None or row[1] is None else row[1]
            return True, leader_identity(None if row is None else row[0])

        if self._leader_seen_set:
            baseline = self._leader_seen
        else:
            _, baseline = await self._run(poll)
        while True:
            changed, ident = await self._run(poll)
            if changed and ident != baseline:
                return
            left = deadline - loop.time()
            if left <= 0:
                return
            await asyncio.sleep(min(WATCH_POLL, left))

    async def close(self) -> None:
        def op() -> None:
            if self._lock.acquire(timeout=self.timeout):
                try:
                    if self._conn is not None:
                        self._conn.close()
                        self._conn = None
                finally:
                    self._lock.release()

        await asyncio.to_thread(op)
