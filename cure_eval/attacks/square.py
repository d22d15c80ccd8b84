"""``square``: the Square Attack (Andriushchenko, Croce, Flammarion and Hein, "Square Attack: a
query-efficient black-box adversarial attack via random search", ECCV 2020,
https://arxiv.org/abs/1912.00049), ℓ∞, untargeted, margin loss: pyautoattack's ``SquareAttack``
configured exactly as AutoAttack's ``standard`` version configures it (``p_init=0.8``, one
restart, ``resc_schedule=False``), with a query budget of our choosing.

Why it is here: it is AutoAttack's gradient-free sub-attack and needs only the model's outputs, so
it is the check that gradient masking cannot hide from (a black-box attack beating the white-box
ones is a warning sign, Carlini et al. 2019). Each query is one forward pass of the points still
robust; it uses no gradients.

Which implementation: the package's own class, so that with ``queries=5000`` on the same batch and
seed it *is* AutoAttack's Square (``tests/test_square.py`` checks bit-equality against the Square
object of ``pyautoattack.AutoAttack(version="standard")``). torchattacks' ``Square`` is a port of
the same code but rescales the ``p`` schedule to the budget by default (``resc_schedule=True``), so
its numbers differ from AutoAttack's. With ``resc_schedule=False`` the schedule does not depend on
the budget, so a run with budget ``q`` is the first ``q`` queries of a longer run from the same
seed: the points it breaks are a subset of those the longer run breaks, which is how the budget
was measured (``docs/attacks.md``).

Caveat (the package's): the square's position is drawn once per iteration for the whole batch, so
a point's result depends on the batch it is in (as in AutoAttack itself). Cost per attacked point:
two clean forwards, at most ``queries + 1`` forwards while it is robust (a point stops as soon as
it is misclassified), one forward of the result; no backward passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.device import seeded_rng
from ..errors import UsageError
from .base import Attack, AttackConfig, AttackContext, AttackOutput, timed

#: AutoAttack's ``standard`` Square budget.
AUTOATTACK_QUERIES = 5000


def make_square(model: nn.Module, *, eps: float, queries: int, seed: int, device: torch.device,
                p_init: float = 0.8, restarts: int = 1) -> Any:
    """pyautoattack's ``SquareAttack`` as AutoAttack configures it, with ``queries`` queries."""
    try:
        from pyautoattack.square import SquareAttack
    except ImportError:
        from .autoattack import INSTALL_HINT

        raise UsageError(f"square needs the pyautoattack package: {INSTALL_HINT}") from None
    return SquareAttack(model, p_init=p_init, n_queries=queries, eps=eps, norm="Linf", n_restarts=restarts,
                        seed=seed, verbose=False, device=device, resc_schedule=False)


@dataclass
class SquareConfig(AttackConfig):
    """Square settings.

    Args:
        queries: queries (forward passes) per point and restart. Default 750, chosen by
            measurement (``docs/attacks.md``); AutoAttack's ``standard``: 5000; the masking
            check's own: :data:`~cure_eval.masking.findings.SQUARE_QUERIES`.
        p_init: initial fraction of pixels in the square. Default 0.8 (AutoAttack's).
        restarts: restarts, each on the points still robust. Default 1.
    """

    queries: int = 750
    p_init: float = 0.8
    restarts: int = 1


class Square(Attack[SquareConfig]):
    """``square``: gradient-free Square Attack (pyautoattack's, AutoAttack's configuration)."""

    name = "square"
    label = "Square"
    description = "gradient-free Square Attack (pyautoattack SquareAttack, AutoAttack's settings)"
    needs = frozenset()
    Config = SquareConfig
    order = 7.4  # report order: after the default suite
    cost = 6.8

    def run(self, ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> AttackOutput:
        cfg = self.config
        if cfg.queries < 1 or cfg.restarts < 1:
            raise UsageError(f"square: queries and restarts must be at least 1, got {cfg.queries} and {cfg.restarts}")
        if not 0.0 < cfg.p_init <= 1.0:
            raise UsageError(f"square: p_init must be in (0, 1], got {cfg.p_init}")
        start = time.perf_counter()
        if len(x) == 0:
            return AttackOutput(x_adv=x.clone(), seconds=timed(start))
        if x.dim() != 4:
            raise UsageError(f"square attacks images (N, C, H, W), got shape {tuple(x.shape)}")
        attack = make_square(ctx.model, eps=ctx.eps, queries=cfg.queries, seed=ctx.seed, device=ctx.device,
                             p_init=cfg.p_init, restarts=cfg.restarts)
        out = []
        with seeded_rng(ctx.seed, ctx.device), ctx.bar(self.name, len(x)) as bar, torch.no_grad():
            for sl in ctx.batches(len(x)):
                out.append(attack.perturb(x[sl].to(ctx.device), y[sl].to(ctx.device)).detach().cpu())
                bar.update(sl.stop - sl.start)
        return AttackOutput(x_adv=torch.cat(out).to(x.dtype), seconds=timed(start))
