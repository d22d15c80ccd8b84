"""Units: the only way the attack suite runs.

The points are cut into **chunks** of ``chunk_size`` consecutive points. A **unit** is one attack
(or one attack family, e.g. the PGD family: one trajectory serves PGD(7/20/40/100)) on one chunk,
plus one ``clean`` unit per chunk (clean predictions and margins). Running the suite is running
every unit of a :class:`SuitePlan` (:func:`run_units`) into a **unit store**, then assembling the
stored records into a :class:`~cure_eval.attacks.results.SuiteResult` (:func:`assemble`):

* :func:`~cure_eval.attacks.run_suite` (in memory): one chunk holding every point, a
  :class:`MemoryStore`.
* the resumable / sharded audit (:mod:`cure_eval.auditing`): chunks of ``batch_size`` points, a
  file store that keeps each record in ``audit_state.json`` as soon as its unit finishes.

The rules that make the numbers live here once: the per-attack settings and their defaults
(:data:`SUITE_SETTINGS`), which points a unit attacks (clean-correct points; in a cascade the
chunk's points still robust after its earlier units, :func:`still_robust`, by
:func:`cascade_update`), a unit's per-point record (:func:`run_unit`), the per-chunk seeding of
attacks that draw from the global RNG (:func:`chunk_seed`) and the worst case (:func:`assemble`).

A unit record is a plain dict (tensors on the CPU)::

    clean unit: {"points", "clean_pred", "clean_margin", "seconds", "passes"}
    attack unit: {"points", "seconds", "pgd_family_seconds", "passes",
                  "attacks": {name: {"attacked", "adv_pred", "margin", "linf", "l2", "extra",
                                     "seconds", "passes", "x_adv"}}}

New per-unit or per-point measurements (e.g. ``passes``, :mod:`.passes`) are new keys, added in :func:`run_unit`
(the one place a unit runs); a store keeps every key (the file store encodes tensors, see
:mod:`cure_eval.auditing.codec`, and leaves out the adversarial images, :data:`NOT_STORED`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..core.modes import check_device, eval_mode
from ..errors import UsageError
from .base import Attack, AttackConfig, AttackContext, AttackResult, Norm, adversarial_margin
from .deepfool import DeepFoolConfig
from .measure import measure_attack
from .passes import PassCounter, add_passes, pass_record, pass_shares, suite_passes
from .pgd import PGD, PGDConfig
from .registry import attack_order, get_attack
from .results import SuiteResult
from .spsa import SPSAConfig

log = logging.getLogger("cure_eval.attacks.suite")


# --------------------------------------------------------------------------------------------
# The suite's settings: one table.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One keyword setting of the suite: its default and the attack config field it fills."""

    name: str
    default: float
    config: type[AttackConfig]
    field: str
    reported: bool = True  # listed in ``SuiteResult.settings`` (and so in results.json)


#: The suite's keyword settings, in report order: each fills one field of an attack config.
SUITE_SETTINGS: tuple[Setting, ...] = (
    Setting("pgd_alpha", 2 / 255, PGDConfig, "alpha"),
    Setting("spsa_iterations", 100, SPSAConfig, "iterations"),
    Setting("spsa_samples", 128, SPSAConfig, "samples"),
    Setting("deepfool_steps", 50, DeepFoolConfig, "steps"),
    Setting("deepfool_candidates", 10, DeepFoolConfig, "candidates"),
    Setting("deepfool_overshoot", 0.02, DeepFoolConfig, "overshoot"),
    Setting("spsa_max_batch", 1024, SPSAConfig, "max_batch", reported=False),
)
#: ``{name: default}`` of :data:`SUITE_SETTINGS`.
SUITE_DEFAULTS: dict[str, Any] = {s.name: s.default for s in SUITE_SETTINGS}
#: Chunk ``k``'s random start of an attack with ``chunk_seeded`` (the PGD family) comes from
#: ``torch.manual_seed(seed + CHUNK_SEED_STRIDE * k)``.
CHUNK_SEED_STRIDE = 1_000_003
#: Record keys a file store leaves out (the adversarial images: large, and rebuilt on demand).
NOT_STORED = frozenset({"x_adv"})
#: Per-point columns of an attack's record, besides ``extra``.
COLUMNS = ("attacked", "adv_pred", "margin", "linf", "l2")


def chunk_seed(seed: int, chunk: int) -> int:
    """Seed of chunk ``chunk``'s random start (``seed`` for chunk 0, so a suite of one chunk
    draws exactly as ``torchattacks.PGD`` after ``torch.manual_seed(seed)``). The features stage
    uses it to replay the suite's PGD points."""
    return seed + CHUNK_SEED_STRIDE * chunk


