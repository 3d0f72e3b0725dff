"""The fuzz targets of tests/fuzzing.py, bounded for CI (a few hundred inputs each);
bench/fuzz.py runs the same targets with 10,000 or more."""

import pytest

from tests import fuzzing
from tests.conftest import PAYLOADS, SAMPLES

pytestmark = pytest.mark.slow  # a few hundred inputs per target: ~30 s in all
SEEDS = fuzzing.load_seeds(PAYLOADS)


@pytest.mark.parametrize("kind", ["rss", "jsonfeed", "reddit", "mastodon"])
def test_feed_parsers_on_mutated_real_payloads(kind):
    tally = fuzzing.Tally()
    fuzzing.feed_target(SEEDS, kind, tally, 300)()
    assert tally.inputs >= 200


def test_stream_events():
    tally = fuzzing.Tally()
    fuzzing.stream_target(SEEDS, tally, 300)()
    assert tally.inputs >= 200


def test_url_cleaning_and_the_address_guard():
    tally = fuzzing.Tally()
    fuzzing.url_target(tally, 500)()
    assert tally.inputs >= 300


def test_config_loading():
    tally = fuzzing.Tally()
    fuzzing.config_target(tally, 300)()
    assert tally.inputs >= 200 and "ConfigError" in tally.outcomes


# Pillow warns as it reads a mutated TIFF's damaged tags (and then decodes or refuses it): expected here
@pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")
def test_image_decoding_of_mutated_real_images():
    tally = fuzzing.Tally()
    fuzzing.image_target(fuzzing.image_seeds(SAMPLES, 6), tally, 300)()
    assert tally.inputs >= 200 and any(k.startswith("fingerprinted") for k in tally.outcomes)


def test_api_bodies_never_500_and_leave_no_work_pending(tmp_path):
    daemon = fuzzing.DaemonThread(tmp_path / "m.sqlite", sorted(SAMPLES.glob("library-*.jpg"))[:2])
    try:
        tally = fuzzing.Tally()
        fuzzing.api_target(daemon, tally, 300)()
        assert tally.inputs >= 200
        assert fuzzing.pending_work(daemon.db) == 0
    finally:
        daemon.close()
