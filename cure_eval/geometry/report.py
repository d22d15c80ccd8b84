"""The whole geometry of a model: :func:`compute_geometry` measures, :func:`write_geometry` draws the
figures and writes ``geometry.json`` atomically, :func:`measure_geometry` does both."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tabulate import tabulate
from torch import nn
from tqdm.auto import tqdm

from ..attacks.base import require_input_gradients
from ..core.io import write_text_atomic
from ..data import select_points
from ..errors import UsageError
from ._util import check_batch, check_device, eval_mode, to_jsonable
from .bounds import theorem1_points
from .deepfool import MinimalPerturbation, deepfool_l2
from .hessian import Scheme
from .landscape import LossPlane, loss_plane
from .plots import plot_curvature_profile, plot_plane, plot_theorem1, plot_weight_curves
from .spectrum import CurvatureProfile, curvature_profile
from .summaries import curvature_summaries
from .weights import (
    DEFAULT_ALPHAS,
    conv_linear_weights,
    pgd_points,
    weight_curvature_index,
    weight_loss_curve,
)

log = logging.getLogger(__name__)

JSON_NAME = "geometry.json"


def _finite_mean(values: np.ndarray) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


@dataclass
class Geometry:
    """What :func:`compute_geometry` measured: the JSON-ready ``result`` and what the figures need."""

    result: dict[str, Any]
    profile: CurvatureProfile
    theorem1: tuple[np.ndarray, np.ndarray, np.ndarray]  # lower, upper, measured ‖r*‖ per point
    weight_curves: dict[str, Any]
    planes: list[LossPlane]


def compute_geometry(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    device: torch.device | str,
    h: float,
    k: int = 10,
    n_points: int | None = 20,
    eps: float = 8 / 255,
    scheme: Scheme = "central",
    n_gaussian: int = 100,
    full_spectrum: bool | None = None,
    hutchinson_probes: int = 50,
    pgd_steps: int = 10,
    landscape_points: int = 2,
    landscape_steps: int = 41,
    weight_alphas: Sequence[float] | np.ndarray = DEFAULT_ALPHAS,
    adversarial_weight_curve: bool = True,
    label: str = "model",
    seed: int = 0,
    chunk_size: int = 512,
    points_per_batch: int = 16,
    progress: bool = True,
) -> Geometry:
    """Measure input-space curvature, Theorem 1 bounds, landscapes and weight-space flatness
    (arguments as :func:`measure_geometry`; nothing is written). WCI and the weight-loss curves
    are reported as not applicable (``result["not_applicable"]``) for a model without conv/linear
    weights; a model without input gradients raises :class:`~cure_eval.errors.NotApplicable`."""
    check_batch(x, y)
    dev = check_device(model, device)
    n_avail = len(x)
    n_use = n_avail if n_points is None else min(int(n_points), n_avail)
    if n_use < 1:
        raise UsageError(f"n_points must be at least 1, got {n_points}")
    idx = select_points(n_avail, n_use, seed)
    xs, ys = x[idx].to(dev), y[idx].to(dev)
    require_input_gradients(model, xs)
    t_start = time.perf_counter()
    with eval_mode(model):
        with torch.no_grad():
            clean_correct = (model(xs).argmax(1) == ys).cpu()
        log.info("geometry of %s on %d points (h=%g, scheme=%s, k=%d)", label, n_use, h, scheme, k)
        prof = curvature_profile(model, xs, ys, h=h, k=k, device=dev, scheme=scheme,
                                 full_spectrum=full_spectrum, chunk_size=chunk_size,
                                 points_per_batch=points_per_batch, seed=seed, progress=progress)
        summ = curvature_summaries(model, xs, ys, h=h, n_gaussian=n_gaussian, device=dev,
                                   scheme=scheme, chunk_size=chunk_size, seed=seed)
        df = deepfool_l2(model, xs, ys, device=dev)
        th = theorem1_points(model, xs, ys, nu=prof.lambda_max, u=prof.top_vectors, device=dev,
                             chunk_size=chunk_size)
        wci, curves, not_applicable = _weight_flatness(
            model, xs, ys, dev=dev, eps=eps, pgd_steps=pgd_steps, hutchinson_probes=hutchinson_probes,
            weight_alphas=weight_alphas, adversarial_weight_curve=adversarial_weight_curve, seed=seed,
            chunk_size=chunk_size, progress=progress)
        planes = _loss_planes(model, xs, ys, df, idx, dev=dev, landscape_points=landscape_points,
                              landscape_steps=landscape_steps, seed=seed, chunk_size=chunk_size, progress=progress)
    measured = df.norm.double().numpy()
    config = {
        "h": h, "h_units": "l2 length of the finite-difference step in [0,1] pixel space",
        "scheme": scheme, "k": k, "eps": eps, "n_gaussian": n_gaussian,
        "hutchinson_probes": hutchinson_probes, "pgd_steps": pgd_steps, "seed": seed,
        "device": str(dev), "dtype": str(xs.dtype), "dim": prof.dim,
        "torch": torch.__version__, "python": platform.python_version(),
        "wci_formula": "sum_k ||W_k||_F * sqrt(max(0, Hutchinson Tr d2 L_adv / dW_k^2)), "
                       "conv/linear weights, L_adv = mean CE at PGD points",
        "theorem1_reading": "l = CE of the true class, t = log 2 (p_y > 1/2: sufficient for correct)",
    }
    result = _result(label=label, idx=idx, clean_correct=clean_correct, prof=prof, summ=summ, th=th, df=df,
                     measured=measured, wci=wci, curves=curves, planes=planes, t_start=t_start, config=config)
    if not_applicable:
        result["not_applicable"] = not_applicable
    return Geometry(result=result, profile=prof, theorem1=(th["lower"], th["upper"], measured),
                    weight_curves=curves, planes=planes)


def _weight_flatness(
    model: nn.Module,
    xs: torch.Tensor,
    ys: torch.Tensor,
    *,
    dev: torch.device,
    eps: float,
    pgd_steps: int,
    hutchinson_probes: int,
    weight_alphas: Sequence[float] | np.ndarray,
    adversarial_weight_curve: bool,
    seed: int,
    chunk_size: int,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """WCI and the weight-loss curves (clean, and at PGD points) of the conv/linear weights; both
    not applicable (the third value says why) for a model without them."""
    no_weights = None if conv_linear_weights(model) else "the model has no conv/linear weights to measure"
    wci: dict[str, Any] = {"wci": None, "layers": [], "adv_accuracy": None, "adv_loss": None}
    curves: dict[str, Any] = {}
    if no_weights is not None:
        log.warning("geometry: WCI and weight-loss curves not applicable: %s", no_weights)
        return wci, curves, {"wci": no_weights, "weight_curves": no_weights}
    x_adv = pgd_points(model, xs, ys, eps=eps, device=dev, steps=pgd_steps, seed=seed)
    wci = weight_curvature_index(model, xs, ys, eps=eps, device=dev, n_probes=hutchinson_probes,
                                 seed=seed, chunk_size=chunk_size, x_adv=x_adv, progress=progress)
    curves["clean"] = weight_loss_curve(model, xs, ys, device=dev, alphas=weight_alphas, seed=seed)
    if adversarial_weight_curve and eps > 0:
        curves[f"PGD-{pgd_steps} ε={eps:.4g}"] = weight_loss_curve(
            model, xs, ys, device=dev, alphas=weight_alphas, seed=seed, adversarial_eps=eps,
            pgd_steps=pgd_steps)
    return wci, curves, {}


def _loss_planes(
    model: nn.Module,
    xs: torch.Tensor,
    ys: torch.Tensor,
    df: MinimalPerturbation,
    idx: torch.Tensor,
    *,
    dev: torch.device,
    landscape_points: int,
    landscape_steps: int,
    seed: int,
    chunk_size: int,
    progress: bool,
) -> list[LossPlane]:
    """Loss planes at the first ``landscape_points`` points: along DeepFool's ``r*`` where it
    succeeded on a clean-correct point, else along two random directions."""
    planes = []
    for j in tqdm(range(min(landscape_points, len(xs))), desc="loss planes", disable=not progress,
                  leave=False):
        r = df.delta[j] if bool(df.success[j]) and bool(df.clean_correct[j]) and float(df.norm[j]) > 0 else None
        if r is None:
            plane = loss_plane(model, xs[j], ys[j], device=dev, steps=landscape_steps,
                               seed=seed + j, chunk_size=chunk_size * 2, index=int(idx[j]))
        else:
            plane = loss_plane(model, xs[j], ys[j], device=dev, r=r, steps=landscape_steps,
                               seed=seed + j, chunk_size=chunk_size * 2, index=int(idx[j]))
        planes.append(plane)
    return planes


def _theorem1_result(th: dict[str, Any], df: MinimalPerturbation, measured: np.ndarray) -> dict[str, Any]:
    """Theorem 1's bounds per point next to DeepFool's measured ‖r*‖, and how often they hold."""
    lower, upper = th["lower"], th["upper"]
    fin = np.isfinite(lower) & np.isfinite(upper) & np.isfinite(measured) & (th["c"] > 0)
    return {
        "t": th["t"],
        "lower": lower.tolist(), "upper": upper.tolist(), "measured": measured.tolist(),
        "linear": th["linear"].tolist(), "case": th["case"].tolist(),
        "loss": th["loss"].tolist(), "c": th["c"].tolist(), "nu": th["nu"].tolist(),
        "grad_norm": th["grad_norm"].tolist(), "grad_dot_u": th["grad_dot_u"].tolist(),
        "deepfool_success": df.success.tolist(), "clean_correct": df.clean_correct.tolist(),
        "n_compared": int(fin.sum()),
        "fraction_measured_ge_lower": float(np.mean(measured[fin] >= lower[fin])) if fin.any() else None,
        "fraction_measured_le_upper": float(np.mean(measured[fin] <= upper[fin])) if fin.any() else None,
        "median_lower_over_measured": float(np.median(lower[fin] / measured[fin])) if fin.any() else None,
        "median_upper_over_measured": float(np.median(upper[fin] / measured[fin])) if fin.any() else None,
    }


def _result(
    *,
    label: str,
    idx: torch.Tensor,
    clean_correct: torch.Tensor,
    prof: CurvatureProfile,
    summ: dict[str, Any],
    th: dict[str, Any],
    df: MinimalPerturbation,
    measured: np.ndarray,
    wci: dict[str, Any],
    curves: dict[str, Any],
    planes: list[LossPlane],
    t_start: float,
    config: dict[str, Any],
) -> dict[str, Any]:
    """The JSON-ready result of :func:`compute_geometry`."""
    n = len(idx)
    hvps_profile = prof.hvps
    return {
        "label": label,
        "n_points": n,
        "indices": idx.tolist(),
        "clean_accuracy": float(clean_correct.double().mean()),
        "top_eigenvalues": prof.top_eigenvalues.tolist(),
        "bottom_eigenvalues": prof.bottom_eigenvalues.tolist(),
        "sorted_profile": None if prof.sorted_profile is None else prof.sorted_profile.tolist(),
        "lambda_max": prof.lambda_max.tolist(),
        "hz_norm": summ["hz_norm"],
        "frobenius": summ["frobenius"],
        "hz_norm_per_point": summ["hz_norm_per_point"],
        "frobenius_per_point": summ["frobenius_per_point"],
        "alignment": _finite_mean(th["alignment"]),
        "alignment_per_point": th["alignment"].tolist(),
        "random_alignment": 1.0 / math.sqrt(prof.dim),
        "wci": wci["wci"],
        "wci_layers": wci["layers"],
        "adv_accuracy": wci["adv_accuracy"],
        "adv_loss": wci["adv_loss"],
        "theorem1": _theorem1_result(th, df, measured),
        "weight_curves": curves,
        "planes": [p.to_dict() for p in planes],
        "profile": prof.to_dict(per_point=True),
        "hvps": hvps_profile + int(summ["hvps"]),
        "hvps_per_point": hvps_profile / n,
        "seconds_per_point": prof.seconds / n,
        "seconds_total": time.perf_counter() - t_start,
        "config": config,
    }


def write_geometry(
    geometry: Geometry, out_dir: str | os.PathLike[str], *, label: str = "model",
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Draw the figures of a :func:`compute_geometry` result into ``out_dir`` and write
    ``geometry.json`` atomically (NaN/inf as null); return the result with ``files``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    lower, upper, measured = geometry.theorem1
    files["profile"] = str(plot_curvature_profile(geometry.profile, out / "profile.png", label=label))
    files["theorem1"] = str(plot_theorem1(lower, upper, measured, out / "theorem1.png"))
    if geometry.weight_curves:
        files["weight_curve"] = str(plot_weight_curves(geometry.weight_curves, out / "weight_curve.png"))
    for plane in geometry.planes:
        key = f"plane_{plane.index}"
        files[key] = str(plot_plane(plane, out / f"{key}.png", class_names=class_names))
    files["json"] = str(out / JSON_NAME)
    result = {**geometry.result, "files": dict(files)}
    write_text_atomic(out / JSON_NAME, json.dumps(to_jsonable(result), indent=1, allow_nan=False))
    log.info("geometry written to %s (%.1f s)", out, result["seconds_total"])
    return result


def measure_geometry(

    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    device: torch.device | str,
    h: float,
    k: int = 10,
    n_points: int | None = 20,
    out_dir: str | os.PathLike[str],
    eps: float = 8 / 255,
    scheme: Scheme = "central",
    n_gaussian: int = 100,
    full_spectrum: bool | None = None,
    hutchinson_probes: int = 50,
    pgd_steps: int = 10,
    landscape_points: int = 2,
    landscape_steps: int = 41,
    weight_alphas: Sequence[float] | np.ndarray = DEFAULT_ALPHAS,
    adversarial_weight_curve: bool = True,
    class_names: Sequence[str] | None = None,
    label: str = "model",
    seed: int = 0,
    chunk_size: int = 512,
    points_per_batch: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure input-space curvature, Theorem 1 bounds, landscapes and weight-space flatness.

    Args:
        model: maps [0, 1] images to logits; measured in eval mode (caller's mode restored),
            must already be on ``device``.
        x, y: candidate points in [0, 1] and labels; ``n_points`` of them are used, chosen by
            :func:`cure_eval.data.select_points` (a fixed subset for a given ``seed``).
        device: where to compute.
        h: ℓ2 length of the FD step in [0, 1] pixel space (``DatasetSpec.default_h``).
        k: eigenvalues at each end of the spectrum.
        n_points: points to measure (``None``: all of ``x``).
        out_dir: folder for ``geometry.json`` and the PNGs (created).
        eps: ℓ∞ radius in [0, 1] units of the PGD points behind WCI and the adversarial
            weight-loss curve.
        scheme: HVP scheme (``central`` default, ``forward`` = paper Eq. 1, ``exact``).
        n_gaussian: Gaussian draws for the Frobenius estimate.
        full_spectrum: full d×d spectrum (``None``: when d ≤ 3072).
        hutchinson_probes: Rademacher probes for the WCI traces.
        pgd_steps: PGD iterations for WCI / the adversarial curve.
        landscape_points: how many of the points get a (r, v) plane figure.
        landscape_steps: grid points per axis of those planes (odd).
        weight_alphas: α grid of the weight-loss curve.
        adversarial_weight_curve: also draw the AWP-style adversarial-loss curve (PGD rerun at
            every α).
        class_names: names for the decision-region legends.
        label: the model's name in figures.
        seed: seeds point selection, ARPACK start vectors, Gaussian draws, PGD, directions.
        chunk_size, points_per_batch: batching (see :func:`curvature_profile`).
        progress: tqdm bars.

    Returns:
        A dict with (among others) ``top_eigenvalues`` (mean over points, descending),
        ``bottom_eigenvalues`` (ascending), ``sorted_profile`` (or None), ``hz_norm``,
        ``frobenius``, ``alignment`` (mean |∇ℓᵀu|/||∇ℓ||), ``wci``, ``theorem1`` (per point
        ``lower``/``upper``/``measured``/...), ``hvps``, ``seconds_per_point`` (curvature-profile
        wall time per point), ``files`` (written paths). The same content is in
        ``out_dir/geometry.json`` (NaN/inf written as null).
    """
    geometry = compute_geometry(
        model, x, y, device=device, h=h, k=k, n_points=n_points, eps=eps, scheme=scheme,
        n_gaussian=n_gaussian, full_spectrum=full_spectrum, hutchinson_probes=hutchinson_probes,
        pgd_steps=pgd_steps, landscape_points=landscape_points, landscape_steps=landscape_steps,
        weight_alphas=weight_alphas, adversarial_weight_curve=adversarial_weight_curve, label=label,
        seed=seed, chunk_size=chunk_size, points_per_batch=points_per_batch, progress=progress)
    return write_geometry(geometry, out_dir, label=label, class_names=class_names)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, (list, tuple, np.ndarray)):
        vals = list(v)
        shown = ", ".join(_fmt(e, digits) for e in vals[:5])
        return f"[{shown}{', …' if len(vals) > 5 else ''}]"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.{digits}g}"
    return str(v)


