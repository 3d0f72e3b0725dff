"""Why a download failed, as a short reason (a metric label), from whatever the HTTP client raised."""

from __future__ import annotations

import email.utils
import time

import aiohttp

from monitor.addresses import BlockedAddress


class FetchError(Exception):
    """A download that failed; ``reason`` is a short metric label."""

    def __init__(self, reason: str, message: str, *, retry_after: float | None = None,
                 status: int | None = None):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.retry_after = retry_after
        self.status = status


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (now or time.time()))


def as_fetch_error(url: str, exc: Exception) -> Exception:
    """The FetchError for what the HTTP client raised (anything else comes back as it is)."""
    if isinstance(exc, TimeoutError):
        return FetchError("timeout", f"{url} timed out")
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(getattr(exc, "os_error", None), BlockedAddress):
            return FetchError("blocked_address", str(exc.os_error))
        return FetchError("connection", f"{url}: {exc}")
    if isinstance(exc, BlockedAddress):
        return FetchError("blocked_address", str(exc))
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return FetchError("connection", f"{url}: {exc!r}")
    if isinstance(exc, (ValueError, UnicodeError)):  # a URL the client cannot encode
        return FetchError("bad_url", f"{url[:300]!r}: {exc}")
    return exc
