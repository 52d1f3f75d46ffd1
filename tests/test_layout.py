"""The house as README.md draws it: every module named in its Layout, every name a module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO

_SECTION = (REPO / "README.md").read_text().split("## Layout\n", 1)[1].split("\n## ", 1)[0]
# The folders whose every file has a row; a heading may name two of them.
_FOLDERS = (
    "processor",
    "processor/influx",
    "processor/commands",
    "broker",
    "devices",
    "devices/c",
    "devices/c/example",
    "devices/c/tools",
    "harness",
    "bench",
)
_KINDS = (".py", ".lua", ".yaml", ".acl", ".c", ".h")


def _rows_by_folder() -> dict[str, set[str]]:
    rows: dict[str, set[str]] = {}
    for block in _SECTION.split("\n### ")[1:]:
        heading, _, body = block.partition("\n")
        folders = re.findall(r"`([\w/]+)/`", heading)
        for name in re.findall(r"^\| `([\w./]+)` \|", body, re.M):
            folder, _, file = name.rpartition("/")
            rows.setdefault(folder or folders[0], set()).add(file)
    return rows


def _files(folder: str) -> set[str]:
    return {
        p.name for p in (REPO / folder).iterdir() if p.suffix in _KINDS and p.name != "__init__.py"
    }


def test_readme_layout_has_a_row_for_every_module_and_no_row_for_none() -> None:
    rows = _rows_by_folder()
    assert set(rows) == set(_FOLDERS)
    for folder in _FOLDERS:
        assert rows[folder] == _files(folder), folder


def test_every_folder_in_the_tree_is_in_the_readme_layout() -> None:
    top = {
        p.name
        for p in REPO.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name != "test-artifacts"
    }
    named = set(re.findall(r"^\| `(\w+)/` \|", _SECTION, re.M))
    assert top == named


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_data_flows_down_the_house() -> None:
    # devices/ meets the rest only on the wire; the pipeline knows neither the commands nor
    # how the broker is provisioned; cli.py, the entry point, sits above them all.
    rules = {
        "devices": ("processor", "broker", "harness", "bench"),
        "processor": ("processor.commands", "broker", "harness", "bench"),
    }
    for folder, banned in rules.items():
        for path in (REPO / folder).glob("*.py"):
            if path.name == "cli.py":
                continue
            upward = {name for name in _imports(path) if name.startswith(banned)}
            assert not upward, f"{path.relative_to(REPO)} imports {sorted(upward)}"


def test_every_test_the_fault_matrix_names_exists() -> None:
    matrix = (REPO / "docs" / "faults.md").read_text()
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", matrix)
    assert len(named) >= 40
    for path, test in named:
        source = (REPO / "tests" / path).read_text()
        assert re.search(rf"^(async )?def {test}\(", source, re.M), f"{path}::{test} is gone"
