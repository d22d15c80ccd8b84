"""CURE's presets against a port of the reference code, in its own (normalised-input) units.

The port below is written from F-Salehi/CURE_robustness, ``CURE/CURE.py`` (``master`` for
``--preset reference`` and ``--preset paper``, branch ``quick_fix`` for ``bn_mode=quick_fix``). It
works on the *normalised* images the reference's data loaders produce, computed here from the
CIFAR-10 constants (not through the project's ``Normalize`` module). Deviations that current PyTorch
forces, and nothing else:

* ``from torch.autograd.gradcheck import zero_gradients`` is gone (PyTorch ≥ 1.9):
  ``zero_gradients(inputs)`` becomes ``inputs.grad = None``.
* ``backward(torch.ones(B))`` / ``autograd.grad(..., grad_outputs=torch.ones(B))`` on a mean-reduced
  (0-dim) loss is a shape error now; on torch 1.0.1 it gave the *summed* per-sample gradient. The
  port uses ``reduction='none'`` (as the ``quick_fix`` branch itself does), where ``ones(B)`` means
  exactly that sum.
* ``.to(self.device)``, the ``CURELearner`` class and its bookkeeping are dropped: one function per
  step, float64 on the CPU.

The paper's regulariser is the reference's with ``||Δg||²`` in place of ``||Δg||`` and γ for λ.
"""

from __future__ import annotations

import copy
from pathlib import Path

import foolbox
import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from cure_eval.data import get_dataset_spec
from cure_eval.errors import UsageError
from cure_eval.models import create_model, model_config_for
from cure_eval.training.cure import cure_terms, pixel_step
from cure_eval.training.methods import get_method

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # the reference code's transforms.Normalize constants
CIFAR_STD = (0.2023, 0.1994, 0.2010)


# --------------------------------------------------------------------------------------------
# The port.
# --------------------------------------------------------------------------------------------
def _find_z(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, h: float) -> torch.Tensor:
    criterion = nn.CrossEntropyLoss(reduction="none")
    inputs.requires_grad_()
    outputs = net.eval()(inputs)  # noqa: F841  (unused in the original too)
    loss_z = criterion(net.eval()(inputs), targets)
    loss_z.backward(torch.ones(targets.size(), dtype=loss_z.dtype))
    grad = inputs.grad.data + 0.0  # type: ignore[union-attr]
    z = torch.sign(grad).detach() + 0.0
    z = 1.0 * h * (z + 1e-7) / (z.reshape(z.size(0), -1).norm(dim=1)[:, None, None, None] + 1e-7)
    inputs.grad = None  # was: zero_gradients(inputs)
    net.zero_grad()
    return z


def reference_regularizer(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, h: float,
                          lambda_: float, squared: bool = False, quick_fix: bool = False) -> torch.Tensor:
    """``CURELearner.regularizer``: ``sum(λ·||Δg_i||) / B`` (``squared``: the paper's ``||Δg_i||²``)."""
    criterion = nn.CrossEntropyLoss(reduction="none")
    z = _find_z(net, inputs, targets, h)
    inputs.requires_grad_()
    mode = net.train if quick_fix else net.eval
    outputs_pos = mode()(inputs + z)
    outputs_orig = mode()(inputs)
    loss_pos = criterion(outputs_pos, targets)
    loss_orig = criterion(outputs_orig, targets)
    grad_diff = torch.autograd.grad((loss_pos - loss_orig), inputs,
                                    grad_outputs=torch.ones(targets.size(), dtype=loss_pos.dtype),
                                    create_graph=True)[0]
    reg = grad_diff.reshape(grad_diff.size(0), -1).norm(dim=1)
    if squared:
        reg = reg**2
    net.zero_grad()
    return torch.sum(lambda_ * reg) / float(inputs.size(0))


