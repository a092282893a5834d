"""HTTP endpoints (aiohttp): health checks for HAProxy, cluster JSON, history, metrics, control.

Reads are open (GET, HEAD; OPTIONS on /health, /master and /clone answers like GET, for HAProxy's
default `option httpchk`). /health, /master and /clone answer from the current state, not from the
last completed cycle: the lease as the actuator holds it now and the local CA and CS.cfg as last
observed (a key just taken or released shows at once).

Anything that changes state needs TLS with a client certificate that chains to `api.client_ca_file`,
carries the clientAuth extended key usage, is not revoked by `api.crl_file` (when set) and is
allow-listed: `api.operators` may call everything, `api.peers` only `/failsafe`. A POST must say
`Content-Type: application/json` and carry no foreign `Origin` (else 403), so a browser
cannot be made to send one.

Hostile clients: at most `api.max_connections` connections (a new one evicts the oldest that has no
request in progress), each closed when no request head arrives within `api.request_head_timeout`
(TLS handshakes included); refused connections and accept errors are logged at most once a minute.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .decide import UNMANAGED
from .model import CA_RUNNING, ClusterView, Decision
from .store.base import StoreUnavailable

if TYPE_CHECKING:
    from cryptography import x509

    from .loop import Watchdog

log = logging.getLogger(__name__)

WATCHDOG_KEY: web.AppKey[Watchdog] = web.AppKey("watchdog")
GATE_KEY: web.AppKey[ConnectionGate] = web.AppKey("gate")
MAX_BODY = 64 * 1024


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


def serving_master(wd: Watchdog) -> bool:
    """This member serves as master now: it holds the leader key (renewed, not past its fence point),
    no action is stopping or starting its CA (the last probe may predate the stop: a promotion writes
    the master CS.cfg while the clone's last "running" is still the newest answer), its CS.cfg is
    master and its CA was running when last probed. What /master and the metric
    ca_watchdog_serving_master say."""
    local = wd.last_local
    return (
        wd.actuator.lease_age() is not None
        and not wd.actuator.fence_overdue()
        and wd.actuator.acting is None
        and local is not None
        and local.cscfg_role == "master"
        and local.ca_status == CA_RUNNING
    )


async def health(request: web.Request) -> web.Response:
    local = _wd(request).last_local
    ok = local is not None and local.ca_status == CA_RUNNING
    return _status(ok, f"local CA {local.ca_status if local else 'not observed yet'}")


async def master(request: web.Request) -> web.Response:
    ok = serving_master(_wd(request))
    return _status(ok, "master" if ok else "not the serving master")


async def clone(request: web.Request) -> web.Response:
    local = _wd(request).last_local
    ok = local is not None and local.cscfg_role == "clone" and local.ca_status == CA_RUNNING
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


# ---- who may change state ---------------------------------------------------------------------------


class _CRLCache:
    """The CRL of `api.crl_file`, reloaded when the file changes; its signature checked against the
    client CA bundle."""

    def __init__(self) -> None:
        self.key: tuple[str, int, int] | None = None
        self.crl: x509.CertificateRevocationList | None = None

    def get(self, crl_file: str, client_ca_file: str) -> x509.CertificateRevocationList:
        st = os.stat(crl_file)
        key = (crl_file, st.st_mtime_ns, st.st_size)
        if self.key != key or self.crl is None:
            self.crl, self.key = load_crl(crl_file, client_ca_file), key
        return self.crl


def load_crl(crl_file: str, client_ca_file: str) -> x509.CertificateRevocationList:
    """A PEM or DER CRL signed by one of the certificates of the client CA bundle; ValueError if not."""
    from cryptography import x509

    try:
        data = open(crl_file, "rb").read()  # noqa: SIM115 (a small file, read once)
        cas = x509.load_pem_x509_certificates(open(client_ca_file, "rb").read())  # noqa: SIM115
    except OSError as exc:
        raise ValueError(f"cannot read {exc.filename!r}: {exc.strerror}") from exc
    try:
        crl = (
            x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----BEGIN") else x509.load_der_x509_crl(data)
        )
    except ValueError as exc:
        raise ValueError(f"{crl_file!r} is not a PEM or DER CRL") from exc
    for ca in cas:
        if ca.subject == crl.issuer:
            try:
                if crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
                    return crl
            except TypeError:
                continue
    raise ValueError(f"{crl_file!r} is not signed by a CA of api.client_ca_file")


_crl_cache = _CRLCache()


def _peer_certificate(request: web.Request) -> x509.Certificate:
    from cryptography import x509

    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        raise web.HTTPForbidden(text="state-changing calls need TLS with a client certificate\n")
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise web.HTTPForbidden(text="a client certificate signed by the configured CA is required\n")
    return x509.load_der_x509_certificate(der)


def _authorize(request: web.Request, role: str) -> str:
    """The caller's name (certificate CN) if its certificate may do what `role` may ("operator":
    everything, "peer": /failsafe); 403 otherwise."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    a = _wd(request).s.api
    cert = _peer_certificate(request)
    dn = cert.subject.rfc4514_string()
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise web.HTTPForbidden(text=f"the client certificate ({dn}) lacks the clientAuth extended key usage\n")
    fingerprint = "sha256:" + cert.fingerprint(hashes.SHA256()).hex()
    ids = {dn, fingerprint}
    is_operator = bool(ids & set(a.operators))
    is_peer = bool(ids & set(a.peers))
    if not (is_operator or (role == "peer" and is_peer)):
        _refusals.note(f"API: refused {request.method} {request.path} from {dn} ({fingerprint})")
        if is_peer:
            raise web.HTTPForbidden(text=f"{dn} is listed in api.peers, which may call /failsafe only\n")
        listed = "api.operators" if role == "operator" else "api.operators or api.peers"
        raise web.HTTPForbidden(text=f"{dn} ({fingerprint}) is not listed in {listed}\n")
    if a.crl_file and a.client_ca_file:
        try:
            crl = _crl_cache.get(a.crl_file, a.client_ca_file)
        except (OSError, ValueError) as exc:
            log.warning("API: api.crl_file unusable, refusing state-changing calls: %s", exc)
            raise web.HTTPForbidden(text="the revocation list (api.crl_file) is unusable\n") from exc
        next_update = crl.next_update_utc
        if next_update is not None and next_update < dt.datetime.now(dt.UTC):
            raise web.HTTPForbidden(text="the revocation list (api.crl_file) is out of date\n")
        if cert.issuer != crl.issuer:
            raise web.HTTPForbidden(text=f"api.crl_file is not the CRL of the issuer of {dn}\n")
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise web.HTTPForbidden(text=f"the client certificate {dn} is revoked\n")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else dn


