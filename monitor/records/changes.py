"""The library's change log: a row per insert, update and delete of an entry, written by
triggers in either engine. PostgreSQL: each change first takes the library version's row
lock (the trigger's UPDATE), so change ids are handed out and committed in one order, and a
NOTIFY on ``repost_monitor_library`` wakes the listeners. SQLite: one writer at a time does
the same. Either way a reader that has seen change N has seen every committed change below
it. A start loads a snapshot, then replays the log from the snapshot's checkpoint; a running
daemon (or shard) tails it, and deletes changes older than ``library.change_log_days``
(storing its snapshot again first where that would leave its own behind)."""

from __future__ import annotations

import asyncio
import contextlib

import psycopg

from monitor.records.store import Store

CHANNEL = "repost_monitor_library"


def last_change(store: Store) -> int:
    """The newest change's id: the log's largest, or the pruned mark where it was emptied."""
    return max(store.query("SELECT COALESCE((SELECT MAX(id) FROM library_changes), 0), "
                           "COALESCE((SELECT value FROM library_meta WHERE key = 'changes_pruned'), 0)")[0])


def count_after(store: Store, change_id: int) -> int:
    return store.query("SELECT COUNT(*) FROM library_changes WHERE id > ?", (change_id,))[0][0]


def changes_after(store: Store, change_id: int, limit: int = 50_000) -> list[tuple[int, int, str]]:
    """(change id, entry id, INSERT|UPDATE|DELETE) after ``change_id``, oldest first."""
    return store.query("SELECT id, entry_id, op FROM library_changes WHERE id > ? ORDER BY id LIMIT ?",
                       (change_id, limit))


def pruned_upto(store: Store) -> int:
    """The last change id deleted from the log (0: none): a reader whose checkpoint is below
    it may have missed changes, and reads the rows instead."""
    rows = store.query("SELECT value FROM library_meta WHERE key = 'changes_pruned'")
    return rows[0][0] if rows else 0


def prunable(store: Store, before: float) -> int:
    """The last change id made before ``before`` (epoch seconds), 0 if none."""
    return store.query("SELECT COALESCE(MAX(id), 0) FROM library_changes WHERE at < ?", (before,))[0][0]


def inserted_between(store: Store, after: int, upto: int) -> list[int]:
    """The entry ids the changes after ``after``, up to ``upto``, inserted (oldest first)."""
    return [eid for (eid,) in store.query("SELECT entry_id FROM library_changes WHERE id > ? AND id <= ? "
                                          "AND op = 'INSERT' ORDER BY id", (after, upto))]


def _retro_key(split: tuple[int, int]) -> str:
    return f"retro_matched_upto:{split[0]}/{split[1]}"


def retro_mark(store: Store, split: tuple[int, int]) -> int | None:
    """The change id up to which the entries that changes inserted into this part of the
    library (``split``: shard, shards; (0, 1) the whole) were retro-matched; None before the first."""
    rows = store.query("SELECT value FROM store_meta WHERE key = ?", (_retro_key(split),))
    return int(rows[0][0]) if rows else None


def raise_retro_mark(store: Store, split: tuple[int, int], change_id: int) -> None:
    """:func:`retro_mark` raised to ``change_id`` (never lowered: replicas race)."""
    key = _retro_key(split)
    with store.transaction() as conn:
        conn.execute("INSERT OR IGNORE INTO store_meta (key, value) VALUES (?, ?)", (key, str(change_id)))
        conn.execute("UPDATE store_meta SET value = ? WHERE key = ? AND CAST(value AS BIGINT) < ?",
                     (str(change_id), key, change_id))


PRUNE_CHUNK = 50_000  # change ids deleted per transaction: SQLite's one writer waits for none long


def prune(store: Store, upto: int) -> int:
    """Delete changes up to id ``upto`` (a prefix of the log), a chunk of ids per transaction,
    each raising the watermark with it; how many were deleted. Ids never go back after it
    (PostgreSQL's identity, SQLite's AUTOINCREMENT): the next change still follows every
    checkpoint."""
    deleted, floor = 0, pruned_upto(store)
    while floor < upto:
        floor = min(upto, floor + PRUNE_CHUNK)
        with store.transaction() as conn:
            deleted += conn.execute("DELETE FROM library_changes WHERE id <= ?", (floor,)).rowcount
            conn.execute("INSERT OR IGNORE INTO library_meta (key, value) VALUES ('changes_pruned', 0)")
            conn.execute("UPDATE library_meta SET value = ? WHERE key = 'changes_pruned' AND value < ?",
                         (floor, floor))
    return deleted


def listener(store: Store) -> ChangeListener | ChangePoll:
    """What waits for the next change: a NOTIFY (PostgreSQL), or the next look (SQLite,
    which has no notifications between processes)."""
    return ChangeListener(store.url) if store.dialect == "postgresql" else ChangePoll()


class ChangePoll:
    """:meth:`wait` returns at the timeout: the caller then looks at the log."""

    async def wait(self, timeout: float) -> bool:
        await asyncio.sleep(timeout)
        return False

    async def close(self) -> None:
        pass


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
