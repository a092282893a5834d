"""The agent-port probe: Dogtag's getStatus, getInfo and a functional request over HTTPS (aiohttp).

Healthy = HTTP 200, `Status == running`, `State == 1` (dogtag.md 3.2). Bodies are parsed as
JSON (PKI 11) first, then XML (PKI 10; 10.10 answers XML even to `Accept: application/json`).
getStatus alone does not mean "can serve": a real 10.10 CA whose 389-DS is down still says
`running`. `serving()` adds a request that reads the CA's database (`/ca/rest/certs?size=1`).
Nothing a server does makes these calls raise: every failure becomes a `down` AgentStatus or an
AgentInfo with ok=False and a reason.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import re
import ssl
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Literal, TypeVar
from xml.parsers import expat

import aiohttp

STATUS_PATH = "/ca/admin/ca/getStatus"
# getInfo needs an output template: without one Dogtag 10.10 answers HTTP 200 with
# <unexpectedError>Error encountered while rendering a response.</unexpectedError>
INFO_PATH = "/ca/ee/ca/getInfo?template=/ee/ca/toDisplayCRL&xml=true"
# lists one certificate record: a query of the CA's database (500 when its 389-DS is down)
FUNCTIONAL_PATH = "/ca/rest/certs?size=1"
# reasons that a CA which was just told to start gives before it answers: the port refuses, then
# accepts connections and says nothing for about 10 s (real 10.10: no `starting` status is ever sent)
REASON_REFUSED = "connection refused"
REASON_NO_ANSWER = "timeout"
# ASCII digits only (str.isdigit would take "²", which int() then refuses), and bounded: int() of
# more than 4300 digits raises. A CRL number is at most 20 octets (RFC 5280): 49 decimal digits.
_PORT = re.compile(r"[0-9]{1,5}")
_CRL_NUMBER = re.compile(r"[0-9]{1,49}")
MAX_BODY = 256 * 1024  # getStatus/getInfo answers are tiny; never buffer an endless body

StatusValue = Literal["running", "starting", "down"]


@dataclass(frozen=True)
class AgentStatus:
    status: StatusValue
    reason: str | None
    http_status: int | None
    version: str | None
    state: str | None
    latency: float

    @property
    def healthy(self) -> bool:
        return self.status == "running"


@dataclass(frozen=True)
class AgentInfo:
    master_host: str | None
    master_port: int | None
    crl_numbers: dict[str, int] = field(default_factory=dict)
    ok: bool = True
    error: str | None = None


@dataclass(frozen=True)
class StatusDoc:
    """The fields of a getStatus answer, either format."""

    status: str
    state: str | None
    version: str | None
    type: str | None


# ---- parsing (pure) ---------------------------------------------------------------------------


class BadAnswer(ValueError):
    """An answer that is not what Dogtag sends; the only exception the parsers here raise."""


_T = TypeVar("_T")


def _only_bad_answer(parse: Callable[[bytes], _T]) -> Callable[[bytes], _T]:
    """Whatever a hostile body makes a parser trip over (deep nesting, odd types), it is a BadAnswer."""

    def wrapper(body: bytes) -> _T:
        try:
            return parse(body)
        except BadAnswer:
            raise
        except Exception as exc:  # RecursionError, TypeError, ...: still only a bad answer
            raise BadAnswer(f"unparseable body ({type(exc).__name__})") from None

    wrapper.__name__ = parse.__name__
    wrapper.__doc__ = parse.__doc__
    return wrapper


class _Declared(Exception):
    pass


def _refuse(*_args: object) -> None:
    raise _Declared


def _refuse_dtd(body: bytes) -> None:
    """Run expat over the body with handlers that refuse a DOCTYPE and any entity or notation
    declaration, in whatever encoding the document declares (UTF-16 included)."""
    parser = expat.ParserCreate()
    parser.StartDoctypeDeclHandler = _refuse
    parser.EntityDeclHandler = _refuse
    parser.UnparsedEntityDeclHandler = _refuse
    parser.NotationDeclHandler = _refuse
    parser.ExternalEntityRefHandler = _refuse  # type: ignore[assignment]
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    try:
        parser.Parse(body, True)
    except _Declared:
        raise BadAnswer("XML with a DTD or entity declarations is refused") from None
    except (expat.ExpatError, ValueError) as exc:
        raise BadAnswer(f"invalid XML: {exc}") from None


def safe_xml(body: bytes) -> ET.Element:
    """Parse XML that has no DTD: no entities, so no entity expansion or external fetches.

    A byte search for `<!DOCTYPE` misses a UTF-16 document, so expat itself checks first.
    """
    head = body.lower()
    if b"<!doctype" in head or b"<!entity" in head:
        raise BadAnswer("XML with a DTD or entity declarations is refused")
    _refuse_dtd(body)
    try:
        return ET.fromstring(body)
    except (ET.ParseError, ValueError) as exc:
        raise BadAnswer(f"invalid XML: {exc}") from None


def _text(el: ET.Element | None) -> str | None:
    if el is None or el.text is None:
        return None
    return el.text.strip()


def _field(value: object, what: str) -> str | None:
    """A scalar field of a getStatus answer as text; anything else is a bad answer (never str() of a
    nested structure: that recurses)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadAnswer(f"{what} is not a string")
    text = str(value)
    if len(text) > 200:
        raise BadAnswer(f"{what} is longer than 200 characters")
    return text


