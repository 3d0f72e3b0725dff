"""Config validation: every problem names its key; secrets come from the environment."""

import os
import subprocess
import sys

import pytest

from monitor.config import ConfigError, load_config, parse_config


def problems(data):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    return err.value.problems


def test_errors_name_the_key():
    got = problems({"limits": {"concurrency": 0, "bogus": 1},
                    "feeds": [{"name": "a", "type": "rss"},
                              {"name": "b", "type": "gopher", "url": "http://x"}],
                    "match": {"tier": "medium"}})
    text = "\n".join(got)
    assert "limits.concurrency: Input should be greater than or equal to 1" in text
    assert "limits.bogus: Extra inputs are not permitted" in text
    assert "feeds[0] (a): Value error, a rss feed needs an http(s) 'url'" in text
    assert "feeds[1] (b).type: Value error, unknown feed type 'gopher'" in text
    assert "match.tier:" in text


def test_fingerprint_threads_default_to_one_per_core_and_one_in_a_fetch_worker_role():
    limits = parse_config({}).limits
    assert limits.fingerprint_threads() == max(1, os.cpu_count() or 1)
    assert limits.fingerprint_threads(fetch_worker_role=True) == 1
    limits = parse_config({"limits": {"fingerprint_workers": 3}}).limits
    assert limits.fingerprint_threads() == limits.fingerprint_threads(fetch_worker_role=True) == 3
    assert "limits.fingerprint_workers" in "\n".join(problems({"limits": {"fingerprint_workers": 0}}))


def test_duplicate_feed_names_and_bad_networks():
    text = "\n".join(problems({"feeds": [{"name": "a", "type": "folder", "path": "x"},
                                         {"name": "a", "type": "folder", "path": "y"}]}))
    assert "repeated: a" in text
    text = "\n".join(problems({"limits": {"allowed_networks": ["10.0.0.0/33"]}}))
    assert "limits.allowed_networks" in text and "10.0.0.0/33" in text


def test_secrets_from_environment(monkeypatch):
    data = {"feeds": [{"name": "r", "type": "reddit", "url": "https://x/new.json?t=${TOKEN}"}]}
    assert any("environment variable TOKEN is not set" in p for p in problems(data))
    monkeypatch.setenv("TOKEN", "s3cret")
    assert parse_config(data).feeds[0].url.endswith("t=s3cret")


@pytest.mark.slow  # a subprocess
def test_check_config_command(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[[feeds]]\nname = "f"\ntype = "folder"\npath = "inbox"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[limits]\nper_host_rate = -1\n[[feeds]]\nname = "f"\ntype = "rss"\nurl = "ftp://x"\n')
    ok = subprocess.run([sys.executable, "-m", "monitor", "check-config", str(good)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "1 feeds" in ok.stdout
    assert load_config(good).feeds[0].path == str(tmp_path / "inbox")  # relative to the file
    no = subprocess.run([sys.executable, "-m", "monitor", "check-config", str(bad)],
                        capture_output=True, text=True)
    assert no.returncode == 2
    assert "limits.per_host_rate: Input should be greater than 0" in no.stderr
    assert "feeds[0] (f): Value error, a rss feed needs an http(s) 'url'" in no.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[store\n")
    no = subprocess.run([sys.executable, "-m", "monitor", "check-config", str(broken)],
                        capture_output=True, text=True)
    assert no.returncode == 2 and "not valid TOML" in no.stderr


def test_alert_batch_sizes_are_checked_and_reach_the_sink():
    from monitor.daemon import make_sink
    got = "\n".join(problems({"alerts": [
        {"name": "d", "type": "discord", "url": "https://discord.example/api/webhooks/1/x", "batch_size": 5},
        {"name": "s", "type": "slack", "url": "https://hooks.slack.example/x", "batch_size": 41}]}))
    assert "discord sinks deliver one alert per message" in got
    assert "batch_size for slack is at most 40" in got
    cfg = parse_config({"alerts": [{"name": "h", "type": "webhook", "url": "https://h.example/x",
                                    "secret": "k", "batch_size": 100},
                                   {"name": "f", "type": "file", "path": "a.jsonl"}]})
    hook, rule = make_sink(cfg.alerts[0])
    assert (hook.batch_size, hook.secret, rule.max_attempts, rule.backoff_max) == (100, "k", 40, 15.0)
    assert make_sink(cfg.alerts[1])[0].batch_size == 100  # file sinks batch their fsyncs by default
