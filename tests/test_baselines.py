"""The baseline defences ``pgd_at``, ``adv_finetune``, ``trades`` and ``awp``: discovery, what each
step does on tiny models, real robustness on digits, ``defend`` end to end, ``--init`` and resume."""

from __future__ import annotations

import copy
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cure_eval.attacks.evaluation import evaluate
from cure_eval.core.io import read_jsonl
from cure_eval.data import get_dataset_spec
from cure_eval.defend import main as defend_main
from cure_eval.errors import UsageError
from cure_eval.geometry import curvature_profile, curvature_summaries
from cure_eval.models import ModelConfig, NormalizedModel
from cure_eval.models.checkpoint import load_checkpoint
from cure_eval.testing import small_cnn
from cure_eval.training import train
from cure_eval.training.methods import TrainContext, get_method, list_methods

BASELINES = {"pgd_at": False, "adv_finetune": True, "trades": False, "awp": False}  # name: fine_tunes
SPEC = get_dataset_spec("digits")
EPS = 32 / 255
CPU = torch.device("cpu")
TINY = ["--depth", "10", "--widen", "1", "--eval-n", "30", "--train-n", "256", "--no-progress", "--quiet"]


def _ctx(epochs: int = 1, steps: int = 1) -> TrainContext:
    return TrainContext(spec=SPEC, eps=EPS, model_name="small", device=CPU, epochs=epochs, steps_per_epoch=steps)


def _method(name: str, epochs: int = 1, **overrides: Any) -> Any:
    cls = get_method(name)
    return cls(cls.make_config(SPEC, "small", overrides=overrides), _ctx(epochs))


def _bn_model() -> nn.Module:
    """A tiny conv net with BatchNorm (its ``num_batches_tracked`` counts train-mode forwards)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 8 * 8, 10))
    return NormalizedModel(net, SPEC.mean, SPEC.std)


class Recorder(nn.Module):
    """Wraps a model and records (input, training flag) of every forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[tuple[torch.Tensor, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.detach().clone(), self.training))
        return self.model(x)


