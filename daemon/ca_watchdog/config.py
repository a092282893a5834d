"""TOML configuration into typed, validated settings.

Every error names the key path (`timing.ttl`, `cluster.members[2].name`) and what is wrong;
unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import ssl
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit

DEFAULT_CONFIG_PATH = "/etc/ca-watchdog/config.toml"

# a member name goes into fence_command's argv, journal fields, metric labels and store keys
MEMBER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# sane bounds of every duration (seconds): (lowest, highest)
BOUNDS: dict[str, tuple[float, float]] = {
    "timing.interval": (0.1, 300.0),
    "timing.agent_timeout": (0.05, 300.0),
    "timing.ldap_timeout": (0.05, 300.0),
    "timing.store_timeout": (0.05, 300.0),
    "timing.ttl": (1.0, 3600.0),
    "timing.safety_margin": (0.1, 3600.0),
    "timing.start_timeout": (1.0, 3600.0),
    "timing.stop_timeout": (1.0, 3600.0),
    "failover.maximum_lag": (0.0, 86400.0),
    "failover.failover_cooldown": (0.0, 30 * 86400.0),
    "api.request_head_timeout": (0.5, 60.0),
}


class ConfigError(ValueError):
    def __init__(self, source: str, key: str | None, message: str) -> None:
        self.source = source
        self.key = key
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class NodeSettings:
    name: str
    cs_cfg: str
    service: str = "pki-tomcatd@pki-tomcat.service"
    service_control: Literal["systemd", "command"] = "systemd"
    start_command: tuple[str, ...] = ()
    stop_command: tuple[str, ...] = ()
    pid_file: str | None = None  # service_control = "command": the CA's pid file, to see a start die early
    ldap_bind_dn: str = "cn=Directory Manager"
    ldap_password_file: str | None = None
    # the daemon's lease, handed to the guard on this host (lease_file.py); on a filesystem of this boot
    lease_file: str = "/run/ca-watchdog/lease.json"


@dataclass(frozen=True)
class MemberSettings:
    name: str
    agent_url: str
    ldap_url: str | None = None  # None: no 389-DS probe for this member (lab without a directory)
    # ldap:// upgraded with StartTLS (certificate checked against tls.ca_file) before the bind
    ldap_starttls: bool = False
    api_url: str | None = None
    priority: int = 100
    nofailover: bool = False

    @property
    def agent_host(self) -> str:
        return urlsplit(self.agent_url).hostname or ""

    @property
    def agent_port(self) -> int:
        u = urlsplit(self.agent_url)
        return u.port or (443 if u.scheme == "https" else 80)


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: tuple[str, ...]
    prefix: str = "/ca-watchdog/"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password_file: str | None = None


@dataclass(frozen=True)
class StoreSettings:
    backend: Literal["sqlite", "etcd"] = "sqlite"
    path: str = "/var/lib/ca-watchdog/state.db"
    etcd: EtcdSettings | None = None


@dataclass(frozen=True)
class TimingSettings:
    interval: float = 2.0
    agent_timeout: float = 3.0
    ldap_timeout: float = 3.0
    store_timeout: float = 2.0
    failure_threshold: int = 3
    ttl: float = 30.0
    safety_margin: float = 5.0
    start_timeout: float = 180.0
    stop_timeout: float = 90.0

    @property
    def cycle_budget(self) -> float:
        """The longest one HA cycle can take with the store unreachable: the wait, the local probe,
        one store call timing out, the failsafe questions to the peers."""
        return self.interval + 2 * self.agent_timeout + self.store_timeout + 0.5


@dataclass(frozen=True)
class FailoverSettings:
    restart_before_failover: bool = True
    maximum_lag: float = 60.0
    failover_cooldown: float = 3600.0
    fence_command: tuple[str, ...] = ()


@dataclass(frozen=True)
class TLSSettings:
    """Material for talking to the CAs' agent ports and for the peer API."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class APISettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8099
    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None
    # who may call what (subject DNs in RFC 4514 form or "sha256:" certificate fingerprints)
    operators: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    crl_file: str | None = None
    max_connections: int = 256
    request_head_timeout: float = 5.0


