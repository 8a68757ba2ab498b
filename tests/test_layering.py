"""The daemon's areas import downwards only, and never in a circle.

Floors, top to bottom (an area may import its own floor and the ones below)::

    cli
    root
    features                      the one list of what the daemon can do
    http, supervisor
    kinds
    observe                       metrics and logs (kinds count through ctx.metrics)
    db, store, lifecycle, errors, config, credentials, batching, backoff, systemd, services

Why a test: an upward import is how cycles start (``http/app.py`` and
``features.py`` used to import each other), and a cycle is how a module ends up
half-initialised at import time. The imports are read with :mod:`ast`, so an
import inside a function or under ``if TYPE_CHECKING:`` counts like any other;
the few exceptions are listed, with their reason, in :data:`ALLOWED_UPWARD`.
An area is the first name under ``nurseryd`` (``kinds/fetch/job.py`` is in
``kinds``); imports within one area are not checked here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "nurseryd"
SOURCE = Path(__file__).resolve().parent.parent / "daemon" / PACKAGE

FLOORS: list[set[str]] = [
    {"cli"},
    {"root", "console"},  # console: the HTTP client; it imports no daemon module
    {"features"},
    {"http", "supervisor"},
    {"kinds"},
    {"observe"},
    {"db", "store", "lifecycle", "errors", "config", "credentials", "batching", "backoff",
     "systemd", "services"},
]
FLOOR = {area: level for level, areas in enumerate(FLOORS) for area in areas}

_TYPE_ONLY = ("Services is the plain record every hook receives; it names the classes of "
              "its fields for annotations only (under TYPE_CHECKING, never executed)")
#: (importing module, imported area) -> (only under TYPE_CHECKING?, why it is allowed).
#: An allowed edge is left out of the cycle check too. Each entry must still be
#: needed, so whoever removes such an import removes its entry as well.
ALLOWED_UPWARD: dict[tuple[str, str], tuple[bool, str]] = {
    ("nurseryd.services", "supervisor"): (True, _TYPE_ONLY),
    ("nurseryd.services", "kinds"): (True, _TYPE_ONLY),
    ("nurseryd.services", "observe"): (True, _TYPE_ONLY),
    ("nurseryd.config", "features"): (
        False, "load_settings() without features= loads the standard ones, for tests and "
        "tools that import it from config; the daemon (cli) passes FEATURES itself"),
}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, root: Path) -> Iterator[tuple[str, int, bool]]:
    """Every ``nurseryd`` module that ``path`` imports: (module, line, type-only?)."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for inner in node.body:
                type_only.update(id(sub) for sub in ast.walk(inner))
    for node in ast.walk(tree):
        guarded = id(node) in type_only
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield alias.name, node.lineno, guarded
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            if target == PACKAGE:  # ``from nurseryd import features``: the names are modules
                for alias in node.names:
                    yield f"{PACKAGE}.{alias.name}", node.lineno, guarded
            else:
                yield target, node.lineno, guarded


def _area(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def find_violations(root: Path = SOURCE) -> list[str]:
    """Upward imports, areas missing from FLOORS, and cycles between areas."""
    problems: list[str] = []
    used_allowances: set[tuple[str, str]] = set()
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        where = path.relative_to(root.parent)
        for target, line, type_only in _imports(path, root):
            source_area, target_area = _area(module), _area(target)
            if not source_area or not target_area or source_area == target_area:
                continue
            unplaced = [area for area in (source_area, target_area) if area not in FLOOR]
            problems.extend(f"{where}:{line}: area {area!r} is on no floor; add it to FLOORS "
                            "in tests/test_layering.py" for area in unplaced)
            if unplaced:
                continue
            allowance = ALLOWED_UPWARD.get((module, target_area))
            if allowance is not None and (type_only or not allowance[0]):
                used_allowances.add((module, target_area))
                continue
            if FLOOR[target_area] < FLOOR[source_area]:
                problems.append(f"{where}:{line}: {module} imports {target}, a floor above "
                                f"{source_area!r}")
            graph.setdefault(source_area, set()).add(target_area)
    if root == SOURCE:
        problems.extend(f"ALLOWED_UPWARD{stale} is no longer needed: remove it"
                        for stale in sorted(set(ALLOWED_UPWARD) - used_allowances))
    problems.extend(f"import cycle between areas: {' -> '.join(cycle)}"
                    for cycle in _cycles(graph))
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each area that is on one (depth-first search)."""
    found: list[list[str]] = []
    seen_in_cycle: set[str] = set()
    for start in sorted(graph):
        if start in seen_in_cycle:
            continue
        stack: list[tuple[str, list[str]]] = [(start, [start])]
        visited: set[str] = set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    found.append([*path, start])
                    seen_in_cycle.update(path)
                    stack.clear()
                    break
                if nxt not in visited:
                    visited.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    return found


def test_areas_import_downwards_and_never_in_a_circle() -> None:
    problems = find_violations()
    assert not problems, "\n".join(problems)


def test_the_checker_sees_relative_lazy_and_type_only_imports(tmp_path: Path) -> None:
    root = tmp_path / PACKAGE
    (root / "kinds").mkdir(parents=True)
    (root / "http").mkdir()
    (root / "__init__.py").write_text("")
    (root / "kinds" / "__init__.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ..http import app\n")
    (root / "kinds" / "job.py").write_text(
        "def run():\n    from .. import features\n")
    (root / "http" / "__init__.py").write_text("")
    (root / "http" / "app.py").write_text("from nurseryd.kinds import job\n")
    (root / "features.py").write_text("from .http import app\n")
    problems = "\n".join(find_violations(root))
    assert "nurseryd.kinds imports nurseryd.http" in problems
    assert "nurseryd.kinds.job imports nurseryd.features" in problems
    assert "import cycle between areas" in problems