def _configs(knobs: Mapping[str, Any]) -> list[AttackConfig]:
    """One default config per config class, filled from the keyword settings."""
    fields: dict[type[AttackConfig], dict[str, Any]] = {}
    for s in SUITE_SETTINGS:
        fields.setdefault(s.config, {})[s.field] = knobs[s.name]
    return [cls(**kw) for cls, kw in fields.items()]


# --------------------------------------------------------------------------------------------
# The plan.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One attack, or every requested member of a family, run together on a chunk."""

    name: str
    attacks: tuple[Attack[Any], ...]

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.attacks]

    @property
    def chunk_seeded(self) -> bool:
        return any(a.chunk_seeded for a in self.attacks)


@dataclass(frozen=True)
class SuitePlan:
    """Everything a suite run depends on, resolved: radii, seed, the units in run order."""

    eps: float
    eps_l2: float
    seed: int
    cascade: bool
    batch_size: int
    chunk_size: int
    knobs: dict[str, Any]
    units: tuple[Unit, ...]
    #: the audit reports its chunking in ``settings`` (``chunks``, ``pgd_chunk_seeds``)
    chunked: bool = False
    order: list[str] = field(default_factory=list)

    def radius(self, norm: Norm) -> float:
        return self.eps_l2 if norm == "l2" else self.eps

    @property
    def l2_in_worst_case(self) -> bool:
        """The ℓ2 ball of radius ``eps_l2 <= eps`` lies in the ℓ∞ ε-ball: ℓ2 attacks count."""
        return self.eps_l2 <= self.eps + 1e-12

    def in_worst_case(self, name: str) -> bool:
        return get_attack(name).norm == "linf" or self.l2_in_worst_case

    def chunks(self, n: int) -> list[slice]:
        """The chunks of ``n`` points (``chunk_size`` 0: one chunk holding them all)."""
        size = self.chunk_size or max(n, 1)
        return [slice(s, min(s + size, n)) for s in range(0, n, size)]

    def context(self, model: nn.Module, device: torch.device, progress: bool, chunk: int, unit: Unit | None,
                ) -> AttackContext:
        seed = chunk_seed(self.seed, chunk) if unit is not None and unit.chunk_seeded else self.seed
        return AttackContext(model=model, device=device, batch_size=self.batch_size, progress=progress,
                             eps=self.eps, eps_l2=self.eps_l2, seed=seed)


def make_plan(
    attacks: Sequence[str], *, eps: float, eps_l2: float | None = None, seed: int = 0, cascade: bool = False,
    batch_size: int = 256, chunk_size: int | None = None, configs: Mapping[str, AttackConfig] | None = None,
    chunked: bool = False, **knobs: Any,
) -> SuitePlan:
    """The units of a suite run, in order (report order, or cheap → expensive for a cascade).

    ``knobs``: the :data:`SUITE_SETTINGS` by name (missing ones take their default); ``configs``:
    per attack name, its config object (overrides the knobs). ``chunk_size``: points per chunk
    (``None``: one chunk holding every point)."""
    unknown = sorted(set(knobs) - set(SUITE_DEFAULTS))
    if unknown:
        raise UsageError(f"unknown suite settings {', '.join(unknown)}: use {', '.join(SUITE_DEFAULTS)}")
    knobs = {**SUITE_DEFAULTS, **knobs}
    order = attack_order(attacks, cascade=cascade)  # unknown names list the valid ones
    eps_l2_ = float(eps if eps_l2 is None else eps_l2)
    if eps_l2_ <= 0:
        raise UsageError(f"eps_l2 must be positive, got {eps_l2}")
    if knobs["spsa_iterations"] < 0:
        raise UsageError(f"spsa_iterations must be >= 0, got {knobs['spsa_iterations']}")
    by_type = {type(c): c for c in _configs(knobs)}
    instances = {a: get_attack(a)((configs or {}).get(a, by_type.get(get_attack(a).Config))) for a in order}
    plan = SuitePlan(eps=float(eps), eps_l2=eps_l2_, seed=int(seed), cascade=bool(cascade),
                     batch_size=int(batch_size), chunk_size=int(chunk_size or 0), knobs=knobs,
                     units=_units(order, instances), chunked=chunked, order=order)
    l2_names = [a for a in order if instances[a].norm == "l2"]
    if cascade and l2_names and not plan.l2_in_worst_case:
        raise UsageError(
            f"a cascade computes the ℓ∞ worst case, but eps_l2 = {eps_l2_:.4g} > eps = {eps:.4g} "
            f"is a different threat model: drop {', '.join(l2_names)} or use eps_l2 <= eps"
        )
    pgds = [a for a in instances.values() if isinstance(a, PGD)]
    if pgds:
        warn_short_pgd([a.steps for a in pgds], eps, pgds[0].config.alpha)
    return plan


