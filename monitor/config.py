"""The daemon's TOML config: schema, validation, secrets from the environment.

Validation is pydantic's, with every error reported as ``key.path: problem``.
Any string value may be ``"${NAME}"`` (or contain it): it is replaced by the
environment variable NAME, and a missing variable is an error, so secrets
never need to be written into the file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from feeds.registry import SOURCE_TYPES
from monitor.alerts.sinks import SLACK_MAX_BATCH
from monitor.fetch import FetchLimits
from monitor.fingerprints import DEFAULT_MAX_PIXELS
from monitor.search.tiers import TIER_NAMES, Tier, preset

TierName = Literal[TIER_NAMES]  # type: ignore[valid-type]  # from the presets, not copied

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(ValueError):
    """Every problem in a config file, one per line, each naming its key."""

    def __init__(self, problems: list[str], source: str = "config"):
        super().__init__(f"{source}: " + "\n  ".join(["invalid config:"] + problems))
        self.problems = problems


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreConfig(_Model):
    path: str = "repost-monitor.sqlite"  # the embedded default: a SQLite file
    url: str | None = None               # postgresql://user:password@host/db instead (scale-out)
    # finished work with no match, images no work names, items no feed lists: deleted after (0: kept)
    history_days: Annotated[float, Field(ge=0)] = 30.0

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("postgresql://", "postgres://")):
            raise ValueError("store.url names a PostgreSQL database: postgresql://user:password@host:port/db")
        return v

    @property
    def location(self) -> str:
        return self.url or self.path


class LibraryConfig(_Model):
    # Added (or refreshed) at start-up; `repost-monitor library` manages it while the daemon runs.
    paths: list[str] = []
    label: str | None = None
    reload_check_seconds: Annotated[float, Field(gt=0)] = 2.0
    # the library's change log keeps this long (a start whose snapshot is older reads the rows)
    change_log_days: Annotated[float, Field(gt=0)] = 30.0
    # Each index row's fine hashes (64 of its 96 bytes, read only for the candidates past the dHash
    # and pHash gates): "file" keeps them in an unlinked file in index_dir (default: the SQLite
    # store's folder, else the temp folder), read by position, 21 resident bytes a row; "memory": in RAM.
    fine_hashes: Literal["file", "memory"] = "file"
    index_dir: str | None = None


class MatchConfig(_Model):
    tier: TierName = "near"
    # The radius search kernel: auto picks for this CPU (tiled with AVX-512 VPOPCNTDQ,
    # bit-sliced otherwise); $REPOST_MONITOR_KERNEL overrides this key.
    kernel: Literal["auto", "bitsliced", "tiled"] = "auto"
    # The near and loose tiers' score limits (dHash + pHash + fine-hash bits, of 640) in
    # place of the shipped 139 and 153: what `repost-monitor calibrate` measures on your
    # own library and unrelated pictures, and writes here.
    near_score: Annotated[int, Field(ge=0, le=640)] | None = None
    loose_score: Annotated[int, Field(ge=0, le=640)] | None = None
    # A post no tier met gets a second look: its keypoints against its four nearest entries',
    # verified geometrically (crops from one side, shears, warps: held-out recall 88.8% ->
    # ~97%); an unsure near or loose match (score above 40) stands only if the keypoints
    # agree too. ~3-5 ms for a post that needs either; false turns both off (hashes alone).
    keypoints: bool = True
    # Of the daemon's recent posts, at most this share get a second look, the nearest candidates
    # first (monitor/search/budget.py: the CPU per post bounded as the library grows; 1: no limit).
    second_look_share: Annotated[float, Field(gt=0, le=1)] = 0.05

    @property
    def tiers(self) -> tuple[Tier, ...]:
        return preset(self.tier, near_score=self.near_score, loose_score=self.loose_score)


class LimitsConfig(_Model):
    concurrency: Annotated[int, Field(ge=1, le=1024)] = 16
    per_host_rate: Annotated[float, Field(gt=0)] = 8.0
    connect_timeout: Annotated[float, Field(gt=0)] = 5.0
    read_timeout: Annotated[float, Field(gt=0)] = 15.0
    total_timeout: Annotated[float, Field(gt=0)] = 60.0
    max_image_bytes: Annotated[int, Field(ge=1024)] = 10_000_000
    max_feed_bytes: Annotated[int, Field(ge=1024)] = 5_000_000
    max_pixels: Annotated[int, Field(ge=1)] = DEFAULT_MAX_PIXELS
    retries: Annotated[int, Field(ge=0, le=10)] = 3
    queue_size: Annotated[int, Field(ge=1)] = 1000
    per_host_workers: Annotated[int, Field(ge=1)] | None = None  # downloads from one host at once (None: half)
    # Decode+hash(+match) threads; None: one per core, but one in a scaled-out fetch worker, which scales by
    # processes (bench/scaleout.py, 2 cores, two workers: 416-427 posts/s at one thread each, 365-383 at two)
    fingerprint_workers: Annotated[int, Field(ge=1)] | None = None
    # Decode and hash in this many worker processes instead of threads of the daemon (0): they do
    # not contend with the event loop for the GIL, and a decoder crash fails that image only.
    fingerprint_processes: Annotated[int, Field(ge=0, le=256)] = 0
    allow_private_addresses: bool = False
    allowed_networks: list[str] = []

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for net in value:
            ipaddress.ip_network(net, strict=False)  # raises ValueError with the reason
        return value

    def fingerprint_threads(self, fetch_worker_role: bool = False) -> int:
        """``fingerprint_workers``, or its default for this process (see above)."""
        if self.fingerprint_workers is not None:
            return self.fingerprint_workers
        return 1 if fetch_worker_role else max(1, os.cpu_count() or 1)

    def fetch_limits(self, local_roots: tuple[str, ...] = ()) -> FetchLimits:
        return FetchLimits(
            concurrency=self.concurrency, per_host_rate=self.per_host_rate,
            connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
            total_timeout=self.total_timeout, max_image_bytes=self.max_image_bytes,
            max_feed_bytes=self.max_feed_bytes, retries=self.retries,
            allow_private=self.allow_private_addresses,
            allowed_networks=tuple(self.allowed_networks), local_roots=local_roots)


class FeedConfig(_Model):
    name: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")]
    type: str
    url: str | None = None
    path: str | None = None
    interval: Annotated[float, Field(gt=0)] = 300.0
    jitter: Annotated[float, Field(ge=0, le=1)] = 0.1   # share of the interval
    max_backoff: Annotated[float, Field(gt=0)] = 3600.0
    max_new_items: Annotated[int, Field(ge=1)] = 1000  # a poll records at most this many; the rest wait
    headers: dict[str, str] = {}
    # Streaming sources: the timeline polled for what was posted while disconnected
    # (default: the one matching the stream's path, e.g. /api/v1/timelines/public).
    catchup_url: str | None = None
    # reddit_api: a "script" app's client credentials (use "${ENV}"), and the descriptive
    # User-Agent Reddit asks for ("<platform>:<app id>:<version> (by /u/<name>)").
    client_id: str | None = None
    client_secret: str | None = None
    user_agent: str | None = None
    token_url: str | None = None        # default https://www.reddit.com/api/v1/access_token
    # jetstream: which posts (DIDs asked of the server; languages and keywords checked here),
    # and where a picture's blob is fetched from ({did}, {cid}; default the Bluesky CDN thumbnail)
    dids: list[str] = []
    languages: list[str] = []
    keywords: list[str] = []
    image_url_template: str | None = None
    websub: bool = True                 # subscribe at the feed's WebSub hub (with server.public_url)

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in SOURCE_TYPES:
            raise ValueError(f"unknown feed type {value!r}; one of {', '.join(sorted(SOURCE_TYPES))}")
        return value

    @model_validator(mode="after")
    def _target(self):
        if self.type == "folder":
            if not self.path:
                raise ValueError("a folder feed needs 'path'")
        elif self.type == "jetstream":
            if not self.url or not self.url.startswith(("ws://", "wss://")):
                raise ValueError("a jetstream feed needs a ws(s) 'url'")
        elif not self.url or not self.url.startswith(("http://", "https://")):
            raise ValueError(f"a {self.type} feed needs an http(s) 'url'")
        if self.type == "reddit_api" and not (self.client_id and self.client_secret):
            raise ValueError("a reddit_api feed needs client_id and client_secret (a script app's)")
        return self


class AlertSinkConfig(_Model):
    name: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")]
    type: Literal["slack", "webhook", "discord", "file", "log"]
    url: str | None = None
    secret: str | None = None          # webhook HMAC-SHA256 key; use "${ENV_VAR}"
    path: str | None = None            # file sink
    tiers: list[TierName] = []
    labels: list[str] = []
    sources: list[str] = []
    # Failures of the alert at the head of the queue before it is dead-lettered. While a sink is
    # down only the head is retried, at most every backoff_max seconds: with these defaults a
    # sink can be down ~7 minutes before one alert is dead-lettered, and a sink that comes back
    # is noticed within backoff_max.
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 40
    backoff_base: Annotated[float, Field(gt=0)] = 1.0
    backoff_max: Annotated[float, Field(gt=0)] = 15.0
    timeout: Annotated[float, Field(gt=0)] = 10.0
    # Alerts per delivery when a backlog has built up; webhook bodies become {"alerts": [...]}
    # when above 1, Slack gets digest messages. Default: 1 for HTTP sinks, 100 for file and log.
    batch_size: Annotated[int, Field(ge=1, le=500)] | None = None

    @model_validator(mode="after")
    def _target(self):
        if self.batch_size and self.batch_size > 1:
            if self.type == "discord":
                raise ValueError("discord sinks deliver one alert per message; drop batch_size")
            if self.type == "slack" and self.batch_size > SLACK_MAX_BATCH:
                raise ValueError(f"batch_size for slack is at most {SLACK_MAX_BATCH} (Block Kit allows 50 blocks)")
        if self.type in ("slack", "webhook", "discord") and not (
                self.url and self.url.startswith(("http://", "https://"))):
            raise ValueError(f"a {self.type} sink needs an http(s) 'url'")
        if self.type == "file" and not self.path:
            raise ValueError("a file sink needs 'path'")
        return self


class AlertPolicyConfig(_Model):
    flood_max: Annotated[int, Field(ge=1)] = 20           # alerts per library entry ...
    flood_window_minutes: Annotated[float, Field(gt=0)] = 10  # ... within this window
    retro_window_hours: Annotated[float, Field(ge=0)] = 72    # images re-checked against new entries
    retro_memory_mb: Annotated[float, Field(ge=0)] = 256      # their dHashes held (~3.5M images; the rest read)


class ServerConfig(_Model):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    token: str | None = None            # bearer token for /v1; use "${ENV_VAR}"
    hmac_secret: str | None = None      # lets /v1/ingest callers sign instead of a token
    library_folders: list[str] = []     # server-side folders POST /v1/library may add
    allow_unauthenticated: bool = False  # listen on a non-loopback address without auth
    # Host header names the API answers besides its loopback names (DNS rebinding
    # defence); off loopback, an empty list accepts any name (credentials are required).
    allowed_hosts: list[str] = []
    # Origins (scheme://host:port) allowed to send state-changing requests besides the
    # server's own, e.g. a dashboard on another port.
    allowed_origins: list[str] = []
    # Where WebSub hubs can reach this server (https://monitor.example.org): feeds that name a
    # hub are then pushed to /websub/FEED instead of only polled. Unset: polling only.
    public_url: str | None = None

    @property
    def is_loopback(self) -> bool:
        try:
            return self.host == "localhost" or ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @model_validator(mode="after")
    def _auth_off_loopback(self):
        if (self.enabled and not self.is_loopback and not (self.token or self.hmac_secret)
                and not self.allow_unauthenticated):
            raise ValueError(f"refusing to serve the API on non-loopback address {self.host} "
                             "without server.token (or set allow_unauthenticated = true)")
        return self


class TransportConfig(_Model):
    """Scale-out: the stages as roles in separate processes (``run --role``), work between
    them on Redis Streams. Unused by ``--role all`` (one process, in-process queues)."""
    url: str | None = None                # redis://host:port/db
    prefix: str = "repost-monitor"        # stream and lease keys start with this
    shards: Annotated[int, Field(ge=1, le=1024)] = 1   # the library split over this many shards
    claim_idle_seconds: Annotated[float, Field(gt=0)] = 30.0  # a message held this long is taken over
    max_deliveries: Annotated[int, Field(ge=1)] = 5    # then it goes to the dead-letter stream
    check_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0  # /v1/check waits this long for every shard

    @field_validator("url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("transport.url names a Redis server: redis://host:port/db")
        return v


class LogConfig(_Model):
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Model):
    store: StoreConfig = StoreConfig()
    library: LibraryConfig = LibraryConfig()
    match: MatchConfig = MatchConfig()
    limits: LimitsConfig = LimitsConfig()
    feeds: list[FeedConfig] = []
    alerts: list[AlertSinkConfig] = []
    alert_policy: AlertPolicyConfig = AlertPolicyConfig()
    server: ServerConfig = ServerConfig()
    transport: TransportConfig = TransportConfig()
    log: LogConfig = LogConfig()

    @property
    def index_spill_dir(self) -> str | None:
        """Where the index maps its fine hashes from (None: kept in RAM)."""
        if self.library.fine_hashes == "memory":
            return None
        if self.library.index_dir:
            return os.path.expanduser(self.library.index_dir)
        if self.store.url is None and self.store.path != ":memory:":
            return str(Path(self.store.path).expanduser().resolve().parent)
        return tempfile.gettempdir()

    @model_validator(mode="after")
    def _unique_feed_names(self):
        for kind, names in (("feed", [f.name for f in self.feeds]),
                            ("alert sink", [a.name for a in self.alerts])):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{kind} names must be unique; repeated: {', '.join(dupes)}")
        return self


def _expand_env(value, path: str, problems: list[str]):
    if isinstance(value, str):
        def sub(m):
            name = m.group(1)
            if name not in os.environ:
                problems.append(f"{path}: environment variable {name} is not set")
                return ""
            return os.environ[name]
        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else k, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    return value


def _location(loc: tuple, data: dict) -> str:
    parts = []
    node = data
    for key in loc:
        if isinstance(key, int):
            label = None
            if isinstance(node, list) and key < len(node) and isinstance(node[key], dict):
                label = node[key].get("name")
            parts[-1] += f"[{key}]" + (f" ({label})" if label else "")
            node = node[key] if isinstance(node, list) and key < len(node) else None
        else:
            parts.append(str(key))
            node = node.get(key) if isinstance(node, dict) else None
    return ".".join(parts) or "(top level)"


def parse_config(data: dict, source: str = "config") -> Config:
    """The validated config; every problem at once (missing environment variables and
    schema errors together), each naming its key."""
    problems: list[str] = []
    data = _expand_env(data, "", problems)
    # A key whose ${VAR} is missing would fail validation too: say it once.
    unset = {p.split(":", 1)[0] for p in problems}
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for e in exc.errors():
            where = _location(e["loc"], data)
            plain = re.sub(r" \([^)]*\)", "", where)
            if not any(plain == key or plain.startswith(key + ".") or key.startswith(plain + ".")
                       for key in unset):
                problems.append(f"{where}: {e['msg']}")
        raise ConfigError(problems, source) from None
    if problems:
        raise ConfigError(problems, source)
    return config


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read {path}: {exc.strerror or exc}"], str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], str(path)) from None
    config = parse_config(data, str(path))
    # Relative paths in the file are relative to the file, not to the cwd.
    base = path.resolve().parent
    return config.model_copy(update={
        "store": config.store.model_copy(update={"path": str(base / config.store.path)}),
        "library": config.library.model_copy(update={"paths": [str(base / p) for p in config.library.paths]}),
        "feeds": [f.model_copy(update={"path": str(base / f.path)}) if f.path else f
                  for f in config.feeds],
        "alerts": [a.model_copy(update={"path": str(base / a.path)}) if a.path else a
                   for a in config.alerts],
    })
