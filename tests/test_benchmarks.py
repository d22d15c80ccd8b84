"""Every benchmark end to end at its ``--tiny`` size, and the shared check of their figures.

A benchmark nothing runs rots (``bench_audit.py`` once printed zero model inputs for every attack
and exited 0). Each one here runs as a user runs it (``python benchmarks/x.py --tiny``, one
thread, in a temporary folder) and must exit 0 with figures that are not degenerate: positive
counts and times, finite ratios, the rows it promises. The benchmarks check this themselves
(``benchmarks/_common.py``); the tests read the printed tables, so a check that stops checking
fails here too.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from cure_eval.attacks.apgd_t import APGDTConfig

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _load_common() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks_common", BENCHMARKS / "_common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _load_common()


def run_benchmark(name: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python benchmarks/NAME.py ARGS`` on one thread, in ``tmp_path`` (nothing written elsewhere)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def run_tiny(name: str, tmp_path: Path) -> str:
    res = run_benchmark(name, tmp_path, "--tiny")
    assert res.returncode == 0, f"{name} --tiny exited {res.returncode}\n{res.stdout}\n{res.stderr[-3000:]}"
    assert list(tmp_path.iterdir()) == [], "a --tiny benchmark wrote into its working folder"
    return res.stdout


def number(cell: str) -> float:
    """A printed figure as a float: ``16,283`` → 16283, ``5.96×`` → 5.96, ``83.3`` → 83.3."""
    return float(cell.strip().replace(",", "").rstrip("×%"))


def github_tables(text: str) -> list[list[dict[str, str]]]:
    """Every ``tablefmt="github"`` table in ``text``, each as rows of header → cell."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if block:
            header, rows = block[0], [r for r in block[1:] if not set("".join(r)) <= set("-:")]
            tables.append([dict(zip(header, r, strict=True)) for r in rows])
            block = []
    return tables