def _batch(digits_train: tuple[torch.Tensor, torch.Tensor], n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    return digits_train[0][:n], digits_train[1][:n]


def _bn_counts(model: nn.Module) -> list[int]:
    return [int(m.num_batches_tracked) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


# -- discovery and configuration ----------------------------------------------------------------
def test_baselines_are_entry_points_and_listed(capsys: pytest.CaptureFixture[str]) -> None:
    eps = {ep.name: ep.value for ep in entry_points(group="cure_eval.methods")}
    for name, fine_tunes in BASELINES.items():
        assert eps[name].startswith(f"cure_eval_plugins.methods.{name}:"), name
        cls = get_method(name)
        assert cls.name == name and cls.fine_tunes is fine_tunes and cls.description
        assert cls.__module__ == f"cure_eval_plugins.methods.{name}"
        assert "arxiv.org" in (sys.modules[cls.__module__].__doc__ or "")  # documented with its source
        for preset in cls.presets():
            cls.make_config(get_dataset_spec("cifar10"), "wide_resnet28_10", preset=preset)
    assert set(BASELINES) <= set(list_methods())
    assert defend_main(["--list-methods"]) == 0
    err = capsys.readouterr().out  # the list is a result: stdout
    assert all(name in err for name in BASELINES)


def test_documented_defaults() -> None:
    cifar = get_dataset_spec("cifar10")
    pgd = get_method("pgd_at").make_config(cifar, "wide_resnet28_10")
    assert (pgd.steps, pgd.step_size, pgd.random_start, pgd.attack_bn) == (10, None, True, "eval")
    assert (pgd.optimizer, pgd.lr, pgd.weight_decay, pgd.batch_size) == ("sgd", 0.1, 5e-4, 128)
    assert _method("pgd_at").alpha == pytest.approx(SPEC.pgd_alpha / 255)
    tr = get_method("trades").make_config(cifar, "wide_resnet28_10")
    assert (tr.beta, tr.steps, tr.init_std) == (6.0, 10, 0.001)
    assert get_method("trades").make_config(cifar, "x", preset="paper").step_size == 0.007
    awp = _method("awp")
    assert (awp.gamma, awp.warmup) == (0.01, 0)
    awp_t = _method("awp", base="trades")
    assert (awp_t.gamma, awp_t.warmup) == (0.005, 1)  # 10 on CIFAR, scaled to digits
    awp_tc = get_method("awp")(get_method("awp").make_config(cifar, "x", preset="trades_paper"),
                               TrainContext(spec=cifar, eps=8 / 255, model_name="x", device=CPU, epochs=1, steps_per_epoch=1))
    assert (awp_tc.gamma, awp_tc.warmup) == (0.005, 10)
    af = get_method("adv_finetune").make_config(cifar, "x")
    assert (af.overshoot, af.df_steps, af.candidates, af.clean_weight, af.max_eps) == (0.02, 50, 10, 0.0, None)
    for name, bad in [("pgd_at", {"attack_bn": "x"}), ("trades", {"steps": -1}), ("awp", {"base": "madry"}),
                      ("awp", {"gamma": -1.0}), ("adv_finetune", {"clean_weight": 2.0})]:
        with pytest.raises(UsageError):
            get_method(name).make_config(SPEC, "x", overrides=bad)


# -- what each step does ------------------------------------------------------------------------
def test_pgd_at_trains_on_eps_ball_points_found_in_eval_mode(digits_train: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = _batch(digits_train)
    model = Recorder(_bn_model())
    before = copy.deepcopy(model.model).eval()
    method = _method("pgd_at")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    stats = method.step(model, opt, x, y)
    assert set(stats) >= {"loss", "adv_acc"}
    modes = [training for _, training in model.calls]
    assert modes == [False] * 10 + [True]  # 10 PGD forwards in eval mode, one training forward
    assert _bn_counts(model) == [1]  # running statistics updated by the training forward only
    x_train = model.calls[-1][0]
    delta = x_train - x
    assert delta.abs().max() <= EPS + 1e-6 and x_train.min() >= 0 and x_train.max() <= 1
    assert (delta.flatten(1).abs().amax(1) > EPS / 2).all()  # every point moved well into the ball
    with torch.no_grad():  # the points raise the pre-step model's loss far more than random ones
        noisy = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
        ce_clean, ce_noisy, ce_adv = (float(F.cross_entropy(before(v), y)) for v in (x, noisy, x_train))
    assert ce_adv - ce_clean > 5 * abs(ce_noisy - ce_clean) and ce_adv > ce_clean + 0.1
    with torch.no_grad():
        assert stats["loss"] == pytest.approx(float(F.cross_entropy(before.train()(x_train), y)), rel=1e-5)
    assert not torch.equal(before.model[0].weight, model.model.model[0].weight)  # the step updated weights


def test_trades_loss_is_ce_plus_beta_kl(digits_train: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = _batch(digits_train)
    torch.manual_seed(0)
    model = NormalizedModel(small_cnn(), SPEC.mean, SPEC.std)
    method = _method("trades")
    # the attack: inside the ε-ball, away from x, and it raises the KL it maximises
    x_adv = method.attack(model, x, y)
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        kl_start = F.kl_div(F.log_softmax(model((x + 0.001 * torch.randn_like(x)).clamp(0, 1)), 1), p, reduction="sum")
        kl_adv = F.kl_div(F.log_softmax(model(x_adv), 1), p, reduction="sum")
    assert kl_adv > 10 * kl_start

    fixed = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    method.attack = lambda *_: fixed  # type: ignore[method-assign]
    ref = copy.deepcopy(model)
    logits, logits_adv = ref(x), ref(fixed)
    p_nat = F.softmax(logits, 1)
    kl = (p_nat * (F.log_softmax(logits, 1) - F.log_softmax(logits_adv, 1))).sum(1).mean()
    direct = F.cross_entropy(logits, y) + 6.0 * kl
    direct.backward()  # gradient through both f(x) and f(x'), as in the reference code
    lr = 0.05
    stats = method.step(model, torch.optim.SGD(model.parameters(), lr=lr), x, y)
    assert stats["loss"] == pytest.approx(float(direct.detach()), rel=1e-5)
    assert stats["kl"] == pytest.approx(float(kl.detach()), rel=1e-4, abs=1e-7)
    for p_new, p_ref in zip(model.parameters(), ref.parameters(), strict=True):
        assert p_ref.grad is not None
        torch.testing.assert_close(p_new, p_ref.detach() - lr * p_ref.grad, rtol=1e-5, atol=1e-6)


def test_awp_matches_a_manual_computation_and_restores_exactly() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    model = nn.Sequential(lin)
    x, y = torch.rand(5, 6), torch.tensor([0, 1, 2, 1, 0])
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    method = _method("awp")  # base pgd_at, γ = 0.01
    method.base.attack = lambda *_: x_adv  # type: ignore[method-assign]
    W, b = lin.weight.detach().clone(), lin.bias.detach().clone()

    # manual: v = γ ||W|| g / ||g|| from the adversarial loss at W; gradients at (W + v, b)
    Wr = W.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(x_adv @ Wr.T + b, y), Wr)
    v = 0.01 * W.norm() * g / g.norm()
    Wp, bp = (W + v).requires_grad_(True), b.clone().requires_grad_(True)
    gW, gb = torch.autograd.grad(F.cross_entropy(x_adv @ Wp.T + bp, y), (Wp, bp))
    lr = 0.5
    stats = method.step(model, torch.optim.SGD(model.parameters(), lr=lr), x, y)
    assert stats["awp"] == 1.0
    torch.testing.assert_close(lin.weight.detach(), W - lr * gW, rtol=0, atol=1e-6)
    torch.testing.assert_close(lin.bias.detach(), b - lr * gb, rtol=0, atol=1e-6)
    W0 = W.clone().requires_grad_(True)
    assert not torch.allclose(gW, torch.autograd.grad(F.cross_entropy(x_adv @ W0.T + b, y), W0)[0])  # v mattered

    # with a zero learning rate the weights come back bit for bit
    W1, b1 = lin.weight.detach().clone(), lin.bias.detach().clone()
    method.step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y)
    assert torch.equal(lin.weight, W1) and torch.equal(lin.bias, b1)


def test_awp_perturbs_conv_linear_weights_only_and_keeps_bn_statistics(digits_train: tuple[torch.Tensor, torch.Tensor]) -> None:
    from cure_eval_plugins.methods.awp import perturbed_weight_names

    x, y = _batch(digits_train)
    model = _bn_model()
    assert perturbed_weight_names(model) == ["model.0.weight", "model.4.weight"]
    for base, forwards in (("pgd_at", 1), ("trades", 2)):
        model = _bn_model().train()
        method = _method("awp", epochs=3, base=base)
        method.start_epoch(0 if base == "pgd_at" else 1)  # TRADES-AWP: no AWP before epoch 1 on digits
        before = {k: v.clone() for k, v in model.state_dict().items()}
        stats = method.step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y)
        assert stats["awp"] == 1.0
        # the ascent step ran on a proxy: only the training forwards touched the running statistics
        assert _bn_counts(model) == [forwards]
        for k, v in model.state_dict().items():
            if "running" not in k and "num_batches" not in k:
                assert torch.equal(v, before[k]), k
    method = _method("awp", epochs=3, base="trades")
    method.start_epoch(0)
    model = _bn_model().train()
    assert method.step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y)["awp"] == 0.0


