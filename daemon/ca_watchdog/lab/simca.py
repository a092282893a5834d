"""A simulated Dogtag CA: what a watchdog can see of one, over real TLS and real LDAP.

`ca-watchdog lab ca --cs-cfg PATH --port N --cert F --key F ...`

* reads CS.cfg once at start and never again (like Tomcat): the role, issuing points, basedn,
  master.ca.agent.* and cs.state are fixed for the life of the process;
* `GET /ca/admin/ca/getStatus`: PKI 11 JSON or PKI 10 XML, `starting` for --start-delay seconds;
* `GET /ca/ee/ca/getInfo?xml=true`: Dogtag's XML envelope with master_host/master_port and CRL numbers;
* `GET /ca/ee/ca/getCRL?op=getCRL&crlIssuingPoint=ID`: a DER CRL whose number is the LDAP record's;
* `/ca/agent/ca/updateCRL`: needs a verified client certificate (TLS client auth is "want");
* while master: advances `cn=<ID>,ou=crlIssuingPoints,ou=ca,<basedn>` (crlNumber, thisUpdate,
  nextUpdate) every --crl-interval seconds, and records who wrote it (see CRLDirectory).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ..cscfg import Role, classify, read_cscfg
from .pki import LabCA

JSON_VERSION = "11.5.0"
XML_VERSION = "10.10.5"
GENERALIZED_TIME = "%Y%m%d%H%M%SZ"
# multi-valued, lab only: one value per write, "<time> writer=<name> crlNumber=<n>"
LOG_ATTR = "labCRLWriteLog"
LOG_KEEP = 20  # a writer trims only its own old log values, so two writers never delete each other's
CRL_PATH = "/ca/ee/ca/getCRL"


def _process_age() -> float:
    """Seconds since this process started (from /proc; 0 where unavailable)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def _log(msg: str) -> None:
    print(f"simca: {msg}", file=sys.stderr, flush=True)


