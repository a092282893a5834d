"""Issue 10, finding 7: a hostile or broken etcd gateway answer is StoreUnavailable, never another exception.

The real EtcdStore talks to a fake JSON gateway on loopback that answers every call with the same
body: deep JSON (RecursionError in json.loads), JSON of the wrong shape ([] where an object is
expected, a list for `header`, strings for `kvs`), numbers the gateway never sends (Infinity, a
non-ASCII digit) and bad base64. Anything but StoreUnavailable (or get_epoch_record's own
RecordError) would end a cycle or the lease renewer instead of counting as a store outage, the case
the failsafe is for; a watch stream of such lines must end the watch like an empty one, not raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from ca_watchdog.config import EtcdSettings
from ca_watchdog.store.base import RecordError, Store, StoreUnavailable
from ca_watchdog.store.etcd import EtcdStore

MEMBERS = ("ca1", "ca2")
B64_LEASE_KEY = {"key": "L2NhLXdhdGNoZG9nL2xlYWRlcg==", "value": "e30=", "lease": "7", "mod_revision": "3"}

HOSTILE: dict[str, bytes] = {
    "deep-list": b"[" * 100_000 + b"]" * 100_000,
    "deep-object": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "a-list": b"[]",
    "header-a-list": b'{"header": [], "kvs": [], "succeeded": true, "responses": []}',
    "kvs-strings": b'{"header": {"revision": "1"}, "kvs": ["x", "y"]}',
    "kvs-an-object": b'{"header": {"revision": "1"}, "kvs": {"key": 1}}',
    "infinity": b'{"header": {"revision": Infinity}, "kvs": [], "TTL": Infinity, "ID": Infinity, "count": Infinity}',
    "superscript-digit": b'{"header": {"revision": "\xc2\xb2"}, "ID": "\xc2\xb2", "TTL": "\xc2\xb2"}',
    "bad-base64": b'{"header": {"revision": "1"}, "kvs": [{"key": "abc", "value": "a", "lease": "7"}]}',
    "key-not-a-string": json.dumps({"header": {"revision": "1"}, "kvs": [{**B64_LEASE_KEY, "value": 12}]}).encode(),
    "result-a-list": b'{"result": [], "ID": "7", "TTL": "30", "header": {"revision": "1"}}',
    "responses-odd": b'{"succeeded": false, "responses": [[], 1, "x"], "header": {"revision": "1"}}',
    "responses-empty-objects": b'{"succeeded": false, "responses": [], "header": {"revision": "1"}}',
}


class Gateway:
    """A fake etcd JSON gateway: every POST gets `body` (HTTP 200); /v3/watch streams it as a line."""

    def __init__(self) -> None:
        self.body = b"{}"
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def answer(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        if request.path == "/v3/watch":
            resp = web.StreamResponse()
            await resp.prepare(request)
            await resp.write(self.body.replace(b"\n", b" ") + b"\n")
            await asyncio.sleep(0.2)
            return resp
        return web.Response(body=self.body, content_type="application/json")

    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/{tail:.*}", self.answer)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    g = Gateway()
    await g.start()
    try:
        yield g
    finally:
        await g.stop()


CALLS: dict[str, Callable[[Store], Awaitable[Any]]] = {
    "read_state": lambda s: s.read_state(),
    "get_leader": lambda s: s.get_leader(),
    "acquire_leader": lambda s: s.acquire_leader("ca1", 30.0, "test"),
    "renew_leader": lambda s: s.renew_leader("ca1", 1, 30.0),
    "release_leader": lambda s: s.release_leader("ca1", 1, "test"),
    "get_epoch_record": lambda s: s.get_epoch_record(),
    "start_cooldown": lambda s: s.start_cooldown("ca1", 1, 30.0),
    "get_cooldown": lambda s: s.get_cooldown(),
    "put_member": lambda s: s.put_member("ca1", {"cs_cfg_role": "clone"}, 30.0),
    "get_members": lambda s: s.get_members(),
    "put_crl_block": lambda s: s.put_crl_block("ca1", 1, ["ca.crl.MasterCRL.enable=true"]),
    "get_crl_block": lambda s: s.get_crl_block(),
    "get_flags": lambda s: s.get_flags(),
    "set_paused": lambda s: s.set_paused(True),
    "clear_switchover": lambda s: s.clear_switchover("x"),
    "ack_cooldown": lambda s: s.ack_cooldown(),
    "append_history": lambda s: s.append_history({"type": "test"}),
    "get_history": lambda s: s.get_history(10),
    "get_step": lambda s: s.get_step("ca1"),
    "get_doctor_token": lambda s: s.get_doctor_token("ca1"),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
async def test_finding7_a_hostile_etcd_gateway_answer_is_store_unavailable_never_another_exception(
    gateway: Gateway, kind: str
) -> None:
    gateway.body = HOSTILE[kind]
    store = EtcdStore(EtcdSettings((f"http://127.0.0.1:{gateway.port}",)), MEMBERS, 2.0)
    escaped: dict[str, str] = {}
    try:
        for name, call in CALLS.items():
            try:
                await call(store)
            except (StoreUnavailable, RecordError) as exc:  # RecordError: get_epoch_record's own
                assert len(str(exc)) < 1000, (name, str(exc)[:200])
            except Exception as exc:  # what the test looks for
                escaped[name] = f"{type(exc).__name__}: {str(exc)[:100]}"
    finally:
        await store.close()
    assert escaped == {}, f"{kind}: {escaped}"


@pytest.mark.parametrize("kind", list(HOSTILE))
async def test_finding7_a_hostile_etcd_watch_stream_ends_the_watch_without_another_exception(
    gateway: Gateway, kind: str
) -> None:
    gateway.body = HOSTILE[kind]
    store = EtcdStore(EtcdSettings((f"http://127.0.0.1:{gateway.port}",)), MEMBERS, 2.0)
    try:
        with contextlib.suppress(StoreUnavailable):
            await store.watch_leader(1.0)
    finally:
        await store.close()
