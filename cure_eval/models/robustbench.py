"""RobustBench models for the audit: ``--model robustbench:<name>`` through the official
``robustbench`` package (1.1.1, the optional extra ``pip install "cure-eval[robustbench]"``;
Croce et al., "RobustBench: a standardized adversarial robustness benchmark", NeurIPS 2021
Datasets and Benchmarks, https://arxiv.org/abs/2010.09670).

The model is built and loaded by ``robustbench.utils.load_model`` itself, from ``model_dir`` in
RobustBench's own layout, ``<model_dir>/<dataset>/<threat model>/<name>.pt``. Before calling it
we check what it would otherwise do on its own:

* **No download** unless asked: a missing checkpoint (or a model RobustBench takes from timm's
  hub) is a one-line error naming the file, unless ``download=True`` (``--download``).
* **No unpickling**: RobustBench's checkpoints are torch pickles and ``load_model`` calls
  ``torch.load`` without ``weights_only``, which is ``weights_only=True`` from torch 2.6 on; we
  refuse on an older torch and when ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set, so no
  checkpoint code can run.
* **Its AutoAttack import**: robustbench 1.1.1 declares ``pyautoattack>=0.2.0`` as its AutoAttack
  but imports it as ``autoattack`` (``robustbench/eval.py``, imported by its ``__init__``), the
  import name of the GitHub package, which is not on PyPI; ``pyautoattack`` is imported as
  ``pyautoattack``. As published, ``import robustbench`` therefore fails with "No module named
  'autoattack'". When no ``autoattack`` module exists we register ``pyautoattack`` (the same
  code, the dependency robustbench itself declares) under that name in ``sys.modules`` before
  importing robustbench (:func:`alias_autoattack`).
* **The real package**: the torchattacks 3.5.1 wheel (a core dependency) ships its own, old,
  top-level ``robustbench`` package, at the same paths as the real one. Whichever of the two was
  installed last owns the shared files. We never import ``robustbench`` unless the
  ``robustbench`` distribution is installed *and* every one of its Python files on disk still has
  the hash its ``RECORD`` lists; otherwise a one-line error says how to restore it
  (``pip install --force-reinstall --no-deps robustbench==1.1.1``). So the set-up is correct
  whichever was installed last: either it works, or it says exactly what to run.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import logging
import os
from importlib.metadata import Distribution, distributions
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CureEvalError, UsageError

log = logging.getLogger(__name__)

#: The RobustBench release this loader was written and tested against.
ROBUSTBENCH_VERSION = "1.1.1"
INSTALL_HINT = 'pip install "cure-eval[robustbench]"'
REPAIR_HINT = f"pip install --force-reinstall --no-deps robustbench=={ROBUSTBENCH_VERSION}"
#: ``--model`` prefix that selects a RobustBench model.
PREFIX = "robustbench:"
#: RobustBench's default model folder (``load_model(model_dir='./models')``).
DEFAULT_MODEL_DIR = "models"
#: Leaderboard entries without weights in the model zoo (nothing can load them), from
#: RobustBench's ``model_info/<dataset>/<threat model>/<key>.json`` (checked at commit 2b95e7e).
#: The CURE paper is the one users ask for by name.
LEADERBOARD_ONLY: dict[str, str] = {
    "Moosavi-Dezfooli2019": "the CURE paper (Moosavi-Dezfooli et al., CVPR 2019) is on RobustBench's cifar10/Linf "
                            "leaderboard only (model_info Moosavi-Dezfooli2019Robustness: 83.11 % clean, 38.50 % "
                            "AutoAttack at 8/255), robustbench 1.1.1 has no weights for it",
}
LEADERBOARD_ONLY["Moosavi-Dezfooli2019Robustness"] = LEADERBOARD_ONLY["Moosavi-Dezfooli2019"]


def robustbench_distribution(path: list[str] | None = None) -> Distribution:
    """The installed ``robustbench`` distribution, its files checked against its ``RECORD``.

    ``path``: where to look (default ``sys.path``). Raises :class:`CureEvalError` with one line
    when it is missing or when a file it installed has been overwritten (torchattacks' copy).
    """
    found = list(distributions(name="robustbench", path=path)) if path is not None else list(
        distributions(name="robustbench"))
    if not found:
        raise CureEvalError(f"`model=robustbench:NAME` needs the robustbench package (the optional extra): {INSTALL_HINT}")
    dist = found[0]
    changed = []
    for f in dist.files or []:
        if not (str(f).startswith("robustbench/") and str(f).endswith(".py")) or f.hash is None:
            continue
        try:
            data = Path(str(f.locate())).read_bytes()
        except OSError:
            changed.append(str(f))
            continue
        if f.hash.mode != "sha256":
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        if digest != f.hash.value:
            changed.append(str(f))
    if changed:
        raise CureEvalError(
            f"robustbench {dist.version}'s files were replaced ({changed[0]} and {len(changed) - 1} more), "
            f"most likely by the old robustbench copy inside the torchattacks wheel: {REPAIR_HINT}")
    if dist.version != ROBUSTBENCH_VERSION:
        log.warning("robustbench %s is installed; this loader was tested with %s", dist.version, ROBUSTBENCH_VERSION)
    return dist


def alias_autoattack() -> bool:
    """Make ``import autoattack`` (robustbench 1.1.1's spelling) give ``pyautoattack`` when no
    ``autoattack`` module is installed. Returns True when the alias was set."""
    import importlib
    import importlib.util
    import sys

    if "autoattack" in sys.modules or importlib.util.find_spec("autoattack") is not None:
        return False
    pkg = importlib.import_module("pyautoattack")
    sys.modules["autoattack"] = pkg
    for sub in ("autoattack", "state", "checks", "autopgd_base", "fab_pt", "square", "other_utils"):
        try:
            sys.modules[f"autoattack.{sub}"] = importlib.import_module(f"pyautoattack.{sub}")
        except ImportError:  # pragma: no cover - a module a later pyautoattack may drop
            continue
    log.debug("robustbench imports 'autoattack': aliased to pyautoattack %s", getattr(pkg, "__version__", "?"))
    return True


def _check_safe_torch_load() -> None:
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 6) or os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "") not in ("", "0"):
        raise CureEvalError(
            "RobustBench checkpoints are torch pickles and robustbench loads them with torch.load's default, "
            "which is weights_only=True only from torch 2.6 on: use torch >= 2.6 and unset "
            "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")


def checkpoint_paths(name: str, model_dir: str | Path, dataset: str, threat_model: str, entry: dict[str, Any]) -> list[Path]:
    """Where RobustBench keeps the checkpoint(s) of ``name`` (an ensemble has ``_m<i>.pt`` files)."""
    base = Path(model_dir) / dataset / threat_model / f"{name}.pt"
    ids = entry.get("gdrive_id")
    if isinstance(ids, list):
        return [Path(f"{base}_m{i}.pt") for i in range(len(ids))]
    return [base]


def load_robustbench_model(
    name: str, *, model_dir: str | Path = DEFAULT_MODEL_DIR, dataset: str = "cifar10", threat_model: str = "Linf",
    download: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """The RobustBench model ``name`` ([0, 1] images → logits, eval mode, on the CPU) and a
    description of it. ``dataset`` and ``threat_model`` as RobustBench names them."""
    if name in LEADERBOARD_ONLY:  # before the extra: the answer does not depend on it
        raise UsageError(f"robustbench:{name}: {LEADERBOARD_ONLY[name]}: audit a CURE model of your own with "
                         "`checkpoint` (a model trained with CURE) or name a model-zoo entry")
    dist = robustbench_distribution()
    _check_safe_torch_load()
    alias_autoattack()
    import timm
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    from robustbench.utils import load_model

    try:
        ds = BenchmarkDataset(dataset)
    except ValueError:
        raise UsageError(f"unknown RobustBench dataset {dataset!r}: use "
                         f"{', '.join(d.value for d in BenchmarkDataset)}") from None
    try:
        tm = ThreatModel(threat_model)
    except ValueError:
        raise UsageError(f"unknown RobustBench threat model {threat_model!r}: use "
                         f"{', '.join(t.value for t in ThreatModel)}") from None
    zoo = model_dicts[ds].get(tm, {})
    if name not in zoo:
        close = difflib.get_close_matches(name, list(zoo), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(f"unknown RobustBench model {name!r} for {ds.value}/{tm.value}{hint}: the names are "
                         f"the keys of robustbench.model_zoo.model_dicts, {len(zoo)} here")
    timm_name = f"{name.lower().replace('-', '_')}_{ds.value.lower()}_{tm.value.lower()}"
    if timm.is_model(timm_name) and not download:
        raise CureEvalError(f"RobustBench takes {name} from timm's model hub: pass `download=True` to fetch it")
    paths = checkpoint_paths(name, model_dir, ds.value, tm.value, zoo[name])
    missing = [p for p in paths if not p.is_file()]
    if missing and not download:
        raise CureEvalError(f"no checkpoint {missing[0]}: put RobustBench's checkpoint there "
                            f"(<model_dir>/<dataset>/<threat model>/<name>.pt) or pass `download=True` to fetch it")
    try:
        model = load_model(name, model_dir=str(model_dir), dataset=ds.value, threat_model=tm.value)
    except Exception as exc:  # robustbench raises bare errors (pickling, state-dict keys, network)
        first = (str(exc).splitlines() or [""])[0][:200]
        raise CureEvalError(f"robustbench could not load {name} from {paths[0]}: {type(exc).__name__}: {first}") from None
    desc = {"source": "robustbench", "model": name, "robustbench_dataset": ds.value, "threat_model": tm.value,
            "robustbench": dist.version}
    return model.eval(), desc
