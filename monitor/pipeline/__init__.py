"""The streaming pipeline's stages: intake, worker (fetch -> fingerprint -> match), recorder,
the library watcher (retroactive matching), and the transport between them."""

from monitor.pipeline.intake import FeedSettings
from monitor.pipeline.pipeline import Pipeline
from monitor.pipeline.recorder import OnMatch
from monitor.records.matches import MatchRecord
from monitor.records.work import WorkItem

__all__ = ["FeedSettings", "MatchRecord", "OnMatch", "Pipeline", "WorkItem"]
