"""Every Prometheus metric of the daemon, defined in one place.

Names follow Prometheus conventions: base units (seconds, bytes), ``_total``
for counters, labels of low cardinality only (feed name, reason, tier,
never a URL or item id). Each daemon gets its own registry so several can
run in one process (tests, the demo).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from monitor.fingerprints import ALGORITHM_VERSION
from monitor.search.tiers import TIER_NAMES
from monitor.version import __version__

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LAG_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self._feeds: set[str] = {"check"}  # the feeds with a label of their own (see feed())
        p = "repost_monitor_"
        self.build_info = Info(p + "build", "Version, hash algorithm, radius search kernel, CPU", registry=r)
        self.set_build_info()
        self.items_discovered = Counter(p + "items_discovered_total",
                                        "New feed items seen", ["feed"], registry=r)
        self.feed_polls = Counter(p + "feed_polls_total", "Feed polls by result "
                                  "(ok, not_modified, error)", ["feed", "result"], registry=r)
        self.feed_items_skipped = Counter(p + "feed_items_skipped_total", "Feed items or image URLs "
                                          "skipped, by reason (malformed_item, bad_url; deferred: new items past the "
                                          "feed's max_new_items, left for a later poll)",
                                          ["feed", "reason"], registry=r)
        self.stream_connected = Gauge(p + "stream_connected", "1 while a streaming source's connection is "
                                      "open", ["feed"], registry=r)
        self.stream_events = Counter(p + "stream_events_total", "Events received from streaming sources, by "
                                     "result (post, ignored, skipped)", ["feed", "result"], registry=r)
        self.stream_connects = Counter(p + "stream_connects_total", "Connections opened to streaming sources "
                                       "(the first and every reconnection)", ["feed"], registry=r)
        self.websub_deliveries = Counter(p + "websub_deliveries_total", "Feed documents pushed by WebSub hubs, "
                                         "by result (recorded, bad_signature, unsigned, malformed)",
                                         ["feed", "result"], registry=r)
        self.feed_parse_seconds = Histogram(p + "feed_parse_duration_seconds", "CPU time parsing one "
                                            "feed body (a slow one spaces its feed's polls)",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.feed_last_success = Gauge(p + "feed_last_success_timestamp_seconds",
                                       "Unix time of the last successful poll", ["feed"], registry=r)
        self.images_downloaded = Counter(p + "images_downloaded_total",
                                         "Images downloaded", ["feed"], registry=r)
        self.image_failures = Counter(p + "image_failures_total", "Images that could not be "
                                      "fetched or decoded, by reason", ["stage", "reason"], registry=r)
        self.download_bytes = Counter(p + "download_bytes_total", "Bytes of images downloaded",
                                      registry=r)
        self.download_seconds = Histogram(p + "download_duration_seconds", "Image transfer time, "
                                          "from the request sent to the last byte",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.throttle_wait_seconds = Histogram(p + "download_throttle_wait_seconds",
                                               "Wait for the per-host rate limit and a download slot "
                                               "before a request is sent", buckets=LATENCY_BUCKETS,
                                               registry=r)
        self.fingerprint_seconds = Histogram(p + "fingerprint_duration_seconds",
                                             "Decode and hash time per image",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.match_seconds = Histogram(p + "match_duration_seconds",
                                       "Library comparison time per image (its share of its batch's)",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.match_batch_size = Histogram(p + "match_batch_size", "Posts matched in one pass over the library",
                                          buckets=(1, 2, 4, 8, 16, 32), registry=r)
        self.pipeline_seconds = Histogram(p + "image_to_record_duration_seconds",
                                          "From image downloaded to match recorded",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.library_entries = Gauge(p + "library_entries", "Library entries in the match index",
                                     registry=r)
        self.retro_seconds = Histogram(p + "retro_match_duration_seconds", "One retroactive match of recent "
                                       "images against the entries just added, from reading them to recording",
                                       buckets=(0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 1800), registry=r)
        self.retro_images = Counter(p + "retro_images_total", "Recent images tested against new entries by "
                                    "retroactive matching (each pass tests the whole window)", registry=r)
        self.retro_held_bytes = Gauge(p + "retro_held_bytes", "Memory holding the recent images' hashes for "
                                      "retroactive matching (alert_policy.retro_memory_mb at most)", registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "Work items waiting", ["queue"], registry=r)
        self.work_put_back = Counter(p + "work_put_back_total", "Work rows a scaled-out fetch worker put back "
                                     "at the work stream's end, their host having its share of rows waiting "
                                     "already (a slow host listing many images)", registry=r)
        self.queue_capacity = Gauge(p + "queue_capacity", "Queue size limit", ["queue"], registry=r)
        self.matches = Counter(p + "matches_total", "Matches recorded", ["tier"], registry=r)
        self.unsure_refetches = Counter(p + "unsure_refetches_total", "Images fetched again for their "
                                        "keypoints to confirm an unsure match (matched from a stored "
                                        "fingerprint), by result (fetched, unreachable)", ["result"], registry=r)
        self.keypoint_searches = Counter(p + "keypoint_searches_total", "Posts' keypoints found (ORB) for a "
                                         "second look or to confirm an unsure match, by view (upright; "
                                         "mirrored: the mirror image's)", ["view"], registry=r)
        self.second_looks_skipped = Counter(p + "second_looks_skipped_total", "Posts not given the second "
                                            "look they had candidates for: [match] second_look_share was "
                                            "spent on posts with nearer candidates", registry=r)
        self.keypoint_search_seconds = Histogram(p + "keypoint_search_duration_seconds", "Time finding one "
                                                 "post's keypoints (decode and ORB, both views where needed)",
                                                 buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter(p + "errors_total", "Errors by pipeline stage", ["stage"], registry=r)
        self.detection_lag = Histogram(p + "detection_lag_seconds",
                                       "From publication to match recorded",
                                       buckets=LAG_BUCKETS, registry=r)

        self.alerts = Counter(p + "alert_deliveries_total", "Alert delivery attempts by outcome "
                              "(delivered, failed, dead; flood_suppressed: held back by flood control)",
                              ["sink", "outcome"], registry=r)
        self.alerts_in_state = Gauge(p + "outbox_alerts", "Alerts in the outbox by state (pending, "
                                     "delivered, dead)", ["sink", "state"], registry=r)
        self.alert_delivery_seconds = Histogram(p + "alert_delivery_duration_seconds",
                                                "Time of one successful delivery", ["sink"],
                                                buckets=LATENCY_BUCKETS, registry=r)
        self.alert_latency_seconds = Histogram(p + "alert_latency_seconds",
                                               "From alert created to delivered", ["sink"],
                                               buckets=LAG_BUCKETS, registry=r)

        # Scale-out (roles over Redis Streams).
        self.stream_length = Gauge(p + "stream_length", "Entries in a Redis stream between roles (work, "
                                   "fingerprints, answers, dead)", ["stream"], registry=r)
        self.stream_pending = Gauge(p + "stream_pending", "Entries delivered to a consumer group and not yet "
                                    "acknowledged", ["stream", "group"], registry=r)
        self.stream_lag = Gauge(p + "stream_lag", "Entries of a stream not yet delivered to the group",
                                ["stream", "group"], registry=r)
        self.stream_consumers = Gauge(p + "stream_consumers", "Consumers in a group (a shard group with none "
                                      "makes posts wait)", ["stream", "group"], registry=r)
        self.stream_oldest_pending_seconds = Gauge(p + "stream_oldest_pending_seconds", "Age of the oldest "
                                                   "unacknowledged delivery", ["stream", "group"], registry=r)
        self.shard_answers_waiting = Gauge(p + "shard_answers_waiting", "Images some shards have answered "
                                           "for but not all (they wait, they are never recorded as no match)",
                                           registry=r)
        self.shard_answers_oldest_seconds = Gauge(p + "shard_answers_oldest_seconds", "How long the oldest "
                                                  "incomplete image has waited for its shards", registry=r)
        self.role_up = Gauge(p + "role_up", "1 for each role this process runs", ["role"], registry=r)
        self.lease_held = Gauge(p + "lease_held", "1 while this process holds the lease, 0 while it waits for "
                                "it (feed:NAME a feed's polling, sender the alert deliveries, sweeper, retro:K/S "
                                "a shard's retroactive matching): summed over processes, 1", ["lease"], registry=r)

    def set_build_info(self, **extra: str) -> None:
        self.build_info.info({"version": __version__, "hash_algorithm": ALGORITHM_VERSION, **extra})

    def observe_fetch(self, kind: str, wait: float, transfer: float) -> None:
        """An image request's throttle wait and transfer time, apart (Fetcher.observe)."""
        if kind == "image":
            self.throttle_wait_seconds.observe(wait)
            self.download_seconds.observe(transfer)

    def observe_keypoint_searches(self, finders) -> None:
        """What finding posts' keypoints cost (KeypointFinders: ``views`` searched, ``seconds``):
        most posts need none, so a finder that searched nothing is not counted."""
        for finder in finders:
            for view in finder.views:
                self.keypoint_searches.labels(view).inc()
            if finder.views:
                self.keypoint_search_seconds.observe(finder.seconds)

    def feed(self, name: str) -> str:
        """The ``feed`` label of a source: a configured feed's name, or "ingest" for any source
        an API caller names (a partner naming each push after its uploader would otherwise
        add a series per name, without bound). The records keep the name itself."""
        return name if name in self._feeds else "ingest"

    def name_feeds(self, feeds: list[str]) -> None:
        """The configured feeds, labelled by their own names (a role process that watches none
        still counts their images under them)."""
        self._feeds.update(feeds)

    def init_labels(self, feeds: list[str], sinks: list[str], tiers=TIER_NAMES, *, queues: bool = True) -> None:
        """Create the known label children at 0, so dashboards and rate() see every series
        from the first scrape, not only after the first event (a counter first seen at 1
        shows no increase: a rule on rate() would miss the first failure). A role process
        passes the feeds, sinks and tiers it handles, and no in-process queues."""
        self.name_feeds(feeds)
        for feed in feeds:
            self.items_discovered.labels(feed)
            self.images_downloaded.labels(feed)
            for result in ("ok", "not_modified", "error"):
                self.feed_polls.labels(feed, result)
            for reason in ("malformed_item", "bad_url", "deferred"):
                self.feed_items_skipped.labels(feed, reason)
        for sink in sinks:
            for outcome in ("delivered", "failed", "dead", "flood_suppressed"):
                self.alerts.labels(sink, outcome)
            for state in ("pending", "delivered", "dead"):
                self.alerts_in_state.labels(sink, state)
            self.alert_delivery_seconds.labels(sink)
            self.alert_latency_seconds.labels(sink)
        for tier in tiers:
            self.matches.labels(tier)
        for stage in ("poll", "process", "store"):
            self.errors.labels(stage)
        for view in ("upright", "mirrored"):
            self.keypoint_searches.labels(view)
        self.image_failures.labels("download", "timeout")
        self.image_failures.labels("decode", "corrupt")
        if queues:
            self.queue_depth.labels("download")
            self.queue_depth.labels("fingerprint")

    def render(self) -> bytes:
        return generate_latest(self.registry)
