"""The HTTP API's bodies as pydantic models: the handlers validate requests and
build responses with them, and ``monitor/openapi.py`` writes the OpenAPI
document from them, so the two cannot drift apart.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from feeds.base import MAX_IMAGES_PER_ITEM, url_problem
from monitor.search.tiers import TIER_NAMES

Tier = Literal[TIER_NAMES]  # type: ignore[valid-type]
Verdict = Literal["confirmed", "false_positive", "authorized"]


def _no_nul(text: str) -> str:
    if "\x00" in text:
        raise ValueError("NUL characters are not allowed")
    return text


def _http_url(text: str) -> str:
    why = url_problem(text)
    if why is not None:
        raise ValueError(f"not a fetchable http(s) URL: {why}")
    return text


Text = Annotated[str, Field(max_length=2000), AfterValidator(_no_nul)]
Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_no_nul)]
HttpUrl = Annotated[str, Field(max_length=4096), AfterValidator(_http_url)]


class _Request(BaseModel):
    # Strict: a number where a string belongs is refused, not coerced, and an
    # unknown field is an error the caller hears about.
    model_config = ConfigDict(extra="forbid", strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- requests --------------------------------------------------------------------
class IngestRequest(_Request):
    """A post pushed to the webhook listener: its images are queued like a feed's."""
    image_urls: Annotated[list[HttpUrl], Field(min_length=1, max_length=MAX_IMAGES_PER_ITEM)]
    page_url: HttpUrl | None = None
    source: Name | None = None
    id: Name | None = None
    author: Text | None = None
    published: Annotated[datetime, Field(strict=False)] | None = None


class IngestForm(_Request):
    """The text fields of a multipart ingest (beside one or more image files)."""
    page_url: HttpUrl | None = None
    source: Name | None = None
    id: Name | None = None
    author: Text | None = None
    published: Annotated[datetime, Field(strict=False)] | None = None


class CheckRequest(_Request):
    url: HttpUrl
    alert: bool = False
    page_url: HttpUrl | None = None


class CheckForm(_Request):
    alert: Literal["1", "true", "yes", "0", "false", "no", ""] = ""
    page_url: HttpUrl | None = None


class LibraryAddRequest(_Request):
    """One of ``url`` (an image to fetch) or ``folder`` (under server.library_folders)."""
    url: HttpUrl | None = None
    folder: Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_no_nul)] | None = None
    label: Name | None = None


class LibraryForm(_Request):
    label: Name | None = None


class AllowRequest(_Request):
    domains: Annotated[list[Name], Field(max_length=1000)] = []
    authors: Annotated[list[Name], Field(max_length=1000)] = []
    sources: Annotated[list[Name], Field(max_length=1000)] = []


class VerdictRequest(_Request):
    verdict: Verdict


class ResendRequest(_Request):
    ids: Annotated[list[int], Field(max_length=10000)] | None = None


# -- responses -------------------------------------------------------------------
class ErrorDetail(_Response):
    code: str
    message: str


class Error(_Response):
    error: ErrorDetail


class Health(_Response):
    status: Literal["ok"]


class Ready(BaseModel):
    model_config = ConfigDict(extra="allow")
    ready: bool
    phase: str


class Entry(_Response):
    id: int
    source: str
    label: str
    width: int
    height: int
    dhash: str
    phash: str
    degenerate: str | None
    protection: Literal["full", "weak", "none"] = Field(
        description="full; weak: low detail, matched only on near-identical copies; none: flat or tiny, "
                    "never matched")
    added_at: str = Field(description="ISO 8601 with zone")


class EntryList(_Response):
    entries: list[Entry]
    total: int
    limit: int
    offset: int


class LibraryRef(_Response):
    label: str
    source: str


class Match(_Response):
    id: int
    image_url: str
    entry_id: int
    tier: Tier
    dhash_distance: int
    phash_distance: int
    fine_distance: int | None
    keypoint_inliers: int | None = Field(None, description="keypoint pairs that agree on one geometry: a "
                                         "match by the second look (fine_distance null), or a hash match they "
                                         "confirmed; null where the hashes alone decided")
    mirrored: bool
    feed: str
    item_id: str
    page_url: str | None
    author: str | None
    published: str | None = Field(description="ISO 8601 with zone")
    detected_at: str = Field(description="ISO 8601 with zone")
    verdict: Verdict | None
    suppressed: str | None
    library: LibraryRef | None


class MatchList(_Response):
    matches: list[Match]
    total: int
    limit: int
    offset: int


class IngestResult(_Response):
    id: str
    work_ids: list[int]
    status: Literal["queued", "duplicate", "processed"]


class CheckMatch(_Response):
    entry_id: int
    label: str
    source: str
    tier: Tier
    distance_bits: int
    phash_distance_bits: int
    fine_distance_bits: int | None
    mirrored: bool
    decided_by: str
    keypoint_inliers: int | None = None  # keypoint pairs that agree: a second look's match, or a confirmed one


class CheckResult(_Response):
    dhash: str
    phash: str
    degenerate: str | None
    recorded_match_ids: list[int]
    matches: list[CheckMatch]


class Skipped(_Response):
    source: str
    error: str


class LibraryAddResult(_Response):
    added: list[Entry]
    skipped: list[Skipped]


class Deleted(_Response):
    deleted: int


class Allowances(_Response):
    entry_id: int
    allowed: dict[str, list[str]]


class VerdictResult(_Response):
    id: int
    verdict: Verdict


class Alert(_Response):
    id: int
    sink: str
    state: Literal["pending", "delivered", "dead"]
    attempts: int
    last_error: str | None
    alert: dict
    created_at: str | None = Field(description="ISO 8601 with zone")
    delivered_at: str | None = Field(description="ISO 8601 with zone")


class AlertList(_Response):
    alerts: list[Alert]


class Requeued(_Response):
    requeued: int
