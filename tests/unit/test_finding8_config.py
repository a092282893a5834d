"""Issue 10, finding 8: `check-config` (the real CLI) refuses insecure or ambiguous configurations,
naming the key, and loads the TLS material and credentials exactly as `run` does."""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ca_watchdog import cli
from ca_watchdog.lab.cluster import _toml
from ca_watchdog.lab.pki import LabCA, LabPKIFiles, write_lab_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPKIFiles:
    return write_lab_pki(tmp_path_factory.mktemp("pki"))


def base(tmp: Path, pki: LabPKIFiles) -> dict[str, Any]:
    (tmp / "CS.cfg").write_text("a=1\n")
    return {
        "node": {"name": "ca1", "cs_cfg": str(tmp / "CS.cfg")},
        "cluster": {
            "members": [
                {"name": "ca1", "agent_url": "https://ca1.example.test:8443", "ldap_url": "ldaps://ca1.example.test"},
                {"name": "ca2", "agent_url": "https://ca2.example.test:8443", "ldap_url": "ldaps://ca2.example.test"},
            ]
        },
        "store": {"path": str(tmp / "state.db")},
        "tls": {"ca_file": str(pki.ca_cert), "cert_file": str(pki.client_cert), "key_file": str(pki.client_key)},
        "api": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)},
    }


def _v(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string (escapes included)
    if isinstance(value, list):
        return "[" + ", ".join(_v(x) for x in value) + "]"
    return _toml(value)


def toml(data: dict[str, Any]) -> str:
    lines: list[str] = []

    def table(prefix: str, d: dict[str, Any]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and k != "members"}
        lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {_v(v)}" for k, v in scalars.items())
        for k, v in d.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}", v)
        for m in d.get("members", []):
            lines.append(f"[[{prefix}.members]]")
            lines.extend(f"{k} = {_v(v)}" for k, v in m.items())

    for name, d in data.items():
        table(name, d)
    return "\n".join(lines) + "\n"


