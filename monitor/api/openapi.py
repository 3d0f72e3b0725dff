"""The OpenAPI 3.1 document of the daemon's HTTP API (served at /v1/openapi.json),
written from the pydantic models the handlers validate and answer with
(``monitor/apimodels.py``) and the table of operations below.

tests/test_api.py sends real requests to every operation and validates each
status code and response body against this document.
"""

from __future__ import annotations

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from monitor.api import models as m
from monitor.version import __version__

JSON, MULTIPART = "application/json", "multipart/form-data"
REF = "#/components/schemas/{model}"


def _upload(form: type[BaseModel], files: str) -> dict:
    """A multipart body: the form's text fields and one or more image files."""
    schema = {"$ref": REF.format(model=form.__name__)}
    return {"allOf": [schema, {"type": "object", "properties": {
        files: {"type": "array", "items": {"type": "string", "format": "binary"}}}}]}


PAGING = [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
          {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}}]
ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}
TOKEN_QUERY = {"name": "token", "in": "query", "schema": {"type": "string"},
               "description": "the server.token, once: the page keeps it for its API calls"}
BEARER = [{"bearer": []}]
STATE_CHANGING = {"415": "body is not application/json (or multipart where documented)",
                  "403": "cross-site request refused (foreign Origin or Host)"}

# (path, method): summary, security, request bodies, parameters, responses {status: (description, body)}
# where body is a model, a media type string, or None.
OPERATIONS: dict[tuple[str, str], dict] = {
    ("/healthz", "get"): dict(summary="liveness: answers while the kernels compile", security=[],
                              responses={"200": ("alive", m.Health)}),
    ("/readyz", "get"): dict(summary="readiness: 503 until compiled, loaded and watching", security=[],
                             responses={"200": ("ready", m.Ready), "503": ("not ready yet", m.Ready)}),
    ("/metrics", "get"): dict(summary="Prometheus metrics", security=[],
                              responses={"200": ("text exposition format", "text/plain")}),
    ("/v1/openapi.json", "get"): dict(summary="this document",
                                      responses={"200": ("OpenAPI", "application/json")}),
    ("/v1/ingest", "post"): dict(
        summary="the webhook listener: queue a post's images (JSON), or match uploaded images (multipart, "
                "one work row per file)",
        security=[{"bearer": []}, {"signature": []}],
        body={JSON: m.IngestRequest, MULTIPART: _upload(m.IngestForm, "image")},
        responses={"202": ("accepted", m.IngestResult), "400": ("malformed body", m.Error),
                   "413": ("body over 20 MiB, or too many parts", m.Error),
                   "422": ("invalid fields or image", m.Error)}),
    ("/v1/check", "post"): dict(
        summary="match one image now (upload or URL); records and alerts only with alert: true",
        body={JSON: m.CheckRequest, MULTIPART: _upload(m.CheckForm, "image")},
        responses={"200": ("fingerprint and matches", m.CheckResult), "400": ("malformed body", m.Error),
                   "413": ("body over 20 MiB, or too many parts", m.Error),
                   "422": ("invalid fields, or not an image", m.Error),
                   "502": ("the image host failed", m.Error)}),
    ("/v1/library", "get"): dict(summary="list entries", parameters=PAGING,
                                 responses={"200": ("entries", m.EntryList), "400": ("bad paging", m.Error)}),
    ("/v1/library", "post"): dict(
        summary="add entries: multipart upload, {url, label} or {folder, label}",
        body={JSON: m.LibraryAddRequest, MULTIPART: _upload(m.LibraryForm, "image")},
        responses={"201": ("added", m.LibraryAddResult), "400": ("malformed body", m.Error),
                   "403": ("folder not allowed, or cross-site", m.Error),
                   "413": ("body over 20 MiB, or too many parts", m.Error),
                   "422": ("nothing added", m.Error)}),
    ("/v1/library/{id}", "delete"): dict(summary="remove an entry", parameters=[ID],
                                         responses={"200": ("deleted", m.Deleted),
                                                    "404": ("no such entry", m.Error)}),
    ("/v1/library/{id}/allow", "post"): dict(
        summary="licensed use: domains, authors, sources where this entry may appear without alerts",
        parameters=[ID], body={JSON: m.AllowRequest},
        responses={"200": ("allowances", m.Allowances), "400": ("malformed body", m.Error),
                   "404": ("no such entry", m.Error), "422": ("invalid lists", m.Error)}),
    ("/v1/matches", "get"): dict(
        summary="matches, newest first",
        parameters=PAGING + [{"name": n, "in": "query", "schema": {"type": "string"}}
                             for n in ("tier", "feed", "verdict", "entry_id")],
        responses={"200": ("matches", m.MatchList), "400": ("bad paging", m.Error)}),
    ("/v1/matches/{id}/verdict", "post"): dict(
        summary="record a verdict; false_positive stops alerts for that (repost hash, entry)",
        parameters=[ID], body={JSON: m.VerdictRequest},
        responses={"200": ("recorded", m.VerdictResult), "400": ("malformed body", m.Error),
                   "404": ("no such match", m.Error), "422": ("bad verdict", m.Error)}),
    ("/v1/alerts", "get"): dict(
        summary="alerts in the outbox",
        parameters=[{"name": "state", "in": "query", "schema": {"enum": ["pending", "delivered", "dead"]}},
                    PAGING[0]],
        responses={"200": ("alerts", m.AlertList), "400": ("bad state or paging", m.Error)}),
    ("/v1/alerts/resend", "post"): dict(
        summary="queue dead-lettered alerts again (all, or {ids: [...]})", body={JSON: m.ResendRequest},
        responses={"200": ("requeued", m.Requeued), "400": ("malformed body", m.Error),
                   "422": ("bad ids", m.Error)}),
    ("/websub/{feed}", "get"): dict(
        summary="a WebSub hub's verification of intent: the challenge echoed for a subscription we asked for",
        security=[], parameters=[{"name": "feed", "in": "path", "required": True, "schema": {"type": "string"}}],
        responses={"200": ("the challenge", "text/plain"), "404": ("no such subscription", m.Error),
                   "503": ("starting", m.Error)}),
    ("/websub/{feed}", "post"): dict(
        summary="a WebSub hub's delivery: a feed document signed with X-Hub-Signature (HMAC under the "
                "subscription's secret); acknowledged even when ignored, as the spec asks",
        security=[], parameters=[{"name": "feed", "in": "path", "required": True, "schema": {"type": "string"}}],
        responses={"202": ("received: recorded, bad_signature or malformed", "text/plain"),
                   "410": ("no such subscription", "text/plain"), "413": ("over the feed size limit", m.Error),
                   "503": ("starting", m.Error)}),
    ("/review", "get"): dict(
        summary="the review page: latest matches side by side with verdict buttons (HTML); with "
                "server.token set, open it once as /review?token=TOKEN (kept in a same-site cookie)",
        security=[{"bearer": []}, {"cookie": []}], parameters=PAGING + [TOKEN_QUERY],
        responses={"200": ("HTML page", "text/html"), "400": ("bad paging", m.Error)}),
    ("/review/library/{id}.jpg", "get"): dict(
        summary="thumbnail of a library entry stored as a local file",
        security=[{"bearer": []}, {"cookie": []}], parameters=[ID],
        responses={"200": ("JPEG thumbnail", "image/jpeg"),
                   "404": ("no such entry, or not a local file", m.Error)}),
}

