"""PNG figures for the geometry audit (matplotlib, Agg canvas).

Figures are built on :class:`matplotlib.figure.Figure` with an explicit Agg canvas, never through
``pyplot``: no global backend switch, no GUI, no figure registry to leak, thread-safe enough for
a CLI. Every function writes one PNG and returns its path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from ..core.io import new_figure, save_figure
from ._util import as_numpy
from .landscape import LossPlane
from .spectrum import CurvatureProfile

ProfileLike = CurvatureProfile | Mapping[str, Any] | Sequence[float] | np.ndarray

#: colour of the true class in decision-region plots (paper Fig. 1: green = correct class)
TRUE_COLOR = "#4daf4a"
#: colours of the incorrect classes (reds, oranges, purples...: distinguishable, none green)
WRONG_COLORS = ("#e41a1c", "#ff7f00", "#984ea3", "#a65628", "#f781bf", "#fdbf6f", "#6a3d9a",
                "#b15928", "#fb9a99", "#999999", "#cab2d6", "#ffff33")


def _profile_values(p: ProfileLike) -> np.ndarray:
    if isinstance(p, CurvatureProfile):
        return p.sorted_profile if p.sorted_profile is not None else p.top_eigenvalues
    if isinstance(p, Mapping):  # a measure_geometry result (or its JSON)
        v = p.get("sorted_profile")
        return as_numpy(v if v is not None else p["top_eigenvalues"])
    return as_numpy(p)


def plot_profiles(
    profiles: Mapping[str, ProfileLike],
    path: str | os.PathLike[str],
    *,
    title: str = "Curvature profile",
    ylabel: str = "eigenvalue of the input Hessian",
) -> Path:
    """Sorted curvature profiles of several models on one figure (paper Fig. 2, 9, 12).

    ``profiles`` maps a label (``"normal"``, ``"CURE"``, ``"adv. fine-tuned"``...) to a profile:
    a :class:`CurvatureProfile`, a :func:`measure_geometry` result (dict or parsed
    ``geometry.json``) — both give the mean sorted full spectrum, or the mean top-k when the
    full spectrum was not computed — or a plain sequence of eigenvalues. Each curve is drawn
    sorted in descending order against its eigenvalue index. Compare only profiles measured
    with the same ``h`` and scheme.
    """
    if not profiles:
        raise ValueError("no profiles to plot")
    fig = new_figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for label, values in profiles.items():
        vals = np.sort(_profile_values(values).reshape(-1))[::-1]
        ax.plot(np.arange(1, len(vals) + 1), vals, label=label, lw=1.6,
                marker="o" if len(vals) <= 40 else None, ms=3)
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_xlabel("eigenvalue index (sorted, descending)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path, bbox_inches="tight")


def plot_curvature_profile(
    profile: CurvatureProfile,
    path: str | os.PathLike[str],
    *,
    label: str = "model",
) -> Path:
    """One model's profile: the mean sorted full spectrum and the Lanczos top/bottom-k.

    Both are averages over points of descending (resp. ascending) eigenvalues. On ReLU
    networks with a finite ``h`` the two differ (see :mod:`cure_eval.geometry.spectrum`):
    drawing them together shows by how much.
    """
    fig = new_figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    d, k = profile.dim, profile.k
    full = profile.sorted_profile
    if full is not None:
        ax.plot(np.arange(1, d + 1), full, lw=1.6, label="full spectrum (pixel-basis FD matrix)")
    if profile.settings.get("lanczos", True):
        ax.plot(np.arange(1, k + 1), profile.top_eigenvalues, "o", ms=4, color="#e31a1c",
                label=f"Lanczos top-{k}")
        ax.plot(np.arange(d - k + 1, d + 1), profile.bottom_eigenvalues[::-1], "s", ms=4,
                color="#1f78b4", label=f"Lanczos bottom-{k}")
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_xlabel("eigenvalue index (sorted, descending)")
    ax.set_ylabel("eigenvalue of the input Hessian")
    ax.set_title(f"Curvature profile, {label} (h={profile.h:g}, {profile.scheme}, "
                 f"{len(profile.points)} points)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, bbox_inches="tight")


def plot_plane(
    plane: LossPlane,
    path: str | os.PathLike[str],
    *,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Decision regions (left, Fig. 1) and the surface of ``−ℓ`` (right, Fig. 3) in the (r, v) plane.

    Left: the true class in green, every incorrect class in its own non-green colour (legend),
    black lines on region boundaries, the data point at the centre and the DeepFool point on
    the r axis. Right: ``−ℓ(x + a r̂ + b v̂)`` as a 3-D surface, the data point marked.
    """
    names = list(class_names) if class_names is not None else [str(c) for c in range(plane.num_classes)]
    k = plane.num_classes
    colors = []
    wrong = iter(WRONG_COLORS * (1 + k // len(WRONG_COLORS)))
    for c in range(k):
        colors.append(TRUE_COLOR if c == plane.label else next(wrong))
    cmap = ListedColormap(colors)
    fig = new_figure(11.0, 4.6)
    ax = fig.add_subplot(1, 2, 1)
    a, b = plane.a, plane.b
    ax.pcolormesh(a, b, plane.pred, cmap=cmap, vmin=-0.5, vmax=k - 0.5, shading="nearest")
    present = sorted(int(c) for c in np.unique(plane.pred))
    for c in present:
        mask = (plane.pred == c).astype(float)
        if 0 < mask.mean() < 1:
            ax.contour(a, b, mask, levels=[0.5], colors="k", linewidths=0.9)
    ax.plot([0], [0], "o", color="#1f78b4", mec="k", ms=7, label="data point")
    if np.isfinite(plane.boundary_distance):
        ax.plot([plane.boundary_distance], [0], "x", color="k", ms=8, mew=2, label="DeepFool point")
    handles: list[Any] = [Patch(color=colors[c], label=f"{names[c] if c < len(names) else c}" + (" (true)" if c == plane.label else ""))
               for c in present]
    handles += ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="upper left", framealpha=0.85)
    ax.set_xlabel("r: boundary normal (ℓ2, [0,1] pixels)")
    ax.set_ylabel("v: random orthogonal (ℓ2)")
    ax.set_aspect("equal")
    ax.set_title("decision regions")
    ax3 = fig.add_subplot(1, 2, 2, projection="3d")
    aa, bb = np.meshgrid(a, b)
    ax3.plot_surface(aa, bb, -plane.loss, cmap="coolwarm_r", linewidth=0, antialiased=True)  # type: ignore[attr-defined]
    c0 = plane.loss[len(b) // 2, len(a) // 2]
    ax3.scatter([0], [0], [-c0], color="#1f78b4", s=30, depthshade=False)  # type: ignore[misc]
    ax3.locator_params(axis="x", nbins=5)
    ax3.locator_params(axis="y", nbins=5)
    ax3.set_xlabel("r")
    ax3.set_ylabel("v")
    ax3.set_zlabel("−loss")  # type: ignore[attr-defined]
    ax3.set_title("−ℓ on the plane")
    fig.suptitle(title or f"point {plane.index} (label {names[plane.label] if plane.label < len(names) else plane.label})")
    return save_figure(fig, path, bbox_inches="tight")


def plot_theorem1(
    lower: Sequence[float] | np.ndarray,
    upper: Sequence[float] | np.ndarray,
    measured: Sequence[float] | np.ndarray,
    path: str | os.PathLike[str],
    *,
    title: str = "Theorem 1 bounds vs DeepFool ||r||",
) -> Path:
    """Per point: lower (Eq. 2) and upper (Eq. 3) bounds against the measured minimal ℓ2 norm.

    Each point is a vertical segment from its lower to its upper bound at x = measured; the
    diagonal y = x marks where a bound equals the measurement. Non-finite values are skipped
    (and counted in the title).
    """
    lo, up, me = (as_numpy(v).reshape(-1) for v in (lower, upper, measured))
    ok = np.isfinite(lo) & np.isfinite(up) & np.isfinite(me)
    fig = new_figure(5.6, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    for m, l_, u_ in zip(me[ok], lo[ok], up[ok], strict=True):
        ax.plot([m, m], [l_, u_], color="0.6", lw=0.8)
    ax.scatter(me[ok], lo[ok], marker="^", color="#1f78b4", s=18, label="lower bound (Eq. 2)")
    ax.scatter(me[ok], up[ok], marker="v", color="#e31a1c", s=18, label="upper bound (Eq. 3)")
    hi = float(np.nanmax(np.concatenate([me[ok], lo[ok], up[ok]]))) if ok.any() else 1.0
    ax.plot([0, hi], [0, hi], "k--", lw=0.8, label="y = x")
    ax.set_xlabel("measured DeepFool ||r|| (ℓ2, [0,1] pixels)")
    ax.set_ylabel("Theorem 1 bound on ||r*||")
    skipped = int((~ok).sum())
    ax.set_title(title + (f"\n({skipped} points with non-finite values not shown)" if skipped else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, bbox_inches="tight")


def plot_weight_curves(
    curves: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    title: str = "Loss along a filter-normalised weight direction",
) -> Path:
    """Loss against α for one or several :func:`~cure_eval.geometry.weights.weight_loss_curve` results."""
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for label, c in curves.items():
        ax.plot(c["alphas"], c["loss"], marker="o", ms=3, label=label)
    ax.set_xlabel("α (w + α d, d filter-normalised)")
    ax.set_ylabel("mean cross-entropy (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path, bbox_inches="tight")
