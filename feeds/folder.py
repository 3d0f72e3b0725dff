"""A local folder: every new or changed image file is an item."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from .base import IMAGE_EXTENSIONS, FeedItem, LocalSource


class FolderSource(LocalSource):
    kind = "folder"

    @property
    def path(self) -> Path:
        return Path(self.options["path"]).expanduser().resolve()

    def scan(self) -> list[FeedItem]:
        items = []
        for root, dirs, files in os.walk(self.path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                p = Path(root) / name
                try:
                    st = p.stat()
                except OSError:
                    continue  # vanished between listing and stat
                # Size and mtime in the id: a changed file is a new item.
                items.append(FeedItem(self.name, f"{p.relative_to(self.path)}@{st.st_mtime_ns}:{st.st_size}",
                                      (p.as_uri(),), p.as_uri(), None,
                                      datetime.fromtimestamp(st.st_mtime, UTC), name))
        return items
