"""The house rules of the package layout, read from the source (every module's AST, imports inside
functions included): no import cycle; only the composition roots (``cli/``, ``daemon/runner.py``)
import the CLI or the configuration's settings; SQL only under ``store/``; one definition of each
region URL, endpoint path, status vocabulary and timestamp helper."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "audience_sync"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> Iterator[str]:
    """The project modules ``name`` imports, anywhere in its body."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, ``level - 1`` packages up
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


GRAPH = {name: set(imports(name)) for name in MODULES}


def importers_of(prefix: str) -> set[str]:
    return {m for m, deps in GRAPH.items() if any(d == prefix or d.startswith(prefix + ".") for d in deps)}


def below(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_graph_is_read() -> None:
    assert "audience_sync.config" in GRAPH["audience_sync.wiring"]
    assert "audience_sync.odp.payloads" in GRAPH["audience_sync.audiences.syncer"]
    assert len(MODULES) > 40


def test_no_import_cycle() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in GRAPH[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert cycles == []


def test_nothing_below_the_cli_imports_it() -> None:
    allowed = {"audience_sync.__main__", "audience_sync.daemon.runner"}
    assert {m for m in importers_of("audience_sync.cli") if not below(m, "audience_sync.cli")} <= allowed


def test_only_the_composition_roots_read_the_settings() -> None:
    readers = importers_of("audience_sync.config")
    domain = ("audience_sync.odp", "audience_sync.realtime", "audience_sync.audiences")
    assert not {m for m in readers if below(m, *domain)}
    roots = {"audience_sync.wiring", "audience_sync.daemon.runner"}
    assert {m for m in readers if not below(m, "audience_sync.cli")} <= roots
    assert {m for m in importers_of("audience_sync.wiring") if not below(m, "audience_sync.cli")} <= roots


SQL = re.compile(
    r"(?<![.\w])(text|select|insert|update|delete)\(|\b(exec_driver_sql|driver_execute|driver_rows|execute)\(|"
    r"\b(SELECT|INSERT INTO|UPDATE \w+ SET|DELETE FROM|CREATE TABLE|DROP TABLE)\b"
)


def test_no_sql_outside_the_store() -> None:
    offenders = []
    for name, path in MODULES.items():
        if below(name, "audience_sync.store"):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if SQL.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
    assert not [m for m in GRAPH if not below(m, "audience_sync.store") and "sqlalchemy" in _external(m)]
    assert all(below(m, "audience_sync.store") for m in importers_of("audience_sync.store.dialect"))


def _external(name: str) -> set[str]:
    """Third-party packages that do queries: ``sqlalchemy`` below ``Engine`` (a type) is allowed."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sqlalchemy":
            if {alias.name for alias in node.names} - {"Engine"}:
                used.add("sqlalchemy")
        elif isinstance(node, ast.Import):
            used |= {alias.name.split(".")[0] for alias in node.names if alias.name.startswith("sqlalchemy")}
    return used


@pytest.mark.parametrize(
    ("pattern", "home"),
    [
        (r"zaius\.app|ocp\.optimizely\.com", "audience_sync/odp/regions.py"),
        (r"[\"'/]batch_(upsert_contact|email_event|custom_event|sync_audience)[\"']", "audience_sync/odp/regions.py"),
        (r"[\"']/twilio_segment|[\"']/auth[\"']", "audience_sync/odp/regions.py"),
        (r"^\s*def (utcnow|iso|parse_iso)\(|datetime\.now\(|isoformat\(timespec", "audience_sync/timestamps.py"),
        (r"[\"'](delivering|retrying)[\"']", None),  # statuses the store never writes
        (r"class \w*Status\(StrEnum\)|class Outcome\(", "audience_sync/statuses.py"),
    ],
)
def test_one_definition(pattern: str, home: str | None) -> None:
    found = {
        str(path.relative_to(ROOT))
        for path in MODULES.values()
        if any(re.search(pattern, line) for line in path.read_text(encoding="utf-8").splitlines())
    }
    assert found == ({home} if home else set())


PURE = (
    "audience_sync.audiences.rules",
    "audience_sync.daemon.slots",
    "audience_sync.odp.payloads",
    "audience_sync.odp.regions",
    "audience_sync.realtime.actions",
    "audience_sync.realtime.fields",
    "audience_sync.realtime.hints",
    "audience_sync.realtime.mapping",
    "audience_sync.realtime.messages",
    "audience_sync.realtime.presets",
    "audience_sync.realtime.routing",
    "audience_sync.realtime.triggers",
    "audience_sync.statuses",
    "audience_sync.timestamps",
)


def third_party(name: str) -> set[str]:
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found - {"audience_sync", "__future__"}


@pytest.mark.parametrize("module", PURE)
def test_the_domain_does_no_io(module: str) -> None:
    """The domain is tested without I/O: neither it nor anything it imports uses a database, HTTP or
    a web framework."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += GRAPH[current]
    io = {"sqlalchemy", "httpx", "starlette", "uvicorn", "psycopg", "alembic", "prometheus_client"}
    assert {m: third_party(m) & io for m in seen if third_party(m) & io} == {}
