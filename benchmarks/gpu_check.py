"""End-to-end check and timings of the GPU path, in one run (about 4-8 minutes on one GPU).

    python benchmarks/gpu_check.py [--device cuda] [--out runs/gpu_check] [--smoke]

Everything runs offline and needs only what the project installs. In order:

1. ``defend`` — the README's main command (``--model wide_resnet --method cure``, digits) on
   ``--device``, wall time of the whole command;
2. ``audit`` — that run's normal and CURE models side by side with ``--masking-check --geometry``;
3. ``steps`` — one optimisation step of ``standard``, ``cure --preset paper`` and ``pgd_at``
   (PGD(10)) on CIFAR-size ResNet-18 and WRN-28-10 at batch 128, through the method registry,
   with CUDA synchronisation around each step, median of 10 after 2 warm-up steps;
4. ``epoch`` — a full-size synthetic CIFAR-10 (50 000 + 10 000 random images written in
   torchvision's on-disk format) and one epoch of ``standard`` and of ``cure --preset paper``
   (ResNet-18) through the real ``defend`` command, read from its ``metrics.jsonl``;
5. a table: the GPU estimates of docs/gpu.md (normal model + method, hours) next to the same runs
   projected from the measured step times (epochs × steps per epoch × median step).

``--smoke`` runs every stage at a tiny size (a few images, batch 2, one step) so that the test suite
exercises the whole script on the CPU. Results go to stdout (the table) and ``--out/gpu_check.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

import cure_eval  # noqa: E402,F401  (registers the models)
from cure_eval.core.device import resolve_device  # noqa: E402
from cure_eval.core.io import read_jsonl, write_json_atomic  # noqa: E402
from cure_eval.data import get_dataset_spec  # noqa: E402
from cure_eval.data.synthetic import write_cifar10  # noqa: E402
from cure_eval.models import create_model, model_config_for  # noqa: E402
from cure_eval.training.methods import TrainContext, get_method  # noqa: E402

#: training-set sizes of the paper's data sets
TRAIN_SIZE = {"cifar10": 50_000, "svhn": 73_257}
#: (method, preset, epochs of the method) as the GPU commands of docs/gpu.md run them
RECIPES = [("standard", None, 100), ("cure", "paper", 20), ("pgd_at", None, 100)]
#: the table "What the paper reports ... and what the runs cost" of docs/gpu.md: estimated hours on one
#: GPU for (setting, method) = normal model (100 epochs) + method. tests/test_gpu_check.py checks
#: that these are the numbers of docs/gpu.md.
DOC_ESTIMATE_H = {
    ("CIFAR-10 ResNet-18", "cure"): 0.4, ("CIFAR-10 ResNet-18", "pgd_at"): 1.6,
    ("CIFAR-10 WRN-28-10", "cure"): 3.5, ("CIFAR-10 WRN-28-10", "pgd_at"): 15.0,
    ("SVHN ResNet-18", "cure"): 0.55, ("SVHN ResNet-18", "pgd_at"): 2.4,
}
#: setting → (dataset, model alias whose step times it uses)
SETTINGS = {"CIFAR-10 ResNet-18": ("cifar10", "resnet18"), "CIFAR-10 WRN-28-10": ("cifar10", "wide_resnet"),
            "SVHN ResNet-18": ("svhn", "resnet18")}


def _cli(module: str, argv: list[str], log: Path) -> float:
    """Run ``python -m module argv`` (the real CLI, a fresh process); its wall time in seconds."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        res = subprocess.run([sys.executable, "-m", module, *argv], stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"{module} {' '.join(argv)} failed (exit {res.returncode}); log {log}:\n" + "\n".join(tail))
    return seconds


def stage_defend(out: Path, device: str, smoke: bool) -> dict[str, Any]:
    run = out / "defend_run"
    argv = ["--model", "wide_resnet", "--method", "cure", "--device", device, "--out", str(run),
            "--cache-dir", str(out / "cache"), "--no-cache", "--no-progress"]
    if smoke:
        argv += ["--pretrain-epochs", "1", "--epochs", "1", "--train-n", "128", "--eval-n", "10"]
    seconds = _cli("cure_eval.defend", argv, out / "defend.log")
    res = json.loads((run / "results.json").read_text())
    return {"seconds": seconds, "run": str(run),
            "standard": res["standard"], "cure": res["cure"],
            "epoch_seconds": {m: [r["seconds"] for r in read_jsonl(run / m / "metrics.jsonl")] for m in ("standard", "cure")}}


