"""The feature measurements of one model: :func:`compute_features` measures, :func:`write_features`
draws the figures and writes ``features.json`` atomically, :func:`measure_features` does both."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

from ..attacks import run_attack
from ..attacks.base import require_input_gradients
from ..core.io import to_jsonable, write_text_atomic
from ..core.modes import check_device, eval_mode
from ..errors import NotApplicable, UsageError
from .confidence import MARGIN_THRESHOLD, confidence_summary, distribution
from .layers import resolve_layers
from .plots import plot_confidence, plot_sensitivity
from .sensitivity import jacobian_singular_values, layer_sensitivity, random_sign_delta

log = logging.getLogger(__name__)

JSON_NAME = "features.json"
#: the figures :func:`write_features` draws
FIGURES = ("features_sensitivity.png", "features_confidence.png")
UNITS = ("‖f_l(x+δ) − f_l(x)‖₂ / ‖δ‖₂: ℓ2 norm of the flattened feature difference over the ℓ2 norm of δ "
         "in [0, 1] pixel units")
RANDOM_DELTA = "uniform random signs ±ε per pixel (seeded CPU generator), x+δ clipped to [0, 1]"


def compute_features(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    device: torch.device | str,
    eps: float,
    layers: Sequence[str] | None = None,
    n_points: int = 100,
    x_adv: torch.Tensor | None = None,
    adversarial_source: str | None = None,
    pgd_alpha: float = 2 / 255,
    min_norms: torch.Tensor | None = None,
    min_norm_source: str | None = None,
    jacobian_points: int = 5,
    jacobian_k: int = 3,
    jacobian_iterations: int = 10,
    margin_threshold: float = MARGIN_THRESHOLD,
    batch_size: int = 128,
    label: str = "model",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Per-layer feature sensitivity, Jacobian singular values and confidence of one model.

    Jia, Li & Wen, "Towards Understanding the Regularization of Adversarial Robustness on Neural
    Networks", ICML 2020, https://arxiv.org/abs/2011.07478.

    Args:
        model: maps [0, 1] images to logits, already on ``device``; measured in eval mode (the
            caller's mode restored).
        x, y: the audited points (clean test points) and labels. Confidence is measured on all
            of them; the sensitivity on the first ``n_points`` that are classified correctly and
            moved by the adversarial ``δ`` (where that ``δ`` exists).
        device: where to compute.
        eps: ℓ∞ radius ([0, 1] units) of the random and adversarial ``δ``.
        layers: module names (default: the network's stages, :func:`resolve_layers`).
        n_points: candidates for the sensitivity (the first ``n_points`` of ``x``).
        x_adv: adversarial points for the first ``n_points`` of ``x`` (e.g. the audit suite's
            PGD(20) points); ``None``: PGD(20) (the suite's ``pgd20``) is run here with
            ``pgd_alpha`` and ``seed``.
        adversarial_source: how ``x_adv`` was made (written to the result).
        pgd_alpha: PGD step when ``x_adv`` is ``None``.
        min_norms: minimal ℓ2 perturbations per clean-correct point (DeepFool's, from the
            suite), summarised next to the confidence; ``None``: reported as missing.
        min_norm_source: where ``min_norms`` came from.
        jacobian_points: points (the first of the measured ones) for the Jacobian's σ; 0: skip.
        jacobian_k, jacobian_iterations: singular values per layer and power iterations.
        margin_threshold: "near the boundary" below this logit margin.
        batch_size: points per forward pass.
        label: the model's name in figures and logs.
        seed: seeds the random ``δ`` and the power-iteration start.
        progress: tqdm bars.

    Returns:
        A JSON-ready dict: ``layers``, ``n_points``, ``indices`` (positions in ``x``), ``eps``,
        ``units``, ``random_delta``, ``adversarial_delta``, ``sensitivity`` (per layer:
        ``random`` / ``adversarial`` / ``anisotropy`` distributions, ``anisotropy_of_medians``,
        ``jacobian_sigma`` mean over points, ``jacobian_sigma_per_point``), ``delta_l2``,
        ``per_point`` (the ratios), ``confidence``, ``min_perturbation``, ``seconds``, ``config``.

    Raises:
        NotApplicable: no stage found and no ``layers`` named, no input gradients, or no point
            among the candidates that is classified correctly and moved by the adversarial ``δ``.
        UsageError: an unknown layer name (the message lists the valid ones), bad arguments.
    """
    _check_arguments(eps=eps, n_points=n_points)
    dev = check_device(model, device)
    names = resolve_layers(model, layers)
    pts = _candidates(model, x, y, dev=dev, eps=eps, n_points=n_points, x_adv=x_adv, source=adversarial_source,
                      pgd_alpha=pgd_alpha, batch_size=batch_size, seed=seed, progress=progress)
    meas = _measure(model, pts, names, dev=dev, eps=eps, label=label, batch_size=batch_size, seed=seed,
                    progress=progress, jacobian=(jacobian_points, jacobian_k, jacobian_iterations))
    conf = confidence_summary(pts.logits, labels=y.detach().cpu(), margin_threshold=margin_threshold)
    return _result(pts, meas, names, eps=eps, label=label, confidence=conf,
                   min_perturbation=_min_perturbation(min_norms, min_norm_source),
                   settings={"jacobian_k": jacobian_k, "jacobian_iterations": jacobian_iterations,
                             "margin_threshold": margin_threshold, "seed": seed, "device": str(dev)})


