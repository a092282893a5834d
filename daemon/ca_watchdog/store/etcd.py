"""The production store: etcd v3 through its JSON gateway (`/v3/...`), with aiohttp.

TTLs are etcd leases (whole seconds, rounded up; etcd raises anything below its minimum, 2 s
with default timings). The leader key is taken by a transaction that requires the key not to
exist (create_revision == 0) and the epoch key to be unchanged since it was read, and writes
both, so epochs are handed out exactly once and in order. Holder-only writes compare the leader
key's mod_revision. Renewal is a lease keep-alive, so watchers only wake when the holder changes.

Gateway quirks (etcd 3.4): keys and values are base64, int64s are strings, proto3 defaults are
omitted (`succeeded` missing = false, `kvs` missing = none), keep-alive and watch answers are
wrapped in `{"result": ...}`, an expired lease keep-alive answers 200 without `TTL`.

Why not `aetcd` (asyncio over gRPC, 1.0 release candidates in 2026): its Client takes one host and
port and opens `grpc.insecure_channel` only, so it can reach neither a TLS etcd with client
certificates (what a CA host uses) nor a list of endpoints to fail over between, and it adds grpcio
(a compiled dependency) beside the aiohttp the daemon already has. What this client needs from etcd
is a handful of calls (txn, range, lease grant/keep-alive/revoke, timetolive, watch); the gateway
gives them with aiohttp's TLS, timeouts and cancellation, and the store contract tests and the
simulation hold it to the same semantics as SQLite.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import json
import logging
import re
import ssl
import time
import uuid
from collections.abc import Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

from ..config import EtcdSettings, read_secret
from .base import (
    DOCTOR_DIR,
    HISTORY_DIR,
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
    ttl_seconds,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# gRPC status codes the gateway passes through
CODE_NOT_FOUND = 5
CODE_UNAUTHENTICATED = 16
ACQUIRE_ROUNDS = 5  # retries when only the epoch key moved under us (a concurrent release)

# the end of the current operation (loop time), so each HTTP attempt gets a share of what is left
_DEADLINE: contextvars.ContextVar[float] = contextvars.ContextVar("etcd_deadline")


class _NotFound(Exception):
    """etcd said NOT_FOUND (an unknown lease): an answer, not an outage."""


_INT64 = re.compile(r"-?[0-9]{1,19}")


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def unb64(data: Any) -> bytes:
    return base64.b64decode(data) if isinstance(data, str) else b""


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that selects every key starting with `prefix` (etcdctl --prefix)."""
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return b"\0"  # all keys