def _units(order: Sequence[str], instances: Mapping[str, Attack[Any]]) -> tuple[Unit, ...]:
    """An attack alone, or every requested member of its family at the place of the first one."""
    units: list[Unit] = []
    done: set[str] = set()
    for name in order:
        if name in done:
            continue
        family = instances[name].family
        group = tuple(instances[a] for a in order
                      if a == name or (family is not None and instances[a].family == family))
        done.update(a.name for a in group)
        units.append(Unit(name=family or name, attacks=group))
    return tuple(units)


def warn_short_pgd(steps: Sequence[int], eps: float, alpha: float) -> None:
    short = [k for k in steps if k * alpha < eps]
    if short:
        log.warning(
            "PGD(%s) with step %.4g cannot travel the ε = %.4g radius (steps × alpha < eps): those "
            "numbers overstate robustness; use a larger pgd_alpha (e.g. 2.5·eps/steps)",
            ",".join(map(str, short)), alpha, eps)


# --------------------------------------------------------------------------------------------
# The stores.
# --------------------------------------------------------------------------------------------
class UnitStore(Protocol):
    """Where finished unit records go (``key``: ``"clean/<k>"`` or ``"<unit>/<k>"``)."""

    def __contains__(self, key: object) -> bool: ...

    def get(self, key: str) -> dict[str, Any]: ...

    def put(self, key: str, record: dict[str, Any]) -> None: ...


class MemoryStore:
    """Unit records in a dict, as :func:`run_unit` made them (adversarial images included)."""

    def __init__(self) -> None:
        self.units: dict[str, dict[str, Any]] = {}

    def __contains__(self, key: object) -> bool:
        return key in self.units

    def get(self, key: str) -> dict[str, Any]:
        return self.units[key]

    def put(self, key: str, record: dict[str, Any]) -> None:
        self.units[key] = record


def unit_keys(plan: SuitePlan, chunks: Iterable[int]) -> list[str]:
    """The keys of the given chunks' units: every clean unit first, then unit by unit."""
    ks = list(chunks)
    return [f"clean/{k}" for k in ks] + [f"{u.name}/{k}" for u in plan.units for k in ks]


# --------------------------------------------------------------------------------------------
# Running units.
# --------------------------------------------------------------------------------------------
def cascade_update(robust_now: torch.Tensor, robust: torch.Tensor, attacked: torch.Tensor) -> torch.Tensor:
    """The cascade's rule, the only copy: a point stays robust unless this attack attacked it
    and fooled it. (For an attack that attacked exactly the still-robust points this is its
    ``robust``; the PGD family's later step counts attack only the points not yet fooled.)"""
    return robust_now & (robust | ~attacked)


def attack_result(name: str, eps: float, rec: Mapping[str, Any], y: torch.Tensor) -> AttackResult:
    """An attack's :class:`AttackResult` from its record (``x_adv`` empty if not recorded)."""
    attacked, adv_pred = rec["attacked"], rec["adv_pred"]
    x_adv = rec.get("x_adv")
    return AttackResult(
        name=name, eps=eps, x_adv=torch.zeros(len(y), 0) if x_adv is None else x_adv, adv_pred=adv_pred,
        success=attacked & (adv_pred != y), robust=attacked & (adv_pred == y), margin=rec["margin"],
        linf=rec["linf"], l2=rec["l2"], attacked=attacked, seconds=float(rec["seconds"]), extra=dict(rec["extra"]), passes=rec.get("passes"))


