"""A simulated Dogtag CA: what a watchdog can see of one, over real TLS and real LDAP.

`ca-watchdog lab ca --cs-cfg PATH --port N --cert F --key F ...`

* reads CS.cfg once at start and never again (like Tomcat): the role, issuing points, basedn,
  master.ca.agent.* and cs.state are fixed for the life of the process;
* starts like a real Dogtag 10.10 (reference/real-dogtag): during --start-delay the port first
  refuses connections (the first 40 %), then accepts them and answers nothing (the rest); no
  `starting` status is ever sent. Before that, CS.cfg is archived to `archives/CS.cfg.bak.<time>`
  when it differs from `CS.cfg.bak` (pkidaemon); when the engine starts, CS.cfg is rewritten with
  its keys in sorted order, as the CA's config store does;
* `GET /ca/admin/ca/getStatus`: PKI 11 JSON, or PKI 10 XML (whatever the Accept header says);
* `GET /ca/ee/ca/getInfo?template=/ee/ca/toDisplayCRL&xml=true`: Dogtag's XML envelope with
  master_host/master_port and CRL numbers; without a template, HTTP 200 with Dogtag's
  `<unexpectedError>` envelope, as 10.10 answers;
* `GET /ca/ee/ca/getCRL?op=getCRL&crlIssuingPoint=ID`: a DER CRL whose number is the LDAP record's;
* `GET /ca/rest/certs?size=1`: a certificate listing that reads the database;
* `/ca/agent/ca/updateCRL`: needs a verified client certificate (TLS client auth is "want"); the
  master answers `<time>ms</time>`, a clone `<crlUpdate>notInitialized</crlUpdate>`;
* while master: advances `cn=<ID>,ou=crlIssuingPoints,ou=ca,<basedn>` (crlNumber in Dogtag's
  length-prefixed encoding, thisUpdate, nextUpdate) every --crl-interval seconds, and records who
  wrote it (see CRLDirectory);
* with its 389-DS down (--ldap-url unreachable): getStatus still `running`, getInfo 200 with an
  empty body, getCRL an HTML "Unauthorized" page, /ca/rest/certs a 500 PKIException; started while
  its DS is down, it answers Tomcat's 404 to everything, for good, until restarted.
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
import socket
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
from ..probes.directory import format_dogtag_number, parse_dogtag_number
from .pki import LabCA

JSON_VERSION = "11.5.0"
XML_VERSION = "10.10.5"
GENERALIZED_TIME = "%Y%m%d%H%M%SZ"
# multi-valued, lab only: one value per write, "<time> writer=<name> crlNumber=<n>"
LOG_ATTR = "labCRLWriteLog"
LOG_KEEP = 20  # a writer trims only its own old log values, so two writers never delete each other's
CRL_PATH = "/ca/ee/ca/getCRL"
INFO_TEMPLATES = ("/ee/ca/toDisplayCRL",)  # the template the EE page links to
REFUSE_SHARE = 0.4  # of --start-delay: a real start refused for 6.6-8.8 s of 16.5-17.9 s
NOT_FOUND_PAGE = (
    "<!doctype html><html lang=\"en\"><head><title>HTTP Status 404 \u2013 Not Found</title></head>"
    "<body><h1>HTTP Status 404 \u2013 Not Found</h1></body></html>"
)
UNAUTHORIZED_PAGE = (
    "<HTML><head><TITLE>CA End-Entity Generic Unauthorized</TITLE></head><BODY>"
    "Unauthorized Access You are not authorized for this operation.</BODY></HTML>"
)


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
    return CRLRecord(issuing_point, parse_dogtag_number(number), _parse_gt(this_u), _parse_gt(next_u), writer)


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

    def ping(self) -> None:
        """Bind and unbind: is the database there (OSError if not)?"""
        self._connect().unbind()

    def count_certs(self) -> int:
        """The certificate records under ou=certificateRepository (0 if the lab has none)."""
        from ldap3 import LEVEL

        conn = self._connect()
        try:
            base = f"ou=certificateRepository,ou=ca,{self.basedn}"
            if not conn.search(base, "(objectClass=*)", LEVEL, attributes=["cn"], size_limit=1):
                if conn.result.get("result") in (4, 32):  # sizeLimitExceeded, noSuchObject
                    return len(conn.entries)
                raise OSError(f"LDAP search {base}: {conn.result.get('description')}")
            return len(conn.entries)
        finally:
            conn.unbind()

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
                number = (parse_dogtag_number(current) if current else starting) + 1
                stamp = f"{now.strftime('%Y%m%d%H%M%S')}.{now.microsecond // 1000:03d}Z"
                log_value = f"{stamp} writer={writer} crlNumber={number}"
                values = {
                    "crlNumber": format_dogtag_number(number),
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
    status_fault: str | None = None  # None, "http503", "garbage", "deep-json" or "utf16-dtd"
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
        self.engine_failed = False  # started while its database was down: Tomcat's 404, for good

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

    async def database_up(self) -> bool:
        if self.directory is None:
            return True
        try:
            await asyncio.to_thread(self.directory.ping)
        except Exception as exc:
            _log(f"database unreachable: {exc}")
            return False
        return True

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
        if self.engine_failed:
            return
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
        if self.s.status_fault == "deep-json":  # RecursionError in json.loads (issue 10, finding 7)
            deep = b'{"Response": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            return web.Response(status=200, body=deep, content_type="application/json")
        if self.s.status_fault == "utf16-dtd":  # a DTD whose entity says "running" (issue 10, finding 10)
            text = (
                '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE XMLResponse [<!ENTITY r "running">]>'
                "<XMLResponse><State>1</State><Type>CA</Type><Status>&r;</Status>"
                f"<Version>{XML_VERSION}</Version></XMLResponse>"
            )
            return web.Response(status=200, body=text.encode("utf-16"), content_type="application/xml")
        status = "running"  # a real CA sends nothing before it runs (the silent accept period)
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
        template = request.query.get("template")
        if template is None or template not in INFO_TEMPLATES:
            # 10.10's GetInfo.process: HTTP 200 with an error envelope, never the values
            message = (
                "Error encountered while rendering a response."
                if template is None
                else "Error encountered while loading output template."
            )
            body = (
                '<?xml version="1.0" encoding="UTF-8" standalone="no"?><xml><header/><fixed>'
                f"<authorityName>Certificate Manager</authorityName><unexpectedError>{message}</unexpectedError>"
                "<requestStatus>7</requestStatus></fixed><records/></xml>"
            )
            return web.Response(text=body, content_type="application/xml")
        if not await self.database_up():
            return web.Response(status=200, body=b"")  # what 10.10 answers with its 389-DS down
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
        if not await self.database_up():
            return web.Response(text=UNAUTHORIZED_PAGE, content_type="text/html")
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
        if ip not in self.issuing_points or not self.is_master:
            # a clone's issuing points have enableCRLUpdates=false: Dogtag never initialised them
            header = {"crlIssuingPoint": ip, "crlUpdate": "notInitialized"}
        else:
            t0 = time.monotonic()
            await self.update_crls()
            ms = round((time.monotonic() - t0) * 1000)
            header = (
                {"crlIssuingPoint": ip, "time": str(ms)}
                if ip in self.records
                else {"crlIssuingPoint": ip, "crlUpdate": "Failure"}
            )
        return web.Response(text=_xml_envelope(header), content_type="application/xml")

    async def list_certs(self, request: web.Request) -> web.StreamResponse:
        """/ca/rest/certs: a listing read from the database (a 500 PKIException when it is down)."""
        if self.directory is None:
            return web.json_response({"total": 0, "entries": []})
        try:
            total = await asyncio.to_thread(self.directory.count_certs)
        except Exception as exc:
            doc = {
                "ClassName": "com.netscape.certsrv.base.PKIException",
                "Code": 500,
                "Message": f"Unable to list certificates: Failed to connect LDAP server {exc}",
            }
            return web.json_response(doc, status=500)
        return web.json_response({"total": total, "entries": []})

    @web.middleware
    async def engine(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self.engine_failed:  # "Unable to start CA engine": only Tomcat's own pages remain
            return web.Response(status=404, text=NOT_FOUND_PAGE, content_type="text/html")
        return await handler(request)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.engine])
        app.router.add_get("/ca/admin/ca/getStatus", self.get_status)
        app.router.add_get("/ca/rest/certs", self.list_certs)
        app.router.add_get("/ca/ee/ca/getInfo", self.get_info)
        app.router.add_get(CRL_PATH, self.get_crl)
        app.router.add_route("*", "/ca/agent/ca/updateCRL", self.update_crl)
        return app

    async def serve(self, stop: asyncio.Event) -> None:
        """Start as a real 10.10 CA does (refuse, then accept silently, then answer), serve until stop."""
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        crl_task: asyncio.Task[None] | None = None
        sock: socket.socket | None = None
        try:
            archive_cscfg(self.s.cs_cfg)  # pkidaemon start, an ExecStartPre of the unit
            # like a real CA, the start time runs from the process start (interpreter and imports included)
            began = time.monotonic() - _process_age()
            ready_at = began + self.s.start_delay
            refuse_until = began + REFUSE_SHARE * self.s.start_delay
            # --port 0 (tests): the port must be known at once, so no refusing period
            if self.s.port != 0 and await _stopped_within(stop, refuse_until - time.monotonic()):
                return
            # bound and listening, nobody accepting: the kernel completes TCP handshakes, nothing answers
            sock = socket.create_server((self.s.host, self.s.port), backlog=128)
            self.bound_port = int(sock.getsockname()[1])
            print(
                f"simca {self.name} listening on https://{self.s.host}:{self.bound_port} "
                f"role={self.role.value} format={self.s.status_format} ldap={self.s.ldap_url or '-'}",
                flush=True,
            )
            rewrite_cscfg_sorted(self.s.cs_cfg)  # the CA's config store writes CS.cfg back while it starts
            if await _stopped_within(stop, ready_at - time.monotonic()):
                return
            if not await self.database_up():
                _log("Unable to start CA engine: Password test execution failed. Is the database up?")
                self.engine_failed = True
            self.ready_at = time.monotonic()
            site = web.SockSite(runner, sock, ssl_context=self.ssl_context(), shutdown_timeout=1.0)
            await site.start()
            sock = None  # the site owns it now
            if self.is_master and not self.engine_failed:
                crl_task = asyncio.create_task(self.crl_loop())
            await stop.wait()
        finally:
            if crl_task is not None:
                crl_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await crl_task
            if sock is not None:
                sock.close()
            await runner.cleanup()


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds`; True if stop was set meanwhile."""
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


