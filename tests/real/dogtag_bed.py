"""Python side of the real-Dogtag test bed (``beds/dogtag/bed.sh``).

The bed is a Debian 11 chroot (default ``/srv/cawd-dogtag``, ``DOGTAG_ROOT`` overrides it) with a
real Dogtag 10.10 master CA ``pki-tomcat`` (https 8443, its 389-DS ``ds-master`` on 23389) and a
clone ``pki-tomcat-clone`` (https 9443, ``ds-clone`` on 24389), all on 127.0.0.1. ``DogtagBed``
knows where everything is, drives ``bed.sh`` for process control, and talks to the CAs and the
directories itself (plain ``http.client``/``ssl`` and ldap3), independently of the daemon's own
probes so that tests compare the daemon with what the servers really say.

Everything here is synchronous; from async tests call it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import subprocess
import time
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import ldap3

from ca_watchdog.probes.directory import parse_dogtag_number

REPO = Path(__file__).resolve().parents[2]
BED_SH = REPO / "beds" / "dogtag" / "bed.sh"
DEFAULT_ROOT = Path("/srv/cawd-dogtag")
BUILD_HINT = f"build it (as root, about 6 min from nothing): bash {BED_SH.relative_to(REPO)} build"

HOST = "127.0.0.1"
# the CAs' TLS server certificates are issued to CN=localhost (no subjectAltName)
TLS_NAME = "localhost"
DM_DN = "cn=Directory Manager"
DM_PASSWORD = "Secret.123"
SUFFIX = "o=pki-tomcat-CA"
CRL_DN = f"cn=MasterCRL,ou=crlIssuingPoints,ou=ca,{SUFFIX}"

STATUS_PATH = "/ca/admin/ca/getStatus"
# without an output template 10.10 answers 200 with "Error encountered while rendering a response."
INFO_PATH = "/ca/ee/ca/getInfo?template=/ee/ca/toDisplayCRL&xml=true"
UPDATE_CRL_PATH = "/ca/agent/ca/updateCRL"


class BedError(RuntimeError):
    """The bed is missing, or a bed.sh command failed."""


@dataclass(frozen=True)
class DSFacts:
    name: str
    ldap_port: int

    @property
    def url(self) -> str:
        return f"ldap://{HOST}:{self.ldap_port}"


@dataclass(frozen=True)
class CAFacts:
    name: str
    built_as: str  # the role pkispawn gave it: "master" or "clone"
    https_port: int
    http_port: int
    ds: str
    root: Path

    @property
    def cs_cfg(self) -> Path:
        return self.root / "etc" / "pki" / self.name / "ca" / "CS.cfg"

    @property
    def pid_file(self) -> Path:
        """Holds the JVM's pid while the CA runs (written by the chroot's systemctl stand-in)."""
        return self.root / "run" / "pki-shim" / f"{self.name}.pid"

    @property
    def log_dir(self) -> Path:
        """``debug.<date>.log`` (CRL update lines etc.), ``system``, ``transactions``."""
        return self.root / "var" / "log" / "pki" / self.name / "ca"

    @property
    def shim_log(self) -> Path:
        """The ExecStartPre output and Tomcat's console."""
        return self.root / "var" / "log" / "pki" / self.name / "systemd-shim.log"


@dataclass(frozen=True)
class CAStatus:
    """getStatus as the client saw it: ``status`` is ``<Status>`` (``running``) or None."""

    status: str | None
    state: str | None = None
    version: str | None = None
    http_status: int | None = None
    error: str | None = None  # "refused", "timeout", "HTTP 404", ...
    body: str = ""

    @property
    def running(self) -> bool:
        return self.status == "running"


@dataclass(frozen=True)
class CAInfo:
    """getInfo (toDisplayCRL template): empty master_host/master_port on a master."""

    master_host: str
    master_port: str
    crl_numbers: dict[str, int] = field(default_factory=dict)  # issuing point -> CRL number
    body: str = ""

    @property
    def master(self) -> str:
        """``host:port`` of the master this CA is a clone of, or "" on a master."""
        return f"{self.master_host}:{self.master_port}" if self.master_host else ""


