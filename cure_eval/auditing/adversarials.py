"""``--save-adversarials``: each audited point's worst-case adversarial example, kept and shown.

``adversarials.safetensors`` (beside ``per_sample.csv``), written atomically, holds per point:

* ``x_adv`` ``(N, C, H, W)`` float32 in [0, 1]: the point that broke it, from the first attack of
  the worst case (run order) whose returned point is misclassified; where no attack broke it, the
  attacked point with the lowest adversarial margin (the strongest loss, true logit minus largest
  other); a point misclassified clean keeps its clean image;
* ``index`` (dataset index), ``label``, ``adv_pred`` (the prediction the audit recorded at
  ``x_adv``) int64;
* ``attack`` int64: position of the chosen attack in the metadata's ``attacks`` list (-1: clean).

Metadata (strings): ``format``, ``eps`` (ℓ∞ radius), ``units`` (``"[0, 1]"``), ``attacks`` (JSON
list). ``adversarials.png``: clean / adversarial / amplified difference for a few broken points.

Only attacks whose returned images the audit holds are used (the file store keeps them beside the
state when the option is on, :class:`~cure_eval.auditing.store.AuditState`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..attacks import SuiteResult, get_attack
from ..core.io import atomic_write, new_figure, save_figure
from ..errors import CureEvalError

log = logging.getLogger("cure_eval.audit")

#: File names the option writes into the audit folder.
ADVERSARIALS_FILE = "adversarials.safetensors"
ADVERSARIALS_FIGURE = "adversarials.png"
#: Format tag of the safetensors metadata.
ADVERSARIALS_FORMAT = "cure_eval.adversarials/1"
#: Tolerance on a returned point's distance to the ε-ball (float32 rounding).
TOL = 1e-6


def worst_case_adversarials(suite: SuiteResult, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per point the worst-case adversarial example and where it came from (see the module docs)."""
    x = x.detach().cpu().float()
    n = suite.n
    names = [a for a in suite.worst_case_attacks if suite.attacks[a].x_adv.shape[1:] == x.shape[1:]]
    if not names:
        raise CureEvalError("the audit holds no adversarial images of its attacks: run it again with "
                            "save_adversarials=True and restart=True")
    x_adv = x.clone()
    adv_pred = suite.clean_pred.clone().long()
    code = torch.full((n,), -1, dtype=torch.long)
    best = torch.full((n,), float("inf"), dtype=torch.float64)
    broken = torch.zeros(n, dtype=torch.bool)
    for k, a in enumerate(names):
        res = suite.attacks[a]
        inside = res.linf <= suite.eps + TOL
        fooled = res.attacked & res.success & inside & ~broken
        stronger = res.attacked & inside & ~broken & ~fooled & (res.margin.double() < best)
        take = fooled | stronger
        x_adv[take] = res.x_adv[take].float()
        adv_pred[take] = res.adv_pred[take].long()
        code[take] = k
        best[take] = res.margin.double()[take]
        broken |= fooled
    return {"x_adv": x_adv.contiguous(), "index": suite.indices.long().contiguous(),
            "label": suite.labels.long().contiguous(), "adv_pred": adv_pred.contiguous(), "attack": code}


def write_adversarials(out: Path, suite: SuiteResult, x: torch.Tensor, *, most: int = 8) -> dict[str, Any]:
    """Write ``adversarials.safetensors`` and ``adversarials.png`` into ``out``; return a summary
    ``{"file", "figure", "n", "broken", "attacks"}`` for ``results.json``."""
    from safetensors.torch import save_file

    names = [a for a in suite.worst_case_attacks if suite.attacks[a].x_adv.shape[1:] == x.shape[1:]]
    tensors = worst_case_adversarials(suite, x)
    meta = {"format": ADVERSARIALS_FORMAT, "eps": repr(float(suite.eps)), "units": "[0, 1]",
            "attacks": json.dumps(names)}
    atomic_write(out / ADVERSARIALS_FILE, lambda tmp: save_file(tensors, tmp, metadata=meta))
    broken = (tensors["attack"] >= 0) & (tensors["adv_pred"] != tensors["label"]) & suite.clean_correct
    plot_adversarials(out / ADVERSARIALS_FIGURE, x.detach().cpu().float(), tensors, names, eps=suite.eps,
                      most=most, broken=broken)
    log.info("adversarial examples of %d points (%d broken) written to %s", suite.n, int(broken.sum()),
             out / ADVERSARIALS_FILE)
    return {"file": ADVERSARIALS_FILE, "figure": ADVERSARIALS_FIGURE, "n": suite.n, "broken": int(broken.sum()),
            "attacks": names}


def _image(t: torch.Tensor) -> Any:
    """``(C, H, W)`` in [0, 1] as an array imshow takes (grey for one channel)."""
    img = t.clamp(0, 1)
    return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


def plot_adversarials(path: Path, x: torch.Tensor, tensors: dict[str, torch.Tensor], names: list[str], *,
                      eps: float, most: int, broken: torch.Tensor) -> None:
    """A grid: per column one broken point (at most ``most``), rows clean / adversarial /
    difference amplified to the full grey range (``0.5 + (x_adv − x) / (2ε)``)."""
    pick = broken.nonzero().flatten()[:most].tolist()
    cols = max(len(pick), 1)
    fig = new_figure(1.6 * cols + 0.6, 5.2)
    axes = fig.subplots(3, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for row, text in enumerate(("clean", "adversarial", f"difference ×{1 / (2 * eps):.3g}")):
        axes[row][0].set_ylabel(text)
    if not pick:
        axes[0][0].set_title("no point was broken")
    for c, i in enumerate(pick):
        adv = tensors["x_adv"][i]
        diff = (0.5 + (adv - x[i]) / (2 * eps)).clamp(0, 1)
        grey = {"cmap": "gray", "vmin": 0, "vmax": 1} if x.shape[1] == 1 else {}
        for row, img in enumerate((x[i], adv, diff)):
            axes[row][c].imshow(_image(img), **grey)
        attack = get_attack(names[int(tensors["attack"][i])]).display_name()
        axes[0][c].set_title(f"#{int(tensors['index'][i])} label {int(tensors['label'][i])}", fontsize=8)
        axes[1][c].set_title(f"{attack}: pred {int(tensors['adv_pred'][i])}", fontsize=8)
    fig.suptitle(f"Worst-case adversarial examples, ε = {eps * 255:.4g}/255", fontsize=10)
    save_figure(fig, path, bbox_inches="tight")
