"""Direct probe of one 389 Directory Server: replication agreements, RUV max CSNs, CRL records.

The probe talks LDAP itself (ldap3, blocking, so it runs in a worker thread) with a connect
timeout and a receive timeout on every operation: a SIGSTOPped server accepts TCP connections
and then never answers, and its peers' agreements stay green for minutes (reference/lab.md), so
only a direct probe with a receive timeout sees it. Server problems never raise; they come back
as ``ok=False`` with a reason.

The parsers are pure functions, unit-tested without a server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import ssl
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

DEFAULT_BASEDN = "o=pki-tomcat-CA"

State = Literal["green", "amber", "red", "unknown"]

RUV_FILTER = "(&(nsuniqueid=ffffffff-ffffffff-ffffffff-ffffffff)(objectClass=nsTombstone))"
AGREEMENT_FILTER = "(objectClass=nsds5ReplicationAgreement)"
AGREEMENT_ATTRS = (
    "cn",
    "nsds5replicaHost",
    "nsds5replicaPort",
    "nsds5replicaLastUpdateStatus",
    "nsds5replicaLastUpdateStatusJSON",
    "nsds5replicaLastUpdateStart",
    "nsds5replicaLastUpdateEnd",
    "nsds5replicaUpdateInProgress",
)
MAPPING_TREE = "cn=mapping tree,cn=config"


class BadAnswer(ValueError):
    """An attribute value that is not what 389-DS or Dogtag writes; the only exception the parsers raise.

    The probe never lets one bad value fail the whole probe: it is dropped and reported in
    ``DirectoryObservation.problems`` as "bad answer: ...".
    """


# ASCII digits only: "²".isdigit() is True and int("²") raises; "٣" would be read as 3
_PORT = re.compile(r"[0-9]{1,5}")
_REPLICA_ID = re.compile(r"[0-9]{1,5}")


def _short(value: object) -> str:
    text = value if isinstance(value, str) else type(value).__name__
    return repr(text[:40])


def parse_port(value: str | None) -> int | None:
    """An LDAP port attribute: None when absent, BadAnswer unless 1..65535 in ASCII digits."""
    if value is None or not value.strip():
        return None
    v = value.strip()
    if not _PORT.fullmatch(v) or not 0 < int(v) < 65536:
        raise BadAnswer(f"not a port number: {_short(v)}")
    return int(v)


def parse_replica_id(value: str | None) -> int | None:
    """``nsDS5ReplicaId``: 1..65535 (65535 is a read-only consumer)."""
    if value is None or not value.strip():
        return None
    v = value.strip()
    if not _REPLICA_ID.fullmatch(v) or not 0 < int(v) <= 65535:
        raise BadAnswer(f"not a replica id: {_short(v)}")
    return int(v)


class Seconds(float):
    """A timeout for ldap3: float for ``socket.settimeout`` and whole seconds for ``SO_RCVTIMEO``.

    ldap3 passes ``receive_timeout`` both to ``socket.settimeout`` (a float is fine) and to
    ``struct.pack('LL', timeout, 0)`` for SO_RCVTIMEO, which rejects a float ("required argument
    is not an integer"). ``__index__`` gives pack the rounded-up whole seconds while the Python
    level timeout, which is what fires first, keeps the exact value.
    """

    def __index__(self) -> int:
        return max(1, math.ceil(self))


# ---- CSN and RUV ----------------------------------------------------------------------------------

_CSN_RE = re.compile(r"[0-9a-fA-F]{20}")


@dataclass(frozen=True, order=True)
class CSN:
    """A change sequence number: time(8 hex) seq(4) replica id(4) sub-sequence(4).

    Field order is the comparison order 389-DS uses (csn_compare), so ``order=True`` is right.
    """

    timestamp: int
    seq: int
    rid: int
    subseq: int

    @classmethod
    def parse(cls, text: str) -> CSN:
        t = text.strip()
        if not _CSN_RE.fullmatch(t):
            raise BadAnswer(f"not a CSN (20 hex digits expected): {_short(text)}")
        return cls(int(t[0:8], 16), int(t[8:12], 16), int(t[12:16], 16), int(t[16:20], 16))

    @property
    def time(self) -> float:
        """Unix time of the change, in seconds."""
        return float(self.timestamp)

    def __str__(self) -> str:
        return f"{self.timestamp:08x}{self.seq:04x}{self.rid:04x}{self.subseq:04x}"


@dataclass(frozen=True)
class RUVElement:
    replica_id: int
    url: str
    min_csn: CSN | None
    max_csn: CSN | None


@dataclass(frozen=True)
class RUV:
    generation: str | None
    elements: tuple[RUVElement, ...]

    def max_csns(self) -> dict[int, CSN | None]:
        return {e.replica_id: e.max_csn for e in self.elements}


# {replica 1 ldap://localhost:3891} 6b0a0381000200010000 6b0a0391000000010000
# {replica 1 ldap://localhost:3891}                      (no change from rid 1 seen yet: pitfall 7)
_RUV_ELEMENT_RE = re.compile(
    r"\{replica\s+([0-9]{1,5})(?:\s+([^}]*))?\}\s*(?:(\S+)\s+(\S+))?\s*", re.IGNORECASE | re.ASCII
)
_RUV_GENERATION_RE = re.compile(r"^\{replicageneration\}\s*(\S+)?\s*$", re.IGNORECASE)


def parse_ruv_element(value: str) -> RUVElement:
    m = _RUV_ELEMENT_RE.fullmatch(value.strip())
    if not m:
        raise BadAnswer(f"not a RUV replica element: {_short(value)}")
    min_csn = CSN.parse(m.group(3)) if m.group(3) else None
    max_csn = CSN.parse(m.group(4)) if m.group(4) else None
    return RUVElement(int(m.group(1)), (m.group(2) or "").strip(), min_csn, max_csn)


def parse_ruv(values: Iterable[str], problems: list[str] | None = None) -> RUV:
    """Parse the values of ``nsds50ruv``. Unknown value kinds are skipped. A malformed element raises
    BadAnswer, or, when ``problems`` is given, is left out and reported there (a replica id whose
    element is left out counts as "no CSN": the cautious side for lag)."""
    generation: str | None = None
    elements: list[RUVElement] = []
    for raw in values:
        v = raw.strip()
        g = _RUV_GENERATION_RE.match(v)
        if g:
            generation = g.group(1)
        elif v.lower().startswith("{replica"):
            try:
                elements.append(parse_ruv_element(v))
            except BadAnswer as exc:
                if problems is None:
                    raise
                problems.append(f"bad answer: nsds50ruv: {exc}")
    return RUV(generation, tuple(elements))


def parse_agmt_maxcsn(value: str) -> tuple[str, CSN | None]:
    """``nsds5agmtmaxcsn``: ``suffix;agmt cn;host;port;consumer rid|unavailable;maxcsn`` -> (agmt cn, csn).

    The suffix itself may hold no ';', so split from the right.
    """
    parts = value.strip().rsplit(";", 5)
    if len(parts) != 6:
        raise BadAnswer(f"not an nsds5agmtmaxcsn value: {_short(value)}")
    csn_text = parts[5].strip()
    csn = CSN.parse(csn_text) if _CSN_RE.fullmatch(csn_text) else None
    return parts[1], csn


def lag_by_supplier(supplier_ruv: Mapping[int, CSN | None], consumer_ruv: Mapping[int, CSN | None]) -> dict[int, float]:
    """Seconds by which the consumer trails the supplier, per replica id the supplier knows.

    0.0 when the consumer has the supplier's max CSN (or a later one) or the supplier has no CSN
    for that id (nothing originated, so nothing to miss). ``math.inf`` when the supplier has a CSN
    and the consumer has none at all for that id (it has never received an incremental change
    from it; right after a total init this is normal until the next write, lab.md pitfall 7).
    CSN times have a resolution of one second, so an unsynchronised pair inside the same second
    shows 0.0: use :func:`in_sync` for exact equality.
    """
    lag: dict[int, float] = {}
    for rid, s_csn in supplier_ruv.items():
        c_csn = consumer_ruv.get(rid)
        if s_csn is None:
            lag[rid] = 0.0
        elif c_csn is None:
            lag[rid] = math.inf
        else:
            lag[rid] = max(0.0, s_csn.time - c_csn.time)
    return lag


def in_sync(supplier_ruv: Mapping[int, CSN | None], consumer_ruv: Mapping[int, CSN | None]) -> bool:
    """True when the consumer has every change the supplier has (max CSN per id not behind)."""
    for rid, s_csn in supplier_ruv.items():
        if s_csn is None:
            continue
        c_csn = consumer_ruv.get(rid)
        if c_csn is None or c_csn < s_csn:
            return False
    return True


# ---- agreements -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateStatus:
    state: State
    ldap_rc: int | None
    message: str
    date: datetime | None = None  # JSON "date": the last attempt, moves at every retry


# "Error (-1) Problem connecting to replica - LDAP error: Can't contact LDAP server (connection error)"
_STATUS_ERROR_RE = re.compile(r"^\s*Error\s*\((-?[0-9]{1,10})\)\s*(.*)$", re.DOTALL)
# before 389-DS 1.3.5: "0 Replica acquired successfully: Incremental update succeeded"
_STATUS_OLD_RE = re.compile(r"^\s*(-?[0-9]{1,10})\s+(.*)$", re.DOTALL)
# replica busy / backoff are transient (amber in the JSON form); they carry a replication rc,
# not an LDAP error, hence the "LDAP error" exclusion below
_AMBER_RE = re.compile(r"busy replica|backoff|back off|can't acquire replica", re.IGNORECASE)


def _state_from_rc(rc: int, text: str) -> State:
    if rc == 0:
        return "green"
    if _AMBER_RE.search(text) and "ldap error" not in text.lower():
        return "amber"
    return "red"


def parse_status_text(text: str | None) -> UpdateStatus:
    """``nsds5replicaLastUpdateStatus`` in its ``Error (rc) text`` or older ``rc text`` form."""
    if text is None or not text.strip():
        return UpdateStatus("unknown", None, "")
    t = text.strip()
    m = _STATUS_ERROR_RE.match(t) or _STATUS_OLD_RE.match(t)
    if not m:
        return UpdateStatus("unknown", None, t)
    rc = int(m.group(1))
    return UpdateStatus(_state_from_rc(rc, m.group(2)), rc, t)


def parse_status_json(text: str | None) -> UpdateStatus | None:
    """``nsds5replicaLastUpdateStatusJSON``; None when absent or unusable (caller falls back)."""
    if not text:
        return None
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    # only plain values are read: str() of a nested structure recurses, int(Infinity) overflows
    raw_state = doc.get("state")
    state = raw_state.lower() if isinstance(raw_state, str) else ""
    if state not in ("green", "amber", "red"):
        return None
    rc: int | None = None
    raw_rc = doc.get("ldap_rc")
    if isinstance(raw_rc, int) and not isinstance(raw_rc, bool) and -(2**31) <= raw_rc < 2**31:
        rc = raw_rc
    elif isinstance(raw_rc, str) and re.fullmatch(r"-?[0-9]{1,10}", raw_rc.strip()):
        rc = int(raw_rc.strip())
    date: datetime | None = None
    raw_date = doc.get("date")
    if isinstance(raw_date, str) and len(raw_date) <= 40:
        try:
            date = datetime.fromisoformat(raw_date.replace("Z", "+00:00"))
        except ValueError:
            date = None
    message = doc.get("message")
    return UpdateStatus(state, rc, message[:1000] if isinstance(message, str) else "", date)  # type: ignore[arg-type]


def parse_update_status(json_text: str | None, text: str | None) -> UpdateStatus:
    """Prefer the JSON attribute (389-DS >= 1.4.1.4), fall back to the text forms."""
    status = parse_status_json(json_text)
    if status is not None:
        if not status.message and text:
            return UpdateStatus(status.state, status.ldap_rc, text.strip(), status.date)
        return status
    return parse_status_text(text)


def parse_generalized_time(value: str | None) -> datetime | None:
    """``YYYYMMDDhhmmss[.f]Z`` (or ``+hhmm``) to an aware datetime; 0 and 1970-01-01 mean never."""
    if value is None:
        return None
    v = value.strip()
    if not v or v == "0" or v.startswith("19700101000000"):
        return None
    m = re.fullmatch(r"([0-9]{14})(?:[.,]([0-9]{1,9}))?(Z|[+-][0-9]{4})?", v)
    if not m:
        raise BadAnswer(f"not a GeneralizedTime: {_short(value)}")
    try:
        dt = datetime.strptime(m.group(1), "%Y%m%d%H%M%S")
        if m.group(2):
            dt = dt.replace(microsecond=int((m.group(2) + "000000")[:6]))
        tz = m.group(3) or "Z"
        return dt.replace(tzinfo=UTC if tz == "Z" else datetime.strptime(tz, "%z").tzinfo)
    except ValueError:  # 20251399000000Z: digits, but no date
        raise BadAnswer(f"not a GeneralizedTime: {_short(value)}") from None


@dataclass(frozen=True)
class Agreement:
    name: str
    consumer_host: str | None
    consumer_port: int | None
    state: State
    ldap_rc: int | None
    message: str
    last_update_start: datetime | None
    last_update_end: datetime | None
    in_progress: bool
    last_attempt: datetime | None = None  # JSON "date"
    sent_max_csn: CSN | None = None  # nsds5agmtmaxcsn: the last CSN this agreement sent


def _first(attrs: Mapping[str, Sequence[Any]], name: str) -> str | None:
    """First value of an attribute, case-insensitively (LDAP attribute names are)."""
    for k, v in attrs.items():
        if k.lower() == name.lower():
            if isinstance(v, (list, tuple)):
                return str(v[0]) if v else None
            return str(v)
    return None


def _all(attrs: Mapping[str, Sequence[Any]], name: str) -> list[str]:
    for k, v in attrs.items():
        if k.lower() == name.lower():
            return [str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)]
    return []


def _lenient_time(value: str | None) -> datetime | None:
    try:
        return parse_generalized_time(value)
    except BadAnswer:
        return None


def _lenient_port(value: str | None) -> int | None:
    try:
        return parse_port(value)
    except BadAnswer:
        return None


def parse_agreement(dn: str, attrs: Mapping[str, Sequence[Any]], sent_max_csn: CSN | None = None) -> Agreement:
    name = _first(attrs, "cn") or dn.split(",", 1)[0].partition("=")[2]
    port_text = _first(attrs, "nsds5replicaPort")
    status = parse_update_status(
        _first(attrs, "nsds5replicaLastUpdateStatusJSON"), _first(attrs, "nsds5replicaLastUpdateStatus")
    )
    return Agreement(
        name=name,
        consumer_host=_first(attrs, "nsds5replicaHost"),
        consumer_port=_lenient_port(port_text),
        state=status.state,
        ldap_rc=status.ldap_rc,
        message=status.message,
        last_update_start=_lenient_time(_first(attrs, "nsds5replicaLastUpdateStart")),
        last_update_end=_lenient_time(_first(attrs, "nsds5replicaLastUpdateEnd")),
        in_progress=(_first(attrs, "nsds5replicaUpdateInProgress") or "").strip().upper() == "TRUE",
        last_attempt=status.date,
        sent_max_csn=sent_max_csn,
    )


# ---- CRL issuing point records --------------------------------------------------------------------


@dataclass(frozen=True)
class CRLRecord:
    issuing_point: str
    crl_number: int | None
    this_update: datetime | None
    next_update: datetime | None


_DOGTAG_NUMBER = re.compile(r"([0-9]{2})(-?[0-9]+)")


def parse_dogtag_number(value: str) -> int:
    """Decode a number as Dogtag stores it in LDAP (BigIntegerMapper.BigIntegerToDB).

    The value is prefixed by the length of its decimal text, as two digits: ``011`` is 1, ``015``
    is 5, ``0210`` is 10, ``02-1`` is -1, ``101234567890`` is 1234567890. The encoding keeps
    LDAP's string ordering equal to numeric ordering. Anything else is a ValueError.
    """
    m = _DOGTAG_NUMBER.fullmatch(value.strip())
    if m is None or int(m.group(1)) != len(m.group(2)):
        raise BadAnswer(f"not a Dogtag LDAP number (length-prefixed decimal): {value[:40]!r}")
    return int(m.group(2))


def format_dogtag_number(number: int) -> str:
    """The inverse of parse_dogtag_number (what the simulated CA writes, as Dogtag does)."""
    text = str(number)
    if len(text) > 99:
        raise ValueError("Dogtag numbers have at most 99 digits")
    return f"{len(text):02d}{text}"


def parse_crl_record(dn: str, attrs: Mapping[str, Sequence[Any]]) -> CRLRecord:
    ip = _first(attrs, "cn") or dn.split(",", 1)[0].partition("=")[2]
    num = _first(attrs, "crlNumber")
    try:
        crl_number = parse_dogtag_number(num) if num is not None else None
    except BadAnswer:
        crl_number = None
    return CRLRecord(
        issuing_point=ip,
        crl_number=crl_number,
        this_update=_lenient_time(_first(attrs, "thisUpdate")),
        next_update=_lenient_time(_first(attrs, "nextUpdate")),
    )


# ---- the observation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DirectoryObservation:
    url: str
    ok: bool
    error: str | None
    latency: float
    replica_id: int | None = None
    agreements: tuple[Agreement, ...] = ()
    ruv_max_csn: Mapping[int, CSN | None] = field(default_factory=dict)
    crl_records: tuple[CRLRecord, ...] = ()
    ruv_generation: str | None = None
    observed_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # values that were not what 389-DS writes, left out of the observation ("bad answer: ...")
    problems: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        def ts(d: datetime | None) -> str | None:
            return d.isoformat() if d else None

        return {
            "url": self.url,
            "ok": self.ok,
            "error": self.error,
            "latency": round(self.latency, 6),
            "observed_at": ts(self.observed_at),
            "replica_id": self.replica_id,
            "ruv_generation": self.ruv_generation,
            "problems": list(self.problems),
            "ruv_max_csn": {str(k): (str(v) if v else None) for k, v in sorted(self.ruv_max_csn.items())},
            "agreements": [
                {
                    "name": a.name,
                    "consumer_host": a.consumer_host,
                    "consumer_port": a.consumer_port,
                    "state": a.state,
                    "ldap_rc": a.ldap_rc,
                    "message": a.message,
                    "last_update_start": ts(a.last_update_start),
                    "last_update_end": ts(a.last_update_end),
                    "last_attempt": ts(a.last_attempt),
                    "in_progress": a.in_progress,
                    "sent_max_csn": str(a.sent_max_csn) if a.sent_max_csn else None,
                }
                for a in self.agreements
            ],
            "crl_records": [
                {
                    "issuing_point": c.issuing_point,
                    "crl_number": c.crl_number,
                    "this_update": ts(c.this_update),
                    "next_update": ts(c.next_update),
                }
                for c in self.crl_records
            ],
        }


class ProbeError(Exception):
    """A server-side problem, already phrased for the operator."""


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    use_ssl: bool


def parse_ldap_url(url: str) -> _Target:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("ldap", "ldaps"):
        raise ValueError(f"not an ldap:// or ldaps:// URL: {url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in LDAP URL: {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in LDAP URL {url!r}: {exc}") from None
    use_ssl = scheme == "ldaps"
    return _Target(parts.hostname, port or (636 if use_ssl else 389), use_ssl)


def _describe(exc: BaseException, timeout: float) -> str:
    """Say why, in the operator's words: refused, timeout, TLS, bind..."""
    text = str(exc)
    low = text.lower()
    name = type(exc).__name__
    if isinstance(exc, ProbeError):
        return text
    if isinstance(exc, ssl.SSLError) or "ssl" in low or "certificate" in low or "tls" in name.lower():
        return f"TLS: {text}"
    if "refused" in low:
        return "connection refused"
    if name == "LDAPSocketReceiveError" or "receive" in low:
        return f"timeout: no answer within {timeout:g} s ({text})"
    if "timed out" in low or "timeout" in low:
        return f"timeout: could not connect within {timeout:g} s"
    if "unreachable" in low or "no route" in low:
        return f"unreachable: {text}"
    if "name or service not known" in low or "nodename" in low or "getaddrinfo" in low:
        return f"name resolution failed: {text}"
    return f"{name}: {text}"


def _probe_sync(
    url: str,
    bind_dn: str,
    password: str,
    basedn: str,
    timeout: float,
    ca_file: str | None,
    starttls: bool,
    deadline: float,
) -> DirectoryObservation:
    from ldap3 import NONE, SUBTREE, Connection, Server, Tls  # ldap3 has no type stubs

    t0 = time.monotonic()
    try:
        target = parse_ldap_url(url)
    except ValueError as exc:
        return DirectoryObservation(url, False, str(exc), 0.0)
    tls = None
    if target.use_ssl or starttls:
        tls = Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=ca_file)
    server = Server(
        target.host,
        port=target.port,
        use_ssl=target.use_ssl,
        tls=tls,
        get_info=NONE,  # raw strings; schema conversion would also cost a round trip
        connect_timeout=timeout,
    )
    conn = Connection(
        server,
        user=bind_dn,
        password=password,
        receive_timeout=Seconds(timeout),
        raise_exceptions=False,
        read_only=True,
    )

    def result_text() -> str:
        res = conn.result or {}
        return f"{res.get('description', 'error')} {res.get('message', '')}".strip()

    def check_time(what: str) -> None:
        if time.monotonic() > deadline:
            raise ProbeError(f"timeout: probe did not finish in time (stopped before {what})")

    def search(base: str, flt: str, scope: Any, attrs: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
        check_time(f"search {base}")
        ok = conn.search(base, flt, scope, attributes=list(attrs), time_limit=max(1, math.ceil(timeout)))
        rc = conn.result.get("result") if conn.result else None
        if not ok and rc not in (0, 32):  # 32 noSuchObject: the branch is just not there
            raise ProbeError(f"search {base} failed: {result_text()}")
        out = []
        for r in conn.response or []:
            if r.get("type") == "searchResEntry":
                out.append((str(r["dn"]), dict(r.get("attributes") or {})))
        return out

    try:
        conn.open(read_server_info=False)  # socket trouble raises even with raise_exceptions=False
        if starttls:
            if target.use_ssl:
                raise ProbeError("TLS: StartTLS requested on an ldaps:// URL")
            if not conn.start_tls(read_server_info=False):
                raise ProbeError(f"TLS: StartTLS failed: {result_text()}")
        check_time("bind")
        if not conn.bind(read_server_info=False):
            raise ProbeError(f"bind failed: {result_text()}")

        problems: list[str] = []
        replica_id: int | None = None
        replica_dn: str | None = None
        for dn, attrs in search(
            MAPPING_TREE,
            f"(&(objectClass=nsds5Replica)(nsDS5ReplicaRoot={_escape_filter(basedn)}))",
            SUBTREE,
            ["nsDS5ReplicaId"],
        ):
            replica_dn = dn
            try:
                replica_id = parse_replica_id(_first(attrs, "nsDS5ReplicaId"))
            except BadAnswer as exc:
                replica_id = None
                problems.append(f"bad answer: nsDS5ReplicaId: {exc}")

        ruv = RUV(None, ())
        sent: dict[str, CSN | None] = {}
        # pitfall 6: a base search on nsuniqueid=ffff...,<suffix> returns nothing; subtree works
        for _dn, attrs in search(basedn, RUV_FILTER, SUBTREE, ["nsds50ruv", "nsds5agmtmaxcsn"]):
            ruv = parse_ruv(_all(attrs, "nsds50ruv"), problems)
            for v in _all(attrs, "nsds5agmtmaxcsn"):
                try:
                    name, csn = parse_agmt_maxcsn(v)
                except BadAnswer as exc:
                    problems.append(f"bad answer: nsds5agmtmaxcsn: {exc}")
                    continue
                sent[name.lower()] = csn

        agreements: list[Agreement] = []
        if replica_dn is not None:
            for dn, attrs in search(replica_dn, AGREEMENT_FILTER, SUBTREE, AGREEMENT_ATTRS):
                cn = _first(attrs, "cn") or ""
                agreements.append(parse_agreement(dn, attrs, sent.get(cn.lower())))

        crls = [
            parse_crl_record(dn, attrs)
            for dn, attrs in search(
                f"ou=crlIssuingPoints,ou=ca,{basedn}",
                "(objectClass=*)",
                SUBTREE,
                ["cn", "crlNumber", "thisUpdate", "nextUpdate"],
            )
            if dn.lower().startswith("cn=")
        ]
        return DirectoryObservation(
            url=url,
            ok=True,
            error=None,
            latency=time.monotonic() - t0,
            replica_id=replica_id,
            agreements=tuple(sorted(agreements, key=lambda a: a.name)),
            ruv_max_csn=ruv.max_csns(),
            crl_records=tuple(sorted(crls, key=lambda c: c.issuing_point)),
            ruv_generation=ruv.generation,
            problems=tuple(problems),
        )
    except Exception as exc:  # ldap3 raises many unrelated types for socket trouble
        return DirectoryObservation(url, False, _describe(exc, timeout), time.monotonic() - t0)
    finally:
        with contextlib.suppress(Exception):  # unbinding a dead socket: nothing to report
            conn.unbind()


def _escape_filter(value: str) -> str:
    out = []
    for ch in value:
        if ch in "\\*()\0":
            out.append(f"\\{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


async def probe_directory(
    url: str,
    bind_dn: str,
    password: str,
    basedn: str = DEFAULT_BASEDN,
    timeout: float = 3.0,
    ca_file: str | None = None,
    starttls: bool = False,
) -> DirectoryObservation:
    """Probe one 389-DS; never raises for server problems (``ok=False`` and ``error`` say why).

    ``timeout`` bounds the TCP/TLS connect and every receive. The whole probe is bounded by
    ``2 * timeout`` (plus scheduling slack): a server that answers each request just under the
    receive timeout is as useless to the HA loop as a silent one.
    """
    t0 = time.monotonic()
    overall = 2 * timeout
    deadline = t0 + overall
    work = asyncio.to_thread(_probe_sync, url, bind_dn, password, basedn, timeout, ca_file, starttls, deadline)
    try:
        # a thread cannot be cancelled; the abandoned worker still ends by its own receive timeouts
        return await asyncio.wait_for(work, overall + 0.5)
    except TimeoutError:
        return DirectoryObservation(
            url, False, f"timeout: probe did not finish within {overall:g} s", time.monotonic() - t0
        )


# ---- `ca-watchdog probe ldap` ---------------------------------------------------------------------


def cli_main(args: argparse.Namespace) -> int:
    try:
        with open(args.password_file, encoding="utf-8") as f:
            password = f.read().rstrip("\r\n")
    except OSError as exc:
        print(f"ca-watchdog: cannot read password file: {exc}", file=sys.stderr)
        return 2
    try:
        parse_ldap_url(args.url)
    except ValueError as exc:
        print(f"ca-watchdog: {exc}", file=sys.stderr)
        return 2
    obs = asyncio.run(
        probe_directory(
            args.url,
            args.bind_dn,
            password,
            basedn=args.basedn,
            timeout=args.timeout,
            ca_file=args.cafile,
            starttls=args.starttls,
        )
    )
    print(json.dumps(obs.to_json(), indent=2))
    return 0 if obs.ok else 1