@dataclass(frozen=True)
class CRLUpdate:
    """The answer to updateCRL: ``time`` (ms) when a CRL was generated, ``crl_update``
    (``notInitialized`` on a clone) when not, ``error`` for anything else."""

    time: str | None = None
    crl_update: str | None = None
    error: str | None = None
    http_status: int | None = None
    body: str = ""

    @property
    def outcome(self) -> str:
        """The time, ``notInitialized`` (or another crlUpdate value), or the error."""
        return self.time or self.crl_update or self.error or "?"


class _LoopbackHTTPS(http.client.HTTPSConnection):
    """Connects to 127.0.0.1 but checks the certificate against ``localhost``."""

    def __init__(self, port: int, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(HOST, port, context=context, timeout=timeout)
        self._tls_context = context

    def connect(self) -> None:
        sock = socket.create_connection((HOST, self.port), self.timeout)
        self.sock = self._tls_context.wrap_socket(sock, server_hostname=TLS_NAME)


def _text(root: ET.Element, tag: str) -> str:
    el = root.find(f".//{tag}")
    return (el.text or "").strip() if el is not None else ""


def _texts(root: ET.Element, tag: str) -> list[str]:
    out: list[str] = []
    for el in root.iter(tag):
        out.extend(part.strip() for part in (el.text or "").split(",") if part.strip())
    return out


def _parse_xml(body: str) -> ET.Element | None:
    try:
        return ET.fromstring(body)
    except ET.ParseError:
        return None


class DogtagBed:
    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root or os.environ.get("DOGTAG_ROOT") or DEFAULT_ROOT)
        self.lab = self.root / "root" / "lab"
        self.agent_pem = self.lab / "agent.pem"  # agent (caadmin) cert + key
        self.ca_pem = self.lab / "ca.pem"  # CA signing cert
        self.cas: dict[str, CAFacts] = {
            "pki-tomcat": CAFacts("pki-tomcat", "master", 8443, 8080, "ds-master", self.root),
            "pki-tomcat-clone": CAFacts("pki-tomcat-clone", "clone", 9443, 9080, "ds-clone", self.root),
        }
        self.dss: dict[str, DSFacts] = {
            "ds-master": DSFacts("ds-master", 23389),
            "ds-clone": DSFacts("ds-clone", 24389),
        }
        self._tls: ssl.SSLContext | None = None
        self._agent_tls: ssl.SSLContext | None = None

    # ---- facts ------------------------------------------------------------------------------

    def ca(self, inst: str) -> CAFacts:
        try:
            return self.cas[inst]
        except KeyError:
            raise KeyError(f"unknown CA instance {inst!r} (known: {', '.join(self.cas)})") from None

    def ds(self, name: str) -> DSFacts:
        try:
            return self.dss[name]
        except KeyError:
            raise KeyError(f"unknown DS {name!r} (known: {', '.join(self.dss)})") from None

    def ds_of(self, inst: str) -> DSFacts:
        return self.ds(self.ca(inst).ds)

    def is_built(self) -> bool:
        return (self.lab / ".done-ca-pki-tomcat-clone").is_file() and self.agent_pem.is_file() and self.ca_pem.is_file()

    def jvm_pid(self, inst: str) -> int | None:
        """The pid of the instance's running JVM, or None."""
        try:
            pid = int(self.ca(inst).pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, ValueError):
            return None
        return pid if f"-Dcatalina.base=/var/lib/pki/{inst} ".encode() in cmdline else None

    def cs_cfg_items(self, inst: str) -> dict[str, str]:
        """CS.cfg as key -> value (comment and blank lines left out; the last of a repeated key wins)."""
        items: dict[str, str] = {}
        for line in self.ca(inst).cs_cfg.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip() or line.lstrip().startswith("#") or "=" not in line:
                continue
            key, _, value = line.partition("=")
            items[key.strip()] = value.strip()
        return items

    def debug_log_lines(self, inst: str, contains: str = "") -> list[str]:
        """Lines of the instance's debug logs (oldest file first) that contain ``contains``."""
        out: list[str] = []
        for path in sorted(self.ca(inst).log_dir.glob("debug*")):
            with path.open(encoding="utf-8", errors="replace") as f:
                out.extend(line.rstrip("\n") for line in f if contains in line)
        return out

    # ---- bed.sh -----------------------------------------------------------------------------

    def command(self, *args: str) -> list[str]:
        """argv of a bed.sh command, e.g. for a daemon's start_command / stop_command."""
        return ["bash", str(BED_SH), *args]

    def ca_start_command(self, inst: str, guard_config: str | os.PathLike[str] | None = None) -> list[str]:
        extra = ["--guard-config", str(guard_config)] if guard_config is not None else []
        return self.command("ca-start", self.ca(inst).name, *extra)

    def ca_stop_command(self, inst: str) -> list[str]:
        return self.command("ca-stop", self.ca(inst).name)

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "DOGTAG_ROOT": str(self.root)}
        proc = subprocess.run(
            self.command(*args),
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise BedError(f"bed.sh {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc

    def bed_status(self) -> tuple[bool, str]:
        """(all four processes up and answering, bed.sh status output)."""
        proc = self.run("status", timeout=120, check=False)
        return proc.returncode == 0, (proc.stdout + proc.stderr).strip()

    def ensure_running(self, timeout: float = 600) -> None:
        """Both DS answering and both CAs running; starts what is stopped. BedError otherwise."""
        if not self.is_built():
            raise BedError(f"no Dogtag bed at {self.root}; {BUILD_HINT}")
        if all(self.get_status(i).running for i in self.cas) and all(self.ds_up(d) for d in self.dss):
            return
        self.run("start", "all", timeout=timeout)
        up, out = self.bed_status()
        if not up:
            raise BedError(f"the Dogtag bed did not come up:\n{out}")

    def start(self, which: str = "all") -> None:
        self.run("start", which)

    def stop(self, which: str = "all") -> None:
        self.run("stop", which)

    def start_ca(self, inst: str, guard_config: str | os.PathLike[str] | None = None) -> None:
        """Launch the CA's JVM (returns before it is running: see wait_running)."""
        self.run(*self.ca_start_command(inst, guard_config)[2:], timeout=120)

    def stop_ca(self, inst: str) -> None:
        self.run("ca-stop", self.ca(inst).name, timeout=180)

    def kill_ca(self, inst: str) -> None:
        """SIGKILL the CA's JVM (a crash)."""
        self.run("kill-ca", self.ca(inst).name, timeout=60)

    def kill_ds(self, ds: str) -> None:
        """SIGKILL the 389-DS (a crash)."""
        self.run("kill-ds", self.ds(ds).name, timeout=60)

    def start_ds(self, ds: str) -> None:
        """Start the 389-DS and wait until it answers LDAP."""
        self.run("start-ds", self.ds(ds).name, timeout=120)

    def wait_running(self, inst: str, timeout: float = 300, interval: float = 0.25) -> float:
        """Wait until getStatus says running; returns the seconds waited."""
        t0 = time.monotonic()
        last = CAStatus(None, error="not asked")
        while time.monotonic() - t0 < timeout:
            last = self.get_status(inst, timeout=3)
            if last.running:
                return time.monotonic() - t0
            time.sleep(interval)
        raise TimeoutError(f"{inst} not running after {timeout:g} s (last: {last.error or last.status})")

    # ---- HTTP -------------------------------------------------------------------------------

    def tls_context(self, agent: bool = False) -> ssl.SSLContext:
        """Verifies the CA's server cert against ca.pem; with ``agent`` also presents the agent cert."""
        cached = self._agent_tls if agent else self._tls
        if cached is not None:
            return cached
        ctx = ssl.create_default_context(cafile=str(self.ca_pem))
        # the server certs have their name only in the CN
        ctx.hostname_checks_common_name = True
        if agent:
            ctx.load_cert_chain(str(self.agent_pem))
            self._agent_tls = ctx
        else:
            self._tls = ctx
        return ctx

    def request(
        self,
        inst: str,
        method: str,
        path: str,
        body: str | None = None,
        agent: bool = False,
        timeout: float = 10,
        https: bool = True,
    ) -> tuple[int, str]:
        """(HTTP status, body) of one request to the instance. OSError on connection problems."""
        facts = self.ca(inst)
        conn: http.client.HTTPConnection
        if https:
            conn = _LoopbackHTTPS(facts.https_port, self.tls_context(agent), timeout)
        else:
            conn = http.client.HTTPConnection(HOST, facts.http_port, timeout=timeout)
        try:
            headers = {"Content-Type": "application/x-www-form-urlencoded"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def request_with_headers(
        self, inst: str, method: str, path: str, headers: dict[str, str], timeout: float = 10
    ) -> tuple[int, str, str]:
        """(HTTP status, body, Content-Type) of one https request with these request headers."""
        conn = _LoopbackHTTPS(self.ca(inst).https_port, self.tls_context(), timeout)
        try:
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8", "replace"), resp.getheader("Content-Type") or ""
        finally:
            conn.close()

    def get_status(self, inst: str, timeout: float = 5, https: bool = True) -> CAStatus:
        """getStatus (XML in 10.10). Never raises for server trouble: see ``error``."""
        try:
            code, body = self.request(inst, "GET", STATUS_PATH, timeout=timeout, https=https)
        except ConnectionRefusedError:
            return CAStatus(None, error="refused")
        except TimeoutError:
            return CAStatus(None, error="timeout")
        except (OSError, http.client.HTTPException) as exc:
            return CAStatus(None, error=f"{type(exc).__name__}: {exc}")
        root = _parse_xml(body)
        if code != 200 or root is None:
            return CAStatus(None, http_status=code, error=f"HTTP {code}", body=body)
        return CAStatus(
            _text(root, "Status") or None,
            state=_text(root, "State") or None,
            version=_text(root, "Version") or None,
            http_status=code,
            body=body,
        )

    def get_info(self, inst: str, timeout: float = 10) -> CAInfo:
        """getInfo with the toDisplayCRL template. BedError when the answer is not the expected XML."""
        code, body = self.request(inst, "GET", INFO_PATH, timeout=timeout)
        root = _parse_xml(body)
        if code != 200 or root is None or root.find("header") is None:
            raise BedError(f"getInfo on {inst}: HTTP {code}: {body[:300]!r}")
        points = _texts(root, "crlIssuingPoints")
        numbers = _texts(root, "crlNumbers")
        crl_numbers = {p: int(n) for p, n in zip(points, numbers, strict=False) if n.lstrip("-").isdigit()}
        return CAInfo(_text(root, "master_host"), _text(root, "master_port"), crl_numbers, body)

    def update_crl(self, inst: str, issuing_point: str = "MasterCRL", timeout: float = 120) -> CRLUpdate:
        """updateCRL with the agent cert, waiting for the update. Never raises for server answers."""
        form = urllib.parse.urlencode({"crlIssuingPoint": issuing_point, "waitForUpdate": "true", "xml": "true"})
        try:
            code, body = self.request(inst, "POST", UPDATE_CRL_PATH, body=form, agent=True, timeout=timeout)
        except (OSError, http.client.HTTPException) as exc:
            return CRLUpdate(error=f"{type(exc).__name__}: {exc}")
        root = _parse_xml(body)
        if code != 200 or root is None:
            return CRLUpdate(error=f"HTTP {code}: {body[:200]}", http_status=code, body=body)
        when, state = _text(root, "time"), _text(root, "crlUpdate")
        if when or state:
            return CRLUpdate(time=when or None, crl_update=state or None, http_status=code, body=body)
        return CRLUpdate(error=f"unexpected answer: {body[:300]}", http_status=code, body=body)

    # ---- LDAP -------------------------------------------------------------------------------

    def ldap_connection(self, ds: str, timeout: float = 5) -> ldap3.Connection:
        server = ldap3.Server(HOST, port=self.ds(ds).ldap_port, connect_timeout=timeout)
        return ldap3.Connection(server, DM_DN, DM_PASSWORD, auto_bind=True, receive_timeout=timeout)

    def ds_up(self, ds: str) -> bool:
        try:
            conn = self.ldap_connection(ds, timeout=2)
        except ldap3.core.exceptions.LDAPException:
            return False
        conn.unbind()
        return True

    def ldap_crl_entry(self, ds: str) -> dict[str, str]:
        """The MasterCRL issuing point entry (text attributes only) as Directory Manager."""
        conn = self.ldap_connection(ds)
        try:
            attrs = ["crlNumber", "deltaNumber", "crlSize", "thisUpdate", "nextUpdate", "firstUnsaved"]
            if not conn.search(CRL_DN, "(objectClass=*)", search_scope=ldap3.BASE, attributes=attrs):
                raise BedError(f"{CRL_DN} not found on {ds}: {conn.result}")
            entry = conn.entries[0].entry_attributes_as_dict
            return {k: str(v[0]) for k, v in entry.items() if v}
        finally:
            conn.unbind()

    def ldap_crl_number(self, ds: str) -> int:
        """crlNumber of MasterCRL in that DS, decoded (Dogtag stores 1 as ``011``)."""
        return parse_dogtag_number(self.ldap_crl_entry(ds)["crlNumber"])
