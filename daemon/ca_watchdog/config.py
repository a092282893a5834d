"""TOML configuration into typed, validated settings.

Every error names the key path (`timing.ttl`, `cluster.members[2].name`) and what is wrong;
unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit

DEFAULT_CONFIG_PATH = "/etc/ca-watchdog/config.toml"


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
    ldap_bind_dn: str = "cn=Directory Manager"
    ldap_password_file: str | None = None


@dataclass(frozen=True)
class MemberSettings:
    name: str
    agent_url: str
    ldap_url: str | None = None  # None: no 389-DS probe for this member (lab without a directory)
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


def read_secret(path: str | None) -> str | None:
    """A secret from a file; `$CREDENTIALS_DIRECTORY` (systemd LoadCredential=) is tried for bare names."""
    if path is None:
        return None
    p = Path(path)
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not p.is_absolute() and creds:
        p = Path(creds) / p
    return p.read_text(encoding="utf-8").rstrip("\r\n")


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

    def num(self, name: str, default: float, minimum: float = 0.0, exclusive: bool = True) -> float:
        v = float(self._get(name, (int, float), "a number", False, default))
        if not math.isfinite(v):  # TOML allows inf and nan; no timing can be either
            raise self.error(name, f"must be a finite number, not {v}")
        if v < minimum or (exclusive and v == minimum):
            raise self.error(name, f"must be {'>' if exclusive else '>='} {minimum:g}, not {v:g}")
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


def _file(t: _Table, name: str, must_exist: bool, credential: bool = False) -> str | None:
    v = t.opt_text(name)
    # a bare credential name is looked up in $CREDENTIALS_DIRECTORY at run time (read_secret)
    if v is not None and must_exist and not (credential and not os.path.isabs(v)) and not os.path.exists(v):
        raise t.error(name, f"file {v!r} does not exist")
    return v


def _node(t: _Table, check_files: bool) -> NodeSettings:
    control = t.choice("service_control", ("systemd", "command"), "systemd")
    n = NodeSettings(
        name=t.text("name"),
        cs_cfg=t.text("cs_cfg", "/etc/pki/pki-tomcat/ca/CS.cfg"),
        service=t.text("service", "pki-tomcatd@pki-tomcat.service"),
        service_control=cast(Literal["systemd", "command"], control),
        start_command=t.argv("start_command"),
        stop_command=t.argv("stop_command"),
        ldap_bind_dn=t.text("ldap_bind_dn", "cn=Directory Manager"),
        ldap_password_file=_file(t, "ldap_password_file", check_files, credential=True),
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
        m = MemberSettings(
            name=t.text("name"),
            agent_url=_url(t, "agent_url", ("https", "http")),
            ldap_url=_opt_url(t, "ldap_url", ("ldap", "ldaps")),
            api_url=_opt_url(t, "api_url", ("https", "http")),
            priority=t.integer("priority", 100, minimum=0, maximum=1_000_000),
            nofailover=t.boolean("nofailover", False),
        )
        t.done()
        if any(o.name == m.name for o in out):
            raise t.error("name", f"duplicate member name {m.name!r}")
        out.append(m)
    return tuple(out)


def _store(t: _Table | None, check_files: bool) -> StoreSettings:
    if t is None:
        return StoreSettings()
    backend = t.choice("backend", ("sqlite", "etcd"), "sqlite")
    path = t.text("path", StoreSettings.path)
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
        maximum_lag=t.num("maximum_lag", d.maximum_lag, exclusive=False),
        failover_cooldown=t.num("failover_cooldown", d.failover_cooldown, exclusive=False),
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
    )
    if (s.cert_file is None) != (s.key_file is None):
        raise t.error(
            "cert_file" if s.cert_file is None else "key_file", "cert_file and key_file go together"
        )
    if s.client_ca_file and not s.cert_file:
        raise t.error("client_ca_file", "needs cert_file and key_file (client certificates need TLS)")
    t.done()
    return s


def parse_settings(data: dict[str, Any], source: str = "<config>", check_files: bool = False) -> Settings:
    root = _Table(source, "", data)
    node_t = root.sub("node", required=True)
    assert node_t is not None
    node = _node(node_t, check_files)
    cluster = root.sub("cluster", required=True)
    assert cluster is not None
    cluster.used.add("members")
    members = _members(source, cluster.data.get("members"))
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
    return parse_settings(data, p, check_files)
