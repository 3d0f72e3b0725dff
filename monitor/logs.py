"""Logging: one line per thing the daemon does, text or JSON lines.

Pass context as ``extra={"feed": ..., "item_id": ..., "url": ...}``: the JSON
format emits every such field, so one detection can be followed from
discovery to delivery with a grep on its id.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback

from monitor.safe_text import json_line, printable

CONTEXT_FIELDS = ("feed", "item_id", "url", "work_id", "match_id", "entry_id", "tier", "reason",
                  "alert_id", "sink")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json_line(json.dumps(out, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    """One line per message: control characters in a message (a feed's title, an exception
    from hostile input) are escaped, so nothing untrusted can forge a log line. A traceback
    keeps its lines, but the exceptions' messages and notes in it (a parser's error quoting
    the hostile input) are escaped the same way: a newline there would start a forged line."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:  # noqa: N802 - logging's name
        shown = traceback.TracebackException(*ei)
        _escape_messages(shown)
        return "".join(shown.format()).rstrip("\n")


def _escape_messages(shown: traceback.TracebackException) -> None:
    """Every message and note in a traceback (its causes, contexts and groups too) made
    :func:`printable`; the frames come from our own source files."""
    pending, seen = [shown], set()
    while pending:
        one = pending.pop()
        if one is None or id(one) in seen:
            continue
        seen.add(id(one))
        if isinstance(getattr(one, "_str", None), str):  # the message, as format() reads it
            one._str = printable(one._str)
        notes = getattr(one, "__notes__", None)
        if isinstance(notes, list):
            one.__notes__ = [printable(note) for note in notes]
        pending += [one.__cause__, one.__context__, *(getattr(one, "exceptions", None) or ())]


class RepeatFilter(logging.Filter):
    """At most ``burst`` lines per ``window`` seconds with the same logger, level and
    message template; the rest are counted and the count is told with the next line
    that passes. A flood of one error (a socket out of file descriptors, a feed
    failing every second) cannot fill a disk or hide everything else."""

    def __init__(self, burst: int = 5, window: float = 60.0, clock=time.monotonic):
        super().__init__()
        self.burst, self.window, self.clock = burst, window, clock
        self._seen: dict[tuple, list] = {}  # key -> [window start, count in window, suppressed]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        state = self._seen.get(key)
        if state is None or now - state[0] >= self.window:
            suppressed = state[2] if state else 0
            self._seen[key] = [now, 1, 0]
            if len(self._seen) > 10_000:  # bounded: forget the oldest templates
                for old in list(self._seen)[:5_000]:
                    del self._seen[old]
            if suppressed:
                record.msg = f"{record.msg} [{suppressed} more like this in the last {self.window:g} s]"
            return True
        state[1] += 1
        if state[1] > self.burst:
            state[2] += 1
            return False
        return True


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RepeatFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
