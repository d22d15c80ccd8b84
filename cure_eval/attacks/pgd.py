"""PGD with several step counts from one trajectory.

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
from collections.abc import Sequence
from typing import Any

import torch
import torchattacks
from torch import nn

from ..errors import UsageError
from ..modes import preserved_mode

log = logging.getLogger(__name__)

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
        object.__setattr__(self, "stopped_at", None)
        object.__setattr__(self, "checkpoint_seconds", {})

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
            adv_images = adv_images + torch.empty_like(adv_images).uniform_(-self.eps, self.eps)
            adv_images = torch.clamp(adv_images, min=0, max=1).detach()

        wanted = set(self.step_counts)
        record: dict[int, torch.Tensor] = {}
        seconds: dict[int, float] = {}
        object.__setattr__(self, "checkpoint_seconds", seconds)
        stopped_at = torch.zeros(len(images), dtype=torch.long, device=images.device)
        if not self.stop_on_success:
            for step in range(1, self.steps + 1):
                adv_images = self._step(adv_images, images, labels, target_labels, loss)
                if step in wanted:
                    record[step] = adv_images.detach()
                    seconds[step] = time.perf_counter() - start
            object.__setattr__(self, "stopped_at", stopped_at.cpu())
            return record

        # Cascade mode: advance only the points not yet fooled at a recorded step count.
        full = adv_images.clone()
        active = torch.arange(len(images), device=images.device)
        cur = adv_images
        for step in range(1, self.steps + 1):
            if len(active):
                cur = self._step(cur, images[active], labels[active], target_labels[active], loss)
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
        object.__setattr__(self, "stopped_at", stopped_at.cpu())
        return record

    def _step(
        self,
        adv_images: torch.Tensor,
        images: torch.Tensor,
        labels: torch.Tensor,
        target_labels: torch.Tensor,
        loss: nn.Module,
    ) -> torch.Tensor:
        """One torchattacks.PGD iteration, operation for operation."""
        adv_images.requires_grad = True
        outputs = self.get_logits(adv_images)
        cost = -loss(outputs, target_labels) if self.targeted else loss(outputs, labels)
        grad = torch.autograd.grad(cost, adv_images, retain_graph=False, create_graph=False)[0]
        adv_images = adv_images.detach() + self.alpha * grad.sign()
        delta = torch.clamp(adv_images - images, min=-self.eps, max=self.eps)
        return torch.clamp(images + delta, min=0, max=1).detach()
