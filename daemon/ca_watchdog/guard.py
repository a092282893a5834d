"""The guard (`ExecStartPre=` of pki-tomcatd@): make CS.cfg agree with the store before the CA starts.

Not a second policy: it builds a guard view (the store's facts, the local CS.cfg, the CA about to start)
and asks the same decide() the daemon uses. A decision to demote (FOLLOW, SELF_FENCE) rewrites CS.cfg as
a clone of the named master; a decision to stop (a CS.cfg that would act as master on a non-holder and
cannot be demoted safely) refuses the start; anything else leaves the file as it is. Only the key holder
may start as master; with the store unreachable nobody can prove a lease, so a master CS.cfg is demoted.
On a SQLite host whose store file does not exist yet, no daemon has ever run: that is an empty store
(bootstrap: the file is left as it is), not an unreachable one. When the local daemon starts its CA as
master, it hands its lease over in `node.lease_file` (lease_file.py): with the store unreachable, that
proof counts as the daemon's own lease would (until the self-fence point), so a store blip does not
demote a promotion in progress; the store, when it answers, outranks it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from dataclasses import dataclass

from . import cscfg, lease_file
from .config import Settings, load_settings
from .decide import decide
from .loop import member_configs, policy_of
from .model import CA_STARTING, Action, ClusterView, MemberState
from .observe import master_duty
from .store import open_store
from .store.base import Flags, MembersSnapshot, Store, StoreState, StoreUnavailable
from .view import LocalFacts, build_view, decode_records

log = logging.getLogger(__name__)

EMPTY_STORE = StoreState(None, None, False, MembersSnapshot({}, ()), Flags(False, None, None, None), None, ())
DEMOTE = (Action.FOLLOW, Action.SELF_FENCE, Action.DEMOTE_AND_RELEASE)


class GuardRefusal(Exception):
    """The CA must not start; the message says why."""


@dataclass(frozen=True)
class GuardResult:
    changed: bool
    message: str


def lease_facts(state: StoreState | None, proof: lease_file.LeaseProof | None) -> LocalFacts:
    """The daemon's hand-off counts while the store cannot be read, or when the store agrees (same holder,
    same epoch); a store naming anyone else, or no one, outranks it."""
    if proof is None:
        return LocalFacts()
    if state is not None and not (
        state.leader is not None and state.leader.name == proof.name and state.leader.epoch == proof.epoch
    ):
        return LocalFacts()
    return LocalFacts(seconds_since_renew=proof.age(), held_epoch=proof.epoch)


def guard_view(
    settings: Settings,
    cfg: cscfg.CSCfg,
    state: StoreState | None,
    error: str | None,
    facts: LocalFacts | None = None,
) -> ClusterView:
    """The CA is about to start (counted as starting: it would serve what CS.cfg says)."""
    me = settings.node.name
    report = cscfg.classify(cfg)
    local = MemberState(
        name=me,
        updated_at=time.time(),
        ca_status=CA_STARTING,
        cscfg_role=report.role.value,
        cscfg_problem="; ".join(report.problems) or None,
        cscfg_master_duty=master_duty(report),
        master_agent=report.master_agent,
        ds_ok=True,
    )
    members = member_configs(settings)
    records, problems = decode_records(state, members) if state is not None else ({}, [])
    view = build_view(
        me=me,
        now=time.time(),
        policy=policy_of(settings),
        members=members,
        local=local,
        state=state,
        store_error=error,
        records=records,
        record_ages={name: 0.0 for name in records},  # one look: the store's TTL says what is fresh
        facts=facts or LocalFacts(),  # a lease is proven by the store's key or by the daemon's hand-off
        known_replica_ids={},
        problems=tuple(problems),
    )
    # a pause stops the daemons from acting, never the guard from keeping a master CS.cfg off a non-holder
    return ClusterView(**{**view.__dict__, "control": type(view.control)(**{**view.control.__dict__, "paused": False})})


async def read_store(settings: Settings, store: Store | None) -> tuple[StoreState | None, str | None]:
    s = settings.store
    if s.backend == "sqlite":
        try:
            await asyncio.to_thread(os.stat, s.path)
        except FileNotFoundError:
            return EMPTY_STORE, None
        except OSError as exc:  # a file it cannot look at (permissions, a sandbox, SELinux) is not a bootstrap
            return None, f"store unreachable ({s.path}: {exc.strerror})"
    if store is None:
        return None, "store could not be opened"
    try:
        return await asyncio.wait_for(store.read_state(), settings.timing.store_timeout + 0.5), None
    except (StoreUnavailable, TimeoutError) as exc:
        return None, f"store unreachable ({exc or 'timeout'})"


async def guard(settings: Settings, store: Store | None) -> GuardResult:
    path = settings.node.cs_cfg
    before = cscfg.read_cscfg(path)  # unreadable: CSCfgError, the CLI exits 2 naming file and line
    state, error = await read_store(settings, store)
    proof, handoff = await asyncio.to_thread(_hand_off, settings)
    view = guard_view(settings, before, state, error, lease_facts(state, proof))
    d = decide(view)
    role = view.local.cscfg_role
    why = f"{_facts(state, error)}{handoff} [{d.line()}]"
    if d.action is Action.STOP_CA:
        raise GuardRefusal(why)
    if d.action not in DEMOTE:
        return GuardResult(False, f"{why}: CS.cfg left as {role}")
    target = d.target or _fallback_master(settings)
    if target is None or target == settings.node.name:
        raise GuardRefusal(f"{why}: no other member to point CS.cfg at")
    member = settings.member(target)
    after = cscfg.demote(before, member.agent_host, member.agent_port)
    if after.render() == before.render():
        return GuardResult(False, f"{why}: CS.cfg already a clone of {target}")
    result = cscfg.write_cscfg(after, path, expected=before.render())
    return GuardResult(True, f"{why}: CS.cfg was {role}, now a clone of {target} (backup {result.backup})")


def _facts(state: StoreState | None, error: str | None) -> str:
    """What the store says, in a few words, for the guard's one line."""
    if state is None:
        return error or "store unreachable"
    if state.leader is not None:
        return f"{state.leader.name} holds the leader key (epoch {state.leader.epoch})"
    if state.epoch is None and not state.epoch_unreadable:
        return "bootstrap (no master yet)"
    last = f"; last master {state.epoch.name}, epoch {state.epoch.epoch}" if state.epoch else ""
    return f"no master holds the key{last}"