@dataclass(frozen=True)
class Settings:
    source: str
    node: NodeSettings
    members: tuple[MemberSettings, ...]
    store: StoreSettings = field(default_factory=StoreSettings)
    timing: TimingSettings = field(default_factory=TimingSettings)
    failover: FailoverSettings = field(default_factory=FailoverSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    api: APISettings = field(default_factory=APISettings)
    # cluster.insecure = true: the cleartext URLs to other hosts it allowed ("key = url")
    insecure: tuple[str, ...] = ()

    @property
    def me(self) -> MemberSettings:
        return self.member(self.node.name)

    def member(self, name: str) -> MemberSettings:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)

    def ldap_password(self) -> str | None:
        return read_secret(self.node.ldap_password_file)


class SecretError(ValueError):
    """A secret (credential) cannot be read; the message names the file, never its content."""


def secret_path(path: str) -> Path:
    """An absolute path as it is; a bare name is a systemd credential in `$CREDENTIALS_DIRECTORY`."""
    if os.path.isabs(path):
        return Path(path)
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if "/" in path or not creds:
        raise SecretError(
            f"{path!r} is a bare credential name but $CREDENTIALS_DIRECTORY is not set "
            "(run under systemd with LoadCredential=, or give an absolute path)"
            if "/" not in path
            else f"{path!r} is a relative path (give an absolute path or a bare credential name)"
        )
    return Path(creds) / path


def read_secret(path: str | None) -> str | None:
    """A secret from a file; a bare name is looked up in `$CREDENTIALS_DIRECTORY` (systemd LoadCredential=)."""
    if path is None:
        return None
    p = secret_path(path)
    try:
        return p.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretError(f"cannot read {str(p)!r}: {getattr(exc, 'strerror', None) or type(exc).__name__}") from exc


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def normalize_identity(text: str) -> str:
    """An allow-list entry in one canonical form: "sha256:<64 lowercase hex>" or an RFC 4514 DN as
    `cryptography` renders it (so "cn=x, o=y" and "CN=x,O=y" match). ValueError if it is neither."""
    t = text.strip()
    hexpart = t[7:] if t.lower().startswith("sha256:") else t
    compact = hexpart.replace(":", "").lower()
    if re.fullmatch(r"[0-9a-f]{64}", compact):
        return "sha256:" + compact
    if t.lower().startswith("sha256:") or "=" not in t:
        raise ValueError(f"{text!r} is neither a subject DN (CN=...,O=...) nor a sha256: fingerprint")
    from cryptography import x509

    # "CN=x, O=y" (the OpenSSL/ldap style) is the same DN as "CN=x,O=y"
    parts = [p.strip() for p in re.split(r"(?<!\\),", t)]
    t = ",".join(re.sub(r"^([^=]+?)\s*=\s*", r"\1=", p) for p in parts)
    try:
        name = x509.Name.from_rfc4514_string(t)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an RFC 4514 subject DN: {exc}") from exc
    return name.rfc4514_string()


