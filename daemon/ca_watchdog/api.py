"""HTTP endpoints (aiohttp): health checks for HAProxy, cluster JSON, history, metrics, control.

Reads are open; anything that changes state needs TLS with a client certificate signed by the
configured CA (`api.client_ca_file`). Without TLS configured, state-changing calls are refused.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .decide import UNMANAGED
from .model import CA_RUNNING, ClusterView, Decision
from .store.base import StoreUnavailable

if TYPE_CHECKING:
    from .loop import Watchdog

WATCHDOG_KEY: web.AppKey[Watchdog] = web.AppKey("watchdog")


def cluster_json(view: ClusterView | None, decision: Decision | None, at: float) -> dict[str, Any]:
    if view is None:
        return {"ready": False}
    states = {view.me: view.local, **view.records}
    members = []
    for m in view.members:
        st = states.get(m.name)
        members.append(
            {
                "name": m.name,
                "priority": m.priority,
                "nofailover": m.nofailover,
                "fresh": st is not None,
                "leader": bool(view.leader and view.leader.name == m.name),
                **(st.to_payload() if st is not None else {}),
            }
        )
    return {
        "ready": True,
        "reported_by": view.me,
        "at": at,
        "leader": {"name": view.leader.name, "epoch": view.leader.epoch, "expires_at": view.leader.expires_at}
        if view.leader
        else None,
        "previous_leader": view.memory.previous_leader,
        "master_unmanaged": bool(decision and decision.reason.startswith(UNMANAGED)),
        "paused": view.control.paused,
        "switchover": {"target": view.control.switchover_target, "kind": view.control.switchover_kind}
        if view.control.switchover_target
        else None,
        "store_ok": view.store_ok,
        "decision": {"action": decision.action.value, "reason": decision.reason} if decision else None,
        "members": members,
        "problems": list(view.problems),
    }


def _wd(request: web.Request) -> Watchdog:
    return request.app[WATCHDOG_KEY]


def _status(ok: bool, text: str) -> web.Response:
    return web.json_response({"ok": ok, "detail": text}, status=200 if ok else 503)


async def health(request: web.Request) -> web.Response:
    v = _wd(request).snapshot.view
    ok = v is not None and v.local.ca_status == CA_RUNNING
    return _status(ok, f"local CA {v.local.ca_status if v else 'not observed yet'}")


async def master(request: web.Request) -> web.Response:
    v = _wd(request).snapshot.view
    ok = bool(
        v and v.leader and v.leader.name == v.me and v.local.cscfg_role == "master" and v.local.ca_status == CA_RUNNING
    )
    return _status(ok, "master" if ok else "not the serving master")


async def clone(request: web.Request) -> web.Response:
    v = _wd(request).snapshot.view
    ok = bool(v and v.local.cscfg_role == "clone" and v.local.ca_status == CA_RUNNING)
    return _status(ok, "clone" if ok else "not a serving clone")


async def cluster(request: web.Request) -> web.Response:
    s = _wd(request).snapshot
    return web.json_response(cluster_json(s.view, s.decision, s.at))


async def history(request: web.Request) -> web.Response:
    wd = _wd(request)
    try:
        events = await asyncio.wait_for(wd.store.get_history(200), wd.s.timing.store_timeout + 0.5)
    except (StoreUnavailable, TimeoutError):
        return web.json_response(wd.snapshot.history, headers={"X-CA-Watchdog-Stale": "store unreachable"})
    return web.json_response([{"seq": e.seq, "at": e.at, **e.event} for e in events])


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(_wd(request).metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _client(request: web.Request) -> str:
    """The verified client certificate's subject CN; raise 403 without one."""
    if request.transport is None or request.transport.get_extra_info("sslcontext") is None:
        raise web.HTTPForbidden(text="state-changing calls need TLS with a client certificate\n")
    cert = request.transport.get_extra_info("peercert")
    if not cert:
        raise web.HTTPForbidden(text="a client certificate signed by the configured CA is required\n")
    for rdn in cert.get("subject", ()):
        for k, val in rdn:
            if k == "commonName":
                return str(val)
    return "client-certificate"


async def failsafe(request: web.Request) -> web.Response:
    """Whom this member follows and whether it reaches the store (a master's failsafe check)."""
    _client(request)
    wd = _wd(request)
    leader = wd.last_leader_seen
    return web.json_response(
        {
            "member": wd.me,
            "store_ok": wd.store_ok,
            "leader": leader[0] if leader else None,
            "epoch": leader[1] if leader else None,
        }
    )


async def _control(request: web.Request, action: str) -> web.Response:
    who = _client(request)
    wd = _wd(request)
    store = wd.store
    try:
        if action in ("switchover", "failover"):
            body = await request.json() if request.can_read_body else {}
            target = body.get("to") if isinstance(body, dict) else None
            if not isinstance(target, str) or target not in {m.name for m in wd.members}:
                raise web.HTTPBadRequest(text='body must be {"to": "<member name>"}\n')
            await store.request_switchover(target, action, who)  # type: ignore[arg-type]
            detail = f"{action} to {target} requested by {who}"
        elif action in ("pause", "resume"):
            await store.set_paused(action == "pause")
            detail = f"{action}d by {who}"
        else:
            await store.ack_cooldown()
            detail = f"last failover acknowledged by {who}"
        await store.append_history({"type": action, "by": who, "detail": detail})
    except StoreUnavailable as exc:
        raise web.HTTPServiceUnavailable(text=f"store unreachable: {exc}\n") from exc
    wd.wake()
    return web.json_response({"ok": True, "detail": detail})


def make_app(wd: Watchdog) -> web.Application:
    app = web.Application()
    app[WATCHDOG_KEY] = wd
    app.router.add_get("/health", health)
    app.router.add_get("/master", master)
    app.router.add_get("/clone", clone)
    app.router.add_get("/cluster", cluster)
    app.router.add_get("/history", history)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/failsafe", failsafe)
    for action in ("switchover", "failover", "pause", "resume", "ack"):

        async def handler(request: web.Request, action: str = action) -> web.Response:
            return await _control(request, action)

        app.router.add_post(f"/{action}", handler)
    return app


def server_ssl_context(cert_file: str, key_file: str, client_ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        # optional: reads work without a certificate, control calls check for one
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(client_ca_file)
    return ctx


async def start_api(wd: Watchdog) -> web.AppRunner:
    a = wd.s.api
    runner = web.AppRunner(make_app(wd), access_log=None)
    await runner.setup()
    ctx = server_ssl_context(a.cert_file, a.key_file, a.client_ca_file) if a.cert_file and a.key_file else None
    site = web.TCPSite(runner, a.listen_host, a.listen_port, ssl_context=ctx, shutdown_timeout=2.0)
    await site.start()
    return runner
