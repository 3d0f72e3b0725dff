"""Server-sent events (the WHATWG event-stream format), decoded line by line.

Pure and incremental: feed it the lines of a response as they arrive and it hands
back each complete ``(event, data)``. Comment lines (``:thump``, Mastodon's heartbeat)
are ignored, several ``data:`` lines join with newlines, a blank line ends an event.
"""

from __future__ import annotations

MAX_EVENT_BYTES = 1_000_000  # a status is a few KB; an event past this is cut off and dropped


class EventTooLarge(ValueError):
    pass


class SSEDecoder:
    def __init__(self, max_bytes: int = MAX_EVENT_BYTES):
        self.max_bytes = max_bytes
        self._event = ""
        self._data: list[str] = []
        self._size = 0
        self._dropping = False

    def line(self, raw: bytes | str) -> tuple[str, str] | None:
        """One line (its end of line optional); returns a finished (event, data), if any.
        Raises EventTooLarge once for an event over ``max_bytes`` (the rest of it is skipped)."""
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        text = text.rstrip("\r\n")
        if not text:
            return self._dispatch()
        if self._dropping or text.startswith(":"):
            return None
        field, _, value = text.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            self._event = value
        elif field == "data":
            self._size += len(value) + 1
            if self._size > self.max_bytes:
                self._dropping = True
                self._data = []
                raise EventTooLarge(f"an event of over {self.max_bytes:,} bytes")
            self._data.append(value)
        return None  # id:, retry: and unknown fields change nothing here

    def _dispatch(self) -> tuple[str, str] | None:
        event, data, dropping = self._event or "message", "\n".join(self._data), self._dropping
        self._event, self._data, self._size, self._dropping = "", [], 0, False
        if dropping or not data:
            return None
        return event, data
