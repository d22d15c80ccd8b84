"""The package's import shape: no cycles, the layers' folders (CLIs on top, core at the bottom), the
package root, and the old module paths (aliases until 0.3).

layout_rewrite: skip (this file names the old paths on purpose)

Reads every module of ``cure_eval`` and ``cure_eval_plugins`` (the ``plugins/`` folder) with
:mod:`ast` (nothing is imported), follows every import, also those inside functions (a lazy import
is still a dependency), except those under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"cure_eval": ROOT / "cure_eval", "cure_eval_plugins": ROOT / "plugins"}
#: The command-line modules: they parse arguments, call the library and print.
CLI_MODULES = {"cure_eval.defend", "cure_eval.audit", "cure_eval.reproduce", "cure_eval.cli"}
#: The floors, lowest first: a module imports only from its own floor or a lower one.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("cure_eval.errors", "cure_eval.core"),                                              # lowest
    ("cure_eval.data", "cure_eval.models"),                                              # foundations
    ("cure_eval.attacks", "cure_eval.geometry", "cure_eval.masking", "cure_eval.features"),  # measurement
    ("cure_eval.training",),
    ("cure_eval.auditing",),
    ("cure_eval.pipelines",),                                                            # reproduce
    tuple(sorted(CLI_MODULES)),
)
#: The package root: the CLIs and a handful of shared modules; every layer has its folder.
ROOT_MODULES = {"__init__.py", "audit.py", "cli.py", "defend.py", "errors.py", "reproduce.py", "testing.py"}
ROOT_FOLDERS = {"_compat", "attacks", "auditing", "core", "data", "features", "geometry", "masking", "models",
                "pipelines", "training"}
#: The lowest layer: they import nothing from the package but these.
LOW_LEVEL_PREFIXES = FLOORS[0]
#: Measurement layers below training: they never import the training package.
BELOW_TRAINING = FLOORS[2]
TRAINING_PACKAGE = "cure_eval.training"
#: The training loop and what it imports: no analysis code (measurements are epoch hooks).
LOOP = "cure_eval.training.loop"
ANALYSIS = (*BELOW_TRAINING, "cure_eval.training.wci_tracking", "cure_eval.training.probes",
            "cure_eval.training.cure")
#: The alias table of the old module paths (cure_eval/_compat), read without importing the package.
_COMPAT = ROOT / "cure_eval" / "_compat" / "__init__.py"
MOVED: dict[str, str] = next(
    ast.literal_eval(n.value) for n in ast.parse(_COMPAT.read_text()).body  # type: ignore[arg-type]
    if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.target.id == "MOVED")
#: Modules outside the floors: the package's ``__init__`` (installs the aliases, loads the model
#: plugins), the aliases' re-export modules, and the test helpers.
OUTSIDE_FLOORS = ("cure_eval._compat", "cure_eval.testing")


def _is_training(module: str) -> bool:
    return module == TRAINING_PACKAGE or module.startswith(TRAINING_PACKAGE + ".")


def _is_low_level(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in LOW_LEVEL_PREFIXES)


def _floor(module: str) -> int | None:
    for i, prefixes in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


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


def _imports(name: str, path: Path, known: set[str], raw: set[str] | None = None) -> set[str]:
    """The package modules ``name`` imports; ``raw`` (if given) collects every dotted name it
    imports as written (relative ones resolved), ``from a import b`` as ``a`` and ``a.b``."""
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
                if raw is not None:
                    raw.add(alias.name)
                if (m := resolve(alias.name)) is not None:
                    found.add(m)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if raw is not None:
                raw.update([mod, *(f"{mod}.{a.name}" for a in node.names)])
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
    assert "cure_eval.core.modes" in graph["cure_eval.attacks.evaluation"]
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
    assert "cure_eval.training.methods" in reached and "cure_eval.models.checkpoint" in reached
    bad = sorted(m for m in reached if m.startswith(ANALYSIS))
    assert not bad, f"the training loop imports analysis code: {bad}"


def test_importing_the_training_loop_loads_no_analysis_code() -> None:
    """The same, at run time: a fresh interpreter that imports the loop has none of it loaded."""
    code = ("import sys, cure_eval.training.loop; "
            f"print('\\n'.join(m for m in sys.modules if m.startswith({ANALYSIS!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "", f"importing the loop loads: {out.stdout.split()}"


def test_the_package_root_holds_the_clis_and_a_handful_of_shared_modules() -> None:
    root = ROOT / "cure_eval"
    files = {p.name for p in root.iterdir() if p.is_file() and p.suffix == ".py"}
    folders = {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert files == ROOT_MODULES, f"put {sorted(files - ROOT_MODULES)} into a layer's folder"
    assert folders == ROOT_FOLDERS, sorted(folders ^ ROOT_FOLDERS)


def test_every_module_imports_only_its_floor_and_below(graph: dict[str, set[str]]) -> None:
    """errors/core → data/models → measurement → training → auditing → pipelines → CLIs."""
    mods = [m for m in graph if m.startswith("cure_eval.") and not m.startswith(OUTSIDE_FLOORS)]
    unplaced = sorted(m for m in mods if _floor(m) is None)
    assert not unplaced, f"modules in no layer (add their folder to FLOORS): {unplaced}"
    up = sorted(f"{m} -> {d}" for m in mods for d in graph[m]
                if d.startswith("cure_eval.") and not d.startswith(OUTSIDE_FLOORS)
                and (_floor(d) or 0) > (_floor(m) or 0))
    assert not up, f"imports that climb a floor: {up}"


def test_nothing_imports_an_old_path() -> None:
    """The library, the plugins, the tests and the benchmarks import the new homes (the aliases
    are for third-party code): ``/work/notes/layout_rewrite.py`` rewrites old imports."""
    mods = _modules()
    files = dict(mods) | {f"tests.{p.stem}": p for p in (ROOT / "tests").glob("*.py")} | {
        f"benchmarks.{p.stem}": p for p in (ROOT / "benchmarks").glob("*.py")}
    bad: set[str] = set()
    for name, path in files.items():
        if name.startswith("cure_eval._compat") or path == Path(__file__).resolve():
            continue
        raw: set[str] = set()
        _imports(name, path, set(mods), raw)
        bad |= {f"{name} -> {r}" for r in raw if r in MOVED}
    assert not bad, f"import the new module, not the old path: {sorted(bad)}"


_ALIAS_CHECK = """
import importlib, json, pickle, sys, warnings
import cure_eval
from cure_eval._compat import MOVED
out = {}
for old, new in MOVED.items():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        first = importlib.import_module(old)
        again = importlib.import_module(old)
    new_mod = importlib.import_module(new)
    names = getattr(new_mod, "__all__", None) or [n for n in vars(new_mod) if not n.startswith("_")]
    out[old] = {
        "same": first is new_mod and again is new_mod and sys.modules[old] is new_mod,
        "spec": new_mod.__spec__.name, "name": new_mod.__name__,
        "attr": getattr(importlib.import_module(old.rpartition(".")[0]), old.rpartition(".")[2]) is new_mod,
        "names": all(hasattr(first, n) for n in names),
        "warnings": [(str(x.message), x.category.__name__, x.filename) for x in w],
    }
