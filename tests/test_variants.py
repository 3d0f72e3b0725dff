"""Robust views: the picture inside a frame, and matching a framed, captioned repost."""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from monitor.fingerprints import decode_grey, fingerprint_bytes, turns
from monitor.fingerprints.blurfill import MIN_ELONGATION, _median
from monitor.fingerprints.turns import untilted
from monitor.fingerprints.views import _work_copy, content_box, tilt
from monitor.records.library import LibraryIndex
from monitor.search.matcher import Matcher
from tests.conftest import encode


def _library_matcher(library_images) -> Matcher:
    """A matcher over the sample library, every entry with all its library views."""
    index = LibraryIndex()
    for i, path in enumerate(library_images):
        index.add(i, fingerprint_bytes(path.read_bytes(), views="library"))
    return Matcher(index)


def _framed(img: Image.Image) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The picture on a white page with a meme-style caption band above it."""
    w, h = img.size
    page = Image.new(img.mode, (w + 60, h + 160), "white")
    page.paste(img, (30, 120))
    ImageDraw.Draw(page).text((40, 40), "WHEN THE REPOST HITS", fill="black")
    return page, (30, 120, 30 + w, 120 + h)


def test_content_box_finds_the_picture_inside_borders_and_a_caption(library_images):
    for path in library_images[:4]:
        picture = Image.open(path).convert("L")
        page, (left, top, right, bottom) = _framed(picture)
        box = content_box(page)
        assert box is not None, path
        slack = 0.02 * max(page.size) + 2  # the work copy is at most 256 px on a side
        assert abs(box[0] - left) <= slack and abs(box[1] - top) <= slack, (path, box)
        assert abs(box[2] - right) <= slack and abs(box[3] - bottom) <= slack, (path, box)


def test_a_picture_without_frame_has_no_box():
    # Texture everywhere: every row and column is busy, so the box is the whole image.
    img = Image.effect_noise((300, 200), 40)
    assert content_box(img) is None
    assert content_box(Image.new("L", (200, 200), 255)) is None  # nothing busy at all


def test_framed_captioned_repost_matches_through_the_frame_view(library_images, other_images):
    matcher = _library_matcher(library_images)
    for i, path in enumerate(library_images[:4]):
        page, _ = _framed(Image.open(path).convert("RGB"))
        repost = fingerprint_bytes(encode(page.resize((page.width // 2, page.height // 2)), quality=70),
                                   views="query")
        assert repost.views, path  # the frame was found
        assert i in {m.entry_id for m in matcher.match(repost)}, path
    for path in other_images:
        assert not matcher.match(fingerprint_bytes(path.read_bytes(), views="query")), path


def _feed_post(img: Image.Image) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """A phone feed post: an account row just above the picture (full width) and a row
    of buttons and a caption just below it, each a few pixels away."""
    width = 390
    pic = img.convert("RGB").resize((width, img.height * width // img.width))
    page = Image.new("RGB", (width, pic.height + 260), "white")
    draw = ImageDraw.Draw(page)
    draw.ellipse((12, 52, 44, 84), fill=(200, 60, 90))
    draw.text((54, 62), "someone.photos  Follow", fill="black")
    page.paste(pic, (0, 100))
    y = 100 + pic.height + 14
    for x in (16, 56, 96):
        draw.ellipse((x, y, x + 20, y + 20), outline="black", width=2)
    draw.text((16, y + 36), "1,204 likes  golden hour never misses", fill="black")
    return page, (0, 100, width, 100 + pic.height)


def test_a_picture_with_white_in_its_middle_turned_on_white_is_measured_and_matches(library_images):
    """The cheap gate before a tilt is measured lets through a picture whose own whites fill
    a sixth of its middle (snow, a white shirt): the outline decides, not the middle."""
    picture = Image.open(library_images[2]).convert("RGB")
    w, h = picture.size
    ImageDraw.Draw(picture).rectangle((int(w * 0.34), int(h * 0.34), int(w * 0.56), int(h * 0.56)), fill="white")
    index = LibraryIndex()
    index.add(0, fingerprint_bytes(encode(picture, quality=92), views="library"))
    for angle in (5, -4):
        turned = picture.rotate(angle, resample=Image.BICUBIC, expand=True, fillcolor="white")
        repost = fingerprint_bytes(encode(turned, quality=80), views="query")
        assert len(repost.views) == 1, angle  # turned back upright
        assert 0 in {m.entry_id for m in Matcher(index).match(repost)}, angle


def _turned_in_place(picture: Image.Image, angle: float, fill: int) -> Image.Image:
    """An editor's rotate that keeps the canvas: the corners cut off, fill in their place."""
    return picture.rotate(angle, resample=Image.BICUBIC, fillcolor=(fill,) * len(picture.getbands()))


