"""The package's import shape: no cycles, CLIs on top, low-level modules at the bottom.

Reads every module of ``cure_eval`` and ``cure_eval_plugins`` (the ``plugins/`` folder) with
:mod:`ast` (nothing is imported), follows every import, also those inside functions (a lazy import
is still a dependency), except those under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"cure_eval": ROOT / "cure_eval", "cure_eval_plugins": ROOT / "plugins"}
#: The command-line modules: they parse arguments, call the library and print.
CLI_MODULES = {"cure_eval.defend", "cure_eval.audit", "cure_eval.reproduce", "cure_eval.cli"}
#: The lowest layer: they import nothing from the package but these.
LOW_LEVEL = {"cure_eval.errors", "cure_eval.modes", "cure_eval.device", "cure_eval.io", "cure_eval.plugins"}
#: Measurement layers below training: they never import the training package (or its old paths).
BELOW_TRAINING = ("cure_eval.attacks", "cure_eval.geometry", "cure_eval.masking", "cure_eval.evaluation",
                  "cure_eval.features")
#: The training package and the thin re-exports at its modules' old paths (removed in 0.3).
TRAINING_PACKAGE = "cure_eval.training"
OLD_TRAINING_PATHS = {"cure_eval.methods": "cure_eval.training.methods",
                      "cure_eval.method_helpers": "cure_eval.training.method_helpers",
                      "cure_eval.cure": "cure_eval.training.cure",
                      "cure_eval.wci_tracking": "cure_eval.training.wci_tracking",
                      "cure_eval.pipelines.train": "cure_eval.training.pipeline"}
#: The training loop and what it imports: no analysis code (measurements are epoch hooks).
LOOP = "cure_eval.training.loop"
ANALYSIS = (*BELOW_TRAINING, "cure_eval.training.wci_tracking", "cure_eval.training.probes",
            "cure_eval.training.cure", *OLD_TRAINING_PATHS)


def _is_training(module: str) -> bool:
    return module == TRAINING_PACKAGE or module.startswith(TRAINING_PACKAGE + ".") or module in OLD_TRAINING_PATHS


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()

    def resolve(mod: str) -> str | None:
        while mod and mod not in known:  # ``pkg.module.attr`` -> ``pkg.module``
            mod = mod.rpartition(".")[0]
        return mod or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (m := resolve(alias.name)) is not None:
                    found.add(m)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:  # ``from . import x`` may name a submodule
                sub = f"{mod}.{alias.name}"
                if sub in known:
                    found.add(sub)
                elif (m := resolve(mod)) is not None:
                    found.add(m)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (c := dfs(v)) is not None:
                return c
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (c := dfs(u)) is not None:
            return c
    return None


def test_the_graph_sees_the_package(graph: dict[str, set[str]]) -> None:
    assert "cure_eval.training" in graph and "cure_eval_plugins.methods.cure" in graph
    assert "cure_eval.modes" in graph["cure_eval.evaluation"]
    assert "cure_eval.training.hooks" in graph[LOOP]


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module that importing ``start`` runs: its imports, recursively, and their packages'
    ``__init__`` modules."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in graph)
        todo.extend(graph.get(m, ()))
    return seen


def test_the_training_loop_imports_no_analysis_code(graph: dict[str, set[str]]) -> None:
    """Per-epoch measurements are epoch hooks passed in by the pipeline: the loop reaches no
    attack, geometry, masking, features, evaluation or WCI code, not even through a package."""
    reached = _reach(graph, LOOP)
    assert "cure_eval.training.methods" in reached and "cure_eval.checkpoint" in reached
    bad = sorted(m for m in reached if m.startswith(ANALYSIS))
    assert not bad, f"the training loop imports analysis code: {bad}"


def test_importing_the_training_loop_loads_no_analysis_code() -> None:
    """The same, at run time: a fresh interpreter that imports the loop has none of it loaded."""
    code = ("import sys, cure_eval.training.loop; "
            f"print('\\n'.join(m for m in sys.modules if m.startswith({ANALYSIS!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "", f"importing the loop loads: {out.stdout.split()}"


def test_old_training_paths_are_thin_re_exports() -> None:
    """``cure_eval.methods`` & co. (the plugins' imports before the training package) re-export
    the very objects of their new homes and hold nothing else."""
    for old, new in OLD_TRAINING_PATHS.items():
        old_mod, new_mod = importlib.import_module(old), importlib.import_module(new)
        assert f"moved to :mod:`{new}`; removed in 0.3" in (old_mod.__doc__ or ""), old
        assert old_mod.__all__, old
        for name in old_mod.__all__:
            assert getattr(old_mod, name) is getattr(new_mod, name), f"{old}.{name}"
        tree = ast.parse(Path(old_mod.__file__ or "").read_text())
        defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert not defs, f"{old} defines {[d.name for d in defs]}: it should only re-export"


def test_plugins_import_the_training_package_not_its_old_paths(graph: dict[str, set[str]]) -> None:
    bad = {f"{m} -> {d}" for m, deps in graph.items() if m.startswith("cure_eval")
           for d in deps if d in OLD_TRAINING_PATHS and m not in OLD_TRAINING_PATHS}
    assert not bad, f"import from the training package, not the old paths: {sorted(bad)}"


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_library_never_imports_a_cli_module(graph: dict[str, set[str]]) -> None:
    bad = {f"{m} -> {d}" for m, deps in graph.items() if m not in CLI_MODULES for d in deps & CLI_MODULES}
    assert not bad, f"library modules import CLI modules: {sorted(bad)}"


def test_low_level_modules_import_only_low_level_ones(graph: dict[str, set[str]]) -> None:
    bad = {f"{m} -> {d}" for m in LOW_LEVEL for d in graph[m] if d not in LOW_LEVEL}
    assert not bad, sorted(bad)


def test_measurements_sit_below_training(graph: dict[str, set[str]]) -> None:
    bad = {f"{m} -> {d}" for m, deps in graph.items() if m.startswith(BELOW_TRAINING) for d in deps if _is_training(d)}
    assert not bad, f"measurement modules import the training layer: {sorted(bad)}"


def test_clis_do_not_import_each_other(graph: dict[str, set[str]]) -> None:
    entry = CLI_MODULES - {"cure_eval.cli"}
    bad = {f"{m} -> {d}" for m in entry for d in graph[m] & entry}
    assert not bad, f"CLI modules import each other (move the shared code into cure_eval.pipelines): {sorted(bad)}"


def test_clis_are_thin() -> None:
    """A CLI parses, calls a pipeline and prints: no pipeline code creeps back in."""
    for name in CLI_MODULES - {"cure_eval.cli"}:
        path = _modules()[name]
        lines = len(path.read_text().splitlines())
        assert lines <= 220, f"{path.name} has {lines} lines: move library code into cure_eval.pipelines"


#: The auditing layer: above measurement, below the audit CLI.
AUDITING = "cure_eval.auditing"
#: Measurement packages: they never import the auditing layer that drives them.
MEASUREMENT = ("cure_eval.attacks", "cure_eval.geometry", "cure_eval.masking", "cure_eval.features",
               "cure_eval.evaluation")
#: Re-export modules kept for one release (removed in 0.3): nothing in the library imports them.
MOVED = {"cure_eval.audit_state", "cure_eval.pipelines.audit", "cure_eval.masking.checks"}
#: Modules of the audit side that the size rule (~450 lines, ~80 lines per function) covers.
AUDIT_SIDE = ("cure_eval.auditing", "cure_eval.masking", "cure_eval.attacks.units", "cure_eval.attacks.suite",
              "cure_eval.attacks.results", "cure_eval.attacks.validity", "cure_eval.attacks.measure",
              "cure_eval.attacks.sweep", "cure_eval.attacks.trajectory", "cure_eval.audit")


def _public_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return {ast.literal_eval(e) for e in node.value.elts}  # type: ignore[attr-defined]
    raise AssertionError(f"{path} has no __all__")


def test_auditing_is_a_layer_above_measurement(graph: dict[str, set[str]]) -> None:
    assert any(m.startswith(AUDITING + ".") for m in graph), "the auditing package is missing"
    below = {f"{m} -> {d}" for m, deps in graph.items() if m.startswith(MEASUREMENT)
             for d in deps if d.startswith(AUDITING)}
    assert not below, f"measurement modules import the auditing layer: {sorted(below)}"
    up = {f"{m} -> {d}" for m, deps in graph.items() if m.startswith(AUDITING)
          for d in deps if d in TRAINING | CLI_MODULES or d.startswith("cure_eval.pipelines")}
    assert not up, f"the auditing layer imports training, pipelines or a CLI: {sorted(up)}"


def test_the_audit_cli_talks_only_to_auditings_public_api() -> None:
    public = _public_names(ROOT / "cure_eval" / "auditing" / "__init__.py")
    tree = ast.parse((ROOT / "cure_eval" / "audit.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and "audit" in node.module:
            assert node.level == 1 and node.module == "auditing", f"the audit CLI imports {node.module}"
            names = {a.name for a in node.names}
            assert names <= public, f"the audit CLI imports non-public names {sorted(names - public)}"


def test_moved_modules_are_only_re_exports(graph: dict[str, set[str]]) -> None:
    users = {f"{m} -> {d}" for m, deps in graph.items() for d in deps & MOVED
             if m not in MOVED and m != "cure_eval.pipelines.reproduce"}  # training side: moves later
    assert not users, f"library modules import a moved module (import its new home): {sorted(users)}"
    for name in MOVED:
        doc = ast.get_docstring(ast.parse(_modules()[name].read_text())) or ""
        assert "moved to" in doc.lower() and "removed in 0.3" in doc, name


def test_the_library_never_imports_the_testing_module(graph: dict[str, set[str]]) -> None:
    bad = sorted(m for m, deps in graph.items() if "cure_eval.testing" in deps and m.startswith("cure_eval."))
    assert not bad, f"library modules import cure_eval.testing: {bad}"


def test_the_audit_side_uses_the_one_figure_constructor() -> None:
    for name, path in _modules().items():
        if not name.startswith(AUDIT_SIDE + ("cure_eval.geometry", "cure_eval.features")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(m.startswith("matplotlib.pyplot") for m in mods), f"{name} imports pyplot"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "use":
                assert not (isinstance(node.func.value, ast.Name) and node.func.value.id == "matplotlib"), name


def _code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function's lines without its docstring."""
    lines = fn.end_lineno - fn.lineno + 1  # type: ignore[operator]
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1  # type: ignore[operator]
    return lines


def test_audit_side_modules_and_functions_are_small() -> None:
    """~450 lines a module and ~80 lines a function (docstrings aside) on the audit side."""
    for name, path in _modules().items():
        if not name.startswith(AUDIT_SIDE):
            continue
        tree = ast.parse(path.read_text())
        assert len(path.read_text().splitlines()) <= 450, f"{name} is over 450 lines: split it by concern"
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                assert _code_lines(fn) <= 80, f"{name}.{fn.name} has {_code_lines(fn)} lines"
