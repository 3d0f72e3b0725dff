"""`repost-monitor run`: wire config, store, library, sources, pipeline and server."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from feeds import make_source
from monitor.alerts.outbox import Outbox, SinkRule
from monitor.alerts.sinks import SINK_TYPES
from monitor.api.server import Services, make_app, start_server
from monitor.config import AlertSinkConfig, Config
from monitor.fetch import Fetcher
from monitor.metrics import Metrics
from monitor.pipeline import FeedSettings, OnMatch, Pipeline
from monitor.records.cache import FingerprintCache, default_cache_path
from monitor.records.engines import open_store
from monitor.records.library import Library, keypoints_missing
from monitor.records.store import Store, StoreError  # Store: the interface both engines have
from monitor.scan import add_files
from monitor.search import radius
from monitor.search.matcher import Matcher
from monitor.warmup import warm_up

log = logging.getLogger("repost_monitor.daemon")


@dataclass
class Running:
    """What a started daemon exposes to its caller (the demo, tests)."""
    config: Config
    store: Store
    library: Library
    pipeline: Pipeline
    metrics: Metrics
    outbox: Outbox | None = None
    port: int | None = None
    ready: dict = field(default_factory=dict)


def make_sink(cfg: AlertSinkConfig):
    cls = SINK_TYPES[cfg.type]
    if cfg.type == "file":
        sink = cls(cfg.name, cfg.path)
    elif cfg.type == "log":
        sink = cls(cfg.name)
    elif cfg.type == "webhook":
        sink = cls(cfg.name, cfg.url, cfg.timeout, secret=cfg.secret)
    else:
        sink = cls(cfg.name, cfg.url, cfg.timeout)
    if cfg.batch_size:
        sink.batch_size = cfg.batch_size
    return sink, SinkRule(frozenset(cfg.tiers), frozenset(cfg.labels), frozenset(cfg.sources),
                          cfg.max_attempts, cfg.backoff_base, cfg.backoff_max)


def configured_sources(config: Config) -> list[tuple[object, FeedSettings]]:
    """(source adapter, watch settings) of every configured feed."""
    out = []
    for feed in config.feeds:
        opts = {key: getattr(feed, key) for key in ("path", "catchup_url", "client_id", "client_secret",
                                                    "user_agent", "token_url", "dids", "languages",
                                                    "keywords", "image_url_template") if getattr(feed, key)}
        opts["websub"] = feed.websub
        out.append((make_source(feed.type, feed.name, feed.url, **opts),
                    FeedSettings(feed.interval, feed.jitter, feed.max_backoff, tuple(feed.headers.items()),
                                 feed.max_new_items)))
    return out


async def warm_up_unless_stopped(say: Callable[[str], None], stop: asyncio.Event, notice_after: float = 1.0) -> bool:
    """Compile the kernels (~10 s on a machine's first run) in a daemon thread, so a
    SIGTERM meanwhile stops the daemon at once: False if stopped first. (A thread of
    the default executor would hold the process until the compiler finished.)"""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if not done.done():
            done.set_exception(error) if error else done.set_result(None)

    def compile_kernels() -> None:
        error = None
        try:
            warm_up(say, notice_after=notice_after)
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop
            error = exc
        try:
            loop.call_soon_threadsafe(settle, error)
        except RuntimeError:  # the loop is gone: the daemon stopped meanwhile
            pass

    threading.Thread(target=compile_kernels, name="compile-kernels", daemon=True).start()
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({done, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if done.done():
        done.result()
        return True
    return False


def _raise_open_file_limit() -> None:
    """Every connection is a file descriptor: lift the soft limit to the hard one, so a
    burst of clients meets the server's own limits before the process's."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


async def run_daemon(config: Config, *, stop: asyncio.Event | None = None,
                     on_match: OnMatch | None = None,
                     on_ready: Callable[[Running], None] | None = None,
                     install_signals: bool = True,
                     say: Callable[[str], None] | None = None) -> None:
    """Run until ``stop``; ``say`` hears the one-line notice of a slow first compile
    (default: the log)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if install_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass
    metrics = Metrics()
    metrics.init_labels([f.name for f in config.feeds], [a.name for a in config.alerts])
    say = say or (lambda text: log.info("%s", text))
    ready = {"ready": False, "phase": "starting"}
    store = await asyncio.to_thread(open_store, config.store.location)  # a PostgreSQL connect, migrations
    try:
        await asyncio.to_thread(store.check_writable)
    except StoreError:
        store.close()
        raise
    _raise_open_file_limit()
    runner = None
    services = Services(token=config.server.token, hmac_secret=config.server.hmac_secret,
                        library_folders=tuple(config.server.library_folders),
                        allowed_hosts=tuple(config.server.allowed_hosts),
                        allowed_origins=tuple(config.server.allowed_origins),
                        loopback_only=config.server.is_loopback,
                        allow_unauthenticated=config.server.allow_unauthenticated)
    try:
        # The server answers /healthz (and /readyz: not ready) while the kernels compile,
        # which takes ~10 s on a machine's first run.
        if config.server.enabled:
            runner, port = await start_server(make_app(metrics, ready, services),
                                              config.server.host, config.server.port)
        else:
            port = None
        kernel = radius.use(radius.choose(config.match.kernel))
        log.info("radius search: %s kernel (%s, %s)", kernel, radius.host_cpu(),
                 "AVX-512 VPOPCNTDQ" if "avx512vpopcntdq" in radius.host_features() else "no AVX-512 VPOPCNTDQ")
        metrics.set_build_info(kernel=kernel, cpu=radius.host_cpu())
        ready["phase"] = "compiling"
        if not await warm_up_unless_stopped(say, stop):
            log.info("stopped while compiling the kernels")
            return
        ready["phase"] = "loading library"
        await _serve(config, store, metrics, ready, services, port, stop, on_match, on_ready)
    finally:
        if runner is not None:
            await runner.cleanup()
        store.close()
        log.info("stopped")


async def _serve(config: Config, store: Store, metrics: Metrics, ready: dict, services: Services,
                 port: int | None, stop: asyncio.Event, on_match, on_ready) -> None:
    library = await asyncio.to_thread(Library, store, spill_dir=config.index_spill_dir)
    if config.library.paths:
        cache = FingerprintCache(default_cache_path())
        report = await asyncio.to_thread(add_files, library, config.library.paths,
                                         label=config.library.label, cache=cache, progress=False)
        for source, why in report.skipped:
            log.warning("library: skipped %s: %s", source, why)
        cache.close()
    log.info("library: %d entries indexed from %s", len(library.index), store.path)
    if not len(library.index):
        # the usual cause: pictures added to another store than this config's (`library --db` elsewhere)
        log.warning("library: no protected picture in %s, so nothing can match; add them with "
                    "`repost-monitor library --config CONFIG add PATH...` (this config's store) or list "
                    "them in [library] paths", store.path)
    stale = await asyncio.to_thread(library.stale_count)
    if stale:
        log.warning("library: %d entries were fingerprinted by an older version or imported as "
                    "hashes; they match on fewer views until `repost-monitor library rehash "
                    "--db %s` fingerprints them again", stale, store.path)
    if config.match.keypoints:
        bare = await asyncio.to_thread(keypoints_missing, library)
        if bare:
            log.warning("library: %d entries have no keypoints (added by an older version or imported as "
                        "hashes); the second look skips them until `repost-monitor library rehash --all "
                        "--db %s` finds them", bare, store.path)
    matcher = Matcher(library.index, config.match.tiers)
    local_roots = tuple(f.path for f in config.feeds if f.type == "folder" and f.path)
    policy = config.alert_policy
    outbox = Outbox(store, [make_sink(a) for a in config.alerts], metrics,
                    flood_max=policy.flood_max, flood_window=policy.flood_window_minutes * 60)
    async with Fetcher(config.limits.fetch_limits(local_roots), observe=metrics.observe_fetch) as fetcher:
        pipeline = Pipeline(store, library, matcher, fetcher, metrics,
                            queue_size=config.limits.queue_size,
                            workers=config.limits.concurrency,
                            per_host_workers=config.limits.per_host_workers,
                            fingerprint_workers=config.limits.fingerprint_threads(),
                            fingerprint_processes=config.limits.fingerprint_processes,
                            max_pixels=config.limits.max_pixels, keypoints=config.match.keypoints,
                            look_share=config.match.second_look_share,
                            on_match=on_match,
                            library_check_seconds=config.library.reload_check_seconds,
                            change_log_days=config.library.change_log_days,
                            history_days=config.store.history_days,
                            outbox=outbox,
                            retro_window=policy.retro_window_hours * 3600,
                            retro_memory_mb=policy.retro_memory_mb,
                            public_url=config.server.public_url)
        for source, settings in configured_sources(config):
            pipeline.add_source(source, settings)
        await pipeline.intake.start()
        running = Running(config, store, library, pipeline, metrics, outbox, port=port, ready=ready)
        services.attach(store, library, pipeline, matcher, fetcher)
        if config.server.enabled:
            log.info("serving the API, /metrics and /healthz on http://%s:%d%s",
                     config.server.host, port,
                     "" if config.server.token or config.server.hmac_secret
                     else " (no auth configured)")
        ready.update(ready=True, phase="running", feeds=len(config.feeds),
                     library_entries=len(library.index))
        log.info("watching %d feeds", len(config.feeds))
        if on_ready:
            on_ready(running)
        await asyncio.gather(pipeline.run(stop), outbox.run(stop))
