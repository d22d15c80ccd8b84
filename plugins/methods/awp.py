"""``awp``: adversarial weight perturbation (Wu et al., NeurIPS 2020, https://arxiv.org/abs/2004.05884)
on top of ``pgd_at`` or ``trades`` (``base``), from scratch.

Per step, following the reference code (csdongxian/AWP, ``utils_awp.py``):

1. adversarial inputs ``x'`` of the current weights ``w``: the base method's attack;
2. one ascent step on the base method's training loss ``L(w; x, x', y)`` (PGD-AT: ``CE(f(x'))``;
   TRADES: ``CE(f(x)) + β·KL``) w.r.t. the weights, giving per layer the direction ``d_l = ∇_{W_l} L``;
3. the perturbation ``v_l = γ · ||W_l|| · d_l / ||d_l||`` (Frobenius norms; layer-wise relative
   size γ) of every **conv and linear weight** ``W_l`` (``nn.Linear`` and ``nn.Conv*``; biases,
   BatchNorm and other parameters are not perturbed — the reference perturbs state-dict
   ``*weight`` tensors of ≥ 2 dims);
4. the training loss at ``w + v`` on the same ``x'``, its gradient, weights restored to ``w`` and
   the optimiser step: ``w ← step(w, ∇L(w + v))``.

One extra forward/backward per step over the base method (its ascent step). Logged per step:
the base method's statistics, computed at ``w + v`` (``loss`` is the perturbed training loss),
and ``awp`` (1 when the perturbation was applied, 0 during warm-up).

Choices and how they differ from the reference code:

* the ascent step runs on a functional "proxy" of the model (``torch.func.functional_call`` with
  the model's current weights and *copies* of its buffers) in train mode, like the reference's
  separate proxy network: BatchNorm uses batch statistics and the model's running statistics are
  not touched. Nothing is kept between steps, so there is nothing to checkpoint: resuming is exact.
  The step length of the reference's proxy SGD cancels in ``d_l / ||d_l||`` and is not an option.
* restore is exact: the weights are copied back to ``w`` before ``optimizer.step()``, so the update
  is applied to the unperturbed weights. The reference steps at ``w + v`` and then subtracts
  ``γ·diff`` (equal up to round-off, except that its weight decay acts on ``w + v``).
* ``gamma``: 0.01 with ``base=pgd_at``, 0.005 with ``base=trades`` (the paper's values);
  ``warmup_epochs``: no perturbation in the first epochs — 0 for PGD-AT, 10 for TRADES as in the
  paper (scaled to 1 on digits, whose runs are 15 epochs). Both are ``None`` = that default.

The attack options (``steps``, ``step_size``, ``random_start``, ``attack_bn``; ``beta``,
``init_std`` for TRADES) are passed to the base method; see ``pgd_at`` and ``trades``. Optimiser
defaults are ``standard``'s (as ``pgd_at``); preset ``paper``: the AWP reference runs (SGD lr 0.1,
momentum 0.9, weight decay 5e-4, batch 128, 200 epochs, lr ÷10 at epochs 100 and 150).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from cure_eval_plugins.methods.pgd_at import PGDATConfig, PGDATMethod
from cure_eval_plugins.methods.trades import TradesConfig, TradesMethod
from torch import nn
from torch.func import functional_call
from torch.nn.modules.conv import _ConvNd

from cure_eval.data import DatasetSpec
from cure_eval.errors import UsageError
from cure_eval.training.method_helpers import AttackBN, digits_or_cifar_defaults
from cure_eval.training.methods import Method, MethodConfig, StepStats, TrainContext

#: keeps ``d / ||d||`` finite for an all-zero gradient (the reference code's 1e-20)
_TINY = 1e-20
_BASES: dict[str, tuple[type[Method[Any]], type[MethodConfig]]] = {
    "pgd_at": (PGDATMethod, PGDATConfig),
    "trades": (TradesMethod, TradesConfig),
}
_DEFAULT_GAMMA = {"pgd_at": 0.01, "trades": 0.005}


def perturbed_weight_names(model: nn.Module) -> list[str]:
    """Names (as in ``named_parameters``) of the conv and linear weights AWP perturbs."""
    names = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, _ConvNd)) and isinstance(mod.weight, nn.Parameter) and mod.weight.requires_grad:
            names.append(f"{mod_name}.weight" if mod_name else "weight")
    own = {n for n, _ in model.named_parameters()}  # drops duplicates of tied weights
    return [n for n in dict.fromkeys(names) if n in own]


@dataclass
class AWPConfig(MethodConfig):
    """AWP hyperparameters (plus the base method's attack options).

    Attributes:
        base: ``pgd_at`` (AT-AWP) or ``trades`` (TRADES-AWP).
        gamma: relative size γ of the weight perturbation; ``None``: 0.01 (pgd_at), 0.005 (trades).
        warmup_epochs: epochs trained without AWP first; ``None``: 0 (pgd_at), 10 (trades;
            1 on digits).
        steps, step_size, random_start, attack_bn: the base method's attack (see ``pgd_at``).
        beta, init_std: TRADES only (see ``trades``).
    """

    base: str = "pgd_at"
    gamma: float | None = None
    warmup_epochs: int | None = None
    steps: int = 10
    step_size: float | None = None
    random_start: bool = True
    attack_bn: AttackBN = "eval"
    beta: float = 6.0
    init_std: float = 0.001


class AWPMethod(Method[AWPConfig]):
    name = "awp"
    description = "adversarial weight perturbation on PGD-AT or TRADES, from scratch (Wu et al. 2020)"
    fine_tunes = False
    Config = AWPConfig

    def __init__(self, config: AWPConfig, ctx: TrainContext) -> None:
        super().__init__(config, ctx)
        self.base: PGDATMethod | TradesMethod = self._base_method(config, ctx)
        self.gamma = float(config.gamma if config.gamma is not None else _DEFAULT_GAMMA[config.base])
        if config.warmup_epochs is not None:
            self.warmup = int(config.warmup_epochs)
        else:
            self.warmup = 0 if config.base == "pgd_at" else (1 if ctx.spec.name == "digits" else 10)

    @staticmethod
    def _base_config(config: AWPConfig) -> MethodConfig:
        base_cfg_cls = _BASES[config.base][1]
        return base_cfg_cls(**{k: getattr(config, k) for k in base_cfg_cls.__dataclass_fields__})

    @classmethod
    def _base_method(cls, config: AWPConfig, ctx: TrainContext) -> PGDATMethod | TradesMethod:
        return _BASES[config.base][0](cls._base_config(config), ctx)  # type: ignore[return-value]

    @classmethod
    def check(cls, config: AWPConfig) -> None:
        """Refuse invalid option values with a one-line :class:`UsageError`."""
        if config.base not in _BASES:
            raise UsageError(f"awp base must be one of {', '.join(_BASES)}, got {config.base!r}")
        if config.gamma is not None and config.gamma < 0:
            raise UsageError(f"awp gamma must be >= 0, got {config.gamma}")
        if config.warmup_epochs is not None and config.warmup_epochs < 0:
            raise UsageError(f"awp warmup_epochs must be >= 0, got {config.warmup_epochs}")
        _BASES[config.base][0].check(cls._base_config(config))

    @classmethod
    def default_config(cls, spec: DatasetSpec, model_name: str) -> dict[str, Any]:
        return digits_or_cifar_defaults(spec)

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        # csdongxian/AWP: 200 epochs, SGD 0.1 (momentum 0.9), weight decay 5e-4, lr ÷10 from the
        # 1-based epochs 100 and 150 (0-based milestones 99 and 149), batch 128, PGD-10 step 2/255.
        paper = {"epochs": 200, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False,
                 "weight_decay": 5e-4, "lr_schedule": "step", "lr_milestones": (99, 149)}
        return {"paper": {**paper, "base": "pgd_at"},
                "trades_paper": {**paper, "base": "trades", "beta": 6.0}}

    def start_epoch(self, epoch: int) -> None:
        super().start_epoch(epoch)
        self.base.start_epoch(epoch)

    @property
    def active(self) -> bool:
        return self.gamma > 0 and self.epoch >= self.warmup

    def weight_perturbation(
        self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, names: list[str],
    ) -> list[torch.Tensor]:
        """``v_l = γ ||W_l|| d_l / ||d_l||`` from one ascent step of the base loss on a functional
        proxy (current weights, copied buffers: the model's BatchNorm statistics are untouched)."""
        if not names:
            return []
        wanted = set(names)
        params = {n: p.detach().requires_grad_(n in wanted) for n, p in model.named_parameters()}
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        state = {**params, **buffers}

        def proxy(inputs: torch.Tensor) -> torch.Tensor:
            return functional_call(model, state, (inputs,))

        with torch.enable_grad():
            loss, _ = self.base.objective(proxy, x, x_adv, y)
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        out = []
        for n, g in zip(names, grads, strict=True):
            w = params[n].detach()
            if g is None:
                out.append(torch.zeros_like(w))
            else:
                out.append(self.gamma * w.norm() * g / (g.norm() + _TINY))
        return out

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        x_adv = self.base.attack(model, x, y)
        extra: StepStats = {"awp": float(self.active)}
        weights: list[torch.Tensor] = []
        saved: list[torch.Tensor] = []
        if self.active:
            all_params = dict(model.named_parameters())
            names = perturbed_weight_names(model)
            v = self.weight_perturbation(model, x, x_adv, y, names)
            weights = [all_params[n] for n in names]
            with torch.no_grad():
                for w, vi in zip(weights, v, strict=True):
                    saved.append(w.detach().clone())
                    w.add_(vi)
        try:
            loss, stats = self.base.objective(model, x, x_adv, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        finally:
            with torch.no_grad():
                for w, s in zip(weights, saved, strict=True):
                    w.copy_(s)
        optimizer.step()
        return {**stats, **extra}