def simple_table(text: str, first_header: str) -> list[dict[str, str]]:
    """The tabulate ``simple`` table whose header starts with ``first_header``, cut at its dashes."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_header))
    spans = [m.span() for m in re.finditer(r"-+", lines[start + 1])]
    header = [lines[start][a:b].strip() for a, b in spans]
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        rows.append({h: line[a:b if i < len(spans) - 1 else None].strip()
                     for i, (h, (a, b)) in enumerate(zip(header, spans, strict=True))})
    return rows


def positive(cell: str) -> bool:
    value = number(cell)
    return math.isfinite(value) and value > 0


def finite(cell: str) -> bool:
    return math.isfinite(number(cell))


# --- the shared check (fast) ------------------------------------------------------------------

def test_check_rejects_a_zero_count_nan_and_inf_and_an_empty_table() -> None:
    check, bad = common.check_figures, common.DegenerateFigure
    with pytest.raises(bad, match="count 'model evaluations' is 0"):
        check(counts={"points": 8, "model evaluations": 0})
    with pytest.raises(bad, match="count 'HVPs' is -1"):
        check(counts={"HVPs": -1})
    with pytest.raises(bad, match="ratio 'AutoAttack / suite' is nan"):
        check(ratios={"AutoAttack / suite": float("nan")})
    with pytest.raises(bad, match="ratio 'on / off' is inf"):
        check(ratios={"on / off": float("inf")})
    with pytest.raises(bad, match="time 'plain step' is -inf"):
        check(times={"plain step": float("-inf")})
    with pytest.raises(bad, match="time 'cure step' is 0.0"):
        check(times={"cure step": 0.0})
    with pytest.raises(bad, match="table 'settings' is empty"):
        check(tables={"settings": []})
    with pytest.raises(bad, match="is not a number"):
        check(counts={"points": None})


def test_check_accepts_sound_figures_and_a_zero_ratio() -> None:
    # a robust accuracy of 0 is a result, not a degenerate figure; numpy-like floats are numbers
    common.check_figures(counts={"points": 8, "FLOPs": 3.3e9}, times={"step": 1e-4},
                         ratios={"robust": 0.0, "speed-up": 0.21, "eigenvalue": -3.5}, tables={"rows": [[1]]})


def test_exit_if_degenerate_exits_1_with_one_line() -> None:
    with pytest.raises(SystemExit) as info:
        common.exit_if_degenerate(ratios={"x / y": math.nan})
    message = str(info.value.code)
    assert "\n" not in message and "degenerate figures" in message and "'x / y' is nan" in message


def test_tiny_sizes_replace_the_defaults_but_not_explicit_options() -> None:
    import argparse

    def parser() -> argparse.ArgumentParser:
        ap = argparse.ArgumentParser()
        ap.add_argument("--n", type=int, default=100)
        ap.add_argument("--rounds", type=int, default=3)
        return ap

    assert vars(common.parse_args(parser(), [], tiny={"n": 8, "rounds": 1})) == {"n": 100, "rounds": 3, "tiny": False}
    assert vars(common.parse_args(parser(), ["--tiny"], tiny={"n": 8, "rounds": 1})) == {"n": 8, "rounds": 1,
                                                                                          "tiny": True}
    assert common.parse_args(parser(), ["--tiny", "--n", "5"], tiny={"n": 8}).n == 5
    with pytest.raises(ValueError, match="points"):
        common.parse_args(parser(), ["--tiny"], tiny={"points": 8})


# --- every benchmark at --tiny (slow) ---------------------------------------------------------

@pytest.mark.slow
def test_bench_autoattack_tiny(tmp_path: Path) -> None:
    out = run_tiny("bench_autoattack", tmp_path)
    assert int(re.search(r"8 points \((\d+) clean-correct\)", out)[1]) > 0  # type: ignore[index]
    rows = {r["attack"]: r for r in github_tables(out)[0]}
    for attack in ("AutoAttack (standard)", "fgsm", "pgd7,pgd20,pgd40,pgd100", "spsa", "suite (FGSM, PGD family, SPSA)"):
        assert positive(rows[attack]["model evaluations"]), rows[attack]
        assert number(rows[attack]["seconds"]) >= 0
    assert 0 <= number(rows["AutoAttack (standard)"]["robust %"]) <= 100
    seconds, evaluations = re.search(r"AutoAttack / suite: ([\d.]+)× the seconds, ([\d.]+)× the model", out).groups()  # type: ignore[union-attr]
    assert positive(seconds) and positive(evaluations)


@pytest.mark.slow
def test_bench_cure_step_tiny(tmp_path: Path) -> None:
    out = run_tiny("bench_cure_step", tmp_path)
    rows = {r["step"]: r for r in github_tables(out)[0]}
    assert set(rows) == {"plain", "cure", "cure_train", "reference", "pgd10_at"}
    assert all(positive(r["seconds"]) and positive(r["vs plain"]) for r in rows.values()), rows
    assert number(rows["plain"]["vs plain"]) == 1.0
    ratios = re.findall(r"reference-structured / ours ([\d.]+)×.*ours / plain ([\d.]+)×", out)
    assert len(ratios) == 2 and all(positive(v) for pair in ratios for v in pair)


@pytest.mark.slow
def test_bench_features_tiny(tmp_path: Path) -> None:
    out = run_tiny("bench_features", tmp_path)
    attacked, layers = re.search(r"\((\d+) clean-correct and attacked\), (\d+) layers", out).groups()  # type: ignore[union-attr]
    assert int(attacked) > 0 and int(layers) > 0
    rows = github_tables(out)[0]
    assert len(rows) == 6 and rows[-1]["step"] == "--features in all"
    assert all(number(r["seconds"]) >= 0 and finite(r["× forward pass"]) for r in rows), rows
    assert positive(rows[0]["seconds"]) and positive(rows[-1]["seconds"]) and positive(rows[-1]["× forward pass"])


@pytest.mark.slow
def test_bench_geometry_tiny(tmp_path: Path) -> None:
    out = run_tiny("bench_geometry", tmp_path)
    profiles = simple_table(out, "curvature profile")
    assert len(profiles) == 3  # batched, full spectrum, and one point at a time (--sequential)
    for row in profiles:
        assert positive(row["HVPs/point"]) and positive(row["s/point"]), row
        assert all(math.isfinite(float(v)) for v in row["mean top-5 eigenvalues"].split()), row
    hvps = simple_table(out, "HVP method")
    assert len(hvps) == 5
    assert all(positive(r["HVPs"]) and positive(r["HVPs/s"]) and positive(r["vs jvp(grad)"]) for r in hvps), hvps
    differences = re.findall(r"relative difference, .*: (\S+)$", out, flags=re.MULTILINE)
    assert len(differences) == 4 and all(finite(d) for d in differences)


@pytest.mark.slow
def test_bench_paper_cost_tiny(tmp_path: Path) -> None:
    out = run_tiny("bench_paper_cost", tmp_path)
    steps, estimates = github_tables(out)
    assert {r["method"] for r in steps} == {"standard", "cure", "pgd_at"}
    for r in steps:
        assert all(positive(r[k]) for k in ("CPU s / step", "time vs standard", "GFLOP / image", "FLOPs vs standard")), r
    assert {r["setting"] for r in estimates} == {"CIFAR-10 ResNet-18", "SVHN ResNet-18"}
    assert all(positive(r["min / epoch"]) and positive(r["total h"]) for r in estimates), estimates


@pytest.mark.slow
def test_bench_train_loop_tiny(tmp_path: Path) -> None:
    out = run_tiny("bench_train_loop", tmp_path)
    assert "(128 images, WRN-16-4)" in out
    rows = github_tables(out)[0]
    assert {(r["method"], r["loop"]) for r in rows} == {
        (m, v) for m in ("standard", "cure")
        for v in ("bare", "before", "train (sync_every=50)", "train (sync_every=1)")}
    assert all(positive(r["seconds"]) and positive(r["/ bare"]) and positive(r["/ before"]) for r in rows), rows


@pytest.mark.slow
def test_bench_two_jobs_tiny(tmp_path: Path) -> None:
    out = run_tiny("bench_two_jobs", tmp_path)
    (row,) = github_tables(out)[0]
    assert row["setting"] == "libgomp default"
    assert positive(row["one job (s)"]) and positive(row["two jobs side by side (s)"])
    assert positive(row["pair / alone"]) and number(row["alone vs libgomp default"]) == 1.0


@pytest.mark.slow
def test_bench_wci_tracking_tiny(tmp_path: Path) -> None:
    out = run_tiny("bench_wci_tracking", tmp_path)
    rows = {r["tracking"]: r for r in github_tables(out)[0]}
    assert set(rows) == {"off", "on"}
    for r in rows.values():
        assert positive(r["train() s/epoch (median)"]) and positive(r["epoch loop s (median)"]) and positive(r["ratio"])
    measure, share = re.search(r"measure alone: ([\d.]+) s \(median\) = ([\d.]+)% of an untracked", out).groups()  # type: ignore[union-attr]
    assert positive(measure) and positive(share)


@pytest.mark.slow
def test_measure_autoattack_gap_tiny(tmp_path: Path) -> None:
    out = run_tiny("measure_autoattack_gap", tmp_path)
    rows = {r["model"]: r for r in github_tables(out)[0]}
    assert set(rows) == {"cnn normal", "cnn shattered", "cnn vanishing", "cnn stochastic"}
    for r in rows.values():
        assert positive(r["clean %"]) and 0 <= number(r["AutoAttack %"]) <= 100, r
        assert finite(re.search(r"\(([\d.]+)\)", r["only AutoAttack (share)"])[1])  # type: ignore[index]
    # the shattered-gradient model is the one the finding is for: AutoAttack breaks what the suite cannot
    assert number(re.search(r"\(([\d.]+)\)", rows["cnn shattered"]["only AutoAttack (share)"])[1]) > 0  # type: ignore[index]


@pytest.mark.slow
def test_a_degenerate_result_exits_1_with_one_line_on_stderr(tmp_path: Path) -> None:
    # no models at all (no wrappers, no checkpoint): an empty table, which once printed and exited 0
    res = run_benchmark("measure_autoattack_gap", tmp_path, "--tiny", "--no-wrappers")
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stdout == ""
    assert res.stderr.strip().splitlines()[-1] == ("measure_autoattack_gap.py: degenerate figures, nothing reported: "
                                                   "table 'models (--no-wrappers needs a --checkpoint)' is empty")


@pytest.mark.slow
def test_bench_audit_tiny(tmp_path: Path) -> None:
    out = run_tiny("bench_audit", tmp_path)
    counted = re.findall(r"^(fgsm|apgd-ce|apgd-dlr|deepfool_linf|spsa)\s.*?([\d,]+) f / ([\d,]+) b", out, re.M)
    assert {name for name, _, _ in counted} == {"fgsm", "apgd-ce", "apgd-dlr", "deepfool_linf", "spsa"}, out
    for name, fwd, bwd in counted:
        assert positive(fwd), name
        assert positive(bwd) or name == "spsa", name  # SPSA is gradient-free
    ratio = re.search(r"-> ([\d.]+)x \(target <= 0.65x\); results identical: True", out)
    assert ratio is not None and positive(ratio[1]), out


@pytest.mark.slow
def test_bench_strength_per_cost_tiny(tmp_path: Path) -> None:
    res = run_benchmark("bench_strength_per_cost", tmp_path, "--tiny")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {m[1].strip(): m[2].split() for m in re.finditer(r"^(FGSM>PGD\(20\)|CE>T[^ ]*|AutoAttack standard)\s+(.*)$",
                                                             res.stdout, re.M)}
    assert set(rows) == {"FGSM>PGD(20)", "CE>T(malt,3)>Sq(100)", "AutoAttack standard"}, res.stdout
    for label, cols in rows.items():  # worst %, AA-only, suite-only, fwd/pt, bwd/pt, (f+b)/AA's, seconds
        assert 0 <= number(cols[0]) <= 100 and positive(cols[3]) and positive(cols[4]), label
        assert positive(cols[5]), label
    assert number(rows["AutoAttack standard"][5]) == 1


@pytest.mark.slow
def test_measure_spsa_cost_tiny(tmp_path: Path) -> None:
    out = run_tiny("measure_spsa_cost", tmp_path)
    rows = [line for line in out.splitlines()  # the table's rows (the progress lines have " | ")
            if line.startswith(("normal ", "shattered ", "vanishing ", "stochastic ")) and " | " not in line]
    assert len(rows) == 8, out  # 4 models × 2 settings
    assert all(positive(line.split()[-1]) or line.split()[-1] == "0" for line in rows)
    assert any("shattered" in line and "suspect" in line for line in rows)


@pytest.mark.slow
def test_bench_masking_cost_tiny(tmp_path: Path) -> None:
    (rows,) = github_tables(run_tiny("bench_masking_cost", tmp_path))
    assert [(r["model"], r["run"]) for r in rows] == [
        (m, run) for m in ("normal CNN", "shattered") for run in (
            "audit --masking-check, SPSA/Square on all", "audit --masking-check, SPSA/Square on auto", "AutoAttack standard")]
    for r in rows:
        assert positive(r["fwd / pt"]) and positive(r["(f+b) / AA's"]), r
        assert positive(r["bwd / pt"]), r  # every run here takes gradients
    aa = [r for r in rows if r["run"] == "AutoAttack standard"]
    assert all(number(r["(f+b) / AA's"]) == 1 for r in aa)
    shattered = [r for r in rows if r["model"] == "shattered" and r["verdict"]]
    assert {r["verdict"] for r in shattered} == {"suspect"}, shattered


def _load_strength_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_strength_per_cost", BENCHMARKS / "bench_strength_per_cost.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules[spec.name]
    return bench


def test_default_suite_label_follows_the_librarys_defaults() -> None:
    """The benchmark's ``default`` row is labelled with the audit's settings, read from the configs."""
    from cure_eval.attacks.apgd import APGDConfig
    from cure_eval.attacks.square import SquareConfig

    bench = _load_strength_bench()
    r, k, q = APGDConfig().restarts, APGDTConfig().targets, SquareConfig().queries
    assert bench.DEFAULT_SUITE == f"FGSM>PGD(20)>{'CE' if r == 1 else f'CE({r}r)'}>T(malt,{k})>Sq({q})"
    steps = bench.candidate_suites(8 / 255, tiny=False)[bench.DEFAULT_SUITE]
    assert [s.name for s in steps] == ["fgsm", "pgd20", "apgd-ce", "apgd-t", "square"]
    assert (steps[2].config.restarts, steps[3].config.targets, steps[4].config.queries) == (r, k, q)


def test_autoattack_cache_round_trip_and_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The cache gives back what was saved under the same key; another key, a corrupt file or a
    foreign JSON file are refused with one line on stderr (AutoAttack then runs again)."""
    import torch

    bench = _load_strength_bench()
    passes = bench.Passes(forward=123, backward=45)
    aa = bench.Outcome("AutoAttack standard", torch.tensor([True, False, True]), passes, 9.5,
                       [("apgd-ce", 0, 1, bench.Passes(), 1.5)])
    path = str(tmp_path / "aa.json")
    bench.save_autoattack_cache(path, "k1", aa)
    back = bench.load_autoattack_cache(path, "k1")
    assert back is not None and torch.equal(back.robust, aa.robust)
    assert (back.passes.forward, back.passes.backward, back.seconds) == (123, 45, 9.5)
    assert [(s, b, sec) for s, _a, b, _p, sec in back.per_attack] == [("apgd-ce", 1, 1.5)]
    assert bench.load_autoattack_cache(path, "k2") is None
    for text in ("{not json", "[1, 2]", '{"key": "k1"}'):
        Path(path).write_text(text)
        assert bench.load_autoattack_cache(path, "k1") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and "another model" in err[0] and all("runs again" in e for e in err), err


