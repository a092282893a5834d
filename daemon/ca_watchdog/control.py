"""Operator commands that read or write the store: status, switchover, failover, pause, resume,
ack, history, bootstrap. They use the same configuration (and store) as the daemon."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from .config import Settings, load_settings
from .loop import member_configs
from .model import CA_RUNNING, MemberState
from .store import open_store
from .store.base import Store, StoreUnavailable

T = TypeVar("T")


def with_store(config: str | os.PathLike[str], work: Callable[[Settings, Store], Awaitable[T]]) -> T:
    """Run `work` with the settings of `config` and its store, opened for the call and closed after."""
    settings = load_settings(config)

    async def main() -> T:
        store = open_store(settings.store, [m.name for m in settings.members], settings.timing.store_timeout)
        try:
            return await work(settings, store)
        finally:
            await store.close()

    return asyncio.run(main())


def _who() -> str:
    import getpass
    import socket

    return f"{getpass.getuser()}@{socket.gethostname()}"


def _ts(at: float | None) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S") if at else "-"


async def cluster_status(settings: Settings, store: Store) -> dict[str, Any]:
    leader = await store.get_leader()
    epoch = await store.get_epoch()
    snap = await store.get_members()
    flags = await store.get_flags()
    history = await store.get_history(50)
    previous = next((e.event.get("name") for e in reversed(history) if e.event.get("type") == "acquired"), None)
    states: dict[str, MemberState | None] = {}
    problems = list(snap.rejected)
    for m in settings.members:
        rec = snap.records.get(m.name)
        try:
            states[m.name] = MemberState.from_payload(m.name, rec.payload) if rec else None
        except (KeyError, TypeError, ValueError) as exc:
            states[m.name] = None
            problems.append(f"member record of {m.name} unreadable: {exc}")
    unmanaged = False
    if leader is None and isinstance(previous, str):
        seen = [
            st.name
            for st in states.values()
            if st is not None and st.watching == previous and st.watched_status in (CA_RUNNING, "starting")
        ]
        own = states.get(previous)
        unmanaged = bool(seen) or bool(own and own.ca_status == CA_RUNNING and own.cscfg_role == "master")
    rows = []
    for mc in member_configs(settings):
        st = states[mc.name]
        lag = None
        if st is not None:
            newest: dict[int, int] = {}
            for other in states.values():
                for rid, csn in (other.max_csn if other else {}).items():
                    newest[rid] = max(newest.get(rid, 0), int(csn[:8], 16))
            lags = [t - int(st.max_csn[rid][:8], 16) for rid, t in newest.items() if rid in st.max_csn]
            lag = max(lags, default=0)
        rows.append(
            {
                "member": mc.name,
                "role": st.cscfg_role if st else "?",
                "ca": st.ca_status if st else "no record",
                "replication": st.replication if st else "?",
                "lag_s": lag,
                "leader": bool(leader and leader.name == mc.name),
                "busy": st.busy if st else None,
                "nofailover": mc.nofailover,
                "priority": mc.priority,
            }
        )
    return {
        "leader": leader.name if leader else None,
        "epoch": leader.epoch if leader else epoch,
        "previous_leader": previous,
        "master_unmanaged": unmanaged,
        "paused": flags.paused,
        "switchover": {"target": flags.switchover.target, "kind": flags.switchover.kind} if flags.switchover else None,
        "members": rows,
        "problems": problems,
        # cluster.insecure = true: the cleartext URLs it allowed
        "insecure": list(settings.insecure),
    }


def format_status(st: dict[str, Any]) -> str:
    head = ("Member", "Role (CS.cfg)", "CA", "Replication", "Lag", "Leader", "Epoch")
    lines = []
    for r in st["members"]:
        lines.append(
            (
                r["member"],
                r["role"],
                r["ca"] + (f" ({r['busy']})" if r["busy"] else ""),
                r["replication"],
                "-" if r["lag_s"] is None else f"{r['lag_s']}s",
                "*" if r["leader"] else "",
                str(st["epoch"]) if r["leader"] else "",
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(head)]
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [sep, "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |", sep]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in lines]
    out.append(sep)
    if st["leader"] is None:
        out.append(f"no master holds the key (previous: {st['previous_leader'] or 'none'}, epoch {st['epoch']})")
    if st["master_unmanaged"]:
        out.append(f"MASTER UNMANAGED: {st['previous_leader']}'s lease ended but its CA is still serving")
    if st["paused"]:
        out.append("cluster is PAUSED: no automatic action")
    if st["switchover"]:
        out.append(f"pending {st['switchover']['kind']} to {st['switchover']['target']}")
    out += [f"problem: {p}" for p in st["problems"]]
    out += [f"INSECURE (cluster.insecure = true): cleartext {u}" for u in st.get("insecure", ())]
    return "\n".join(out)


def _fail(exc: Exception) -> int:
    print(f"ca-watchdog: {exc}")
    return 1


def cli_status(args: argparse.Namespace) -> int:
    try:
        st = with_store(args.config, cluster_status)
    except StoreUnavailable as exc:
        return _fail(exc)
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0


class RequestRefused(ValueError):
    """A switchover/failover request that the checks refuse; status 400 (bad input) or 409 (state)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


