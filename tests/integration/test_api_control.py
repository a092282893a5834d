"""Runbook: the HTTP API of a running daemon, as HAProxy, Prometheus and an operator use it.

A three-node lab cluster (ca1 master) with each daemon's API on TLS, client certificates checked
against the lab CA:

- reads are open: /health, /master, /clone answer 200/503 by the node's role, /cluster and
  /history are JSON, /metrics is the Prometheus text format;
- state-changing calls (/pause, /resume, /ack, /switchover) are refused (403) without a client
  certificate, and refused (handshake failure or 403) with a certificate from another CA, and the
  cluster does not change;
- with the lab agent certificate they are accepted and the cluster shows it: paused in /cluster on
  every node, resume clears it, ack is recorded, a switchover moves the master role.

Lab ports: 19440-19462. The tests run in file order against one cluster.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca_watchdog.lab.cluster import LabCluster
from ca_watchdog.lab.pki import Issued, LabCA, LabPKIFiles, write_lab_pki
from ca_watchdog.store import open_store
from ca_watchdog.store.base import Flags

BASE_PORT = 19440
CONTROL = ("pause", "resume", "ack", "switchover")


class Lab:
    def __init__(self, cluster: LabCluster, other: LabPKIFiles) -> None:
        assert cluster.pki is not None
        self.c = cluster
        self.pki = cluster.pki
        self.other = other

    def url(self, node: str, path: str) -> str:
        return f"https://127.0.0.1:{self.c.nodes[node].api_port}{path}"

    def ctx(self, client: str | None = None) -> ssl.SSLContext:
        """Trusts the lab CA for the server; client None, "agent" (lab CA, an operator), "other"
        (another CA) or one of the extra certificates in CLIENTS (lab CA)."""
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        if client == "agent":
            ctx.load_cert_chain(str(self.pki.client_cert), str(self.pki.client_key))
        elif client == "other":
            ctx.load_cert_chain(str(self.other.client_cert), str(self.other.client_key))
        elif client is not None:
            ctx.load_cert_chain(str(self.pki.directory / f"{client}.pem"), str(self.pki.directory / f"{client}.key"))
        return ctx

    def call(
        self,
        node: str,
        path: str,
        method: str = "GET",
        client: str | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, bytes]:
        data = (
            raw
            if raw is not None
            else json.dumps(body).encode()
            if body is not None
            else (b"" if method == "POST" else None)
        )
        req = urllib.request.Request(self.url(node, path), data=data, method=method)
        if method == "POST":
            req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, context=self.ctx(client), timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def json(self, node: str, path: str) -> Any:
        status, body = self.call(node, path)
        assert status == 200, (path, status, body)
        return json.loads(body)

    def _store(self, what: Callable[[Any], Any]) -> Any:
        settings = self.c.settings("ca1")

        async def go() -> Any:
            store = open_store(settings.store, list(self.c.names), 2.0)
            try:
                return await what(store)
            finally:
                await store.close()

        return asyncio.run(go())

    def store_history(self) -> list[dict[str, Any]]:
        """The history as the store has it (what every daemon reads), oldest first."""
        return [e.event for e in self._store(lambda s: s.get_history(100))]

    def store_flags(self) -> Flags:
        flags: Flags = self._store(lambda s: s.get_flags())
        return flags

    def eventually(self, what: Callable[[], bool], timeout: float = 20.0) -> bool:
        return self.c.wait_for(what, timeout, step=0.25)


def _no_eku(ca: LabCA) -> Issued:
    """A client certificate with no extended key usage at all (OpenSSL accepts it for any purpose)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ca-watchdog lab"),
            x509.NameAttribute(NameOID.COMMON_NAME, "no usage"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert, key)