from cure_eval.methods import Method
from cure_eval import checkpoint
from cure_eval.audit_state import pgd_chunk_seed, PGD_SEED_STRIDE
from cure_eval.attacks import chunk_seed
from cure_eval.attacks.units import CHUNK_SEED_STRIDE
import cure_eval.training.methods as tm, cure_eval.models.checkpoint as ck
out["_extra"] = {
    "method": Method is tm.Method and Method.__module__ == "cure_eval.training.methods",
    "pickle": pickle.loads(pickle.dumps(tm.MethodConfig)) is tm.MethodConfig
              and b"cure_eval.training.methods" in pickle.dumps(tm.MethodConfig),
    "checkpoint": checkpoint is ck, "renamed": pgd_chunk_seed is chunk_seed and PGD_SEED_STRIDE == CHUNK_SEED_STRIDE,
}
print(json.dumps(out))
"""


def test_old_paths_are_aliases_of_the_new_modules() -> None:
    """Every old path of ``_compat.MOVED`` imports (in a fresh interpreter), *is* its new module
    (``sys.modules``, the parent's attribute; the module keeps its own ``__spec__``), has the new
    module's public names, warns once (a DeprecationWarning naming the new home, pointing at the
    importing code), and classes keep the new path (``__module__``, pickle)."""
    res = subprocess.run([sys.executable, "-c", _ALIAS_CHECK], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out.pop("_extra") == {"method": True, "pickle": True, "checkpoint": True, "renamed": True}
    assert set(out) == set(MOVED)
    for old, r in out.items():
        new = MOVED[old]
        assert r["same"] and r["attr"] and r["names"], (old, r)
        assert r["spec"] == r["name"] == new, (old, r)
        mine = [w for w in r["warnings"] if old in w[0]]
        assert len(mine) == 1, (old, r["warnings"])
        message, category, filename = mine[0]
        assert category == "DeprecationWarning" and "removed in 0.3" in message, mine
        assert filename == "<string>", f"{old}: the warning points at {filename}, not at the importing code"
        assert new.startswith("cure_eval._compat.") or new in message, message


def test_the_split_modules_only_re_export() -> None:
    """The aliases of the three modules split by concern re-export (``audit_state`` keeps two old
    entry points as small functions over the new API); nothing but the package imports ``_compat``."""
    for path in (ROOT / "cure_eval" / "_compat").glob("*.py"):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        doc = ast.get_docstring(tree) or ""
        assert "moved to" in doc.lower() and "removed in 0.3" in doc, path.name
        defs = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert defs <= {"unit_plan", "run_resumable_suite"}, (path.name, defs)


def test_only_the_package_init_imports_the_aliases(graph: dict[str, set[str]]) -> None:
    users = sorted(m for m, deps in graph.items() if not m.startswith("cure_eval._compat")
                   for d in deps if d.startswith("cure_eval._compat") and m != "cure_eval")
    assert not users, users


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_library_never_imports_a_cli_module(graph: dict[str, set[str]]) -> None:
    bad = {f"{m} -> {d}" for m, deps in graph.items() if m not in CLI_MODULES for d in deps & CLI_MODULES}
    assert not bad, f"library modules import CLI modules: {sorted(bad)}"


def test_low_level_modules_import_only_low_level_ones(graph: dict[str, set[str]]) -> None:
    low = [m for m in graph if _is_low_level(m)]
    assert "cure_eval.core.registry" in low and "cure_eval.errors" in low
    bad = {f"{m} -> {d}" for m in low for d in graph[m] if not _is_low_level(d)}
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
MEASUREMENT = BELOW_TRAINING
#: Modules of the audit side (the one figure constructor rule covers them).
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
          for d in deps if _is_training(d) or d in CLI_MODULES or d.startswith("cure_eval.pipelines")}
    assert not up, f"the auditing layer imports training, pipelines or a CLI: {sorted(up)}"


def test_the_audit_cli_talks_only_to_auditings_public_api() -> None:
    public = _public_names(ROOT / "cure_eval" / "auditing" / "__init__.py")
    tree = ast.parse((ROOT / "cure_eval" / "audit.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and "audit" in node.module:
            assert node.level == 1 and node.module == "auditing", f"the audit CLI imports {node.module}"
            names = {a.name for a in node.names}
            assert names <= public, f"the audit CLI imports non-public names {sorted(names - public)}"


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


def test_modules_and_functions_are_small() -> None:
    """~450 lines a module and ~80 lines a function (docstrings aside), everywhere in ``cure_eval``
    and ``cure_eval_plugins`` (the audit side first had the rule; issue 20 extended it): no exceptions."""
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        assert len(path.read_text().splitlines()) <= 450, f"{name} is over 450 lines: split it by concern"
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                assert _code_lines(fn) <= 80, f"{name}.{fn.name} has {_code_lines(fn)} lines"


def test_no_package_file_is_git_ignored() -> None:
    """A layer folder named like an ignored folder (``data/``) would ship from this checkout but
    never reach git: every module of the package must be committable."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(p.relative_to(ROOT)) for p in (ROOT / "cure_eval").rglob("*.py")]
    res = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert res.stdout.strip() == "", f"git ignores package files: {res.stdout.split()}"