async def request_switchover(settings: Settings, store: Store, to: str, kind: str, who: str) -> str:
    """The checks and the store writes of a switchover or manual failover request, shared by the CLI
    and the API. Returns what happened; RequestRefused when the request makes no sense."""
    names = [m.name for m in settings.members]
    if to not in names:
        raise RequestRefused(f"--to {to!r} is not a cluster member ({', '.join(names)})")
    leader = await store.get_leader()
    if leader is not None and leader.name == to:
        return f"{to} is already master: nothing to do"
    if kind == "switchover" and leader is None:
        raise RequestRefused("no master holds the key; use `ca-watchdog failover --to NAME`", 409)
    req = await store.request_switchover(to, kind, who)  # type: ignore[arg-type]
    await store.append_history({"type": kind, "by": req.requested_by, "target": to})
    return f"{kind} to {to} requested; the daemons carry it out (watch `ca-watchdog status`)"


async def set_flag(store: Store, what: str, who: str) -> str:
    """pause, resume or ack, recorded in the history; shared by the CLI and the API."""
    if what == "ack":
        at = await store.ack_cooldown()
        msg = f"last failover acknowledged at {_ts(at)}: automatic failover allowed again"
    else:
        await store.set_paused(what == "pause")
        msg = "paused: daemons observe and report, never act" if what == "pause" else "resumed"
    await store.append_history({"type": what, "by": who})
    return msg


def _request(args: argparse.Namespace, kind: str) -> int:
    async def work(settings: Settings, store: Store) -> str:
        return await request_switchover(settings, store, args.to, kind, _who())

    try:
        print(with_store(args.config, work))
    except StoreUnavailable as exc:
        return _fail(exc)
    return 0


def cli_switchover(args: argparse.Namespace) -> int:
    return _request(args, "switchover")


def cli_failover(args: argparse.Namespace) -> int:
    return _request(args, "failover")


def _flag(args: argparse.Namespace, what: str) -> int:
    async def work(settings: Settings, store: Store) -> str:
        return await set_flag(store, what, _who())

    try:
        print(with_store(args.config, work))
    except StoreUnavailable as exc:
        return _fail(exc)
    return 0


def cli_pause(args: argparse.Namespace) -> int:
    return _flag(args, "pause")


def cli_resume(args: argparse.Namespace) -> int:
    return _flag(args, "resume")


def cli_ack(args: argparse.Namespace) -> int:
    return _flag(args, "ack")


def cli_history(args: argparse.Namespace) -> int:
    async def work(settings: Settings, store: Store) -> list[dict[str, Any]]:
        return [{"seq": e.seq, "at": e.at, **e.event} for e in await store.get_history(200)]

    try:
        events = with_store(args.config, work)
    except StoreUnavailable as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(events, indent=2))
        return 0
    for e in events:
        rest = {k: v for k, v in e.items() if k not in ("seq", "at", "type")}
        detail = " ".join(f"{k}={v}" for k, v in rest.items() if v is not None)
        print(f"{_ts(e['at'])}  {e.get('type', '?'):<20} {detail}")
    return 0


def cli_bootstrap(args: argparse.Namespace) -> int:
    async def work(settings: Settings, store: Store) -> str:
        names = [m.name for m in settings.members]
        if args.master not in names:
            raise ValueError(f"--master {args.master!r} is not a cluster member ({', '.join(names)})")
        if await store.get_leader() is not None:
            raise ValueError("a master already holds the key; use switchover")
        last = await store.get_epoch()
        if last > 0:
            # bootstrap is for an empty store: with a master before, its CA may still serve as one
            raise ValueError(
                f"this store has had a master (epoch {last}): bootstrap is for an empty store only; "
                "use `ca-watchdog failover --to NAME`, which checks that the old master no longer serves"
            )
        rec = await store.acquire_leader(
            args.master, settings.timing.ttl, f"bootstrap by {_who()}", kind="bootstrap", expect_epoch=0
        )
        if rec is None:
            raise ValueError("another member took the key meanwhile")
        await store.append_history(
            {
                "type": "acquired",
                "name": args.master,
                "epoch": rec.epoch,
                "kind": "bootstrap",
                "by": _who(),
                "at_cli": time.time(),
            }
        )
        return (
            f"{args.master} holds the key (epoch {rec.epoch}); its daemon makes its CS.cfg master and the others "
            "follow. If its daemon does not renew within ttl, the key expires again."
        )

    try:
        print(with_store(args.config, work))
    except StoreUnavailable as exc:
        return _fail(exc)
    return 0
