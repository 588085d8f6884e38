# What a job runs: the package sources behind each job script, and the GPU-slot prefix.
#
# Snakemake gives shell rules no code-change trigger, so each rule lists the ttdl modules
# its script imports (directly or through other ttdl modules, package __init__ files
# included) as inputs: editing a module reruns exactly the jobs that run it, and nothing
# else (a plotting change never retrains a run). The import graph is read from the files
# themselves once per process, so it cannot drift from the code.
import functools
import os
import re

PACKAGE_DIR = "scripts"  # holds the ttdl package (pyproject.toml's package-dir)
PACKAGE = "ttdl"

# `import a.b as c, d` and `from .x import (y, z)` (parenthesised lists may span lines), at
# any indentation, so lazy imports inside functions count too. A regular expression rather
# than `ast`: parsing the package costs ~0.4 s per planning on a 2-core machine, this ~10 ms.
# It may over-match (an import line quoted in a docstring): that only adds an input.
IMPORT = re.compile(
    r"^[ \t]*(?:from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#;]*)|import[ \t]+([^\n#;]*))", re.M
)


def gpu_job(cmd):
    """The shell command `cmd` run on a GPU slot of its own, holding its job's lock (its log path),
    so an orphan of a killed Snakemake and the rerun's copy never run one job at once
    (see scripts/with_gpu_slot.py)."""
    return f"python scripts/with_gpu_slot.py --job-lock {{log:q}} -- {cmd}"


@functools.cache
def _package_modules():
    """Dotted module name -> source file, for every module of the package."""
    modules = {}
    for folder, dirs, files in os.walk(os.path.join(PACKAGE_DIR, PACKAGE)):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        package = os.path.relpath(folder, PACKAGE_DIR).replace(os.sep, ".")
        for name in files:
            if name.endswith(".py"):
                stem = name[: -len(".py")]
                modules[package if stem == "__init__" else f"{package}.{stem}"] = os.path.join(folder, name)
    return modules


def _imported_names(path, own_package):
    """Dotted names `path` imports (`from a import b` gives a and a.b: b may be a module)."""
    with open(path) as fh:
        text = fh.read()
    names = set()
    for source, imported, plain in IMPORT.findall(text):
        if plain:
            names.update(part.split()[0] for part in plain.split(",") if part.strip())
            continue
        base = source.lstrip(".")
        level = len(source) - len(base)
        if level:  # relative: resolve against the importing module's package
            anchor = own_package.rsplit(".", level - 1)[0] if level > 1 else own_package
            base = f"{anchor}.{base}" if base else anchor
        names.add(base)
        names.update(f"{base}.{part.split()[0]}" for part in imported.strip("()").split(",") if part.split())
    return names


@functools.cache
def _direct_sources(path):
    """The package files that importing (or running) `path` executes first."""
    modules = _package_modules()
    own = next((name for name, file in modules.items() if file == path), None)
    own_package = own if own is None or path.endswith("__init__.py") else own.rpartition(".")[0]
    found = set()
    for name in _imported_names(path, own_package or ""):
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
            source = modules.get(".".join(parts[:depth]))
            if source is not None and source != path:
                found.add(source)
    return frozenset(found)


@functools.cache
def package_sources(script):
    """The ttdl source files `script` runs: its imports, theirs, and so on (sorted paths)."""
    found, todo = set(), [script]
    while todo:
        for source in _direct_sources(todo.pop()) - found:
            found.add(source)
            todo.append(source)
    return sorted(found)
