"""The package's shape: layers that import only downward, no import cycles, no sys.path edits.

Layers, bottom to top: ttdl.core; ttdl.datasets and ttdl.text (side by side, neither
imports the other); ttdl.jobs; ttdl.report. The contracts live in pyproject.toml
([tool.importlinter]) and are checked here with import-linter; the cycle check below
covers what a siblings contract cannot see (a module and its own package's __init__).
Imports inside functions and under TYPE_CHECKING count like any other.
"""
from __future__ import annotations

import logging
import re

import grimp
import pytest
from importlinter import cli

from conftest import REPO

PACKAGE = "ttdl"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(PACKAGE, cache_dir=None)


def test_import_linter_contracts_are_kept(capsys) -> None:
    # import-linter disables every existing logger; restore them so later caplog-based tests still see records
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    disabled = {lg: lg.disabled for lg in loggers}
    try:
        code = cli.lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True, no_logo=True)
    finally:
        for lg, was in disabled.items():
            lg.disabled = was
    report = capsys.readouterr().out
    assert code == 0, report
    assert re.search(r"Contracts: (\d+) kept, 0 broken", report), report


def test_the_layers_contract_names_every_subpackage(graph) -> None:
    """A new top-level sub-package must be placed in a layer (the contract is exhaustive)."""
    subpackages = {m.removeprefix(f"{PACKAGE}.") for m in graph.find_children(PACKAGE)
                   if graph.find_children(m)}
    assert subpackages == {"core", "datasets", "text", "jobs", "report"}


def strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """Tarjan's algorithm over module -> directly imported ttdl modules: every cycle's members."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(module: str) -> None:  # recursion depth is bounded by the package's ~50 modules
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            components.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return [c for c in components if len(c) > 1]


def test_no_import_cycles_between_modules(graph) -> None:
    cycles = strongly_connected(graph)
    details = []
    for members in cycles:
        for importer in members:
            for imported in sorted(graph.find_modules_directly_imported_by(importer) & set(members)):
                lines = [d["line_number"] for d in graph.get_import_details(importer=importer, imported=imported)]
                details.append(f"{importer} -> {imported} (line {', '.join(map(str, lines))})")
    assert cycles == [], "import cycles:\n" + "\n".join(details)


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for module in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(module)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p")  # through the package's __init__
    graph.add_import(importer="p", imported="p.a")
    graph.add_import(importer="p.c", imported="p.a")
    assert strongly_connected(graph) == [["p", "p.a", "p.b"]]


def test_no_file_edits_sys_path() -> None:
    """The package is installed (editable); scripts, the workflow and the tests import it as such."""
    offenders = []
    for folder in ("scripts", "workflow", "tests"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix in (".py", ".smk") or path.name == "Snakefile":
                text = path.read_text()
                for number, line in enumerate(text.splitlines(), 1):
                    if re.search(r"\bsys\.path\s*(\.\s*(insert|append|extend)|\[|\+?=)", line):
                        offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []
