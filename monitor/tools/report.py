"""HTML reports people review by looking: one self-contained page (thumbnails
embedded as data URIs), each finding side by side with its distance and the
differing dHash bits, filterable by tier or status. The daemon's /review page
uses the same cards, with verdict buttons that call the API."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

THUMB = 220


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str                 # tier (exact/near/loose) or audit status, used by the filter
    left_label: str
    left_image: str | None    # a data URI or a URL
    right_label: str
    right_image: str | None
    dhash_left: int | None = None
    dhash_right: int | None = None
    distance: int | None = None
    phash_distance: int | None = None
    note: str = ""
    match_id: int | None = None  # /review: the verdict buttons act on it
    verdict: str | None = None
    right_link: str | None = None   # /review: the post's page
    image_link: str | None = None   # /review: the reposted image, linked, never loaded


def thumbnail_uri(path: str | Path | None) -> str | None:
    """A small JPEG of a local image as a data URI (None if unreadable)."""
    if not path:
        return None
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            img.convert("RGB").save(buf, "JPEG", quality=80)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def bits_grid(a: int | None, b: int | None) -> str:
    """8x8 grid of the dHash; cells where the two hashes differ are marked."""
    if a is None or b is None:
        return ""
    diff = a ^ b
    cells = []
    for i in range(64):
        bit = 63 - i
        on = (a >> bit) & 1
        cls = "d" if (diff >> bit) & 1 else ("1" if on else "0")
        cells.append(f'<i class="b{cls}"></i>')
    return f'<div class="bits" title="dHash bits; red: differing">{"".join(cells)}</div>'


CSS = """
body{font:14px system-ui,sans-serif;margin:20px;background:#f6f6f4;color:#222}
h1{font-size:20px;margin:0 0 4px} .summary{color:#555;margin-bottom:12px}
.filters label{margin-right:14px} .card{display:flex;gap:16px;align-items:center;background:#fff;
border:1px solid #ddd;border-radius:6px;padding:10px;margin:8px 0}
.card img{width:220px;height:220px;object-fit:contain;background:#eee;border-radius:4px}
.side{display:flex;flex-direction:column;gap:4px;max-width:240px;word-break:break-all;font-size:12px}
.meta{display:flex;flex-direction:column;gap:6px;min-width:190px}
.tag{display:inline-block;padding:2px 8px;border-radius:10px;background:#dde;font-weight:600}
.tag.exact,.tag.intact{background:#cfe9cf}.tag.near,.tag.re-encoded,.tag.moved{background:#fde9b8}
.tag.loose,.tag.altered{background:#f8d0c0}.tag.missing{background:#f4b0b0}.tag.new{background:#d5e5f5}
.bits{display:grid;grid-template-columns:repeat(8,10px);gap:1px}.bits i{width:10px;height:10px}
.b0{background:#eee}.b1{background:#888}.bd{background:#d33}
.noimg{width:220px;height:220px;display:flex;align-items:center;justify-content:center;background:#eee;color:#999}
button{margin-right:6px}.verdict{font-weight:600}
"""

FILTER_JS = """
function applyFilter(){const on=new Set([...document.querySelectorAll('.filters input:checked')]
.map(x=>x.value));document.querySelectorAll('.card').forEach(c=>{c.style.display=on.has(c.dataset.kind)?'':'none'})}
document.querySelectorAll('.filters input').forEach(x=>x.addEventListener('change',applyFilter));
"""

# The page's credentials are its same-site cookie (set by /review?token=): no token
# ever appears in the page, so nothing in it can leak or inject one.
REVIEW_JS = """
async function verdict(id, v, btn){
  const r=await fetch('/v1/matches/'+id+'/verdict',{method:'POST',credentials:'same-origin',
    headers:{'Content-Type':'application/json'},body:JSON.stringify({verdict:v})});
  const out=btn.closest('.card').querySelector('.verdict');
  out.textContent=r.ok?v:(r.status===401?'error 401: open /review?token=TOKEN again':'error '+r.status);
  out.dataset.state=r.ok?v:'error';
}
document.querySelectorAll('button[data-verdict]').forEach(b=>b.addEventListener('click',
  ()=>verdict(Number(b.closest('.card').dataset.match),b.dataset.verdict,b)));
"""


def _img(src: str | None, alt: str) -> str:
    if not src:
        return '<div class="noimg">no preview</div>'
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}" loading="eager">'


def _links(f: Finding) -> str:
    links = [(f.right_link, "the post"), (f.image_link, "the image")]
    return "".join(f'<a href="{html.escape(url)}" rel="noopener noreferrer" target="_blank">{text}</a>'
                   for url, text in links if url)


def _card(f: Finding, review: bool) -> str:
    dist = (f"<div>dHash {f.distance}/64 bits</div>" if f.distance is not None else "")
    pdist = (f"<div>pHash {f.phash_distance}/64 bits</div>" if f.phash_distance is not None else "")
    buttons = ""
    if review and f.match_id is not None:
        buttons = "<div>" + "".join(
            f'<button data-verdict="{v}">{label}</button>'
            for v, label in (("confirmed", "Confirm"), ("false_positive", "False positive"),
                             ("authorized", "Authorized"))) + \
            f'</div><div>verdict: <span class="verdict">{html.escape(f.verdict or "-")}</span></div>'
    return (f'<div class="card" data-kind="{html.escape(f.kind)}"'
            + (f' data-match="{f.match_id}"' if f.match_id is not None else "") + ">"
            f'<div class="side">{_img(f.left_image, f.left_label)}<span>{html.escape(f.left_label)}</span></div>'
            f'<div class="side">{_img(f.right_image, f.right_label)}<span>{html.escape(f.right_label)}</span>'
            f'{_links(f)}</div>'
            f'<div class="meta"><span class="tag {html.escape(f.kind)}">{html.escape(f.kind)}</span>'
            f'{dist}{pdist}{bits_grid(f.dhash_left, f.dhash_right)}'
            f'<div>{html.escape(f.note)}</div>{buttons}</div></div>')


def content_policy(review: bool = False) -> str:
    """The page's Content-Security-Policy: its own script alone runs (allowed by its hash, so a
    script that reached the page in a file name or a label would not, were it ever left
    unescaped). A report's pictures are embedded; the review page's also come from the
    daemon, and its buttons post verdicts to it."""
    script = FILTER_JS + (REVIEW_JS if review else "")
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    images, connect = ("'self' data:", "'self'") if review else ("data:", "'none'")
    return (f"default-src 'none'; img-src {images}; style-src 'unsafe-inline'; script-src 'sha256-{digest}'; "
            f"connect-src {connect}; form-action 'none'; base-uri 'none'")


def render(title: str, summary: str, findings: list[Finding], *, review: bool = False) -> str:
    kinds = list(dict.fromkeys(f.kind for f in findings))
    filters = "".join(f'<label><input type="checkbox" value="{html.escape(k)}" checked> '
                      f'{html.escape(k)} ({sum(f.kind == k for f in findings)})</label>' for k in kinds)
    cards = "\n".join(_card(f, review) for f in findings) or "<p>Nothing to show.</p>"
    script = FILTER_JS + (REVIEW_JS if review else "")
    return (f"<!doctype html><html><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{content_policy(review)}\">"
            f"<title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<div class='summary'>{html.escape(summary)}</div><div class='filters'>{filters}</div>"
            f"{cards}<script>{script}</script>"
            f"<script type='application/json' id='data'>{html.escape(json.dumps(len(findings)))}</script>"
            "</body></html>")


def write(path: str | Path, title: str, summary: str, findings: list[Finding]) -> None:
    Path(path).write_text(render(title, summary, findings), encoding="utf-8")
