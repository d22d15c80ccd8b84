"""``adv_finetune``: adversarial fine-tuning with ℓ∞-DeepFool, as in the CURE paper §2
(Moosavi-Dezfooli et al., CVPR 2019, https://arxiv.org/abs/1811.09716): "fine-tuning a trained
network with a few extra epochs on adversarial examples", computed with DeepFool
(https://arxiv.org/abs/1511.04599) — the reference point CURE is compared with (Table 1, Fig. 1-3, 9).

Per step: ``foolbox.attacks.LinfDeepFoolAttack`` (steps 50, candidates 10, overshoot 0.02 — the
DeepFool paper's and foolbox's defaults; the CURE paper gives no other value) on the *current*
model in eval mode (BatchNorm running statistics, no parameter gradients), then one
cross-entropy step in train mode on the batch.

Choices (the CURE paper does not state them):

* ``clean_weight = 0``: train on the DeepFool images only, as in the DeepFool paper's
  fine-tuning on the perturbed training set; ``clean_weight = w`` uses
  ``(1 − w)·CE(x_adv) + w·CE(x)``. Points already misclassified are left unperturbed by DeepFool
  (so they are trained on clean).
* ``max_eps = None``: the minimal DeepFool perturbation (times 1.02), unbounded, as DeepFool
  computes it: each step trains on points just past the current decision boundary, which pushes
  it outwards (on digits the mean ℓ∞ size grows from ≈ 0.13 to ≈ 0.2, beyond ε = 0.125). A number
  projects the perturbations onto the ℓ∞ ball of that radius in [0, 1] pixel units (``max_eps=-1``:
  the run's ε). Points DeepFool fails to fool within ``df_steps`` are used as returned.
* optimiser: the CURE fine-tuning recipe (Adam, lr 1e-4 → 1e-6 exponential, batch 128, 20 epochs
  on CIFAR-10 — the paper's Fig. 1 fine-tunes for 20 epochs on CIFAR-10, 10 on SVHN), so that
  ``adv_finetune`` and ``cure`` differ only in the objective; on digits as ``cure``'s digits
  defaults (Adam 1e-3 → 1e-5, batch 64, 10 epochs).

Logged per step: ``loss``, ``adv_acc`` (train-mode accuracy on the DeepFool batch, before the
update), ``df_success`` (fraction of the batch DeepFool fooled or found misclassified) and
``df_linf`` (mean ℓ∞ norm of the training perturbations). Cost: DeepFool runs until every point of
the batch is fooled, with ``candidates − 1`` forward/backward passes per iteration, so a step gets
dearer as the model gets more robust (``candidates`` trades exactness for speed).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import foolbox
import torch
import torch.nn.functional as F
from torch import nn

from cure_eval.attacks.deepfool import foolbox_deepfool
from cure_eval.core.modes import eval_mode
from cure_eval.data import DatasetSpec
from cure_eval.errors import UsageError
from cure_eval.training.methods import Method, MethodConfig, StepStats


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """``requires_grad=False`` on every parameter for the duration (foolbox's gradients call
    ``loss.backward()``, which would otherwise compute and accumulate weight gradients)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def deepfool_linf(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 50, candidates: int = 10,
    overshoot: float = 0.02, max_eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ℓ∞-DeepFool adversarial inputs of ``model`` (in eval mode) and per-point success flags."""
    with eval_mode(model), frozen_parameters(model):
        fmodel = foolbox.PyTorchModel(model, bounds=(0, 1), device=x.device)
        attack = foolbox_deepfool("linf", steps=steps, candidates=candidates, overshoot=overshoot)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            raw, clipped, success = attack(fmodel, x.detach(), y, epsilons=max_eps)
    adv = raw if max_eps is None else clipped
    return adv.detach(), success.detach()


@dataclass
class AdvFinetuneConfig(MethodConfig):
    """Adversarial fine-tuning hyperparameters.

    Attributes:
        overshoot: DeepFool overshoot (DeepFool paper and foolbox: 0.02).
        df_steps: maximum DeepFool iterations (foolbox default 50).
        candidates: classes DeepFool considers (foolbox default 10).
        clean_weight: weight of the clean cross-entropy, ``(1 − w)·CE(adv) + w·CE(clean)`` (0).
        max_eps: ``None`` (default): unbounded minimal perturbations; ``r > 0``: projected onto
            the ℓ∞ ball of radius ``r`` ([0, 1] units); ``-1``: the run's ε.
    """

    overshoot: float = 0.02
    df_steps: int = 50
    candidates: int = 10
    clean_weight: float = 0.0
    max_eps: float | None = None


class AdvFinetuneMethod(Method[AdvFinetuneConfig]):
    name = "adv_finetune"
    description = "adversarial fine-tuning on l-inf DeepFool examples (CURE paper §2)"
    fine_tunes = True
    Config = AdvFinetuneConfig

    @classmethod
    def check(cls, config: AdvFinetuneConfig) -> None:
        """Refuse invalid option values with a one-line :class:`UsageError`."""
        if config.df_steps < 1 or config.candidates < 2:
            raise UsageError(f"df_steps must be >= 1 and candidates >= 2, got {config.df_steps}, {config.candidates}")
        if not 0.0 <= config.clean_weight <= 1.0:
            raise UsageError(f"clean_weight must be in [0, 1], got {config.clean_weight}")
        if config.max_eps is not None and not (config.max_eps > 0 or config.max_eps == -1):
            raise UsageError(f"max_eps must be positive, -1 (the run's ε) or none, got {config.max_eps}")

    @classmethod
    def default_config(cls, spec: DatasetSpec, model_name: str) -> dict[str, Any]:
        if spec.name == "digits":
            # "a few epochs": DeepFool slows down as the model gets robust (≈ 22× a standard epoch
            # at the end on WRN-16-4), so 4 epochs keep the digits reproduction within its budget.
            return {"epochs": 4, "batch_size": 64, "optimizer": "adam", "lr": 1e-3, "lr_final": 1e-5,
                    "lr_schedule": "exponential", "weight_decay": 0.0}
        return {"epochs": 20, "batch_size": 128, "optimizer": "adam", "lr": 1e-4, "lr_final": 1e-6,
                "lr_schedule": "exponential", "weight_decay": 0.0}

    @property
    def max_eps(self) -> float | None:
        c = self.config
        if c.max_eps is None:
            return None
        return self.ctx.eps if c.max_eps == -1 else float(c.max_eps)

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        return deepfool_linf(model, x, y, steps=c.df_steps, candidates=c.candidates, overshoot=c.overshoot,
                             max_eps=self.max_eps)

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        c = self.config
        x_adv, success = self.attack(model, x, y)
        logits_adv = model(x_adv)
        loss = F.cross_entropy(logits_adv, y)
        stats = {"adv_acc": float((logits_adv.argmax(1) == y).float().mean())}
        if c.clean_weight > 0:
            logits = model(x)
            loss = (1 - c.clean_weight) * loss + c.clean_weight * F.cross_entropy(logits, y)
            stats["train_acc"] = float((logits.argmax(1) == y).float().mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        linf = (x_adv - x).flatten(1).abs().amax(1)
        return {"loss": float(loss.detach()), **stats, "df_success": float(success.float().mean()),
                "df_linf": float(linf.mean())}
