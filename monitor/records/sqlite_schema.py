"""SQLite's schema: the migrations that build it, in order."""

# Append-only: each entry runs once, in order, tracked by PRAGMA user_version.
MIGRATIONS: list[str] = [
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
    # 19: snapshots stored in parts (monitor/records/snapshots.py PART_ROWS): one value of
    # a library's fine hashes past ~15M rows was more than either engine allows (1 GB)
    """
    DROP TABLE index_snapshots;
    CREATE TABLE index_snapshots (
        shards    INTEGER NOT NULL,
        shard     INTEGER NOT NULL,
        part      INTEGER NOT NULL,
        parts     INTEGER NOT NULL,
        version   INTEGER NOT NULL,
        change_id INTEGER,
        ids       BLOB NOT NULL,
        dhash     BLOB NOT NULL,
        phash     BLOB NOT NULL,
        fine      BLOB NOT NULL,
        core      BLOB NOT NULL,
        PRIMARY KEY (shards, shard, part)
    );
    """,
    # 20: the library's change log, as PostgreSQL's: a start loads its snapshot and replays
    # the changes after it (before, any change since the snapshot made a start read every
    # row: 70 s at 2M pictures), and a running daemon re-indexes only the entries touched.
    # One writer at a time, so ids follow commit order: a reader that saw change N has seen
    # every change below it. Snapshots taken before have no checkpoint: read once more.
    """
    CREATE TABLE library_changes (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        entry_id INTEGER NOT NULL,
        op       TEXT NOT NULL,
        at       REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
    );
    CREATE TRIGGER library_change_ins AFTER INSERT ON library_entries
    BEGIN INSERT INTO library_changes (entry_id, op) VALUES (NEW.id, 'INSERT'); END;
    CREATE TRIGGER library_change_upd AFTER UPDATE ON library_entries
    BEGIN INSERT INTO library_changes (entry_id, op) VALUES (NEW.id, 'UPDATE'); END;
    CREATE TRIGGER library_change_del AFTER DELETE ON library_entries
    BEGIN INSERT INTO library_changes (entry_id, op) VALUES (OLD.id, 'DELETE'); END;
    DELETE FROM index_snapshots;
    """,
    # 21: retroactive matching pages through recent images by (fetched_at, url): with the
    # index on fetched_at alone, a page after a tie (a batch stored at one time) sorted them all
    """
    CREATE INDEX images_fetched_url ON images (fetched_at, url);
    DROP INDEX images_fetched;
    """,
    # 22: old history is deleted (monitor/records/retention.py): which images a work row still
    # names, which work rows a match still names (PostgreSQL had the first since its baseline;
    # a retro-match's look-up of an image's work row read the whole table here)
    """
    CREATE INDEX IF NOT EXISTS work_image_url ON work (image_url);
    CREATE INDEX matches_work ON matches (work_id);
    """,
    # 23: items no feed lists any more are deleted (retention.py): a feed's newest listing and
    # its old items by feed; seen_at means "last listed" from now on (an older one: first seen)
    """
    CREATE INDEX seen_items_feed_seen ON seen_items (feed, seen_at);
    INSERT INTO store_meta (key, value) VALUES ('seen_at_listed_since',
        CAST((julianday('now') - 2440587.5) * 86400.0 AS TEXT)) ON CONFLICT (key) DO NOTHING;
    """,
    # 24: when a WebSub subscribe request (a renewal too) was last sent, 0 once verified: a hub's
    # verification is taken only for a request we sent, whichever process the hub reaches
    """
    ALTER TABLE websub_subscriptions ADD COLUMN requested_at REAL NOT NULL DEFAULT 0;
    """,
    # 25: scale-out, when a work row was last added to the work stream: the sweeper queues again
    # only rows never queued (an intake died in between) or queued long ago (a Redis that lost them)
    """
    ALTER TABLE work ADD COLUMN queued_at REAL;
    """,
]


SCHEMA_VERSION = len(MIGRATIONS)
