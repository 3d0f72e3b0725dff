"""Config ``type = "..."`` -> source class."""

from __future__ import annotations

from .base import HttpSource, LocalSource
from .folder import FolderSource
from .jsonfeed import JsonFeed
from .mastodon import MastodonTimeline
from .reddit import RedditListing
from .xmlfeed import XmlFeed

SOURCE_TYPES: dict[str, type[HttpSource] | type[LocalSource]] = {
    "rss": XmlFeed,
    "atom": XmlFeed,
    "jsonfeed": JsonFeed,
    "reddit": RedditListing,
    "mastodon": MastodonTimeline,
    "folder": FolderSource,
}


def make_source(kind: str, name: str, url: str | None = None, **options):
    cls = SOURCE_TYPES[kind]
    if issubclass(cls, HttpSource):
        return cls(name=name, url=url or "", options=options)
    return cls(name=name, options=options)