def stage_audit(out: Path, device: str, run: Path, smoke: bool) -> dict[str, Any]:
    audit = out / "audit"
    argv = ["--checkpoint", str(run / "standard"), "--checkpoint", str(run / "cure"), "--masking-check",
            "--geometry", "--device", device, "--out", str(audit), "--restart", "--no-progress"]
    if smoke:
        argv += ["--n", "6", "--spsa-iterations", "4", "--geometry-n", "2", "--top-k", "2"]
    seconds = _cli("cure_eval.audit", argv, out / "audit.log")
    found = {}
    for name in ("standard", "cure"):
        res = json.loads(next(audit.glob(f"*{name}*/results.json")).read_text())
        found[name] = {"clean": res["clean_accuracy"], "worst_case": res["worst_case_accuracy"],
                       "masking": res.get("masking", {}).get("verdict")}
    return {"seconds": seconds, **found}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_steps(device: torch.device, *, batch: int, repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    """Median seconds per step of each recipe on each CIFAR-size model (synchronised)."""
    spec = get_dataset_spec("cifar10")
    out: dict[str, dict[str, float]] = {}
    for alias in ("resnet18", "wide_resnet"):
        mcfg = model_config_for(alias, spec)
        torch.manual_seed(0)
        model = create_model(mcfg).to(device).train()
        x = torch.rand(batch, *spec.input_shape, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        out[alias] = {}
        for name, preset, _ in RECIPES:
            cls = get_method(name)
            cfg = cls.make_config(spec, mcfg.name, preset=preset)
            ctx = TrainContext(spec=spec, eps=spec.default_eps / 255, model_name=mcfg.name, device=device,
                               epochs=cfg.epochs, steps_per_epoch=TRAIN_SIZE["cifar10"] // batch)
            method = cls(cfg, ctx)
            method.start_epoch(cfg.epochs - 1)  # final h / γ
            opt, _ = method.make_optimizer(model)
            times = []
            for i in range(warmup + repeats):
                _sync(device)
                t0 = time.perf_counter()
                method.step(model, opt, x, y)
                _sync(device)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            out[alias][name] = statistics.median(times)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def stage_epoch(out: Path, device: str, smoke: bool) -> dict[str, Any]:
    data = out / "cifar10_synthetic"
    shutil.rmtree(data, ignore_errors=True)
    t0 = time.perf_counter()
    write_cifar10(data, n_per_batch=8 if smoke else 10_000, n_test=8 if smoke else 10_000)
    write_seconds = time.perf_counter() - t0
    run = out / "epoch_run"
    argv = ["--dataset", "cifar10", "--data-dir", str(data), "--model", "resnet18", "--method", "cure",
            "--preset", "paper", "--pretrain-epochs", "1", "--epochs", "1", "--device", device,
            "--out", str(run), "--cache-dir", str(out / "cache"), "--no-cache", "--no-progress",
            "--eval-n", "4" if smoke else "1000"]
    if smoke:
        argv += ["--batch-size", "8", "--pretrain-batch-size", "8", "--method-arg", "probe_points=2",
                 "--method-arg", "probe_gaussian=2"]
    seconds = _cli("cure_eval.defend", argv, out / "epoch.log")
    epoch = {m: read_jsonl(run / m / "metrics.jsonl")[0]["seconds"] for m in ("standard", "cure")}
    shutil.rmtree(data, ignore_errors=True)  # 0.2 GB of random pixels
    return {"write_seconds": write_seconds, "command_seconds": seconds, "epoch_seconds": epoch,
            "train_images": 40 if smoke else 50_000}


def projection(steps: dict[str, dict[str, float]], batch: int) -> list[dict[str, Any]]:
    """Hours of each documented GPU command (normal model + method) from the measured step times."""
    rows = []
    for (setting, method), estimate in DOC_ESTIMATE_H.items():
        dataset, alias = SETTINGS[setting]
        per_epoch = TRAIN_SIZE[dataset] // batch
        epochs = {name: e for name, _, e in RECIPES}
        hours = (epochs["standard"] * steps[alias]["standard"] + epochs[method] * steps[alias][method]) * per_epoch / 3600
        rows.append({"setting": setting, "method": method, "estimate_h": estimate, "measured_h": hours,
                     "ratio": hours / estimate})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default: auto)")
    ap.add_argument("--out", default="runs/gpu_check", help="work folder (default: runs/gpu_check)")
    ap.add_argument("--smoke", action="store_true", help="every stage at a tiny size (for the CPU test)")
    ap.add_argument("--stages", default="defend,audit,steps,epoch", help="stages to run (default: all)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes in the timed steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    batch, repeats, warmup = (2, 1, 0) if args.smoke else (128, 10, 2)
    report: dict[str, Any] = {"device": str(device), "smoke": args.smoke, "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                              "batch": batch}
    t_all = time.perf_counter()
    if "defend" in stages:
        report["defend"] = stage_defend(out, str(device), args.smoke)
        print(f"defend: {report['defend']['seconds']:.0f} s", file=sys.stderr)
    if "audit" in stages and "defend" in report:
        report["audit"] = stage_audit(out, str(device), Path(report["defend"]["run"]), args.smoke)
        print(f"audit: {report['audit']['seconds']:.0f} s", file=sys.stderr)
    if "steps" in stages:
        report["steps"] = stage_steps(device, batch=batch, repeats=repeats, warmup=warmup)
        report["projection"] = projection(report["steps"], batch)
        print("steps: done", file=sys.stderr)
    if "epoch" in stages:
        report["epoch"] = stage_epoch(out, str(device), args.smoke)
        print(f"epoch: {report['epoch']['command_seconds']:.0f} s", file=sys.stderr)
    report["total_seconds"] = time.perf_counter() - t_all
    write_json_atomic(out / "gpu_check.json", report)

    where = report["gpu"] or str(device)
    print(f"# GPU check on {where} (torch {torch.__version__}){' — SMOKE SIZE, not a measurement' if args.smoke else ''}")
    if "defend" in report:
        d = report["defend"]
        print(f"defend default command: {d['seconds']:.1f} s; standard {d['standard']['clean_accuracy']:.3f} / "
              f"{d['standard']['pgd20_accuracy']:.3f}, cure {d['cure']['clean_accuracy']:.3f} / {d['cure']['pgd20_accuracy']:.3f} "
              "(clean / PGD(20))")
    if "audit" in report:
        a = report["audit"]
        print(f"audit --masking-check --geometry (both models): {a['seconds']:.1f} s; worst case standard "
              f"{a['standard']['worst_case']:.3f}, cure {a['cure']['worst_case']:.3f}; masking "
              f"{a['standard']['masking']} / {a['cure']['masking']}")
    if "steps" in report:
        s = report["steps"]
        print(tabulate([[alias, *(f"{1000 * s[alias][m]:.1f}" for m, _, _ in RECIPES),
                         *(f"{s[alias][m] / s[alias]['standard']:.2f}×" for m, _, _ in RECIPES[1:])] for alias in s],
                       headers=[f"model (batch {batch})", "standard ms", "cure ms", "pgd_at ms", "cure / std", "pgd_at / std"],
                       tablefmt="github"))
        print(tabulate([[r["setting"], r["method"], f"{r['estimate_h']:g}", f"{r['measured_h']:.2f}", f"{r['ratio']:.2f}"]
                        for r in report["projection"]],
                       headers=["setting", "method", "docs/gpu.md estimate (h)", "from measured steps (h)", "measured / estimate"],
                       tablefmt="github"))
    if "epoch" in report:
        e = report["epoch"]
        per_step = {m: e["epoch_seconds"][m] for m in ("standard", "cure")}
        print(f"one epoch on {e['train_images']} synthetic CIFAR-10 images through defend (ResNet-18): "
              f"standard {per_step['standard']:.1f} s, cure --preset paper {per_step['cure']:.1f} s "
              f"(data written in {e['write_seconds']:.1f} s)")
        if "steps" in report and not args.smoke:
            n_steps = math.floor(e["train_images"] / 128)
            for m in ("standard", "cure"):
                pred = n_steps * report["steps"]["resnet18"][m]
                print(f"  {m}: epoch / (steps × median step) = {per_step[m] / pred:.2f} (training-loop overhead)")
    print(f"total {report['total_seconds']:.0f} s; details in {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