def _i(v: Any) -> int:
    """An int64 from the gateway (a string of ASCII digits; missing means 0)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str) and _INT64.fullmatch(v):
        return int(v)
    return 0


@dataclass(frozen=True)
class KV:
    key: str  # relative to the prefix
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


class EtcdStore(Store):
    def __init__(self, settings: EtcdSettings, members: Collection[str], timeout: float) -> None:
        super().__init__(members, timeout)
        if not settings.endpoints:
            raise ValueError("etcd needs at least one endpoint")
        self.settings = settings
        self._endpoints = [e.rstrip("/") for e in settings.endpoints]
        self._current = 0  # the endpoint that answered last; tried first
        self._prefix = settings.prefix.encode()
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._member_leases: dict[str, tuple[int, int]] = {}  # name -> (lease id, requested ttl)
        self._leader_seen_rev: int | None = None
        self._background: set[asyncio.Task[None]] = set()

    # ---- HTTP plumbing -------------------------------------------------------------------------

    def _ssl(self) -> ssl.SSLContext | bool:
        s = self.settings
        if not (s.ca_file or s.cert_file):
            return True  # default verification against the system trust store
        ctx = ssl.create_default_context(cafile=s.ca_file)
        if s.cert_file:
            ctx.load_cert_chain(s.cert_file, s.key_file)
        return ctx

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            try:
                ssl_ctx = self._ssl()
            except (OSError, ssl.SSLError) as exc:
                raise StoreUnavailable(f"etcd: cannot load TLS material: {exc}") from exc
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_ctx, limit=32))
        return self._session

    async def _op(self, aw: Coroutine[Any, Any, T]) -> T:
        """Run one store operation under the store timeout; every failure becomes StoreUnavailable."""
        loop = asyncio.get_running_loop()
        token = _DEADLINE.set(loop.time() + self.timeout)
        try:
            async with asyncio.timeout(self.timeout):
                return await aw
        except TimeoutError:
            raise StoreUnavailable(f"etcd: no answer within {self.timeout:g} s") from None
        except (aiohttp.ClientError, OSError, _NotFound) as exc:
            raise StoreUnavailable(f"etcd: {exc}") from exc
        except RecordError:
            raise
        except (ValueError, TypeError, AttributeError, LookupError, OverflowError, RecursionError) as exc:
            # an answer of the wrong shape (a list for an object, bad base64, Infinity for an int64):
            # the gateway is a network peer, and nothing is known from such an answer
            raise StoreUnavailable(f"etcd: bad answer: {type(exc).__name__}: {str(exc)[:100]}") from exc
        finally:
            _DEADLINE.reset(token)

    async def _authenticate(self) -> None:
        password = read_secret(self.settings.password_file) or ""
        r = await self._post("auth/authenticate", {"name": self.settings.username, "password": password}, auth=False)
        token = r.get("token")
        if not isinstance(token, str) or not token:
            raise StoreUnavailable("etcd: authentication answered without a token")
        self._token = token

    async def _post(self, path: str, body: Mapping[str, Any], auth: bool = True) -> dict[str, Any]:
        """One gateway call, trying the endpoints in turn until one answers or the deadline passes."""
        loop = asyncio.get_running_loop()
        deadline = _DEADLINE.get(loop.time() + self.timeout)
        if auth and self.settings.username and self._token is None:
            await self._authenticate()
        n = len(self._endpoints)
        start = self._current
        errors: list[str] = []
        reauthed = False
        i = 0
        while i < n:
            idx = (start + i) % n
            left = deadline - loop.time()
            if left <= 0:
                break
            ep = self._endpoints[idx]
            # a black-holed endpoint must not eat the whole budget: share it among those left
            per = max(left / (n - i), min(left, 0.25))
            headers = {"Authorization": self._token} if auth and self._token else {}
            try:
                async with self._get_session().post(
                    f"{ep}/v3/{path}", json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=per)
                ) as resp:
                    status, raw = resp.status, await resp.read()
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                errors.append(f"{ep}: {type(exc).__name__} {exc}".rstrip())
                i += 1
                continue
            try:
                data = json.loads(raw)
                if not isinstance(data, dict):
                    raise ValueError("not an object")
            except (ValueError, RecursionError):
                errors.append(f"{ep}: HTTP {status}, bad answer: not a JSON object: {raw[:100]!r}")
                i += 1
                continue
            if status == 200:
                self._current = idx
                return data
            code, msg = (
                _i(data.get("code")),
                str(data.get("message") or data.get("error") or f"HTTP {status}"),
            )
            if auth and self.settings.username and not reauthed and (code == CODE_UNAUTHENTICATED or "token" in msg):
                # simple tokens expire (5 min by default): get a new one and try again
                reauthed = True
                self._token = None
                await self._authenticate()
                continue
            if code == CODE_NOT_FOUND:
                raise _NotFound(msg)
            if status >= 500:  # no leader, timed out, unavailable: another member may do better
                errors.append(f"{ep}: {msg}")
                i += 1
                continue
            raise StoreUnavailable(f"etcd {ep}: {path}: {msg}")
        raise StoreUnavailable("etcd: no endpoint answered: " + ("; ".join(errors) or "out of time"))

    def _k(self, key: str) -> bytes:
        return self._prefix + key.encode()

    def _kv(self, d: Mapping[str, Any]) -> KV:
        return KV(
            key=unb64(d.get("key"))[len(self._prefix) :].decode("utf-8", "replace"),
            value=unb64(d.get("value")),
            create_revision=_i(d.get("create_revision")),
            mod_revision=_i(d.get("mod_revision")),
            version=_i(d.get("version")),
            lease=_i(d.get("lease")),
        )

    async def _range(self, key: str, prefix: bool = False, **extra: Any) -> tuple[int, list[KV]]:
        """(header revision, kvs) for one key or every key under `key`."""
        body: dict[str, Any] = {"key": b64(self._k(key)), **extra}
        if prefix:
            body["range_end"] = b64(prefix_end(self._k(key)))
        r = await self._post("kv/range", body)
        return _i(r.get("header", {}).get("revision")), [self._kv(x) for x in r.get("kvs", [])]

    async def _get1(self, key: str) -> KV | None:
        _, kvs = await self._range(key)
        return kvs[0] if kvs else None

    def _put_op(self, key: str, value: str, lease: int = 0) -> dict[str, Any]:
        op: dict[str, Any] = {"key": b64(self._k(key)), "value": b64(value)}
        if lease:
            op["lease"] = str(lease)
        return {"request_put": op}

    def _del_op(self, key: str) -> dict[str, Any]:
        return {"request_delete_range": {"key": b64(self._k(key))}}

    def _cmp(self, key: str, target: str, value: int) -> dict[str, Any]:
        field = {"CREATE": "create_revision", "MOD": "mod_revision", "VERSION": "version"}[target]
        return {"key": b64(self._k(key)), "target": target, "result": "EQUAL", field: str(value)}

    async def _txn(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: Sequence[dict[str, Any]] = (),
    ) -> tuple[bool, dict[str, Any]]:
        r = await self._post("kv/txn", {"compare": compare, "success": success, "failure": list(failure)})
        return bool(r.get("succeeded", False)), r

    async def _grant(self, ttl: int) -> tuple[int, int]:
        r = await self._post("lease/grant", {"TTL": str(ttl)})
        lease = _i(r.get("ID"))
        if not lease:
            raise StoreUnavailable(f"etcd: lease grant failed: {r.get('error') or r}")
        return lease, _i(r.get("TTL"))

    async def _keepalive(self, lease: int) -> int:
        """The lease's TTL after the keep-alive; 0 when it had already expired."""
        r = await self._post("lease/keepalive", {"ID": str(lease)})
        return _i(r.get("result", {}).get("TTL"))

    def _revoke_later(self, lease: int) -> None:
        """Give a lease back without making the caller wait; it expires on its own anyway."""

        async def revoke() -> None:
            with contextlib.suppress(StoreUnavailable):  # _op turns every failure into this
                await self._op(self._post("lease/revoke", {"ID": str(lease)}))

        task = asyncio.get_running_loop().create_task(revoke())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _leader_from(self, kv: KV | None, expires_at: float, problems: list[str]) -> LeaderRecord | None:
        if kv is None:
            return None
        if not kv.lease:
            problems.append(f"{KEY_LEADER}: ignored: the key has no lease (written by hand?); it blocks elections")
            return None
        try:
            return decode_leader(kv.value, self.members, expires_at)
        except RecordError as exc:
            problems.append(f"{KEY_LEADER}: ignored: {exc}; it blocks elections until its lease expires")
            return None

    # ---- leader --------------------------------------------------------------------------------

    async def get_leader(self) -> LeaderRecord | None:
        return await self._op(self._get_leader())

    async def _get_leader(self) -> LeaderRecord | None:
        rev, kvs = await self._range(KEY_LEADER)
        problems: list[str] = []
        rec = None
        if kvs:
            kv = kvs[0]
            t0 = time.time()
            rec = self._leader_from(kv, t0, problems)
            if rec is not None:
                r = await self._post("lease/timetolive", {"ID": str(kv.lease)})
                left, granted = _i(r.get("TTL")), _i(r.get("grantedTTL"))
                if left < 0:
                    rec = None  # -1: expired between the two calls; etcd deletes the key now
                else:
                    # etcd keeps no renewal time: infer it from the lease (whole seconds, rounded
                    # down, so 0 means "under a second left" and expires_at errs on the early side)
                    renewed = max(rec.acquired_at, t0 - max(0, granted - left))
                    rec = LeaderRecord(rec.name, rec.epoch, rec.acquired_at, renewed, t0 + left, rec.reason)
        self._leader_seen_rev = rev
        self._report(problems)
        return rec

    async def acquire_leader(
        self, name: str, ttl: float, reason: str, kind: str = "automatic", expect_epoch: int | None = None
    ) -> LeaderRecord | None:
        self._check_member(name)
        acquired_record(None, name, 0.0, reason, kind)  # a bad kind raises before any I/O
        return await self._op(self._acquire(name, ttl_seconds(ttl), reason, kind, expect_epoch))

    def _epoch_from(self, kv: KV | None) -> EpochRecord | None:
        """Raises RecordError on an unreadable record."""
        return None if kv is None else decode_epoch_record(kv.value, self.members)

    async def _acquire(
        self, name: str, ttl: int, reason: str, kind: str, expect_epoch: int | None
    ) -> LeaderRecord | None:
        problems: list[str] = []
        t0 = time.time()
        lease, granted = await self._grant(ttl)
        try:
            for _ in range(ACQUIRE_ROUNDS):
                ekv = await self._get1(KEY_EPOCH)
                try:
                    last = self._epoch_from(ekv)
                except RecordError as exc:
                    problems.append(f"{KEY_EPOCH}: unreadable ({exc}): refusing to hand out an epoch")
                    break
                if expect_epoch is not None and (last.epoch if last else 0) != expect_epoch:
                    break
                now = time.time()
                new = acquired_record(last, name, now, reason, kind)
                epoch = new.epoch
                ok, r = await self._txn(
                    [
                        self._cmp(KEY_LEADER, "CREATE", 0),
                        self._cmp(KEY_EPOCH, "MOD", ekv.mod_revision if ekv else 0),
                    ],
                    [
                        self._put_op(KEY_LEADER, encode_leader(name, epoch, now, now, reason), lease),
                        self._put_op(KEY_EPOCH, encode_epoch_record(new)),
                    ],
                    [{"request_range": {"key": b64(self._k(KEY_LEADER))}}],
                )
                if ok:
                    lease = 0  # ours now: keep it
                    return LeaderRecord(name, epoch, now, now, t0 + granted, reason)
                kvs = r.get("responses", [{}])[0].get("response_range", {}).get("kvs", [])
                if kvs:
                    held = self._kv(kvs[0])
                    if held.lease == lease:
                        # an earlier attempt of this very call went through before its answer was lost
                        lease = 0
                        rec = decode_leader(held.value, self.members, t0 + granted)
                        return rec
                    return None  # somebody holds it (valid or not): lost
                # the key is free but the epoch moved (a release raced us): read it again
            return None
        finally:
            self._report(problems)
            if lease:
                self._revoke_later(lease)

    async def renew_leader(self, name: str, epoch: int, ttl: float) -> LeaderRecord | None:
        return await self._op(self._renew(name, epoch, ttl_seconds(ttl)))

    async def _renew(self, name: str, epoch: int, ttl: int) -> LeaderRecord | None:
        kv = await self._get1(KEY_LEADER)
        t0 = time.time()
        cur = self._leader_from(kv, t0, [])
        if kv is None or cur is None or cur.name != name or cur.epoch != epoch:
            return None
        # while this lease lives nobody else can have created the key, so the keep-alive is the CAS
        left = await self._keepalive(kv.lease)
        if left <= 0:
            return None
        if left < ttl:
            # asked for a longer TTL than the lease has: move the key to a new lease
            new, granted = await self._grant(ttl)
            ok, _ = await self._txn(
                [self._cmp(KEY_LEADER, "MOD", kv.mod_revision)],
                [self._put_op(KEY_LEADER, kv.value.decode(), new)],
            )
            self._revoke_later(kv.lease if ok else new)
            if not ok:
                return None
            left = granted
        return LeaderRecord(name, epoch, cur.acquired_at, t0, t0 + left, cur.reason)

    async def release_leader(self, name: str, epoch: int, reason: str, target: str | None = None) -> bool:
        return await self._op(self._release(name, epoch, reason, target))

    async def _release(self, name: str, epoch: int, reason: str, target: str | None) -> bool:
        kv = await self._get1(KEY_LEADER)
        cur = self._leader_from(kv, 0.0, [])
        if kv is None or cur is None or cur.name != name or cur.epoch != epoch:
            return False
        ekv = await self._get1(KEY_EPOCH)
        try:
            last = self._epoch_from(ekv)
        except RecordError:
            last = None
        ops = [self._del_op(KEY_LEADER)]
        if last is not None and last.epoch == epoch:
            ops.append(self._put_op(KEY_EPOCH, encode_epoch_record(released_record(last, time.time(), reason, target))))
        ok, _ = await self._txn(
            [
                self._cmp(KEY_LEADER, "MOD", kv.mod_revision),
                self._cmp(KEY_EPOCH, "MOD", ekv.mod_revision if ekv else 0),
            ],
            ops,
        )
        if ok:
            self._revoke_later(kv.lease)
        return ok

    async def get_epoch_record(self) -> EpochRecord | None:
        return self._epoch_from(await self._op(self._get1(KEY_EPOCH)))

    # ---- cooldown ------------------------------------------------------------------------------

    async def start_cooldown(self, name: str, epoch: int, ttl: float) -> bool:
        return await self._op(self._start_cooldown(name, epoch, ttl_seconds(ttl)))

    async def _start_cooldown(self, name: str, epoch: int, ttl: int) -> bool:
        kv = await self._get1(KEY_LEADER)
        cur = self._leader_from(kv, 0.0, [])
        if kv is None or cur is None or cur.name != name or cur.epoch != epoch:
            return False
        lease, _ = await self._grant(ttl)
        ok, _ = await self._txn(
            [self._cmp(KEY_LEADER, "MOD", kv.mod_revision)],
            [self._put_op(KEY_COOLDOWN, encode_cooldown(name, epoch, time.time()), lease)],
        )
        if not ok:
            self._revoke_later(lease)
        return ok

    def _cooldown_from(self, kv: KV | None, problems: list[str]) -> Cooldown | None:
        if kv is None:
            return None
        # the lease decides when it ends; the record's own expiry is for display only
        try:
            return decode_cooldown(kv.value, self.members, float("inf"))
        except RecordError as exc:
            problems.append(f"{KEY_COOLDOWN}: unreadable ({exc}); the cooldown counts as on until it expires")
            return Cooldown("", 0, 0.0, float("inf"))

    async def get_cooldown(self) -> Cooldown | None:
        problems: list[str] = []
        cd = self._cooldown_from(await self._op(self._get1(KEY_COOLDOWN)), problems)
        self._report(problems)
        return cd

    # ---- everything a cycle reads, in one transaction ----------------------------------------------

    async def read_state(self) -> StoreState:
        return await self._op(self._read_state())

    async def _read_state(self) -> StoreState:
        def rng(key: str, prefix: bool = False) -> dict[str, Any]:
            body: dict[str, Any] = {"key": b64(self._k(key))}
            if prefix:
                body["range_end"] = b64(prefix_end(self._k(key)))
            return {"request_range": body}

        keys = [KEY_LEADER, KEY_EPOCH, KEY_COOLDOWN]
        ok, r = await self._txn([], [*(rng(k) for k in keys), rng(MEMBERS_DIR, True), rng("flags/", True)])
        responses = r.get("responses")
        if not ok or not isinstance(responses, list) or len(responses) != len(keys) + 2:
            raise StoreUnavailable("etcd: the state read answered something else than five ranges")
        kvs: list[list[KV]] = []
        for resp in responses:
            rr = resp.get("response_range", {}) if isinstance(resp, dict) else {}
            got = rr.get("kvs", []) if isinstance(rr, dict) else []
            if not isinstance(got, list):
                raise StoreUnavailable("etcd: a range answer without a list of keys")
            kvs.append([self._kv(x) for x in got if isinstance(x, dict)])
        leader_kvs, epoch_kvs, cooldown_kvs, member_kvs, flag_kvs = kvs
        self._leader_seen_rev = _i(r.get("header", {}).get("revision"))
        problems: list[str] = []
        leader = self._leader_from(leader_kvs[0] if leader_kvs else None, float("inf"), problems)
        if leader is not None:
            lease_answer = await self._post("lease/timetolive", {"ID": str(leader_kvs[0].lease)})
            left = _i(lease_answer.get("TTL"))
            leader = None if left < 0 else replace(leader, expires_at=time.time() + left)
        epoch: EpochRecord | None = None
        unreadable = False
        try:
            epoch = self._epoch_from(epoch_kvs[0] if epoch_kvs else None)
        except RecordError as exc:
            unreadable = True
            problems.append(f"{KEY_EPOCH}: unreadable ({exc}); no bootstrap and no election until repaired")
        cooldown = self._cooldown_from(cooldown_kvs[0] if cooldown_kvs else None, problems)
        members = self._members_from(member_kvs)
        problems.extend(members.rejected)
        by_key = {kv.key: kv.value for kv in flag_kvs}
        flags = decode_flags(
            by_key.get(KEY_PAUSED), by_key.get(KEY_SWITCHOVER), by_key.get(KEY_COOLDOWN_ACK), self.members, problems
        )
        self._report(problems)
        return StoreState(leader, epoch, unreadable, members, flags, cooldown, tuple(problems))

    # ---- members -------------------------------------------------------------------------------

    async def put_member(self, name: str, payload: Mapping[str, Any], ttl: float) -> None:
        self._check_member(name)
        value = encode_member(name, payload, time.time())
        await self._op(self._put_member(name, value, ttl_seconds(ttl)))

    async def _put_member(self, name: str, value: str, ttl: int) -> None:
        # one lease per member, kept alive, instead of a new lease per write
        lease = 0
        known = self._member_leases.get(name)
        if known is not None:
            if known[1] == ttl and await self._keepalive(known[0]) > 0:
                lease = known[0]
            else:
                self._revoke_later(known[0])
        for _ in range(2):
            if not lease:
                lease, _granted = await self._grant(ttl)
                self._member_leases[name] = (lease, ttl)
            try:
                await self._post(
                    "kv/put",
                    {"key": b64(self._k(MEMBERS_DIR + name)), "value": b64(value), "lease": str(lease)},
                )
                return
            except _NotFound:
                lease = 0  # expired between keep-alive and put
        raise StoreUnavailable("etcd: member lease keeps vanishing")

    async def get_members(self) -> MembersSnapshot:
        _, kvs = await self._op(self._range(MEMBERS_DIR, prefix=True))
        snap = self._members_from(kvs)
        self._report(snap.rejected)
        return snap

    def _members_from(self, kvs: Sequence[KV]) -> MembersSnapshot:
        records: dict[str, MemberRecord] = {}
        rejected: list[str] = []
        for kv in kvs:
            name = kv.key[len(MEMBERS_DIR) :]
            try:
                records[name] = decode_member(name, kv.value, self.members)
            except RecordError as exc:
                rejected.append(f"{kv.key}: ignored: {exc}")
        return MembersSnapshot(records=records, rejected=tuple(rejected))

    # ---- CRL block -----------------------------------------------------------------------------

    async def put_crl_block(self, name: str, epoch: int, lines: Sequence[str]) -> bool:
        encode_crl(name, epoch, lines, 0.0)  # type errors before any I/O
        return await self._op(self._put_crl(name, epoch, lines))

    async def _put_crl(self, name: str, epoch: int, lines: Sequence[str]) -> bool:
        kv = await self._get1(KEY_LEADER)
        cur = self._leader_from(kv, 0.0, [])
        if kv is None or cur is None or cur.name != name or cur.epoch != epoch:
            return False
        ok, _ = await self._txn(
            [self._cmp(KEY_LEADER, "MOD", kv.mod_revision)],
            [self._put_op(KEY_CRL, encode_crl(name, epoch, lines, time.time()))],
        )
        return ok

    async def get_crl_block(self) -> CRLBlock | None:
        kv = await self._op(self._get1(KEY_CRL))
        problems: list[str] = []
        block = None
        if kv is not None:
            try:
                block = decode_crl(kv.value, self.members)
            except RecordError as exc:
                problems.append(f"{KEY_CRL}: ignored: {exc}")
        self._report(problems)
        return block

    # ---- flags ---------------------------------------------------------------------------------

    async def get_flags(self) -> Flags:
        _, kvs = await self._op(self._range("flags/", prefix=True))
        by_key = {kv.key: kv.value for kv in kvs}
        problems: list[str] = []
        flags = decode_flags(
            by_key.get(KEY_PAUSED),
            by_key.get(KEY_SWITCHOVER),
            by_key.get(KEY_COOLDOWN_ACK),
            self.members,
            problems,
        )
        self._report(problems)
        return flags

    async def set_paused(self, paused: bool) -> None:
        if paused:
            # keep the first pause time: write only if the key does not exist
            await self._op(
                self._txn([self._cmp(KEY_PAUSED, "VERSION", 0)], [self._put_op(KEY_PAUSED, encode_at(time.time()))])
            )
        else:
            await self._op(self._post("kv/deleterange", {"key": b64(self._k(KEY_PAUSED))}))

    async def request_switchover(self, target: str, kind: SwitchoverKind, requested_by: str) -> SwitchoverRequest:
        self._check_member(target, "target")
        if kind not in ("switchover", "failover"):
            raise ValueError(f"kind must be switchover or failover, not {kind!r}")
        req = SwitchoverRequest(
            id=uuid.uuid4().hex, target=target, kind=kind, requested_at=time.time(), requested_by=requested_by
        )
        await self._op(
            self._post("kv/put", {"key": b64(self._k(KEY_SWITCHOVER)), "value": b64(encode_switchover(req))})
        )
        return req

    async def clear_switchover(self, request_id: str | None = None) -> None:
        await self._op(self._clear_switchover(request_id))

    async def _clear_switchover(self, request_id: str | None) -> None:
        if request_id is None:
            await self._post("kv/deleterange", {"key": b64(self._k(KEY_SWITCHOVER))})
            return
        kv = await self._get1(KEY_SWITCHOVER)
        if kv is None:
            return
        try:
            current_id: str | None = decode_switchover(kv.value, self.members).id
        except RecordError:
            current_id = None  # unreadable: nobody can honour it, clearing it is safe
        if current_id is not None and current_id != request_id:
            return  # a newer request replaced the one being cleared
        await self._txn([self._cmp(KEY_SWITCHOVER, "MOD", kv.mod_revision)], [self._del_op(KEY_SWITCHOVER)])

    async def ack_cooldown(self) -> float:
        now = time.time()
        await self._op(self._txn([], [self._put_op(KEY_COOLDOWN_ACK, encode_at(now)), self._del_op(KEY_COOLDOWN)]))
        return now

    # ---- history -------------------------------------------------------------------------------

    async def append_history(self, event: Mapping[str, Any]) -> HistoryEvent:
        now = time.time()
        value = encode_history(now, event)
        return await self._op(self._append_history(now, value, json.loads(dumps(event))))

    async def _append_history(self, now: float, value: str, event: dict[str, Any]) -> HistoryEvent:
        key = f"{HISTORY_DIR}{time.time_ns():020d}"
        r = await self._post("kv/put", {"key": b64(self._k(key)), "value": b64(value)})
        seq = _i(r.get("header", {}).get("revision"))  # = the new key's create revision
        await self._trim_history()
        return HistoryEvent(seq=seq, at=now, event=event)

    async def _trim_history(self) -> None:
        r = await self._post(
            "kv/range",
            {
                "key": b64(self._k(HISTORY_DIR)),
                "range_end": b64(prefix_end(self._k(HISTORY_DIR))),
                "count_only": True,
            },
        )
        extra = _i(r.get("count")) - HISTORY_KEEP
        if extra <= 0:
            return
        _, old = await self._range(
            HISTORY_DIR,
            prefix=True,
            keys_only=True,
            sort_order="ASCEND",
            sort_target="CREATE",
            limit=str(min(extra, 100)),
        )
        if old:
            await self._txn([], [self._del_op(kv.key) for kv in old])

    async def get_history(self, limit: int = 50) -> list[HistoryEvent]:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit}")
        _, kvs = await self._op(
            self._range(HISTORY_DIR, prefix=True, sort_order="DESCEND", sort_target="CREATE", limit=str(limit))
        )
        out: list[HistoryEvent] = []
        problems: list[str] = []
        for kv in reversed(kvs):
            try:
                out.append(decode_history(kv.create_revision, kv.value))
            except RecordError as exc:
                problems.append(f"{kv.key}: ignored: {exc}")
        self._report(problems)
        return out

    # ---- promotion journal ---------------------------------------------------------------------

    async def put_step(self, name: str, step: Mapping[str, Any] | None) -> None:
        self._check_member(name)
        key = b64(self._k(STEPS_DIR + name))
        if step is None:
            await self._op(self._post("kv/deleterange", {"key": key}))
        else:
            await self._op(self._post("kv/put", {"key": key, "value": b64(dumps(step))}))

    async def get_step(self, name: str) -> dict[str, Any] | None:
        kv = await self._op(self._get1(STEPS_DIR + name))
        problems: list[str] = []
        step = None
        if kv is not None:
            try:
                step = decode_step(kv.value)
            except RecordError as exc:
                problems.append(f"{kv.key}: ignored: {exc}")
        self._report(problems)
        return step

    # ---- doctor --------------------------------------------------------------------------------

    async def put_doctor_token(self, name: str, token: str, ttl: float) -> None:
        self._check_member(name)
        await self._op(self._put_doctor_token(name, token, ttl_seconds(ttl)))

    async def _put_doctor_token(self, name: str, token: str, ttl: int) -> None:
        lease, _granted = await self._grant(ttl)  # left to expire: nothing to clean up
        await self._post("kv/put", {"key": b64(self._k(DOCTOR_DIR + name)), "value": b64(token), "lease": str(lease)})

    async def get_doctor_token(self, name: str) -> str | None:
        kv = await self._op(self._get1(DOCTOR_DIR + name))
        return None if kv is None else kv.value.decode("utf-8", "replace")

    # ---- watch / close -------------------------------------------------------------------------

    async def watch_leader(self, timeout: float) -> None:
        """An etcd watch on the leader key from just after the revision the last get_leader() saw,
        so a change in between is not missed; lease expiry arrives as a DELETE event."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        create: dict[str, Any] = {"key": b64(self._k(KEY_LEADER))}
        if self._leader_seen_rev:
            create["start_revision"] = str(self._leader_seen_rev + 1)
        if self.settings.username and self._token is None:
            await self._op(self._authenticate())
        n = len(self._endpoints)
        errors: list[str] = []
        for i in range(n):
            idx = (self._current + i) % n
            ep = self._endpoints[idx]
            headers = {"Authorization": self._token} if self._token else {}
            connect = max(0.05, min(self.timeout / n, deadline - loop.time()))
            try:
                async with self._get_session().post(
                    f"{ep}/v3/watch",
                    json={"create_request": create},
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=None, connect=connect, sock_read=None),
                ) as resp:
                    if resp.status != 200:
                        errors.append(f"{ep}: HTTP {resp.status}")
                        continue
                    try:
                        async with asyncio.timeout_at(deadline):
                            await self._watch_stream(resp)
                    except TimeoutError:
                        pass
                    return
            except (aiohttp.ClientError, HttpProcessingError, TimeoutError, OSError) as exc:
                # HttpProcessingError: a watch line longer than aiohttp reads (LineTooLong)
                errors.append(f"{ep}: {type(exc).__name__} {str(exc)[:200]}".rstrip())
        raise StoreUnavailable("etcd: watch failed: " + "; ".join(errors))

    @staticmethod
    async def _watch_stream(resp: aiohttp.ClientResponse) -> None:
        """Return at the first event (or cancellation: a compacted start revision means we are behind)."""
        while True:
            line = await resp.content.readline()
            if not line:
                raise aiohttp.ClientPayloadError("watch stream closed")
            try:
                msg = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if not isinstance(msg, dict):
                continue
            if "error" in msg:
                raise aiohttp.ClientPayloadError(f"watch: {str(msg['error'])[:200]}")
            result = msg.get("result")
            if isinstance(result, dict) and (result.get("events") or result.get("canceled")):
                return

    async def close(self) -> None:
        # member records are left to expire, as with sqlite: a stopped daemon is not a stopped CA
        if self._background:
            await asyncio.wait(list(self._background), timeout=self.timeout)
        self._member_leases.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None


__all__ = ["KV", "EtcdStore", "b64", "prefix_end", "unb64"]
