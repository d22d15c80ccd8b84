"""The old module paths, kept for one release (removed in 0.3): one alias table and one import hook.

Before the layout of issue 20 the package root held about twenty modules; they moved into folders
(``core/``, ``data/``, ``models/``, ``training/``, ``auditing/``). Code that imports an old path
(``from cure_eval.methods import Method``, ``import cure_eval.io``, ``mock.patch("cure_eval.checkpoint.x")``)
still works: :class:`AliasFinder`, installed on :data:`sys.meta_path` by ``cure_eval/__init__.py``,
answers for the old names in :data:`MOVED` with the new module itself (the same object, so classes
keep ``__module__`` = the new path and pickle by it) and emits one :class:`DeprecationWarning`
naming the new path. The three modules that were split by concern (``audit_state``,
``pipelines.audit``, ``masking.checks``) alias a small re-export module in this folder.

layout_rewrite: skip (``/work/notes/layout_rewrite.py`` rewrites imports to the new homes; it leaves this table alone)
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

#: Old module path -> the module it is now (removed in 0.3).
MOVED: dict[str, str] = {
    # the shared core
    "cure_eval.modes": "cure_eval.core.modes",
    "cure_eval.device": "cure_eval.core.device",
    "cure_eval.io": "cure_eval.core.io",
    "cure_eval.plugins": "cure_eval.core.registry",
    "cure_eval.distributed": "cure_eval.core.distributed",
    "cure_eval._openmp": "cure_eval.core._openmp",
    # data and models
    "cure_eval.synthetic": "cure_eval.data.synthetic",
    "cure_eval.checkpoint": "cure_eval.models.checkpoint",
    "cure_eval.robustbench_models": "cure_eval.models.robustbench",
    # measurement
    "cure_eval.evaluation": "cure_eval.attacks.evaluation",
    # training
    "cure_eval.methods": "cure_eval.training.methods",
    "cure_eval.method_helpers": "cure_eval.training.method_helpers",
    "cure_eval.cure": "cure_eval.training.cure",
    "cure_eval.wci_tracking": "cure_eval.training.wci_tracking",
    "cure_eval.pipelines.train": "cure_eval.training.pipeline",
    # split by concern: a re-export module here names each object's new home
    "cure_eval.audit_state": "cure_eval._compat.audit_state",
    "cure_eval.pipelines.audit": "cure_eval._compat.pipelines_audit",
    "cure_eval.masking.checks": "cure_eval._compat.masking_checks",
}

#: Where the split modules' objects live now (for the warning).
SPLIT_INTO: dict[str, str] = {
    "cure_eval.audit_state": "cure_eval.auditing (shard, fingerprint, store, runner) and cure_eval.attacks.units",
    "cure_eval.pipelines.audit": "cure_eval.auditing (pipeline, options, sources, stages, report)",
    "cure_eval.masking.checks": ("cure_eval.masking.findings, .verdicts, .probes and "
                                 "cure_eval.attacks.trajectory"),
}


def _ours(filename: str) -> bool:
    return filename == __file__ or "importlib" in filename


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points the warning at the importing code, past importlib's frames
    (counted as :func:`warnings.warn` counts: it skips ``importlib._bootstrap`` frames itself)."""
    frame, level = sys._getframe(2), 1  # create_module = level 1; start at its (importlib) caller
    while frame is not None and _ours(frame.f_code.co_filename):
        frame = frame.f_back  # type: ignore[assignment]
        if frame is not None and not ("importlib" in frame.f_code.co_filename
                                      and "_bootstrap" in frame.f_code.co_filename):
            level += 1
    return level


class AliasLoader(importlib.abc.Loader):
    """Loads an old path as the already-imported new module (the same object)."""

    def __init__(self, new: str) -> None:
        self.new = new
        self._spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.new)
        self._spec = module.__spec__
        where = SPLIT_INTO.get(spec.name, self.new)
        warnings.warn(f"{spec.name} is deprecated and removed in 0.3: import from {where}",
                      DeprecationWarning, stacklevel=_caller_stacklevel())
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._spec  # importlib set it to the alias's spec: the module keeps its own


class AliasFinder(importlib.abc.MetaPathFinder):
    """Finds the old paths of :data:`MOVED` (only those; everything else goes to the next finder)."""

    def find_spec(self, fullname: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, AliasLoader(new))


def install() -> None:
    """Put :class:`AliasFinder` on :data:`sys.meta_path` (once)."""
    if not any(isinstance(f, AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(AliasFinder())
