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
from monitor.search.answers import HashAnswer, Match


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


def fingerprint_fields(fp: Fingerprint, fetched: bool) -> dict[str, str]:
    """The fingerprint as message fields: ``fp``. Not its keypoint picture (up to ~100 KB):
    every shard reads every fingerprint, and only the recorder's keypoint pass, for a few
    posts, needs the picture (RedisStreams.add_many keeps it beside the stream)."""
    doc = [u64_to_sql(fp.dhash), u64_to_sql(fp.phash), u64_to_sql(fp.dhash_mirror), u64_to_sql(fp.phash_mirror),
           fp.width, fp.height, fp.degenerate, _b64(pack_fine(fp)), _b64(pack_views(fp.views)), fetched,
           _b64(fp.keypoints)]
    return {"fp": json.dumps(doc)}


def fingerprint_from(fields: dict) -> tuple[Fingerprint, bool]:
    """(fingerprint, whether the worker fetched the image: its row is still to be written).
    A keypoint picture in the message (a version before pictures were kept beside the
    stream) is taken as it came: one that is not is found out, and skipped, only if its
    keypoints are asked for."""
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


def answer_json(answer: HashAnswer) -> str:
    """A shard's answer for one post: its hash matches and its candidates for a second look."""
    return json.dumps({"matches": [{k: _plain(v) for k, v in asdict(m).items()} for m in answer.matches],
                       "candidates": [[_plain(x) for x in c] for c in answer.candidates]})


def answer_from(text: str) -> HashAnswer:
    """:func:`answer_json`'s answer; a list is a version's before the keypoint pass moved to
    the recorder: its matches, final (confirmed where they could be), and no candidates."""
    doc = json.loads(text)
    if isinstance(doc, list):
        return HashAnswer([Match(**m) for m in doc], [])
    return HashAnswer([Match(**m) for m in doc["matches"]],
                      [(int(e), int(d), int(p), bool(m)) for e, d, p, m in doc["candidates"]])
