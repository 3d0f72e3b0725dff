"""Fingerprints to and from their stored form: the one place that knows the layout.

Hashes are uint64 (stored as SQLite's signed int64 by ``records``); views and fine
hashes are packed little-endian uint64 words.
"""

from __future__ import annotations

import numpy as np

from monitor.fingerprints.core import Fingerprint
from monitor.fingerprints.fasthash import FINE_WORDS


def u64_to_sql(value: int) -> int:
    """uint64 -> the two's-complement int64 SQLite stores."""
    return value - (1 << 64) if value >= 1 << 63 else value


def sql_to_u64(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


VIEW_WORDS = 4 + 2 * FINE_WORDS  # a view packed with its fine hashes


def pack_fine(fp: Fingerprint) -> bytes | None:
    """The fine hashes of a fingerprint and of its mirror (NULL where unknown)."""
    return fp.fine + fp.fine_mirror if fp.fine else None


def unpack_fine(blob: bytes | None) -> tuple[bytes, bytes]:
    half = FINE_WORDS * 8
    return (blob[:half], blob[half:]) if blob else (b"", b"")


def pack_views(views) -> bytes | None:
    """Views as packed little-endian uint64 words: dhash, phash, dhash_mirror,
    phash_mirror, then the fine hashes and their mirror (VIEW_WORDS per view)
    when the views have them (and so does the whole fingerprint, whose fine
    column tells :func:`unpack_views` which layout a blob has)."""
    if not views:
        return None
    head = np.array([[v.dhash, v.phash, v.dhash_mirror, v.phash_mirror] for v in views], dtype="<u8")
    if not all(v.fine for v in views):
        return head.tobytes()
    fine = np.frombuffer(b"".join(v.fine + v.fine_mirror for v in views), dtype="<u8")
    return np.hstack([head, fine.reshape(len(views), 2 * FINE_WORDS)]).tobytes()


def unpack_views(blob: bytes | None, with_fine: bool = False) -> tuple[Fingerprint, ...]:
    """Inverse of :func:`pack_views`; ``with_fine`` when the blob has fine hashes."""
    if not blob:
        return ()
    words = np.frombuffer(blob, dtype="<u8").reshape(-1, VIEW_WORDS if with_fine else 4)
    half = 4 + FINE_WORDS
    return tuple(Fingerprint(*(int(x) for x in w[:4]), 0, 0,
                             fine=w[4:half].tobytes() if with_fine else b"",
                             fine_mirror=w[half:].tobytes() if with_fine else b"")
                 for w in words)


def stored_hashes(rows: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row, dHash, its pHash, mirrored) of every dHash that ``images`` rows ``(dhash, phash,
    dhash_mirror, phash_mirror, fine, views)`` hold, their views' included, plain and
    mirrored (each with the pHash of the same view and side), without making their
    fingerprints: what tells, a page at a time, which few rows can be near anything."""
    n = len(rows)
    whole = np.array([r[:4] for r in rows], np.int64).reshape(n, 4).view(np.uint64)
    width = np.array([VIEW_WORDS if r[4] else 4 for r in rows], np.int64)
    words = np.array([len(r[5]) // 8 if r[5] else 0 for r in rows], np.int64)
    packed = np.frombuffer(b"".join(r[5] for r in rows if r[5]), "<u8")
    count = words // np.maximum(width, 1)
    owner = np.repeat(np.arange(n), count)
    k = np.arange(owner.size) - np.repeat(np.cumsum(count) - count, count)  # a view's rank in its row
    at = (np.cumsum(words) - words)[owner] + k * width[owner]  # a view's words: dhash, phash, mirrored's
    dhashes = np.concatenate([whole[:, 0], whole[:, 2], packed[at], packed[at + 2]])
    phashes = np.concatenate([whole[:, 1], whole[:, 3], packed[at + 1], packed[at + 3]])
    owners = np.concatenate([np.arange(n), np.arange(n), owner, owner])
    mirrored = np.concatenate([np.zeros(n, bool), np.ones(n, bool), np.zeros(owner.size, bool),
                               np.ones(owner.size, bool)])
    return owners, dhashes, phashes, mirrored


def stored_fingerprint(d, p, dm, pm, width, height, degenerate, fine, views) -> Fingerprint:
    """An ``images`` row's fingerprint, with its views and fine hashes where stored."""
    fine, fine_mirror = unpack_fine(fine)
    return Fingerprint(sql_to_u64(d), sql_to_u64(p), sql_to_u64(dm), sql_to_u64(pm), width, height,
                       degenerate, unpack_views(views, with_fine=bool(fine)), fine, fine_mirror)