class _Table:
    """Reads one TOML table, remembering which keys were consumed to reject the rest."""

    def __init__(self, source: str, path: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(source, path or None, f"must be a table, not {type(data).__name__}")
        self.source, self.path = source, path
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), message)

    def _get(self, name: str, kind: type | tuple[type, ...], what: str, required: bool, default: Any) -> Any:
        self.used.add(name)
        if name not in self.data:
            if required:
                raise self.error(name, "is required")
            return default
        v = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(v, bool) and bool not in kinds:  # TOML true is not 1
            raise self.error(name, f"must be {what}, not a boolean")
        if not isinstance(v, kinds):
            raise self.error(name, f"must be {what}, not {type(v).__name__} {v!r}")
        return v

    def opt_text(self, name: str, default: str | None = None) -> str | None:
        v: str | None = self._get(name, str, "a string", False, default)
        if v is not None and not v.strip():
            raise self.error(name, "must not be empty")
        return v

    def text(self, name: str, default: str | None = None) -> str:
        """A string that must be there: required when default is None."""
        v: str = self._get(name, str, "a string", default is None, default)
        if not v.strip():
            raise self.error(name, "must not be empty")
        return v

    def num(self, name: str, default: float) -> float:
        """A duration in seconds within BOUNDS[key]."""
        v = float(self._get(name, (int, float), "a number", False, default))
        if not math.isfinite(v):  # TOML allows inf and nan; no timing can be either
            raise self.error(name, f"must be a finite number, not {v}")
        low, high = BOUNDS[self.key(name)]
        if not low <= v <= high:
            raise self.error(name, f"must be between {low:g} and {high:g} seconds, not {v:g}")
        return v

    def integer(self, name: str, default: int, minimum: int = 1, maximum: int | None = None) -> int:
        v: int = self._get(name, int, "an integer", False, default)
        if v < minimum or (maximum is not None and v > maximum):
            rng = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise self.error(name, f"must be {rng}, not {v}")
        return v

    def boolean(self, name: str, default: bool) -> bool:
        v: bool = self._get(name, bool, "true or false", False, default)
        return v

    def argv(self, name: str) -> tuple[str, ...]:
        v: list[Any] = self._get(name, list, "a list of strings (an argv, no shell)", False, [])
        if not all(isinstance(a, str) and a for a in v):
            raise self.error(name, "must be a list of non-empty strings (an argv, no shell)")
        return tuple(str(a) for a in v)

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        v = self.text(name, default)
        if v not in choices:
            raise self.error(name, f"must be one of {', '.join(choices)}, not {v!r}")
        return v

    def sub(self, name: str, required: bool = False) -> _Table | None:
        self.used.add(name)
        if name not in self.data:
            if required:
                raise self.error(name, "is required")
            return None
        return _Table(self.source, self.key(name), self.data[name])

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _check_url(t: _Table, name: str, v: str, schemes: tuple[str, ...]) -> str:
    u = urlsplit(v)
    if u.scheme not in schemes or not u.hostname:
        raise t.error(name, f"must be a {'/'.join(schemes)} URL with a host, not {v!r}")
    try:
        u.port  # noqa: B018  (raises on a bad port)
    except ValueError as exc:
        raise t.error(name, f"bad port in {v!r}") from exc
    return v


def _url(t: _Table, name: str, schemes: tuple[str, ...]) -> str:
    return _check_url(t, name, t.text(name), schemes)


def _opt_url(t: _Table, name: str, schemes: tuple[str, ...]) -> str | None:
    v = t.opt_text(name)
    return None if v is None else _check_url(t, name, v, schemes)


def _absolute(t: _Table, name: str, v: str) -> str:
    # the daemon (cwd /), the guard (run by PID 1) and the CLI must all mean the same file
    if not os.path.isabs(v):
        raise t.error(name, f"must be an absolute path, not {v!r}")
    return v


def _file(t: _Table, name: str, must_exist: bool, credential: bool = False) -> str | None:
    v = t.opt_text(name)
    if v is None:
        return None
    if credential:
        # a bare name is a systemd credential, looked up in $CREDENTIALS_DIRECTORY (read_secret)
        if not os.path.isabs(v) and "/" in v:
            raise t.error(name, f"must be an absolute path or a bare credential name, not {v!r}")
        if must_exist:
            try:
                read_secret(v)
            except SecretError as exc:
                raise t.error(name, str(exc)) from exc
        return v
    _absolute(t, name, v)
    if must_exist and not os.path.exists(v):
        raise t.error(name, f"file {v!r} does not exist")
    return v


