"""Which store a location names: a SQLite file (the embedded default) or a PostgreSQL
database (``postgresql://`` URL, scale-out)."""

from __future__ import annotations

from pathlib import Path

from monitor.records.store import Store, StoreError


def is_url(location: str | Path) -> bool:
    return str(location).startswith(("postgresql://", "postgres://"))


def open_store(location: str | Path, *, create: bool = True):
    """The store at ``location``: a SQLite file (the embedded default), or a PostgreSQL
    database named by a ``postgresql://`` URL (scale-out)."""
    if is_url(location):
        try:
            from monitor.records.postgres import PostgresStore
        except ImportError:
            raise StoreError("a postgresql:// store needs psycopg (pip install 'psycopg[binary]')") from None
        return PostgresStore(str(location), create=create)
    return Store(location, create=create)
