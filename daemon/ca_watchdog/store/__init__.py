"""The coordination store: `Store` (store/base.py) with a SQLite and an etcd backend."""

from __future__ import annotations

from collections.abc import Collection

from ..config import StoreSettings
from .base import (
    CRLBlock,
    Flags,
    HistoryEvent,
    LeaderRecord,
    MemberRecord,
    MembersSnapshot,
    Store,
    StoreUnavailable,
    SwitchoverRequest,
)


def open_store(settings: StoreSettings, members: Collection[str], timeout: float) -> Store:
    """The configured backend. Nothing is contacted yet: the first call does that (and raises
    StoreUnavailable if it cannot), so a daemon can start while its store is down."""
    if settings.backend == "etcd":
        from .etcd import EtcdStore

        if settings.etcd is None:
            raise ValueError("store.backend = etcd needs a [store.etcd] section")
        return EtcdStore(settings.etcd, members, timeout)
    if settings.backend == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore(settings.path, members, timeout)
    raise ValueError(f"unknown store backend {settings.backend!r}")


__all__ = [
    "CRLBlock",
    "Flags",
    "HistoryEvent",
    "LeaderRecord",
    "MemberRecord",
    "MembersSnapshot",
    "Store",
    "StoreUnavailable",
    "SwitchoverRequest",
    "open_store",
]
