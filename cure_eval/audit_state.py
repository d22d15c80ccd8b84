"""Resumable, shardable audits: the unit plan, the state file and the process group.

:func:`run_resumable_suite` computes what :func:`~cure_eval.attacks.run_suite` computes, cut into
*units* whose per-point results are kept in ``audit_state.json`` as soon as each unit finishes:

* The points (in the audit's order) are cut into **chunks** of ``batch_size`` consecutive points;
  chunk ``k`` holds points ``k·batch_size … (k+1)·batch_size − 1``.
* A **unit** is one attack on one chunk: ``clean/k`` (clean predictions and margins), then per
  chunk ``fgsm/k``, ``pgd/k`` (the whole PGD(7/20/40/100) family: one trajectory),
  ``deepfool_linf/k``, ``deepfool_l2/k``, ``spsa/k`` for the requested attacks, in the suite's order
  (:data:`~cure_eval.attacks.CASCADE_ORDER` for a cascade, where a unit attacks the chunk's points
  still robust after the chunk's earlier units). Each unit is a ``run_suite`` call on its points.
* A unit's result depends only on the settings and its chunk, never on which process ran it,
  nor when: FGSM and DeepFool are deterministic, SPSA draws counter-based random numbers from
  ``(seed, dataset index)``, and PGD's random start of chunk ``k`` is drawn exactly as
  ``torchattacks.PGD`` draws it, batch-wise, after ``torch.manual_seed(seed + 1000003·k)``
  (:func:`pgd_chunk_seed`; chunk 0 uses ``seed`` itself, so an audit of at most ``batch_size``
  points is bit-identical to ``torchattacks.PGD`` after ``torch.manual_seed(seed)``). Resumed and
  sharded audits therefore equal an uninterrupted single-process audit of the same command
  exactly (same machine and thread count; timings aside).

State file (compact JSON, written atomically after every unit)::

    {"format": "cure_eval.audit_state/1",
     "fingerprint": {"model": {..., "state_sha256"}, "dataset", "points", "data_sha256", "eps",
                     "pgd_alpha", "attacks", "cascade", "seed", "spsa_iterations", "batch_size",
                     "suite_defaults", "device_type", "versions"},
     "units": {"clean/0": {"points", "clean_pred", "clean_margin", "seconds"},
               "fgsm/0": {"points", "seconds", "attacks": {"fgsm": {"attacked", "adv_pred",
                          "margin", "linf", "l2", "extra", "seconds"}}}, ...},
     "stages": {"eps_sweep" | "masking" | "geometry" | "features": {"settings", "result"}},
     "complete": false}

Tensors are stored as ``{"dtype", "data"}`` and read back bit-exactly (inf/NaN as JSON's
``Infinity``/``NaN``). Adversarial images are not stored: results rebuilt from the state carry
an empty ``x_adv`` of shape ``(n, 0)``.

A state whose fingerprint differs from the current settings is refused
(:class:`~cure_eval.errors.CureEvalError`); ``restart=True`` discards it. While it runs, each
process holds a POSIX lock on byte ``rank`` of ``.audit_state.lock``, so a second audit started in
the same folder (e.g. while the workers of a ``kill -9``-ed torchrun still run) is refused.

Sharding (``torchrun --nproc_per_node=N -m cure_eval.audit``): a gloo process group is set up from
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``); chunk ``k``
belongs to rank ``k mod N``. Rank 0 keeps ``audit_state.json``, rank ``r > 0`` keeps
``audit_state.rank<r>.json`` (each holds everything its rank knows); every rank reads all of them
on start, so an audit can be resumed with any number of processes. At the end rank 0 gathers the
per-sample records, writes the merged state and removes the rank files; only rank 0 writes the
audit's outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .attacks import (
    AttackResult,
    SuiteResult,
    cascade_update,
    get_attack,
    library_versions,
    run_suite,
)
from .attacks import attack_order as _registry_order
from .errors import CureEvalError
from .io import _json_default, write_text_atomic

log = logging.getLogger("cure_eval.audit")

#: Name of rank 0's (and a single process's) state file in the audit folder.
STATE_FILE = "audit_state.json"
#: Lock file of the audit folder (byte ``r`` is rank ``r``'s lock).
LOCK_FILE = ".audit_state.lock"
#: Version tag of the state format; another tag is refused like other settings.
STATE_FORMAT = "cure_eval.audit_state/1"
#: Chunk ``k``'s PGD random start (any attack with ``chunk_seeded``) comes from
#: ``torch.manual_seed(seed + PGD_SEED_STRIDE * k)``.
PGD_SEED_STRIDE = 1_000_003
#: run_suite settings the audit leaves at their defaults (part of the fingerprint).
SUITE_DEFAULTS: dict[str, Any] = {"spsa_samples": 128, "deepfool_steps": 50, "deepfool_candidates": 10,
                                  "deepfool_overshoot": 0.02}
#: Collective timeout: a rank may wait this long for slower ranks (torchrun stops every rank
#: as soon as one fails, so this never hides a crash).
PROCESS_GROUP_TIMEOUT = timedelta(days=7)


# --------------------------------------------------------------------------------------------
# Processes.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """This process's place in a sharded audit (``Shard()``: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def chunks(self, n_chunks: int) -> list[int]:
        """The chunks this rank attacks (round robin)."""
        return list(range(self.rank, n_chunks, self.world_size))

    def barrier(self) -> None:
        if self.sharded:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (in rank order), ``None`` elsewhere."""
        if not self.sharded:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def device(self, device: torch.device) -> torch.device:
        """``cuda`` without an index means this rank's GPU (``LOCAL_RANK``) when sharded."""
        if self.sharded and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise CureEvalError(f"environment variable {name}={value!r} is not an integer") from None