def _node(t: _Table, check_files: bool) -> NodeSettings:
    control = t.choice("service_control", ("systemd", "command"), "systemd")
    n = NodeSettings(
        name=t.text("name"),
        cs_cfg=_absolute(t, "cs_cfg", t.text("cs_cfg", "/etc/pki/pki-tomcat/ca/CS.cfg")),
        service=t.text("service", "pki-tomcatd@pki-tomcat.service"),
        service_control=cast(Literal["systemd", "command"], control),
        start_command=t.argv("start_command"),
        stop_command=t.argv("stop_command"),
        pid_file=_file(t, "pid_file", must_exist=False),
        ldap_bind_dn=t.text("ldap_bind_dn", "cn=Directory Manager"),
        ldap_password_file=_file(t, "ldap_password_file", check_files, credential=True),
        lease_file=_absolute(t, "lease_file", t.text("lease_file", "/run/ca-watchdog/lease.json")),
    )
    if control == "command" and not n.start_command:
        raise t.error("start_command", 'service_control = "command" needs start_command and stop_command')
    if control == "command" and not n.stop_command:
        raise t.error("stop_command", 'service_control = "command" needs start_command and stop_command')
    if check_files and not os.path.exists(n.cs_cfg):
        raise t.error("cs_cfg", f"file {n.cs_cfg!r} does not exist")
    t.done()
    return n


def _members(source: str, data: Any) -> tuple[MemberSettings, ...]:
    if not isinstance(data, list) or not data:
        raise ConfigError(
            source, "cluster.members", "must be a non-empty array of tables ([[cluster.members]])"
        )
    out: list[MemberSettings] = []
    for i, raw in enumerate(data):
        t = _Table(source, f"cluster.members[{i}]", raw)
        name = t.text("name")
        if not MEMBER_NAME.fullmatch(name):
            raise t.error("name", f"must be 1 to 64 of A-Z a-z 0-9 . _ - (no spaces, no newlines), not {name!r}")
        if name.startswith("-"):
            raise t.error("name", f"must not start with '-' (it is passed as an argument), not {name!r}")
        m = MemberSettings(
            name=name,
            agent_url=_url(t, "agent_url", ("https", "http")),
            ldap_url=_opt_url(t, "ldap_url", ("ldap", "ldaps")),
            ldap_starttls=t.boolean("ldap_starttls", False),
            api_url=_opt_url(t, "api_url", ("https", "http")),
            priority=t.integer("priority", 100, minimum=0, maximum=1_000_000),
            nofailover=t.boolean("nofailover", False),
        )
        if m.ldap_starttls and m.ldap_url is None:
            raise t.error("ldap_starttls", "needs ldap_url (an ldap:// URL to upgrade with StartTLS)")
        if m.ldap_starttls and urlsplit(m.ldap_url or "").scheme != "ldap":
            raise t.error("ldap_starttls", f"is for ldap:// URLs; {m.ldap_url!r} is TLS from the start already")
        t.done()
        if any(o.name == m.name for o in out):
            raise t.error("name", f"duplicate member name {m.name!r}")
        out.append(m)
    return tuple(out)


def _store(t: _Table | None, check_files: bool) -> StoreSettings:
    if t is None:
        return StoreSettings()
    backend = t.choice("backend", ("sqlite", "etcd"), "sqlite")
    path = _absolute(t, "path", t.text("path", StoreSettings.path))
    e = t.sub("etcd", required=backend == "etcd")
    etcd = None
    if e is not None:
        eps: list[Any] = e._get("endpoints", list, "a list of URLs", True, None)
        if not eps or not all(isinstance(x, str) for x in eps):
            raise e.error("endpoints", "must be a non-empty list of URLs")
        for x in eps:
            u = urlsplit(x)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise e.error("endpoints", f"{x!r} is not an http(s) URL")
            try:
                u.port  # noqa: B018  (raises on a bad port)
            except ValueError as exc:
                raise e.error("endpoints", f"bad port in {x!r}") from exc
        prefix = e.text("prefix", "/ca-watchdog/")
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise e.error("prefix", f"must start and end with '/', not {prefix!r}")
        etcd = EtcdSettings(
            endpoints=tuple(str(x) for x in eps),
            prefix=prefix,
            ca_file=_file(e, "ca_file", check_files),
            cert_file=_file(e, "cert_file", check_files),
            key_file=_file(e, "key_file", check_files),
            username=e.opt_text("username"),
            password_file=_file(e, "password_file", check_files, credential=True),
        )
        if (etcd.cert_file is None) != (etcd.key_file is None):
            raise e.error(
                "cert_file" if etcd.cert_file is None else "key_file", "cert_file and key_file go together"
            )
        if (etcd.username is None) != (etcd.password_file is None):
            raise e.error(
                "username" if etcd.username is None else "password_file",
                "username and password_file go together",
            )
        e.done()
    t.done()
    return StoreSettings(backend=cast(Literal["sqlite", "etcd"], backend), path=path, etcd=etcd)


