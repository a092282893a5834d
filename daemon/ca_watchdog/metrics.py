"""Prometheus metric definitions (prefix ca_watchdog_), on a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROLES = ("master", "clone", "inconsistent", "unreadable")
REPLICATION_STATES = {"green": 0, "amber": 1, "red": 2, "unknown": 3}
# Decision.kind values of a promotion, and its results: every combination is exported from the
# start (at 0), so increase()/rate() see the first failover of a daemon's life.
FAILOVER_KINDS = ("automatic", "switchover", "failover", "bootstrap")
FAILOVER_RESULTS = ("success", "failed")


class Metrics:
    def __init__(self, member: str) -> None:
        self.member = member
        r = self.registry = CollectorRegistry()
        self.up = Gauge(
            "ca_watchdog_member_up", "1 if the member's CA answers getStatus running", ["member"], registry=r
        )
        self.cscfg_role = Gauge(
            "ca_watchdog_cscfg_role", "1 for the role the member's CS.cfg has", ["member", "role"], registry=r
        )
        self.is_leader = Gauge("ca_watchdog_leader", "1 if this member holds the leader key", ["member"], registry=r)
        self.serving_master = Gauge(
            "ca_watchdog_serving_master",
            "1 if this member serves as master now: key held, CS.cfg master, CA running, no action stopping or "
            "starting it (as it sees itself)",
            ["member"],
            registry=r,
        )
        self.epoch = Gauge("ca_watchdog_epoch", "epoch of the current leader key (0: none)", registry=r)
        self.masters_seen = Gauge(
            "ca_watchdog_masters_seen",
            "members whose CS.cfg is master, as this daemon sees them (must be 1)",
            registry=r,
        )
        self.leader_present = Gauge("ca_watchdog_leader_present", "1 if some member holds the leader key", registry=r)
        self.master_unmanaged = Gauge(
            "ca_watchdog_master_unmanaged",
            "1 if the old master's lease ended while its CA is still seen serving",
            registry=r,
        )
        self.failovers = Counter(
            "ca_watchdog_failovers",
            "promotions carried out by this member, by kind and result",
            ["kind", "result"],
            registry=r,
        )
        for kind in FAILOVER_KINDS:
            for result in FAILOVER_RESULTS:
                self.failovers.labels(kind, result)
        self.last_failover = Gauge(
            "ca_watchdog_last_failover_timestamp_seconds", "when this member last became master", registry=r
        )
        self.last_failover_duration = Gauge(
            "ca_watchdog_last_failover_duration_seconds", "from taking the key to the CA running as master", registry=r
        )
        self.replication_state = Gauge(
            "ca_watchdog_replication_state",
            "replication agreement state: 0 green, 1 amber, 2 red, 3 unknown",
            ["member", "agreement"],
            registry=r,
        )
        self.replication_lag = Gauge(
            "ca_watchdog_replication_lag_seconds",
            "how far this member's directory trails the newest change seen from each supplier",
            ["member", "replica_id"],
            registry=r,
        )
        self.crl_number = Gauge(
            "ca_watchdog_crl_number", "CRL number in the local directory", ["issuing_point"], registry=r
        )
        self.crl_age = Gauge(
            "ca_watchdog_crl_age_seconds", "seconds since the CRL's thisUpdate", ["issuing_point"], registry=r
        )
        self.crl_next_update = Gauge(
            "ca_watchdog_crl_next_update_timestamp_seconds", "the CRL's nextUpdate", ["issuing_point"], registry=r
        )
        self.paused = Gauge("ca_watchdog_paused", "1 while the cluster is paused", registry=r)
        self.paused_since = Gauge(
            "ca_watchdog_paused_since_timestamp_seconds", "when the pause began (0: not paused)", registry=r
        )
        self.cooldown_active = Gauge("ca_watchdog_cooldown_active", "1 while automatic failover is blocked", registry=r)
        self.store_up = Gauge("ca_watchdog_store_up", "1 if the last store call succeeded", registry=r)
        self.last_cycle = Gauge(
            "ca_watchdog_last_cycle_timestamp_seconds", "when this daemon last completed a cycle", registry=r
        )
        self.cycle_seconds = Histogram(
            "ca_watchdog_cycle_duration_seconds", "time of one HA cycle", buckets=LATENCY_BUCKETS, registry=r
        )
        self.probe_latency = Histogram(
            "ca_watchdog_probe_latency_seconds", "probe latency", ["probe"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.actions = Counter("ca_watchdog_actions", "decisions taken, by action", ["action"], registry=r)
        self.cycle_errors = Counter(
            "ca_watchdog_cycle_errors", "cycles that raised (logged with a traceback; the next cycle runs)", registry=r
        )
        self.bad_records = Counter(
            "ca_watchdog_bad_records", "store records and answers ignored as unreadable, per cycle seen", registry=r
        )
