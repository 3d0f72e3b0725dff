"""One time format for everything users read: ISO 8601 in UTC with its zone."""

from __future__ import annotations

from datetime import UTC, datetime


def iso(ts: float | None) -> str | None:
    """``2026-11-30T07:02:29+00:00`` for a Unix time; None stays None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