def _timing(t: _Table | None) -> TimingSettings:
    if t is None:
        return TimingSettings()
    d = TimingSettings()
    s = TimingSettings(
        interval=t.num("interval", d.interval),
        agent_timeout=t.num("agent_timeout", d.agent_timeout),
        ldap_timeout=t.num("ldap_timeout", d.ldap_timeout),
        store_timeout=t.num("store_timeout", d.store_timeout),
        failure_threshold=t.integer("failure_threshold", d.failure_threshold, minimum=1, maximum=100),
        ttl=t.num("ttl", d.ttl),
        safety_margin=t.num("safety_margin", d.safety_margin),
        start_timeout=t.num("start_timeout", d.start_timeout),
        stop_timeout=t.num("stop_timeout", d.stop_timeout),
    )
    t.done()
    return s


def _failover(t: _Table | None) -> FailoverSettings:
    if t is None:
        return FailoverSettings()
    d = FailoverSettings()
    s = FailoverSettings(
        restart_before_failover=t.boolean("restart_before_failover", d.restart_before_failover),
        maximum_lag=t.num("maximum_lag", d.maximum_lag),
        failover_cooldown=t.num("failover_cooldown", d.failover_cooldown),
        fence_command=t.argv("fence_command"),
    )
    t.done()
    return s


def _tls(t: _Table | None, check_files: bool) -> TLSSettings:
    if t is None:
        return TLSSettings()
    s = TLSSettings(
        ca_file=_file(t, "ca_file", check_files),
        cert_file=_file(t, "cert_file", check_files),
        key_file=_file(t, "key_file", check_files),
    )
    if (s.cert_file is None) != (s.key_file is None):
        raise t.error(
            "cert_file" if s.cert_file is None else "key_file", "cert_file and key_file go together"
        )
    t.done()
    return s


def _api(t: _Table | None, check_files: bool) -> APISettings:
    if t is None:
        return APISettings()
    d = APISettings()
    s = APISettings(
        listen_host=t.text("listen_host", d.listen_host),
        listen_port=t.integer("listen_port", d.listen_port, minimum=1, maximum=65535),
        cert_file=_file(t, "cert_file", check_files),
        key_file=_file(t, "key_file", check_files),
        client_ca_file=_file(t, "client_ca_file", check_files),
        operators=_identities(t, "operators"),
        peers=_identities(t, "peers"),
        crl_file=_file(t, "crl_file", check_files),
        max_connections=t.integer("max_connections", d.max_connections, minimum=8, maximum=10_000),
        request_head_timeout=t.num("request_head_timeout", d.request_head_timeout),
    )
    if (s.cert_file is None) != (s.key_file is None):
        raise t.error(
            "cert_file" if s.cert_file is None else "key_file", "cert_file and key_file go together"
        )
    if s.client_ca_file and not s.cert_file:
        raise t.error("client_ca_file", "needs cert_file and key_file (client certificates need TLS)")
    for name in ("operators", "peers", "crl_file"):
        if getattr(s, name) and not s.client_ca_file:
            raise t.error("client_ca_file", f"is required with api.{name} (client certificates are checked against it)")
    t.done()
    return s


def _identities(t: _Table, name: str) -> tuple[str, ...]:
    v: list[Any] = t._get(name, list, "a list of subject DNs or sha256: fingerprints", False, [])
    out = []
    for i, item in enumerate(v):
        if not isinstance(item, str):
            raise t.error(name, f"[{i}] must be a string, not {type(item).__name__}")
        try:
            out.append(normalize_identity(item))
        except ValueError as exc:
            raise t.error(name, f"[{i}] {exc}") from exc
    return tuple(out)


