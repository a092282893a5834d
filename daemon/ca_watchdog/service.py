"""Starting and stopping the local CA: systemd (systemctl) or configured commands.

Argument lists only, never a shell; every call has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .config import NodeSettings


class ServiceError(RuntimeError):
    pass


class ServiceControl(Protocol):
    @property
    def name(self) -> str: ...

    async def start(self, timeout: float) -> None: ...

    async def stop(self, timeout: float) -> None: ...

    async def alive(self, timeout: float) -> bool | None:
        """Does the CA's process still run? None: cannot tell (never read as dead)."""
        ...


async def run_argv(argv: Sequence[str], timeout: float) -> tuple[int, str]:
    """Run argv, return (exit status, combined output); a timeout kills it and raises ServiceError."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError) as exc:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(proc.wait()), 5)
        if isinstance(exc, asyncio.CancelledError):
            raise  # a stop (SIGTERM, pre-emption) is not a failed command: nothing may roll back on it
        raise ServiceError(f"{argv[0]} did not finish within {timeout:g}s") from None
    return proc.returncode or 0, out.decode("utf-8", "replace").strip()


@dataclass
class SystemdService:
    unit: str

    @property
    def name(self) -> str:
        return self.unit

    async def _ctl(self, verb: str, timeout: float) -> None:
        rc, out = await run_argv(["systemctl", verb, self.unit], timeout)
        if rc != 0:
            raise ServiceError(f"systemctl {verb} {self.unit} failed ({rc}): {out[-300:]}")

    async def start(self, timeout: float) -> None:
        await self._ctl("start", timeout)

    async def stop(self, timeout: float) -> None:
        await self._ctl("stop", timeout)

    async def alive(self, timeout: float) -> bool | None:
        """The unit's ActiveState: `failed` or `inactive` (its main process exited) is dead; `active`,
        `activating` (ExecStartPre, or an auto-restart pending) and `deactivating` are alive."""
        try:
            rc, out = await run_argv(["systemctl", "show", "-p", "ActiveState,MainPID", self.unit], timeout)
        except (ServiceError, OSError):
            return None
        if rc != 0:
            return None
        props = dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)
        state = props.get("ActiveState", "").strip()
        if state in ("failed", "inactive"):
            return False
        if state in ("active", "activating", "deactivating", "reloading"):
            return True
        return None


@dataclass
class CommandService:
    start_argv: tuple[str, ...]
    stop_argv: tuple[str, ...]
    label: str = "local CA"
    pid_file: str | None = None

    @property
    def name(self) -> str:
        return self.label

    async def _run(self, argv: Sequence[str], verb: str, timeout: float) -> None:
        rc, out = await run_argv(argv, timeout)
        if rc != 0:
            raise ServiceError(f"{verb} command {argv[0]} failed ({rc}): {out[-300:]}")

    async def start(self, timeout: float) -> None:
        await self._run(self.start_argv, "start", timeout)

    async def stop(self, timeout: float) -> None:
        await self._run(self.stop_argv, "stop", timeout)

    async def alive(self, timeout: float) -> bool | None:
        """With a pid file: the process it names exists (missing or empty file after a start: dead)."""
        if self.pid_file is None:
            return None
        return pid_file_alive(self.pid_file)


def pid_file_alive(path: str) -> bool | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return False
    except OSError:
        return None
    if not text:
        return False
    try:
        pid = int(text.split()[0])
    except ValueError:
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: it exists
    return True


def service_for(node: NodeSettings) -> ServiceControl:
    if node.service_control == "command":
        return CommandService(node.start_command, node.stop_command, node.service, node.pid_file)
    return SystemdService(node.service)
