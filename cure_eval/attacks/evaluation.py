"""Quick evaluation used by ``defend``: clean accuracy and torchattacks PGD(k) accuracy."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.device import seeded_rng
from ..core.modes import eval_mode
from .pgd import MultiStepPGD


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Predicted labels for ``x`` (CPU tensor), model in eval mode (the caller's mode is restored)."""
    out = []
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            out.append(model(x[i:i + batch_size].to(device)).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def pgd_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, device: torch.device,
    steps: int = 20, alpha: float = 2 / 255, batch_size: int = 256, seed: int = 0,
    progress: bool = True,
) -> float:
    """Robust accuracy under ``torchattacks.PGD(eps, alpha, steps, random_start=True)`` (run as
    :class:`~cure_eval.attacks.pgd.MultiStepPGD`, its bit-identical subclass).

    The random start is drawn from a forked RNG seeded with ``seed``, so the caller's RNG state is
    untouched and the number is reproducible.
    """
    if eps <= 0:  # nothing to perturb: the clean accuracy
        return int((predict(model, x, device=device, batch_size=batch_size) == y.cpu()).sum()) / max(1, len(x))
    correct = 0
    atk = MultiStepPGD(model, eps=eps, alpha=alpha, steps=[steps], random_start=True)  # = torchattacks.PGD
    with seeded_rng(seed, device):
        for i in tqdm(range(0, len(x), batch_size), desc=f"PGD({steps})", disable=not progress, leave=False):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            adv = atk(xb, yb)[steps]
            correct += int((predict(model, adv, device=device) == yb.cpu()).sum())
    return correct / max(1, len(x))


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, device: torch.device,
    alpha: float = 2 / 255, seed: int = 0, batch_size: int = 256, progress: bool = True,
) -> dict[str, float]:
    """``{"clean_accuracy", "pgd20_accuracy"}`` as fractions in [0, 1] (PGD step ``alpha``)."""
    clean = float((predict(model, x, device=device, batch_size=batch_size) == y).double().mean())
    robust = pgd_accuracy(model, x, y, eps=eps, device=device, steps=20, alpha=alpha, seed=seed,
                          batch_size=batch_size, progress=progress)
    return {"clean_accuracy": clean, "pgd20_accuracy": robust}