def parse_settings(data: dict[str, Any], source: str = "<config>", check_files: bool = False) -> Settings:
    root = _Table(source, "", data)
    node_t = root.sub("node", required=True)
    assert node_t is not None
    node = _node(node_t, check_files)
    cluster = root.sub("cluster", required=True)
    assert cluster is not None
    cluster.used.add("members")
    members = _members(source, cluster.data.get("members"))
    insecure = cluster.boolean("insecure", False)
    cluster.done()
    settings = Settings(
        source=source,
        node=node,
        members=members,
        store=_store(root.sub("store"), check_files),
        timing=_timing(root.sub("timing")),
        failover=_failover(root.sub("failover")),
        tls=_tls(root.sub("tls"), check_files),
        api=_api(root.sub("api"), check_files),
    )
    root.done()
    if not any(m.name == node.name for m in members):
        names = ", ".join(m.name for m in members)
        raise ConfigError(source, "node.name", f"{node.name!r} is not one of cluster.members ({names})")
    cleartext = _cleartext_urls(settings)
    if cleartext and not insecure:
        key, url = cleartext[0]
        raise ConfigError(
            source,
            key,
            f"{url!r} is cleartext to a host other than loopback (use https:// or ldaps://, "
            "or set cluster.insecure = true to allow it)",
        )
    settings = replace(settings, insecure=tuple(f"{k} = {u}" for k, u in cleartext))
    a = settings.api
    peers_asked = [m.name for m in members if m.api_url and m.name != node.name]
    if peers_asked and a.cert_file and not a.client_ca_file:
        raise ConfigError(
            source,
            "api.client_ca_file",
            f"is required when members have api_url ({', '.join(peers_asked)}): without it no peer "
            "can ask this member's /failsafe and the failsafe is silently off",
        )
    if peers_asked and a.client_ca_file and not a.peers:
        raise ConfigError(
            source,
            "api.peers",
            f"must list the peers' certificates when members have api_url ({', '.join(peers_asked)}): "
            "otherwise every peer's /failsafe question is refused and the failsafe is silently off",
        )
    t = settings.timing
    if not t.interval + 2 * t.store_timeout < t.ttl:
        raise ConfigError(
            source,
            "timing.ttl",
            f"interval + 2*store_timeout must be < ttl "
            f"({t.interval:g} + 2*{t.store_timeout:g} >= {t.ttl:g}): "
            "the master could lose its lease between two renewals",
        )
    if not t.safety_margin < t.ttl - t.interval:
        raise ConfigError(
            source, "timing.safety_margin", f"must be < ttl - interval ({t.ttl - t.interval:g})"
        )
    for name, value in (("agent_timeout", t.agent_timeout), ("ldap_timeout", t.ldap_timeout)):
        if value >= t.ttl:
            # a probe that outlives the lease cannot tell a live master from a dead one in time
            raise ConfigError(source, f"timing.{name}", f"must be shorter than ttl ({value:g} >= {t.ttl:g})")
    if t.ttl - t.safety_margin - t.cycle_budget < t.interval:
        # a master self-fences one worst-case cycle before ttl - safety_margin; that point must
        # leave at least one interval for a renewal, or every store blip would fence the master
        raise ConfigError(
            source,
            "timing.ttl",
            f"ttl - safety_margin - (interval + 2*agent_timeout + store_timeout + 0.5) must be >= interval "
            f"({t.ttl:g} - {t.safety_margin:g} - {t.cycle_budget:g} < {t.interval:g})",
        )
    return settings


