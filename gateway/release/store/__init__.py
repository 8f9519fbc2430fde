"""Durable release state and audit log, behind one interface (base.Store), on SQLite
(the embedded default: one host) or PostgreSQL (several replicas on several hosts)."""

from __future__ import annotations

from pathlib import Path

from gateway.release.store.base import (
    FENCE,
    AuditEntry,
    AuditOutcome,
    Conflict,
    Fence,
    LeaseLost,
    SharedLabels,
    Store,
    StoredRelease,
)
from gateway.release.store.sqlite import SqliteStore, retry_while_locked

STATE_FILE = "state.db"


def open_store(state_dir: Path, state_url: str = "") -> Store:
    """The store a gateway's settings name: PostgreSQL at `state_url` when given, else
    SQLite in `state_dir`. psycopg is imported only for PostgreSQL."""
    if state_url:
        from gateway.release.store.postgres import PostgresStore

        return PostgresStore(state_url)
    return SqliteStore(state_dir / STATE_FILE)


__all__ = [
    "FENCE",
    "STATE_FILE",
    "AuditEntry",
    "AuditOutcome",
    "Conflict",
    "Fence",
    "LeaseLost",
    "SharedLabels",
    "SqliteStore",
    "Store",
    "StoredRelease",
    "open_store",
    "retry_while_locked",
]