def _extra_clients(c: LabCluster) -> None:
    """More client certificates from the lab CA: a peer, an unlisted one, one without the clientAuth
    EKU (a server certificate), one listed as operator but revoked by the CRL in api.crl_file."""
    assert c.pki is not None
    ca = LabCA.load(c.pki.ca_cert, c.pki.ca_key)
    d = c.pki.directory
    peer = ca.issue_client("lab peer")
    peer.write(d, "peer")
    ca.issue_client("intruder").write(d, "intruder")
    ca.issue_server("server-only", ip_addresses=()).write(d, "servercert")
    _no_eku(ca).write(d, "noeku")
    revoked = ca.issue_client("revoked operator")
    revoked.write(d, "revoked")
    agent = x509.load_pem_x509_certificate(c.pki.client_cert.read_bytes())
    now = dt.datetime.now(dt.UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=1))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(revoked.cert.serial_number).revocation_date(now).build()
        )
        .sign(ca.key, hashes.SHA256())
    )
    (d / "clients.crl").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    c.api_options = {
        "operators": [
            agent.subject.rfc4514_string(),
            "sha256:" + revoked.cert.fingerprint(hashes.SHA256()).hex(),
            "CN=server-only,O=ca-watchdog lab",
            "CN=no usage,O=ca-watchdog lab",
        ],
        "peers": ["sha256:" + agent.fingerprint(hashes.SHA256()).hex(), "CN=lab peer, O=ca-watchdog lab"],
        "crl_file": str(d / "clients.crl"),
    }
    for node in c.nodes.values():
        node.config.write_text(c._config_text(node))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("api-lab")
    # ca1's daemon runs with the usual soft limit of 1024 descriptors (finding 3)
    c = LabCluster(root / "cluster", base_port=BASE_PORT, exec_prefix={"ca1": ["prlimit", "--nofile=1024:1024", "--"]})
    c.build()
    other = write_lab_pki(root / "other-pki", "some other CA")
    _extra_clients(c)
    lab = Lab(c, other)
    try:
        c.start()

        def settled() -> bool:
            try:
                views = [lab.json(n, "/cluster") for n in c.names]
            except (OSError, AssertionError):
                return False
            return (
                all(
                    v.get("ready")
                    and v["leader"]
                    and v["leader"]["name"] == "ca1"
                    and all(m["fresh"] and m["ca_status"] == "running" for m in v["members"])
                    for v in views
                )
                and lab.call("ca1", "/master")[0] == 200
            )

        assert lab.eventually(settled, 60), "the lab cluster did not settle with ca1 as master"
        yield lab
    finally:
        c.stop()


# ---- reads -----------------------------------------------------------------------------------------


def test_health_answers_200_on_every_node_whose_ca_runs(lab: Lab) -> None:
    for n in lab.c.names:
        status, body = lab.call(n, "/health")
        assert status == 200, (n, body)
        assert json.loads(body)["ok"] is True


def test_master_answers_200_only_on_the_master_and_clone_only_on_clones(lab: Lab) -> None:
    assert lab.call("ca1", "/master")[0] == 200
    assert lab.call("ca1", "/clone")[0] == 503
    for n in ("ca2", "ca3"):
        status, body = lab.call(n, "/master")
        assert status == 503 and json.loads(body) == {"ok": False, "detail": "not the serving master"}
        assert lab.call(n, "/clone")[0] == 200


def test_cluster_json_shows_every_member_from_every_node(lab: Lab) -> None:
    for n in lab.c.names:
        v = lab.json(n, "/cluster")
        assert v["reported_by"] == n
        assert v["leader"]["name"] == "ca1" and v["leader"]["epoch"] >= 1
        assert v["paused"] is False and v["store_ok"] is True
        roles = {m["name"]: (m["cscfg_role"], m["ca_status"], m["leader"]) for m in v["members"]}
        assert roles == {
            "ca1": ("master", "running", True),
            "ca2": ("clone", "running", False),
            "ca3": ("clone", "running", False),
        }
        assert v["decision"]["action"] in ("renew", "wait")


def test_history_records_how_ca1_became_master(lab: Lab) -> None:
    events = lab.json("ca2", "/history")
    assert isinstance(events, list)
    acquired = [e for e in events if e.get("type") == "acquired"]
    assert acquired and acquired[0]["name"] == "ca1"
    assert all({"seq", "at"} <= set(e) for e in events)


def test_metrics_is_prometheus_text(lab: Lab) -> None:
    status, body = lab.call("ca1", "/metrics")
    assert status == 200
    text = body.decode()
    assert "# TYPE ca_watchdog_leader gauge" in text
    assert 'ca_watchdog_leader{member="ca1"} 1.0' in text


# ---- control calls: refused -----------------------------------------------------------------------------


