"""The actuator: the one owner of this node's lease and of every action that changes the local CA.

- The lease is renewed on its own cadence (every `interval`), which probes and long actions cannot delay.
- Long actions (promote, demote and release, restart, follow, self-fence) run as one task. The next
  cycle can pre-empt it: a self-fence cancels it, and so does a lease seen lost in the store. A
  cancelled action stops at its current step and rolls nothing back: the journal it left in the
  store tells the next decision what is half done (SIGTERM is the same cancellation).
- Nothing starts the CA as master without renewing the lease first (`_lease_for_start`).
- A failed promotion releases the key only once the CA is confirmed stopped; otherwise it keeps the key.
- A release whose answer is lost is resolved by reading the epoch record back, never by a blind retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from . import cscfg, lease_file
from .config import Settings
from .metrics import Metrics
from .model import Action, ClusterView, Decision, Policy
from .node import LocalCA, NodeError, run_fence_command
from .store.base import ENDED_RELEASED, LeaderRecord, Store, StoreUnavailable
from .view import LocalFacts

log = logging.getLogger("ca_watchdog")
T = TypeVar("T")

LONG_ACTIONS = (
    Action.PROMOTE,
    Action.DEMOTE_AND_RELEASE,
    Action.RESTART_CA,
    Action.SELF_FENCE,
    Action.FOLLOW,
    Action.START_CLONE,
    Action.STOP_CA,
)


class LeaseLost(NodeError):
    """The lease could not be confirmed right before starting the CA as master."""


class Actuator:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        ca: LocalCA,
        metrics: Metrics,
        policy: Policy,
        on_start_issued: Callable[[], None] = lambda: None,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.s = settings
        self.me = settings.node.name
        self.store = store
        self.ca = ca
        self.metrics = metrics
        self.policy = policy
        self.on_start_issued = on_start_issued
        self.wake = wake
        self.started = time.monotonic()
        self.held_epoch: int | None = None
        self.last_renew: float | None = None  # monotonic time the last successful renewal was sent
        self.restarted_in_incident = False
        self.unfinished_step: str | None = None
        self.busy: str | None = None
        self.task: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._lease_file_error: str | None = None

    # ---- facts for the view --------------------------------------------------------------------

    def lease_age(self) -> float | None:
        if self.held_epoch is None or self.last_renew is None:
            return None
        return time.monotonic() - self.last_renew

    def facts(self, leaderless_for: float) -> LocalFacts:
        return LocalFacts(
            seconds_since_renew=self.lease_age(),
            held_epoch=self.held_epoch if self.last_renew is not None else None,
            uptime=time.monotonic() - self.started,
            restarted_in_incident=self.restarted_in_incident,
            leaderless_for=leaderless_for,
            unfinished_step=self.unfinished_step,
            busy=self.acting,
        )

    @property
    def acting(self) -> str | None:
        """The step of the long action running now (each one stops or starts the CA), if any."""
        return self.busy if self.task is not None and not self.task.done() else None

    def fence_overdue(self) -> bool:
        """I hold (or may hold) the key and have not renewed it in time: fence before anything else."""
        age = self.lease_age()
        return age is not None and age >= self.policy.ttl - self.policy.safety_margin - self.policy.fence_lead

    def ca_running(self) -> None:
        self.restarted_in_incident = False

    # ---- store calls ---------------------------------------------------------------------------

    async def _call(self, aw: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(aw, self.s.timing.store_timeout + 0.5)
        except TimeoutError as exc:
            raise StoreUnavailable(f"store did not answer within {self.s.timing.store_timeout:g}s") from exc

    async def history(self, event: Mapping[str, Any]) -> None:
        """The audit trail: best effort, never read by a decision."""
        try:
            await self._call(self.store.append_history({"member": self.me, **event}))
        except (StoreUnavailable, ValueError) as exc:
            log.warning("could not record %s in the history: %s", event.get("type"), exc)

    async def _journal(self, step: str) -> None:
        self.busy = step
        try:
            await self._call(self.store.put_step(self.me, {"step": step, "at": time.time(), "epoch": self.held_epoch}))
        except StoreUnavailable as exc:
            log.warning("could not journal step %r: %s", step, exc)

    async def load_journal(self) -> None:
        try:
            step = await self._call(self.store.get_step(self.me))
        except StoreUnavailable:
            return
        if step:
            self.unfinished_step = str(step.get("step"))
            log.warning(
                "an earlier run stopped during %r; the next decision resumes or rolls it back", self.unfinished_step
            )

    async def _clear_journal(self) -> None:
        self.unfinished_step = None
        with contextlib.suppress(StoreUnavailable):
            await self._call(self.store.put_step(self.me, None))

    # ---- the lease -----------------------------------------------------------------------------

    def start_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_loop(), name="ca-watchdog renewer")

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.policy.interval)
            if self.held_epoch is None:
                continue
            try:
                await self.renew()
            except StoreUnavailable as exc:
                log.warning("lease renewal failed: %s", exc)
            except Exception:
                log.exception("lease renewal raised")
            if self.held_epoch is None or self.fence_overdue():
                self.wake()

    async def renew(self) -> bool:
        epoch = self.held_epoch
        if epoch is None:
            return False
        sent = time.monotonic()
        rec = await self._call(self.store.renew_leader(self.me, epoch, self.policy.ttl))
        if self.held_epoch != epoch:
            return False  # released or lost while the call ran
        if rec is None:
            log.error("lost the leader key (epoch %d): someone else holds it or it expired", epoch)
            self._lost()
            return False
        self._set_lease(epoch, sent)
        return True

    def _set_lease(self, epoch: int | None, renewed: float | None) -> None:
        """The one place the lease state changes; the guard's copy (lease_file) changes with it, with no
        await in between (a cancellation there would leave the guard a proof the daemon no longer has).
        A few bytes on /run: written in place rather than off the loop for that reason."""
        self.held_epoch, self.last_renew = epoch, renewed
        path = self.s.node.lease_file
        try:
            if epoch is not None and renewed is not None:
                lease_file.publish(path, lease_file.LeaseProof(self.me, epoch, renewed))
            else:
                lease_file.withdraw(path)
        except OSError as exc:
            # the guard then goes by the store alone (it may demote a start during a store blip): say so once
            if self._lease_file_error != str(exc):
                log.warning("cannot hand the lease to the guard in %s: %s", path, exc)
            self._lease_file_error = str(exc)
        else:
            self._lease_file_error = None

    def _lost(self) -> None:
        self._set_lease(None, None)
        if self.task is not None and not self.task.done() and self.busy and self.busy.startswith("promote"):
            # a promotion must not go on without the key: stop it at its current step
            self.task.cancel()

    def observe_leader(self, leader: LeaderRecord | None, read_started: float) -> None:
        """Align with what the store said at `read_started` (monotonic): adopt a key it says I hold (a
        restarted daemon), and drop one it says I no longer hold."""
        if leader is not None and leader.name == self.me:
            if self.held_epoch != leader.epoch:
                self._set_lease(leader.epoch, None)  # renewed before the next decision
            return
        if self.held_epoch is not None and (self.last_renew is None or self.last_renew < read_started):
            log.error("the store says I no longer hold the key (epoch %d)", self.held_epoch)
            self._lost()

    async def _acquire(self, d: Decision, expect_epoch: int | None = None) -> LeaderRecord | None:
        sent = time.monotonic()
        rec = await self._call(self.store.acquire_leader(self.me, self.policy.ttl, d.reason, d.kind, expect_epoch))
        if rec is None:
            log.info("did not get the leader key: another member took it first")
            return None
        self._set_lease(rec.epoch, sent)
        # a promotion's decision line was logged before its task took the key: this one carries the epoch it
        # made, so `journalctl ACTION=promote EPOCH=N` finds the promotion that created epoch N (a bootstrap or
        # resume takes the key before its decision line is logged, which carries the new epoch already)
        if d.action is Action.PROMOTE:
            log.info(
                "%s: took the key (epoch %d, %s)",
                d.action.value,
                rec.epoch,
                d.kind,
                extra={"MEMBER": self.me, "EPOCH": str(rec.epoch), "ACTION": d.action.value},
            )
        await self.history(
            {"type": "acquired", "name": self.me, "epoch": rec.epoch, "kind": d.kind, "reason": d.reason}
        )
        return rec

    async def _release(self, reason: str, target: str | None = None) -> None:
        epoch = self.held_epoch
        if epoch is None:
            return
        try:
            released = await self._call(self.store.release_leader(self.me, epoch, reason, target))
        except StoreUnavailable:
            released = False  # the answer may be lost, not the release: read it back below
        if not released:
            rec = await self._call(self.store.get_epoch_record())
            released = rec is not None and rec.epoch == epoch and rec.name == self.me and rec.ended == ENDED_RELEASED
            if not released:
                leader = await self._call(self.store.get_leader())
                if leader is not None and leader.name == self.me and leader.epoch == epoch:
                    raise StoreUnavailable("the release did not go through; the key is still mine")
                log.warning("the key (epoch %d) had already ended before the release", epoch)
        self._set_lease(None, None)
        if released:
            await self.history(
                {"type": "released", "name": self.me, "epoch": epoch, "reason": reason, "target": target}
            )

    async def _lease_for_start(self) -> None:
        """Right before the CA starts as master: the key must still be mine, freshly renewed."""
        try:
            ok = await self.renew()
        except StoreUnavailable as exc:
            raise LeaseLost(f"cannot confirm the lease before starting as master: {exc}") from exc
        if not ok:
            raise LeaseLost("the lease was lost before the CA could start as master")

    # ---- decisions -------------------------------------------------------------------------------

    async def apply(self, d: Decision, view: ClusterView) -> None:
        if (
            self.unfinished_step is not None
            and view.store_ok
            and not (d.action is Action.PROMOTE and view.leader is not None and view.leader.name == self.me)
        ):
            await self._clear_journal()  # decided on: nothing left to resume
        if d.action is Action.SELF_FENCE:
            await self._preempt()
        elif d.action in LONG_ACTIONS and self.task is not None and not self.task.done():
            return  # one long action at a time; the running one reports itself as busy
        if d.action is Action.WAIT:
            return
        if d.action is Action.RENEW:
            if view.leader is not None and self.last_renew is None:
                await self.renew()  # adopted after a restart: prove the lease before anything else
            return
        if d.action is Action.CLEAR_SWITCHOVER:
            await self._call(self.store.clear_switchover(d.target))
            await self.history({"type": "switchover_refused", "reason": d.reason})
            return
        if d.action is Action.BOOTSTRAP:
            await self._acquire(d)
            return
        if d.action is Action.RESUME:
            # only if no other epoch was handed out since mine: the CA was never stopped, so nothing restarts
            await self._acquire(d, expect_epoch=view.memory.epoch)
            return
        runners: dict[Action, Callable[[Decision, ClusterView], Awaitable[None]]] = {
            Action.PROMOTE: self._promote,
            Action.DEMOTE_AND_RELEASE: self._demote_and_release,
            Action.RESTART_CA: self._restart,
            Action.SELF_FENCE: self._self_fence,
            Action.FOLLOW: self._follow,
            Action.START_CLONE: self._start_clone,
            Action.STOP_CA: self._stop_ca,
        }
        self.busy = d.action.value
        self.task = asyncio.create_task(self._guarded(runners[d.action], d, view), name=f"ca-watchdog {d.action}")

    async def _preempt(self) -> None:
        task = self.task
        if task is None or task.done():
            return
        log.warning("pre-empting %s", self.busy)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(task), self.s.timing.stop_timeout)

    async def _guarded(
        self, run: Callable[[Decision, ClusterView], Awaitable[None]], d: Decision, v: ClusterView
    ) -> None:
        try:
            await run(d, v)
        except asyncio.CancelledError:
            # stopped at a step boundary: no rollback; the journal stays for the next decision
            log.warning("%s stopped at %r", d.action.value, self.busy)
            self.busy = None
            raise
        except Exception as exc:
            log.error("%s failed: %s", d.action.value, exc)
            await self.history({"type": f"{d.action.value}_failed", "error": str(exc)})
        self.busy = None
        await self._clear_journal()
        self.wake()

    async def _promote(self, d: Decision, v: ClusterView) -> None:
        t_decided = time.time()
        if (v.leader is None or v.leader.name != self.me) and await self._acquire(d) is None:
            return
        epoch = self.held_epoch
        old = v.memory.previous_leader if v.memory.previous_leader != self.me else None
        if d.fence_old_master and old and self.s.failover.fence_command:
            await self._journal(f"promote: fencing {old}")
            try:
                await run_fence_command(self.s.failover.fence_command, old, self.s.timing.stop_timeout)
            except NodeError:
                await self._release("fence_command failed; not promoting")
                raise
        block = await self._call(self.store.get_crl_block())
        lines = block.lines if block is not None else None
        try:
            times = await self.ca.promote(lines, self._journal, before_start=self._lease_for_start)
        except (NodeError, cscfg.CSCfgError, OSError, StoreUnavailable) as exc:
            self.metrics.failovers.labels(d.kind, "failed").inc()
            await self._rollback_promotion(str(exc))
            raise
        self.on_start_issued()
        duration = times.running_at - t_decided
        self.metrics.failovers.labels(d.kind, "success").inc()
        self.metrics.last_failover.set(times.running_at)
        self.metrics.last_failover_duration.set(duration)
        if d.kind == "automatic" and epoch is not None and self.policy.failover_cooldown > 0:
            # the cooldown counts from a completed failover: one that never served does not block the next
            try:
                await self._call(self.store.start_cooldown(self.me, epoch, self.policy.failover_cooldown))
            except StoreUnavailable as exc:
                log.warning("could not start the failover cooldown: %s", exc)
        await self.history(
            {
                "type": "promoted",
                "name": self.me,
                "epoch": epoch,
                "kind": d.kind,
                "old_master": old,
                "reason": d.reason,
                "decided_at": t_decided,
                "stopped_at": times.stopped_at,
                "written_at": times.written_at,
                "started_at": times.started_at,
                "running_at": times.running_at,
                "duration": round(duration, 3),
            }
        )
        if d.kind in ("switchover", "failover"):
            await self._call(self.store.clear_switchover(v.control.switchover_id))
        log.info("promotion done: %s is master (epoch %s), running %.1fs after the decision", self.me, epoch, duration)

    def _successor(self) -> str | None:
        others = sorted((m for m in self.s.members if m.name != self.me), key=lambda m: (-m.priority, m.name))
        return others[0].name if others else None

    async def _rollback_promotion(self, why: str) -> None:
        """A failed promotion: back to a stopped clone; the key is released only once the CA is confirmed
        stopped (otherwise the others would elect while this CA may still serve as master)."""
        try:
            await self.ca.fence(self._successor(), self._journal)
        except (NodeError, cscfg.CSCfgError, OSError) as exc:
            log.error("promotion failed (%s) and the CA is not confirmed stopped (%s): keeping the key", why, exc)
            return
        await self._release(f"promotion failed: {why}")

    async def _demote_and_release(self, d: Decision, v: ClusterView) -> None:
        assert d.target is not None
        await self._journal(f"demote: stopping (new master {d.target})")
        await self.ca.stop()
        try:
            await self.ca.demote(d.target, start=False, journal=self._journal)
        except cscfg.CSCfgError as exc:
            # an unreadable CS.cfg stays as it is; the guard will not start it as master without the key
            log.error("CS.cfg not demoted (%s); the CA stays stopped until it is repaired", exc)
        # keep trying until the lease would have ended anyway: holding the key with a stopped CA would make
        # the next cycle "complete a promotion" of the CA that just failed
        deadline = time.monotonic() + self.policy.ttl
        while True:
            try:
                await self._release(d.reason, d.target)
                return
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(self.policy.interval)

    async def _restart(self, d: Decision, v: ClusterView) -> None:
        self.restarted_in_incident = True
        await self.history({"type": "restart", "name": self.me, "reason": d.reason})
        await self.ca.restart(self._journal, before_start=self._lease_for_start)
        self.on_start_issued()

    async def _self_fence(self, d: Decision, v: ClusterView) -> None:
        # no store I/O before the CA is down: the store may be what cannot be reached, and every call
        # would spend a store timeout of the safety margin
        self.busy = "self-fence"
        await self.ca.fence(d.target)
        self._set_lease(None, None)
        await self.history({"type": "self_fence", "name": self.me, "reason": d.reason})

    async def _follow(self, d: Decision, v: ClusterView) -> None:
        assert d.target is not None
        await self.ca.demote(d.target, start=True, journal=self._journal)
        self.on_start_issued()

    async def _start_clone(self, d: Decision, v: ClusterView) -> None:
        await self._journal("start as clone")
        await self.ca.start()
        self.on_start_issued()

    async def _stop_ca(self, d: Decision, v: ClusterView) -> None:
        await self._journal("stop: CS.cfg would act as master")
        await self.ca.stop()

    async def stop(self) -> None:
        """SIGTERM: stop the renewer and the running action at its current step (its journal stays)."""
        for t in (self._renewer, self.task):
            if t is not None and not t.done():
                t.cancel()
        for t in (self._renewer, self.task):
            if t is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
