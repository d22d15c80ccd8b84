"""The audit's report: ``per_sample.csv``, ``results.md``, ``results.json`` (written last), the
results table, AutoAttack next to the suite's own worst case, and ``comparison.md`` for several
models.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from tabulate import tabulate

from ..attacks import SuiteResult, get_attack, list_attacks
from ..core.io import write_json_atomic, write_text_atomic

log = logging.getLogger("cure_eval.audit")


def attack_label(name: str) -> str:
    """The report label of an attack (``clean`` or the registered attack's ``label``)."""
    return "clean" if name == "clean" else get_attack(name).display_name()


def write_comparison(out: Path, combined: dict[str, dict[str, Any]], profiles: dict[str, Any]) -> None:
    """Side-by-side table of several audited models (and their curvature profiles on one figure)."""
    names = list(combined)
    attacks = [a for a in list_attacks() if any(a in combined[m]["attacks"] for m in names)]
    rows = []
    for m in names:
        s = combined[m]
        row = [m, f"{100 * s['clean_accuracy']:.1f}"]
        for a in attacks:
            r = s["attacks"].get(a, {})
            acc = r.get("robust_accuracy", r.get("cumulative_robust_accuracy"))
            row.append("" if acc is None else f"{100 * acc:.1f}")
        row.append(f"{100 * s['worst_case_accuracy']:.1f}")
        rows.append(row)
    table = tabulate(rows, headers=["model", "clean", *[attack_label(a) for a in attacks], "worst case"],
                     tablefmt="github")
    if profiles:
        from ..geometry import plot_profiles

        plot_profiles(profiles, out / "profiles.png")
        geo_rows = [[m, f"{g['top_eigenvalues'][0]:.4g}", f"{g['hz_norm']:.4g}", f"{g['frobenius']:.4g}",
                     f"{g['alignment']:.3f}", number(g.get("wci"), ".4g")] for m, g in profiles.items()]
        table += "\n\n" + tabulate(geo_rows, headers=["model", "λ_max", "‖Hz‖", "‖H‖_F", "alignment", "WCI"],
                                   tablefmt="github")
    write_text_atomic(out / "comparison.md", table + "\n")
    log.info("comparison written to %s", out / "comparison.md")


def write_features_comparison(out: Path, combined: dict[str, dict[str, Any]]) -> None:
    """The feature measurements of several audited models side by side: one line per model in
    ``features_sensitivity.png`` and ``features_confidence.png`` on top of ``out``, and their
    tables appended to ``comparison.md`` (nothing when fewer than two models have them)."""
    feats = {m: s["features"] for m, s in combined.items()
             if isinstance(s.get("features"), dict) and "sensitivity" in s["features"]}
    if len(feats) < 2:
        return
    from ..features import format_table as features_table
    from ..features import plot_confidence, plot_sensitivity

    plot_sensitivity(feats, out / "features_sensitivity.png")
    plot_confidence(feats, out / "features_confidence.png")
    text = (out / "comparison.md").read_text(encoding="utf-8")
    write_text_atomic(out / "comparison.md", text + "\n" + features_table(feats) + "\n")


def number(value: Any, spec: str) -> str:
    """``format(value, spec)``, or ``n/a`` for a measurement that did not apply (``None``)."""
    return "n/a" if value is None else format(value, spec)


def has_geometry(summary: dict[str, Any]) -> bool:
    """True when an audit summary holds a measured geometry (not absent, not "not applicable")."""
    g = summary.get("geometry")
    return isinstance(g, dict) and "top_eigenvalues" in g


def format_results_table(summary: dict[str, Any]) -> str:
    """The summary as a GitHub-flavoured table (accuracies in %)."""
    n = max(int(summary.get("n", 0)), 1)
    total = summary.get("passes")
    rows = [["clean", f"{100 * summary['clean_accuracy']:.1f}", "", "",
             _per_point(total.get("clean") if total else None, n)]]
    for name, r in summary["attacks"].items():
        acc = r.get("robust_accuracy")
        if acc is None:
            acc = r.get("cumulative_robust_accuracy")
            label = f"{attack_label(name)} (cumulative)"
        else:
            label = attack_label(name)
        med = r.get("median_min_norm")
        shared = r.get("passes_shared_with")
        rows.append([label, f"{100 * acc:.1f}", f"{r['seconds']:.1f}", "" if med is None else f"{med:.3f}",
                     _per_point(r.get("passes"), n) + (f" ({shared}, shared)" if shared else "")])
    rows.append(["worst case", f"{100 * summary['worst_case_accuracy']:.1f}", f"{summary['seconds']:.1f}", "",
                 _per_point(total, n) + (" (all)" if total else "")])
    whole = summary.get("total_passes")
    if whole and whole.get("stages"):
        rows.append([f"audit with {', '.join(whole['stages'])}", "", "", "", _per_point(whole, n)])
    table = tabulate(rows, headers=["attack", "accuracy %", "seconds", "median min. perturbation",
                                    "passes f+b per point"], tablefmt="github")
    comparison = format_autoattack_comparison(summary)
    table += "\n\n" + comparison if comparison else ""
    feats = summary.get("features")
    if isinstance(feats, dict) and "sensitivity" in feats:
        from ..features import format_table as features_table

        label = str(summary.get("model", {}).get("method") or summary.get("model", {}).get("model") or "model")
        table += (f"\n\nFeature sensitivity ‖Δf_l‖₂/‖δ‖₂ on {feats['n_points']} points, ε = {feats['eps'] * 255:.4g}/255 "
                  f"(random sign δ vs the suite's PGD(20) δ), and confidence:\n\n" + features_table({label: feats}))
    return table


def _per_point(passes: dict[str, Any] | None, n: int) -> str:
    """``"f+b"``: forward and backward passes per audited point (of all ``n``, not only the attacked)."""
    if not passes:
        return ""
    return f"{passes['forward'] / n:.0f}+{passes['backward'] / n:.0f}"


def format_autoattack_comparison(summary: dict[str, Any]) -> str:
    """AutoAttack next to the suite's own worst case, with the points where they disagree ('' if
    the summary has no such comparison)."""
    comp = summary.get("autoattack_comparison") or {}
    lines = []
    for name, c in comp.items():
        own = ", ".join(attack_label(a) for a in c["suite_attacks"])
        lines.append(
            f"{attack_label(name)} {100 * c['robust_accuracy']:.1f} % vs the suite's own worst case "
            f"{100 * c['suite_worst_case_accuracy']:.1f} % ({own}): gap {100 * c['gap']:+.1f} points; "
            f"{len(c['only_reference'])} points broken only by {attack_label(name)}"
            f"{_points(c['only_reference'])}, {len(c['only_suite'])} only by the suite{_points(c['only_suite'])}")
        broken = summary["attacks"].get(name, {}).get("broken_by")
        if broken:
            lines.append(f"{attack_label(name)} broke: " + ", ".join(f"{k} {v}" for k, v in broken.items()))
    return "\n\n".join(lines)


def _points(indices: list[int], most: int = 20) -> str:
    if not indices:
        return ""
    shown = ", ".join(map(str, indices[:most]))
    return f" (test indices {shown}{', …' if len(indices) > most else ''})"


def per_sample_csv(suite: SuiteResult) -> str:
    """``per_sample.csv``: one row per (point, attack) (:func:`~cure_eval.attacks.suite_rows`)."""
    cols = ["index", "label", "clean_pred", "attack", "attacked", "adv_pred", "success", "robust",
            "adv_loss", "linf", "l2", "min_norm", "broken_by", "best_fooled", "forward_share", "backward_share"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for row in suite.rows():
        w.writerow({k: ("" if row[k] is None else row[k]) for k in cols})
    return buf.getvalue()


def write_report(out: Path, suite: SuiteResult, summary: dict[str, Any], *, title: str) -> None:
    """``per_sample.csv``, ``results.md`` and, last, ``results.json`` of one audited model."""
    write_text_atomic(out / "per_sample.csv", per_sample_csv(suite))
    write_text_atomic(out / "results.md", f"# {title}\n\n{format_results_table(summary)}\n")
    write_json_atomic(out / "results.json", summary)