def format_table(result: Mapping[str, Any]) -> str:
    """A terminal table (tabulate) of the headline numbers of :func:`measure_geometry`."""
    th = result.get("theorem1") or {}
    rows = [
        ("points", result.get("n_points")),
        ("clean accuracy", result.get("clean_accuracy")),
        ("top eigenvalues (mean, desc.)", result.get("top_eigenvalues")),
        ("bottom eigenvalues (mean, asc.)", result.get("bottom_eigenvalues")),
        ("||Hz||, z = CURE direction", result.get("hz_norm")),
        ("||H||_F (Gaussian estimate)", result.get("frobenius")),
        ("alignment |g·u|/||g||", result.get("alignment")),
        ("  (random direction ≈ 1/√d)", result.get("random_alignment")),
        ("Theorem 1: measured ≥ lower", th.get("fraction_measured_ge_lower")),
        ("Theorem 1: measured ≤ upper", th.get("fraction_measured_le_upper")),
        ("Theorem 1: median lower/measured", th.get("median_lower_over_measured")),
        ("Theorem 1: median upper/measured", th.get("median_upper_over_measured")),
        ("WCI", result.get("wci")),
        ("adversarial accuracy (PGD, WCI points)", result.get("adv_accuracy")),
        ("HVPs per point (profile)", result.get("hvps_per_point")),
        ("seconds per point (profile)", result.get("seconds_per_point")),
    ]
    return tabulate([(name, _fmt(v)) for name, v in rows], headers=["quantity", "value"],
                    tablefmt="simple")
