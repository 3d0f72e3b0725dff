"""Source adapters: turn a feed, API listing or folder into items with image URLs."""

from .base import FeedError, FeedItem, HttpSource, LocalSource, StreamSource, json_document
from .registry import SOURCE_TYPES, make_source

__all__ = ["FeedError", "FeedItem", "HttpSource", "LocalSource", "StreamSource", "SOURCE_TYPES", "make_source",
           "json_document"]
