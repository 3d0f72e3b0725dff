"""Request bodies: JSON validated by the API's pydantic models, multipart streamed part
by part with caps on parts, files and sizes; nothing parses a whole body in one call on
the event loop."""

from __future__ import annotations

import asyncio
import json

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import BadHttpMessage
from pydantic import BaseModel, ValidationError

from monitor.api import http
from monitor.api.http import error, read_body


def validate(model: type[BaseModel], doc):
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}"
                             for e in exc.errors(include_url=False, include_input=False)[:10])
        raise error(422, "invalid_body", problems) from None


async def json_body(request: web.Request, model: type[BaseModel], raw: bytes | None = None):
    """The JSON body validated by ``model`` (422 naming each bad field)."""
    raw = raw if raw is not None else await read_body(request, http.MAX_JSON_BODY)
    try:
        doc = json.loads(raw or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise error(400, "bad_json", f"body is not JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise error(400, "bad_json", "body must be a JSON object")
    return validate(model, doc)


class _BufferedContent:
    """A body already in memory (read to check its signature), readable the way
    aiohttp's MultipartReader reads a request stream."""

    def __init__(self, data: bytes):
        self._data, self._pos = data, 0

    async def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        out = self._data[self._pos:end]
        self._pos += len(out)
        return out

    async def readline(self, *, max_line_length: int | None = None) -> bytes:
        end = self._data.find(b"\n", self._pos)
        end = len(self._data) if end < 0 else end + 1
        if max_line_length is not None and end - self._pos > max_line_length:
            raise ValueError("line too long")
        out = self._data[self._pos:end]
        self._pos = end
        return out

    def unread_data(self, data: bytes) -> None:
        self._pos -= len(data)

    def at_eof(self) -> bool:
        return self._pos >= len(self._data)


async def multipart_body(request: web.Request, raw: bytes | None = None,
                         max_file: int = http.MAX_BODY) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    """(form fields, uploaded files), streamed part by part: at most MAX_PARTS parts,
    MAX_FILES files of ``max_file`` bytes, fields of MAX_FIELD_BYTES, all within
    BODY_SECONDS. Nothing here parses a whole body in one call on the event loop."""
    content = _BufferedContent(raw) if raw is not None else request.content
    try:
        reader = MultipartReader(request.headers, content)
    except (AssertionError, ValueError, KeyError) as exc:
        raise error(400, "bad_multipart", f"not a multipart body: {exc}") from None
    fields: dict[str, str] = {}
    files: list[tuple[str, bytes]] = []
    parts = 0
    try:
        async with asyncio.timeout(http.BODY_SECONDS):
            while True:
                part = await reader.next()
                if part is None:
                    break
                parts += 1
                if parts > http.MAX_PARTS:
                    raise error(413, "too_many_parts", f"more than {http.MAX_PARTS} parts")
                if not isinstance(part, BodyPartReader):
                    raise error(400, "bad_multipart", "nested multipart bodies are not accepted")
                is_file = part.filename is not None
                if is_file and len(files) >= http.MAX_FILES:
                    raise error(413, "too_many_files", f"more than {http.MAX_FILES} files")
                cap = max_file if is_file else http.MAX_FIELD_BYTES
                chunks, size = [], 0
                while chunk := await part.read_chunk(65536):
                    size += len(chunk)
                    if size > cap:
                        raise error(413, "request_entity_too_large", f"part {part.name!r} is over {cap:,} bytes")
                    chunks.append(chunk)
                data = b"".join(chunks)
                if is_file:
                    files.append((part.filename or "upload", data))
                elif part.name:
                    text = data.decode(part.get_charset("utf-8"), errors="replace")
                    if "\x00" in text:
                        raise error(422, "invalid_body", f"{part.name}: NUL characters are not allowed")
                    fields[part.name] = text
    except (ValueError, LookupError, BadHttpMessage) as exc:
        raise error(400, "bad_multipart", f"could not parse the multipart body: {str(exc)[:200]}") from None
    return fields, files
