"""The attack plugin contract (:class:`Attack`), the context the suite runs attacks in, and the
record every attack in the suite produces (:class:`AttackResult`).

An attack is a class derived from ``Attack[ItsConfig]`` (like a training method), registered
under the entry-point group ``cure_eval.attacks`` (see :mod:`cure_eval.attacks.registry`). It
declares:

* ``name`` (``--attacks`` name), ``label`` (report table), ``norm`` (``"linf"`` or ``"l2"``: the
  ball its points must lie in, radius ``eps`` or ``eps_l2``), ``needs`` (what it needs from the
  model: ``{"gradients"}`` for white-box attacks, empty for gradient-free ones), ``order`` (report
  order) and ``cost`` (cascade order, cheap → expensive), ``extras`` (the names of its per-point
  extra columns), ``Config`` (a dataclass deriving :class:`AttackConfig`);
* :meth:`Attack.run`: given the clean-correct (or, in a cascade, still robust) points, return an
  :class:`AttackOutput`: the adversarial points, per-point extras, seconds.

The suite (:func:`cure_eval.attacks.suite.run_suite`) does the rest for every attack alike:
checks every returned point against the ε-ball and [0, 1], evaluates the model there (robust,
margin, norms) and keeps the worst case. Attacks that share one run (the PGD family: one trajectory
serves PGD(7/20/40/100)) set ``family`` and override :meth:`Attack.run_family`.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.modes import eval_mode
from ..errors import NotApplicable


def adversarial_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The CURE paper's "adversarial loss" (Fig. 7): true logit minus the largest other logit.

    Negative means misclassified. Shape ``(N,)``.
    """
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, labels[:, None], float("-inf"))
    return true - other.max(dim=1).values


def require_input_gradients(model: nn.Module, x: torch.Tensor) -> None:
    """Raise :class:`~cure_eval.errors.NotApplicable` unless the model's logits depend
    differentiably on its input (gradient attacks and curvature need that). One forward pass on
    two points of ``x`` (already on the model's device), eval mode, the caller's mode restored."""
    xb = x[:2].detach().clone().requires_grad_(True)
    with torch.enable_grad(), eval_mode(model):
        out = model(xb)
    if not (isinstance(out, torch.Tensor) and out.requires_grad):
        raise NotApplicable("the model's logits have no gradient with respect to its input (no autograd "
                            "graph): gradient-based attacks and measurements do not apply")


@dataclass
class AttackResult:
    """Per-point outcome of one attack on N points (all tensors on the CPU, length N).

    ``robust`` is what counts for robust accuracy: for fixed-ε attacks it is "still correctly
    classified at the returned point"; for minimal-perturbation attacks (DeepFool) it is
    "clean-correct and minimal perturbation larger than ε". Points that were misclassified
    clean are never attacked and count as non-robust (``attacked`` is False for them).
    """

    name: str
    eps: float
    x_adv: torch.Tensor
    adv_pred: torch.Tensor
    success: torch.Tensor
    robust: torch.Tensor
    margin: torch.Tensor
    linf: torch.Tensor
    l2: torch.Tensor
    attacked: torch.Tensor
    seconds: float = 0.0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    #: ``{"forward", "backward"}`` model passes (batch rows) the attack spent, where counted (the suite's units)
    passes: dict[str, int] | None = None

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust.double().mean()) if len(self.robust) else float("nan")

    @property
    def worst_case_robust(self) -> torch.Tensor:
        """``robust``, and not fooled at the run's best point either (``best_fooled`` extra: an
        earlier PGD iterate the model misclassified). What the worst case counts."""
        best = self.extra.get("best_fooled")
        return self.robust if best is None else self.robust & ~(best == 1)


# --------------------------------------------------------------------------------------------
# The attack plugin contract.
# --------------------------------------------------------------------------------------------
Norm = Literal["linf", "l2"]
#: What an attack needs from the model: ``"gradients"`` (input gradients, white-box).
Need = Literal["gradients"]


@dataclass
class AttackConfig:
    """Settings of one attack; subclasses add their own typed fields (all with defaults)."""


