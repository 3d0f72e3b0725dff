"""The rules the code's shape keeps: no import circles, SQL only in the records layer,
modules and classes of a readable size, the hot path free of I/O, the stages where the
README's map says they are."""

import ast
import re
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("monitor", "feeds")
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 220
SQL = re.compile(r"\b(SELECT\s.+\sFROM|INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+TABLE)\b",
                 re.I | re.S)


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """Every module of ours this file imports, at any depth (type-checking blocks aside)."""
    found = set()
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _type_checking(node)
            for child in node.body for n in ast.walk(child)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m in known}


def test_no_import_circles():
    known = modules()
    graph = {name: imports_of(path, known) - {name} for name, path in known.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2
    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_sql_lives_only_in_the_records_layer():
    offenders = []
    for name, path in modules().items():
        if name.startswith("monitor.records"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.search(node.value):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_modules_and_classes_stay_readable():
    too_long = []
    for path in modules().values():
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno > MAX_CLASS_LINES:
                too_long.append(f"{path.relative_to(ROOT)}: class {node.name} {node.end_lineno - node.lineno} lines")
    assert not too_long, too_long


def test_no_database_engine_above_the_records_layer():
    """Only records/ knows the store is SQLite, so a PostgreSQL one can take its place."""
    for name, path in modules().items():
        if not name.startswith("monitor.records"):
            assert "sqlite3" not in path.read_text(), name


def test_the_hot_path_does_no_io():
    """Fingerprints and search: pure functions of bytes and arrays (no files, sockets, SQL)."""
    banned = {"sqlite3", "aiohttp", "socket", "asyncio", "requests", "urllib.request"}
    known = modules()
    for name, path in known.items():
        if name.startswith(("monitor.fingerprints", "monitor.search")):
            tree = ast.parse(path.read_text())
            used = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            used |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert not used & banned, (name, used & banned)
            assert not (imports_of(path, known) - {m for m in known if m.startswith(
                ("monitor.fingerprints", "monitor.search", "monitor.version"))}), name
            assert not re.search(r"(?<![\w.])open\(", path.read_text()), name  # the builtin: files


def test_the_stages_are_where_the_map_says():
    readme = (ROOT / "README.md").read_text()
    for folder in ("feeds/", "monitor/fetch.py", "monitor/fingerprints/", "monitor/search/", "monitor/records/",
                   "monitor/pipeline/", "monitor/alerts/", "monitor/api/", "monitor/tools/"):
        assert (ROOT / folder).exists(), folder
        assert f"`{folder}`" in readme, f"README's Layout lacks {folder}"


# Functions of the records layer that touch no store (a path from the environment), and its
# modules that are asyncio-native (the change listener's own async connection).
PURE_RECORDS = {"default_cache_path"}
ASYNC_RECORDS = {"monitor.records.changes"}


def _store_calls_on_the_loop(path: Path) -> list[str]:
    """Calls in an ``async def``'s own body (not in a nested def or lambda, which run where
    they are sent: a thread) that reach the store: a records-layer function, a store's or a
    library's method (the in-memory index aside; close at shutdown is allowed), the
    recorder's transaction."""
    tree = ast.parse(path.read_text())
    functions, modules = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("monitor.records") \
                and node.module not in ASYNC_RECORDS:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in ASYNC_RECORDS:
                    continue
                if (ROOT / (full.replace(".", "/") + ".py")).exists():
                    modules.add(alias.asname or alias.name)
                elif alias.name[:1].islower() and alias.name not in PURE_RECORDS:
                    functions.add(alias.asname or alias.name)
    found = []
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef)):
        stack = list(fn.body)
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            stack.extend(ast.iter_child_nodes(node))
            if not isinstance(node, ast.Call):
                continue
            f, what = node.func, None
            if isinstance(f, ast.Name) and f.id in functions:
                what = f.id
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in modules:
                what = f"{f.value.id}.{f.attr}"
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Attribute):
                owner = f.value.attr
                if (owner == "store" and f.attr != "close") or (owner == "library" and f.attr != "index") \
                        or (owner == "recorder" and f.attr == "finish"):
                    what = f"{owner}.{f.attr}"
            if what:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} ({fn.name}): {what}()")
    return found


def test_no_store_call_runs_on_the_event_loop():
    """A store call waits on a lock another writer holds (SQLite: up to its busy timeout) or
    on a round trip (PostgreSQL): on the loop it stops every feed, download and request.
    Async code sends them to a thread (asyncio.to_thread)."""
    found = [hit for path in modules().values() if "records" not in path.parts
             for hit in _store_calls_on_the_loop(path)]
    assert not found, "store calls on the event loop:\n" + "\n".join(found)