def _hand_off(settings: Settings) -> tuple[lease_file.LeaseProof | None, str]:
    """The local daemon's lease proof, and a few words about it for the guard's line."""
    try:
        proof = lease_file.read(settings.node.lease_file, settings.node.name)
    except lease_file.LeaseFileError as exc:
        return None, f"; lease hand-off ignored: {exc}"
    if proof is None:
        return None, ""
    return proof, f"; lease hand-off: epoch {proof.epoch}, renewed {proof.age():.1f}s ago"


def _fallback_master(settings: Settings) -> str | None:
    others = sorted((m for m in settings.members if m.name != settings.node.name), key=lambda m: (-m.priority, m.name))
    return others[0].name if others else None


async def run_guard(settings: Settings) -> GuardResult:
    t = settings.timing
    try:
        store: Store | None = open_store(settings.store, [m.name for m in settings.members], t.store_timeout)
    except (OSError, ValueError) as exc:
        log.warning("cannot open the store: %s", exc)
        store = None
    try:
        return await guard(settings, store)
    finally:
        if store is not None:
            await store.close()


def cli_guard(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if args.instance and args.instance not in settings.node.service:
        print(f"ca-watchdog guard: note: instance {args.instance!r} is not in node.service {settings.node.service!r}")
    try:
        result = asyncio.run(run_guard(settings))
    except (GuardRefusal, cscfg.CSCfgWriteError) as exc:
        print(f"ca-watchdog guard: {exc}; refusing to let the CA start")
        return 1
    print(f"ca-watchdog guard: {result.message}")
    return 0
