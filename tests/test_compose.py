"""dashboards/compose/scaleout.yml brought up by a real Docker engine: the image built from
the Dockerfile, Redis, PostgreSQL, every role with its replicas and Prometheus (Grafana
is left out: it has no Debian package to stand in for its image where no registry
answers). A protected image added through the API is found in an edited repost, an
unrelated look-alike is not, the alert is delivered, a shard replica killed with -9
changes nothing, and Prometheus scrapes every replica of every role.

Needs a Docker engine and compose (``docker compose`` or ``docker-compose``); skipped
loudly without them. Where the base images cannot be pulled, tests/docker/standins.sh
builds stand-ins from Debian's packages (needs debootstrap)."""

import asyncio
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import time

import aiohttp
import pytest
from PIL import Image, ImageEnhance

from tests.conftest import ROOT, encode

pytestmark = pytest.mark.slow  # minutes: images built, 17 containers started

COMPOSE_DIR = ROOT / "dashboards" / "compose"
PROJECT = "rmcompose"
TOKEN = "compose-test-token-4f1c9e0a7b"
ROLES = ["intake", "worker", "shard-0", "shard-1", "recorder", "sender", "api"]
SERVICES = ["redis", "postgres", *ROLES, "prometheus"]  # all but grafana
API = "http://127.0.0.1:8080"  # the api role's first replica (scaleout.yml publishes 8080-8081)
PROMETHEUS = "http://127.0.0.1:9090"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _docker_ok() -> bool:
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "info"], capture_output=True).returncode == 0