def _body(action: str) -> Any:
    return {"to": "ca2"} if action == "switchover" else None


@pytest.mark.parametrize("action", CONTROL)
def test_a_control_call_without_a_client_certificate_is_refused_with_403(lab: Lab, action: str) -> None:
    before = lab.store_history()
    status, body = lab.call("ca1", f"/{action}", "POST", client=None, body=_body(action))
    assert status == 403, (status, body)
    assert b"client certificate" in body
    time.sleep(0.3)
    v = lab.json("ca1", "/cluster")
    assert v["paused"] is False and v["switchover"] is None
    flags = lab.store_flags()
    assert not flags.paused and flags.switchover is None
    assert lab.store_history() == before


@pytest.mark.parametrize("action", CONTROL)
def test_a_control_call_with_a_certificate_from_another_ca_is_refused(lab: Lab, action: str) -> None:
    before = lab.store_history()
    try:
        status, body = lab.call("ca2", f"/{action}", "POST", client="other", body=_body(action))
    except (OSError, ssl.SSLError) as exc:  # the handshake fails: unknown CA (URLError is an OSError)
        outcome = f"refused: {exc}"
    else:
        assert status == 403, (status, body)
        outcome = "403"
    assert outcome
    time.sleep(0.3)
    v = lab.json("ca2", "/cluster")
    assert v["paused"] is False and v["switchover"] is None
    flags = lab.store_flags()
    assert not flags.paused and flags.switchover is None
    assert lab.store_history() == before
    # the same connection setup with the lab's agent certificate does get through (reads)
    assert lab.call("ca2", "/health", client="agent")[0] == 200


def test_a_switchover_to_a_non_member_is_rejected_with_400(lab: Lab) -> None:
    for body in ({"to": "nobody"}, {}, ["ca2"]):
        status, _ = lab.call("ca1", "/switchover", "POST", client="agent", body=body)
        assert status == 400, body
    assert lab.json("ca1", "/cluster")["switchover"] is None


# ---- issue 10: hostile input and least privilege ------------------------------------------------------


def _unchanged(lab: Lab, before: list[dict[str, Any]]) -> None:
    time.sleep(0.3)
    flags = lab.store_flags()
    assert not flags.paused and flags.switchover is None
    assert lab.store_history() == before


@pytest.mark.parametrize("path", ["/health", "/master", "/clone"])
def test_issue10_options_and_head_answer_like_get_so_haproxy_httpchk_works(lab: Lab, path: str) -> None:
    for n in lab.c.names:
        got = lab.call(n, path)
        assert lab.call(n, path, "OPTIONS") == got, (n, path)
        status, body = lab.call(n, path, "HEAD")
        assert (status, body) == (got[0], b""), (n, path)


def test_issue10_options_master_equals_get(lab: Lab) -> None:
    for n in lab.c.names:
        assert lab.call(n, "/master", "OPTIONS") == lab.call(n, "/master")
    assert lab.call("ca1", "/master", "OPTIONS")[0] == 200


@pytest.mark.parametrize("action", CONTROL)
def test_finding5_an_unlisted_certificate_from_the_client_ca_is_refused_with_403(lab: Lab, action: str) -> None:
    before = lab.store_history()
    status, body = lab.call("ca1", f"/{action}", "POST", client="intruder", body=_body(action))
    assert status == 403, (status, body)
    assert b"CN=intruder" in body and b"not listed in api.operators" in body
    assert lab.call("ca1", "/failsafe", client="intruder")[0] == 403
    _unchanged(lab, before)


def test_finding5_a_peer_certificate_may_ask_failsafe_only(lab: Lab) -> None:
    before = lab.store_history()
    status, body = lab.call("ca2", "/failsafe", client="peer")
    assert status == 200 and json.loads(body)["member"] == "ca2"
    for action in CONTROL:
        status, body = lab.call("ca2", f"/{action}", "POST", client="peer", body=_body(action))
        assert status == 403 and b"may call /failsafe only" in body, (action, status, body)
    _unchanged(lab, before)


