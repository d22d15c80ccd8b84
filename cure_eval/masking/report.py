"""The masking check's report: findings, verdict, table, the CURE Fig. 7 scatter, JSON."""

from __future__ import annotations

import logging
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.io import new_figure, save_figure, to_jsonable
from .findings import Finding, Verdict, json_float

log = logging.getLogger(__name__)


@dataclass
class MaskingReport:
    """All findings of :func:`run_masking_check` and the per-point data of the Fig. 7 scatter.

    ``verdict`` is ``"suspect"`` if any finding FAILs, else ``"pass"`` (WARNs do not count, see
    the module docs). ``pgd_margin`` / ``spsa_margin`` hold the adversarial loss (true logit minus
    largest other logit, CURE Fig. 7) at the points PGD(100) and SPSA returned, for the attacked
    (clean-correct) points, NaN elsewhere; SPSA's (and ``square_margin``) only on the seeded subset
    the gradient-free attacks ran on (``settings["gradient_free_points"]``).
    """

    verdict: Verdict
    findings: list[Finding]
    eps: float
    n: int
    clean_accuracy: float
    clean_correct: torch.Tensor
    clean_margin: torch.Tensor
    pgd_margin: torch.Tensor
    spsa_margin: torch.Tensor
    tolerance: float
    #: Square's adversarial losses where it attacked (the gradient-free subset), NaN elsewhere
    square_margin: torch.Tensor | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failed(self) -> list[Finding]:
        return [f for f in self.findings if f.status == "FAIL"]

    @property
    def warned(self) -> list[Finding]:
        return [f for f in self.findings if f.status == "WARN"]

    def finding(self, name: str) -> Finding:
        """The finding called ``name`` (KeyError if there is none)."""
        for f in self.findings:
            if f.name == name:
                return f
        raise KeyError(f"no finding {name!r}: have {', '.join(f.name for f in self.findings)}")

    def to_dict(self, *, details: bool = True) -> dict[str, Any]:
        """JSON-ready: ``{"verdict", "findings": [{"name", "status", "value", "threshold",
        "message"}...], "failed", "warned", "eps", "n", "clean_accuracy", "tolerance",
        "settings", "seconds", "details": {name: details}}``."""
        return {
            "verdict": self.verdict,
            "findings": [f.to_dict() for f in self.findings],
            "failed": [f.name for f in self.failed],
            "warned": [f.name for f in self.warned],
            "eps": self.eps,
            "n": self.n,
            "clean_accuracy": json_float(self.clean_accuracy),
            "tolerance": self.tolerance,
            "settings": to_jsonable(self.settings),
            "seconds": self.seconds,
            **({"details": {f.name: to_jsonable(f.details) for f in self.findings}} if details else {}),
        }

    def format_table(self, *, tablefmt: str = "github") -> str:
        """The findings as a table (tabulate), verdict on the first line."""
        from tabulate import tabulate

        rows = [[f.name, f.status, _fmt(f.value), _fmt(f.threshold), f.message] for f in self.findings]
        head = (f"gradient-masking check: {self.verdict.upper()} ({len(self.failed)} FAIL, "
                f"{len(self.warned)} WARN; {self.n} points, ε = {self.eps * 255:.4g}/255)")
        table = tabulate(rows, headers=["check", "status", "value", "FAIL if beyond", "what it means"],
                         tablefmt=tablefmt)
        return f"{head}\n{table}"

    def plot_scatter(self, path: str | Path, *, title: str | None = None) -> Path:
        """CURE Fig. 7: SPSA adversarial loss (y) against PGD(100)'s (x), one dot per point.

        Only attacked (clean-correct) points are drawn. The line y = x and the zero lines are
        marked; points where SPSA's loss is lower than PGD's by more than the tolerance are red.
        Written as a PNG (:func:`cure_eval.core.io.new_figure`: no global pyplot state); returns the path.
        """
        path = Path(path)
        mask = self.clean_correct & torch.isfinite(self.pgd_margin) & torch.isfinite(self.spsa_margin)
        px = self.pgd_margin[mask].double().numpy()
        sy = self.spsa_margin[mask].double().numpy()
        cm = self.clean_margin[mask].double().numpy()
        red = sy < px - self.tolerance * np.abs(cm)
        sq_x, sq_y = np.zeros(0), np.zeros(0)
        if self.square_margin is not None:
            sq_mask = self.clean_correct & torch.isfinite(self.pgd_margin) & torch.isfinite(self.square_margin)
            sq_x, sq_y = self.pgd_margin[sq_mask].double().numpy(), self.square_margin[sq_mask].double().numpy()
        fig = new_figure(5.2, 5.0, dpi=120)
        ax = fig.add_subplot(1, 1, 1)
        if len(px) or len(sq_x):
            lo = float(min(np.concatenate([px, sy, sq_x, sq_y])))
            hi = float(max(np.concatenate([px, sy, sq_x, sq_y])))
            pad = 0.05 * (hi - lo) if hi > lo else 1.0
            lo, hi = lo - pad, hi + pad
            ax.plot([lo, hi], [lo, hi], color="0.3", lw=1.0, ls="--", label="y = x", zorder=1)
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
        ax.axhline(0.0, color="0.6", lw=0.8, zorder=0)
        ax.axvline(0.0, color="0.6", lw=0.8, zorder=0)
        ax.scatter(px[~red], sy[~red], s=12, c="tab:blue", alpha=0.7, zorder=2,
                   label=f"similar or PGD stronger ({int((~red).sum())})")
        ax.scatter(px[red], sy[red], s=14, c="tab:red", alpha=0.85, zorder=3,
                   label=f"SPSA stronger ({int(red.sum())})")
        if len(sq_x):
            ax.scatter(sq_x, sq_y, s=16, marker="x", c="tab:orange", alpha=0.8, zorder=4,
                       label=f"Square, same points ({len(sq_x)})")
        ax.set_xlabel("adversarial loss, PGD(100)  (true − best other logit)")
        ax.set_ylabel("adversarial loss, SPSA (and Square)")
        if title is None:
            lines = [f"gradient masking: {self.verdict.upper()}  (ε = {self.eps * 255:.4g}/255, "
                     f"{int(mask.sum())} points)"]
            if self.failed:
                lines += textwrap.wrap("FAIL: " + ", ".join(f.name for f in self.failed), 60)
            title = "\n".join(lines)
        ax.set_title(title, fontsize=9)
        ax.legend(loc="upper left", fontsize=7, framealpha=0.9)
        ax.text(0.98, 0.02, "negative: misclassified", transform=ax.transAxes, ha="right",
                va="bottom", fontsize=7, color="0.4")
        fig.tight_layout()
        return save_figure(fig, path)


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "nan"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
        return f"{v:.3g}"
    return f"{v:.4g}"
