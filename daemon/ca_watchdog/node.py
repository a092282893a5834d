"""The local CA: promote, demote, restart, and the guard that runs before the CA starts.

A daemon only ever changes its own CA. CS.cfg is written only while the CA is stopped; every
step is recorded in the store's promotion journal before it is taken, so a daemon that dies
halfway can tell on restart what it was doing.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from . import cscfg
from .config import Settings
from .probes.agent import AgentProbe, AgentStatus
from .service import ServiceControl, ServiceError, run_argv
from .startup import StartupWatch

log = logging.getLogger(__name__)

Journal = Callable[[str], Awaitable[None]]


class NodeError(RuntimeError):
    """A local action failed; the message says which step and why."""


@dataclass(frozen=True)
class PromotionTimes:
    stopped_at: float
    written_at: float
    started_at: float
    running_at: float


async def _no_journal(step: str) -> None:
    return None


async def _no_check() -> None:
    return None


Check = Callable[[], Awaitable[None]]

GETINFO_RETRY = 1.0  # between getInfo attempts that check a promoted CA's role
LIVENESS_TIMEOUT = 5.0  # systemctl show, during a start whose port still refuses


class LocalCA:
    def __init__(self, settings: Settings, service: ServiceControl, probe: AgentProbe) -> None:
        self.settings = settings
        self.service = service
        self.probe = probe
        self.path = settings.node.cs_cfg
        self.url = settings.me.agent_url
        self.startup = StartupWatch(settings.timing.start_timeout)

    async def status(self) -> AgentStatus:
        """Can the CA serve (getStatus and a database read), with a start in progress read as starting."""
        st = await self.probe.serving(self.url)
        now = time.monotonic()
        if self.startup.needs_liveness(st, now) and await self.service.alive(LIVENESS_TIMEOUT) is False:
            log.error("%s: the CA's process is gone before its port ever accepted: the start failed", self.service.name)
            self.startup.process_died(now)
        return self.startup.classify(st, now)

    async def stop(self) -> None:
        t = self.settings.timing
        self.startup.stop_issued()
        try:
            await self.service.stop(t.stop_timeout)
        except ServiceError as exc:
            raise NodeError(f"stopping {self.service.name}: {exc}") from exc
        # systemctl stop returns when the unit is inactive; still make sure nothing answers getStatus
        deadline = time.monotonic() + t.stop_timeout
        while (st := await self.probe.status(self.url)).status != "down":
            if time.monotonic() > deadline:
                raise NodeError(f"{self.service.name} still answers ({st.status}) after stop")
            await asyncio.sleep(0.2)

    async def start(self) -> None:
        self.startup.start_issued(time.monotonic())
        try:
            await self.service.start(self.settings.timing.start_timeout)
        except ServiceError as exc:
            raise NodeError(f"starting {self.service.name}: {exc}") from exc
        self.startup.start_returned()  # from now on, the service can tell whether the CA's process runs

    async def wait_running(self) -> AgentStatus:
        """Poll until the CA serves (Type=simple units return before the CA is ready).

        Gives up at start_timeout, or sooner once the CA has answered with a failure that is not
        a start in progress (a lasting 404 or 500: its engine or its database is not up) for
        `failed_start_grace` seconds: waiting longer would only delay the rollback.
        """
        deadline = time.monotonic() + self.settings.timing.start_timeout
        failing_since: float | None = None
        while True:
            st = await self.status()
            now = time.monotonic()
            if st.status == "running":
                return st
            if self.startup.died:
                raise NodeError(f"CA failed to start: {st.reason}")
            failing_since = (failing_since or now) if st.status == "down" else None
            if now > deadline or (failing_since is not None and now - failing_since > self.startup.failed_start_grace):
                raise NodeError(
                    f"CA not running {self.settings.timing.start_timeout:g}s after start ({st.status}: {st.reason})"
                    if now > deadline
                    else f"CA failed to start: {st.reason}"
                )
            await asyncio.sleep(0.2)

    def read(self) -> cscfg.CSCfg:
        return cscfg.read_cscfg(self.path)

    def _write(self, before: cscfg.CSCfg, after: cscfg.CSCfg) -> None:
        if after.render() == before.render():
            return
        result = cscfg.write_cscfg(after, self.path, expected=before.render())
        log.info(
            "wrote %s (%s changed; backup %s)",
            result.path,
            ", ".join(cscfg.changed_role_keys(before, after)),
            result.backup,
        )

    async def restart(self, journal: Journal = _no_journal, before_start: Check = _no_check) -> AgentStatus:
        await journal("restart: stopping")
        await self.stop()
        await before_start()
        await journal("restart: starting")
        await self.start()
        return await self.wait_running()

    async def promote(
        self, crl_block: Sequence[str] | None, journal: Journal = _no_journal, before_start: Check = _no_check
    ) -> PromotionTimes:
        """Stop, write the master CS.cfg, check the lease (`before_start`), start, wait for running, verify
        with getInfo."""
        await journal("promote: stopping")
        await self.stop()
        stopped = time.time()
        before = self.read()
        report = cscfg.classify(before)
        if report.role is cscfg.Role.INCONSISTENT:
            raise NodeError(f"CS.cfg is inconsistent ({'; '.join(report.problems)}); not promoting")
        if report.role is not cscfg.Role.MASTER:
            block = list(crl_block) if crl_block else before.crl_lines()
            if not crl_block:
                log.warning("no ca.crl. block published by the old master; promoting with this clone's own block")
            await journal("promote: writing CS.cfg")
            self._write(before, cscfg.promote(before, block, origin="the master's published ca.crl. block"))
        written = time.time()
        await before_start()
        await journal("promote: starting")
        start_deadline = time.monotonic() + self.settings.timing.start_timeout
        await self.start()
        started = time.time()
        await self.wait_running()
        running = time.time()
        await self._verify_master(start_deadline)
        return PromotionTimes(stopped, written, started, running)

    async def _verify_master(self, deadline: float) -> None:
        """getInfo must say "no master_host": the CA loaded the master CS.cfg. A CA that has just said
        running can time out or answer an error once (seen on the real bed, with a second JVM
        starting on the host): that is retried until `deadline` (start_timeout from the start command).
        An answer naming a master_host fails at once: the CA runs as a clone."""
        attempt = 0
        while True:
            attempt += 1
            info = await self.probe.info(self.url)
            if info.ok and info.master_host:
                raise NodeError(
                    f"getInfo still names master_host {info.master_host}: the CA did not load the master CS.cfg"
                )
            if info.ok:
                if attempt > 1:
                    log.info("getInfo confirmed the master role at attempt %d", attempt)
                return
            if time.monotonic() + GETINFO_RETRY > deadline:
                raise NodeError(f"getInfo failed after promotion ({attempt} attempts, start_timeout): {info.error}")
            log.warning("getInfo failed after promotion (attempt %d, retrying): %s", attempt, info.error)
            await asyncio.sleep(GETINFO_RETRY)

    async def demote(self, new_master: str, start: bool, journal: Journal = _no_journal) -> None:
        """Stop (if needed), write the clone CS.cfg pointing at new_master, and start again if asked."""
        member = self.settings.member(new_master)
        before = self.read()
        after = cscfg.demote(before, member.agent_host, member.agent_port)
        role = cscfg.classify(before).role
        needs_write = after.render() != before.render()
        status = await self.status()
        if needs_write or role is not cscfg.Role.CLONE:
            # stop even a CA that looks down: a hung (SIGSTOPped, swapping) Tomcat answers nothing but
            # keeps the master configuration it read at start, and serves it again when it wakes up
            await journal(f"demote: stopping (new master {new_master})")
            await self.stop()
            await journal(f"demote: writing CS.cfg (new master {new_master})")
            self._write(before, after)
            status = await self.status()
        if start and status.status == "down":
            if status.http_status is not None:
                # it answers, with a failure: a real CA started without its database answers 404 for
                # good, and `start` of a running unit does nothing; only a restart recovers it
                await journal(f"demote: stopping a CA that answers {status.reason}")
                await self.stop()
            await journal(f"demote: starting as clone of {new_master}")
            await self.start()

    async def fence(self, successor: str | None, journal: Journal = _no_journal) -> None:
        """Stop the CA now; make CS.cfg a clone's (of the best guess) so nothing restarts it as master."""
        await journal("self-fence: stopping")
        await self.stop()
        if successor is not None:
            await self.demote(successor, start=False, journal=journal)


async def run_fence_command(argv: Sequence[str], old_master: str, timeout: float) -> None:
    """Run fence_command with `--` and the old master's name appended.

    A fence agent's output can carry its credentials (`-P password`): it goes to the journal only,
    redacted, never into the exception (which reaches history, errors and the API): that one says
    the exit status and nothing else."""
    rc, out = await run_argv([*argv, "--", old_master], timeout)
    if out.strip():
        log.info("fence_command output for %s (exit %s): %s", old_master, rc, redact(out[-2000:]))
    if rc != 0:
        raise NodeError(f"fence_command failed for {old_master} (exit status {rc}; its output is in the journal)")


_SECRET_OPTION = re.compile(
    r"(?i)((?:^|\s)(?:-p|-P|--password|--passwd|--pass|--secret|--token|--api-key)(?:=|\s+))(\S+)"
)
_SECRET_ASSIGN = re.compile(r"(?i)\b((?:password|passwd|pass|secret|token|api[_-]?key|community)\s*[=:]\s*)(\S+)")


def redact(text: str) -> str:
    """Mask what looks like a password in a fence agent's output (options and key=value pairs)."""
    return _SECRET_ASSIGN.sub(r"\1***", _SECRET_OPTION.sub(r"\1***", text))