async def failsafe(request: web.Request) -> web.Response:
    """Whom this member follows and whether it reaches the store (a master's failsafe check)."""
    _authorize(request, "peer")
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


async def _json_body(request: web.Request) -> Any:
    if not request.can_read_body:
        return None
    raw = await request.read()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise web.HTTPBadRequest(text="the body is not valid JSON\n") from exc


async def _control(request: web.Request, action: str) -> web.Response:
    from . import control

    who = _authorize(request, "operator")
    wd = _wd(request)
    body = await _json_body(request)
    try:
        if action in ("switchover", "failover"):
            target = body.get("to") if isinstance(body, dict) else None
            if not isinstance(target, str):
                raise web.HTTPBadRequest(text='body must be {"to": "<member name>"}\n')
            result = await control.request_switchover(wd.s, wd.store, target, action, who)
            detail = result if result.startswith(target + " is already") else f"{action} to {target} requested by {who}"
        else:
            await control.set_flag(wd.store, action, who)
            detail = {
                "pause": f"paused by {who}",
                "resume": f"resumed by {who}",
                "ack": f"last failover acknowledged by {who}",
            }[action]
    except control.RequestRefused as exc:
        error = web.HTTPBadRequest if exc.status == 400 else web.HTTPConflict
        raise error(text=f"{exc}\n") from exc
    except StoreUnavailable as exc:
        raise web.HTTPServiceUnavailable(text=f"store unreachable: {exc}\n") from exc
    log.info("API: %s", detail)
    wd.wake()
    return web.json_response({"ok": True, "detail": detail})


# ---- cross-site requests, connection accounting -------------------------------------------------------


