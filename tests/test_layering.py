"""The house's layering, read from the code's own imports: no arrow runs back up, no circle.

Floors, from the ground up: `entraflow/` (settings, keys, the Celery app, the embedded Redis,
templates) and the standalone `sandbox/`; `models/`; `worker/` and `scheduler/`, which never
import each other; `harness/`, which drives a whole local stack; `cli/`, the top floor. Every
import counts, at module level, inside a function or under `TYPE_CHECKING`.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What each package may import from the others; a package always may import itself.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "entraflow": frozenset(),
    "sandbox": frozenset(),
    "models": frozenset({"entraflow"}),
    "worker": frozenset({"entraflow", "models"}),
    "scheduler": frozenset({"entraflow", "models"}),
    "harness": frozenset({"entraflow", "sandbox"}),
    "cli": frozenset({"entraflow", "sandbox", "models", "worker", "scheduler", "harness"}),
}
PACKAGES = frozenset(MAY_IMPORT)
# The floor README's folder table gives each package: each imports only from floors below.
FLOOR = {
    "entraflow": 0,
    "sandbox": 0,
    "models": 1,
    "worker": 2,
    "scheduler": 2,
    "harness": 3,
    "cli": 4,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> Iterator[Path]:
    for package in sorted(PACKAGES):
        yield from sorted((ROOT / package).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module of this project that `path` imports, wherever the import statement stands."""
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            assert node.level == 0, f"{path}: relative import of {node.module}"
            # `from package import module` names a module; `from module import name` does not.
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        imported.update(name for name in names if name.split(".")[0] in PACKAGES)
    return imported


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (only names that are modules of this tree)."""
    files = {module_name(path): path for path in source_files()}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        graph[name] = {target for target in imported_modules(path) if target in files} - {name}
    return graph


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    arrows = []
    for source, targets in graph.items():
        for target in targets:
            source_package, target_package = source.split(".")[0], target.split(".")[0]
            if (
                target_package != source_package
                and target_package not in MAY_IMPORT[source_package]
            ):
                arrows.append(f"{source} -> {target}")
    return sorted(arrows)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = lowlink[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, targets = work[-1]
            for target in targets:
                if target not in index:
                    index[target] = lowlink[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    lowlink[node] = min(lowlink[node], index[target])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    lowlink[parent] = min(lowlink[parent], lowlink[node])
                if lowlink[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        found.append(sorted(group))
    return found


def test_no_import_runs_from_a_lower_floor_to_a_higher_one() -> None:
    assert upward_arrows(import_graph()) == []


def test_no_modules_import_each_other_in_a_circle() -> None:
    assert circles(import_graph()) == []


def test_every_top_level_package_has_a_floor() -> None:
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    assert packages - {"tests", "bench", "chaos"} == PACKAGES


def test_each_package_imports_only_from_floors_below_it() -> None:
    for package, allowed in MAY_IMPORT.items():
        assert all(FLOOR[other] < FLOOR[package] for other in allowed), package


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": set()}, []),
    ],
)
def test_circles_finds_what_it_should(
    graph: dict[str, set[str]], expected: list[list[str]]
) -> None:
    assert circles(graph) == expected


def test_an_arrow_up_is_seen() -> None:
    assert upward_arrows({"models.db": {"worker.graph"}, "worker.graph": set()}) == [
        "models.db -> worker.graph"
    ]


def test_the_readme_folder_table_matches_the_tree() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (\S+) \| ((?:`[a-z]+/`(?:, )?)+) \|", readme, re.MULTILINE)
    floors = {
        folder: floor for floor, folders in rows for folder in re.findall(r"`([a-z]+)/`", folders)
    }
    tree = {path.parent.name for path in ROOT.glob("*/__init__.py")} | {"tests", "docs"}
    assert set(floors) == tree
    assert {folder: int(floors[folder]) for folder in PACKAGES} == FLOOR
