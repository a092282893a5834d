"""Report one cycle: the reason line (journal fields MEMBER, EPOCH, ACTION), the metrics, sd_notify."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from .decide import UNMANAGED, cooldown_reason
from .metrics import REPLICATION_STATES, ROLES, Metrics
from .model import CA_RUNNING, ClusterView, Decision, MemberConfig
from .probes.directory import DirectoryObservation
from .systemd import Notifier

log = logging.getLogger("ca_watchdog")


class Reporter:
    def __init__(self, me: str, members: tuple[MemberConfig, ...], metrics: Metrics, notifier: Notifier) -> None:
        self.me = me
        self.members = members
        self.metrics = metrics
        self.notifier = notifier
        self._problems_logged: dict[str, float] = {}
        # label children looked up once: `labels()` costs more than the update it leads to
        self._up = {mc.name: metrics.up.labels(mc.name) for mc in members}
        self._role = {(mc.name, r): metrics.cscfg_role.labels(mc.name, r) for mc in members for r in ROLES}
        self._is_leader = metrics.is_leader.labels(me)

    def report(self, view: ClusterView, d: Decision, seconds: float, epoch: int) -> None:
        """`epoch`: the epoch held when the decision line is logged: a bootstrap or resume has taken its key
        by then; a promotion takes it later in its task, whose own "took the key" line carries the new one."""
        log.info(d.line(), extra={"MEMBER": self.me, "EPOCH": str(epoch), "ACTION": d.action.value})
        now = time.monotonic()
        for p in view.problems:  # each distinct problem at most every 5 minutes
            if now - self._problems_logged.get(p, -1e9) >= 300:
                self._problems_logged[p] = now
                log.warning("ignored: %s", p)
        m = self.metrics
        m.bad_records.inc(len(view.problems))
        m.actions.labels(d.action.value).inc()  # a handful of values; labels() caches the child
        m.cycle_seconds.observe(seconds)
        m.last_cycle.set(time.time())
        m.epoch.set(epoch)
        m.leader_present.set(1 if view.leader else 0)
        self._is_leader.set(1 if view.leader and view.leader.name == self.me else 0)
        m.paused.set(1 if view.control.paused else 0)
        m.paused_since.set(view.control.paused_at or 0)
        m.master_unmanaged.set(1 if d.reason.startswith(UNMANAGED) else 0)
        m.cooldown_active.set(1 if cooldown_reason(view) else 0)
        states = [view.local, *view.records.values()]
        m.masters_seen.set(sum(1 for st in states if st.cscfg_role == "master"))
        by_name = {st.name: st for st in states}
        for member in self.members:  # a member without a fresh record is not up and has no known role
            st = by_name.get(member.name)
            self._up[member.name].set(1 if st is not None and st.ca_status == CA_RUNNING else 0)
            for role in ROLES:
                self._role[member.name, role].set(1 if st is not None and st.cscfg_role == role else 0)
        newest: dict[int, int] = {}
        for st in states:
            for rid, csn in st.max_csn.items():
                newest[rid] = max(newest.get(rid, 0), int(csn[:8], 16))
        for rid, t in newest.items():
            mine = view.local.max_csn.get(rid)
            lag = t - int(mine[:8], 16) if mine else float("nan")
            m.replication_lag.labels(self.me, str(rid)).set(lag)
        self.notifier.cycle(d.line())

    def directory(self, ds: DirectoryObservation | None) -> None:
        if ds is None or not ds.ok:
            return
        for a in ds.agreements:
            self.metrics.replication_state.labels(self.me, a.name).set(REPLICATION_STATES.get(a.state, 3))
        now = datetime.now(UTC)
        for rec in ds.crl_records:
            if rec.crl_number is not None:
                self.metrics.crl_number.labels(rec.issuing_point).set(rec.crl_number)
            if rec.this_update is not None:
                self.metrics.crl_age.labels(rec.issuing_point).set((now - rec.this_update).total_seconds())
            if rec.next_update is not None:
                self.metrics.crl_next_update.labels(rec.issuing_point).set(rec.next_update.timestamp())
