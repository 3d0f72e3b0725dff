"""The first commands on a fresh machine: an empty numba cache, nothing compiled.

Each test runs the real command in a subprocess with its own empty
NUMBA_CACHE_DIR, so the session's warm-up fixture (which compiles into the
default cache) cannot hide a hang or a silent wait. Slow: each compiles.
"""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.hosts import free_port

pytestmark = pytest.mark.slow


def cold_env(tmp_path) -> dict:
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    return {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "monitor", *map(str, args)]


def test_hash_then_match_say_why_the_first_run_is_slow(tmp_path, samples):
    env = cold_env(tmp_path)
    # `hash` compiles only the fingerprint kernels, and says so while it does
    r = subprocess.run(cli("hash", samples / "library-coffee.jpg", "--no-cache"), env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "compiling the fingerprint kernels, first run only" in r.stderr
    assert r.stdout.count("library-coffee.jpg") == 1
    # `match` then compiles the matching kernels, and says so too
    r = subprocess.run(cli("match", samples / "library-coffee.jpg", "--library", samples, "--no-cache"),
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "compiling the matching kernels, first run only" in r.stderr
    assert "library-coffee.jpg -> " in r.stdout
    # warm now: no notice
    r = subprocess.run(cli("hash", samples / "library-coffee.jpg", "--no-cache"), env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "compiling" not in r.stderr


def test_demo_from_a_cold_cache(tmp_path):
    """The README's first command: every repost detected, exit 0, in bounded time."""
    env = cold_env(tmp_path)
    start = time.monotonic()
    r = subprocess.run(cli("demo"), env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "compiling the matching kernels, first run only" in r.stdout
    summary = [line for line in r.stdout.splitlines() if line.startswith("[demo] done:")]
    assert summary and "20 reposts, 20 detected" in summary[0] and "0 false alarms" in summary[0], r.stdout
    assert "missed" not in r.stdout
    assert time.monotonic() - start < 300



def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_run_answers_health_while_compiling(tmp_path):
    """/healthz answers during the first compile, /readyz says not ready until it is done,
    and the log says why the start is slow."""
    port = free_port()
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[store]\npath = "m.sqlite"\n[server]\nport = {port}\n')
    proc = subprocess.Popen(cli("run", "--config", cfg), env=cold_env(tmp_path), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen_compiling = False
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                health, _ = get(f"http://127.0.0.1:{port}/healthz")
                ready, body = get(f"http://127.0.0.1:{port}/readyz")
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
                continue
            assert health == 200
            if ready == 503:
                assert body["ready"] is False
                seen_compiling |= body["phase"] == "compiling"
                status, err = get(f"http://127.0.0.1:{port}/v1/matches")
                assert status == 503 and err["error"]["code"] == "starting"
            else:
                assert ready == 200 and body["ready"] is True
                break
            time.sleep(0.5)
        else:
            raise AssertionError("never ready")
        assert seen_compiling
        assert get(f"http://127.0.0.1:{port}/v1/matches")[0] == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert "compiling the matching kernels, first run only" in out


def test_a_cold_cache_is_compiled_in_separate_processes_at_once(tmp_path):
    """On a cold cache the kernels compile in up to `processes` interpreters at once
    (numba holds the GIL while compiling); the caller then only loads them."""
    probe = """
import json
from monitor import warmup
from monitor.fingerprints import fasthash
from monitor.search import matcher
before = {m: warmup.is_cached(m) for m in warmup.PRODUCTION_KERNELS}
warmup.warm_up(None, processes=2)
after = {m: warmup.is_cached(m) for m in warmup.PRODUCTION_KERNELS}
stats = [k.stats for k in (fasthash._grids_and_hashes, matcher._verify)]
print(json.dumps({"before": before, "after": after, "hits": [len(s.cache_hits) for s in stats],
                  "misses": [len(s.cache_misses) for s in stats], "left": len(warmup._compilers)}))
"""
    r = subprocess.run([sys.executable, "-c", probe], env=cold_env(tmp_path), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert not any(seen["before"].values()) and all(seen["after"].values())
    # compiled by the helpers, loaded here: cache hits, no misses
    assert seen["misses"] == [0, 0] and all(seen["hits"]), seen
    assert seen["left"] == 0


def test_a_warm_cache_gives_no_compile_notice_however_slow_the_load():
    # The kernels are cached (conftest warmed them): loading them says nothing, even where
    # it takes longer than the notice's delay (14 containers starting on 2 cores did).
    from monitor.warmup import warm_up
    said = []
    warm_up(said.append, notice_after=0.0)
    assert said == []