def still_robust(plan: SuitePlan, correct: torch.Tensor, y: torch.Tensor,
                 records: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """The cascade's "still robust" mask of a chunk after the given (earlier) unit records."""
    robust_now = correct.clone()
    for rec in records:
        for name, cols in rec["attacks"].items():
            res = attack_result(name, plan.radius(get_attack(name).norm), cols, y)
            robust_now = cascade_update(robust_now, res.worst_case_robust, res.attacked)
    return robust_now


def run_clean_unit(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> dict[str, Any]:
    """The clean unit of a chunk: predictions and margins at the clean points."""
    t0 = time.perf_counter()
    with PassCounter(ctx.model) as counter:
        logits = ctx.logits(x)
    n = len(x)
    pred = logits.argmax(dim=1) if n else torch.zeros(0, dtype=torch.long)
    margin = adversarial_margin(logits, y) if n else torch.zeros(0)
    return {"points": ids.tolist(), "clean_pred": pred, "clean_margin": margin, "seconds": time.perf_counter() - t0, "passes": pass_record(counter.passes)}


def run_unit(ctx: AttackContext, unit: Unit, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, *,
             clean: Mapping[str, Any], target: torch.Tensor, cascade: bool) -> dict[str, Any]:
    """Run ``unit`` on the ``target`` points of a chunk ``(x, y, ids)``; return its record.

    ``clean``: the chunk's clean record. Points outside ``target`` are not attacked (their columns
    keep the clean prediction and margin, zero norms, the attack's default extras); an empty
    target runs nothing (an attack the cascade skips)."""
    t0 = time.perf_counter()
    n = len(y)
    clean_pred, clean_margin = clean["clean_pred"], clean["clean_margin"]
    correct = clean_pred == y
    idx = target.nonzero().flatten()
    outputs = {}
    with PassCounter(ctx.model) as counter:  # the one place an attack runs in the suite: counted
        if len(idx):
            lead = unit.attacks[0]
            if lead.family is not None:
                outputs = type(lead).run_family(ctx, list(unit.attacks), x[idx], y[idx], ids[idx], cascade=cascade)
            else:
                outputs = {lead.name: lead.run(ctx, x[idx], y[idx], ids[idx])}
    passes = pass_record(counter.passes)
    attacks: dict[str, Any] = {}
    for attack in unit.attacks:
        o = outputs.get(attack.name)
        mine = idx[:0] if o is None else (idx if o.attacked is None else idx[o.attacked])
        attacked = torch.zeros(n, dtype=torch.bool)
        attacked[mine] = True
        res = measure_attack(
            ctx, x, y, name=attack.name, norm=attack.norm, clean_pred=clean_pred, clean_margin=clean_margin,
            attacked=attacked, x_adv_attacked=x[:0] if o is None else o.x_adv, seconds=0.0 if o is None else o.seconds,
            extra=attack.per_sample({} if o is None else o.extra, mine, n, correct),
            x_best_attacked=None if o is None else o.x_best)
        attacks[attack.name] = {**{c: getattr(res, c) for c in COLUMNS}, "extra": {**res.extra, **pass_shares(passes, attacked)},
                                "seconds": res.seconds, "passes": dict(passes), "x_adv": res.x_adv}
    family = max((o.seconds for o in outputs.values()), default=0.0) if unit.attacks[0].family else 0.0
    # The one place a unit's record is made: a new per-unit measurement is a new key here, a new
    # per-point one a new column of ``attacks[name]`` (or of its ``extra``, which assemble keeps).
    return {"points": ids.tolist(), "seconds": time.perf_counter() - t0, "pgd_family_seconds": family, "passes": passes,
            "attacks": attacks}


def run_units(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, plan: SuitePlan, store: UnitStore, *,
    device: torch.device, progress: bool = True, chunks: Sequence[int] | None = None,
    announce: logging.Logger | None = None,
) -> None:
    """Run every unit of ``plan`` on the given chunks (default: all) that ``store`` lacks.

    The clean units run first, then unit by unit over the chunks (a cascade's unit attacks the
    chunk's points still robust after its earlier units); a unit's record goes into ``store`` as
    soon as it finishes. ``announce``: a logger told of every finished unit. The model runs
    in eval mode (restored afterwards, also on error) on ``device``."""
    sl = plan.chunks(len(x))
    todo = list(range(len(sl)) if chunks is None else chunks)
    check_device(model, device)
    with eval_mode(model), torch.enable_grad():  # the gradient attacks need autograd even under no_grad
        for k in todo:  # every clean unit first: the attack units of a chunk need its clean record
            key = f"clean/{k}"
            if key not in store:
                rec = run_clean_unit(plan.context(model, device, progress, k, None), x[sl[k]], y[sl[k]], ids[sl[k]])
                store.put(key, rec)
                if announce:
                    correct = float((rec["clean_pred"] == y[sl[k]]).double().mean())
                    announce.info("audit unit %s done: %d points, clean accuracy %.4f", key, len(rec["points"]),
                                  correct)
        for u, unit in enumerate(plan.units):  # then unit by unit, chunk by chunk
            for k in todo:
                key = f"{unit.name}/{k}"
                if key in store:
                    continue
                xk, yk, ik = x[sl[k]], y[sl[k]], ids[sl[k]]
                clean = store.get(f"clean/{k}")
                target = clean["clean_pred"] == yk
                if plan.cascade:  # the chunk's points still robust after its earlier units
                    target = still_robust(plan, target, yk, [store.get(f"{p.name}/{k}") for p in plan.units[:u]])
                rec = run_unit(plan.context(model, device, progress, k, unit), unit, xk, yk, ik, clean=clean,
                               target=target, cascade=plan.cascade)
                store.put(key, rec)
                if announce:
                    announce.info("audit unit %s done: %d of %d points attacked in %.2fs", key, int(target.sum()),
                                  len(yk), rec["seconds"])


# --------------------------------------------------------------------------------------------
# Assembling: the worst case.
# --------------------------------------------------------------------------------------------
def assemble(plan: SuitePlan, store: UnitStore, y: torch.Tensor, ids: torch.Tensor, *,
             seconds: float | None = None) -> SuiteResult:
    """The :class:`SuiteResult` of every unit in ``store`` (each chunk's records concatenated).

    The worst case per point is "robust under every attack that counts" (ℓ∞ attacks, and ℓ2 ones
    when ``eps_l2 <= eps``), also at the PGD family's best iterates; in a cascade also "still
    robust after the whole cascade". ``seconds``: the run's time (default: the units' sum)."""
    n_chunks = len(plan.chunks(len(y)))
    ks = range(n_chunks)
    cleans = [store.get(f"clean/{k}") for k in ks]
    clean_pred = torch.cat([c["clean_pred"] for c in cleans])
    clean_margin = torch.cat([c["clean_margin"] for c in cleans])
    total = sum(float(c["seconds"]) for c in cleans)
    counted = [c.get("passes") for c in cleans]
    correct = clean_pred == y
    results: dict[str, AttackResult] = {}
    family_seconds = 0.0
    robust_now = correct.clone()
    for unit in plan.units:
        recs = [store.get(f"{unit.name}/{k}") for k in ks]
        total += sum(float(r["seconds"]) for r in recs)
        counted += [r.get("passes") for r in recs]
        if unit.name == "pgd":
            family_seconds = sum(float(r["pgd_family_seconds"]) for r in recs)
        for a in unit.names:
            res = attack_result(a, plan.radius(get_attack(a).norm), _concat([r["attacks"][a] for r in recs]), y)
            results[a] = res
            log.info("%s: robust accuracy %.4f (%d attacked, %.2fs)", a, res.robust_accuracy,
                     int(res.attacked.sum()), res.seconds)
            if plan.cascade:
                robust_now = cascade_update(robust_now, res.worst_case_robust, res.attacked)
    in_worst = [a for a in results if plan.in_worst_case(a)]
    left_out = [a for a in results if a not in in_worst]
    if left_out:
        log.warning("%s at eps_l2=%.4g > eps=%.4g is a different threat model: it is "
                    "left out of the ℓ∞ worst case", ", ".join(left_out), plan.eps_l2, plan.eps)
    worst = correct.clone()
    for a in in_worst:
        worst &= results[a].worst_case_robust
    if plan.cascade:
        worst &= robust_now
    settings = {"batch_size": plan.batch_size, **{s.name: plan.knobs[s.name] for s in SUITE_SETTINGS if s.reported},
                "order": list(plan.order), "pgd_family_seconds": family_seconds}
    if plan.chunked:
        settings.update(chunks=n_chunks, pgd_chunk_seeds=f"seed + {CHUNK_SEED_STRIDE} * chunk")
    passes = suite_passes(counted, n_clean=n_chunks, families={u.name: u.names for u in plan.units if len(u.attacks) > 1})
    return SuiteResult(eps=plan.eps, eps_l2=plan.eps_l2, seed=plan.seed, indices=ids, labels=y,
                       clean_pred=clean_pred, clean_margin=clean_margin, attacks=results, worst_case=worst,
                       worst_case_attacks=in_worst, cascade=plan.cascade, settings=settings,
                       seconds=total if seconds is None else seconds, passes=passes)


def _concat(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One attack's records over the chunks, concatenated (``x_adv`` only if every chunk has it)."""
    out: dict[str, Any] = {c: torch.cat([p[c] for p in parts]) for c in COLUMNS}
    out["extra"] = {e: torch.cat([p["extra"][e] for p in parts]) for e in parts[0]["extra"]}
    out["seconds"] = sum(float(p["seconds"]) for p in parts)
    if all("passes" in p for p in parts):
        out["passes"] = add_passes(*(p["passes"] for p in parts))
    if all("x_adv" in p for p in parts):
        out["x_adv"] = torch.cat([p["x_adv"] for p in parts])
    return out