def test_autoattack_cifar_images_are_foolboxs_in_the_unit_range() -> None:
    """The CIFAR part of the strength benchmark reads the same images and labels as foolbox's own
    ``samples`` (channels first, in [0, 1]) and pyautoattack's example ResNet-18 classifies them."""
    import foolbox as fb
    import torch

    model, x, y = _load_strength_bench().autoattack_cifar()
    model.eval()
    ref_x, ref_y = fb.utils.samples(fb.PyTorchModel(model, bounds=(0, 1)), dataset="cifar10", batchsize=20,
                                    data_format="channels_first", bounds=(0, 1))
    assert x.shape == (20, 3, 32, 32) and torch.allclose(x, ref_x.cpu(), atol=1e-6) and torch.equal(y, ref_y.cpu())
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    assert acc >= 0.9, acc  # trained weights, not a random ResNet-18 (100 % on these 20 images)


@pytest.mark.slow
def test_bench_strength_per_cost_runs_on_autoattacks_cifar_model(tmp_path: Path) -> None:
    res = run_benchmark("bench_strength_per_cost", tmp_path, "--autoattack-cifar", "--eps", "2", "--n", "2",
                        "--only", "default", "--no-autoattack")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "dataset cifar10; n = 2 (clean-correct 2); eps = 2/255" in res.stdout, res.stdout
    label = _load_strength_bench().DEFAULT_SUITE  # the library's defaults (test above)
    row = re.search(rf"^{re.escape(label)}\s+(.*)$", res.stdout, re.M)
    assert row is not None, res.stdout
    cols = row[1].split()  # worst %, AA-only, suite-only (nan without AutoAttack), fwd/pt, bwd/pt, ratio, s
    assert 0 <= number(cols[0]) <= 100 and positive(cols[3]) and positive(cols[4]), cols