def _check_arguments(*, eps: float, n_points: int) -> None:
    if not 0 < eps <= 1:
        raise UsageError(f"eps must be in (0, 1] ([0, 1] pixel units), got {eps}")
    if n_points < 1:
        raise UsageError(f"n_points must be at least 1, got {n_points}")


@dataclass
class _Points:
    """The sensitivity's points: the first ``m`` of ``x`` (``xs``), the kept positions ``keep``
    (clean-correct and moved), their random and adversarial ``deltas``, the clean ``logits`` of
    all of ``x``, where the adversarial δ came from, the clock's start and the attack's seconds."""

    m: int
    xs: torch.Tensor
    keep: torch.Tensor
    deltas: dict[str, torch.Tensor]
    logits: torch.Tensor
    source: str | None
    t0: float
    t_attack: float


def _candidates(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    dev: torch.device,
    eps: float,
    n_points: int,
    x_adv: torch.Tensor | None,
    source: str | None,
    pgd_alpha: float,
    batch_size: int,
    seed: int,
    progress: bool,
) -> _Points:
    """Clean logits, the adversarial points (PGD(20) here when ``x_adv`` is ``None``), and the
    candidates that are classified correctly and moved by the adversarial δ."""
    t0 = time.perf_counter()
    m = min(int(n_points), len(x))
    xs, ys = x[:m].detach().cpu(), y[:m].detach().cpu()
    require_input_gradients(model, xs.to(dev))
    with eval_mode(model), torch.no_grad():
        logits = torch.cat([model(x[s:s + batch_size].to(dev)).cpu() for s in range(0, len(x), batch_size)])
    if x_adv is None:
        adv = run_attack("pgd20", model, xs, ys, eps=eps, device=dev, batch_size=batch_size, seed=seed,
                         pgd_alpha=pgd_alpha, progress=progress)
        x_adv, source = adv.x_adv, source or f"PGD(20) run here (step {pgd_alpha:.4g}, seed {seed})"
    if x_adv.shape != xs.shape:
        raise UsageError(f"x_adv has shape {tuple(x_adv.shape)}, expected {tuple(xs.shape)} (the first n_points)")
    t_attack = time.perf_counter() - t0
    adv_delta = x_adv.detach().cpu().to(xs.dtype) - xs
    correct = logits[:m].argmax(1) == ys
    moved = adv_delta.flatten(1).norm(dim=1) > 0
    keep = (correct & moved).nonzero().flatten()
    if len(keep) == 0:
        raise NotApplicable(f"none of the first {m} points is classified correctly and moved by the attack: "
                            "no adversarial δ to measure")
    deltas = {"random": random_sign_delta(xs[keep], eps=eps, seed=seed), "adversarial": adv_delta[keep]}
    return _Points(m=m, xs=xs, keep=keep, deltas=deltas, logits=logits, source=source, t0=t0, t_attack=t_attack)


