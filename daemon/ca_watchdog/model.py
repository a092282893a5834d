"""Immutable snapshots that the policy reads, and the decision it returns. No I/O here."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

CA_RUNNING, CA_STARTING, CA_DOWN = "running", "starting", "down"
ROLE_UNREADABLE = "unreadable"  # CS.cfg missing or malformed: never elected, never touched
_CSN = re.compile(r"[0-9a-fA-F]{20}")
_RID = re.compile(r"[0-9]{1,5}")


class Action(StrEnum):
    WAIT = "wait"  # observe only; the reason says why
    RENEW = "renew"  # the master keeps its lease
    BOOTSTRAP = "bootstrap"  # take the empty leader key as the one CS.cfg master
    RESTART_CA = "restart_ca"  # master's CA failed: restart it once before failing over
    DEMOTE_AND_RELEASE = "demote_and_release"  # master's CA failed, or planned switchover: step down
    PROMOTE = "promote"  # take the key (if not held) and become master
    SELF_FENCE = "self_fence"  # master cannot renew in time: stop being master before the lease ends
    FOLLOW = "follow"  # be a clone of the current master (rewrite CS.cfg if needed, start the CA)
    CLEAR_SWITCHOVER = "clear_switchover"  # a switchover request that cannot be honoured
    RESUME = "resume"  # take my own expired key back while my CA kept serving as master (no restart)
    START_CLONE = "start_clone"  # nobody holds the key and my clone CA is down: start it as a clone
    STOP_CA = "stop_ca"  # a CS.cfg that would act as master on a non-holder: stop the CA, leave the file


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    target: str | None = None  # member to promote / follow / hand over to
    fence_old_master: bool = False  # run fence_command first: the old master was not seen stepping down
    kind: str = "automatic"  # automatic | switchover | failover | bootstrap (for history and metrics)

    def line(self) -> str:
        return f"{self.action.value}: {self.reason}"


@dataclass(frozen=True)
class MemberConfig:
    name: str
    priority: int = 100
    nofailover: bool = False
    agent_host: str = ""
    agent_port: int = 8443


@dataclass(frozen=True)
class MemberState:
    """What one daemon publishes about its node every cycle (the member record's payload)."""

    name: str
    updated_at: float
    ca_status: str = CA_DOWN
    ca_reason: str | None = None
    ca_down_streak: int = 0
    cscfg_role: str = ROLE_UNREADABLE
    cscfg_problem: str | None = None
    cscfg_master_duty: bool = False  # CS.cfg would generate CRLs on some issuing point or run the status task
    master_agent: str | None = None
    ds_ok: bool = False
    ds_error: str | None = None
    replication: str = "unknown"  # worst agreement state: green | amber | red | unknown
    replication_red: tuple[str, ...] = ()  # consumers (member names, else host:port) of red agreements
    replica_id: int | None = None
    max_csn: Mapping[int, str] = field(default_factory=dict)  # replica id -> max CSN (20 hex digits)
    watching: str | None = None  # the master this node probes
    watched_status: str | None = None
    watched_role: str | None = None  # master | clone, from the watched CA's getInfo (None: unknown)
    watched_down_streak: int = 0
    busy: str | None = None  # a long action in progress (promoting, demoting, restarting)

    def to_payload(self) -> dict[str, Any]:
        return {
            "updated_at": self.updated_at,
            "ca_status": self.ca_status,
            "ca_reason": self.ca_reason,
            "ca_down_streak": self.ca_down_streak,
            "cscfg_role": self.cscfg_role,
            "cscfg_problem": self.cscfg_problem,
            "cscfg_master_duty": self.cscfg_master_duty,
            "master_agent": self.master_agent,
            "ds_ok": self.ds_ok,
            "ds_error": self.ds_error,
            "replication": self.replication,
            "replication_red": list(self.replication_red),
            "replica_id": self.replica_id,
            "max_csn": {str(k): v for k, v in self.max_csn.items()},
            "watching": self.watching,
            "watched_status": self.watched_status,
            "watched_role": self.watched_role,
            "watched_down_streak": self.watched_down_streak,
            "busy": self.busy,
        }

    @classmethod
    def from_payload(cls, name: str, p: Mapping[str, Any]) -> MemberState:
        """Raises ValueError on a malformed payload (the record is then ignored and reported)."""

        def opt_str(k: str) -> str | None:
            v = p.get(k)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{k} must be a string")
            return v

        def req_str(k: str) -> str:
            v = p.get(k)
            if not isinstance(v, str):
                raise ValueError(f"{k} must be a string")
            return v

        def count(k: str) -> int:
            v = p.get(k, 0)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**31:
                raise ValueError(f"{k} must be a small non-negative integer")
            return v

        def flag(k: str, default: bool | None = None) -> bool:
            v = p.get(k, default)
            if not isinstance(v, bool):
                raise ValueError(f"{k} must be true or false")
            return v

        if not isinstance(p, Mapping):
            raise ValueError("the payload must be an object")
        updated = p.get("updated_at")
        if isinstance(updated, bool) or not isinstance(updated, int | float) or not math.isfinite(updated):
            raise ValueError("updated_at must be a finite number")
        csn = p.get("max_csn") or {}
        if not isinstance(csn, Mapping):
            raise ValueError("max_csn must be a mapping")
        max_csn: dict[int, str] = {}
        for k, v in csn.items():
            if not (isinstance(k, str) and _RID.fullmatch(k) and isinstance(v, str) and _CSN.fullmatch(v)):
                raise ValueError("max_csn must map replica ids to 20-hex-digit CSNs")
            max_csn[int(k)] = v.lower()
        red = p.get("replication_red") or []
        if not isinstance(red, list) or not all(isinstance(x, str) for x in red):
            raise ValueError("replication_red must be a list of strings")
        rid = p.get("replica_id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, int) or not 0 < rid < 65536):
            raise ValueError("replica_id must be an integer from 1 to 65535")
        return cls(
            name=name,
            updated_at=float(updated),
            ca_status=req_str("ca_status"),
            ca_reason=opt_str("ca_reason"),
            ca_down_streak=count("ca_down_streak"),
            cscfg_role=req_str("cscfg_role"),
            cscfg_problem=opt_str("cscfg_problem"),
            cscfg_master_duty=flag("cscfg_master_duty", False),
            master_agent=opt_str("master_agent"),
            ds_ok=flag("ds_ok"),
            ds_error=opt_str("ds_error"),
            replication=req_str("replication"),
            replication_red=tuple(red),
            replica_id=rid,
            max_csn=max_csn,
            watching=opt_str("watching"),
            watched_status=opt_str("watched_status"),
            watched_role=opt_str("watched_role"),
            watched_down_streak=count("watched_down_streak"),
            busy=opt_str("busy"),
        )


@dataclass(frozen=True)
class LeaderView:
    name: str
    epoch: int
    expires_at: float


@dataclass(frozen=True)
class ControlView:
    paused: bool = False
    paused_at: float | None = None
    switchover_target: str | None = None
    switchover_kind: str | None = None  # "switchover" | "failover"
    switchover_id: str | None = None  # clearing names it, so a newer request is never deleted
    cooldown_since: float | None = None  # the store's cooldown key: the last completed automatic failover


@dataclass(frozen=True)
class Policy:
    interval: float = 2.0
    ttl: float = 30.0
    safety_margin: float = 5.0
    failure_threshold: int = 3
    restart_before_failover: bool = True
    maximum_lag: float = 60.0
    failover_cooldown: float = 3600.0
    fence_lead: float = 0.0  # the longest a cycle can take: a self-fence is decided this much earlier


@dataclass(frozen=True)
class LocalMemory:
    """What this daemon knows beyond one observation: its own lease (monotonic, from the actuator),
    its own start, and the store's epoch record (who was master and how that term ended)."""

    seconds_since_renew: float | None = None  # monotonic age of my last successful renewal (None: none in this run)
    uptime: float = float("inf")  # seconds since this daemon started: the fence deadline without a provable lease
    restarted_in_incident: bool = False  # RESTART_CA already tried since the CA was last healthy
    previous_leader: str | None = None  # the epoch record's holder (the current or last master)
    previous_leader_released: bool = False  # it released the key itself (CA confirmed stopped) rather than expiring
    leaderless_for: float = 0.0  # seconds the key has been seen free
    known_replica_ids: Mapping[str, int] = field(default_factory=dict)
    epoch: int = 0  # the last epoch handed out (0: no master ever)
    epoch_unknown: bool = False  # the epoch record is unreadable: never an empty store
    unfinished_step: str | None = None  # the journal of an earlier run that died mid-action


@dataclass(frozen=True)
class ClusterView:
    now: float
    me: str
    policy: Policy
    members: tuple[MemberConfig, ...]
    local: MemberState  # this node, observed this cycle
    records: Mapping[str, MemberState]  # fresh records of the others (and possibly my own previous one)
    leader: LeaderView | None
    control: ControlView
    memory: LocalMemory
    store_ok: bool = True
    store_error: str | None = None
    busy: str | None = None  # my long action in progress, if any
    problems: tuple[str, ...] = ()  # unreadable or foreign store records, reported but ignored
    failsafe_acks: tuple[str, ...] = ()  # with the store down: peers that still follow me and cannot reach it
    record_ages: Mapping[str, float] = field(default_factory=dict)  # by my monotonic clock, since each changed

    def age_of(self, st: MemberState) -> float:
        """How old another member's record is by this reader's clock (0 for my own observation)."""
        return 0.0 if st.name == self.me else self.record_ages.get(st.name, float("inf"))

    def config_of(self, name: str) -> MemberConfig | None:
        return next((m for m in self.members if m.name == name), None)

    def state_of(self, name: str) -> MemberState | None:
        if name == self.me:
            return self.local
        return self.records.get(name)