@web.middleware
async def _middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    gate = request.app.get(GATE_KEY)
    conn = gate.connection(request.transport) if gate is not None else None
    if conn is not None:
        conn.active += 1
        conn.requests += 1
    try:
        if request.method == "POST":
            _same_origin_json(request)
        return await handler(request)
    finally:
        if conn is not None:
            conn.active -= 1


def _same_origin_json(request: web.Request) -> None:
    """A browser can send a "simple" cross-site POST (text/plain, form) with the user's client
    certificate; it cannot send application/json to another origin without a CORS preflight,
    which this API never grants. So: JSON only and no foreign Origin; anything else is refused as a possible
    cross-site request (403, like an unlisted certificate: the caller is not allowed to change anything)."""
    if request.content_type != "application/json":
        raise web.HTTPForbidden(text="refused: state-changing calls need Content-Type: application/json\n")
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise web.HTTPForbidden(text=f"cross-origin request from {origin[:100]!r} refused\n")
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        raise web.HTTPForbidden(text="cross-site request refused\n")


class _RateLimited:
    """One log line per `every` seconds per kind, saying how many were suppressed."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self.last: dict[str, float] = {}
        self.suppressed: collections.Counter[str] = collections.Counter()

    def note(self, message: str, kind: str | None = None) -> None:
        kind = kind or message
        now = time.monotonic()
        if now - self.last.get(kind, -1e9) < self.every:
            self.suppressed[kind] += 1
            return
        more = self.suppressed.pop(kind, 0)
        self.last[kind] = now
        if len(self.last) > 1000:  # a flood of distinct kinds must not grow memory
            self.last.clear()
        log.warning("%s%s", message, f" (and {more} more in the last {self.every:g} s)" if more else "")


_refusals = _RateLimited()


class _Conn(asyncio.Protocol):
    """One accepted connection: counted from accept, TLS done with loop.start_tls under the head
    timeout, then handed to aiohttp's request handler."""

    def __init__(self, gate: ConnectionGate) -> None:
        self.gate = gate
        self.handler: asyncio.Protocol = gate.new_handler()
        self.raw: asyncio.Transport | None = None
        self.transport: asyncio.BaseTransport | None = None
        self.active = 0
        self.requests = 0
        self.seen = 0
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.gone = False
        # what TLS decrypted before start_tls() returned (the request can come with the handshake)
        self.early: list[bytes] = []
        self.early_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.raw = transport
        if not self.gate.admit(self):
            self.gone = True
            transport.abort()
            return
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.gate.head_timeout, self._check)
        if self.gate.ssl_context is None:
            self._attach(transport)
        else:
            self.task = loop.create_task(self._handshake(transport, self.gate.ssl_context))

    async def _handshake(self, raw: asyncio.Transport, ctx: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                raw, self, ctx, server_side=True, ssl_handshake_timeout=self.gate.head_timeout
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError, asyncio.CancelledError):
            tls = None
        if tls is None or self.gone:
            self.abort()
            return
        self._attach(tls)

    def _attach(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.gate.by_transport[transport] = self
        self.handler.connection_made(transport)
        early, self.early = self.early, []
        for data in early:
            self.handler.data_received(data)
        if self.early_eof and not self.handler.eof_received():
            transport.close()

    def _check(self) -> None:
        """No new request head since the last check and none in progress: close."""
        if self.gone:
            return
        if self.active == 0 and self.requests == self.seen:
            self.abort()
            return
        self.seen = self.requests
        self.timer = asyncio.get_running_loop().call_later(self.gate.head_timeout, self._check)

    def abort(self) -> None:
        if isinstance(self.transport, asyncio.Transport):
            self.transport.abort()
        if self.raw is not None:
            self.raw.abort()
        self._gone()

    def _gone(self) -> None:
        if self.gone:
            return
        self.gone = True
        if self.timer is not None:
            self.timer.cancel()
        self.gate.release(self)

    # aiohttp's handler does the HTTP
    def data_received(self, data: bytes) -> None:
        if self.transport is not None:
            self.handler.data_received(data)
        elif sum(map(len, self.early)) < MAX_BODY:
            self.early.append(data)

    def eof_received(self) -> bool | None:
        if self.transport is None:
            self.early_eof = True
            return True  # keep the transport open until the handler has seen the data
        return self.handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.handler.connection_lost(exc)
        self._gone()

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.handler.resume_writing()


class ConnectionGate:
    """The connection cap and the request-head timeout of one listener."""

    def __init__(
        self, new_handler: Callable[[], Any], ssl_context: ssl.SSLContext | None, cap: int, head_timeout: float
    ) -> None:
        self.new_handler = new_handler
        self.ssl_context = ssl_context
        self.cap = cap
        self.head_timeout = head_timeout
        self.conns: collections.OrderedDict[_Conn, None] = collections.OrderedDict()
        self.by_transport: dict[asyncio.BaseTransport, _Conn] = {}

    def __call__(self) -> _Conn:
        return _Conn(self)

    def connection(self, transport: asyncio.BaseTransport | None) -> _Conn | None:
        return self.by_transport.get(transport) if transport is not None else None

    def admit(self, conn: _Conn) -> bool:
        if len(self.conns) >= self.cap:
            victim = next((c for c in self.conns if c.active == 0 and c.requests == 0), None) or next(
                (c for c in self.conns if c.active == 0), None
            )
            if victim is None:
                _refusals.note(f"API: {self.cap} connections (api.max_connections) busy: refusing new ones", "cap")
                return False
            _refusals.note(
                f"API: {self.cap} connections (api.max_connections) open: closing the oldest idle ones", "evict"
            )
            victim.abort()
        self.conns[conn] = None
        return True

    def release(self, conn: _Conn) -> None:
        self.conns.pop(conn, None)
        if conn.transport is not None:
            self.by_transport.pop(conn.transport, None)

    def close_all(self) -> None:
        for conn in list(self.conns):
            conn.abort()


class GatedSite(web.TCPSite):
    """A TCPSite whose connections go through a ConnectionGate (TLS included)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, gate: ConnectionGate) -> None:
        super().__init__(runner, host, port)
        self.gate = gate

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        # asyncio accepts up to `backlog` connections per wake-up, each a descriptor until the gate
        # closes it on the next turn: a small batch keeps a flood from hitting the descriptor limit
        self._server = await loop.create_server(self.gate, self._host, self._port, backlog=64)
        for listening in self._server.sockets:
            # ...while a deep kernel queue keeps a health check from waiting for a SYN retransmit
            with listening.dup() as same:
                same.listen(1024)

    async def stop(self) -> None:
        await super().stop()
        self.gate.close_all()


def _quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Accept errors (EMFILE...) and hostile-client transport errors: one line a minute, no traceback."""
    previous = loop.get_exception_handler()
    noisy = ("socket.accept()", "Fatal error on SSL", "SSL handshake failed", "Fatal error on transport")

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        kind = next((n for n in noisy if message.startswith(n)), None)
        if kind is not None:
            exc = context.get("exception")
            _refusals.note(f"API: {message}: {exc!r}" if exc else f"API: {message}", kind)
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def make_app(wd: Watchdog) -> web.Application:
    app = web.Application(middlewares=[_middleware], client_max_size=MAX_BODY)
    app[WATCHDOG_KEY] = wd
    # evaluated at each scrape, like /master: a key taken or lost shows without waiting for a cycle
    wd.metrics.serving_master.labels(wd.me).set_function(lambda: 1.0 if serving_master(wd) else 0.0)
    for path, read in (("/health", health), ("/master", master), ("/clone", clone)):
        app.router.add_get(path, read)  # HEAD too
        app.router.add_route("OPTIONS", path, read)  # HAProxy's default httpchk
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
    app = make_app(wd)
    ctx = server_ssl_context(a.cert_file, a.key_file, a.client_ca_file) if a.cert_file and a.key_file else None
    gate = ConnectionGate(lambda: None, ctx, a.max_connections, a.request_head_timeout)
    app[GATE_KEY] = gate
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=a.request_head_timeout, shutdown_timeout=2.0)
    await runner.setup()
    assert runner.server is not None
    gate.new_handler = runner.server
    _quiet_accept_errors(asyncio.get_running_loop())
    site = GatedSite(runner, a.listen_host, a.listen_port, gate)
    await site.start()
    return runner