def check(tmp: Path, data: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp / "config.toml"
    path.write_text(toml(data))
    rc = cli.main(["check-config", str(path)])
    out = capsys.readouterr()
    return rc, out.out + out.err


def refused(tmp: Path, data: dict[str, Any], key: str, capsys: pytest.CaptureFixture[str]) -> str:
    rc, out = check(tmp, data, capsys)
    assert rc == 2, out
    assert f"config.toml: {key}: " in out, out
    return out


def test_finding8_the_base_configuration_passes(tmp_path: Path, pki: LabPKIFiles, capsys: Any) -> None:
    rc, out = check(tmp_path, base(tmp_path, pki), capsys)
    assert rc == 0, out


@pytest.mark.parametrize(
    ("field", "url"),
    [
        ("agent_url", "http://ca2.example.test:8080"),
        ("api_url", "http://ca2.example.test:8099"),
        ("ldap_url", "ldap://ca2.example.test:389"),
    ],
)
def test_finding8_cleartext_member_url_to_another_host_is_refused(
    tmp_path: Path, pki: LabPKIFiles, capsys: Any, field: str, url: str
) -> None:
    d = base(tmp_path, pki)
    d["cluster"]["members"][1][field] = url
    if field == "api_url":
        d["api"]["client_ca_file"] = str(pki.ca_cert)
        d["api"]["peers"] = ["CN=lab agent,O=ca-watchdog lab"]
    out = refused(tmp_path, d, f"cluster.members[1].{field}", capsys)
    assert "cleartext" in out and "cluster.insecure" in out


def test_finding8_cleartext_to_loopback_is_allowed(tmp_path: Path, pki: LabPKIFiles, capsys: Any) -> None:
    d = base(tmp_path, pki)
    d["cluster"]["members"][1]["ldap_url"] = "ldap://127.0.0.1:389"
    d["cluster"]["members"][1]["agent_url"] = "http://localhost:8080"
    assert check(tmp_path, d, capsys)[0] == 0


def test_finding8_cleartext_etcd_with_a_password_is_refused(tmp_path: Path, pki: LabPKIFiles, capsys: Any) -> None:
    d = base(tmp_path, pki)
    (tmp_path / "etcd-pw").write_text("pw\n")
    d["store"] = {
        "backend": "etcd",
        "path": str(tmp_path / "state.db"),
        "etcd": {
            "endpoints": ["http://etcd1.example.test:2379"],
            "username": "u",
            "password_file": str(tmp_path / "etcd-pw"),
        },
    }
    refused(tmp_path, d, "store.etcd.endpoints", capsys)


def test_finding8_insecure_true_allows_cleartext_and_status_shows_it(
    tmp_path: Path, pki: LabPKIFiles, capsys: Any
) -> None:
    d = base(tmp_path, pki)
    d["cluster"]["members"][1]["ldap_url"] = "ldap://ca2.example.test:389"
    d["cluster"]["insecure"] = True
    assert check(tmp_path, d, capsys)[0] == 0
    path = tmp_path / "config.toml"
    assert cli.main(["status", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        "INSECURE (cluster.insecure = true): cleartext cluster.members[1].ldap_url = ldap://ca2.example.test:389" in out
    )
    assert cli.main(["status", "--json", "--config", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["insecure"] == [
        "cluster.members[1].ldap_url = ldap://ca2.example.test:389"
    ]


@pytest.mark.parametrize(
    ("table", "key"),
    [("node", "cs_cfg"), ("store", "path"), ("tls", "ca_file"), ("api", "cert_file")],
)
def test_finding8_relative_paths_are_refused(
    tmp_path: Path, pki: LabPKIFiles, capsys: Any, table: str, key: str
) -> None:
    d = base(tmp_path, pki)
    d[table][key] = "relative/file.pem"
    out = refused(tmp_path, d, f"{table}.{key}", capsys)
    assert "must be an absolute path" in out


def test_finding8_relative_credential_path_is_refused(tmp_path: Path, pki: LabPKIFiles, capsys: Any) -> None:
    d = base(tmp_path, pki)
    d["node"]["ldap_password_file"] = "credentials/ldap-password"
    refused(tmp_path, d, "node.ldap_password_file", capsys)


@pytest.mark.parametrize(
    ("key", "value"),
    [("ttl", 1e308), ("interval", 1e-9), ("agent_timeout", 1e-9), ("start_timeout", 1e9)],
)
def test_finding8_out_of_range_timings_are_refused(
    tmp_path: Path, pki: LabPKIFiles, capsys: Any, key: str, value: float
) -> None:
    d = base(tmp_path, pki)
    d["timing"] = {key: value}
    out = refused(tmp_path, d, f"timing.{key}", capsys)
    assert "must be between" in out


@pytest.mark.parametrize("name", ["ca2\nevil", "-ca2", "ca 2", "x" * 65, "ca2;rm"])
def test_finding8_member_names_outside_the_safe_set_are_refused(
    tmp_path: Path, pki: LabPKIFiles, capsys: Any, name: str
) -> None:
    d = base(tmp_path, pki)
    d["cluster"]["members"][1]["name"] = name
    refused(tmp_path, d, "cluster.members[1].name", capsys)


def test_finding8_tls_without_client_ca_file_when_peers_are_configured_is_refused(
    tmp_path: Path, pki: LabPKIFiles, capsys: Any
) -> None:
    d = base(tmp_path, pki)
    d["cluster"]["members"][1]["api_url"] = "https://ca2.example.test:8099"
    out = refused(tmp_path, d, "api.client_ca_file", capsys)
    assert "failsafe" in out
    d["api"]["client_ca_file"] = str(pki.ca_cert)
    out = refused(tmp_path, d, "api.peers", capsys)  # nobody allowed to ask: failsafe off again
    d["api"]["peers"] = ["CN=lab agent,O=ca-watchdog lab"]
    assert check(tmp_path, d, capsys)[0] == 0
    d["api"]["peers"] = ["lab agent"]
    refused(tmp_path, d, "api.peers", capsys)
    del d["api"]["client_ca_file"]
    d["cluster"]["members"][1].pop("api_url")
    d["api"]["peers"] = ["CN=lab agent,O=ca-watchdog lab"]
    refused(tmp_path, d, "api.client_ca_file", capsys)


@pytest.mark.parametrize("key", ["api.cert_file", "tls.cert_file", "tls.ca_file", "api.client_ca_file"])
def test_finding8_a_non_pem_certificate_fails_check_config(
    tmp_path: Path, pki: LabPKIFiles, capsys: Any, key: str
) -> None:
    d = base(tmp_path, pki)
    d["api"]["client_ca_file"] = str(pki.ca_cert)
    der = tmp_path / "cert.der"
    der.write_bytes(
        x509.load_pem_x509_certificate(pki.server_cert.read_bytes()).public_bytes(
            __import__("cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]).Encoding.DER
        )
    )
    table, name = key.split(".")
    d[table][name] = str(der)
    out = refused(tmp_path, d, key, capsys)
    assert "PEM" in out


def test_finding8_a_key_that_does_not_match_fails_check_config(tmp_path: Path, pki: LabPKIFiles, capsys: Any) -> None:
    d = base(tmp_path, pki)
    d["api"]["key_file"] = str(pki.client_key)
    refused(tmp_path, d, "api.key_file", capsys)


def test_finding8_a_bare_credential_name_needs_credentials_directory(
    tmp_path: Path, pki: LabPKIFiles, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = base(tmp_path, pki)
    d["node"]["ldap_password_file"] = "ldap-password"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    out = refused(tmp_path, d, "node.ldap_password_file", capsys)
    assert "CREDENTIALS_DIRECTORY" in out
    creds = tmp_path / "creds"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    refused(tmp_path, d, "node.ldap_password_file", capsys)  # not there either
    (creds / "ldap-password").write_text("secret\n")
    rc, out = check(tmp_path, d, capsys)
    assert rc == 0 and "secret" not in out


def _crl(ca: LabCA, revoked: list[int], next_update: dt.datetime) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    now = dt.datetime.now(dt.UTC)
    b = x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject).last_update(now).next_update(next_update)
    for serial in revoked:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return b.sign(ca.key, hashes.SHA256()).public_bytes(Encoding.PEM)


def test_finding8_a_crl_not_signed_by_the_client_ca_fails_check_config(
    tmp_path: Path, pki: LabPKIFiles, capsys: Any
) -> None:
    other = LabCA.create("some other CA")
    d = base(tmp_path, pki)
    d["api"]["client_ca_file"] = str(pki.ca_cert)
    crl = tmp_path / "clients.crl"
    crl.write_bytes(_crl(other, [], dt.datetime.now(dt.UTC) + dt.timedelta(days=1)))
    d["api"]["crl_file"] = str(crl)
    refused(tmp_path, d, "api.crl_file", capsys)
    crl.write_bytes(_crl(LabCA.load(pki.ca_cert, pki.ca_key), [], dt.datetime.now(dt.UTC) + dt.timedelta(days=1)))
    assert check(tmp_path, copy.deepcopy(d), capsys)[0] == 0


# ---- ldap_starttls: ldap:// to another host only when the probe upgrades it before the bind ----------


def test_finding8_ldap_url_to_another_host_with_ldap_starttls_is_accepted_and_not_listed_insecure(
    tmp_path: Path, pki: LabPKIFiles, capsys: Any
) -> None:
    from ca_watchdog.config import load_settings

    d = base(tmp_path, pki)
    d["cluster"]["members"][1]["ldap_url"] = "ldap://ca2.example.test:389"
    d["cluster"]["members"][1]["ldap_starttls"] = True
    rc, out = check(tmp_path, d, capsys)
    assert rc == 0, out
    assert "INSECURE" not in out and "cleartext" not in out, out
    s = load_settings(tmp_path / "config.toml")
    assert s.member("ca2").ldap_starttls is True and s.member("ca1").ldap_starttls is False
    assert s.insecure == ()


def test_finding8_ldap_starttls_false_still_refuses_ldap_url_to_another_host(
    tmp_path: Path, pki: LabPKIFiles, capsys: Any
) -> None:
    d = base(tmp_path, pki)
    d["cluster"]["members"][1]["ldap_url"] = "ldap://ca2.example.test:389"
    d["cluster"]["members"][1]["ldap_starttls"] = False
    out = refused(tmp_path, d, "cluster.members[1].ldap_url", capsys)
    assert "cleartext" in out


@pytest.mark.parametrize(
    ("ldap_url", "value", "says"),
    [
        ("ldaps://ca2.example.test:636", True, "is for ldap:// URLs"),
        (None, True, "needs ldap_url"),
        ("ldap://ca2.example.test:389", "yes", "true or false"),
    ],
)
def test_finding8_ldap_starttls_misused_is_refused_naming_the_key(
    tmp_path: Path, pki: LabPKIFiles, capsys: Any, ldap_url: str | None, value: Any, says: str
) -> None:
    d = base(tmp_path, pki)
    member = d["cluster"]["members"][1]
    if ldap_url is None:
        del member["ldap_url"]
    else:
        member["ldap_url"] = ldap_url
    member["ldap_starttls"] = value
    out = refused(tmp_path, d, "cluster.members[1].ldap_starttls", capsys)
    assert says in out, out


@pytest.mark.parametrize("starttls", [True, False])
async def test_finding8_the_daemon_probes_its_directory_with_ldap_starttls(
    tmp_path: Path, pki: LabPKIFiles, monkeypatch: pytest.MonkeyPatch, starttls: bool
) -> None:
    from ca_watchdog import observe
    from ca_watchdog.config import parse_settings
    from ca_watchdog.metrics import Metrics
    from ca_watchdog.probes.agent import AgentStatus

    d = base(tmp_path, pki)
    d["cluster"]["members"][0]["ldap_url"] = "ldap://ca1.example.test:389"
    d["cluster"]["members"][0]["ldap_starttls"] = starttls
    d["cluster"]["insecure"] = True  # (for the starttls = false case only)
    settings = parse_settings(d, "config.toml")
    calls: list[dict[str, Any]] = []

    async def probe_directory(url: str, *args: Any, **kwargs: Any) -> None:
        calls.append({"url": url, **kwargs})

    class CA:
        async def status(self) -> AgentStatus:
            return AgentStatus("down", "test", None, None, None, 0.0)

    monkeypatch.setattr(observe, "probe_directory", probe_directory)
    obs = observe.Observer(settings, CA(), None, Metrics("ca1"), "pw")  # type: ignore[arg-type]
    await obs.observe(None, False)
    assert [(c["url"], c["starttls"], c["ca_file"]) for c in calls] == [
        ("ldap://ca1.example.test:389", starttls, str(pki.ca_cert))
    ]