def shard_from_env(env: Mapping[str, str] | None = None) -> Shard:
    """Join torchrun's process group (gloo) when ``WORLD_SIZE > 1``; a single process otherwise."""
    env = os.environ if env is None else env
    world = _env_int(env, "WORLD_SIZE") or 1
    if world <= 1:
        return Shard()
    rank = _env_int(env, "RANK")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(v)]
    if rank is None or missing:
        raise CureEvalError(f"WORLD_SIZE={world} but {', '.join(missing or ['RANK'])} not set: start "
                            f"sharded audits with torchrun --nproc_per_node=N -m cure_eval.audit ...")
    local = _env_int(env, "LOCAL_RANK")
    import torch.distributed as dist

    if not dist.is_available():
        raise CureEvalError("this torch build has no torch.distributed: run the audit in one process")
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=PROCESS_GROUP_TIMEOUT)
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise CureEvalError(f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
                            f"the environment says {rank} of {world}")
    return Shard(rank=rank, world_size=world, local_rank=rank if local is None else local)


def close_shard(shard: Shard) -> None:
    if shard.sharded:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Fingerprint.
# --------------------------------------------------------------------------------------------
def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(f"{t.dtype}:{t.numel()};".encode())
    if t.numel():
        h.update(t.view(torch.uint8).numpy().tobytes())


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over the model's parameters and buffers (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}".encode())
        _hash_tensor(h, t)
    return h.hexdigest()