def test_a_turn_in_place_is_measured_from_the_fill_in_the_corners(library_images):
    for path in library_images:
        picture = Image.open(path).convert("L")
        assert turns.angle_in_place(np.asarray(_work_copy(picture)[0])) is None, path  # upright
        for angle in (3, -6, 9):
            turned = Image.open(io.BytesIO(encode(_turned_in_place(picture, angle, 255), quality=80))).convert("L")
            found = turns.angle_in_place(np.asarray(_work_copy(turned)[0]))
            assert found is not None and abs(found - angle) < 0.5, (path.name, angle, found)
        # pasted turned on a larger canvas: the picture touches the canvas at its corners
        # only, and views.tilt measures it instead
        canvas = picture.rotate(5, resample=Image.BICUBIC, expand=True, fillcolor=255)
        assert turns.angle_in_place(np.asarray(_work_copy(canvas)[0])) is None, path


def test_a_repost_turned_in_place_matches_by_hashes_through_the_turned_back_view(library_images, other_images):
    """A turn of 9 degrees takes a seventh off a wide picture's corners: the whole image's
    hashes drift past every limit, the turned-back centre crop lands on a library one."""
    matcher = _library_matcher(library_images)
    for i, path in enumerate(library_images):
        picture = Image.open(path).convert("RGB")
        for angle, fill in ((-6, 255), (9, 255), (9, 0)):
            if fill == 0 and path.name == "library-astronaut.jpg":
                continue  # its edges are black: a black fill hides the corners' triangles
            repost = fingerprint_bytes(encode(_turned_in_place(picture, angle, fill), quality=80), views="query")
            assert len(repost.views) == 1, (path.name, angle)  # the turned-back view
            found = matcher.match(repost)  # no keypoints: the hashes alone
            assert i in {m.entry_id for m in found}, (path.name, angle, fill)
    for path in other_images:
        picture = Image.open(path).convert("RGB")
        repost = fingerprint_bytes(encode(_turned_in_place(picture, 8, 0), quality=80), views="query")
        assert not matcher.match(repost), path


@pytest.mark.slow  # a library with every view, reposts through all query views
def test_a_feed_post_s_picture_is_boxed_without_the_rows_next_to_it(library_images, other_images):
    """The account row and the buttons are bridged to the picture by their short gaps;
    the box leaves them out (a short band split off by a quiet row is not picture), so the
    post matches through the frame view."""
    matcher = _library_matcher(library_images)
    for i, path in enumerate(library_images):
        page, (left, top, right, bottom) = _feed_post(Image.open(path))
        box = content_box(page.convert("L"))
        assert box is not None and abs(box[1] - top) <= 8 and abs(box[3] - bottom) <= 8, (path.name, box)
        repost = fingerprint_bytes(encode(page, quality=80), views="query")
        assert i in {m.entry_id for m in matcher.match(repost)}, path.name
    for path in other_images:
        assert not matcher.match(fingerprint_bytes(path.read_bytes(), views="query")), path


