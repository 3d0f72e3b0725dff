"""`repost-monitor calibrate`: tier limits measured on the user's own pictures and written
into their config, the rest of the file kept."""

import tomllib

import pytest

from monitor.cli import main
from monitor.config import load_config
from monitor.search.tiers import PRESETS

slow = pytest.mark.slow  # ~200 pictures fingerprinted per run

CONFIG = """# my monitor
[store]
path = "m.sqlite"   # where matches go

[match]
tier = "loose"      # record loose matches too
"""


@slow
def test_calibrate_writes_the_measured_limits_into_the_config(tmp_path, samples, capsys):
    cfg = tmp_path / "config.toml"
    cfg.write_text(CONFIG)
    # 6 pictures, 10 unrelated: ~430 unrelated pairs, enough to show rates of a percent
    code = main(["calibrate", *map(str, sorted(samples.glob("library-*.jpg"))),
                 "--unrelated", *map(str, sorted(samples.glob("other-*.jpg"))),
                 "--limit", "100", "--near-rate", "0.01", "--loose-rate", "0.02", "--write", str(cfg)])
    out = capsys.readouterr().out
    assert code == 0, out
    written = tomllib.loads(cfg.read_text())
    near, loose = written["match"]["near_score"], written["match"]["loose_score"]
    assert 0 < near <= loose <= 640
    assert f"near : score <= {near}" in out and f"loose: score <= {loose}" in out
    assert "recall" in out and "jpeg q40" in out and "[ok]" in out
    text = cfg.read_text()
    assert "# my monitor" in text and "# where matches go" in text and "# record loose matches too" in text
    assert "# calibrate: recall" in text
    config = load_config(cfg)
    assert config.match.tier == "loose" and config.store.path.endswith("m.sqlite")
    tiers = {t.name: t for t in config.match.tiers}
    assert tiers["near"].score_max == near and tiers["loose"].score_max == loose
    assert tiers["exact"] == PRESETS["loose"][0]  # exact stays as shipped


@slow
def test_calibrate_with_too_few_unrelated_pictures_measures_nothing(tmp_path, samples, capsys):
    """At the shipped rates 430 pairs cannot tell 2.5e-5 from 0: nothing is written, and
    the output says how many pairs it would take."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(CONFIG)
    code = main(["calibrate", str(samples), "--unrelated", *map(str, sorted(samples.glob("other-*.jpg"))),
                 "--write", str(cfg)])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, captured.err
    assert "near : not measured" in out and "at least 119,828 are needed" in out
    assert "nothing measured, nothing written" in out
    assert cfg.read_text() == CONFIG
    # a config with no [match] table is not touched either (it was given an empty one)
    bare = CONFIG.split("[match]")[0]
    cfg.write_text(bare)
    assert main(["calibrate", str(samples), "--unrelated", *map(str, sorted(samples.glob("other-*.jpg"))),
                 "--limit", "20", "--write", str(cfg)]) == 0
    assert cfg.read_text() == bare and sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]


def test_a_config_the_loader_would_refuse_is_left_as_it_was(tmp_path, monkeypatch):
    """The new text is checked by the config loader before it replaces the file: a config
    that would not load (here a secret from a variable that is not set) stays as it was,
    nothing is left beside it, and the error names the user's file, not the temporary one."""
    from monitor.tools import calibrate
    monkeypatch.delenv("REPOST_TEST_UNSET", raising=False)
    cfg = tmp_path / "config.toml"
    text = CONFIG + '\n[server]\ntoken = "${REPOST_TEST_UNSET}"\n'
    cfg.write_text(text)
    near = calibrate.TierResult("near", 1e-3, 200, 0.9, 0.0, 2e-3, {}, True)
    result = calibrate.Calibration(6, 100, 10, 1500, (near,), ())
    with pytest.raises(ValueError) as refused:
        calibrate.write_config(cfg, result, check=load_config)
    message = str(refused.value)
    assert message.startswith(f"{cfg} left as it was") and "REPOST_TEST_UNSET is not set" in message
    assert ".calibrate" not in message
    assert cfg.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]
    cfg.write_text(CONFIG)  # one that loads is replaced
    assert calibrate.write_config(cfg, result, check=load_config)
    assert {t.name: t.score_max for t in load_config(cfg).match.tiers}["near"] == 200
