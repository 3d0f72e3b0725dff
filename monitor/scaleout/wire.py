"""What travels on the streams: a work row, a fingerprint, a shard's matches, as flat
string fields (no pickle: a message is data, whoever wrote it)."""

from __future__ import annotations

import base64
import dataclasses
import json
from dataclasses import asdict

from monitor.fingerprints import Fingerprint
from monitor.fingerprints.codec import pack_fine, pack_views, stored_fingerprint, u64_to_sql
from monitor.records.work import WorkItem
from monitor.search.matcher import Match


def _text(fields: dict, key: str) -> str | None:
    value = fields.get(key.encode(), fields.get(key))
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


def work_fields(w: WorkItem) -> dict[str, str]:
    return {"work": json.dumps([w.id, w.feed, w.item_id, w.image_url, w.page_url, w.author, w.published])}


def work_from(fields: dict) -> WorkItem:
    doc = json.loads(_text(fields, "work") or "null")
    if not isinstance(doc, list) or len(doc) != 7 or not isinstance(doc[0], int):
        raise ValueError("no work row in the message")
    return WorkItem(*doc)


def _b64(blob: bytes | None) -> str:
    return base64.b64encode(blob).decode() if blob else ""


def fingerprint_fields(fp: Fingerprint, fetched: bool) -> dict[str, str | bytes]:
    """The fingerprint as message fields: ``fp``, and ``picture`` where it has a keypoint
    picture (a field of its own, ~70 KB as raw bytes, which Redis fields hold as they are:
    shards pass ``fp`` on to the recorder, not this)."""
    doc = [u64_to_sql(fp.dhash), u64_to_sql(fp.phash), u64_to_sql(fp.dhash_mirror), u64_to_sql(fp.phash_mirror),
           fp.width, fp.height, fp.degenerate, _b64(pack_fine(fp)), _b64(pack_views(fp.views)), fetched,
           _b64(fp.keypoints)]
    fields: dict[str, str | bytes] = {"fp": json.dumps(doc)}
    if fp.keypoint_picture:
        fields["picture"] = fp.keypoint_picture
    return fields


def fingerprint_from(fields: dict) -> tuple[Fingerprint, bool]:
    """(fingerprint, whether the worker fetched the image: its row is still to be written).
    A keypoint picture is taken as it came: one that is not is found out, and skipped,
    only if the matcher asks for its keypoints."""
    doc = json.loads(_text(fields, "fp") or "null")
    if not isinstance(doc, list) or len(doc) not in (10, 11):  # 10: a message from before keypoints
        raise ValueError("no fingerprint in the message")
    d, p, dm, pm, w, h, degenerate, fine, views, fetched, *keypoints = doc
    fp = stored_fingerprint(d, p, dm, pm, w, h, degenerate, base64.b64decode(fine) if fine else None,
                            base64.b64decode(views) if views else None)
    if keypoints and keypoints[0]:
        fp = dataclasses.replace(fp, keypoints=base64.b64decode(keypoints[0]))
    picture = fields.get(b"picture", fields.get("picture"))
    if picture:
        fp = dataclasses.replace(fp, keypoint_picture=bytes(picture))
    return fp, bool(fetched)


def _plain(value):
    return value.item() if hasattr(value, "item") else value  # numpy scalars from the kernels


def matches_json(matches: list[Match]) -> str:
    return json.dumps([{k: _plain(v) for k, v in asdict(m).items()} for m in matches])


def matches_from(text: str) -> list[Match]:
    return [Match(**m) for m in json.loads(text)]
