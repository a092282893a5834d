"""systemd integration: sd_notify (READY, WATCHDOG, STATUS, STOPPING) and journal logging."""

from __future__ import annotations

import logging
import os
import sys

import systemd.daemon as daemon  # the PyPI systemd-python package (no type hints)
import systemd.journal as journal


class Notifier:
    """sd_notify messages; a no-op when NOTIFY_SOCKET is not set (not started by systemd)."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))

    def _send(self, message: str) -> None:
        if self.enabled:
            daemon.notify(message)

    def ready(self) -> None:
        self._send("READY=1")

    def cycle(self, status: str) -> None:
        # one datagram: the watchdog ping and the cycle's reason together
        self._send(f"WATCHDOG=1\nSTATUS={status[:400]}")

    def stopping(self) -> None:
        self._send("STOPPING=1")


class _FieldsFilter(logging.Filter):
    """Give every record the journal fields, so JournalHandler always has MEMBER."""

    def __init__(self, member: str) -> None:
        super().__init__()
        self.member = member

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "MEMBER"):
            record.MEMBER = self.member
        return True


def under_systemd() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def setup_logging(member: str, level: int = logging.INFO) -> None:
    root = logging.getLogger()
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if under_systemd():
        handler = journal.JournalHandler(SYSLOG_IDENTIFIER="ca-watchdog")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s {member} %(levelname)s %(message)s"))
    handler.addFilter(_FieldsFilter(member))
    root.addHandler(handler)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
