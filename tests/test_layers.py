"""The package's imports point down a declared table of layers, and none goes round in a cycle.

Every ``import`` and ``from … import`` of every file counts, wherever it is written: at the top, inside a function
or a class, under ``try``. Only imports under ``if TYPE_CHECKING:`` are left out: they never run, they name types
for the type checker. A file's own package ``__init__`` (which Python runs before it) is not an edge: only what a
file names is.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "lightning_diffusionblocks"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

#: lowest first; a file may import its own layer and those below. Names are dotted paths inside the package; a
#: subpackage's name covers its files, ``""`` is the package's own ``__init__``.
LAYERS: list[tuple[str, set[str]]] = [
    ("plain data and helpers", {"records", "checkpoints", "files", "memory", "previews", "visualize", "text_metrics",
                                "latents"}),
    ("how a network is cut and run", {"partition", "routing", "schedules", "lora", "precision",
                                      "activation_checkpointing"}),
    ("noise formulations and samplers", {"levels", "noise", "flow", "ddpm", "masking", "conditioning", "sampling"}),
    ("networks, data and tasks", {"models", "data", "tasks"}),
    ("what a run shows on its loggers", {"dashboard"}),
    ("the LightningModule", {"optimisation", "checkpoint_record", "checks", "inference", "module"}),
    ("strategies and checkpoint tools", {"memory_plan", "planning", "strategy", "data_parallel", "block_parallel",
                                         "merge", "export", "pretrained"}),
    ("callbacks", {"callbacks"}),
    ("ready-made settings of the demo and the tests", {"presets"}),
    ("entry points", {"cli", "__main__", ""}),
]

#: parts that work with any task, network and data set (through the module and ``Task``) and so import none of
#: them, although they sit below; ``(importer, imported)`` pairs in ``ALLOWED`` are the interfaces they use
KNOWS_NO_TASK = (
    "dashboard", "optimisation", "checkpoint_record", "checks", "inference", "module", "memory_plan", "planning",
    "strategy", "data_parallel", "block_parallel", "callbacks",
)  # fmt: skip
TASKS_NETWORKS_DATA = ("tasks", "models", "data")
ALLOWED = {("module", "tasks.base"), ("checkpoint_record", "tasks.base"), ("checks", "tasks.base")}


def modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name inside the package -> (file, is a package ``__init__``)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run, at any depth (functions, classes, ``try``), skipping
    ``if TYPE_CHECKING:`` bodies (their ``else`` branch runs and is kept)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                yield from _runtime_imports(ast.Module(body=[child], type_ignores=[]))
        else:
            yield from _runtime_imports(node)


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """importer -> {imported module: line} for imports of the package's own modules."""
    mods = modules(root)

    def resolve(dotted: str) -> str | None:
        """The module that ``dotted`` (inside the package) names: itself, else the longest enclosing module."""
        while dotted not in mods:
            if not dotted:
                return None
            dotted = dotted.rpartition(".")[0]
        return dotted

    graph: dict[str, dict[str, int]] = {}
    for name, (path, is_package) in mods.items():
        edges = graph.setdefault(name, {})
        here = name.split(".") if name else []
        for node in _runtime_imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:  # relative: from the file's package, one level up per extra dot
                    base = [PACKAGE, *(here if is_package else here[:-1])]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join([*base, node.module] if node.module else base)
                else:
                    source = node.module or ""
                targets = [f"{source}.{alias.name}" for alias in node.names]
            for target in targets:
                if target != PACKAGE and not target.startswith(PACKAGE + "."):
                    continue
                found = resolve(target[len(PACKAGE) + 1 :])  # a submodule if the name is one, else its module
                if found is not None and found != name:
                    edges.setdefault(found, node.lineno)
    return graph


def layer_of(name: str) -> int | None:
    for index, (_, members) in enumerate(LAYERS):
        if any(name == m or (m and name.startswith(m + ".")) for m in members):
            return index
    return None


def _display(name: str) -> str:
    return f"{PACKAGE}.{name}" if name else PACKAGE


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_every_module_has_a_layer():
    missing = [_display(name) for name in modules() if layer_of(name) is None]
    assert not missing, f"{missing} belong to no layer: add each to LAYERS in tests/test_layers.py."


def test_imports_form_no_cycle_even_inside_functions():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(_display(n) for n in cycle or [])


def test_imports_point_down_the_layers():
    upward = []
    for importer, edges in import_graph().items():
        for imported, line in edges.items():
            low, high = layer_of(importer), layer_of(imported)
            if low is not None and high is not None and high > low:
                upward.append(
                    f"{_display(importer)}:{line} imports {_display(imported)}"
                    f" ({LAYERS[low][0]!r} is below {LAYERS[high][0]!r})"
                )
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_task_agnostic_parts_import_no_task_network_or_data():
    found = []
    for importer, edges in import_graph().items():
        if not any(importer == p or importer.startswith(p + ".") for p in KNOWS_NO_TASK):
            continue
        for imported, line in edges.items():
            if imported.split(".")[0] in TASKS_NETWORKS_DATA and (importer, imported) not in ALLOWED:
                found.append(f"{_display(importer)}:{line} imports {_display(imported)}")
    assert not found, "these work through the module and Task, with any task or network:\n" + "\n".join(found)


def test_the_graph_sees_imports_inside_functions_and_skips_type_checking_blocks(tmp_path):
    """The scanner itself: a cycle hidden in a function is found, a TYPE_CHECKING-only import is not an edge."""
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .low import x\n")
    (package / "sub" / "low.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..high import y\n"
        "def f():\n    from .. import high\n"
    )
    (package / "high.py").write_text("from lightning_diffusionblocks.sub.low import x\n")
    graph = import_graph(package)
    assert graph["sub.low"] == {"high": 5}
    assert graph["high"] == {"sub.low": 1}
    assert graph["sub"] == {"sub.low": 1}
    assert find_cycle(graph) == ["high", "sub.low", "high"]


def test_the_module_only_wires_and_no_class_changes_at_run_time():
    """The restructure's limits, kept: ``module.py`` holds the Lightning hooks and delegates (at most 400 lines),
    nothing in the package assigns ``__class__``, and tasks are typed without ``type: ignore``."""
    assert len((ROOT / "module.py").read_text().splitlines()) <= 400
    for path, _ in modules().values():
        tree = ast.parse(path.read_text())
        targets = [t for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AugAssign)) for t in
                   (node.targets if isinstance(node, ast.Assign) else [node.target])]  # fmt: skip
        assert not [t for t in targets if isinstance(t, ast.Attribute) and t.attr == "__class__"], path
    for path in (ROOT / "tasks").rglob("*.py"):
        assert "type: ignore" not in path.read_text(), path
