"""ℓ∞ PGD: :class:`MultiStepPGD` (evaluation: several step counts from one trajectory,
torchattacks-exact) and :func:`pgd_linf` (training: the inner maximisation of PGD-AT and AWP).

They are kept apart on purpose: :class:`MultiStepPGD` does torchattacks' operations in
torchattacks' order (batch-mean loss, ``clamp(δ, -ε, ε)``) so that the audit equals
``torchattacks.PGD`` bit for bit; :func:`pgd_linf` is the training loop's (summed loss, only input
gradients, ``min(max(x, x0 - ε), x0 + ε)``, any ``forward`` such as AWP's functional proxy).
Merging them would change the last bits of either the audit numbers or the training runs.

Projected gradient descent (Madry et al. 2018, https://arxiv.org/abs/1706.06083) with a fixed
step size and a fixed random start is a prefix process: the iterate after ``k`` steps of a
100-step run *is* the result of a ``k``-step run from the same start. :class:`MultiStepPGD`
therefore runs ``max(steps)`` iterations once and records the iterate after every requested step
count, so PGD(7), PGD(20), PGD(40) and PGD(100) cost 100 gradient steps instead of 167.

It is a subclass of :class:`torchattacks.PGD` (torchattacks 3.5.1) and performs exactly the same
operations in the same order: the random start is drawn with
``torch.empty_like(x).uniform_(-eps, eps)`` from the global RNG of the inputs' device, the loss is
the batch-mean cross-entropy and each step is ``x + alpha * sign(grad)`` followed by projection
onto the ε-ball and [0, 1]. After ``torch.manual_seed(s)`` its recorded iterates are bit-identical
to separate ``torchattacks.PGD(model, eps, alpha, steps=k)`` runs after the same
``torch.manual_seed(s)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

from ..core.device import seeded_rng
from ..core.modes import preserved_mode
from ..errors import UsageError
from .base import Attack, AttackConfig, AttackContext, AttackOutput

log = logging.getLogger(__name__)

#: ``forward(inputs) -> logits``: a model, or a functional copy of one.
Forward = Callable[[torch.Tensor], torch.Tensor]

#: Step counts recorded by default: the PGD(7/20/40/100) columns of the CURE paper.
DEFAULT_PGD_STEPS: tuple[int, ...] = (7, 20, 40, 100)


class MultiStepPGD(torchattacks.PGD):
    """ℓ∞ PGD that returns the iterate after each of several step counts from one run.

    Args:
        model: classifier mapping [0, 1] images to logits. torchattacks switches it to eval mode
            during the attack and back to train mode afterwards if it was training.
        eps: ℓ∞ radius in [0, 1] pixel units. Default 8/255.
        alpha: step size in [0, 1] pixel units. Default 2/255 (the CURE paper's evaluation).
        steps: the step counts to record. Default ``(7, 20, 40, 100)``; the attack runs
            ``max(steps)`` iterations.
        random_start: start from a uniform random point of the ε-ball (clipped to [0, 1]), as
            ``torchattacks.PGD`` does. Default True.
        stop_on_success: cascade mode. When True, a point whose recorded iterate at some step
            count ``k`` is misclassified (targeted: classified as the target) stops there: it is
            removed from the batch and its iterate at ``k`` is also returned for every later step
            count. The remaining points follow exactly the trajectory they would follow without
            it, up to floating-point round-off from the smaller batch. Default False.

    Calling the attack, ``attack(images, labels)``, returns ``{k: adversarial images after k
    steps}`` for every requested ``k``. After each call, :attr:`stopped_at` holds per point the
    step count at which it stopped (0: never stopped) and :attr:`checkpoint_seconds` the wall
    time from the start of the call to each recorded step count.

    Best iterate, at no extra cost: every step's forward pass already classifies the current
    iterate. :attr:`first_fooled` holds per point the first iterate ``j`` (0: the random start)
    that the model misclassified (targeted: classified as the target) in those forward passes,
    -1 where none was, and :attr:`first_fooled_images` that iterate (the last iterate where
    none was). Iterate ``j`` is seen by the forward of step ``j + 1``, so a ``k``-step run has
    seen iterates ``0 … k − 1``; the returned iterate ``k`` is for the caller to evaluate.
    torchattacks returns the last iterate only, so a point fooled on the way and pushed back
    out counts as robust there; reading the argmax changes none of its operations.

    Inputs must be in [0, 1] and normalisation must live inside the model:
    :meth:`set_normalization_used` is not supported.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 8 / 255,
        alpha: float = 2 / 255,
        steps: Sequence[int] = DEFAULT_PGD_STEPS,
        random_start: bool = True,
        stop_on_success: bool = False,
    ) -> None:
        counts = sorted({int(s) for s in steps})
        if not counts or counts[0] < 1:
            raise UsageError(f"PGD step counts must be positive integers, got {list(steps)}")
        if not 0.0 < eps <= 1.0:
            raise UsageError(f"PGD eps must be in (0, 1] ([0, 1] pixel units), got {eps}")
        if alpha <= 0.0:
            raise UsageError(f"PGD step size alpha must be positive, got {alpha}")
        super().__init__(model, eps=eps, alpha=alpha, steps=counts[-1], random_start=random_start)
        self.attack = "MultiStepPGD"
        self.step_counts: tuple[int, ...] = tuple(counts)
        self.stop_on_success = stop_on_success
        # Plain object.__setattr__: torchattacks' Attack.__setattr__ walks every assigned value and
        # compares it with ``in``/``==``, which per-call tensors should not go through.
        self.stopped_at: torch.Tensor | None
        self.checkpoint_seconds: dict[int, float]
        self.first_fooled: torch.Tensor | None
        self.first_fooled_images: torch.Tensor | None
        object.__setattr__(self, "stopped_at", None)
        object.__setattr__(self, "checkpoint_seconds", {})
        object.__setattr__(self, "first_fooled", None)
        object.__setattr__(self, "first_fooled_images", None)

    def set_normalization_used(self, mean: Any, std: Any) -> None:
        raise UsageError(
            "MultiStepPGD takes [0, 1] images: put the normalisation inside the model "
            "(cure_eval.models.NormalizedModel) instead of set_normalization_used"
        )

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict[int, torch.Tensor]:  # type: ignore[override]
        """torchattacks' call (eval mode during the attack), restoring the mode even on error."""
        with preserved_mode(self.model), torch.enable_grad():
            result: dict[int, torch.Tensor] = super().__call__(images, labels)
        return result

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[int, torch.Tensor]:  # type: ignore[override]
        """Run ``max(steps)`` PGD iterations; return ``{k: iterate after k steps}``."""
        start = time.perf_counter()
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        target_labels = self.get_target_label(images, labels) if self.targeted else labels
        loss = nn.CrossEntropyLoss()

        adv_images = images.clone().detach()
        if self.random_start:
            # Same call, same order as torchattacks.PGD: keeps the global RNG stream identical.
            adv_images = linf_random_start(adv_images, self.eps)

        wanted = set(self.step_counts)
        record: dict[int, torch.Tensor] = {}
        seconds: dict[int, float] = {}
        object.__setattr__(self, "checkpoint_seconds", seconds)
        stopped_at = torch.zeros(len(images), dtype=torch.long, device=images.device)
        first = torch.full((len(images),), -1, dtype=torch.long, device=images.device)
        first_x = adv_images.detach().clone()
        object.__setattr__(self, "first_fooled", first)
        object.__setattr__(self, "first_fooled_images", first_x)
        if not self.stop_on_success:
            for step in range(1, self.steps + 1):
                prev = adv_images
                adv_images, fooled = self._step(adv_images, images, labels, target_labels, loss)
                _note_fooled(first, first_x, torch.arange(len(images), device=images.device), prev, fooled, step - 1)
                if step in wanted:
                    record[step] = adv_images.detach()
                    seconds[step] = time.perf_counter() - start
            self._finish(stopped_at, first, first_x, adv_images)
            return record

        # Cascade mode: advance only the points not yet fooled at a recorded step count.
        full = adv_images.clone()
        active = torch.arange(len(images), device=images.device)
        cur = adv_images
        for step in range(1, self.steps + 1):
            if len(active):
                prev = cur
                cur, fooled = self._step(cur, images[active], labels[active], target_labels[active], loss)
                _note_fooled(first, first_x, active, prev, fooled, step - 1)
            if step in wanted:
                if len(active):
                    full[active] = cur
                    with torch.no_grad():
                        pred = self.get_logits(cur).argmax(dim=1)
                    done = pred == target_labels[active] if self.targeted else pred != labels[active]
                    stopped_at[active[done]] = step
                    active, cur = active[~done], cur[~done].detach()
                record[step] = full.clone()
                seconds[step] = time.perf_counter() - start
        self._finish(stopped_at, first, first_x, full)
        return record

    def _finish(self, stopped_at: torch.Tensor, first: torch.Tensor, first_x: torch.Tensor,
                last: torch.Tensor) -> None:
        never = first < 0
        first_x[never] = last.detach()[never]
        object.__setattr__(self, "stopped_at", stopped_at.cpu())
        object.__setattr__(self, "first_fooled", first.cpu())
        object.__setattr__(self, "first_fooled_images", first_x)

    def _step(
        self,
        adv_images: torch.Tensor,
        images: torch.Tensor,
        labels: torch.Tensor,
        target_labels: torch.Tensor,
        loss: nn.Module,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One torchattacks.PGD iteration, operation for operation. Returns the next iterate and
        whether the model misclassified the current one (read off the step's own forward)."""
        adv_images.requires_grad = True
        outputs = self.get_logits(adv_images)
        cost = -loss(outputs, target_labels) if self.targeted else loss(outputs, labels)
        grad = torch.autograd.grad(cost, adv_images, retain_graph=False, create_graph=False)[0]
        pred = outputs.detach().argmax(dim=1)
        fooled = pred == target_labels if self.targeted else pred != labels
        return linf_step(adv_images, grad, images, eps=self.eps, alpha=self.alpha), fooled


def _note_fooled(first: torch.Tensor, first_x: torch.Tensor, rows: torch.Tensor, iterate: torch.Tensor,
                 fooled: torch.Tensor, j: int) -> None:
    """Record iterate ``j`` of the points ``rows`` the model misclassified, if it is their first."""
    new = fooled & (first[rows] < 0)
    if bool(new.any()):
        first[rows[new]] = j
        first_x[rows[new]] = iterate.detach()[new]


def pgd_linf(
    model: Forward, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int,
    random_start: bool = True,
) -> torch.Tensor:
    """ℓ∞ PGD on the cross-entropy (Madry et al. 2018), returning detached adversarial inputs.

    Start: ``x + U(-ε, ε)`` clipped to [0, 1] (or ``x``); then ``steps`` times
    ``x ← clip_[0,1](clip_{x0±ε}(x + α·sign ∇ₓ CE))``. Only input gradients are computed
    (``autograd.grad``), so no parameter ``.grad`` is touched. Uses the global RNG of ``x``'s device.
    """
    x0 = x.detach()
    adv = linf_random_start(x0, eps) if random_start else x0.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(adv), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, adv)
        adv = linf_step(adv, grad, x0, eps=eps, alpha=alpha, projection="minmax")
    return adv.detach()


# --------------------------------------------------------------------------------------------
# The PGD core: every ℓ∞ PGD in the package (the suite's MultiStepPGD, the masking check's
# trajectories, the training attacks of pgd_at/awp) starts and steps through these two functions.
# --------------------------------------------------------------------------------------------
def linf_random_start(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``clip_[0,1](x + U(-ε, ε))``, drawn with ``torch.empty_like(x).uniform_`` from the global RNG
    of ``x``'s device (exactly torchattacks.PGD's call, so its RNG stream is reproduced)."""
    return torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), min=0, max=1).detach()


def linf_step(
    x_adv: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor, *, eps: float, alpha: float,
    projection: Literal["torchattacks", "minmax"] = "torchattacks",
) -> torch.Tensor:
    """One ℓ∞ PGD step ``x ← Π(x + α·sign(grad))`` onto the ε-ball around ``x0`` ∩ [0, 1], detached.

    ``projection="torchattacks"``: ``x0 + clamp(x - x0, -ε, ε)`` then [0, 1] (torchattacks.PGD's
    operations: the audit equals it bit for bit). ``"minmax"``: ``min(max(x, x0 - ε), x0 + ε)`` then
    [0, 1] (the training loops'). Both are the same projection; they can differ in the last bit.
    """
    step = x_adv.detach() + alpha * grad.sign()
    if projection == "minmax":
        return torch.min(torch.max(step, x0 - eps), x0 + eps).clamp(0.0, 1.0).detach()
    delta = torch.clamp(step - x0, min=-eps, max=eps)
    return torch.clamp(x0 + delta, min=0, max=1).detach()


# --------------------------------------------------------------------------------------------
# The suite's PGD attacks: pgd7, pgd20, pgd40, pgd100 share one trajectory (family "pgd").
# --------------------------------------------------------------------------------------------
@dataclass
class PGDConfig(AttackConfig):
    """ℓ∞ PGD settings: step ``alpha`` in [0, 1] pixel units (the CURE paper's evaluation: 2/255)."""

    alpha: float = 2 / 255


@dataclass
class PGDRun:
    """What :func:`run_pgd_steps` returns: ``{k: x_adv}``, ``{k: seconds}``, per point the step
    count it stopped at (cascade; 0: never), the first misclassified iterate (-1: none) and that
    iterate's images (see :class:`MultiStepPGD`)."""

    adv: dict[int, torch.Tensor]
    seconds: dict[int, float]
    stopped: torch.Tensor
    first_fooled: torch.Tensor
    first_fooled_images: torch.Tensor


def run_pgd_steps(
    ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, steps: Sequence[int], *, alpha: float,
    stop_on_success: bool,
) -> PGDRun:
    """One :class:`MultiStepPGD` trajectory per batch at ``ctx.eps`` from
    ``torch.manual_seed(ctx.seed)``."""
    counts = sorted(set(steps))
    adv: dict[int, list[torch.Tensor]] = {k: [] for k in counts}
    secs: dict[int, float] = dict.fromkeys(counts, 0.0)
    stopped: list[torch.Tensor] = []
    first: list[torch.Tensor] = []
    first_x: list[torch.Tensor] = []
    attack = MultiStepPGD(ctx.model, eps=ctx.eps, alpha=alpha, steps=counts, stop_on_success=stop_on_success)
    desc = "pgd" + "/".join(str(k) for k in counts)
    with seeded_rng(ctx.seed, ctx.device), ctx.bar(desc, len(x)) as bar:
        for sl in ctx.batches(len(x)):
            rec = attack(x[sl].to(ctx.device), y[sl].to(ctx.device))
            for k in counts:
                adv[k].append(rec[k].cpu())
                secs[k] += attack.checkpoint_seconds[k]
            assert attack.stopped_at is not None and attack.first_fooled is not None
            assert attack.first_fooled_images is not None
            stopped.append(attack.stopped_at)
            first.append(attack.first_fooled)
            first_x.append(attack.first_fooled_images.cpu())
            bar.update(sl.stop - sl.start)
    if not stopped:
        none = torch.zeros(0, dtype=torch.long)
        return PGDRun({k: x.clone() for k in counts}, secs, none, none, x.clone())
    return PGDRun({k: torch.cat(v) for k, v in adv.items()}, secs, torch.cat(stopped), torch.cat(first),
                  torch.cat(first_x))


class PGD(Attack[PGDConfig]):
    """ℓ∞ PGD with ``steps`` iterations, random start, step ``config.alpha`` (Madry et al. 2018,
    https://arxiv.org/abs/1706.06083; torchattacks' operations, see :class:`MultiStepPGD`). All
    requested step counts come from one trajectory; in a cascade a point stops at the first
    recorded step count that fools it. The attack's accuracy is torchattacks' (the last iterate);
    the worst case also counts a point fooled at any earlier iterate (``x_best``, extra
    ``best_fooled``)."""

    Config = PGDConfig
    family = "pgd"
    chunk_seeded = True
    steps: ClassVar[int]
    #: filled by the suite from ``x_best`` (the first misclassified iterate): see AttackOutput
    extras = ("best_fooled",)

    def per_sample(self, extra: dict[str, torch.Tensor], idx: torch.Tensor, n: int,
                   correct: torch.Tensor) -> dict[str, torch.Tensor]:
        """``best_fooled`` is measured by the suite at ``x_best``: NaN until then."""
        return {"best_fooled": torch.full((n,), float("nan"))}

    def run(self, ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> AttackOutput:
        return self.run_family(ctx, [self], x, y, ids, cascade=False)[self.name]

    @classmethod
    def run_family(
        cls, ctx: AttackContext, members: list[Attack[Any]], x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor,
        *, cascade: bool,
    ) -> dict[str, AttackOutput]:
        pgds = [m for m in members if isinstance(m, PGD)]
        alphas = {m.config.alpha for m in pgds}
        if len(pgds) != len(members) or len(alphas) != 1:
            raise UsageError("the PGD attacks of one run share one trajectory: give them one step size alpha")
        run = run_pgd_steps(ctx, x, y, [m.steps for m in pgds], alpha=alphas.pop(), stop_on_success=cascade)
        recs, secs, stopped = run.adv, run.seconds, run.stopped
        out: dict[str, AttackOutput] = {}
        prev = 0
        for m in sorted(pgds, key=lambda a: a.steps):
            still = (stopped == 0) | (stopped >= m.steps)  # not fooled at an earlier checkpoint
            fooled = run.first_fooled >= 0
            if cascade:  # nor, for the worst case, at an iterate an earlier member saw
                still &= ~(fooled & (run.first_fooled < prev))
            prev = m.steps
            seen = fooled & (run.first_fooled < m.steps)  # iterates 0 … k-1
            best = torch.where(seen.view(-1, *([1] * (x.dim() - 1))), run.first_fooled_images, recs[m.steps])
            out[m.name] = AttackOutput(x_adv=recs[m.steps][still], seconds=secs[m.steps], attacked=still,
                                       x_best=best[still])
        return out


class PGD7(PGD):
    name, label, steps, order, cost = "pgd7", "PGD(7)", 7, 1, 3


class PGD20(PGD):
    name, label, steps, order, cost = "pgd20", "PGD(20)", 20, 2, 4


class PGD40(PGD):
    name, label, steps, order, cost = "pgd40", "PGD(40)", 40, 3, 5


class PGD100(PGD):
    name, label, steps, order, cost = "pgd100", "PGD(100)", 100, 4, 6
