"""The CURE regulariser (Moosavi-Dezfooli et al., CVPR 2019, https://arxiv.org/abs/1811.09716, §4).

``L_r = ||∇ℓ(u + h z) − ∇ℓ(u)||²`` with ``z = sign(∇ℓ(u)) / ||sign(∇ℓ(u))||₂`` (per sample,
detached) and ``ℓ`` the per-sample cross-entropy. Both input gradients are built with
``create_graph=True`` so that ``ℓ + γ L_r`` can be minimised over the weights (double backprop);
without it the regulariser gives the weights no gradient at all.

**Units.** ``u`` is the *normalised* input, the tensor the network sees after the model's own
normalisation layer (``NormalizedModel.normalize``: ``u = (x − mean) / std``); for a model without
one, ``u`` is the [0, 1] image. This is what the reference code (F-Salehi/CURE_robustness,
``CURE/CURE.py``) differentiates, so ``h`` and ``γ`` mean exactly what they mean there and in the
paper's recipe: ``h = 3`` on CIFAR-10 is the reference code's ``h = 3`` (an ℓ2 step of ≈ 0.6 in
[0, 1] pixel space) and ``γ = 4`` weighs the same ``||Δg||`` the reference's ``λ = 4`` weighs.
Gradients w.r.t. the [0, 1] image are ``1/std`` (≈ 5 on CIFAR) times larger, so a regulariser in
pixel units with the paper's γ would regularise ≈ 5× (unsquared) or ≈ 25× (squared) harder.
:func:`pixel_step` converts ``h`` to an ℓ2 length in [0, 1] space (for the geometry measurements,
which live there).

**BatchNorm and dropout** (``bn_mode``), as the reference code and its later branch do them:

* ``eval`` (default, the reference code ``master``): the loss forward at ``x`` in the model's own
  mode (batch statistics, running statistics updated once); the two regulariser passes with the
  *whole network* in eval mode (running statistics, dropout off: the reference's ``net.eval()``).
  Three forwards per step.
* ``quick_fix`` (the first author's later branch ``quick_fix``, ported exactly): the loss forward
  as above; ``z`` from an eval-mode gradient at ``x``; the two regulariser passes (``x + hz`` then
  ``x``) in train mode, with batch statistics and each updating the running statistics (three
  updates per step). Four forwards per step.
* ``train`` (this project's own variant, in no reference code): batch statistics everywhere; the
  loss forward at ``x`` is shared with ``∇ℓ(x)`` (it alone updates the running statistics), the
  ``x + hz`` pass uses the batch statistics of the perturbed batch without updating the running
  statistics. Two forwards per step.
* ``frozen`` (this project's own variant): running statistics everywhere and never updated
  (BatchNorm a fixed affine map, common when fine-tuning). Two forwards, the cheapest double
  backward.

In ``train``, ``frozen`` and ``quick_fix`` the regulariser passes run with dropout active: the two
gradients would see different dropout masks and the regulariser would measure the masks, not the
curvature, so those modes refuse a model with active dropout (use ``eval``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ..core.modes import eval_mode
from ..errors import UsageError
from ..geometry.summaries import cure_direction  # noqa: F401  (re-exported: z is measured by the geometry too)
from ..models import NormalizedModel

BNMode = Literal["eval", "quick_fix", "train", "frozen"]
BN_MODES: tuple[str, ...] = get_args(BNMode)


@dataclass
class CureTerms:
    """Outputs of one CURE evaluation on a batch."""

    loss: torch.Tensor  # mean cross-entropy at x (the loss forward)
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


def active_dropout(model: nn.Module) -> list[str]:
    """Names of the dropout modules (``nn.Dropout*``, timm's ``DropPath``) active in ``model``.

    Functional dropout inside a ``forward`` (``F.dropout(..., training=self.training)``) is found
    through the module's ``drop_rate`` attribute, the convention of timm and of this project's models.
    """
    found = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        p = getattr(m, "p", None) if isinstance(m, nn.modules.dropout._DropoutNd) else None
        if p is None:
            p = getattr(m, "drop_prob", None) if type(m).__name__ == "DropPath" else None
        if p is None and isinstance(getattr(m, "drop_rate", None), (int, float)):
            p = m.drop_rate
        if p:
            found.append(name or type(m).__name__)
    return found


def split_normalization(model: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module]:
    """``(normalize, network)`` with ``model(x) == network(normalize(x))``.

    A :class:`~cure_eval.models.NormalizedModel` splits into its normalisation and its network;
    any other model is its own network on the [0, 1] image (identity normalisation).
    """
    if isinstance(model, NormalizedModel):
        return model.normalize, model.model
    return (lambda x: x), model


def input_std(model: nn.Module) -> torch.Tensor | None:
    """Per-channel std of the model's normalisation layer, or None when it has none."""
    return model.normalize.std.detach().flatten() if isinstance(model, NormalizedModel) else None


def rms_std(std: Sequence[float]) -> float:
    """Root mean square of per-channel stds: the pixel-space ℓ2 length of a unit CURE step
    ``std⊙z`` (every entry of ``z = sign(g)/||sign(g)||`` nonzero; exact for one channel)."""
    return math.sqrt(sum(float(s) ** 2 for s in std) / len(std))


def pixel_step(model: nn.Module, h: float) -> float:
    """The ℓ2 length in [0, 1] pixel space of a CURE step of length ``h`` in normalised units:
    ``u + h z`` is ``x + h·std⊙z``, of length ``h·rms_std(std)``."""
    std = input_std(model)
    return float(h) if std is None else float(h) * rms_std(std.tolist())


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


def check_bn_mode(model: nn.Module, bn_mode: str) -> None:
    """Refuse an unknown ``bn_mode``, or active dropout in a mode whose passes would sample it."""
    if bn_mode not in BN_MODES:
        raise UsageError(f"bn_mode must be one of {', '.join(BN_MODES)}, got {bn_mode!r}")
    if bn_mode != "eval":
        dropout = active_dropout(model)
        if dropout:
            raise UsageError(
                f"bn_mode={bn_mode} runs the regulariser passes with dropout active ({', '.join(dropout[:3])}): "
                "the two gradients would use different dropout masks; use bn_mode=eval or a model without dropout"
            )


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
        x, y: batch of [0, 1] images and labels.
        h: ℓ2 length of the finite-difference step in *normalised* input units (module docstring).
        squared: penalise ``||Δg||²`` (paper, default) or ``||Δg||`` (reference code).
        bn_mode: BatchNorm and dropout in the regulariser passes: ``eval`` (default), ``quick_fix``,
            ``train`` or ``frozen`` (module docstring).
        create_graph: keep the graph of the input gradients (must be True for training; False
            only for measuring).
    """
    check_bn_mode(model, bn_mode)
    normalize, net = split_normalization(model)
    u = normalize(x.detach()).detach()
    if bn_mode in ("train", "frozen"):
        with bn_eval(net) if bn_mode == "frozen" else contextlib.nullcontext():
            grad, loss_vec, logits = input_gradient(net, u, y, create_graph=create_graph)
            z = cure_direction(grad)
            with frozen_bn_stats(net):
                grad_h, _, _ = input_gradient(net, u + h * z, y, create_graph=create_graph)
        diff = grad_h - grad
    elif bn_mode == "quick_fix":
        logits = net(u)
        loss_vec = F.cross_entropy(logits, y, reduction="none")
        with eval_mode(net):  # the reference's net.eval(): BatchNorm and dropout
            z = cure_direction(input_gradient(net, u, y, create_graph=False)[0])
        u_req = u.clone().requires_grad_(True)
        # The branch: one autograd.grad of (ℓ(x + hz) − ℓ(x)), both passes in train mode.
        pos = F.cross_entropy(net(u_req + h * z), y, reduction="none")
        orig = F.cross_entropy(net(u_req), y, reduction="none")
        (diff,) = torch.autograd.grad((pos - orig).sum(), u_req, create_graph=create_graph)
    else:
        logits = net(u)  # the loss needs no input gradient
        loss_vec = F.cross_entropy(logits, y, reduction="none")
        with eval_mode(net):  # the reference's net.eval(): BatchNorm and dropout
            grad, _, _ = input_gradient(net, u, y, create_graph=create_graph)
            z = cure_direction(grad)
            grad_h, _, _ = input_gradient(net, u + h * z, y, create_graph=create_graph)
        diff = grad_h - grad
    sq = diff.flatten(1).pow(2).sum(dim=1)
    reg_vec = sq if squared else torch.sqrt(sq + 1e-12)
    return CureTerms(loss=loss_vec.mean(), reg=reg_vec.mean(), reg_per_sample=reg_vec, logits=logits)
