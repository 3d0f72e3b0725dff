"""Config ``type = "..."`` -> source class."""

from __future__ import annotations

from .base import HttpSource, LocalSource, StreamSource
from .folder import FolderSource
from .jetstream import Jetstream
from .jsonfeed import JsonFeed
from .mastodon import MastodonTimeline
from .mastodon_stream import MastodonStream
from .reddit import RedditAPI, RedditListing
from .xmlfeed import XmlFeed

SOURCE_TYPES: dict[str, type[HttpSource] | type[LocalSource] | type[StreamSource]] = {
    "rss": XmlFeed,
    "atom": XmlFeed,
    "jsonfeed": JsonFeed,
    "jetstream": Jetstream,
    "reddit": RedditListing,
    "reddit_api": RedditAPI,
    "mastodon": MastodonTimeline,
    "mastodon_stream": MastodonStream,
    "folder": FolderSource,
}


def make_source(kind: str, name: str, url: str | None = None, **options):
    cls = SOURCE_TYPES[kind]
    if issubclass(cls, (HttpSource, StreamSource)):
        return cls(name=name, url=url or "", options=options)
    return cls(name=name, options=options)
