"""The import layering of pipeline/, read from the source with `ast` (nothing is imported or run).

    bottom   config, errors, fsutil, machine, losses, cache_format, rows, runs (and tables, plots when present):
             the shared pieces; they never import a stage
    stages   data, teacher, cache, train, compare, sweep, export, finetune, bench, cli: one command each
    between  the rest (batches, evaluate, generate, models, modelcard, student, ...)

No module but the entry point (`python -m pipeline`) imports cli: it alone sees every stage. There are no import cycles
between the modules (a package such as losses/ or bench/ counts as one module). Every import statement counts, those
inside functions too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
BOTTOM = {
    "config",
    "errors",
    "fsutil",
    "machine",
    "losses",
    "buffers",
    "cache_format",
    "rows",
    "runs",
    "tables",
    "plots",
    "batches",
    "evaluate",
    "drafting",
    "alignment",
    "corpora",
}
STAGES = {
    "data",
    "student_data",
    "student_tokenizers",
    "teacher",
    "cache",
    "train",
    "compare",
    "sweep",
    "export",
    "finetune",
    "bench",
    "docs",
    "cli",
}
ENTRY_POINT = "__main__"  # python -m pipeline: imports cli


def module_of(path: Path, package: Path) -> str:
    """pipeline/losses/base.py -> pipeline.losses.base; a package's __init__.py -> the package."""
    parts = [package.name, *path.relative_to(package).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def component(module: str) -> str:
    """The module's place in the layering: pipeline.losses.base -> losses (a package is one); pipeline -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports_of(path: Path, package: Path) -> list[tuple[str, int]]:
    """(module of the package imported, line) for every import statement of the file, relative ones resolved."""
    name = package.name
    module = module_of(path, package)
    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]  # the importing package
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here[: len(here) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, node.lineno))
            # from pipeline import cache_format: the name may be a module of the package
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return [(target, line) for target, line in found if target == name or target.startswith(name + ".")]


def import_graph(package: Path) -> dict[str, dict[str, list[str]]]:
    """{component: {imported component: ["path:line", ...]}} of every .py file under the package; a component's
    imports of itself left out. Imported names that are not modules (from pipeline.x import f) resolve to x."""
    files = sorted(package.rglob("*.py"))
    known = {module_of(path, package) for path in files}
    graph: dict[str, dict[str, set[str]]] = {}
    for path in files:
        source = component(module_of(path, package))
        edges = graph.setdefault(source, {})
        for target, line in imports_of(path, package):
            while target not in known and "." in target:  # a function or class, not a module: its module
                target = target.rsplit(".", 1)[0]
            target = component(target)
            if target and target != source:
                edges.setdefault(target, set()).add(f"{path.relative_to(package.parent)}:{line}")
    return {source: {target: sorted(where) for target, where in edges.items()} for source, edges in graph.items()}


def layering_problems(package: Path) -> list[str]:
    """Every break of the layering rules, one line each (empty when the layering holds)."""
    graph = import_graph(package)
    problems = []
    for source, edges in sorted(graph.items()):
        for target, where in sorted(edges.items()):
            if source in BOTTOM and target in STAGES:
                problems.append(f"bottom module {source} imports the stage {target} ({', '.join(where)})")
            if target == "cli" and source != ENTRY_POINT:
                problems.append(f"{source or 'the package'} imports cli ({', '.join(where)}); only {ENTRY_POINT} may")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in import_cycles(graph)]
    return problems


def import_cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) through each strongly connected group of components that has one."""
    cycles, done = [], set()
    for start in sorted(graph):
        if start in done:
            continue
        stack, on_path, seen = [(start, iter(sorted(graph.get(start, {}))))], [start], {start}
        while stack:
            node, targets = stack[-1]
            target = next(targets, None)
            if target is None:
                stack.pop()
                on_path.pop()
                done.add(node)
            elif target in on_path:
                cycles.append(on_path[on_path.index(target) :] + [target])
            elif target not in seen and target not in done:
                seen.add(target)
                on_path.append(target)
                stack.append((target, iter(sorted(graph.get(target, {})))))
    unique = {}
    for cycle in cycles:  # the same cycle found from another of its members is reported once
        unique.setdefault(frozenset(cycle), cycle)
    return list(unique.values())


# ---------------------------------------------------------------- the repository


def test_the_scan_sees_the_package():
    graph = import_graph(PACKAGE)
    assert {"config", "errors", "fsutil", "rows", "runs", "cache_format", "losses", "data", "train", "cli"} <= set(
        graph
    )
    assert {"rows", "runs"} <= set(graph["train"])  # imports are found (else every rule would hold vacuously)


def test_the_layering_holds():
    problems = layering_problems(PACKAGE)
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- the checker finds each kind of break


def write_package(root: Path, files: dict[str, str]) -> Path:
    package = root / "pipeline"
    for name, text in {"__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


def test_a_bottom_module_importing_a_stage_is_found(tmp_path):
    package = write_package(
        tmp_path,
        {
            "rows.py": "from pipeline.errors import PipelineError\n",
            "errors.py": "",
            "runs.py": "def f():\n    from pipeline.train import train\n",  # inside a function counts too
            "train.py": "from pipeline.rows import read_meta\n",
            "losses/__init__.py": "from .base import x\n",
            "losses/base.py": "from ..data import load_tokens\n",  # relative, from a package
            "data.py": "",
        },
    )
    problems = layering_problems(package)
    assert len(problems) == 2, problems
    assert problems[0].startswith("bottom module losses imports the stage data (pipeline/losses/base.py:1)")
    assert problems[1].startswith("bottom module runs imports the stage train (pipeline/runs.py:2)")


def test_a_stage_importing_cli_is_found(tmp_path):
    package = write_package(
        tmp_path,
        {
            "cli.py": "def main():\n    from pipeline.train import train\n",
            "train.py": "from pipeline import cli\n",
            "__main__.py": "from pipeline.cli import main\n",
        },
    )
    problems = layering_problems(package)
    assert problems[0] == "train imports cli (pipeline/train.py:1); only __main__ may"
    assert problems[1:] == ["import cycle: cli -> train -> cli"]


def test_an_import_cycle_is_found(tmp_path):
    package = write_package(
        tmp_path,
        {
            "data.py": "from pipeline.teacher import tokenizer_hash\n",
            "teacher.py": "import pipeline.student\n",
            "student.py": "from pipeline import data\n",
            "compare.py": "from pipeline.data import prepare_data\n",
        },
    )
    assert layering_problems(package) == ["import cycle: data -> teacher -> student -> data"]
