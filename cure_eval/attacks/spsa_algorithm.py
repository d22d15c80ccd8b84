"""The SPSA algorithm (Uesato et al. 2018) in plain PyTorch: counter-based random numbers, the
gradient estimate and the Adam loop; :mod:`cure_eval.attacks.spsa` wraps it as a foolbox attack.

SPSA is the gradient-free attack of Uesato, O'Donoghue, van den Oord and Kohli, "Adversarial Risk
and the Dangers of Evaluating Against Weak Attacks", ICML 2018, https://arxiv.org/abs/1802.05666.
It estimates the gradient of the margin loss from finite differences along random ±1 directions
and feeds the estimate to Adam, so it is immune to gradient masking: if SPSA beats PGD, the
model's gradients are lying (CURE paper, Fig. 7).

Semantics (the paper's, which the CURE paper used; torchattacks' ``SPSA`` differs on almost every
point, see ``docs/references.md`` §3):

* loss ``max_{j≠y} z_j − z_y`` (the negative of :func:`~cure_eval.attacks.base.adversarial_margin`),
  maximised with Adam (lr 0.01, β = (0.9, 0.999));
* per iteration and per image, 128 loss evaluations at ``x ± δ v`` for 64 independent Rademacher
  directions ``v`` (δ = 0.01); the estimate is ``mean_k (ℓ(x+δv_k) − ℓ(x−δv_k)) / (2δ) · v_k``.
  Like the reference implementation (cleverhans ``SPSAAdam``) the probe points are not clipped to
  the input bounds, so the model sees inputs up to δ outside [0, 1];
* a uniform random start in the ε-ball, projection onto the ε-ball ∩ bounds after every step;
* each image stops as soon as its current iterate is misclassified (it is then no longer
  evaluated), and the *best* iterate seen (misclassified first, then lowest margin) is returned;
* 100 iterations by default.

All probe evaluations of all still-running images go through the model together, in calls of at
most ``max_batch`` inputs; there is no per-image Python loop.

Randomness is counter-based: every random number is a hash of ``(seed, point id, iteration,
position)``. The result for a point therefore depends only on its own id and the seed, not on the
other points of the batch nor on the global RNG (up to floating-point round-off of batched model
calls), so an audit can be sharded across processes and reproduce exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import UsageError
from .base import adversarial_margin

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
ProgressCallback = Callable[[int, int], None]

# --------------------------------------------------------------------------------------------
# Counter-based random numbers (a 32-bit integer hash evaluated on int64 tensors, no overflow).
# --------------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in [0, 2**32) without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (C. Wellons' "lowbias32")."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(value: int) -> int:
    return int(_mix32(torch.tensor([value & _M32], dtype=torch.int64))[0])


def point_keys(seed: int, point_ids: torch.Tensor) -> torch.Tensor:
    """32-bit random-stream keys, one per point, from ``seed`` and non-negative ``point_ids``."""
    s = int(seed) % (1 << 64)
    base = _mix32_int((s ^ (s >> 32)) & _M32)
    ids = point_ids.to(torch.int64)
    if len(ids) and int(ids.min()) < 0:
        raise UsageError("SPSA point ids must be non-negative integers")
    folded = (ids ^ (ids >> 32)) & _M32
    return _mix32(_mix32(folded) ^ base)


def _stream_keys(keys: torch.Tensor, stream: int) -> torch.Tensor:
    """Keys of stream ``stream`` (0: random start, t + 1: probes of iteration t)."""
    return _mix32(keys ^ _mix32_int(stream * 0x9E3779B9 + 0x632BE5AB))


def _random_words(keys: torch.Tensor, n_words: int) -> torch.Tensor:
    """``(len(keys), n_words)`` independent 32-bit words (int64) per key."""
    ctr = _mix32(torch.arange(n_words, dtype=torch.int64, device=keys.device))
    return _mix32(keys[:, None] ^ ctr[None, :])


def _rademacher(keys: torch.Tensor, pairs: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``(len(keys), pairs, dim)`` ±1 directions, 32 signs per hashed word."""
    n = pairs * dim
    words = _random_words(keys, (n + 31) // 32)
    shifts = torch.arange(32, dtype=torch.int64, device=keys.device)
    bits = ((words[:, :, None] >> shifts) & 1).reshape(len(keys), -1)[:, :n]
    return (bits.to(dtype) * 2 - 1).reshape(len(keys), pairs, dim)


def _uniform(keys: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``(len(keys), dim)`` uniform numbers in [0, 1]."""
    return (_random_words(keys, dim).to(torch.float64) / float(1 << 32)).to(dtype)


# --------------------------------------------------------------------------------------------
# The attack in plain PyTorch.
# --------------------------------------------------------------------------------------------
@dataclass
class SPSAOutput:
    """What one SPSA run returns besides the adversarial points (tensors on the input's device).

    ``best_margin`` is the true-class margin (:func:`adversarial_margin`) at the returned point,
    as the attack evaluated it: negative means misclassified. ``success`` is the attack's own
    verdict at the returned point, ``iterations`` the Adam steps taken per point (fewer than
    ``iterations`` when it stopped early) and ``model_inputs`` the number of inputs passed
    through the model in total.
    """

    x_adv: torch.Tensor
    best_margin: torch.Tensor
    success: torch.Tensor
    iterations: torch.Tensor
    model_inputs: int
    seconds: float


def _batched_logits(logits_fn: LogitsFn, x: torch.Tensor, max_batch: int) -> torch.Tensor:
    if len(x) <= max_batch:
        return logits_fn(x)
    return torch.cat([logits_fn(x[i:i + max_batch]) for i in range(0, len(x), max_batch)])


def _estimate(
    logits_fn: LogitsFn,
    xf: torch.Tensor,
    shape: torch.Size,
    labels: torch.Tensor,
    keys: torch.Tensor,
    *,
    delta: float,
    pairs: int,
    max_batch: int,
) -> torch.Tensor:
    """SPSA estimate of ∇ (max_{j≠y} z_j − z_y) at the flat points ``xf`` (B, D)."""
    n, dim = xf.shape
    grad = torch.empty_like(xf)
    per_call = max(1, max_batch // (2 * pairs))
    for s in range(0, n, per_call):
        xb = xf[s:s + per_call]
        g = len(xb)
        v = _rademacher(keys[s:s + per_call], pairs, dim, xf.dtype)
        probes = torch.cat([xb[:, None] + delta * v, xb[:, None] - delta * v], dim=1)
        lab = labels[s:s + per_call].repeat_interleave(2 * pairs)
        logits = _batched_logits(logits_fn, probes.reshape(g * 2 * pairs, *shape), max_batch)
        loss = (-adversarial_margin(logits, lab)).reshape(g, 2 * pairs)
        diff = (loss[:, :pairs] - loss[:, pairs:]).to(xf.dtype)
        grad[s:s + g] = torch.einsum("gp,gpd->gd", diff, v) / (2.0 * delta * pairs)
    return grad


def _check_settings(
    *, iterations: int, lr: float, delta: float, samples: int, max_batch: int
) -> None:
    if iterations < 0:
        raise UsageError(f"SPSA iterations must be >= 0, got {iterations}")
    if samples < 2 or samples % 2:
        raise UsageError(f"SPSA samples must be an even number >= 2 (mirrored pairs), got {samples}")
    if lr <= 0 or delta <= 0:
        raise UsageError(f"SPSA lr and delta must be positive, got lr={lr}, delta={delta}")
    if max_batch < 1:
        raise UsageError(f"SPSA max_batch must be >= 1, got {max_batch}")


def _default_ids(n: int, point_ids: torch.Tensor | Sequence[int] | None, device: torch.device) -> torch.Tensor:
    if point_ids is None:
        return torch.arange(n, device=device)
    ids = torch.as_tensor(point_ids, dtype=torch.int64, device=device).reshape(-1)
    if len(ids) != n:
        raise UsageError(f"SPSA got {len(ids)} point ids for {n} points")
    return ids


def spsa_gradient(
    logits_fn: LogitsFn,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    delta: float = 0.01,
    samples: int = 128,
    seed: int = 0,
    point_ids: torch.Tensor | Sequence[int] | None = None,
    iteration: int = 0,
    max_batch: int = 1024,
) -> torch.Tensor:
    """The SPSA estimate of ``∇_x (max_{j≠y} z_j − z_y)`` that :func:`spsa_attack` uses.

    Args:
        logits_fn: maps a batch of inputs to logits (called under ``torch.no_grad``).
        x: inputs ``(N, ...)``.
        labels: true labels ``(N,)``.
        delta: finite-difference step δ. Default 0.01.
        samples: loss evaluations per point, as ``samples // 2`` mirrored Rademacher pairs.
            Default 128.
        seed, point_ids, iteration: select the random directions (same as the attack's at
            iteration ``iteration``). ``point_ids`` defaults to ``0..N-1``.
        max_batch: most inputs per model call. Default 1024.

    Returns:
        The estimate, shaped like ``x``.
    """
    _check_settings(iterations=0, lr=1.0, delta=delta, samples=samples, max_batch=max_batch)
    ids = _default_ids(len(x), point_ids, x.device)
    keys = _stream_keys(point_keys(seed, ids), iteration + 1)
    with torch.no_grad():
        g = _estimate(logits_fn, x.reshape(len(x), -1), x.shape[1:], labels.to(x.device), keys,
                      delta=delta, pairs=samples // 2, max_batch=max_batch)
    return g.reshape(x.shape)


@dataclass
class _Run:
    """The per-point state of one :func:`spsa_attack` run (flat ``(N, D)`` tensors, ``active``
    the indices of the points still running, ``used`` the model inputs so far)."""

    xf: torch.Tensor
    z: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor
    best: torch.Tensor
    best_margin: torch.Tensor
    best_success: torch.Tensor
    steps: torch.Tensor
    active: torch.Tensor
    window_margin: torch.Tensor
    used: int = 0


def _start(
    x: torch.Tensor, keys: torch.Tensor, *, eps: float, bounds: tuple[float, float], random_start: bool
) -> _Run:
    """Set-up: the first iterate (uniform in the ε-ball ∩ bounds, or ``x``), Adam's zero moments."""
    n = len(x)
    xf = x.detach().reshape(n, -1)
    if random_start:
        noise = (_uniform(_stream_keys(keys, 0), xf.shape[1], xf.dtype) * 2 - 1) * eps
        z = (xf + noise).clamp(*bounds)
    else:
        z = xf.clone()
    return _Run(
        xf=xf, z=z, m=torch.zeros_like(xf), v=torch.zeros_like(xf), best=z.clone(),
        best_margin=torch.full((n,), math.inf, dtype=xf.dtype, device=x.device),
        best_success=torch.zeros(n, dtype=torch.bool, device=x.device),
        steps=torch.zeros(n, dtype=torch.long, device=x.device),
        active=torch.arange(n, device=x.device),
        window_margin=torch.full((n,), math.inf, dtype=xf.dtype, device=x.device),
    )


def _check_iterate(
    run: _Run,
    logits_fn: LogitsFn,
    labels: torch.Tensor,
    shape: torch.Size,
    t: int,
    *,
    max_batch: int,
    early_stop: bool,
    plateau_window: int,
    plateau_tol: float,
) -> torch.Tensor:
    """Bookkeeping: evaluate the running points' iterates, keep each point's best (misclassified
    first, then lowest margin), retire the finished points; returns the iterates still running."""
    active = run.active
    za = run.z[active]
    logits = _batched_logits(logits_fn, za.reshape(len(za), *shape), max_batch)
    run.used += len(za)
    ya = labels[active]
    margin = adversarial_margin(logits, ya).to(run.xf.dtype)
    success = logits.argmax(dim=1) != ya
    had = run.best_success[active]
    better = (success & ~had) | ((success == had) & (margin < run.best_margin[active]))
    upd = active[better]
    run.best_margin[upd] = margin[better]
    run.best_success[upd] = success[better]
    run.best[upd] = za[better]
    if early_stop:
        active, za = active[~success], za[~success]
    if plateau_window > 0 and t % plateau_window == 0:
        if t > 0:
            ref = run.window_margin[active]
            stalled = (ref - run.best_margin[active]) <= plateau_tol * ref.abs()
            stalled &= ~run.best_success[active]
            active, za = active[~stalled], za[~stalled]
        run.window_margin[active] = run.best_margin[active]
    run.active = active
    return za


def _adam_step(
    run: _Run,
    za: torch.Tensor,
    grad: torch.Tensor,
    t: int,
    *,
    eps: float,
    bounds: tuple[float, float],
    lr: float,
    adam: tuple[float, float, float],
) -> None:
    """One iteration's update: an Adam step (``adam`` = β1, β2, ε) that ascends the loss
    max_{j≠y} z_j − z_y from the running iterates ``za``, then the projection onto the ε-ball ∩ bounds."""
    beta1, beta2, adam_eps = adam
    active = run.active
    run.steps[active] += 1
    ma = beta1 * run.m[active] + (1 - beta1) * grad
    va = beta2 * run.v[active] + (1 - beta2) * grad * grad
    run.m[active], run.v[active] = ma, va
    step = lr * (ma / (1 - beta1 ** (t + 1))) / ((va / (1 - beta2 ** (t + 1))).sqrt() + adam_eps)
    xa = run.xf[active]
    pert = torch.clamp(za + step - xa, min=-eps, max=eps)
    run.z[active] = torch.clamp(xa + pert, min=bounds[0], max=bounds[1])


def _check_attack_settings(*, eps: float, plateau_window: int, plateau_tol: float) -> None:
    if plateau_window < 0 or plateau_tol < 0:
        raise UsageError(f"SPSA plateau_window and plateau_tol must be >= 0, got {plateau_window}, {plateau_tol}")
    if eps < 0:
        raise UsageError(f"SPSA eps must be >= 0, got {eps}")


def spsa_attack(
    logits_fn: LogitsFn,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    bounds: tuple[float, float] = (0.0, 1.0),
    iterations: int = 100,
    lr: float = 0.01,
    delta: float = 0.01,
    samples: int = 128,
    max_batch: int = 1024,
    seed: int = 0,
    point_ids: torch.Tensor | Sequence[int] | None = None,
    random_start: bool = True,
    early_stop: bool = True,
    plateau_window: int = 0,
    plateau_tol: float = 0.0,
    beta1: float = 0.9,
    beta2: float = 0.999,
    adam_eps: float = 1e-8,
    callback: ProgressCallback | None = None,
) -> SPSAOutput:
    """Untargeted ℓ∞ SPSA (Uesato et al. 2018, https://arxiv.org/abs/1802.05666) in PyTorch.

    Args:
        logits_fn: maps a batch of inputs to logits; called under ``torch.no_grad`` with at most
            ``max_batch`` inputs per call. Put the model in eval mode first.
        x: clean inputs ``(N, ...)`` within ``bounds``.
        labels: true labels ``(N,)``.
        eps: ℓ∞ radius (input units, e.g. [0, 1] pixels).
        bounds: input domain the returned points are clipped to. Default (0, 1).
        iterations: Adam steps per point. Default 100.
        lr: Adam learning rate. Default 0.01.
        delta: finite-difference step δ. Default 0.01.
        samples: loss evaluations per point and iteration (``samples // 2`` mirrored ±v pairs).
            Default 128.
        max_batch: most inputs per model call (bounds memory). Default 1024.
        seed: base seed of the counter-based random numbers. Default 0.
        point_ids: one non-negative id per point (e.g. dataset indices): a point's random start
            and directions depend only on ``(seed, id)``. Default ``0..N-1``.
        random_start: start from a uniform point of the ε-ball. Default True.
        early_stop: stop a point as soon as it is misclassified. Default True.
        plateau_window: stop a point that is still classified correctly once its best margin has
            improved by at most ``plateau_tol`` × its margin at the start of the window over the
            last ``plateau_window`` iterations (checked every ``plateau_window`` iterations).
            Default 0: off, the reference semantics (Uesato et al.: a fixed number of iterations).
        plateau_tol: the relative improvement below which a window counts as a plateau. Default 0.
        beta1, beta2, adam_eps: Adam constants. Defaults 0.9, 0.999, 1e-8.
        callback: called as ``callback(iteration, still_running)`` after each iterate check.

    Returns:
        :class:`SPSAOutput`; ``x_adv`` is the best iterate per point, inside the ε-ball ∩ bounds.
    """
    _check_settings(iterations=iterations, lr=lr, delta=delta, samples=samples, max_batch=max_batch)
    _check_attack_settings(eps=eps, plateau_window=plateau_window, plateau_tol=plateau_tol)
    start = time.perf_counter()
    labels = labels.to(x.device)
    keys = point_keys(seed, _default_ids(len(x), point_ids, x.device))
    with torch.no_grad():
        run = _start(x, keys, eps=eps, bounds=bounds, random_start=random_start)
        for t in range(iterations + 1):
            za = _check_iterate(run, logits_fn, labels, x.shape[1:], t, max_batch=max_batch, early_stop=early_stop,
                                plateau_window=plateau_window, plateau_tol=plateau_tol)
            if callback is not None:
                callback(t, len(run.active))
            if t == iterations or len(run.active) == 0:
                break
            grad = _estimate(logits_fn, za, x.shape[1:], labels[run.active], _stream_keys(keys[run.active], t + 1),
                             delta=delta, pairs=samples // 2, max_batch=max_batch)
            run.used += len(za) * samples
            _adam_step(run, za, grad, t, eps=eps, bounds=bounds, lr=lr, adam=(beta1, beta2, adam_eps))
    return SPSAOutput(
        x_adv=run.best.reshape(x.shape), best_margin=run.best_margin, success=run.best_success,
        iterations=run.steps, model_inputs=run.used, seconds=time.perf_counter() - start,
    )
