"""The OpenAPI 3.1 description of the daemon's HTTP API (served at /v1/openapi.json).

tests/test_api.py sends real requests to every operation and checks each status code and
response shape against this document.
"""

from __future__ import annotations

from . import __version__


def _err(desc: str) -> dict:
    return {"description": desc, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _ok(desc: str, schema: dict) -> dict:
    return {"description": desc, "content": {"application/json": {"schema": schema}}}


AUTH = [{"bearer": []}]
PAGING = [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
          {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}}]
ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}
UNAUTH = _err("missing or wrong credentials")

OPENAPI = {
    "openapi": "3.1.0",
    "info": {"title": "repost-monitor", "version": __version__,
             "description": "Ingest images, check them, manage the protected library, review matches "
                            "and alerts. /v1 needs `Authorization: Bearer TOKEN` when server.token is set; "
                            "/v1/ingest also takes an HMAC signature (X-Repost-Monitor-Timestamp, "
                            "X-Repost-Monitor-Signature: v1=hex(hmac_sha256(secret, ts + '.' + body)))."},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                            "signature": {"type": "apiKey", "in": "header",
                                          "name": "X-Repost-Monitor-Signature"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
            "Entry": {"type": "object", "required": ["id", "source", "label", "dhash", "phash"],
                      "properties": {"id": {"type": "integer"}, "source": {"type": "string"},
                                     "label": {"type": "string"}, "width": {"type": "integer"},
                                     "height": {"type": "integer"}, "dhash": {"type": "string"},
                                     "phash": {"type": "string"},
                                     "degenerate": {"type": ["string", "null"]},
                                     "added_at": {"type": "number"}}},
            "Match": {"type": "object", "required": ["id", "image_url", "entry_id", "tier", "dhash_distance"],
                      "properties": {"id": {"type": "integer"}, "image_url": {"type": "string"},
                                     "entry_id": {"type": "integer"},
                                     "tier": {"enum": ["exact", "near", "loose"]},
                                     "dhash_distance": {"type": "integer"}, "phash_distance": {"type": "integer"},
                                     "fine_distance": {"type": ["integer", "null"]},
                                     "mirrored": {"type": "boolean"}, "feed": {"type": "string"},
                                     "verdict": {"type": ["string", "null"]},
                                     "suppressed": {"type": ["string", "null"]},
                                     "library": {"type": ["object", "null"]}}},
            "Ingest": {"type": "object", "required": ["image_urls"],
                       "properties": {"image_urls": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                                      "page_url": {"type": "string"}, "source": {"type": "string"},
                                      "id": {"type": "string"}, "author": {"type": "string"},
                                      "published": {"type": "string", "format": "date-time"}}},
        },
    },
    "paths": {
        "/healthz": {"get": {"summary": "liveness", "responses": {"200": _ok("alive", {"type": "object"})}}},
        "/readyz": {"get": {"summary": "readiness", "responses": {
            "200": _ok("ready", {"type": "object"}), "503": _ok("not ready", {"type": "object"})}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
            "200": {"description": "text exposition format", "content": {"text/plain": {}}}}}},
        "/v1/openapi.json": {"get": {"summary": "this document", "security": AUTH,
                                     "responses": {"200": _ok("OpenAPI", {"type": "object"})}}},
        "/v1/ingest": {"post": {
            "summary": "the webhook listener: queue a post's images (JSON) or match an upload (multipart)",
            "security": [{"bearer": []}, {"signature": []}],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Ingest"}},
                "multipart/form-data": {"schema": {"type": "object", "properties": {
                    "image": {"type": "string", "format": "binary"}, "source": {"type": "string"},
                    "id": {"type": "string"}, "page_url": {"type": "string"}}}}}},
            "responses": {"202": _ok("accepted", {"type": "object", "required": ["id", "work_ids", "status"],
                                                   "properties": {"id": {"type": "string"},
                                                                  "work_ids": {"type": "array"},
                                                                  "status": {"type": "string"}}}),
                          "400": _err("malformed body"), "401": UNAUTH,
                          "413": _err("body over 20 MiB"), "422": _err("invalid fields or image")}}},
        "/v1/check": {"post": {
            "summary": "match one image now (upload or URL); records and alerts only with alert: true",
            "security": AUTH,
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"type": "object", "required": ["url"],
                                                 "properties": {"url": {"type": "string"},
                                                                "alert": {"type": "boolean"},
                                                                "page_url": {"type": "string"}}}},
                "multipart/form-data": {"schema": {"type": "object"}}}},
            "responses": {"200": _ok("fingerprint and matches", {"type": "object", "required": ["dhash", "matches"],
                                                                  "properties": {"dhash": {"type": "string"},
                                                                                 "phash": {"type": "string"},
                                                                                 "matches": {"type": "array"}}}),
                          "400": _err("malformed body"), "401": UNAUTH, "422": _err("not an image"),
                          "502": _err("the image host failed")}}},
        "/v1/library": {
            "get": {"summary": "list entries", "security": AUTH, "parameters": PAGING,
                    "responses": {"200": _ok("entries", {"type": "object", "required": ["entries", "total"],
                                                         "properties": {"entries": {"type": "array", "items": {
                                                             "$ref": "#/components/schemas/Entry"}},
                                                             "total": {"type": "integer"}}}),
                                  "401": UNAUTH}},
            "post": {"summary": "add entries: multipart upload, {url, label} or {folder, label}",
                     "security": AUTH,
                     "requestBody": {"required": True, "content": {
                         "application/json": {"schema": {"type": "object", "properties": {
                             "url": {"type": "string"}, "folder": {"type": "string"}, "label": {"type": "string"}}}},
                         "multipart/form-data": {"schema": {"type": "object"}}}},
                     "responses": {"201": _ok("added", {"type": "object", "required": ["added", "skipped"],
                                                        "properties": {"added": {"type": "array"},
                                                                       "skipped": {"type": "array"}}}),
                                   "400": _err("malformed body"), "401": UNAUTH,
                                   "403": _err("folder not allowed"), "422": _err("nothing added")}}},
        "/v1/library/{id}": {"delete": {"summary": "remove an entry", "security": AUTH, "parameters": [ID],
                                        "responses": {"200": _ok("deleted", {"type": "object"}),
                                                      "401": UNAUTH, "404": _err("no such entry")}}},
        "/v1/library/{id}/allow": {"post": {
            "summary": "licensed use: domains, authors, sources where this entry may appear without alerts",
            "security": AUTH, "parameters": [ID],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "properties": {"domains": {"type": "array"}, "authors": {"type": "array"},
                                                 "sources": {"type": "array"}}}}}},
            "responses": {"200": _ok("allowances", {"type": "object"}), "400": _err("malformed body"),
                          "401": UNAUTH, "404": _err("no such entry"), "422": _err("invalid lists")}}},
        "/v1/matches": {"get": {
            "summary": "matches, newest first", "security": AUTH,
            "parameters": PAGING + [{"name": n, "in": "query", "schema": {"type": "string"}}
                                    for n in ("tier", "feed", "verdict", "entry_id")],
            "responses": {"200": _ok("matches", {"type": "object", "required": ["matches", "total"],
                                                 "properties": {"matches": {"type": "array", "items": {
                                                     "$ref": "#/components/schemas/Match"}},
                                                     "total": {"type": "integer"}}}),
                          "400": _err("bad paging"), "401": UNAUTH}}},
        "/v1/matches/{id}/verdict": {"post": {
            "summary": "record a verdict; false_positive stops alerts for that (repost hash, entry)",
            "security": AUTH, "parameters": [ID],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["verdict"],
                "properties": {"verdict": {"enum": ["confirmed", "false_positive", "authorized"]}}}}}},
            "responses": {"200": _ok("recorded", {"type": "object"}), "400": _err("malformed body"),
                          "401": UNAUTH, "404": _err("no such match"), "422": _err("bad verdict")}}},
        "/v1/alerts": {"get": {
            "summary": "alerts in the outbox", "security": AUTH,
            "parameters": [{"name": "state", "in": "query",
                            "schema": {"enum": ["pending", "delivered", "dead"]}}] + PAGING[:1],
            "responses": {"200": _ok("alerts", {"type": "object", "required": ["alerts"],
                                                "properties": {"alerts": {"type": "array"}}}),
                          "400": _err("bad state"), "401": UNAUTH}}},
        "/review": {"get": {
            "summary": "the review page: latest matches side by side with verdict buttons (HTML); "
                       "with server.token set, open it as /review?token=TOKEN",
            "parameters": PAGING + [{"name": "token", "in": "query", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "HTML page", "content": {"text/html": {}}},
                          "400": _err("bad paging"), "401": UNAUTH}}},
        "/review/library/{id}.jpg": {"get": {
            "summary": "thumbnail of a library entry stored as a local file",
            "parameters": [ID, {"name": "token", "in": "query", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "JPEG thumbnail", "content": {"image/jpeg": {}}},
                          "401": UNAUTH, "404": _err("no such entry, or not a local file")}}},
        "/v1/alerts/resend": {"post": {
            "summary": "queue dead-lettered alerts again (all, or {ids: [...]})", "security": AUTH,
            "requestBody": {"content": {"application/json": {"schema": {
                "type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer"}}}}}}},
            "responses": {"200": _ok("requeued", {"type": "object", "required": ["requeued"],
                                                  "properties": {"requeued": {"type": "integer"}}}),
                          "400": _err("malformed body"), "401": UNAUTH, "422": _err("bad ids")}}},
    },
}