def reference_objective(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``CURELearner._train``'s loss for one batch: train-mode CE + the regulariser; (total, reg)."""
    outputs = net.train()(inputs)
    regularizer = reference_regularizer(net, inputs, targets, **kw)  # type: ignore[arg-type]
    neg_log_likelihood = nn.CrossEntropyLoss()(outputs, targets)
    return neg_log_likelihood + regularizer, regularizer


# --------------------------------------------------------------------------------------------
# Same weights, same batch.
# --------------------------------------------------------------------------------------------
def _cifar_batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` of foolbox's real CIFAR-10 test images, in [0, 1], float64."""
    folder = Path(foolbox.__file__).parent / "data"
    files = sorted(folder.glob("cifar10_*.png"))[:n]
    x = np.stack([np.asarray(Image.open(f), dtype=np.float64) / 255.0 for f in files]).transpose(0, 3, 1, 2)
    y = [int(f.stem.split("_")[-1]) for f in files]
    return torch.from_numpy(np.ascontiguousarray(x)), torch.tensor(y)


def _model(name: str, **kwargs: object) -> nn.Module:
    """A CIFAR model with BatchNorm running statistics far from their defaults, float64."""
    spec = get_dataset_spec("cifar10")
    cfg = model_config_for(name, spec)
    cfg.kwargs.update(kwargs)
    torch.manual_seed(0)
    model = create_model(cfg).double()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=gen, dtype=torch.float64))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen, dtype=torch.float64))
    return model.train()


def _normalised(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _compare(model_name: str, preset: str, *, bn_mode: str | None = None, n: int = 4, **model_kw: object) -> dict[str, float]:
    """Relative errors of our ``loss + γ·reg`` (value, regulariser, weight gradient, BN statistics)
    against the port's, with the preset's configuration resolved exactly as ``defend`` does."""
    spec = get_dataset_spec("cifar10")
    cure = get_method("cure")
    overrides = {"bn_mode": bn_mode} if bn_mode else {}
    cfg = cure.make_config(spec, model_config_for(model_name, spec).name, preset=preset, overrides=overrides)
    x, y = _cifar_batch(n)
    ours = _model(model_name, **model_kw)
    theirs = copy.deepcopy(ours)

    terms = cure_terms(ours, x, y, h=cfg.h, squared=cfg.squared, bn_mode=cfg.bn_mode)
    total = terms.loss + cfg.gamma * terms.reg
    params = [p for p in ours.parameters()]
    grads = torch.autograd.grad(total, params)

    net = theirs.model  # the network behind the normalisation: the reference's `net`
    ref_total, ref_reg = reference_objective(net, _normalised(x), y, h=cfg.h, lambda_=cfg.gamma,
                                             squared=cfg.squared, quick_fix=cfg.bn_mode == "quick_fix")
    ref_grads = torch.autograd.grad(ref_total, list(theirs.parameters()))
    flat = torch.cat([g.flatten() for g in grads])
    ref_flat = torch.cat([g.flatten() for g in ref_grads])
    stats = [torch.cat([m.running_mean, m.running_var]) for m in ours.modules() if isinstance(m, nn.BatchNorm2d)]
    ref_stats = [torch.cat([m.running_mean, m.running_var]) for m in theirs.modules() if isinstance(m, nn.BatchNorm2d)]
    return {
        "total": abs(float(total.detach()) - float(ref_total.detach())) / abs(float(ref_total.detach())),
        "reg": abs(float(cfg.gamma * terms.reg.detach()) - float(ref_reg.detach())) / abs(float(ref_reg.detach())),
        "grad": _rel(flat, ref_flat),
        "bn": _rel(torch.cat(stats), torch.cat(ref_stats)),
        "gamma": cfg.gamma, "h": cfg.h, "squared": float(cfg.squared),
        "reg_value": float(ref_reg.detach()),
    }


def test_reference_preset_equals_the_reference_code() -> None:
    """``--preset reference`` on ResNet-18: λ·mean‖Δg‖ with h = 3, λ = 4 in normalised units."""
    r = _compare("resnet18", "reference")
    assert (r["h"], r["gamma"], r["squared"]) == (3.0, 4.0, 0.0)
    assert r["reg_value"] > 1e-3  # a regulariser that matters, not two zeros compared
    assert r["reg"] < 0.01 and r["total"] < 0.01 and r["grad"] < 0.01, r
    assert r["bn"] < 1e-8, r  # one running-statistics update (the loss forward) in both


def test_paper_preset_equals_the_papers_regulariser_resnet18() -> None:
    """``--preset paper`` on ResNet-18: γ·mean‖Δg‖² with γ = 4, h = 3 in the reference's units."""
    r = _compare("resnet18", "paper")
    assert (r["h"], r["gamma"], r["squared"]) == (3.0, 4.0, 1.0)
    assert r["reg_value"] > 1e-7  # small on untrained weights (squared), but not two zeros
    assert r["reg"] < 0.01 and r["total"] < 0.01 and r["grad"] < 0.01, r


@pytest.mark.slow
def test_paper_preset_equals_the_papers_regulariser_wrn28_10() -> None:
    """The same for WRN-28-10 (γ = 8), on two images."""
    r = _compare("wide_resnet", "paper", n=2)
    assert (r["h"], r["gamma"], r["squared"]) == (3.0, 8.0, 1.0)
    assert r["reg"] < 0.01 and r["total"] < 0.01 and r["grad"] < 0.01, r


@pytest.mark.slow
def test_quick_fix_mode_equals_the_quick_fix_branch() -> None:
    """``bn_mode=quick_fix``: eval-mode z, train-mode passes that update the running statistics."""
    r = _compare("resnet18", "reference", bn_mode="quick_fix")
    assert r["reg"] < 0.01 and r["total"] < 0.01 and r["grad"] < 0.01, r
    assert r["bn"] < 1e-8, r  # three running-statistics updates, in the branch's order
    eval_mode = _compare("resnet18", "reference")
    assert abs(r["reg_value"] - eval_mode["reg_value"]) / eval_mode["reg_value"] > 1e-3  # not the same mode


def test_eval_mode_switches_dropout_off_like_the_reference() -> None:
    """With dropout the reference's ``net.eval()`` gives a deterministic regulariser: so do we."""
    r = _compare("resnet18", "reference", drop_rate=0.3)
    assert r["reg"] < 0.01, r
    model = _model("resnet18", drop_rate=0.3)
    x, y = _cifar_batch(4)
    regs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        regs.append(float(cure_terms(copy.deepcopy(model), x, y, h=3.0, squared=False).reg.detach()))
    assert regs[0] == pytest.approx(regs[1], rel=1e-12)


@pytest.mark.parametrize("bn_mode", ["train", "frozen", "quick_fix"])
def test_modes_with_dropout_in_their_passes_refuse_dropout(bn_mode: str) -> None:
    model = _model("resnet18", drop_rate=0.3)
    x, y = _cifar_batch(2)
    with pytest.raises(UsageError, match="dropout"):
        cure_terms(model, x, y, h=3.0, bn_mode=bn_mode)  # type: ignore[arg-type]
    model.eval()  # dropout inactive: nothing to refuse
    cure_terms(model, x, y, h=3.0, bn_mode=bn_mode, create_graph=False)  # type: ignore[arg-type]


def test_pixel_step_is_the_pixel_space_length_of_the_step() -> None:
    model = _model("resnet18")
    x, y = _cifar_batch(2)
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(model.eval()(x), y, reduction="sum"), x)
    s = torch.sign(g)
    z = s / s.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    std = torch.tensor(CIFAR_STD, dtype=torch.float64).view(1, 3, 1, 1)
    lengths = (3.0 * std * z).flatten(1).norm(dim=1)  # u + 3z in [0, 1] space is x + 3·std⊙z
    torch.testing.assert_close(lengths, torch.full_like(lengths, pixel_step(model, 3.0)), rtol=1e-6, atol=0)
    assert pixel_step(model, 3.0) == pytest.approx(0.6, abs=0.005)  # the reference's h = 3 ≈ 0.6
