"""A real Prometheus (Debian's package) scrapes the running demo daemon and the role
processes of the scaled-out demo (`demo --shards 2`); every PromQL expression of the
Grafana dashboard and of the alerting rules must return data, and promtool must accept the
rules and the exposed metrics."""

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from tests.conftest import ROOT
from tests.hosts import free_port

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (PROMETHEUS and PROMTOOL),
    reason="LOUD SKIP: Prometheus is not installed (apt-get install prometheus); .ci/run installs it, "
           "so on CI this test runs")]



def get(url: str, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def wait_for(fn, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if fn():
                return
        except OSError as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"{what} not met in {timeout}s ({last})")


def dashboard_exprs() -> list[str]:
    dash = json.loads((ROOT / "dashboards" / "repost-monitor.json").read_text())
    return [t["expr"].replace("$feed", ".*") for p in dash["panels"] for t in p.get("targets", [])]


def rule_exprs() -> list[tuple[str, str]]:
    """(alert name, expression) with each threshold comparison removed: the rule's series must
    exist and evaluate; whether it fires depends on the moment, and in a healthy demo it does not."""
    text = (ROOT / "dashboards" / "repost-monitor.rules.yml").read_text()
    out = []
    for block in text.split("- alert: ")[1:]:
        name = block.split("\n", 1)[0].strip()
        expr = block.split("expr:", 1)[1].split("for:", 1)[0]
        expr = " ".join(expr.split())
        for part in re.split(r" and | unless ", expr):
            part = re.sub(r"^(on|ignoring)\s*\([^)]*\)\s*", "", part)  # a vector match's side
            out.append((name, re.sub(r"\s*(>|<|==|>=|<=)\s*[0-9.]+\s*$", "", part)))
    return out


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prom")
    port, prom_port = free_port(), free_port()
    demo = subprocess.Popen([sys.executable, "-m", "monitor", "demo", "--posts", "30", "--rate", "6",
                             "--forever", "--port", str(port)],
                            stdout=open(tmp / "demo.out", "wb"), stderr=subprocess.STDOUT)
    scaled = subprocess.Popen([sys.executable, "-m", "monitor", "demo", "--shards", "2", "--posts", "30", "--rate",
                               "6", "--forever"], stdout=open(tmp / "scaled.out", "wb"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "[demo] metrics: " in (tmp / "scaled.out").read_text(), 180, "the scaled demo's roles")
    except AssertionError:
        for proc in (demo, scaled):
            proc.terminate()
        raise AssertionError((tmp / "scaled.out").read_text()[-3000:]) from None
    line = next(x for x in (tmp / "scaled.out").read_text().splitlines() if x.startswith("[demo] metrics: "))
    roles = re.findall(r"http://(127\.0\.0\.1:\d+)/metrics", line)
    targets = ", ".join(f"'{t}'" for t in [f"127.0.0.1:{port}", *roles])
    (tmp / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {ROOT / 'dashboards' / 'repost-monitor.rules.yml'}\n"
        f"scrape_configs:\n  - job_name: repost-monitor\n    static_configs:\n"
        f"      - targets: [{targets}]\n")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=open(tmp / "prom.out", "wb"), stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{prom_port}/api/v1"
    try:
        wait_for(lambda: (tmp / "demo.out").read_text().count("[detected]") >= 8, 120,
                 "demo detections")
        wait_for(lambda: (tmp / "scaled.out").read_text().count("[detected]") >= 8, 120,
                 "scaled demo detections")
        wait_for(lambda: json.loads(get(f"{api}/query?query=up"))["data"]["result"], 60, "a scrape")
        wait_for(lambda: float(json.loads(get(
            f"{api}/query?query=" + urllib.parse.quote("count_over_time(up[1m])")))
            ["data"]["result"][0]["value"][1]) >= 10, 60, "ten scrapes")
        yield {"api": api, "metrics": get(f"http://127.0.0.1:{port}/metrics"), "scaled": scaled, "roles": roles}
    finally:
        for proc in (prom, demo, scaled):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def query(api: str, expr: str) -> list:
    doc = json.loads(get(f"{api}/query?query=" + urllib.parse.quote(expr)))
    assert doc["status"] == "success", (expr, doc)
    return doc["data"]["result"]


def test_every_dashboard_query_returns_data(scraped):
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    empty = [e for e in exprs if not query(scraped["api"], e)]
    assert not empty, empty


def test_every_rule_expression_returns_data(scraped):
    parts = rule_exprs()
    assert len({name for name, _ in parts}) == 13
    empty = [(n, e) for n, e in parts if not query(scraped["api"], e)]
    assert not empty, empty
    rules = json.loads(get(scraped["api"] + "/rules"))["data"]["groups"][0]["rules"]
    assert len(rules) == 13 and all(r["health"] == "ok" for r in rules), rules


def test_promtool_accepts_rules_and_metrics(scraped):
    r = subprocess.run([PROMTOOL, "check", "rules", str(ROOT / "dashboards" / "repost-monitor.rules.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=scraped["metrics"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def rule_expr(name: str) -> str:
    text = (ROOT / "dashboards" / "repost-monitor.rules.yml").read_text()
    block = text.split(f"- alert: {name}\n", 1)[1]
    return " ".join(block.split("expr:", 1)[1].split("for:", 1)[0].split())


def test_the_death_of_every_lease_holder_is_seen_by_the_rules(scraped):
    """Last in this module: it stops the scaled demo. Its roles' series go stale, so the rule
    comparing them has nothing to say; the two rules that see deaths must name them."""
    api = scraped["api"]
    held = {r["metric"]["lease"] for r in query(api, "max by (lease) (repost_monitor_lease_held)")}
    assert {"sender", "sweeper"} <= held and any(x.startswith("retro:") for x in held), held
    assert not query(api, rule_expr("RepostMonitorLeaseHoldersGone"))
    # the scaled demo kills one shard replica on purpose: that one is down already
    down_before = {r["metric"]["instance"] for r in query(api, rule_expr("RepostMonitorProcessDown"))}
    assert len(down_before) <= 1 and down_before <= set(scraped["roles"]), down_before
    scaled = scraped["scaled"]
    scaled.terminate()
    scaled.wait(timeout=60)
    wait_for(lambda: {r["metric"]["lease"] for r in query(api, rule_expr("RepostMonitorLeaseHoldersGone"))} == held,
             30, "every lease named as gone")
    # each role's target is seen down at its own next scrape (1 s apart at most): the lease
    # holders' series can go stale a scrape before a role that holds none is seen down
    wait_for(lambda: {r["metric"]["instance"] for r in query(api, rule_expr("RepostMonitorProcessDown"))}
             == set(scraped["roles"]), 10, "every role seen down")
    assert not query(api, "sum by (lease) (repost_monitor_lease_held) < 1")  # the old rule: silent
