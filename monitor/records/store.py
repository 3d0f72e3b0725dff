"""SQLite: one database file per deployment, schema migrations, transactions.

SQLite integers are signed 64-bit, so uint64 hashes are stored as their
two's-complement int64 view (:func:`u64_to_sql` / :func:`sql_to_u64`).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from monitor.records.sqlite_schema import MIGRATIONS


def _database_errors() -> tuple[type[Exception], ...]:
    try:
        import psycopg
    except ImportError:  # PostgreSQL support not installed: SQLite only
        return (sqlite3.Error,)
    return (sqlite3.Error, psycopg.Error)


# What a failing database raises (either engine), named here so no layer above records/
# knows the engine: ``except DatabaseError``.
DatabaseError = _database_errors()


def _unavailable_errors() -> tuple[type[Exception], ...]:
    try:
        import psycopg
    except ImportError:
        return (sqlite3.OperationalError,)
    return (sqlite3.OperationalError, psycopg.OperationalError)


# The part of those that says the store itself is failing (locked past its busy timeout, the
# server away), not one statement: every statement would fail alike.
StoreUnavailable = _unavailable_errors()


IN_CHUNK = 500  # values per ``IN (...)`` list: far below either engine's bound-parameter limit


def in_chunks(values: Iterable) -> Iterator[tuple[str, list]]:
    """``values`` (repeats dropped, order kept) IN_CHUNK at a time, each chunk with the
    ``?,?,...`` placeholders of its ``IN (...)`` list."""
    values = list(dict.fromkeys(values))
    for start in range(0, len(values), IN_CHUNK):
        chunk = values[start:start + IN_CHUNK]
        yield ",".join("?" * len(chunk)), chunk


class StoreError(RuntimeError):
    """The store cannot be used as asked (missing, read-only); the message names the file."""


class Store:
    """A SQLite connection shared by threads, serialised by a lock.

    WAL lets readers (the HTTP API, a second CLI process) work while the daemon writes;
    ``synchronous=NORMAL`` in WAL mode still never corrupts the file and loses at most the
    last transactions on power loss, not on a process kill.
    """

    dialect = "sqlite"

    def __init__(self, path: str | Path, *, create: bool = True):
        """Open (and bring up to date) the store at ``path``; with ``create=False`` a
        missing file is an error instead of a new empty store (read-only commands:
        a mistyped --db must not look like an empty library)."""
        self.path = str(path)
        if self.path != ":memory:":
            if not create and not Path(self.path).is_file():
                raise StoreError(f"no store at {self.path} (check --db, --config or $REPOST_MONITOR_DB; "
                                 "commands that only read never create one)")
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the folder of {self.path}: {exc.strerror or exc}") from None
        try:
            self.conn = sqlite3.connect(self.path, check_same_thread=False,
                                        isolation_level=None, timeout=30)
            self.lock = threading.RLock()
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store {self.path}: {exc}") from None

    def check_writable(self) -> None:
        """A real write, so a read-only file or folder fails now, with the file's
        name, not later inside the pipeline."""
        try:
            with self.transaction() as conn:
                conn.execute("INSERT INTO store_meta (key, value) VALUES ('last_start', ?) ON CONFLICT (key) "
                             "DO UPDATE SET value=excluded.value",
                             (str(time.time()),))
        except sqlite3.Error as exc:
            raise StoreError(f"the store {self.path} cannot be written ({exc}); the daemon needs "
                             "write access to the file and its folder") from None

    def _migrate(self) -> None:
        with self.transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for number, sql in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in _split_sql(sql):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={number}")

    @contextmanager
    def transaction(self):
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def batches(self, sql: str, params=(), size: int = 10_000) -> Iterator[list[tuple]]:
        """The rows of one statement, ``size`` at a time: one moment's, never all held at once."""
        with self.lock:
            cursor = self.conn.execute(sql, params)
            while batch := cursor.fetchmany(size):
                yield batch

    def query(self, sql: str, params=(), *, plan_each_run: bool = False) -> list[tuple]:
        # plan_each_run is PostgreSQL's (postgres.py); SQLite plans each run for the table as it is
        with self.lock:
            return self.conn.execute(sql, params).fetchall()

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def _split_sql(script: str) -> list[str]:
    # executescript() would COMMIT our transaction; run statements one by one
    # (complete_statement keeps a trigger's BEGIN ... END in one piece).
    out, buf = [], ""
    for piece in script.split(";"):
        buf += piece + ";"
        if sqlite3.complete_statement(buf):
            if buf.strip(" \n;"):
                out.append(buf.strip())
            buf = ""
    return out