def test_finding5_a_listed_certificate_without_the_client_auth_eku_is_refused(lab: Lab) -> None:
    before = lab.store_history()
    # no EKU at all: OpenSSL lets it through the handshake, the API refuses it
    status, body = lab.call("ca1", "/pause", "POST", client="noeku")
    assert status == 403 and b"clientAuth" in body, (status, body)
    # serverAuth only: OpenSSL already refuses it as a client certificate (handshake fails)
    with pytest.raises((OSError, ssl.SSLError)):
        lab.call("ca1", "/pause", "POST", client="servercert")
    _unchanged(lab, before)


def test_finding5_a_listed_operator_certificate_revoked_by_the_crl_is_refused(lab: Lab) -> None:
    before = lab.store_history()
    status, body = lab.call("ca3", "/pause", "POST", client="revoked")
    assert status == 403 and b"revoked" in body, (status, body)
    _unchanged(lab, before)


def test_finding6_a_text_plain_post_is_refused_with_403(lab: Lab) -> None:
    before = lab.store_history()
    for action in CONTROL:
        status, body = lab.call(
            "ca1", f"/{action}", "POST", client="agent", raw=b'{"to": "ca2"}', headers={"Content-Type": "text/plain"}
        )
        assert status == 403 and b"application/json" in body, (action, status, body)
    _unchanged(lab, before)


def test_finding6_a_foreign_origin_is_refused_with_403(lab: Lab) -> None:
    before = lab.store_history()
    for origin in ("https://evil.example", "null", "http://127.0.0.1:80"):
        status, body = lab.call(
            "ca1", "/switchover", "POST", client="agent", body={"to": "ca2"}, headers={"Origin": origin}
        )
        assert status == 403 and b"cross-origin" in body, (origin, status, body)
    status, _ = lab.call("ca1", "/pause", "POST", client="agent", body={}, headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403
    _unchanged(lab, before)


def test_finding9_bad_json_to_a_post_endpoint_is_a_short_400_and_no_traceback(lab: Lab) -> None:
    log = lab.c.nodes["ca2"].daemon_log
    size = log.stat().st_size
    before = lab.store_history()
    for raw in (b"{not json", b"[" * 5000 + b"]" * 5000, b"\xff\xfe"):
        status, body = lab.call("ca2", "/switchover", "POST", client="agent", raw=raw)
        assert status == 400 and body == b"the body is not valid JSON\n", (raw[:10], status, body)
    _unchanged(lab, before)
    with open(log, "rb") as f:
        f.seek(size)
        assert b"Traceback" not in f.read()


def _idle_tls(port: int, lab: Lab) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return lab.ctx("agent").wrap_socket(raw, server_hostname="127.0.0.1")


def test_finding3_1100_idle_connections_leave_health_answering_within_2s(lab: Lab) -> None:
    port = lab.c.nodes["ca1"].api_port
    log = lab.c.nodes["ca1"].daemon_log
    size = log.stat().st_size
    tls = [_idle_tls(port, lab) for _ in range(20)]  # handshake done, no request
    opened = time.monotonic()
    idle: list[socket.socket] = []
    try:
        for _ in range(1100):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            idle.append(s)
        time.sleep(1.0)  # let the daemon accept them all
        timings = []
        for _ in range(5):
            t0 = time.monotonic()
            status, body = lab.call("ca1", "/health")
            timings.append(time.monotonic() - t0)
            assert status == 200, body
        print(f"/health under 1,100 idle connections + 20 idle TLS: {[round(t, 3) for t in timings]} s")
        assert max(timings) < 2.0, timings
        # the TLS connections that never sent a request are closed within request_head_timeout (5 s)
        closed_at = []
        for t in tls:
            t.settimeout(max(0.1, opened + 12 - time.monotonic()))
            try:
                data = t.recv(1)
            except (ssl.SSLError, OSError):
                data = b""
            assert data == b"", "an idle TLS connection sent data"
            closed_at.append(time.monotonic() - opened)
        print(f"idle TLS connections closed after {min(closed_at):.1f}-{max(closed_at):.1f} s")
        assert max(closed_at) < 10.0
        # the daemon kept cycling and its CA was never reported down
        v = lab.json("ca1", "/cluster")
        assert v["decision"]["action"] in ("renew", "wait") and v["members"][0]["ca_status"] == "running"
    finally:
        for s in idle:
            s.close()
        for t in tls:
            t.close()
    time.sleep(1.0)
    grown = log.stat().st_size - size
    with open(log, "rb") as f:
        f.seek(size)
        text = f.read()
    print(f"daemon log grew {grown} bytes")
    assert b"Traceback" not in text and grown < 20_000, text[-2000:]
    assert lab.call("ca1", "/health")[0] == 200


def test_finding3_a_connection_that_sends_no_request_is_closed_within_the_head_timeout(lab: Lab) -> None:
    port = lab.c.nodes["ca2"].api_port
    opened = time.monotonic()
    tls = [_idle_tls(port, lab) for _ in range(3)]  # TLS handshake done, then nothing
    raw = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]  # not even a handshake
    closed = []
    for s in [*tls, *raw]:
        s.settimeout(15)
        try:
            data = s.recv(1)
        except (ssl.SSLError, OSError):
            data = b""
        assert data == b""
        closed.append(time.monotonic() - opened)
        s.close()
    print(
        f"connections without a request closed after {min(closed):.1f}-{max(closed):.1f} s (request_head_timeout 5 s)"
    )
    assert min(closed) > 4.0 and max(closed) < 11.0, closed
    assert lab.call("ca2", "/health")[0] == 200