@_only_bad_answer
def parse_status_body(body: bytes) -> StatusDoc:
    """JSON `{"Response": {...}}` first, then XML `<XMLResponse>`; BadAnswer if neither."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        doc = None
    if doc is not None:
        resp = doc.get("Response") if isinstance(doc, dict) else None
        if not isinstance(resp, dict) or not isinstance(resp.get("Status"), str):
            raise BadAnswer("JSON without Response.Status")
        status = _field(resp["Status"], "Status") or ""
        return StatusDoc(
            status,
            _field(resp.get("State"), "State"),
            _field(resp.get("Version"), "Version"),
            _field(resp.get("Type"), "Type"),
        )
    root = safe_xml(body)
    if root.tag != "XMLResponse":
        raise BadAnswer(f"XML root <{root.tag[:40]}>, expected <XMLResponse>")
    status_text = _text(root.find("Status"))
    if not status_text:
        raise BadAnswer("XML without <Status>")
    return StatusDoc(status_text, _text(root.find("State")), _text(root.find("Version")), _text(root.find("Type")))


def status_from_answer(http_status: int, body: bytes, latency: float) -> AgentStatus:
    """Classify one HTTP answer to getStatus."""
    if http_status != 200:
        return AgentStatus("down", f"HTTP {http_status}", http_status, None, None, latency)
    try:
        doc = parse_status_body(body)
    except BadAnswer as exc:
        return AgentStatus("down", f"bad answer: {exc}", http_status, None, None, latency)
    if doc.status == "starting":
        return AgentStatus("starting", None, http_status, doc.version, doc.state, latency)
    if doc.status != "running":
        return AgentStatus("down", f"Status {doc.status[:40]!r}", http_status, doc.version, doc.state, latency)
    if doc.state != "1":
        # cs.state 0: installed but not configured; Dogtag serves nothing useful yet
        return AgentStatus(
            "down", f"State {(doc.state or '')[:40]!r} (not configured)", http_status, doc.version, doc.state, latency
        )
    return AgentStatus("running", None, http_status, doc.version, doc.state, latency)


def _bad_info(error: str) -> AgentInfo:
    return AgentInfo(None, None, {}, ok=False, error=f"bad answer: {error}")


def functional_problem(http_status: int, body: bytes) -> str | None:
    """None when `/ca/rest/certs?size=1` answered a certificate listing, else what is wrong.

    Dogtag with its database down answers 500 with a PKIException JSON whose Message says why;
    a CA whose engine failed to start answers Tomcat's 404 page.
    """
    try:
        doc = json.loads(body) if body.strip() else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        doc = None
    if http_status != 200:
        message = doc.get("Message") if isinstance(doc, dict) else None
        detail = f": {message[:160]}" if isinstance(message, str) else ""
        return f"HTTP {http_status}{detail}"
    if not isinstance(doc, dict) or not isinstance(doc.get("total"), int) or isinstance(doc.get("total"), bool):
        return "HTTP 200 without a certificate listing ({\"total\": N, ...})"
    return None


def parse_info_body(body: bytes) -> AgentInfo:
    """getInfo (toDisplayCRL template, xml=true): `<xml><header>` with master_host, master_port,
    crlIssuingPoints, crlNumbers.

    Only a complete answer is an answer: an error envelope (`<unexpectedError>`, `<errorDetails>`),
    an empty body (10.10 with its 389-DS down) or a header without the `master_host` and
    `crlIssuingPoints` elements is ok=False, never "no master_host, so serving as master".
    Never raises: anything malformed is ok=False with "bad answer: ...".
    """
    try:
        return _parse_info(body)
    except BadAnswer as exc:
        return _bad_info(str(exc))


@_only_bad_answer
def _parse_info(body: bytes) -> AgentInfo:
    if not body.strip():
        raise BadAnswer("empty body")
    root = safe_xml(body)
    header = root.find("header")
    if root.tag != "xml" or header is None:
        raise BadAnswer("not a Dogtag XML envelope (<xml><header>)")
    for tag in ("unexpectedError", "errorDetails", "error"):
        err = root.find(f".//{tag}")
        if err is not None:
            raise BadAnswer(f"Dogtag error <{tag}>: {(_text(err) or '')[:120]}")
    for tag in ("master_host", "crlIssuingPoints"):
        if header.find(tag) is None:
            raise BadAnswer(f"no <{tag}> in the header (not a getInfo answer)")
    host = _text(header.find("master_host")) or None
    port_text = _text(header.find("master_port")) or ""
    port: int | None = None
    if port_text:
        if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
            raise BadAnswer(f"master_port {port_text[:20]!r} is not a port number")
        port = int(port_text)
    # Dogtag joins the per-issuing-point values with '+'
    ips = [s for s in (_text(header.find("crlIssuingPoints")) or "").split("+") if s]
    nums = (_text(header.find("crlNumbers")) or "").split("+")
    numbers: dict[str, int] = {}
    for i, ip in enumerate(ips):
        n = nums[i].strip() if i < len(nums) else ""
        if not n:
            continue  # no CRL made yet for this issuing point
        if not _CRL_NUMBER.fullmatch(n):
            raise BadAnswer(f"crlNumbers entry {i + 1} ({n[:20]!r}) is not a CRL number")
        numbers[ip] = int(n)
    return AgentInfo(host, port, numbers, ok=True, error=None)


# ---- transport ------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    """A short, stable reason for a failed request."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS failure: {exc.certificate_error}"
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return f"TLS failure: {exc}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_err = exc.os_error
        if isinstance(os_err, ssl.SSLError):
            return f"TLS failure: {os_err}"
        if os_err.errno == errno.ECONNREFUSED or isinstance(os_err, ConnectionRefusedError):
            return "connection refused"
        return f"connection failed: {os_err.strerror or os_err}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "truncated body"
    if isinstance(exc, aiohttp.InvalidURL):
        return f"invalid URL: {exc}"
    return f"{type(exc).__name__}: {exc}"


