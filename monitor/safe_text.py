"""Untrusted text made safe where a person reads it: a terminal, a text log, a spreadsheet.

A feed's author, an alert endpoint's error body, a partner's imported label or a file's name
can carry control characters: ESC sequences that recolour, move the cursor, retitle the
window or hide what follows; a newline that forges a log line; Unicode's bidirectional
overrides that make a name read backwards ("Trojan Source"). Shown here, each is escaped as
``\\x1b``-style text. A CSV cell that a spreadsheet would run as a formula (``=HYPERLINK(...)``)
is prefixed with ``'``, as OWASP advises; JSON output keeps the text exact.
"""

from __future__ import annotations

# C0 controls, DEL and the C1 controls (U+009B is a CSI of its own in many terminals)
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), *range(127, 160)]} | {10: "\\n", 13: "\\r", 9: "\\t"}
# The bidirectional marks, embeddings, overrides and isolates, and the line and paragraph
# separators that some viewers break lines at
_INVISIBLE = {c: f"\\u{c:04x}" for c in (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A),
                                        0x2028, 0x2029)}
_SHOWN = _CONTROL | _INVISIBLE
# json.dumps escapes C0 itself; these it leaves raw (as valid JSON escapes instead)
_JSON_RAW = {c: f"\\u{c:04x}" for c in range(127, 160)} | _INVISIBLE

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def printable(text: object) -> str:
    """``text`` (made a string) with every control and bidirectional character escaped."""
    return str(text).translate(_SHOWN)


def json_line(encoded: str) -> str:
    """A ``json.dumps(..., ensure_ascii=False)`` line with the C1 controls and bidirectional
    characters it leaves raw escaped as ``\\uXXXX`` (still the same JSON)."""
    return encoded.translate(_JSON_RAW)


def spreadsheet_cell(value: object) -> object:
    """A CSV cell that no spreadsheet runs as a formula: text starting with = + - @ or a
    tab or carriage return gets a leading ``'``; numbers and other text are left as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value