def _compose_command() -> list[str] | None:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def _containers(service: str) -> list[str]:
    out = subprocess.run(["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}",
                          "--filter", f"label=com.docker.compose.service={service}"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def _inspect(container: str, template: str) -> str:
    return subprocess.run(["docker", "inspect", "-f", template, container],
                          capture_output=True, text=True, check=True).stdout.strip()


def _address(container: str) -> str:
    return _inspect(container, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _remove_leftovers() -> None:
    """The project's containers, networks and volumes removed by ID. ``compose down`` finds them by
    name, and fails where an earlier run left two networks of one name (two ``up``s at once
    on one engine create both): "network rmcompose_default is ambiguous"."""
    label = f"label=com.docker.compose.project={PROJECT}"
    for listing, remove in ((["ps", "-aq"], ["rm", "-f", "-v"]), (["network", "ls", "-q"], ["network", "rm"]),
                            (["volume", "ls", "-q"], ["volume", "rm", "-f"])):
        ids = subprocess.run(["docker", *listing, "--filter", label], capture_output=True, text=True).stdout.split()
        if ids:
            subprocess.run(["docker", *remove, *ids], capture_output=True, timeout=300)


@contextlib.contextmanager
def _compose_up(file: str, services: list[str], override: str | None = None, tmp_path=None):
    """``file`` brought up (only ``services``; ``override`` as a second compose file), then
    taken down with its volumes. The roles' logs are printed (pytest shows them on failure)."""
    if not _docker_ok():
        pytest.skip("LOUD SKIP: no Docker engine answers `docker info` (.ci/run starts one)")
    compose = _compose_command()
    if compose is None:
        pytest.skip("LOUD SKIP: neither `docker compose` nor `docker-compose` is installed")
    busy = [port for port in (8080, 8081, 9090) if not _port_free(port)]
    assert not busy, f"the compose files publish ports {busy} on the host, and something holds them"
    subprocess.run([str(ROOT / "tests" / "docker" / "standins.sh")], check=True, timeout=1200)
    env = dict(os.environ, REPOST_API_TOKEN=TOKEN, POSTGRES_PASSWORD="compose-test-pw")
    run = [*compose, "-p", PROJECT, "-f", str(COMPOSE_DIR / file)]
    if override:
        (tmp_path / "override.yml").write_text(override)
        run += ["-f", str(tmp_path / "override.yml")]
    subprocess.run([*run, "down", "-v", "--remove-orphans"], env=env, capture_output=True)
    _remove_leftovers()
    up = subprocess.run([*run, "up", "-d", "--build", *services], env=env, capture_output=True,
                        text=True, timeout=1200)
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    try:
        yield
    finally:
        logs = subprocess.run([*run, "logs", "--no-color", *services], env=env, capture_output=True, text=True)
        print(logs.stdout[-20000:])  # shown by pytest when a test failed
        subprocess.run([*run, "down", "-v", "--remove-orphans"], env=env, capture_output=True, timeout=300)
        _remove_leftovers()


async def _poll(check, timeout: float, what: str, every: float = 0.5):
    """``await check()`` until it returns something true; fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = await check()
            if last:
                return last
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            last = exc
        await asyncio.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


def _images() -> tuple[bytes, bytes, bytes, bytes]:
    """The protected picture, two edits of it, and a look-alike texture whose hashes
    alone meet it at the near tier (the keypoints tell them apart)."""
    protected = (ROOT / "tests" / "images" / "texture-rivets.jpg").read_bytes()
    img = Image.open(io.BytesIO(protected)).convert("RGB")
    w, h = img.size
    cropped = encode(img.crop((0, 0, int(w * 0.93), h)).resize((int(w * 0.8), int(h * 0.86))), quality=75)
    brighter = encode(ImageEnhance.Brightness(img).enhance(1.25), quality=85)
    look_alike = (ROOT / "tests" / "images" / "texture-rustpipes.jpg").read_bytes()
    return protected, cropped, brighter, look_alike


def _form(files: dict[str, bytes], **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in fields.items():
        form.add_field(name, value)
    for name, data in files.items():
        form.add_field("file", data, filename=name, content_type="image/jpeg")
    return form


async def test_the_scaleout_compose_file_runs_detects_and_survives_a_killed_shard():
    with _compose_up("scaleout.yml", SERVICES):
        await _scaleout_flow()


async def _scaleout_flow():
    protected, cropped, brighter, look_alike = _images()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        # Every replica of every role ready (14 containers, each with its own /readyz).
        containers = {c: role for role in ROLES for c in _containers(role)}
        assert len(containers) == 2 * len(ROLES), containers

        addresses = [_address(container) for container in containers]

        async def all_ready():
            for address in addresses:
                async with http.get(f"http://{address}:8080/readyz") as r:
                    if r.status != 200 or not (await r.json())["ready"]:
                        return False
            return True
        await _poll(all_ready, 300, "every role's /readyz")
        for container in containers:  # the kernels compiled at image build serve every role
            logs = subprocess.run(["docker", "logs", container], capture_output=True, text=True).stderr
            assert "first run only" not in logs, (containers[container], logs[-2000:])

        async with http.post(f"{API}/v1/library", data=_form({"rivets.jpg": protected}, label="rivets"),
                             headers=AUTH) as r:
            assert r.status == 201, await r.text()
            entry = (await r.json())["added"][0]["id"]

        async def matchable():  # the shard owning the entry has read it from the change log
            async with http.post(f"{API}/v1/check", data=_form({"c.jpg": cropped}), headers=AUTH) as r:
                assert r.status == 200, await r.text()
                return [m["entry_id"] for m in (await r.json())["matches"]] == [entry]
        started = time.monotonic()
        await _poll(matchable, 30, "the new entry matchable", every=0.2)
        print(f"entry matchable {time.monotonic() - started:.1f} s after the add")

        async def ingest(post_id: str, files: dict[str, bytes]):
            async with http.post(f"{API}/v1/ingest", data=_form(files, source="compose-test", id=post_id),
                                 headers=AUTH) as r:
                assert r.status == 202, await r.text()
                return (await r.json())["work_ids"]
        assert len(await ingest("post-1", {"cropped.jpg": cropped, "pipes.jpg": look_alike})) == 2

        async def matches(n: int):
            async with http.get(f"{API}/v1/matches", headers=AUTH) as r:
                found = (await r.json())["matches"]
                return found if len(found) >= n else None

        async def delivered(n: int):
            async with http.get(f"{API}/v1/alerts?state=delivered", headers=AUTH) as r:
                found = (await r.json())["alerts"]
                return found if len(found) >= n else None
        first = await _poll(lambda: matches(1), 60, "the cropped repost recorded")
        assert [(m["entry_id"], m["item_id"]) for m in first] == [(entry, "post-1")]
        alerts = await _poll(lambda: delivered(1), 60, "its alert delivered")
        assert [a["sink"] for a in alerts] == ["console"]

        # A shard replica dies (SIGKILL from the host, as a crash): the other replica of
        # its group takes the shard's share and the restart policy brings it back.
        victim = _containers("shard-0")[0]
        subprocess.run(["kill", "-9", _inspect(victim, "{{.State.Pid}}")], check=True)
        assert len(await ingest("post-2", {"brighter.jpg": brighter})) == 1
        both = await _poll(lambda: matches(2), 120, "the second repost recorded with a shard replica killed")
        assert sorted(m["item_id"] for m in both) == ["post-1", "post-2"]
        await _poll(lambda: delivered(2), 60, "the second alert delivered")
        async with http.get(f"{API}/v1/matches", headers=AUTH) as r:
            assert len((await r.json())["matches"]) == 2  # the look-alike textures never matched
        async with http.get(f"{API}/v1/alerts", headers=AUTH) as r:
            assert len((await r.json())["alerts"]) == 2  # one alert per match, none sent twice

        async def restarted():
            return _inspect(victim, "{{.State.Running}}") == "true"
        await _poll(restarted, 60, "the killed replica restarted")

        # Prometheus finds every replica through Docker's DNS and scrapes it; the alert rules load.
        async def scraped():
            query = 'count(up{job="repost-monitor"} == 1)'
            async with http.get(f"{PROMETHEUS}/api/v1/query", params={"query": query}) as r:
                result = (await r.json())["data"]["result"]
                return result and int(result[0]["value"][1]) == len(containers)
        await _poll(scraped, 120, "Prometheus scraping every replica", every=2)
        async with http.get(f"{PROMETHEUS}/api/v1/rules") as r:
            groups = (await r.json())["data"]["groups"]
        assert any(rule["name"] for g in groups for rule in g["rules"]), json.dumps(groups)[:500]


async def test_the_one_process_compose_file_protects_its_library_folder(tmp_path):
    """dashboards/compose/docker-compose.yml: the daemon in its image with the library
    folder mounted (here a temp folder in place of ./library) and Prometheus scraping it."""
    library = tmp_path / "library"
    library.mkdir()
    protected, cropped, _, look_alike = _images()
    (library / "rivets.jpg").write_bytes(protected)
    library.chmod(0o755)
    override = f"services:\n  monitor:\n    volumes:\n      - {library}:/library:ro\n"
    with _compose_up("docker-compose.yml", ["monitor", "prometheus"], override, tmp_path):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            async def ready():
                async with http.get(f"{API}/readyz") as r:
                    return r.status == 200 and (await r.json())["ready"]
            await _poll(ready, 180, "the daemon's /readyz")
            logs = subprocess.run(["docker", "logs", _containers("monitor")[0]], capture_output=True,
                                  text=True).stderr
            assert "first run only" not in logs, logs[-2000:]
            async with http.get(f"{API}/v1/library", headers=AUTH) as r:
                assert [e["label"] for e in (await r.json())["entries"]] == ["rivets"]
            for image, expected in ((cropped, ["rivets"]), (look_alike, [])):
                async with http.post(f"{API}/v1/check", data=_form({"x.jpg": image}), headers=AUTH) as r:
                    assert r.status == 200, await r.text()
                    assert [m["label"] for m in (await r.json())["matches"]] == expected

            async def scraped():
                async with http.get(f"{PROMETHEUS}/api/v1/query", params={"query": 'up{job="repost-monitor"}'}) as r:
                    result = (await r.json())["data"]["result"]
                    return result and result[0]["value"][1] == "1"
            await _poll(scraped, 120, "Prometheus scraping the daemon", every=2)
