"""Property-based tests (hypothesis) over argument parsing and result validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cure_eval.attacks import check_adversarial
from cure_eval.audit import build_parser as audit_parser
from cure_eval.cli import eps_from_255
from cure_eval.data import check_images, select_points
from cure_eval.defend import build_parser as defend_parser
from cure_eval.errors import CureEvalError, UsageError
from cure_eval.training.methods import get_method, parse_method_args

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_eps_is_accepted_exactly_in_0_255(value: float) -> None:
    if 0.0 <= value <= 255.0:
        assert eps_from_255(value) == pytest.approx(value / 255.0)
    else:
        with pytest.raises(UsageError, match="1/255 units"):
            eps_from_255(value)


_token = st.one_of(
    st.sampled_from(["--eps", "--epochs", "--model", "--method", "--dataset", "--seed", "--n", "--attacks",
                     "--depth", "--widen", "--batch-size", "--eval-n", "--spsa-iterations", "--bogus", "-x"]),
    st.text(min_size=0, max_size=8),
    st.integers(-5, 300).map(str),
    st.floats(allow_nan=True).map(str),
)


@FAST
@given(st.lists(_token, max_size=8))
def test_parsers_never_exit_or_crash(argv: list[str]) -> None:
    """Any argument list either parses or raises a one-line UsageError: never SystemExit or a crash."""
    for parser in (defend_parser(), audit_parser()):
        try:
            parser.parse_args(argv)
        except UsageError as exc:
            assert "\n" not in str(exc) and "--help" in str(exc)


@FAST
@given(st.dictionaries(st.sampled_from(["gamma", "h", "epochs", "squared", "bn_mode", "lr", "nope"]),
                       st.text(max_size=6), max_size=4))
def test_method_args_are_typed_or_refused(items: dict[str, str]) -> None:
    cls = get_method("cure")
    argv = [f"{k}={v}" for k, v in items.items()]
    try:
        parsed = parse_method_args(cls, argv)
    except UsageError as exc:
        assert "\n" not in str(exc)
        return
    for key, value in parsed.items():
        default = getattr(cls.Config, key)
        assert value is None or isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, float))


@FAST
@given(st.integers(1, 500), st.integers(-3, 600), st.integers(0, 10_000))
def test_select_points_is_a_seeded_subset(available: int, n: int, seed: int) -> None:
    if 1 <= n <= available:
        idx = select_points(available, n, seed)
        assert len(idx) == n and len(set(idx.tolist())) == n
        assert int(idx.min()) >= 0 and int(idx.max()) < available
        assert torch.equal(idx, select_points(available, n, seed))
    else:
        with pytest.raises(UsageError):
            select_points(available, n, seed)


@FAST
@given(st.floats(0.001, 0.5), st.floats(0.0, 2.0), st.integers(0, 2**31 - 1), st.sampled_from(["linf", "l2"]))
def test_adversarial_points_are_validated(eps: float, scale: float, seed: int, norm: str) -> None:
    """A point inside the ε-ball and [0, 1] passes; one outside either is an error, never a count."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 1, 8, 8, generator=g)
    d = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    if norm == "linf":
        d = d / d.abs().flatten(1).max(1).values.view(-1, 1, 1, 1)
    else:
        d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    x_adv = x + scale * eps * d
    dist = (x_adv - x).flatten(1).abs().max(1).values if norm == "linf" else (x_adv - x).flatten(1).norm(dim=1)
    inside = bool((dist <= eps + 1e-6).all())
    in_range = bool(((x_adv >= 0) & (x_adv <= 1)).all())
    if inside and in_range:
        check_adversarial(x, x_adv, eps=eps, norm=norm)
    elif not inside and bool((dist > eps + 1e-4).any()):
        with pytest.raises(CureEvalError):
            check_adversarial(x, x_adv, eps=eps, norm=norm)
    elif not in_range and inside:
        with pytest.raises(CureEvalError):
            check_adversarial(x, x_adv, eps=eps, norm=norm)


@FAST
@given(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(0, 3))
def test_image_validation(value: float, channel: int) -> None:
    x = torch.full((2, 1, 8, 8), 0.5)
    x[0, 0, channel, channel] = value
    ok = math.isfinite(value) and 0.0 <= value <= 1.0
    if ok:
        check_images(x)
    else:
        with pytest.raises(CureEvalError):
            check_images(x)
