"""repost-monitor: find reposts of a protected image library.

The public Python API, a few calls (imported on first use, so the command line starts fast)::

    import monitor
    library = monitor.open_library("portfolio.sqlite")       # created if missing
    monitor.add_images(library, ["~/Pictures/portfolio"])     # files and folders, recursively
    matcher = monitor.Matcher(library.index, monitor.PRESETS["near"])
    fp = monitor.fingerprint_file("suspect.jpg")              # the views and keypoint copy a repost may need
    for match in matcher.match(fp):                           # best first
        print(match.tier, match.dhash_distance, library.get(match.entry_id).source)

``fingerprint_bytes(data)`` fingerprints encoded bytes (``views=None``: the whole picture
only, the values imagehash gives); ``Fingerprint.dhash_hex``/``phash_hex`` are imagehash's
hex form. Bad input raises :class:`ImageError` with a ``reason``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from monitor.version import __version__

_PUBLIC = {
    "Fingerprint": "monitor.fingerprints", "ImageError": "monitor.fingerprints",
    "fingerprint_bytes": "monitor.fingerprints", "fingerprint_file": "monitor.scan",
    "Library": "monitor.records.library", "LibraryEntry": "monitor.records.library",
    "AddReport": "monitor.records.library", "open_library": "monitor.scan", "add_images": "monitor.scan",
    "Matcher": "monitor.search.matcher", "Match": "monitor.search.matcher", "PRESETS": "monitor.search.tiers",
}
__all__ = ["AddReport", "Fingerprint", "ImageError", "Library", "LibraryEntry", "Match", "Matcher", "PRESETS",
           "__version__", "add_images", "fingerprint_bytes", "fingerprint_file", "open_library"]

if TYPE_CHECKING:
    from monitor.fingerprints import Fingerprint, ImageError, fingerprint_bytes
    from monitor.records.library import AddReport, Library, LibraryEntry
    from monitor.scan import add_images, fingerprint_file, open_library
    from monitor.search.matcher import Match, Matcher
    from monitor.search.tiers import PRESETS


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'monitor' has no attribute {name!r}")