# ---- control calls: accepted -------------------------------------------------------------------------------


def _everywhere(lab: Lab, pred: Callable[[dict[str, Any]], bool]) -> Callable[[], bool]:
    return lambda: all(pred(lab.json(n, "/cluster")) for n in lab.c.names)


def test_pause_with_the_agent_certificate_shows_paused_everywhere_and_resume_clears_it(lab: Lab) -> None:
    status, body = lab.call("ca3", "/pause", "POST", client="agent")
    assert status == 200, body
    answer = json.loads(body)
    assert answer["ok"] is True and answer["detail"] == "paused by lab agent"
    assert lab.eventually(_everywhere(lab, lambda v: v["paused"] is True)), "paused never showed in /cluster"
    assert lab.eventually(lambda: "ca_watchdog_paused 1.0" in lab.call("ca1", "/metrics")[1].decode())
    assert lab.store_flags().paused
    events = lab.store_history()
    assert events[-1]["type"] == "pause" and events[-1]["by"] == "lab agent"

    status, body = lab.call("ca1", "/resume", "POST", client="agent")
    assert status == 200 and json.loads(body)["detail"] == "resumed by lab agent"
    assert lab.eventually(_everywhere(lab, lambda v: v["paused"] is False)), "resume did not clear the pause"
    assert not lab.store_flags().paused
    assert lab.store_history()[-1]["type"] == "resume"


def test_ack_with_the_agent_certificate_is_recorded(lab: Lab) -> None:
    status, body = lab.call("ca2", "/ack", "POST", client="agent")
    assert status == 200 and json.loads(body)["detail"] == "last failover acknowledged by lab agent"
    assert lab.store_flags().cooldown_ack_at is not None
    events = lab.store_history()
    assert events[-1]["type"] == "ack" and events[-1]["by"] == "lab agent"


def test_history_endpoint_shows_the_control_calls_of_the_store(lab: Lab) -> None:
    want = [(e.get("type"), e.get("by")) for e in lab.store_history()]
    assert ("ack", "lab agent") in want
    for n in lab.c.names:
        got = [(e.get("type"), e.get("by")) for e in lab.json(n, "/history")]
        assert got == want, n


def test_switchover_with_the_agent_certificate_moves_the_master_role(lab: Lab) -> None:
    status, body = lab.call("ca3", "/switchover", "POST", client="agent", body={"to": "ca2"})
    assert status == 200, body
    assert json.loads(body)["detail"] == "switchover to ca2 requested by lab agent"
    assert lab.eventually(lambda: lab.call("ca2", "/master")[0] == 200 and lab.call("ca1", "/clone")[0] == 200, 90), (
        f"the switchover to ca2 did not complete: {lab.json('ca3', '/cluster')}"
    )
    v = lab.json("ca3", "/cluster")
    assert v["leader"]["name"] == "ca2"
    assert lab.eventually(_everywhere(lab, lambda v: v["switchover"] is None), 20)
    assert lab.c.roles() == {"ca1": "clone", "ca2": "master", "ca3": "clone"}
    kinds = [(e.get("type"), e.get("kind")) for e in lab.store_history()]
    assert ("promoted", "switchover") in kinds
