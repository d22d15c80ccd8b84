"""measure_geometry end to end on the trained digits CNN, plus the plane and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cure_eval.geometry import format_table, loss_plane, measure_geometry, plot_profiles

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: str | Path) -> None:
    p = Path(path)
    assert p.is_file() and p.read_bytes()[:8] == PNG_MAGIC
    with Image.open(p) as im:
        im.verify()


@pytest.fixture(scope="module")
def geometry(trained_digits_model: torch.nn.Module, digits_test: tuple[torch.Tensor, torch.Tensor],
             tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("geometry")
    x, y = digits_test
    trained_digits_model.train()  # the caller's mode: must come back unchanged
    res = measure_geometry(
        trained_digits_model, x, y, device="cpu", h=0.5, k=3, n_points=4, out_dir=out,
        eps=32 / 255, n_gaussian=10, hutchinson_probes=4, pgd_steps=3, landscape_points=1,
        landscape_steps=15, weight_alphas=[-0.5, 0.0, 0.5], progress=False,
    )
    assert trained_digits_model.training
    trained_digits_model.eval()
    return res, out


def test_measure_geometry_writes_json_and_pngs(geometry: tuple[dict, Path]) -> None:
    res, out = geometry
    for name in ("profile.png", "theorem1.png", "weight_curve.png"):
        assert_png(out / name)
    planes = sorted(out.glob("plane_*.png"))
    assert len(planes) == 1
    assert_png(planes[0])
    data = json.loads((out / "geometry.json").read_text())
    for key in ("top_eigenvalues", "bottom_eigenvalues", "hz_norm", "frobenius", "alignment", "wci",
                "theorem1", "hvps", "seconds_per_point", "sorted_profile", "config"):
        assert key in data and key in res
    assert len(data["theorem1"]["lower"]) == 4 and len(data["theorem1"]["measured"]) == 4
    assert data["top_eigenvalues"] == pytest.approx(res["top_eigenvalues"])
    for f in res["files"].values():
        assert Path(f).is_file()


def test_measure_geometry_values_are_finite_and_consistent(geometry: tuple[dict, Path]) -> None:
    res, _ = geometry
    top, bottom = np.array(res["top_eigenvalues"]), np.array(res["bottom_eigenvalues"])
    assert top.shape == (3,) and bottom.shape == (3,)
    assert np.all(np.isfinite(top)) and np.all(np.isfinite(bottom))
    assert np.all(np.diff(top) <= 1e-12) and top[0] >= bottom[0]
    for key in ("hz_norm", "frobenius", "alignment", "wci", "seconds_per_point"):
        assert math.isfinite(res[key]), key
    assert 0 <= res["alignment"] <= 1 and res["wci"] >= 0 and res["hvps"] > 0
    th = res["theorem1"]
    lo, up = np.array(th["lower"]), np.array(th["upper"])
    assert np.all(lo <= up + 1e-12)
    assert len(res["sorted_profile"]) == 64
    assert res["weight_curves"]["clean"]["loss"][1] == res["weight_curves"]["clean"]["base_loss"]
    table = format_table(res)
    assert "WCI" in table and "||Hz||" in table


def test_loss_plane_centre_and_boundary(trained_digits_model: torch.nn.Module,
                                        digits_test: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits_test
    model = trained_digits_model.eval()
    i = int(torch.nonzero(model(x[:20]).argmax(1) == y[:20])[0])
    plane = loss_plane(model, x[i], y[i], device="cpu", steps=11, seed=0)
    with torch.no_grad():
        centre = float(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]))
        assert plane.loss[5, 5] == pytest.approx(centre, rel=1e-5, abs=1e-7)
        assert plane.pred[5, 5] == int(y[i])
        # r̂ is DeepFool's direction: the point at distance ||r_DF|| along it is misclassified
        assert math.isfinite(plane.boundary_distance)
        r = torch.as_tensor(plane.r, dtype=torch.float32).reshape(1, 1, 8, 8)
        assert int(model(x[i:i + 1] + plane.boundary_distance * r).argmax(1)) != int(y[i])
        assert abs(float(np.dot(plane.r, plane.v))) < 1e-10
    assert plane.loss.shape == (11, 11) and np.all(np.isfinite(plane.loss))


def test_plot_profiles_several_models(tmp_path: Path) -> None:
    p = plot_profiles({"normal": np.linspace(5, -1, 64), "CURE": np.linspace(1, -0.2, 64),
                       "adv. fine-tuned": [0.9, 0.5, 0.1]}, tmp_path / "profiles.png")
    assert_png(p)