RESPONSES = (m.Error, m.Health, m.Ready, m.EntryList, m.MatchList, m.IngestResult, m.CheckResult,
             m.LibraryAddResult, m.Deleted, m.Allowances, m.VerdictResult, m.AlertList, m.Requeued)
REQUESTS = (m.IngestRequest, m.IngestForm, m.CheckRequest, m.CheckForm, m.LibraryAddRequest,
            m.LibraryForm, m.AllowRequest, m.VerdictRequest, m.ResendRequest)


def _content(body) -> dict:
    if isinstance(body, str):
        return {body: {}}
    if isinstance(body, dict):
        return {MULTIPART: {"schema": body}}
    return {JSON: {"schema": {"$ref": REF.format(model=body.__name__)}}}


def build() -> dict:
    _, defs = models_json_schema([(model, "serialization") for model in RESPONSES]
                                 + [(model, "validation") for model in REQUESTS], ref_template=REF)
    schemas = defs["$defs"]
    paths: dict[str, dict] = {}
    for (path, method), op in OPERATIONS.items():
        responses = {status: {"description": desc, **({"content": _content(body)} if body else {})}
                     for status, (desc, body) in op["responses"].items()}
        secured = op.get("security", BEARER)
        if path.startswith(("/v1", "/review")):
            responses.setdefault("401", {"description": "missing or wrong credentials",
                                         "content": _content(m.Error)})
            responses.setdefault("503", {"description": "starting (the kernels are compiling), or the store is "
                                                        "failing (store_unavailable, with Retry-After)",
                                         "content": _content(m.Error)})
        if "body" in op:
            for status, desc in STATE_CHANGING.items():
                responses.setdefault(status, {"description": desc, "content": _content(m.Error)})
        entry = {"summary": op["summary"], "security": secured, "responses": responses}
        if op.get("parameters"):
            entry["parameters"] = op["parameters"]
        if "body" in op:
            entry["requestBody"] = {"required": True, "content": {
                ctype: {"schema": schema if isinstance(schema, dict)
                        else {"$ref": REF.format(model=schema.__name__)}}
                for ctype, schema in op["body"].items()}}
        paths.setdefault(path, {})[method] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "repost-monitor", "version": __version__,
                 "description": "Ingest images, check them, manage the protected library, review matches "
                                "and alerts. /v1 needs `Authorization: Bearer TOKEN` when server.token is "
                                "set; /v1/ingest also takes an HMAC signature (X-Repost-Monitor-Timestamp, "
                                "X-Repost-Monitor-Signature: v1=hex(hmac_sha256(secret, ts + '.' + body))). "
                                "State-changing requests must be application/json (or multipart where "
                                "documented) and are refused from a foreign Origin or Host. Times are "
                                "ISO 8601 with zone."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "signature": {"type": "apiKey", "in": "header",
                                              "name": "X-Repost-Monitor-Signature"},
                                "cookie": {"type": "apiKey", "in": "cookie", "name": "rm_review"}},
            "schemas": schemas,
        },
        "paths": paths,
    }


OPENAPI = build()
