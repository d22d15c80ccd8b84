"""The CURE regulariser (Moosavi-Dezfooli et al., CVPR 2019, https://arxiv.org/abs/1811.09716, §4).

``L_r = ||∇ℓ(x + h z) − ∇ℓ(x)||²`` with ``z = sign(∇ℓ(x)) / ||sign(∇ℓ(x))||₂`` (per sample,
detached) and ``ℓ`` the per-sample cross-entropy as a function of the [0, 1] input. Both input
gradients are built with ``create_graph=True`` so that ``ℓ + γ L_r`` can be minimised over the
weights (double backprop); without it the regulariser gives the weights no gradient at all.

Units: ``z`` has unit ℓ2 norm, so ``h`` is the ℓ2 length of the finite-difference step in [0, 1]
pixel space. The reference code's ``h = 3`` in CIFAR-normalised units is ``h ≈ 0.6`` here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

BNMode = Literal["train", "eval", "frozen"]


@dataclass
class CureTerms:
    """Outputs of one CURE evaluation on a batch."""

    loss: torch.Tensor  # mean cross-entropy at x (train-mode forward)
    reg: torch.Tensor  # mean over the batch of the per-sample regulariser
    reg_per_sample: torch.Tensor
    logits: torch.Tensor  # logits at x from the loss forward (for accuracy bookkeeping)


_NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm in train mode (batch statistics) without updating the running statistics."""
    saved = []
    for m in model.modules():
        if isinstance(m, _NORM_TYPES) and m.training:
            saved.append((m, m.momentum))
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


@contextlib.contextmanager
def bn_eval(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in eval mode (running statistics); other layers keep their mode."""
    switched = [m for m in model.modules() if isinstance(m, _NORM_TYPES) and m.training]
    for m in switched:
        m.eval()
    try:
        yield
    finally:
        for m in switched:
            m.train()


def input_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, create_graph: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample ``∇ₓ ℓ(x_i, y_i)`` (gradient of the *summed* per-sample loss), the losses, the logits."""
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    logits = model(x)
    loss_vec = F.cross_entropy(logits, y, reduction="none")
    (grad,) = torch.autograd.grad(loss_vec.sum(), x, create_graph=create_graph)
    return grad, loss_vec, logits


def cure_direction(grad: torch.Tensor) -> torch.Tensor:
    """``z = sign(g) / ||sign(g)||₂`` per sample, detached (zero where the gradient is zero)."""
    s = torch.sign(grad.detach())
    norm = s.flatten(1).norm(dim=1).clamp_min(1e-12)
    return s / norm.view(-1, *([1] * (s.dim() - 1)))


def cure_terms(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    h: float,
    squared: bool = True,
    bn_mode: BNMode = "eval",
    create_graph: bool = True,
) -> CureTerms:
    """Cross-entropy and CURE regulariser on a batch, ready for ``(loss + γ reg).backward()``.

    Args:
        model: maps [0, 1] images to logits; used in its current mode for the loss forward.
        x, y: batch of images and labels.
        h: ℓ2 length of the finite-difference step in [0, 1] pixel space.
        squared: penalise ``||Δg||²`` (paper, default) or ``||Δg||`` (reference code).
        bn_mode: BatchNorm in the regulariser passes.
            ``"eval"`` (default): running statistics in the regulariser passes, batch statistics
            for the loss, as the reference code does: a separate forward at ``x``, three forwards.
            ``"train"``: batch statistics everywhere; the loss forward is shared with ``∇ℓ(x)``:
            two forwards per step; the ``x + hz`` pass does not update the running statistics.
            ``"frozen"``: running statistics everywhere and never updated (BatchNorm is a fixed
            affine map, as is common when fine-tuning): two forwards, and the cheapest double
            backward because BatchNorm's second derivative vanishes.
        create_graph: keep the graph of the input gradients (must be True for training; False
            only for measuring).
    """
    if bn_mode not in ("train", "eval", "frozen"):
        raise ValueError(f"bn_mode must be 'train', 'eval' or 'frozen', got {bn_mode!r}")
    x = x.detach().requires_grad_(True)
    if bn_mode in ("train", "frozen"):
        with bn_eval(model) if bn_mode == "frozen" else contextlib.nullcontext():
            grad, loss_vec, logits = input_gradient(model, x, y, create_graph=create_graph)
            z = cure_direction(grad)
            with frozen_bn_stats(model):
                grad_h, _, _ = input_gradient(model, x.detach() + h * z, y, create_graph=create_graph)
    else:
        logits = model(x.detach())  # the loss needs no input gradient
        loss_vec = F.cross_entropy(logits, y, reduction="none")
        with bn_eval(model):
            grad, _, _ = input_gradient(model, x.detach(), y, create_graph=create_graph)
            z = cure_direction(grad)
            grad_h, _, _ = input_gradient(model, x.detach() + h * z, y, create_graph=create_graph)
    diff = (grad_h - grad).flatten(1)
    sq = diff.pow(2).sum(dim=1)
    reg_vec = sq if squared else torch.sqrt(sq + 1e-12)
    return CureTerms(loss=loss_vec.mean(), reg=reg_vec.mean(), reg_per_sample=reg_vec, logits=logits)
