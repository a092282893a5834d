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
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ca_watchdog.lab.cluster import LabCluster
from ca_watchdog.lab.pki import LabPKIFiles, write_lab_pki
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
        """Trusts the lab CA for the server; client None, "agent" (lab CA) or "other" (another CA)."""
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        if client == "agent":
            ctx.load_cert_chain(str(self.pki.client_cert), str(self.pki.client_key))
        elif client == "other":
            ctx.load_cert_chain(str(self.other.client_cert), str(self.other.client_key))
        return ctx

    def call(
        self, node: str, path: str, method: str = "GET", client: str | None = None, body: Any = None
    ) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        req = urllib.request.Request(self.url(node, path), data=data, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/json")
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


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("api-lab")
    c = LabCluster(root / "cluster", base_port=BASE_PORT)
    c.build()
    other = write_lab_pki(root / "other-pki", "some other CA")
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