def _gt(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime(GENERALIZED_TIME)


def _parse_gt(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, GENERALIZED_TIME).replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class CRLRecord:
    """One issuing point record, as stored in LDAP."""

    issuing_point: str
    number: int
    this_update: dt.datetime
    next_update: dt.datetime
    writer: str | None


def _first(attrs: dict[str, list[Any]], name: str) -> str | None:
    # 389-DS returns unknown (extensibleObject) attribute names in lower case: match case-insensitively
    for k, v in attrs.items():
        if k.lower() == name.lower() and v:
            return str(v[0])
    return None


def _all(attrs: dict[str, list[Any]], name: str) -> list[str]:
    for k, v in attrs.items():
        if k.lower() == name.lower():
            return [str(x) for x in v]
    return []


def record_from_attrs(issuing_point: str, attrs: dict[str, list[Any]]) -> CRLRecord | None:
    number, this_u, next_u = (
        _first(attrs, "crlNumber"),
        _first(attrs, "thisUpdate"),
        _first(attrs, "nextUpdate"),
    )
    if number is None or this_u is None or next_u is None:
        return None
    desc = _first(attrs, "description")
    writer = desc.removeprefix("writer=") if desc and desc.startswith("writer=") else None
    return CRLRecord(issuing_point, int(number), _parse_gt(this_u), _parse_gt(next_u), writer)


class CRLDirectory:
    """The CRL issuing point records in one 389-DS, through ldap3 (blocking: call via to_thread).

    Every write replaces crlNumber/thisUpdate/nextUpdate and `description: writer=<name>`, and
    adds one `labCRLWriteLog` value. With two masters on two replicated suppliers the description
    flips between their names and the log holds interleaved writes of both: split brain, visible.
    """

    def __init__(self, url: str, bind_dn: str, password: str, basedn: str, timeout: float = 3.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "ldap" or not parts.hostname:
            raise ValueError(f"--ldap-url must be ldap://HOST:PORT, got {url!r}")
        self.host, self.port = parts.hostname, parts.port or 389
        self.bind_dn, self.password, self.basedn, self.timeout = bind_dn, password, basedn, timeout

    def dn(self, issuing_point: str) -> str:
        return f"cn={issuing_point},ou=crlIssuingPoints,ou=ca,{self.basedn}"

    def _connect(self) -> Any:
        from ldap3 import NONE, Connection, Server

        server = Server(self.host, port=self.port, get_info=NONE, connect_timeout=self.timeout)
        conn = Connection(
            server,
            self.bind_dn,
            self.password,
            receive_timeout=max(1, math.ceil(self.timeout)),  # ldap3 packs it into SO_RCVTIMEO: whole seconds
            raise_exceptions=False,
        )
        if not conn.bind():
            raise OSError(f"LDAP bind to {self.host}:{self.port} failed: {conn.result.get('description')}")
        return conn

    def _read(self, conn: Any, issuing_point: str) -> tuple[CRLRecord | None, dict[str, list[Any]] | None]:
        from ldap3 import BASE

        ok = conn.search(self.dn(issuing_point), "(objectClass=*)", BASE, attributes=["*"])
        if not ok:
            if conn.result.get("result") == 32:  # noSuchObject
                return None, None
            raise OSError(f"LDAP search {self.dn(issuing_point)}: {conn.result.get('description')}")
        attrs: dict[str, list[Any]] = dict(conn.entries[0].entry_attributes_as_dict)
        return record_from_attrs(issuing_point, attrs), attrs

    def read(self, issuing_points: Sequence[str]) -> dict[str, CRLRecord]:
        conn = self._connect()
        try:
            out: dict[str, CRLRecord] = {}
            for ip in issuing_points:
                rec, _ = self._read(conn, ip)
                if rec is not None:
                    out[ip] = rec
            return out
        finally:
            conn.unbind()

    def _ensure_parents(self, conn: Any) -> None:
        for dn, ou in (
            (f"ou=ca,{self.basedn}", "ca"),
            (f"ou=crlIssuingPoints,ou=ca,{self.basedn}", "crlIssuingPoints"),
        ):
            if not conn.add(dn, ["top", "organizationalUnit"], {"ou": ou}) and conn.result.get("result") != 68:
                raise OSError(f"LDAP add {dn}: {conn.result.get('description')}")

    def advance(self, issuing_point: str, writer: str, starting: int, next_after: dt.timedelta) -> CRLRecord:
        """Read the current number and write number+1 (numbering continues across a change of master)."""
        from ldap3 import MODIFY_ADD, MODIFY_DELETE, MODIFY_REPLACE

        conn = self._connect()
        try:
            for _attempt in range(3):
                _, attrs = self._read(conn, issuing_point)
                now = dt.datetime.now(dt.UTC)
                current = _first(attrs, "crlNumber") if attrs is not None else None
                number = (int(current) if current and current.isdigit() else starting) + 1
                stamp = f"{now.strftime('%Y%m%d%H%M%S')}.{now.microsecond // 1000:03d}Z"
                log_value = f"{stamp} writer={writer} crlNumber={number}"
                values = {
                    "crlNumber": str(number),
                    "thisUpdate": _gt(now),
                    "nextUpdate": _gt(now + next_after),
                    "description": f"writer={writer}",
                }
                if attrs is None:
                    self._ensure_parents(conn)
                    entry = {"cn": issuing_point, **values, LOG_ATTR: log_value}
                    if conn.add(self.dn(issuing_point), ["top", "extensibleObject"], entry):
                        return CRLRecord(issuing_point, number, now, now + next_after, writer)
                    if conn.result.get("result") == 68:  # another master created it meanwhile: modify instead
                        continue
                    raise OSError(f"LDAP add {self.dn(issuing_point)}: {conn.result.get('description')}")
                changes: dict[str, list[tuple[str, list[str]]]] = {
                    k: [(MODIFY_REPLACE, [v])] for k, v in values.items()
                }
                mine = sorted(v for v in _all(attrs, LOG_ATTR) if f" writer={writer} " in v)
                ops: list[tuple[str, list[str]]] = [(MODIFY_ADD, [log_value])]
                stale = mine[: max(0, len(mine) - (LOG_KEEP - 1))]
                if stale:
                    ops.append((MODIFY_DELETE, stale))
                changes[LOG_ATTR] = ops
                if conn.modify(self.dn(issuing_point), changes):
                    return CRLRecord(issuing_point, number, now, now + next_after, writer)
                # 16/20/32: a replicated change raced ours (value gone, value exists, entry gone): re-read
                if conn.result.get("result") not in (16, 20, 32):
                    raise OSError(f"LDAP modify {self.dn(issuing_point)}: {conn.result.get('description')}")
            raise OSError(f"LDAP write of {self.dn(issuing_point)} kept racing with another writer")
        finally:
            conn.unbind()


@dataclass(frozen=True)
class SimSettings:
    cs_cfg: str
    host: str
    port: int
    cert: str
    key: str
    cafile: str | None = None
    status_format: str = "json"
    start_delay: float = 0.0
    status_delay: float = 0.0
    status_fault: str | None = None  # None, "http503" or "garbage"
    ldap_url: str | None = None
    ldap_bind_dn: str = "cn=Directory Manager"
    ldap_password_file: str | None = None
    crl_interval: float = 2.0
    name: str | None = None
    signing_key: str | None = None
    ldap_timeout: float = 3.0


def _xml_envelope(header: dict[str, str]) -> str:
    fields = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in header.items())
    head = '<?xml version="1.0" encoding="UTF-8" standalone="no"?>'
    return f"{head}<xml><header>{fields}</header><fixed/><records/></xml>"


class SimCA:
    def __init__(self, s: SimSettings) -> None:
        self.s = s
        cfg = read_cscfg(s.cs_cfg)  # once: a running Tomcat never re-reads CS.cfg
        report = classify(cfg)
        self.role = report.role
        self.is_master = report.role is Role.MASTER
        self.issuing_points = [p.id for p in report.issuing_points if p.enable] or cfg.issuing_points()
        self.basedn = cfg.get("internaldb.basedn") or "o=pki-tomcat-CA"
        self.master_host = cfg.get("master.ca.agent.host") or ""
        self.master_port = cfg.get("master.ca.agent.port") or ""
        self.cs_state = (cfg.get("cs.state") or "1").strip()
        self.name = s.name or cfg.get("machineName") or f"simca-{s.port}"
        self.starting: dict[str, int] = {}
        for ip in self.issuing_points:
            raw = (cfg.get(f"ca.crl.{ip}.startingCrlNumber") or "0").strip()
            self.starting[ip] = int(raw) if raw.isdigit() else 0
        self.signer = self._signer()
        self.directory: CRLDirectory | None = None
        if s.ldap_url:
            if not s.ldap_password_file:
                raise ValueError("--ldap-url needs --ldap-password-file")
            password = Path(s.ldap_password_file).read_text(encoding="utf-8").strip()
            self.directory = CRLDirectory(s.ldap_url, s.ldap_bind_dn, password, self.basedn, s.ldap_timeout)
        self.records: dict[str, CRLRecord] = {}  # the master's in-memory issuing points
        self.crl_lock = asyncio.Lock()
        self.ready_at = 0.0
        self.bound_port = s.port

    def _signer(self) -> LabCA:
        """CRLs are signed by the lab CA key (--signing-key, cert from --cafile) or else by the server key."""
        if self.s.signing_key:
            if not self.s.cafile:
                raise ValueError("--signing-key needs --cafile (its first certificate is the CRL issuer)")
            signer = LabCA.load(self.s.cafile, self.s.signing_key)
        else:
            signer = LabCA.load(self.s.cert, self.s.key)
        if signer.cert.public_key() != signer.key.public_key():
            raise ValueError("the CRL signing key does not match its certificate")
        return signer

    # ---- TLS --------------------------------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.s.cert, self.s.key)
        if self.s.cafile:
            # Dogtag's connector: certificateVerification="optional" (TLS "want")
            ctx.load_verify_locations(cafile=self.s.cafile)
            ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    # ---- state --------------------------------------------------------------------------------------
    def running(self) -> bool:
        return time.monotonic() >= self.ready_at

    async def current_records(self) -> dict[str, CRLRecord]:
        """Master: its in-memory issuing points; clone (master.ca.agent.* set): the LDAP records."""
        if self.is_master and not (self.master_host and self.master_port):
            return dict(self.records)
        if self.directory is None:
            return {}
        try:
            return await asyncio.to_thread(self.directory.read, self.issuing_points)
        except Exception as exc:
            _log(f"LDAP read failed: {exc}")
            return {}

    async def update_crls(self) -> None:
        async with self.crl_lock:
            for ip in self.issuing_points:
                prev = self.records.get(ip)
                next_after = dt.timedelta(seconds=max(60.0, self.s.crl_interval * 10))
                if self.directory is None:
                    now = dt.datetime.now(dt.UTC)
                    number = (prev.number if prev else self.starting[ip]) + 1
                    self.records[ip] = CRLRecord(ip, number, now, now + next_after, self.name)
                    continue
                try:
                    self.records[ip] = await asyncio.to_thread(
                        self.directory.advance, ip, self.name, self.starting[ip], next_after
                    )
                except Exception as exc:
                    _log(f"CRL update of {ip} failed: {exc}")

    async def crl_loop(self) -> None:
        # a Dogtag CA generates CRLs only once its engine is up
        await asyncio.sleep(max(0.0, self.ready_at - time.monotonic()))
        while True:
            await self.update_crls()
            await asyncio.sleep(self.s.crl_interval)

    def build_crl(self, rec: CRLRecord) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.signer.cert.subject)
            .last_update(rec.this_update)
            .next_update(rec.next_update)
            .add_extension(x509.CRLNumber(rec.number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.signer.key.public_key()),
                critical=False,
            )
        )
        from cryptography.hazmat.primitives.serialization import Encoding

        return builder.sign(self.signer.key, hashes.SHA256()).public_bytes(Encoding.DER)

    # ---- handlers -------------------------------------------------------------------------------------
    async def get_status(self, request: web.Request) -> web.StreamResponse:
        if self.s.status_delay > 0:
            await asyncio.sleep(self.s.status_delay)
        if self.s.status_fault == "http503":
            body = (
                "<html><head><title>503 Service Unavailable</title></head>"
                "<body><h1>Service Unavailable</h1></body></html>"
            )
            return web.Response(status=503, text=body, content_type="text/html")
        if self.s.status_fault == "garbage":
            return web.Response(status=200, body=b"\x00\x17<<garbage{{not dogtag", content_type="application/json")
        status = "running" if self.running() else "starting"
        if self.s.status_format == "xml":
            body = (
                '<?xml version="1.0" encoding="UTF-8" standalone="no"?><XMLResponse>'
                f"<State>{escape(self.cs_state)}</State><Type>CA</Type><Status>{status}</Status>"
                f"<Version>{XML_VERSION}</Version></XMLResponse>"
            )
            return web.Response(text=body, content_type="application/xml")
        doc = {"Response": {"State": self.cs_state, "Type": "CA", "Status": status, "Version": JSON_VERSION}}
        return web.Response(text=json.dumps(doc), content_type="application/json")

    async def get_info(self, request: web.Request) -> web.StreamResponse:
        records = await self.current_records()
        ips = [ip for ip in self.issuing_points if ip in records]
        header = {
            "crlIssuingPoints": "+".join(ips),
            "crlDescriptions": "",
            "crlNumbers": "+".join(str(records[ip].number) for ip in ips),
            "deltaNumbers": "+".join("0" for _ in ips),
            "isDeltaCRLEnabled": "false",
            "master_host": self.master_host,
            "master_port": self.master_port,
            "masterCRLIssuingPoint": "MasterCRL",
        }
        if request.query.get("xml") != "true":
            lines = "".join(f"<li>{escape(k)}: {escape(v)}</li>" for k, v in header.items())
            return web.Response(text=f"<html><body><ul>{lines}</ul></body></html>", content_type="text/html")
        return web.Response(text=_xml_envelope(header), content_type="application/xml")

    async def get_crl(self, request: web.Request) -> web.StreamResponse:
        ip = request.query.get("crlIssuingPoint", "MasterCRL")
        if request.query.get("op") != "getCRL":
            return web.Response(status=400, text="unsupported op", content_type="text/plain")
        if ip not in self.issuing_points:
            return web.Response(status=404, text=f"no CRL issuing point {ip}", content_type="text/plain")
        rec = (await self.current_records()).get(ip)
        if rec is None:
            return web.Response(status=404, text=f"CRL {ip} not yet generated", content_type="text/plain")
        return web.Response(body=self.build_crl(rec), content_type="application/pkix-crl")

    async def update_crl(self, request: web.Request) -> web.StreamResponse:
        # agent servlets (GetClientCert=true) refuse a request without a verified client certificate
        if request.transport is None or not request.transport.get_extra_info("peercert"):
            return web.Response(status=401, text="client certificate required", content_type="text/plain")
        params = dict(request.query)
        if request.method == "POST":
            params.update({k: str(v) for k, v in (await request.post()).items()})
        ip = params.get("crlIssuingPoint", "MasterCRL")
        if ip not in self.issuing_points:
            result = "Failure"
        elif not self.is_master:
            result = "Disabled"  # a clone's issuing points have enableCRLUpdates=false
        else:
            await self.update_crls()
            result = "Success" if ip in self.records else "Failure"
        return web.Response(
            text=_xml_envelope({"crlIssuingPoint": ip, "crlUpdate": result}), content_type="application/xml"
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ca/admin/ca/getStatus", self.get_status)
        app.router.add_get("/ca/ee/ca/getInfo", self.get_info)
        app.router.add_get(CRL_PATH, self.get_crl)
        app.router.add_route("*", "/ca/agent/ca/updateCRL", self.update_crl)
        return app

    async def serve(self, stop: asyncio.Event, on_listening: Callable[[SimCA], Awaitable[None]] | None = None) -> None:
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        crl_task: asyncio.Task[None] | None = None
        try:
            site = web.TCPSite(runner, self.s.host, self.s.port, ssl_context=self.ssl_context(), shutdown_timeout=1.0)
            await site.start()
            server = site._server  # the bound port, when --port 0 asked for any free one
            sockets = getattr(server, "sockets", None) or []
            if sockets:
                self.bound_port = int(sockets[0].getsockname()[1])
            # like a real CA, the start time runs from the process start (interpreter and imports included)
            self.ready_at = time.monotonic() + max(0.0, self.s.start_delay - _process_age())
            if self.is_master:
                crl_task = asyncio.create_task(self.crl_loop())
            print(
                f"simca {self.name} listening on https://{self.s.host}:{self.bound_port} "
                f"role={self.role.value} format={self.s.status_format} ldap={self.s.ldap_url or '-'}",
                flush=True,
            )
            if on_listening is not None:
                await on_listening(self)
            await stop.wait()
        finally:
            if crl_task is not None:
                crl_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await crl_task
            await runner.cleanup()


def settings_from_args(args: argparse.Namespace) -> SimSettings:
    return SimSettings(
        cs_cfg=args.cs_cfg,
        host=args.host,
        port=args.port,
        cert=args.cert,
        key=args.key,
        cafile=args.cafile,
        status_format=args.status_format,
        start_delay=args.start_delay,
        status_delay=getattr(args, "status_delay", 0.0),
        status_fault=getattr(args, "status_fault", None),
        ldap_url=args.ldap_url,
        ldap_bind_dn=args.ldap_bind_dn,
        ldap_password_file=args.ldap_password_file,
        crl_interval=args.crl_interval,
        name=getattr(args, "name", None),
        signing_key=getattr(args, "signing_key", None),
    )


async def run(settings: SimSettings) -> int:
    sim = SimCA(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await sim.serve(stop)
    _log(f"{sim.name} stopped")
    return 0


def cli_main(args: argparse.Namespace) -> int:
    return asyncio.run(run(settings_from_args(args)))
