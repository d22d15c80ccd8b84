"""PNG figures of the feature measurements (matplotlib on an explicit Agg canvas, as
:mod:`cure_eval.geometry.plots`). Each function takes ``{label: compute_features result}`` (one
model or several: one line per model), writes one PNG and returns its path."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..core.io import new_figure, save_figure


def _short(layer: str) -> str:
    return layer.removeprefix("model.")


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def plot_sensitivity(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Per-layer sensitivity curves: median ``‖Δf_l‖/‖δ‖`` with the inter-quartile band, adversarial
    (solid) and random (dashed) ``δ``, one colour per model (log scale); right: the anisotropy
    (median adversarial / random per point)."""
    if not results:
        raise ValueError("no feature results to plot")
    fig = new_figure(10.5, 4.0)
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    layers: list[str] = []
    for i, (label, res) in enumerate(results.items()):
        color = f"C{i % 10}"
        lays = list(res["sensitivity"])
        layers = lays if len(lays) > len(layers) else layers
        pos = np.arange(len(lays))
        for kind, style in (("adversarial", "-"), ("random", "--")):
            d = [res["sensitivity"][lay][kind] for lay in lays]
            med = np.array([_nan(e["median"]) for e in d])
            lo = np.array([_nan(e["quantiles"].get("0.25")) for e in d])
            hi = np.array([_nan(e["quantiles"].get("0.75")) for e in d])
            ax.plot(pos, med, style, color=color, marker="o", ms=3, label=f"{label}, {kind} δ")
            ax.fill_between(pos, lo, hi, color=color, alpha=0.12, lw=0)
        an = [_nan(res["sensitivity"][lay]["anisotropy"]["median"]) for lay in lays]
        ax2.plot(pos, an, "-", color=color, marker="o", ms=3, label=label)
    for a in (ax, ax2):
        a.set_xticks(np.arange(len(layers)))
        a.set_xticklabels([_short(lay) for lay in layers], rotation=30, ha="right", fontsize=8)
        a.grid(alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("‖f_l(x+δ) − f_l(x)‖₂ / ‖δ‖₂")
    ax.set_title("Feature sensitivity per layer (median, IQR band)", fontsize=10)
    ax.legend(fontsize=7)
    ax2.axhline(1.0, color="k", lw=0.6)
    ax2.set_ylabel("anisotropy: adversarial / random")
    ax2.set_title("Anisotropy (median over points)", fontsize=10)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, bbox_inches="tight")


def _hist(ax: Any, dist: Mapping[str, Any], label: str, color: str) -> bool:
    edges, counts = np.asarray(dist.get("hist_edges") or []), np.asarray(dist.get("hist_counts") or [])
    if len(counts) == 0 or counts.sum() == 0:
        return False
    frac = counts / counts.sum()
    ax.stairs(frac, edges, color=color, lw=1.4, label=label)
    return True


def plot_confidence(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Histograms (share of points) of the top softmax probability and of the logit margin on clean
    points, and of DeepFool's minimal ℓ2 perturbation, one line per model."""
    if not results:
        raise ValueError("no feature results to plot")
    fig = new_figure(12.0, 3.6)
    axes = [fig.add_subplot(1, 3, k) for k in (1, 2, 3)]
    drawn = False
    for i, (label, res) in enumerate(results.items()):
        color = f"C{i % 10}"
        c = res["confidence"]
        _hist(axes[0], c["top_probability"], label, color)
        _hist(axes[1], c["logit_margin"], label, color)
        drawn |= _hist(axes[2], res.get("min_perturbation") or {}, label, color)
        axes[1].axvline(c["margin_threshold"], color="k", lw=0.6, ls=":")
    axes[0].set_xlabel("top softmax probability (clean)")
    axes[1].set_xlabel("logit margin: top − runner-up (clean)")
    axes[2].set_xlabel("DeepFool minimal ℓ2 perturbation ([0, 1] pixels)")
    if not drawn:
        axes[2].text(0.5, 0.5, "no DeepFool ℓ2 records", ha="center", va="center", transform=axes[2].transAxes)
    for a in axes:
        a.set_ylabel("share of points")
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, bbox_inches="tight")
