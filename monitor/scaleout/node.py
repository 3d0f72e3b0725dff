"""`repost-monitor run --role ROLE[,ROLE...]`: one process running some roles of a
scaled-out deployment (any mix; as many such processes on as many machines as wanted).

Roles: ``intake``, ``worker``, ``shard:K`` (K of ``transport.shards``; ``shard`` alone is
every shard), ``recorder``, ``sender``, ``api``. Every process serves ``/healthz``,
``/readyz`` (ready once its roles run) and ``/metrics`` on ``[server]``; with ``api`` also
``/v1``, ``/review`` and the WebSub callbacks. The intake also sweeps work rows left
pending (queued by an intake that died between storing and queuing them).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from collections.abc import Callable, Coroutine

from monitor.alerts.outbox import Outbox
from monitor.api.server import Services, make_app, start_server
from monitor.config import Config
from monitor.daemon import configured_sources, make_sink, warm_up_unless_stopped
from monitor.fetch import Fetcher
from monitor.metrics import Metrics
from monitor.pipeline.intake import Intake
from monitor.pipeline.recorder import OnMatch, Recorder
from monitor.pipeline.retro import LibraryWatcher
from monitor.pipeline.worker import Worker
from monitor.records import keypoints as keypoint_rows
from monitor.records import shard_answers
from monitor.records import work as work_rows
from monitor.records.engines import open_store
from monitor.records.library import Library
from monitor.records.store import DatabaseError
from monitor.scaleout import leases
from monitor.scaleout.api import RolePipeline, ShardedChecks
from monitor.scaleout.fetching import FetchRole
from monitor.scaleout.recorder import RecorderRole
from monitor.scaleout.roles import ShardRole, StreamTransport
from monitor.scaleout.streams import ANSWERS, CHECKS, DEAD, FINGERPRINTS, WORK, RedisStreams, with_retry
from monitor.search import radius
from monitor.search.matcher import Matcher
from monitor.search.tiers import TIER_NAMES

log = logging.getLogger("repost_monitor.scaleout")

ROLES = ("intake", "worker", "shard", "recorder", "sender", "api")
SWEEP_AFTER = 300.0  # s: a work row pending this long and never queued is queued...
SWEEP_LOST = 3600.0  # ... as one queued this long ago and still pending


def parse_roles(text: str, shards: int) -> list[tuple[str, int | None]]:
    """"intake,worker,shard:0" -> [("intake", None), ("worker", None), ("shard", 0)]."""
    out: list[tuple[str, int | None]] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, number = part.partition(":")
        if name not in ROLES:
            raise ValueError(f"unknown role {name!r} (roles: all, {', '.join(ROLES)})")
        if name != "shard":
            if number:
                raise ValueError(f"role {name} takes no number")
            out.append((name, None))
        elif not number:
            out += [("shard", k) for k in range(shards)]
        elif not number.isdigit() or int(number) >= shards:
            raise ValueError(f"shard {number} of transport.shards = {shards}: shards are 0..{shards - 1}")
        else:
            out.append(("shard", int(number)))
    if not out:
        raise ValueError("no role given")
    return out


async def run_node(config: Config, roles: list[tuple[str, int | None]], *, stop: asyncio.Event | None = None,
                   on_match: OnMatch | None = None, install_signals: bool = True,
                   say: Callable[[str], None] | None = None) -> None:
    if not config.transport.url:
        raise ValueError("roles talk through Redis: set [transport] url = \"redis://...\"")
    stop = stop or asyncio.Event()
    if install_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    names = sorted({f"shard:{k}" if k is not None else n for n, k in roles})
    metrics = Metrics()
    for name in names:
        metrics.role_up.labels(name).set(1)
    kinds = {n for n, _ in roles}
    metrics.name_feeds([f.name for f in config.feeds])
    metrics.init_labels([f.name for f in config.feeds] if "intake" in kinds else [],
                        [a.name for a in config.alerts] if "sender" in kinds else [],
                        TIER_NAMES if kinds & {"recorder", "shard"} else (), queues=False)
    ready = {"ready": False, "phase": "starting", "roles": names}
    store = await asyncio.to_thread(open_store, config.store.location)
    t = config.transport
    streams = RedisStreams(t.url, t.prefix, claim_idle=t.claim_idle_seconds, max_deliveries=t.max_deliveries)
    runner = None
    services = _services(config) if any(n == "api" for n, _ in roles) else None
    tasks: list[asyncio.Task] = []
    try:
        if config.server.enabled:
            runner, port = await start_server(make_app(metrics, ready, services), config.server.host,
                                              config.server.port)
            log.info("roles %s: /healthz, /readyz, /metrics on http://%s:%d", ",".join(names),
                     config.server.host, port)
        # [match] kernel, as the one-process daemon applies it: before the warm-up and the
        # shards' indexes (which keep a plain dHash array only for the tiled kernel)
        kernel = radius.use(radius.choose(config.match.kernel))
        metrics.set_build_info(kernel=kernel, cpu=radius.host_cpu())
        # the roles that run compiled kernels (the recorder and the api: the keypoint pass's)
        if any(n in ("worker", "shard", "recorder", "api") for n, _ in roles):
            ready["phase"] = "compiling"
            # Role processes often start side by side on few cores: loading the cached kernels
            # can then pass a second; only a real compile (~10 s) earns the notice.
            if not await warm_up_unless_stopped(say or (lambda text: log.info("%s", text)), stop, notice_after=8.0):
                return
        ready["phase"] = "loading"
        node = _Node(config, store, streams, metrics, stop, on_match, services)
        tasks = [asyncio.create_task(coro, name=name) for name, coro in await node.roles(roles)]
        tasks.append(asyncio.create_task(node.watch_streams(any(n == "recorder" for n, _ in roles))))
        ready.update(ready=True, phase="running")
        log.info("running roles: %s", ", ".join(names))
        await stop.wait()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        # cancelled rather than stopped: the roles end with it, before their store and streams close
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if runner is not None:
            await runner.cleanup()
        await streams.close()
        await asyncio.to_thread(store.close)
        log.info("stopped")


def _services(config: Config) -> Services:
    s = config.server
    return Services(token=s.token, hmac_secret=s.hmac_secret, library_folders=tuple(s.library_folders),
                    allowed_hosts=tuple(s.allowed_hosts), allowed_origins=tuple(s.allowed_origins),
                    loopback_only=s.is_loopback, allow_unauthenticated=s.allow_unauthenticated)


class _Node:
    def __init__(self, config: Config, store, streams: RedisStreams, metrics: Metrics, stop: asyncio.Event,
                 on_match, services: Services | None = None):
        self.config, self.store, self.streams, self.metrics, self.stop = config, store, streams, metrics, stop
        self.services = services
        policy = config.alert_policy
        self.outbox = Outbox(store, [make_sink(a) for a in config.alerts], metrics, flood_max=policy.flood_max,
                             flood_window=policy.flood_window_minutes * 60, idle_poll=0.5)
        self.on_match = on_match

    def recorder(self, library: Library | None) -> Recorder:
        return Recorder(self.store, library, self.metrics, outbox=self.outbox, on_match=self.on_match)

    def lease_key(self, what: str) -> str:
        return f"{self.streams.prefix}:lease:{what}"

    def hold(self, what: str, work) -> Coroutine:
        """``work()`` run while this process holds the lease ``what`` (shown by its gauge)."""
        return leases.hold(self.streams.redis, self.lease_key(what), self.streams.consumer, work, self.stop,
                           held=self.metrics.lease_held.labels(what))

    async def roles(self, roles) -> list[tuple[str, object]]:
        cfg, out = self.config, []
        limits = cfg.limits
        for name, k in roles:
            if name == "intake":
                out.append(("intake", self.intake()))
            elif name == "worker":
                fetcher = Fetcher(limits.fetch_limits(self.local_roots()), observe=self.metrics.observe_fetch)
                threads = limits.fingerprint_threads(fetch_worker_role=True)
                worker = Worker(self.store, fetcher, None, self.recorder(None), self.metrics, None,
                                workers=limits.concurrency, fingerprint_workers=threads,
                                fingerprint_processes=limits.fingerprint_processes, max_pixels=limits.max_pixels,
                                keypoints=cfg.match.keypoints)
                log.info("worker: %d fingerprint thread(s); run one worker process per core", threads)
                role = FetchRole(worker, self.streams, limits.concurrency, limits.per_host_workers)
                out.append(("worker", self._with_fetcher(fetcher, role.run(self.stop))))
            elif name == "shard":
                library = await asyncio.to_thread(Library, self.store, (k, cfg.transport.shards),
                                                    spill_dir=cfg.index_spill_dir)
                log.info("shard %d of %d: %d entries indexed", k, cfg.transport.shards, len(library.index))
                matcher = Matcher(library.index, cfg.match.tiers)
                # images fetched again for an unsure match's keypoints (monitor/pipeline/refetch.py)
                fetcher = Fetcher(limits.fetch_limits(self.local_roots()), observe=self.metrics.observe_fetch)
                again = {"fetch_image": fetcher.fetch_image if cfg.match.keypoints else None,
                         "max_pixels": limits.max_pixels}
                watcher = LibraryWatcher(self.store, library, matcher, self.recorder(library), self.metrics,
                                         check_seconds=min(cfg.library.reload_check_seconds, 1.0),
                                         retro_window=cfg.alert_policy.retro_window_hours * 3600,
                                         log_keep=cfg.library.change_log_days * 86400,
                                         history_keep=cfg.store.history_days * 86400,
                                         recent_bytes=int(cfg.alert_policy.retro_memory_mb * 2**20),
                                         retro_here=False, **again)
                role = ShardRole(k, cfg.transport.shards, library, matcher, self.streams, self.metrics,
                                 keypoints=cfg.match.keypoints)
                # new entries retro-matched by one replica of the shard (fetching images again once)
                retro = self.hold(f"retro:{k}/{cfg.transport.shards}", lambda w=watcher: w.retro_loop(self.stop))
                out.append((f"shard:{k}", self._with_fetcher(fetcher, role.run(self.stop), watcher.run(self.stop),
                                                             retro)))
            elif name == "recorder":
                # images fetched again where a post's picture is gone and a match is unsure
                fetcher = Fetcher(limits.fetch_limits(self.local_roots()), observe=self.metrics.observe_fetch)
                role = RecorderRole(self.store, cfg.transport.shards, self.streams, self.recorder(None),
                                    [t.name for t in cfg.match.tiers], keypoints=cfg.match.keypoints,
                                    fetch_image=fetcher.fetch_image if cfg.match.keypoints else None,
                                    max_pixels=limits.max_pixels, metrics=self.metrics,
                                    look_share=cfg.match.second_look_share)
                out.append(("recorder", self._with_fetcher(fetcher, role.run(self.stop))))
            elif name == "api":
                out.append(("api", self.api()))
            elif name == "sender":
                out.append(("sender", self.hold("sender", lambda: self.outbox.run(self.stop))))
        return out

    def local_roots(self) -> tuple[str, ...]:
        """The watched folders: a folder source's images (file:// URLs) are read only under
        them, by whichever role fetches them (the folders mounted where those roles run)."""
        sources = configured_sources(self.config)
        return tuple(s.options["path"] for s, _ in sources if getattr(s, "kind", "") == "folder")

    async def _with_fetcher(self, fetcher: Fetcher, *coros) -> None:
        async with fetcher:
            await asyncio.gather(*coros)

    async def intake(self) -> None:
        transport = StreamTransport(self.streams, self.stop, self.config.limits.queue_size, self.store)
        sources = configured_sources(self.config)
        async with Fetcher(self.config.limits.fetch_limits(self.local_roots()),
                           observe=self.metrics.observe_fetch) as fetcher:
            # public_url: the hub's requests go there, to an api role (any replica)
            intake = Intake(self.store, fetcher, self.metrics, transport, self.config.server.public_url)
            for source, settings in sources:
                intake.add_source(source, settings)
            await intake.start()
            held = [self.hold(f"feed:{s.name}", lambda s=s, c=c: intake.watch(s, c, self.stop)) for s, c in sources]
            held.append(self.hold("sweeper", lambda: self.sweep(transport)))
            await asyncio.gather(*held)

    async def api(self) -> None:
        """The handlers' services, over the streams; the library's table without an index."""
        cfg, limits = self.config, self.config.limits
        transport = StreamTransport(self.streams, self.stop, limits.queue_size, self.store)
        library = await asyncio.to_thread(Library, self.store, indexed=False)
        checks = ShardedChecks(self.streams, cfg.transport.shards, [t.name for t in cfg.match.tiers],
                               cfg.transport.check_timeout_seconds,
                               functools.partial(keypoint_rows.read, self.store) if cfg.match.keypoints else None)
        async with Fetcher(limits.fetch_limits(self.local_roots()), observe=self.metrics.observe_fetch) as fetcher:
            intake = Intake(self.store, fetcher, self.metrics, transport, cfg.server.public_url)
            for source, settings in configured_sources(cfg):  # watched by the intakes; here for WebSub pushes
                intake.add_source(source, settings)
            await intake.start()
            worker = Worker(self.store, fetcher, None, self.recorder(None), self.metrics, None,
                            workers=limits.concurrency, fingerprint_workers=limits.fingerprint_threads(),
                            fingerprint_processes=limits.fingerprint_processes, max_pixels=limits.max_pixels,
                            keypoints=cfg.match.keypoints)
            await worker.start()
            try:
                self.services.attach(self.store, library, RolePipeline(intake, worker, checks, self.streams, self.stop),
                                     None, fetcher)
                await self.stop.wait()
            finally:
                await worker.close()

    async def sweep(self, transport: StreamTransport) -> None:
        """Queue again the work rows pending though never queued (an intake died between storing
        and queuing them) for SWEEP_AFTER, or queued SWEEP_LOST ago (a Redis that came back
        without them); a row queued twice is recorded once. Not those waiting in the stream behind
        a slow host: queued again every SWEEP_AFTER, their copies filled the workers' backlog, and
        the intake waited for it (every feed's polls held up behind one host)."""
        while not self.stop.is_set():
            now = time.time()
            try:
                rows = await asyncio.to_thread(work_rows.unqueued, self.store, now - SWEEP_AFTER, now - SWEEP_LOST)
            except DatabaseError as exc:
                log.warning("sweeper: the pending work could not be read (%s)", exc)
                rows = []
            if rows:
                log.warning("sweeper: %d work rows pending and not in the work stream, queued again", len(rows))
                await transport.put_many(rows)  # marked queued: each once per SWEEP_LOST at most
            try:
                await asyncio.wait_for(self.stop.wait(), 60)
            except TimeoutError:
                pass

    async def watch_streams(self, recorder: bool) -> None:
        """The streams' gauges every 2 s; trimming under a lease (one trimmer is enough)."""
        trimmed = 0.0
        while not self.stop.is_set():
            for stream in (WORK, FINGERPRINTS, ANSWERS, CHECKS):
                stats = await with_retry("stream stats", lambda s=stream: self.streams.group_stats(s), self.stop)
                for g in stats or []:
                    labels = (stream, g["group"])
                    self.metrics.stream_pending.labels(*labels).set(g["pending"])
                    self.metrics.stream_lag.labels(*labels).set(g["lag"])
                    self.metrics.stream_consumers.labels(*labels).set(g["consumers"])
                    self.metrics.stream_oldest_pending_seconds.labels(*labels).set(g["oldest_pending_seconds"])
            for stream in (WORK, FINGERPRINTS, ANSWERS, CHECKS, DEAD):
                length = await with_retry("stream length", lambda s=stream: self.streams.length(s), self.stop)
                self.metrics.stream_length.labels(stream).set(length or 0)
            if recorder:
                waiting, oldest = await asyncio.to_thread(shard_answers.waiting, self.store, time.time())
                self.metrics.shard_answers_waiting.set(waiting)
                self.metrics.shard_answers_oldest_seconds.set(oldest)
            if time.monotonic() - trimmed > 10:
                trimmed = time.monotonic()
                got = await with_retry("trim lease", lambda: self.streams.redis.set(
                    self.lease_key("trimmer"), self.streams.consumer, nx=True, px=15000), self.stop)
                if got:
                    for stream in (WORK, FINGERPRINTS, ANSWERS, CHECKS):
                        await with_retry("trim", lambda s=stream: self.streams.trim(s), self.stop)
                        await with_retry("forget consumers", lambda s=stream: self.streams.forget_idle_consumers(s),
                                         self.stop)
            try:
                await asyncio.wait_for(self.stop.wait(), 2.0)
            except TimeoutError:
                pass
