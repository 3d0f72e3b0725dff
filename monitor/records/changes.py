"""The library's change log (PostgreSQL): a row per insert, update and delete of an entry,
and a NOTIFY on ``repost_monitor_library``. Each change first takes the library version's
row lock (the trigger's UPDATE), so change ids are handed out and committed in one order:
a reader that has seen change N has seen every committed change below it. Shards load a
snapshot, then tail the log from the snapshot's checkpoint."""

from __future__ import annotations

import asyncio
import contextlib

import psycopg

from monitor.records.store import Store

CHANNEL = "repost_monitor_library"


def has_log(store: Store) -> bool:
    return store.dialect == "postgresql"


def last_change(store: Store) -> int:
    return store.query("SELECT COALESCE(MAX(id), 0) FROM library_changes")[0][0]


def count_after(store: Store, change_id: int) -> int:
    return store.query("SELECT COUNT(*) FROM library_changes WHERE id > ?", (change_id,))[0][0]


def changes_after(store: Store, change_id: int, limit: int = 50_000) -> list[tuple[int, int, str]]:
    """(change id, entry id, INSERT|UPDATE|DELETE) after ``change_id``, oldest first."""
    return store.query("SELECT id, entry_id, op FROM library_changes WHERE id > ? ORDER BY id LIMIT ?",
                       (change_id, limit))


class ChangeListener:
    """A connection of its own, LISTENing: :meth:`wait` returns at a change or a timeout."""

    def __init__(self, url: str):
        self.url = url
        self._conn: psycopg.AsyncConnection | None = None

    async def wait(self, timeout: float) -> bool:
        """True if a change was announced within ``timeout`` seconds. A lost connection is
        opened again (raising, once, if the server is away: the caller looks anyway)."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            await self.close()
            self._conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, connect_timeout=10,
                                                               application_name="repost-monitor-listen",
                                                               client_encoding="UTF8")
            await self._conn.execute(f"LISTEN {CHANNEL}")
        got = False
        async for _ in self._conn.notifies(timeout=timeout, stop_after=1):
            got = True
        # a burst of changes is one catch-up: drain what else has arrived
        async for _ in self._conn.notifies(timeout=0.01):
            pass
        return got

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error, OSError, asyncio.CancelledError):
                await self._conn.close()
            self._conn = None
