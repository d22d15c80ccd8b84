"""``benchmarks/gpu_check.py`` end to end at its smoke size on the CPU, and its estimates (docs/gpu.md)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--device", "cpu",
                          "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["smoke"] and report["device"] == "cpu"
    assert report["defend"]["seconds"] > 0 and 0 <= report["defend"]["cure"]["pgd20_accuracy"] <= 1
    assert report["audit"]["cure"]["masking"] in ("pass", "suspect")
    for alias in ("resnet18", "wide_resnet"):
        assert set(report["steps"][alias]) == {"standard", "cure", "pgd_at"}
        assert all(v > 0 for v in report["steps"][alias].values())
    assert len(report["projection"]) == 6 and all(r["measured_h"] > 0 for r in report["projection"])
    assert all(v > 0 for v in report["epoch"]["epoch_seconds"].values())
    assert "SMOKE SIZE" in res.stdout and "docs/gpu.md estimate (h)" in res.stdout  # the table, on stdout
    assert not (out / "cifar10_synthetic").exists()  # the random data is cleaned up


def test_the_estimates_in_the_script_are_those_of_docs_gpu_md() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    doc = (ROOT / "docs" / "gpu.md").read_text(encoding="utf-8")
    for (setting, method), hours in gpu_check.DOC_ESTIMATE_H.items():
        row = next(line for line in doc.splitlines()
                   if line.startswith(f"| {setting} | `{method}") and "**" in line)
        assert float(re.findall(r"\*\*([\d.]+) h\*\*", row)[0]) == hours, row
