"""Configuration: defaults, the example file, and a broad table of bad configurations."""

from __future__ import annotations

import copy
import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ca_watchdog.config import (
    APISettings,
    ConfigError,
    EtcdSettings,
    FailoverSettings,
    MemberSettings,
    NodeSettings,
    Settings,
    StoreSettings,
    TimingSettings,
    TLSSettings,
    load_settings,
    parse_settings,
    read_secret,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"

MINIMAL: dict[str, Any] = {
    "node": {"name": "ca1"},
    "cluster": {
        "members": [
            {"name": "ca1", "agent_url": "https://ca1:8443", "ldap_url": "ldap://127.0.0.1:389"},
            {"name": "ca2", "agent_url": "https://ca2:8443", "ldap_url": "ldaps://ca2"},
        ]
    },
}


def with_(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of base with the dotted path set (a [n] index selects a member); value DELETE removes it."""
    data = copy.deepcopy(MINIMAL if base is None else base)
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    node: Any = data
    for part in parts[:-1]:
        node = node[int(part[1:-1])] if part.startswith("[") else node.setdefault(part, {})
    last: str | int = int(parts[-1][1:-1]) if parts[-1].startswith("[") else parts[-1]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


DELETE = object()


def test_minimal_config_gets_the_defaults() -> None:
    s = parse_settings(copy.deepcopy(MINIMAL))
    assert s.node == NodeSettings(name="ca1", cs_cfg="/etc/pki/pki-tomcat/ca/CS.cfg")
    assert s.store == StoreSettings()
    assert s.timing == TimingSettings()
    assert s.failover == FailoverSettings()
    assert s.tls == TLSSettings()
    assert s.api == APISettings()
    assert s.me.name == "ca1"
    assert (s.members[1].agent_host, s.members[1].agent_port) == ("ca2", 8443)
    assert s.member("ca2").ldap_url == "ldaps://ca2"
    with pytest.raises(KeyError):
        s.member("ca9")


def test_example_file_loads_with_three_members() -> None:
    s = load_settings(EXAMPLE)
    assert [m.name for m in s.members] == ["ca1", "ca2", "ca3"]
    assert s.node.name == "ca1"
    assert s.members[2].nofailover is True
    assert s.store.etcd is not None and len(s.store.etcd.endpoints) == 3


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


@pytest.mark.parametrize(
    ("table", "cls"),
    [
        ("node", NodeSettings),
        ("cluster.members", MemberSettings),
        ("store", StoreSettings),
        ("store.etcd", EtcdSettings),
        ("timing", TimingSettings),
        ("failover", FailoverSettings),
        ("tls", TLSSettings),
        ("api", APISettings),
    ],
)
def test_example_documents_every_key_with_a_comment(table: str, cls: type) -> None:
    text = EXAMPLE.read_text()
    header = f"[[{table}]]" if table == "cluster.members" else f"[{table}]"
    found = re.search(rf"^{re.escape(header)}$", text, flags=re.M)
    assert found, f"no {header} table"
    # the table runs to the next table header (for members: the first member only)
    section = re.split(r"^\[", text[found.end() :], maxsplit=1, flags=re.M)[0]
    lines = section.splitlines()
    for name in _fields(cls):
        if cls is StoreSettings and name == "etcd":
            continue  # the [store.etcd] table
        at = next((i for i, line in enumerate(lines) if re.match(rf"#? ?{name} = ", line)), None)
        assert at is not None, f"{table}.{name} is not documented"
        assert at > 0 and lines[at - 1].startswith("#"), f"{table}.{name} has no comment above it"


def test_example_shows_the_defaults() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    for table, cls in (
        ("timing", TimingSettings),
        ("failover", FailoverSettings),
        ("api", APISettings),
        ("store", StoreSettings),
    ):
        default = cls()
        for key, value in data[table].items():
            if key == "etcd":
                continue
            expected = getattr(default, key)
            assert (tuple(value) if isinstance(value, list) else value) == expected, f"{table}.{key}"
    node_defaults = NodeSettings(name="x", cs_cfg="/etc/pki/pki-tomcat/ca/CS.cfg")
    for key, value in data["node"].items():
        if key != "name":
            assert (tuple(value) if isinstance(value, list) else value) == getattr(node_defaults, key), key
    member = data["cluster"]["members"][0]
    assert (member["priority"], member["nofailover"]) == (100, False)
    assert data["store"]["etcd"]["prefix"] == EtcdSettings(endpoints=()).prefix


BAD: list[tuple[str, Any, str, str]] = [
    # (path, value, key named in the error, what is wrong)
    ("node", DELETE, "node", "is required"),
    ("node", "ca1", "node", "must be a table"),
    ("node.name", DELETE, "node.name", "is required"),
    ("node.name", "", "node.name", "must not be empty"),
    ("node.name", "   ", "node.name", "must not be empty"),
    ("node.name", 1, "node.name", "must be a string"),
    ("node.name", "ca9", "node.name", "is not one of cluster.members"),
    ("node.nmae", "ca1", "node.nmae", "unknown key"),
    ("node.cs_cfg", ["x"], "node.cs_cfg", "must be a string"),
    ("node.service_control", "init", "node.service_control", "must be one of systemd, command"),
    ("node.service_control", "command", "node.start_command", "needs start_command"),
    ("node.start_command", "systemctl start x", "node.start_command", "a list of strings"),
    ("node.start_command", ["systemctl", ""], "node.start_command", "non-empty strings"),
    ("node.stop_command", [1], "node.stop_command", "non-empty strings"),
    ("cluster", DELETE, "cluster", "is required"),
    ("cluster.members", DELETE, "cluster.members", "non-empty array"),
    ("cluster.members", [], "cluster.members", "non-empty array"),
    ("cluster.members", {"name": "x"}, "cluster.members", "non-empty array"),
    ("cluster.extra", 1, "cluster.extra", "unknown key"),
    ("cluster.members[1]", "ca2", "cluster.members[1]", "must be a table"),
    ("cluster.members[1].name", "ca1", "cluster.members[1].name", "duplicate member name"),
    ("cluster.members[1].name", DELETE, "cluster.members[1].name", "is required"),
    ("cluster.members[1].agent_url", DELETE, "cluster.members[1].agent_url", "is required"),
    ("cluster.members[1].agent_url", "ca2:8443", "cluster.members[1].agent_url", "URL with a host"),
    ("cluster.members[1].agent_url", "ftp://ca2", "cluster.members[1].agent_url", "URL with a host"),
    ("cluster.members[1].agent_url", "https://ca2:99999", "cluster.members[1].agent_url", "bad port"),
    ("cluster.members[1].ldap_url", "https://ca2", "cluster.members[1].ldap_url", "ldap/ldaps URL"),
    ("cluster.members[1].api_url", "ca2", "cluster.members[1].api_url", "URL with a host"),
    ("cluster.members[1].priority", -1, "cluster.members[1].priority", "between 0 and 1000000"),
    ("cluster.members[1].priority", 1.5, "cluster.members[1].priority", "must be an integer"),
    ("cluster.members[1].priority", True, "cluster.members[1].priority", "not a boolean"),
    ("cluster.members[1].nofailover", "yes", "cluster.members[1].nofailover", "true or false"),
    ("cluster.members[1].nofailover", 1, "cluster.members[1].nofailover", "true or false"),
    ("cluster.members[1].agent", "x", "cluster.members[1].agent", "unknown key"),
    ("store.backend", "zookeeper", "store.backend", "must be one of sqlite, etcd"),
    ("store.backend", "etcd", "store.etcd", "is required"),
    ("store.path", "", "store.path", "must not be empty"),
    ("store.etcd", {}, "store.etcd.endpoints", "is required"),
    ("store.etcd", {"endpoints": []}, "store.etcd.endpoints", "non-empty list"),
    ("store.etcd", {"endpoints": "http://e:2379"}, "store.etcd.endpoints", "a list of URLs"),
    ("store.etcd", {"endpoints": [2379]}, "store.etcd.endpoints", "non-empty list of URLs"),
    ("store.etcd", {"endpoints": ["e:2379"]}, "store.etcd.endpoints", "not an http(s) URL"),
    ("store.etcd", {"endpoints": ["http://e:0x"]}, "store.etcd.endpoints", "bad port"),
    ("store.etcd", {"endpoints": ["http://localhost"], "prefix": "ca"}, "store.etcd.prefix", "start and end with '/'"),
    ("store.etcd", {"endpoints": ["http://localhost"], "cert_file": "/c"}, "store.etcd.key_file", "go together"),
    ("store.etcd", {"endpoints": ["http://localhost"], "key_file": "/k"}, "store.etcd.cert_file", "go together"),
    ("store.etcd", {"endpoints": ["http://localhost"], "username": "u"}, "store.etcd.password_file", "go together"),
    ("store.etcd", {"endpoints": ["http://localhost"], "token": "t"}, "store.etcd.token", "unknown key"),
    ("store.sqlite", {}, "store.sqlite", "unknown key"),
    ("timing.interval", 0, "timing.interval", "must be between 0.1 and 300 seconds"),
    ("timing.interval", -1.0, "timing.interval", "must be between"),
    ("timing.interval", "2s", "timing.interval", "must be a number"),
    ("timing.interval", True, "timing.interval", "not a boolean"),
    ("timing.interval", float("nan"), "timing.interval", "finite"),
    ("timing.ttl", float("inf"), "timing.ttl", "finite"),
    ("timing.ttl", 6.0, "timing.ttl", "interval + 2*store_timeout must be < ttl"),  # 2 + 2*2 = 6
    ("timing.store_timeout", 14.0, "timing.ttl", "interval + 2*store_timeout must be < ttl"),
    ("timing.interval", 26.0, "timing.ttl", "interval + 2*store_timeout must be < ttl"),
    ("timing.safety_margin", 28.0, "timing.safety_margin", "must be < ttl - interval"),
    ("timing.safety_margin", 0, "timing.safety_margin", "must be between"),
    ("timing.agent_timeout", 30.0, "timing.agent_timeout", "shorter than ttl"),
    ("timing.ldap_timeout", 31.0, "timing.ldap_timeout", "shorter than ttl"),
    ("timing.failure_threshold", 0, "timing.failure_threshold", "between 1 and 100"),
    ("timing.failure_threshold", 2.0, "timing.failure_threshold", "must be an integer"),
    ("timing.start_timeout", 0, "timing.start_timeout", "must be between"),
    ("timing.ttll", 30, "timing.ttll", "unknown key"),
    ("failover.maximum_lag", -1, "failover.maximum_lag", "must be between 0 and 86400"),
    ("failover.failover_cooldown", float("inf"), "failover.failover_cooldown", "finite"),
    ("failover.restart_before_failover", "no", "failover.restart_before_failover", "true or false"),
    ("failover.fence_command", "stonith", "failover.fence_command", "a list of strings"),
    ("failover.cooldown", 1, "failover.cooldown", "unknown key"),
    ("tls.cert_file", "/c", "tls.key_file", "go together"),
    ("tls.key_file", "/k", "tls.cert_file", "go together"),
    ("tls.ca", "/c", "tls.ca", "unknown key"),
    ("tls", [], "tls", "must be a table"),
    ("api.listen_port", 0, "api.listen_port", "between 1 and 65535"),
    ("api.listen_port", 65536, "api.listen_port", "between 1 and 65535"),
    ("api.listen_port", "8099", "api.listen_port", "must be an integer"),
    ("api.listen_host", "", "api.listen_host", "must not be empty"),
    ("api.client_ca_file", "/ca", "api.client_ca_file", "needs cert_file and key_file"),
    ("api.cert_file", "/c", "api.key_file", "go together"),
    ("metrics", {}, "metrics", "unknown key"),
]


@pytest.mark.parametrize(("path", "value", "key", "fragment"), BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_bad_configurations(path: str, value: Any, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_settings(with_(path, value), "/etc/ca-watchdog/config.toml")
    assert err.value.key == key, str(err.value)
    assert str(err.value).startswith(f"/etc/ca-watchdog/config.toml: {key}: "), str(err.value)
    assert fragment in str(err.value)


def test_the_ttl_rule_boundary() -> None:
    ok = with_("timing", {"interval": 1.0, "store_timeout": 4.0, "ttl": 9.5, "safety_margin": 0.5,
                          "agent_timeout": 0.25, "ldap_timeout": 0.25})  # fmt: skip
    assert parse_settings(ok).timing.ttl == 9.5
    with pytest.raises(ConfigError, match=r"timing\.ttl.*interval \+ 2\*store_timeout"):
        parse_settings(with_("timing.ttl", 9.0, ok))


def test_self_fence_point_must_leave_room_for_a_renewal() -> None:
    # fence at ttl - safety_margin - (interval + 2*agent_timeout + store_timeout + 0.5) = 10 - 2 - 6.5 = 1.5
    ok = with_("timing", {"interval": 1.5, "store_timeout": 1.0, "ttl": 10.0, "safety_margin": 2.0,
                          "agent_timeout": 1.75, "ldap_timeout": 1.0})  # fmt: skip
    assert parse_settings(ok).timing.cycle_budget == 6.5
    with pytest.raises(ConfigError, match=r"timing\.ttl.*must be >= interval"):
        parse_settings(with_("timing.agent_timeout", 2.0, ok))


def test_root_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match="must be a table"):
        parse_settings([])  # type: ignore[arg-type]


def test_command_control_needs_both_commands() -> None:
    data = with_("node.service_control", "command")
    data = with_("node.start_command", ["/bin/true"], data)
    with pytest.raises(ConfigError) as err:
        parse_settings(data)
    assert err.value.key == "node.stop_command"
    data = with_("node.stop_command", ["/bin/false"], data)
    assert parse_settings(data).node.start_command == ("/bin/true",)


def test_load_settings_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(missing)
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nname = "ca1"\nname = "ca2"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(bad)
    assert str(err.value).startswith(f"{bad}: invalid TOML")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_settings(binary)


def test_check_files(tmp_path: Path) -> None:
    cs = tmp_path / "CS.cfg"
    data = with_("node.cs_cfg", str(cs))
    with pytest.raises(ConfigError) as err:
        parse_settings(data, check_files=True)
    assert err.value.key == "node.cs_cfg"
    cs.write_text("a=1\n")
    s: Settings = parse_settings(data, check_files=True)
    assert s.node.cs_cfg == str(cs)
    for path, key in (
        ("tls.ca_file", "tls.ca_file"),
        ("api.client_ca_file", "api.client_ca_file"),
        ("node.ldap_password_file", "node.ldap_password_file"),
    ):
        with pytest.raises(ConfigError) as err:
            parse_settings(with_(path, str(tmp_path / "missing"), data), check_files=True)
        assert err.value.key == key
    # a bare credential name is resolved in $CREDENTIALS_DIRECTORY, as `run` does (finding 8)
    assert parse_settings(with_("tls.ca_file", str(tmp_path / "missing"), data)).tls.ca_file


def test_read_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    (tmp_path / "pw").write_text("s3cret\n")
    assert read_secret(str(tmp_path / "pw")) == "s3cret"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_secret("pw") == "s3cret"
    assert read_secret(None) is None