@dataclass
class _Measures:
    """Per-layer ratios (per δ kind), Jacobian σ (per layer), the Jacobian's point count and the
    seconds of the sensitivity and the Jacobian."""

    ratios: dict[str, dict[str, torch.Tensor]]
    sigmas: dict[str, torch.Tensor]
    n_jac: int
    t_sens: float
    t_jac: float


def _measure(
    model: nn.Module,
    pts: _Points,
    names: list[str],
    *,
    dev: torch.device,
    eps: float,
    label: str,
    batch_size: int,
    seed: int,
    progress: bool,
    jacobian: tuple[int, int, int],
) -> _Measures:
    """The layer sensitivity of every δ and the Jacobian's top singular values
    (``jacobian`` = points, k, power iterations) on the kept points."""
    jacobian_points, jacobian_k, jacobian_iterations = jacobian
    xk = pts.xs[pts.keep]
    log.info("feature sensitivity of %s: %d layers on %d points (of the first %d), ε = %.4g", label, len(names),
             len(pts.keep), pts.m, eps)
    ratios = layer_sensitivity(model, xk, pts.deltas, layers=names, device=dev, batch_size=batch_size,
                               progress=progress)
    t_sens = time.perf_counter() - pts.t0 - pts.t_attack
    n_jac = min(int(jacobian_points), len(pts.keep))
    sigmas = jacobian_singular_values(model, xk[:n_jac], layers=names, device=dev, k=jacobian_k,
                                      iterations=jacobian_iterations, seed=seed, progress=progress) if n_jac else {}
    t_jac = time.perf_counter() - pts.t0 - pts.t_attack - t_sens
    return _Measures(ratios=ratios, sigmas=sigmas, n_jac=n_jac, t_sens=t_sens, t_jac=t_jac)


def _sensitivity_entries(meas: _Measures, names: Sequence[str]) -> dict[str, Any]:
    """Per layer: the random / adversarial / anisotropy distributions and the Jacobian's σ."""
    sens: dict[str, Any] = {}
    for lay in names:
        r, a = meas.ratios["random"][lay], meas.ratios["adversarial"][lay]
        aniso = a / r
        entry: dict[str, Any] = {"random": distribution(r), "adversarial": distribution(a),
                                 "anisotropy": distribution(aniso)}
        med_r, med_a = entry["random"]["median"], entry["adversarial"]["median"]
        entry["anisotropy_of_medians"] = med_a / med_r if med_r else None
        if lay in meas.sigmas:
            entry["jacobian_sigma"] = meas.sigmas[lay].mean(0).tolist()
            entry["jacobian_sigma_per_point"] = meas.sigmas[lay].tolist()
        sens[lay] = entry
    return sens


def _min_perturbation(min_norms: torch.Tensor | None, source: str | None) -> dict[str, Any]:
    """DeepFool's minimal ℓ2 perturbations summarised, or marked missing."""
    mp: dict[str, Any] = {"source": source, "norm": "l2, [0, 1] pixel units"}
    if min_norms is None:
        mp["status"] = "missing"
        mp["reason"] = "no DeepFool ℓ2 minimal perturbations given (run the audit with deepfool_l2 in --attacks)"
    else:
        mp.update(distribution(min_norms))
        mp["failed"] = int(torch.isinf(torch.as_tensor(min_norms)).sum())
    return mp


