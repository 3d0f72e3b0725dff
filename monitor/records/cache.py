"""The fingerprint cache of files (SQLite): keyed by path, size, modification time
and algorithm, so a re-run over the same folder is cheap and an interrupted run resumes."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

from monitor.fingerprints import ALGORITHM_VERSION, QUERY_VIEWS_VERSION, Fingerprint
from monitor.fingerprints.codec import pack_fine, pack_views, sql_to_u64, u64_to_sql, unpack_fine, unpack_views

COMMIT_EVERY = 200


def default_cache_path() -> Path:
    env = os.environ.get("REPOST_MONITOR_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "repost-monitor" / "fingerprints.sqlite"


class FingerprintCache:
    """SQLite cache of fingerprints of files; safe to share between threads."""

    def __init__(self, path: str | Path | None):
        self.path = str(path) if path else ":memory:"
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self._lock = threading.Lock()
        self._pending: list[tuple] = []
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS fingerprints_v4 (path TEXT, size INTEGER, mtime_ns INTEGER, "
                "algorithm TEXT, dhash INTEGER, phash INTEGER, dhash_mirror INTEGER, "
                "phash_mirror INTEGER, width INTEGER, height INTEGER, degenerate TEXT, views BLOB, "
                "fine BLOB, keypoints BLOB, PRIMARY KEY (path, size, mtime_ns, algorithm))")
            self._conn.commit()

    @staticmethod
    def _key(path: Path, views: str | None) -> tuple:
        st = path.stat()
        version = f"{ALGORITHM_VERSION}/{views}" + (f"/{QUERY_VIEWS_VERSION}" if views == "query" else "")
        return (str(path.resolve()), st.st_size, st.st_mtime_ns, version)

    def get(self, path: Path, views: str | None = None) -> Fingerprint | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT dhash, phash, dhash_mirror, phash_mirror, width, height, degenerate, views, "
                "fine, keypoints FROM fingerprints_v4 WHERE path=? AND size=? AND mtime_ns=? AND algorithm=?",
                self._key(path, views)).fetchone()
        if row is None:
            return None
        fine, fine_mirror = unpack_fine(row[8])
        return Fingerprint(*(sql_to_u64(v) for v in row[:4]), row[4], row[5], row[6],
                           unpack_views(row[7], with_fine=bool(fine)), fine, fine_mirror, row[9] or b"")

    def put(self, path: Path, fp: Fingerprint, views: str | None = None) -> None:
        row = self._key(path, views) + (u64_to_sql(fp.dhash), u64_to_sql(fp.phash),
                                        u64_to_sql(fp.dhash_mirror), u64_to_sql(fp.phash_mirror),
                                        fp.width, fp.height, fp.degenerate, pack_views(fp.views),
                                        pack_fine(fp), fp.keypoints or None)
        with self._lock:
            self._pending.append(row)
            if len(self._pending) >= COMMIT_EVERY:
                self._flush_locked()

    def _flush_locked(self) -> None:
        if self._pending:
            self._conn.executemany("INSERT OR REPLACE INTO fingerprints_v4 VALUES "
                                   "(?,?,?,?,?,?,?,?,?,?,?,?,?,?)", self._pending)
            self._conn.commit()
            self._pending.clear()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._conn.close()
