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

# Append-only: each entry runs once, in order, tracked by PRAGMA user_version.
_MIGRATIONS: list[str] = [
    # 1: the protected library
    """
    CREATE TABLE library_entries (
        id            INTEGER PRIMARY KEY,
        source        TEXT NOT NULL UNIQUE,   -- file path or URL
        label         TEXT NOT NULL,
        width         INTEGER NOT NULL,
        height        INTEGER NOT NULL,
        dhash         INTEGER NOT NULL,
        phash         INTEGER NOT NULL,
        dhash_mirror  INTEGER NOT NULL,
        phash_mirror  INTEGER NOT NULL,
        degenerate    TEXT,
        added_at      REAL NOT NULL
    );
    """,
    # 2: the streaming pipeline
    """
    CREATE TABLE feed_state (
        feed                  TEXT PRIMARY KEY,
        etag                  TEXT,
        last_modified         TEXT,
        last_poll             REAL,
        last_success          REAL,
        consecutive_failures  INTEGER NOT NULL DEFAULT 0,
        last_error            TEXT
    );
    CREATE TABLE seen_items (
        feed     TEXT NOT NULL,
        item_id  TEXT NOT NULL,
        seen_at  REAL NOT NULL,
        PRIMARY KEY (feed, item_id)
    ) WITHOUT ROWID;
    -- One row per (feed, item, image URL): written before any download, so a
    -- restart resumes every pending row and repeats no finished one.
    CREATE TABLE work (
        id             INTEGER PRIMARY KEY,
        feed           TEXT NOT NULL,
        item_id        TEXT NOT NULL,
        image_url      TEXT NOT NULL,
        page_url       TEXT,
        author         TEXT,
        published      REAL,
        discovered_at  REAL NOT NULL,
        state          TEXT NOT NULL DEFAULT 'pending',   -- pending | done | failed
        error          TEXT,
        finished_at    REAL,
        UNIQUE (feed, item_id, image_url)
    );
    CREATE INDEX work_pending ON work (id) WHERE state = 'pending';
    -- Fingerprints of every image URL fetched: the same URL from two feeds is
    -- fetched once, and retroactive matching can reuse them.
    CREATE TABLE images (
        url           TEXT PRIMARY KEY,
        state         TEXT NOT NULL,    -- ok | failed
        dhash         INTEGER,
        phash         INTEGER,
        dhash_mirror  INTEGER,
        phash_mirror  INTEGER,
        width         INTEGER,
        height        INTEGER,
        degenerate    TEXT,
        error         TEXT,
        fetched_at    REAL NOT NULL
    );
    CREATE INDEX images_fetched ON images (fetched_at);
    CREATE TABLE matches (
        id              INTEGER PRIMARY KEY,
        work_id         INTEGER NOT NULL REFERENCES work (id),
        image_url       TEXT NOT NULL,
        entry_id        INTEGER NOT NULL,
        tier            TEXT NOT NULL,
        dhash_distance  INTEGER NOT NULL,
        phash_distance  INTEGER NOT NULL,
        mirrored        INTEGER NOT NULL,
        feed            TEXT NOT NULL,
        item_id         TEXT NOT NULL,
        page_url        TEXT,
        author          TEXT,
        published       REAL,
        detected_at     REAL NOT NULL,
        UNIQUE (image_url, entry_id)
    );
    CREATE INDEX matches_detected ON matches (detected_at);
    """,
    # 3: the alert outbox, written in the transaction that records the match
    """
    CREATE TABLE alerts (
        id               INTEGER PRIMARY KEY,
        match_id         INTEGER NOT NULL REFERENCES matches (id),
        sink             TEXT NOT NULL,
        state            TEXT NOT NULL DEFAULT 'pending',   -- pending | delivered | dead
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt     REAL NOT NULL,
        last_error       TEXT,
        payload          TEXT NOT NULL,
        idempotency_key  TEXT NOT NULL UNIQUE,
        created_at       REAL NOT NULL,
        delivered_at     REAL,
        UNIQUE (match_id, sink)
    );
    CREATE INDEX alerts_due ON alerts (sink, id) WHERE state = 'pending';
    """,
    # 4: review verdicts and noise control
    """
    ALTER TABLE matches ADD COLUMN repost_dhash INTEGER;
    ALTER TABLE matches ADD COLUMN verdict TEXT;      -- confirmed | false_positive | authorized
    ALTER TABLE matches ADD COLUMN verdict_at REAL;
    ALTER TABLE matches ADD COLUMN suppressed TEXT;   -- why no alert: allow_list | false_positive
    ALTER TABLE alerts ADD COLUMN kind TEXT NOT NULL DEFAULT 'match';  -- match | flood_summary
    CREATE INDEX matches_entry ON matches (entry_id, detected_at);
    -- A match marked false positive never alerts again for (repost hash, entry).
    CREATE TABLE suppressions (
        repost_dhash  INTEGER NOT NULL,
        entry_id      INTEGER NOT NULL,
        created_at    REAL NOT NULL,
        PRIMARY KEY (repost_dhash, entry_id)
    ) WITHOUT ROWID;
    -- Licensed use: an entry may appear on these domains, by these authors, in these sources.
    CREATE TABLE allowances (
        entry_id  INTEGER NOT NULL,
        kind      TEXT NOT NULL,     -- domain | author | source
        value     TEXT NOT NULL,
        PRIMARY KEY (entry_id, kind, value)
    ) WITHOUT ROWID;
    -- Signatures of signed API requests already seen (replay protection).
    CREATE TABLE api_nonces (
        signature  TEXT PRIMARY KEY,
        seen_at    REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 5: extra views of each entry (centre crops, content box), packed uint64 words
    """
    ALTER TABLE library_entries ADD COLUMN views BLOB;
    """,
    # 6: a packed snapshot of the index arrays, valid while the library version
    # (bumped by triggers on every change) is the one it was taken at
    """
    CREATE TABLE library_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO library_meta VALUES ('version', 0);
    CREATE TRIGGER library_version_ins AFTER INSERT ON library_entries
    BEGIN UPDATE library_meta SET value = value + 1 WHERE key = 'version'; END;
    CREATE TRIGGER library_version_del AFTER DELETE ON library_entries
    BEGIN UPDATE library_meta SET value = value + 1 WHERE key = 'version'; END;
    CREATE TRIGGER library_version_upd AFTER UPDATE ON library_entries
    BEGIN UPDATE library_meta SET value = value + 1 WHERE key = 'version'; END;
    CREATE TABLE index_snapshot (
        id       INTEGER PRIMARY KEY CHECK (id = 1),
        version  INTEGER NOT NULL,
        ids      BLOB NOT NULL,
        dhash    BLOB NOT NULL,
        phash    BLOB NOT NULL
    );
    """,
    # 7: the 256-bit verification hashes (fingerprint.Fingerprint.fine): the
    # whole picture's and its mirror's (128 bytes); where an entry has them,
    # its views blob holds 20 words per view (4 hashes, fine, fine mirror)
    # instead of 4. Rows from before keep NULL and are matched on the 64-bit
    # hashes alone until re-added.
    """
    ALTER TABLE library_entries ADD COLUMN fine BLOB;
    ALTER TABLE images ADD COLUMN fine BLOB;
    ALTER TABLE matches ADD COLUMN fine_distance INTEGER;
    ALTER TABLE index_snapshot ADD COLUMN fine BLOB;
    DELETE FROM index_snapshot;
    """,
    # 8: the extra views of each fetched image (its frame or upright view), so
    # retroactive matching and a repeat of the URL see what the first match saw
    """
    ALTER TABLE images ADD COLUMN views BLOB;
    """,
    # 9: the hash algorithm that fingerprinted each entry (fingerprint.ALGORITHM_VERSION;
    # 'imported' for imagehash hashes from a CSV). NULL: older than this column.
    # `library rehash` brings older entries up to date from their source files.
    """
    ALTER TABLE library_entries ADD COLUMN algorithm TEXT;
    """,
    # 10: the dHashes of the two views that met (reports draw which bits differ), and
    # facts about the store itself: a random id, the last start's write check
    """
    ALTER TABLE matches ADD COLUMN matched_repost_dhash INTEGER;
    ALTER TABLE matches ADD COLUMN matched_library_dhash INTEGER;
    CREATE TABLE store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 11: where a streaming source's catch-up starts (the newest item id recorded from it)
    """
    ALTER TABLE feed_state ADD COLUMN cursor TEXT;
    """,
    # 12: WebSub subscriptions, so a restart (or a kill -9) keeps accepting the hub's signed
    # pushes instead of waiting for a new subscription
    """
    CREATE TABLE websub_subscriptions (
        feed     TEXT PRIMARY KEY,
        hub      TEXT NOT NULL,
        topic    TEXT NOT NULL,
        secret   TEXT NOT NULL,
        asked_at REAL NOT NULL,
        verified INTEGER NOT NULL DEFAULT 0,
        expires  REAL NOT NULL DEFAULT 0
    );
    """,
    # 13: scale-out, what each shard answered for an image until every shard has: the
    # recorder that stores the last answer records the image's matches, once
    """
    CREATE TABLE shard_answers (
        work_id   INTEGER NOT NULL,
        shard     INTEGER NOT NULL,
        matches   TEXT NOT NULL,
        added_at  REAL NOT NULL,
        PRIMARY KEY (work_id, shard)
    );
    """,
    # 14: a packed snapshot per shard split (shards, shard); (1, 0) is the whole library
    """
    DROP TABLE index_snapshot;
    CREATE TABLE index_snapshots (
        shards   INTEGER NOT NULL,
        shard    INTEGER NOT NULL,
        version  INTEGER NOT NULL,
        ids      BLOB NOT NULL,
        dhash    BLOB NOT NULL,
        phash    BLOB NOT NULL,
        fine     BLOB NOT NULL,
        PRIMARY KEY (shards, shard)
    );
    """,
    # 15: the change-log id a snapshot reflects (PostgreSQL: shards replay the log after it)
    """
    ALTER TABLE index_snapshots ADD COLUMN change_id INTEGER;
    """,
    # 16: each entry's keypoints (monitor/fingerprints/keypoints.py), apart from the hashes
    # every load reads: ~9 KB an entry, read for a post's few unsure candidates only
    """
    CREATE TABLE entry_keypoints (
        entry_id  INTEGER PRIMARY KEY REFERENCES library_entries(id) ON DELETE CASCADE,
        keypoints BLOB NOT NULL
    );
    """,
    # 17: a match by the second look: how many keypoint pairs agreed (NULL: by the hashes)
    """
    ALTER TABLE matches ADD COLUMN keypoint_inliers INTEGER;
    """,
    # 18: which rows are entries' core rows (monitor/search/core_rows.py), packed bits; the
    # snapshots taken before do not say, so the next start reads the rows again
    """
    DELETE FROM index_snapshots;
    ALTER TABLE index_snapshots ADD COLUMN core BLOB;
    """,
]


SCHEMA_VERSION = len(_MIGRATIONS)


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
            for number, sql in enumerate(_MIGRATIONS[version:], start=version + 1):
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