def test_tilt_is_measured_on_pictures_turned_on_a_plain_background(library_images):
    for path in library_images[:4]:
        picture = Image.open(path).convert("L")
        assert tilt(picture) is None  # upright: no angle
        # A fill close to the picture's own edge colours hides the outline (the
        # astronaut's and the coffee's edges are dark): black is tried elsewhere.
        dark_edges = path.name in ("library-astronaut.jpg", "library-coffee.jpg")
        for angle, fill in ((2, 255), (5, 255), (-3, 255 if dark_edges else 0)):
            turned = picture.rotate(angle, resample=Image.BICUBIC, expand=True, fillcolor=fill)
            found = tilt(turned)
            assert found is not None and abs(found - angle) < 0.5, (path, angle, found)
            back = untilted(turned, found)
            assert abs(back.width - picture.width) <= 0.04 * picture.width + 2
            assert abs(back.height - picture.height) <= 0.04 * picture.height + 2


def test_tilted_repost_matches_through_the_upright_view(library_images):
    matcher = _library_matcher(library_images)
    for i, path in enumerate(library_images[:4]):
        picture = Image.open(path).convert("RGB")
        for angle in (2, -5):
            turned = picture.rotate(angle, resample=Image.BICUBIC, expand=True, fillcolor="white")
            repost = fingerprint_bytes(encode(turned, quality=80), views="query")
            assert i in {m.entry_id for m in matcher.match(repost)}, (path, angle)


@pytest.mark.slow  # a library with every view, reposts through all query views
def test_deep_centre_and_side_crops_match_through_library_views(library_images, other_images):
    matcher = _library_matcher(library_images)
    for i, path in enumerate(library_images):
        picture = Image.open(path).convert("RGB")
        w, h = picture.size
        crops = {"centre 30%": picture.crop((int(w * 0.15), int(h * 0.15), int(w * 0.85), int(h * 0.85))),
                 "left 15% off": picture.crop((int(w * 0.15), 0, w, h)),
                 "right 15% off": picture.crop((0, 0, int(w * 0.85), h))}
        for name, crop in crops.items():
            repost = fingerprint_bytes(encode(crop, quality=75), views="query")
            assert i in {m.entry_id for m in matcher.match(repost)}, (path.name, name)
    for path in other_images:  # more library views, still no false alarm on unrelated pictures
        assert not matcher.match(fingerprint_bytes(path.read_bytes(), views="query")), path