def archive_cscfg(path: str) -> Path | None:
    """pkidaemon start: copy CS.cfg to archives/CS.cfg.bak.<YYYYmmddHHMMSS> and point the CS.cfg.bak
    symlink at it, only when CS.cfg differs from what CS.cfg.bak points at."""
    real = Path(os.path.realpath(path))
    link = real.with_name("CS.cfg.bak")
    data = real.read_bytes()
    with contextlib.suppress(OSError):
        if link.read_bytes() == data:
            return None
    archives = real.parent / "archives"
    archives.mkdir(exist_ok=True)
    target = archives / f"CS.cfg.bak.{time.strftime('%Y%m%d%H%M%S')}"
    target.write_bytes(data)
    tmp = link.with_name(link.name + ".new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(target)
    tmp.replace(link)
    return target


def rewrite_cscfg_sorted(path: str) -> None:
    """Write CS.cfg back as Dogtag's config store does: one `key=value` per key (the last one wins),
    keys in sorted order, LF endings. Owner and mode are kept; the file is replaced atomically."""
    real = os.path.realpath(path)
    cfg = read_cscfg(real)
    last = {line.key: line for line in cfg.lines if line.key is not None}
    data = "".join(line.raw.rstrip("\n").removesuffix("\r") + "\n" for _, line in sorted(last.items()))
    st = os.stat(real)
    tmp = f"{real}.simca-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data.encode("utf-8"))
        os.fchmod(fd, st.st_mode & 0o7777)
        with contextlib.suppress(PermissionError):
            os.fchown(fd, st.st_uid, st.st_gid)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, real)


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