async def _read_limited(resp: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(65536):
        size += len(chunk)
        if size > MAX_BODY:
            raise ValueError("body too large")
        chunks.append(chunk)
    return b"".join(chunks)


class AgentProbe:
    """Probe Dogtag agent ports; one ClientSession, a fresh connection per request.

    Fresh connections (force_close) make every probe see the server as a new client would: a
    pooled keep-alive connection would hide a changed certificate or a dead listener.
    """

    def __init__(
        self,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        timeout: float = 3.0,
    ) -> None:
        if key_file is not None and cert_file is None:
            raise ValueError("a client key needs a client certificate")
        self.timeout = timeout
        self.ssl_context = ssl.create_default_context(cafile=ca_file)
        if cert_file is not None:
            self.ssl_context.load_cert_chain(cert_file, key_file)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AgentProbe:
        self._ensure_session()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.ssl_context, force_close=True, limit=0)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"Accept": "application/json, application/xml;q=0.9"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get(self, url: str) -> tuple[int, bytes]:
        session = self._ensure_session()
        # the session's total timeout covers connect, TLS handshake and body; asyncio.timeout is a backstop
        async with asyncio.timeout(self.timeout + 1.0), session.get(url, allow_redirects=False) as resp:
            return resp.status, await _read_limited(resp)

    async def _fetch(self, base_url: str, path: str) -> tuple[int, bytes] | str:
        """(HTTP status, body), or why there is no answer (cancellation still propagates)."""
        try:
            return await self._get(base_url.rstrip("/") + path)
        except Exception as exc:
            return _describe(exc)

    async def status(self, base_url: str) -> AgentStatus:
        t0 = time.monotonic()
        answer = await self._fetch(base_url, STATUS_PATH)
        if isinstance(answer, str):
            return AgentStatus("down", answer, None, None, None, time.monotonic() - t0)
        return status_from_answer(*answer, time.monotonic() - t0)

    async def serving(self, base_url: str) -> AgentStatus:
        """getStatus, then (when it says running) a request that reads the CA's database."""
        st = await self.status(base_url)
        if st.status != "running":
            return st
        t0 = time.monotonic()
        answer = await self._fetch(base_url, FUNCTIONAL_PATH)
        latency = st.latency + time.monotonic() - t0
        if isinstance(answer, str):
            reason = f"getStatus running, but {FUNCTIONAL_PATH} failed: {answer}"
            return AgentStatus("down", reason, None, st.version, st.state, latency)
        code, body = answer
        problem = functional_problem(code, body)
        if problem is not None:
            reason = f"getStatus running, but the CA cannot serve: {FUNCTIONAL_PATH} {problem}"
            return AgentStatus("down", reason, code, st.version, st.state, latency)
        return AgentStatus("running", None, st.http_status, st.version, st.state, latency)

    async def info(self, base_url: str) -> AgentInfo:
        answer = await self._fetch(base_url, INFO_PATH)
        if isinstance(answer, str):
            return AgentInfo(None, None, {}, ok=False, error=answer)
        code, body = answer
        if code != 200:
            return AgentInfo(None, None, {}, ok=False, error=f"HTTP {code}")
        return parse_info_body(body)


# ---- CLI ------------------------------------------------------------------------------------------


async def _probe_once(args: argparse.Namespace) -> dict[str, object]:
    async with AgentProbe(args.cafile, args.cert, args.key, args.timeout) as probe:
        st, info = await asyncio.gather(probe.status(args.url), probe.info(args.url))
    out: dict[str, object] = {"url": args.url, **asdict(st)}
    out["latency"] = round(st.latency, 4)
    out["info"] = asdict(info)
    return out


def cli_main(args: argparse.Namespace) -> int:
    """`ca-watchdog probe agent URL`: one JSON object; exit 0 if running, 1 otherwise."""
    if (args.cert is None) != (args.key is None):
        print("ca-watchdog: --cert and --key go together", file=sys.stderr)
        return 2
    try:
        out = asyncio.run(_probe_once(args))
    except (OSError, ssl.SSLError) as exc:  # unreadable --cafile/--cert/--key: our input, not the server
        print(f"ca-watchdog: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0 if out["status"] == "running" else 1