def tensors_sha256(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{tuple(t.shape)}".encode())
        _hash_tensor(h, t)
    return h.hexdigest()


def attack_order(attacks: Sequence[str], cascade: bool) -> list[str]:
    """The requested attacks in the order the suite runs them (``clean`` dropped; unknown names
    list the registered ones)."""
    return _registry_order(attacks, cascade=cascade)


def unit_plan(attacks: Sequence[str], cascade: bool) -> list[tuple[str, list[str]]]:
    """``[(unit name, attacks it computes)]`` in run order: an attack alone, or a whole family
    (the PGD family: one unit ``pgd``) at the place of its first member."""
    order = attack_order(attacks, cascade)
    families = {a: get_attack(a).family for a in order}
    plan: list[tuple[str, list[str]]] = []
    for a in order:
        fam = families[a]
        if fam is None:
            plan.append((a, [a]))
        elif all(fam != unit for unit, _ in plan):
            plan.append((fam, [b for b in order if families[b] == fam]))
    return plan


def _chunk_seeded(unit: str, names: Sequence[str]) -> bool:
    """The unit's attacks draw from the global RNG (PGD's random starts): seed it per chunk."""
    return any(get_attack(a).chunk_seeded for a in names)


def pgd_chunk_seed(seed: int, chunk: int) -> int:
    """Seed of chunk ``chunk``'s PGD random start (``seed`` for chunk 0)."""
    return seed + PGD_SEED_STRIDE * chunk


def audit_fingerprint(
    *, model: nn.Module, desc: Mapping[str, Any], dataset: str, x: torch.Tensor, y: torch.Tensor,
    indices: torch.Tensor, eps: float, pgd_alpha: float, attacks: Sequence[str], cascade: bool, seed: int,
    spsa_iterations: int, batch_size: int, device: torch.device,
) -> dict[str, Any]:
    """Everything the per-point results depend on (paths excluded: the weights' hash identifies them)."""
    identity = {k: v for k, v in desc.items() if k not in ("path", "weights")}
    identity["state_sha256"] = state_dict_sha256(model)
    return _normal({
        "model": identity, "dataset": dataset, "points": indices.tolist(), "data_sha256": tensors_sha256(x, y),
        "eps": float(eps), "pgd_alpha": float(pgd_alpha), "attacks": attack_order(attacks, cascade),
        "cascade": bool(cascade), "seed": int(seed), "spsa_iterations": int(spsa_iterations),
        "batch_size": int(batch_size), "suite_defaults": SUITE_DEFAULTS, "device_type": torch.device(device).type,
        "versions": {"cure_eval": __version__, **library_versions()},
    })


def _normal(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples → lists, numpy → Python)."""
    return json.loads(_dumps(obj))


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=_json_default)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def fingerprint_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two fingerprints, one short phrase per setting."""
    diffs = []
    for key in list(new) + [k for k in old if k not in new]:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            sub = [k for k in list(b) + [k for k in a if k not in b] if a.get(k) != b.get(k)]
            diffs.append(f"{key}: {', '.join(sub)} differ")
        else:
            diffs.append(f"{key}: {_short(a)} → {_short(b)}")
    return diffs


# --------------------------------------------------------------------------------------------
# The state.
# --------------------------------------------------------------------------------------------
def state_files(out: Path) -> list[Path]:
    """The state files of an audit folder: rank 0's first, then the other ranks'."""
    main = [out / STATE_FILE] if (out / STATE_FILE).exists() else []
    return main + sorted(out.glob("audit_state.rank*.json"))


def _lock(out: Path, rank: int) -> int | None:
    """Lock byte ``rank`` of ``out/.audit_state.lock``: one audit process per rank and folder.

    POSIX record locks vanish with their process (also on ``kill -9``). Not on Windows.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no protection against concurrent audits
        return None
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, rank)
    except OSError:
        os.close(fd)
        raise CureEvalError(
            f"another audit is running in {out} (rank {rank}'s lock in {LOCK_FILE} is held): wait for it "
            f"or stop it (a torchrun killed with -9 leaves its workers running), or use a new --out") from None
    return fd


def not_applicable(reason: str) -> dict[str, Any]:
    """The record of a stage that does not apply to the audited model (it writes no files)."""
    return {"status": "not_applicable", "reason": reason}


def is_not_applicable(result: Any) -> bool:
    return isinstance(result, dict) and result.get("status") == "not_applicable"


class AuditState:
    """Finished units and stages of one audit, kept in ``out`` (see the module docs).

    Made by :meth:`open`, which takes this rank's lock on the folder; :meth:`close` releases it.
    """

    def __init__(self, out: Path, fingerprint: Mapping[str, Any], shard: Shard = Shard()) -> None:
        self.out = Path(out)
        self.fingerprint: dict[str, Any] = _normal(dict(fingerprint))
        self.shard = shard
        self.units: dict[str, dict[str, Any]] = {}
        self.stages: dict[str, dict[str, Any]] = {}
        self.complete = False
        self.loaded_from: list[Path] = []
        self._lock_fd: int | None = None

    @property
    def path(self) -> Path:
        name = STATE_FILE if self.shard.is_main else f"audit_state.rank{self.shard.rank}.json"
        return self.out / name

    @classmethod
    def open(cls, out: Path, fingerprint: Mapping[str, Any], *, shard: Shard = Shard(),
             restart: bool = False) -> AuditState:
        """Load (and check) the state in ``out``, or discard it with ``restart``.

        Raises :class:`CureEvalError` if a state file was made with other settings.
        """
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state = cls(out, fingerprint, shard)
        state._lock_fd = _lock(out, shard.rank)  # before touching anything
        try:
            if shard.is_main:
                for tmp in out.glob(".audit_state*.tmp"):  # torn writes of a killed run
                    tmp.unlink(missing_ok=True)
                if restart:
                    found = state_files(out)
                    for f in found:
                        f.unlink()
                    if found:
                        log.info("--restart: discarded %s", ", ".join(f.name for f in found))
            shard.barrier()  # every rank reads what rank 0 left
            for f in state_files(out):
                state._merge(f)
        except BaseException:
            state.close()
            raise
        return state

    def close(self) -> None:
        """Release this rank's lock on the audit folder (the state stays on disk)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _merge(self, path: Path) -> None:
        hint = "use a new --out, or --restart to discard it"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CureEvalError(f"{path} is not a readable audit state ({type(exc).__name__}): {hint}") from None
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise CureEvalError(f"{path} is not an audit state of this version (format {found!r}, "
                                f"expected {STATE_FORMAT!r}): {hint}")
        old = data.get("fingerprint", {})
        if old != self.fingerprint:
            diffs = "; ".join(fingerprint_diff(old, self.fingerprint))
            raise CureEvalError(f"{path} was made with different settings ({diffs}): {hint}")
        for key, rec in data.get("units", {}).items():
            self.units.setdefault(key, rec)
        if path.name == STATE_FILE:
            self.stages.update(data.get("stages", {}))
            self.complete = bool(data.get("complete", False))
        self.loaded_from.append(path)

    def save(self) -> None:
        data = {"format": STATE_FORMAT, "fingerprint": self.fingerprint, "units": self.units,
                "stages": self.stages if self.shard.is_main else {},
                "complete": self.complete and self.shard.is_main}
        write_text_atomic(self.path, _dumps(data) + "\n")

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Record a finished unit and save at once."""
        self.units[key] = _normal(record)
        self.save()

    def stage(self, name: str, settings: Mapping[str, Any], files: Sequence[str]) -> Any | None:
        """A finished stage's result if it was made with ``settings`` and its files exist."""
        prev = self.stages.get(name)
        if prev is None or prev.get("settings") != _normal(dict(settings)):
            return None
        if not is_not_applicable(prev["result"]) and not all((self.out / f).exists() for f in files):
            return None
        return prev["result"]

    def put_stage(self, name: str, settings: Mapping[str, Any], result: Any) -> Any:
        """Record a finished stage; return its result as it reads back from the state."""
        entry = _normal({"settings": dict(settings), "result": result})
        self.stages[name] = entry
        self.save()
        return entry["result"]

    def mark_complete(self) -> None:
        self.complete = True
        self.save()

    def finish_merge(self, units: Mapping[str, dict[str, Any]]) -> None:
        """Rank 0 / a single process: hold every unit in ``audit_state.json``, drop rank files."""
        assert self.shard.is_main
        self.units.update(units)
        self.save()
        for f in self.out.glob("audit_state.rank*.json"):
            f.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Running the units.
# --------------------------------------------------------------------------------------------
def _enc(t: torch.Tensor) -> dict[str, Any]:
    return {"dtype": str(t.dtype).removeprefix("torch."), "data": t.tolist()}


def _dec(d: Mapping[str, Any]) -> torch.Tensor:
    return torch.tensor(d["data"], dtype=getattr(torch, d["dtype"]))


class _SuiteLogFilter(logging.Filter):
    """Per-chunk suite calls: drop their per-attack INFO lines, show each warning once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


@contextmanager
def _quiet_suite_log() -> Iterator[None]:
    logger = logging.getLogger("cure_eval.attacks.suite")
    filt = _SuiteLogFilter()
    logger.addFilter(filt)
    try:
        yield
    finally:
        logger.removeFilter(filt)


def _defaults(name: str, clean_pred: torch.Tensor, clean_margin: torch.Tensor,
              correct: torch.Tensor) -> dict[str, Any]:
    """Columns of an attack on a chunk before any point is attacked (as run_suite fills them)."""
    n = len(clean_pred)
    extra = get_attack(name)().per_sample({}, torch.zeros(0, dtype=torch.long), n, correct)
    return {"attacked": torch.zeros(n, dtype=torch.bool), "adv_pred": clean_pred.clone(),
            "margin": clean_margin.clone(), "linf": torch.zeros(n), "l2": torch.zeros(n), "extra": extra}


def _columns(rec: Mapping[str, Any]) -> dict[str, Any]:
    cols: dict[str, Any] = {k: _dec(rec[k]) for k in ("attacked", "adv_pred", "margin", "linf", "l2")}
    cols["extra"] = {k: _dec(v) for k, v in rec.get("extra", {}).items()}
    return cols


def _robust_after(plan: Sequence[tuple[str, list[str]]], records: Sequence[Mapping[str, Any]],
                  correct: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The cascade's "still robust" mask after the given units (run_suite's update rules)."""
    robust_now = correct.clone()
    for (_unit, names), rec in zip(plan, records, strict=True):
        for a in names:
            cols = _columns(rec["attacks"][a])
            robust = cols["attacked"] & (cols["adv_pred"] == y)
            best = cols["extra"].get("best_fooled")
            if best is not None:  # AttackResult.worst_case_robust
                robust &= ~(best == 1)
            robust_now = cascade_update(robust_now, robust, cols["attacked"])
    return robust_now


def run_resumable_suite(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, *, eps: float,
    device: torch.device, attacks: Sequence[str], batch_size: int, seed: int, cascade: bool,
    pgd_alpha: float, spsa_iterations: int, state: AuditState, shard: Shard = Shard(), progress: bool = True,
) -> SuiteResult | None:
    """The suite unit by unit, reusing the units in ``state`` (see the module docs).

    Returns the merged :class:`SuiteResult` on rank 0 (or in a single process), ``None`` on the
    other ranks.
    """
    y = y.detach().cpu().long()
    indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    n = len(x)
    plan = unit_plan(attacks, cascade)
    chunks = [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    mine = shard.chunks(len(chunks))
    keys = [f"clean/{k}" for k in mine] + [f"{u}/{k}" for u, _ in plan for k in mine]
    reused = [k for k in keys if k in state.units]
    if shard.sharded:
        log.info("rank %d of %d: chunks %s of %d (%d points)", shard.rank, shard.world_size,
                 ",".join(map(str, mine)) or "none", len(chunks), sum(_len(chunks[k]) for k in mine))
    if reused:
        counts = Counter(k.split("/")[0] for k in reused)
        log.info("resuming from %s: reusing %d finished units of %d (%s), not recomputed; %d to compute",
                 ", ".join(p.name for p in state.loaded_from), len(reused), len(keys),
                 ", ".join(f"{u} ×{c}" for u, c in counts.items()), len(keys) - len(reused))
        log.debug("reused units: %s", " ".join(reused))
    common = {"eps": eps, "device": device, "batch_size": batch_size, "pgd_alpha": pgd_alpha,
              "spsa_iterations": spsa_iterations, "progress": progress, **SUITE_DEFAULTS}

    with _quiet_suite_log():
        for k in mine:
            key = f"clean/{k}"
            if key in state.units:
                continue
            sl = chunks[k]
            t0 = time.perf_counter()
            res = run_suite(model, x[sl], y[sl], attacks=["clean"], seed=seed, indices=indices[sl], **common)
            state.put(key, {"points": indices[sl].tolist(), "clean_pred": _enc(res.clean_pred),
                            "clean_margin": _enc(res.clean_margin), "seconds": time.perf_counter() - t0})
            log.info("audit unit %s done: %d points, clean accuracy %.4f", key, _len(sl), res.clean_accuracy)

        for u, (unit, names) in enumerate(plan):
            for k in mine:
                key = f"{unit}/{k}"
                if key in state.units:
                    continue
                sl = chunks[k]
                clean = state.units[f"clean/{k}"]
                clean_pred, clean_margin = _dec(clean["clean_pred"]), _dec(clean["clean_margin"])
                yk = y[sl]
                correct = clean_pred == yk
                target = correct
                if cascade:
                    target = _robust_after(plan[:u], [state.units[f"{p}/{k}"] for p, _ in plan[:u]],
                                           correct, yk)
                sub = target.nonzero().flatten()
                cols = {a: _defaults(a, clean_pred, clean_margin, correct) for a in names}
                secs = dict.fromkeys(names, 0.0)
                family = 0.0
                t0 = time.perf_counter()
                if len(sub):
                    unit_seed = pgd_chunk_seed(seed, k) if _chunk_seeded(unit, names) else seed
                    res = run_suite(model, x[sl][sub], yk[sub], attacks=names, seed=unit_seed, cascade=cascade,
                                    indices=indices[sl][sub], **common)
                    family = float(res.settings.get("pgd_family_seconds", 0.0))
                    for a in names:
                        r, c = res.attacks[a], cols[a]
                        for col in ("attacked", "adv_pred", "margin", "linf", "l2"):
                            c[col][sub] = getattr(r, col).to(c[col].dtype)
                        for name_, v in r.extra.items():
                            if name_ not in c["extra"]:  # an extra column the suite added
                                fill = float("nan") if v.is_floating_point() else 0
                                c["extra"][name_] = torch.full((len(yk),), fill, dtype=v.dtype)
                            c["extra"][name_][sub] = v.to(c["extra"][name_].dtype)
                        secs[a] = r.seconds
                rec = {"points": indices[sl].tolist(), "seconds": time.perf_counter() - t0,
                       "pgd_family_seconds": family,
                       "attacks": {a: {**{col: _enc(cols[a][col]) for col in ("attacked", "adv_pred", "margin",
                                                                                "linf", "l2")},
                                       "extra": {e: _enc(v) for e, v in cols[a]["extra"].items()},
                                       "seconds": secs[a]} for a in names}}
                state.put(key, rec)
                log.info("audit unit %s done: %d of %d points attacked in %.2fs", key, len(sub), _len(sl),
                         rec["seconds"])

    records = {key: state.units[key] for key in keys}
    if shard.sharded:
        gathered = shard.gather(records)
        if gathered is None:
            return None
        for part in gathered:
            records.update(part)
    if shard.is_main:
        state.finish_merge(records)
    return _assemble(state.units, plan, chunks, y, indices, eps=eps, seed=seed, cascade=cascade,
                     batch_size=batch_size, pgd_alpha=pgd_alpha, spsa_iterations=spsa_iterations)


def _len(sl: slice) -> int:
    return int(sl.stop) - int(sl.start)


def _assemble(
    units: Mapping[str, Mapping[str, Any]], plan: Sequence[tuple[str, list[str]]], chunks: Sequence[slice],
    y: torch.Tensor, indices: torch.Tensor, *, eps: float, seed: int, cascade: bool, batch_size: int,
    pgd_alpha: float, spsa_iterations: int,
) -> SuiteResult:
    """The :class:`SuiteResult` of all units (what run_suite would return, without ``x_adv``)."""
    n = len(y)
    ks = range(len(chunks))
    clean_pred = torch.cat([_dec(units[f"clean/{k}"]["clean_pred"]) for k in ks])
    clean_margin = torch.cat([_dec(units[f"clean/{k}"]["clean_margin"]) for k in ks])
    seconds = sum(float(units[f"clean/{k}"]["seconds"]) for k in ks)
    correct = clean_pred == y
    results: dict[str, AttackResult] = {}
    family_seconds = 0.0
    robust_now = correct.clone()
    for unit, names in plan:
        recs = [units[f"{unit}/{k}"] for k in ks]
        seconds += sum(float(r["seconds"]) for r in recs)
        if unit == "pgd":
            family_seconds = sum(float(r["pgd_family_seconds"]) for r in recs)
        for a in names:
            parts = [_columns(r["attacks"][a]) for r in recs]
            cols = {c: torch.cat([p[c] for p in parts]) for c in ("attacked", "adv_pred", "margin", "linf", "l2")}
            extra = {e: torch.cat([p["extra"][e] for p in parts]) for e in parts[0]["extra"]}
            attacked, adv_pred = cols["attacked"], cols["adv_pred"]
            res = AttackResult(
                name=a, eps=eps, x_adv=torch.zeros(n, 0), adv_pred=adv_pred, success=attacked & (adv_pred != y),
                robust=attacked & (adv_pred == y), margin=cols["margin"], linf=cols["linf"], l2=cols["l2"],
                attacked=attacked, seconds=sum(float(r["attacks"][a]["seconds"]) for r in recs), extra=extra)
            results[a] = res
            log.info("%s: robust accuracy %.4f (%d attacked, %.2fs)", a, res.robust_accuracy,
                     int(attacked.sum()), res.seconds)
            if cascade:
                robust_now = cascade_update(robust_now, res.worst_case_robust, attacked)
    worst = correct.clone()
    for res in results.values():
        worst &= res.worst_case_robust
    if cascade:
        worst &= robust_now
    settings = {"batch_size": batch_size, "pgd_alpha": pgd_alpha, "spsa_iterations": spsa_iterations,
                **SUITE_DEFAULTS, "order": list(results), "pgd_family_seconds": family_seconds,
                "chunks": len(chunks), "pgd_chunk_seeds": f"seed + {PGD_SEED_STRIDE} * chunk"}
    return SuiteResult(eps=float(eps), eps_l2=float(eps), seed=seed, indices=indices, labels=y,
                       clean_pred=clean_pred, clean_margin=clean_margin, attacks=results, worst_case=worst,
                       worst_case_attacks=list(results), cascade=cascade, settings=settings, seconds=seconds)