@dataclass
class AttackContext:
    """What every attack runs with: the model (eval mode, on ``device``), batching, the radii and
    the seed. Attacks read their own settings from their config, never from here."""

    model: nn.Module
    device: torch.device
    batch_size: int
    progress: bool
    eps: float
    eps_l2: float
    seed: int
    _fmodel: Any = None

    @property
    def fmodel(self) -> Any:
        """The model as a foolbox ``PyTorchModel`` on ``device``, bounds (0, 1) (made once)."""
        if self._fmodel is None:
            import foolbox

            self._fmodel = foolbox.PyTorchModel(self.model, bounds=(0, 1), device=self.device)
        return self._fmodel

    def radius(self, norm: Norm) -> float:
        return self.eps_l2 if norm == "l2" else self.eps

    def batches(self, n: int) -> Iterator[slice]:
        for s in range(0, n, self.batch_size):
            yield slice(s, min(s + self.batch_size, n))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of CPU points ``x``, batch by batch, on the CPU (float32)."""
        out = []
        with torch.no_grad():
            for sl in self.batches(len(x)):
                out.append(self.model(x[sl].to(self.device)).float().cpu())
        if not out:
            return torch.zeros(0, 0)
        return torch.cat(out)

    def bar(self, name: str, total: int, unit: str = "pt") -> Any:
        return tqdm(total=total, desc=name, unit=unit, disable=not self.progress, leave=False)


@dataclass
class AttackOutput:
    """What :meth:`Attack.run` returns for the ``m`` points it was given.

    ``x_adv``: ``(m, ...)`` adversarial points (CPU). ``extra``: per-point columns of length
    ``m`` named in :attr:`Attack.extras`. ``attacked``: which of the ``m`` points the attack
    speaks for (``None``: all; the PGD family in a cascade drops points an earlier step count
    already fooled). ``seconds``: wall time. ``x_best`` (optional, like ``x_adv``, for the
    attacked points): a point of the same run at least as good for the attacker, e.g. the first
    PGD iterate the model misclassified; the suite checks it like ``x_adv``, evaluates the model
    there and counts it in the worst case only (extra column ``best_fooled``), never in the
    attack's own accuracy.
    """

    x_adv: torch.Tensor
    seconds: float
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    attacked: torch.Tensor | None = None
    x_best: torch.Tensor | None = None


C = TypeVar("C", bound=AttackConfig)


class Attack(ABC, Generic[C]):
    """Base class of an attack plugin (see the module docs for the contract)."""

    name: ClassVar[str]
    label: ClassVar[str] = ""
    description: ClassVar[str] = ""
    norm: ClassVar[Norm] = "linf"
    needs: ClassVar[frozenset[Need]] = frozenset({"gradients"})
    #: report order (built-ins 0-99; third-party attacks default after them)
    order: ClassVar[float] = 100.0
    #: cascade order, cheap → expensive
    cost: ClassVar[float] = 100.0
    #: attacks that share one run (same ``family``): :meth:`run_family` runs them together
    family: ClassVar[str | None] = None
    #: per-point extra columns this attack returns (filled with NaN where it did not attack)
    extras: ClassVar[tuple[str, ...]] = ()
    #: draws from the global RNG (a sharded/resumed audit seeds it per chunk)
    chunk_seeded: ClassVar[bool] = False
    #: a reference evaluation (AutoAttack) that the suite's own worst case is compared with
    reference: ClassVar[bool] = False
    Config: ClassVar[type[AttackConfig]] = AttackConfig

    @classmethod
    def sub_attacks(cls) -> tuple[str, ...]:
        """Names behind the codes of a ``broken_by`` extra column (index → name; empty: none)."""
        return ()

    def __init__(self, config: C | None = None) -> None:
        self.config: C = config if config is not None else self.Config()  # type: ignore[assignment]

    @classmethod
    def display_name(cls) -> str:
        return cls.label or cls.name

    @abstractmethod
    def run(self, ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> AttackOutput:
        """Attack the CPU points ``x`` (labels ``y``, dataset indices ``ids``) at ``ctx.radius(norm)``."""

    @classmethod
    def run_family(
        cls, ctx: AttackContext, members: list[Attack[Any]], x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor,
        *, cascade: bool,
    ) -> dict[str, AttackOutput]:
        """Run every member of this attack's family on the same points (default: one by one)."""
        return {m.name: m.run(ctx, x, y, ids) for m in members}

    def per_sample(self, extra: dict[str, torch.Tensor], idx: torch.Tensor, n: int,
                   correct: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scatter the extras of the attacked points ``idx`` onto all ``n`` points (NaN elsewhere).
        ``correct``: the clean-correct points (an override may fill those it never attacked)."""
        return {k: scatter(n, idx, extra[k] if k in extra else torch.zeros(0), math.nan) for k in self.extras}


def scatter(n: int, idx: torch.Tensor, values: torch.Tensor, fill: float) -> torch.Tensor:
    """A length-``n`` CPU tensor with ``values`` at ``idx`` and ``fill`` elsewhere."""
    out = torch.full((n,), fill, dtype=values.dtype if values.is_floating_point() else torch.float32)
    out[idx] = values.to(out.dtype).cpu()
    return out


def timed(start: float) -> float:
    """Seconds since ``start`` (a :func:`time.perf_counter` value)."""
    return time.perf_counter() - start