def test_adv_finetune_trains_on_deepfool_points(trained_digits_model: NormalizedModel,
                                                 digits_train: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = _batch(digits_train, 48)
    model = Recorder(copy.deepcopy(trained_digits_model)).train()
    before = copy.deepcopy(trained_digits_model).eval()
    method = _method("adv_finetune")
    stats = method.step(model, torch.optim.Adam(model.parameters(), lr=1e-3), x, y)
    assert all(p.requires_grad for p in model.parameters())  # frozen only during the attack
    train_calls = [inp for inp, training in model.calls if training]
    assert len(train_calls) == 1 and not any(t for _, t in model.calls[:-1])
    x_train = train_calls[0]
    with torch.no_grad():
        correct = before(x).argmax(1) == y
        fooled = before(x_train).argmax(1) != y
    assert correct.sum() >= 40 and fooled[correct].float().mean() >= 0.95  # DeepFool found adversarial points
    assert torch.equal(x_train[~correct], x[~correct])  # misclassified points are left as they are
    linf = (x_train - x).flatten(1).abs().amax(1)[correct]
    assert 0 < linf.median() < 0.5 and stats["df_success"] >= 0.95
    # max_eps = -1: projected onto the run's ε-ball
    m2 = _method("adv_finetune", max_eps=-1.0)
    x_adv, _ = m2.attack(before, x, y)
    assert (x_adv - x).abs().max() <= EPS + 1e-6


# -- real robustness on digits ------------------------------------------------------------------
@pytest.mark.slow
def test_pgd_at_trades_awp_are_robust_on_digits(tmp_path: Path, digits_train: tuple[torch.Tensor, torch.Tensor],
                                                digits_test: tuple[torch.Tensor, torch.Tensor]) -> None:
    """small_cnn, default digits recipes (Adam 1e-3 cosine, batch 64) at ε = 32/255, PGD(20) step 4/255.

    The normal model trains its default 15 epochs, the defences 8 (to keep the test short).
    Measured (clean/PGD(20) %, seeds 0 and 1): standard 96.7/34-40; 8 epochs: pgd_at 96/71-73,
    trades 96/77-79, awp 96/71-72 (15 epochs, seeds 0-2: pgd_at 98/76-78, trades 97/80-82,
    awp 98/76-79). Required: clean ≥ 90 % and PGD(20) ≥ the normal model's + 20 points.
    """
    x, y = digits_train
    mcfg = ModelConfig("small_cnn", 10, 1, mean=SPEC.mean, std=SPEC.std)
    results = {}
    for name in ("standard", "pgd_at", "trades", "awp"):
        torch.manual_seed(0)
        model = NormalizedModel(small_cnn(), SPEC.mean, SPEC.std)
        cls = get_method(name)
        cfg = cls.make_config(SPEC, mcfg.name, overrides={} if name == "standard" else {"epochs": 8})
        ctx = TrainContext(spec=SPEC, eps=EPS, model_name=mcfg.name, device=CPU, epochs=cfg.epochs,
                           steps_per_epoch=len(x) // cfg.batch_size)
        train(model, cls(cfg, ctx), x, y, model_config=mcfg, out_dir=tmp_path / name, progress=False)
        results[name] = evaluate(model, *digits_test, eps=EPS, alpha=SPEC.pgd_alpha / 255, device=CPU, progress=False)
    print(json.dumps(results))
    normal = results["standard"]["pgd20_accuracy"]
    for name in ("pgd_at", "trades", "awp"):
        assert results[name]["clean_accuracy"] >= 0.90, (name, results)
        assert results[name]["pgd20_accuracy"] >= normal + 0.20, (name, results)


@pytest.mark.slow
def test_adv_finetune_makes_the_normal_model_robust_on_digits(
        tmp_path: Path, trained_digits_model: NormalizedModel, digits_train: tuple[torch.Tensor, torch.Tensor],
        digits_test: tuple[torch.Tensor, torch.Tensor]) -> None:
    """3 epochs of DeepFool fine-tuning of conftest's normal CNN (digits recipe otherwise).

    Measured (seeds 0, 1): normal 96.7-97.2 / 36.9-38.3 % → 95.6-96.1 / 56-60 % (clean/PGD(20));
    10 epochs: 96.4 / 69.2 %. Required: clean ≥ 90 % and PGD(20) ≥ the normal model's + 10 points.
    """
    model = copy.deepcopy(trained_digits_model)
    x, y = digits_train
    cls = get_method("adv_finetune")
    cfg = cls.make_config(SPEC, "small_cnn", overrides={"epochs": 3})
    ctx = TrainContext(spec=SPEC, eps=EPS, model_name="small_cnn", device=CPU, epochs=3,
                       steps_per_epoch=len(x) // cfg.batch_size)
    train(model, cls(cfg, ctx), x, y, model_config=ModelConfig("small_cnn", 10, 1, mean=SPEC.mean, std=SPEC.std),
          out_dir=tmp_path, progress=False)
    kw: dict[str, Any] = {"eps": EPS, "alpha": SPEC.pgd_alpha / 255, "device": CPU, "progress": False}
    normal = evaluate(trained_digits_model, *digits_test, **kw)
    tuned = evaluate(model, *digits_test, **kw)
    print(json.dumps({"standard": normal, "adv_finetune": tuned}))
    assert tuned["clean_accuracy"] >= 0.90 and tuned["pgd20_accuracy"] >= normal["pgd20_accuracy"] + 0.10
    # The paper's claim (§2, Fig. 2): fine-tuning lowers the input curvature — λ_max and ‖Hz‖ —
    # here with exact Hessian-vector products on 20 test points.
    xg, yg = digits_test[0][:20], digits_test[1][:20]
    before = curvature_profile(trained_digits_model, xg, yg, h=1.0, k=3, device=CPU, scheme="exact", progress=False)
    after = curvature_profile(model, xg, yg, h=1.0, k=3, device=CPU, scheme="exact", progress=False)
    hz = [float(curvature_summaries(m, xg, yg, h=1.0, n_gaussian=0, device=CPU, scheme="exact")["hz_norm"])
          for m in (trained_digits_model, model)]
    assert after.top_eigenvalues[0] < before.top_eigenvalues[0] and hz[1] < hz[0], (before.top_eigenvalues, after.top_eigenvalues, hz)


# -- defend end to end, --init, resume ----------------------------------------------------------
@pytest.mark.slow
def test_defend_pgd_at_end_to_end_and_finetune_from_init(tmp_path: Path) -> None:
    out, cache = tmp_path / "run", str(tmp_path / "cache")
    assert defend_main(TINY + ["--epochs", "1", "--pretrain-epochs", "1", "--method", "pgd_at",
                               "--out", str(out), "--cache-dir", cache]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "pgd_at" and {"standard", "pgd_at"} <= set(res)
    assert res["standard"]["source"] == "standard"
    for key in ("standard", "pgd_at"):
        assert 0 <= res[key]["pgd20_accuracy"] <= res[key]["clean_accuracy"] <= 1
    _, info = load_checkpoint(out / "pgd_at" / "model.safetensors")
    assert info.method == "pgd_at" and info.epoch == 1
    assert set(read_jsonl(out / "pgd_at" / "metrics.jsonl")[0]) >= {"loss", "adv_acc", "seconds"}

    # fine-tune the normal model via --init: with lr 0 the conv/linear weights stay those of --init
    init = out / "standard" / "model.safetensors"
    for method in ("adv_finetune", "trades"):
        out2 = tmp_path / f"ft_{method}"
        assert defend_main(TINY + ["--epochs", "1", "--method", method, "--init", str(init), "--out", str(out2),
                                   "--method-arg", "lr=0", "--method-arg", "lr_schedule=constant"]) == 0
        res2 = json.loads((out2 / "results.json").read_text())
        assert res2["standard"]["source"] == "init" and method in res2
        assert res2["standard"]["clean_accuracy"] == res["standard"]["clean_accuracy"]
        start, _ = load_checkpoint(init)
        tuned, tinfo = load_checkpoint(out2 / method / "model.safetensors")
        assert tinfo.method == method
        for (k, a), b in zip(start.state_dict().items(), tuned.state_dict().values(), strict=True):
            if k.endswith("weight") and a.ndim > 1:
                assert torch.equal(a, b), k


@pytest.mark.slow
@pytest.mark.parametrize("name,overrides", [("pgd_at", {}), ("trades", {}), ("awp", {"base": "trades"}),
                                            ("adv_finetune", {"df_steps": 5})])
def test_resume_is_bit_identical(tmp_path: Path, digits_train: tuple[torch.Tensor, torch.Tensor],
                                 name: str, overrides: dict) -> None:
    x, y = digits_train[0][:128], digits_train[1][:128]
    mcfg = ModelConfig("bn_cnn", 10, 1, mean=SPEC.mean, std=SPEC.std)
    cls = get_method(name)
    fast = {"steps": 3} if "steps" in cls.Config.__dataclass_fields__ else {}
    cfg = cls.make_config(SPEC, mcfg.name, overrides={"epochs": 3, **fast, **overrides})

    def run(out: Path, stop_after: int | None, resume: bool) -> nn.Module:
        model = _bn_model()

        def on_epoch(row: dict) -> None:
            if stop_after is not None and row["epoch"] == stop_after:
                raise KeyboardInterrupt

        method = cls(cfg, TrainContext(spec=SPEC, eps=EPS, model_name=mcfg.name, device=CPU, epochs=3, steps_per_epoch=2))
        train(model, method, x, y, model_config=mcfg, out_dir=out, resume=resume, progress=False, on_epoch=on_epoch)
        return model

    straight = run(tmp_path / "a", None, False)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", 1, False)
    resumed = run(tmp_path / "b", None, True)
    rows = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    if name == "awp":  # TRADES-AWP: warm-up epoch 0 without AWP, then with AWP (also after resuming)
        assert [r["awp"] for r in rows] == [0.0, 1.0, 1.0]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