def _cleartext_urls(s: Settings) -> list[tuple[str, str]]:
    """Every URL that would carry data (or a password) in cleartext to a host other than loopback."""
    found: list[tuple[str, str]] = []
    for i, m in enumerate(s.members):
        for name, url, clear in (
            ("agent_url", m.agent_url, "http"),
            ("api_url", m.api_url, "http"),
            # ldap:// binds in cleartext unless the probe upgrades it with StartTLS first
            ("ldap_url", None if m.ldap_starttls else m.ldap_url, "ldap"),
        ):
            if url is not None and urlsplit(url).scheme == clear and not is_loopback(urlsplit(url).hostname or ""):
                found.append((f"cluster.members[{i}].{name}", url))
    if s.store.etcd is not None:
        for url in s.store.etcd.endpoints:
            if urlsplit(url).scheme == "http" and not is_loopback(urlsplit(url).hostname or ""):
                found.append(("store.etcd.endpoints", url))
    return found


def check_material(s: Settings) -> None:
    """Load the TLS material and the credentials exactly as `run` does (ssl contexts, read_secret);
    a ConfigError names the key of the first that fails."""
    src = s.source

    def fail(key: str, what: str, exc: BaseException) -> ConfigError:
        detail = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return ConfigError(src, key, f"{what}: {detail}")

    def client_side(prefix: str, ca: str | None, cert: str | None, key: str | None) -> None:
        for k, f in ((f"{prefix}.cert_file", cert), (f"{prefix}.ca_file", ca)):
            if f is not None:
                _pem_certificates(src, k, f)
        try:
            ctx = ssl.create_default_context(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise fail(f"{prefix}.ca_file", "cannot load the CA bundle", exc) from exc
        if cert and key:
            try:
                ctx.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as exc:
                raise fail(f"{prefix}.key_file", "cannot load the key (or it does not match cert_file)", exc) from exc

    client_side("tls", s.tls.ca_file, s.tls.cert_file, s.tls.key_file)
    if s.store.backend == "etcd" and s.store.etcd is not None:
        e = s.store.etcd
        client_side("store.etcd", e.ca_file, e.cert_file, e.key_file)
        if e.password_file:
            try:
                read_secret(e.password_file)
            except SecretError as exc:
                raise ConfigError(src, "store.etcd.password_file", str(exc)) from exc
    if s.node.ldap_password_file:
        try:
            read_secret(s.node.ldap_password_file)
        except SecretError as exc:
            raise ConfigError(src, "node.ldap_password_file", str(exc)) from exc
    a = s.api
    if a.cert_file and a.key_file:
        _pem_certificates(src, "api.cert_file", a.cert_file)
        if a.client_ca_file:
            _pem_certificates(src, "api.client_ca_file", a.client_ca_file)
        from .api import server_ssl_context

        try:
            server_ssl_context(a.cert_file, a.key_file, None)
        except (OSError, ssl.SSLError) as exc:
            raise fail("api.key_file", "cannot load the key (or it does not match cert_file)", exc) from exc
        try:
            server_ssl_context(a.cert_file, a.key_file, a.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise fail("api.client_ca_file", "cannot load the client CA bundle", exc) from exc
    if a.crl_file and a.client_ca_file:
        from .api import load_crl

        try:
            load_crl(a.crl_file, a.client_ca_file)
        except ValueError as exc:
            raise ConfigError(src, "api.crl_file", str(exc)) from exc


def _pem_certificates(source: str, key: str, path: str) -> None:
    """At least one PEM certificate, and nothing that does not parse as one."""
    from cryptography import x509

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(source, key, f"cannot read {path!r}: {exc.strerror or exc}") from exc
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(source, key, f"{path!r} is not a PEM certificate file ({exc})") from exc
    if not certs:
        raise ConfigError(source, key, f"{path!r} holds no PEM certificate")


def load_settings(path: str | os.PathLike[str], check_files: bool = False) -> Settings:
    p = str(path)
    try:
        raw = Path(p).read_bytes()
    except OSError as exc:
        raise ConfigError(p, None, f"cannot read: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(p, None, "not valid UTF-8") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(p, None, f"invalid TOML: {exc}") from exc
    settings = parse_settings(data, p, check_files)
    if check_files:
        check_material(settings)
    return settings