def _result(
    pts: _Points,
    meas: _Measures,
    names: list[str],
    *,
    eps: float,
    label: str,
    confidence: dict[str, Any],
    min_perturbation: dict[str, Any],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """The JSON-ready result of :func:`compute_features`."""
    sens = _sensitivity_entries(meas, names)
    return {
        "label": label,
        "layers": names,
        "n_candidates": pts.m,
        "n_points": len(pts.keep),
        "indices": pts.keep.tolist(),
        "eps": eps,
        "units": UNITS,
        "random_delta": RANDOM_DELTA,
        "adversarial_delta": pts.source or "given x_adv",
        "sensitivity": sens,
        "delta_l2": {k: distribution(d.flatten(1).double().norm(dim=1)) for k, d in pts.deltas.items()},
        "per_point": {k: {lay: v.tolist() for lay, v in per.items()} for k, per in meas.ratios.items()},
        "confidence": confidence,
        "min_perturbation": min_perturbation,
        "seconds": {"clean_and_attack": pts.t_attack, "sensitivity": meas.t_sens, "jacobian": meas.t_jac,
                    "total": time.perf_counter() - pts.t0},
        "config": {"jacobian_points": meas.n_jac, "jacobian_k": settings["jacobian_k"],
                   "jacobian_iterations": settings["jacobian_iterations"],
                   "jacobian_method": "subspace iteration on JᵀJ (double-backward Jv, backward Jᵀu), "
                                      "Rayleigh-Ritz; σ in feature ℓ2 per input ℓ2",
                   "anisotropy": "per point: adversarial ratio / random ratio (same point, same layer)",
                   "margin_threshold": settings["margin_threshold"], "seed": settings["seed"],
                   "device": settings["device"],
                   "points": "the first n_candidates audited points, kept where clean-correct and moved by "
                             "the adversarial δ"},
    }


def write_features(result: Mapping[str, Any], out_dir: str | os.PathLike[str], *, label: str = "model") -> dict[str, Any]:
    """Draw ``features_sensitivity.png`` and ``features_confidence.png`` into ``out_dir`` and write
    ``features.json`` atomically (NaN/inf as null); return the result with ``files``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"sensitivity": str(plot_sensitivity({label: result}, out / FIGURES[0])),
             "confidence": str(plot_confidence({label: result}, out / FIGURES[1])),
             "json": str(out / JSON_NAME)}
    full = {**result, "files": files}
    write_text_atomic(out / JSON_NAME, json.dumps(to_jsonable(full), indent=1, allow_nan=False))
    log.info("features written to %s", out)
    return full


def measure_features(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, out_dir: str | os.PathLike[str],
                     **kwargs: Any) -> dict[str, Any]:
    """:func:`compute_features` (same keyword arguments) then :func:`write_features` into ``out_dir``."""
    result = compute_features(model, x, y, **kwargs)
    return write_features(result, out_dir, label=str(kwargs.get("label", "model")))


def _g(v: Any, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def sensitivity_rows(results: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """Table rows ``model, layer, random median [IQR], adversarial median [IQR], anisotropy, σ₁``."""
    rows = []
    for label, res in results.items():
        for lay, e in res["sensitivity"].items():
            sig = e.get("jacobian_sigma") or [None]
            rows.append([label, lay, f"{_g(e['random']['median'])} [{_g(e['random']['iqr'], '.2g')}]",
                         f"{_g(e['adversarial']['median'])} [{_g(e['adversarial']['iqr'], '.2g')}]",
                         _g(e["anisotropy"]["median"], ".3g"), _g(sig[0])])
    return rows


SENSITIVITY_HEADERS = ["model", "layer", "random: median [IQR]", "adversarial: median [IQR]",
                       "anisotropy (median adv/rand)", "Jacobian σ₁"]
CONFIDENCE_HEADERS = ["model", "accuracy", "median top p", "median logit margin", "share margin < thr.",
                      "median DeepFool ℓ2"]


def confidence_rows(results: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """Table rows ``model, accuracy, median top p, median margin, share below threshold, median DeepFool``."""
    rows = []
    for label, res in results.items():
        c = res["confidence"]
        rows.append([label, _g(c.get("accuracy"), ".3f"), _g(c["top_probability"]["median"]),
                     _g(c["logit_margin"]["median"]), f"{_g(c['share_below_margin'], '.3f')} (thr. {c['margin_threshold']:g})",
                     _g(res["min_perturbation"].get("median"))])
    return rows


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Both tables (per-layer sensitivity; confidence) for one or several models, GitHub style."""
    return (tabulate(sensitivity_rows(results), headers=SENSITIVITY_HEADERS, tablefmt="github") + "\n\n"
            + tabulate(confidence_rows(results), headers=CONFIDENCE_HEADERS, tablefmt="github"))