@pytest.mark.slow  # a library with every view, reposts through all query views
def test_crops_to_the_feeds_shapes_match_through_library_views(library_images, other_images):
    """A picture cut to a feed's shape (square, 4:5 portrait, 16:9), which removes up to
    half of one side, matches through the entry's view of that shape; only entries of
    another shape get one."""
    matcher = _library_matcher(library_images)
    missed = []
    for i, path in enumerate(library_images):
        picture = Image.open(path).convert("RGB")
        w, h = picture.size
        for name, ratio in (("square", 1.0), ("4:5", 0.8), ("16:9", 16 / 9)):
            if abs(w / h / ratio - 1) <= 0.12:
                continue  # already about that shape: the whole view covers it
            cw, ch = (int(h * ratio), h) if w / h > ratio else (w, int(w / ratio))
            crop = picture.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
            repost = fingerprint_bytes(encode(crop.resize((cw * 3 // 4, ch * 3 // 4)), quality=70), views="query")
            if i not in {m.entry_id for m in matcher.match(repost)}:
                missed.append((path.name, name))
    assert not missed
    for path in other_images:
        assert not matcher.match(fingerprint_bytes(path.read_bytes(), views="query")), path


def _night_sky(img: Image.Image) -> Image.Image:
    """The picture below a band of plain black sky: rows with no detail at all."""
    img = img.convert("RGB")
    out = Image.new("RGB", (img.width, img.height * 2), "black")
    out.paste(img, (0, img.height))
    return out


def test_frame_of_a_picture_with_plain_dark_rows_keeps_them(library_images):
    """A phone-screenshot-like light page around a picture whose top half is
    plain black: the black rows have no grey-level spread, but they are far
    from the page's colour, so they belong to the picture, not the frame."""
    pic = _night_sky(Image.open(library_images[0]))
    page = Image.new("RGB", (pic.width, pic.height + 400), (250, 250, 250))
    draw = ImageDraw.Draw(page)
    draw.text((16, 40), "@someone · 2h  look at this sky!!", fill=(30, 30, 30))
    page.paste(pic, (0, 130))
    draw.text((16, 200 + pic.height), "1.2k likes", fill=(60, 60, 60))
    left, top, right, bottom = content_box(page.convert("L"))
    assert abs(top - 130) <= 4 and abs(bottom - (130 + pic.height)) <= 4, (top, bottom)
    assert left <= 2 and right >= pic.width - 2


def _figure_on_white(img: Image.Image) -> Image.Image:
    """The picture cut to an ellipse on a white page: a figure with no straight
    outline, like a character portrait."""
    img = img.convert("RGB")
    mask = Image.new("L", img.size, 0)
    ImageDraw.Draw(mask).ellipse((img.width // 10, img.height // 10, img.width * 9 // 10, img.height * 9 // 10),
                                 fill=255)
    page = Image.new("RGB", img.size, "white")
    page.paste(img, (0, 0), mask)
    return page


def test_turned_figure_on_white_matches_through_library_turns(library_images, other_images):
    index = LibraryIndex()
    for i, path in enumerate(library_images):
        fp = fingerprint_bytes(encode(_figure_on_white(Image.open(path)), quality=92), views="library")
        index.add(i, fp)
        # plain corners: four turned copies beside the whole picture, crops and frame view
        assert len(fp.views) >= 9, path
    assert len(fingerprint_bytes(other_images[0].read_bytes(), views="library").views) < 9
    matcher = Matcher(index)
    for i, path in enumerate(library_images[:6]):
        figure = _figure_on_white(Image.open(path))
        for angle in (5, -4):
            turned = figure.rotate(angle, resample=Image.BICUBIC, expand=True, fillcolor="white")
            repost = fingerprint_bytes(encode(turned, quality=75), views="query")
            assert i in {m.entry_id for m in matcher.match(repost)}, (path, angle)
    for path in other_images:
        assert not matcher.match(fingerprint_bytes(path.read_bytes(), views="query")), path


def test_upright_bordered_picture_skips_the_tilt_measurement(library_images):
    """A white border makes the corners look like a turned picture's fill; the
    frame's box with picture in its corners shows it is upright, so the larger
    decode the tilt is measured on is never made. A turned one still is."""
    from monitor.fingerprints.views import query_fingerprints
    asked = []
    for path in library_images[:4]:
        picture = Image.open(path).convert("L")
        w, h = picture.size
        page = Image.new("L", (w + 40, h + 40), 255)
        page.paste(picture, (20, 20))
        grey, size = decode_grey(encode(page, quality=85))  # the hashes' small decode, as served
        views = query_fingerprints(grey, size, exact=False, detail=lambda p=page, a=asked: a.append(1) or p)
        assert len(views) == 2 and not asked, path  # whole page + the picture inside the frame
        for angle in (2, -5):
            turned = picture.rotate(angle, resample=Image.BICUBIC, expand=True, fillcolor=255)
            grey, size = decode_grey(encode(turned, quality=85))
            query_fingerprints(grey, size, exact=False, detail=lambda t=turned, a=asked: a.append(1) or t)
            assert asked, (path, angle)
            asked.clear()


def _story(img: Image.Image, width: int = 360, tall: bool = True) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """A 9:16 story (or, ``tall=False``, a 16:9 video frame): the picture centred over
    a blurred, enlarged copy of itself, with a progress bar and a reply box on top."""
    from PIL import ImageFilter
    w, h = (width, width * 16 // 9) if tall else (width * 16 // 9, width)
    canvas = img.convert("RGB").resize((w, h)).filter(ImageFilter.GaussianBlur(20))
    scale = min(0.92 * w / img.width, 0.8 * h / img.height)
    pic = img.convert("RGB").resize((int(img.width * scale), int(img.height * scale)))
    left, top = (w - pic.width) // 2, (h - pic.height) // 2
    canvas.paste(pic, (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((8, 8, w - 8, 11), fill="white")
    draw.rectangle((12, h - 52, w - 60, h - 16), outline="white")
    draw.text((24, h - 40), "Send message", fill="white")
    return canvas, (left, top, left + pic.width, top + pic.height)


def test_blurred_fill_box_finds_a_story_s_picture_and_nothing_in_plain_pictures(library_images, other_images):
    from monitor.fingerprints.blurfill import blurred_fill_box
    for path in library_images[:4]:
        for tall in (True, False):
            story, (left, top, right, bottom) = _story(Image.open(path), tall=tall)
            grey = story.convert("L").resize((story.width // 2, story.height // 2))
            box = blurred_fill_box(np.asarray(grey))
            assert box is not None, (path.name, tall)
            along = (top, bottom, box[1], box[3]) if tall else (left, right, box[0], box[2])
            assert abs(along[2] * 2 - along[0]) <= 6 and abs(along[3] * 2 - along[1]) <= 6, (path.name, box)
    # pictures of ordinary shapes are not looked at; a long picture without fills has no such edges
    for path in library_images + other_images:
        img = Image.open(path).convert("L")
        assert blurred_fill_box(np.asarray(img)) is None or max(img.size) >= MIN_ELONGATION * min(img.size), path
    assert blurred_fill_box(np.asarray(Image.effect_noise((120, 240), 40))) is None


def test_the_blurred_fill_search_s_median_is_numpy_s():
    values = np.random.default_rng(3).integers(0, 40, 601) / 8
    for n in (1, 2, 3, 254, 255, 601):  # the fast median is numpy's, odd and even counts
        assert _median(values[:n]) == float(np.median(values[:n]))


def test_only_long_pictures_with_likely_fill_edges_are_decoded_again(library_images, other_images):
    """The fill's box is measured on a larger decode, made only where the hashes' small
    decode already shows a likely pair of edges: a story's picture is still found, and a
    long picture with no fills (most 16:9 photos) costs no second decode."""
    from monitor.fingerprints.views import TILT_MIN_SIDE, query_fingerprints

    def fingerprinted(img: Image.Image) -> tuple[int, int]:
        data = encode(img, quality=85)
        small, size = decode_grey(data)[:2]
        decodes = []

        def detail():
            decodes.append(1)
            return decode_grey(data, min_side=TILT_MIN_SIDE)[0]
        views = query_fingerprints(small, size, detail=detail)
        return len(views), len(decodes)
    for path in library_images[:4]:
        for tall in (True, False):
            story, _ = _story(Image.open(path), tall=tall)
            views, decodes = fingerprinted(story)
            assert views >= 2 and decodes == 1, (path.name, tall, views, decodes)
    plain = 0
    for path in library_images + other_images:
        img = Image.open(path).convert("RGB")
        w, h = (img.width, int(img.width / 1.8)) if img.width >= img.height else (int(img.height / 1.8), img.height)
        long = img.crop(((img.width - w) // 2, (img.height - h) // 2, (img.width + w) // 2, (img.height + h) // 2))
        plain += fingerprinted(long)[1] == 0
    assert plain >= len(library_images + other_images) // 2  # 10 of these 16 (none before the first look)


def test_a_story_over_a_blurred_copy_matches_through_the_fill_view(library_images, other_images):
    matcher = _library_matcher(library_images)
    for i, path in enumerate(library_images):
        story, _ = _story(Image.open(path))
        repost = fingerprint_bytes(encode(story, quality=80), views="query")
        assert i in {m.entry_id for m in matcher.match(repost)}, path.name
    for path in other_images:
        story, _ = _story(Image.open(path))
        assert not matcher.match(fingerprint_bytes(encode(story, quality=80), views="query")), path.name
