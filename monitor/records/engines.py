"""Which store a location names: a SQLite file (the embedded default) or a PostgreSQL
database (``postgresql://`` URL, scale-out)."""

from __future__ import annotations

from pathlib import Path

from monitor.records.store import Store, StoreError


def is_url(location: str | Path) -> bool:
    return str(location).startswith(("postgresql://", "postgres://"))


def open_store(location: str | Path, *, create: bool = True):
    """The store at ``location``: a SQLite file (the embedded default), or a PostgreSQL
    database named by a ``postgresql://`` URL (scale-out). Anything but a str or a Path is
    a TypeError: a stray object's repr must not become a new SQLite file's name."""
    if not isinstance(location, (str, Path)):
        raise TypeError(f"a store's location is a path or a postgresql:// URL, not {type(location).__name__}")
    if is_url(location):
        try:
            from monitor.records.postgres import PostgresStore
        except ImportError:
            raise StoreError("a postgresql:// store needs psycopg (pip install 'psycopg[binary]')") from None
        return PostgresStore(str(location), create=create)
    return Store(location, create=create)
