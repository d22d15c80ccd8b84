"""The unit store of an audit: finished units and stages, kept in the audit folder and locked.

State file (compact JSON, written atomically after every unit)::

    {"format": "cure_eval.audit_state/1",
     "fingerprint": {...},                       (cure_eval.auditing.fingerprint)
     "units": {"clean/0": {"points", "clean_pred", "clean_margin", "seconds"},
               "fgsm/0": {"points", "seconds", "pgd_family_seconds",
                          "attacks": {"fgsm": {"attacked", "adv_pred", "margin", "linf", "l2",
                                               "extra", "seconds"}}}, ...},
     "stages": {"eps_sweep" | "masking" | "geometry" | "features": {"settings", "result"}},
     "complete": false}

Unit records are those of the unit runner (:mod:`cure_eval.attacks.units`), tensors encoded by
:mod:`.codec` (adversarial images left out). A state whose fingerprint differs from the current
one is refused (:class:`~cure_eval.errors.CureEvalError`); ``restart=True`` discards it. While it
runs, each process holds a POSIX lock on byte ``rank`` of ``.audit_state.lock``, so a second
audit started in the same folder is refused. Rank 0 keeps ``audit_state.json``, rank ``r > 0``
``audit_state.rank<r>.json``; every rank reads all of them on start, so an audit can be resumed
with any number of processes; at the end rank 0 holds every unit and removes the rank files.

:class:`MemoryAuditState` is the same store in memory (no file, no lock): an audit run through it
gives the same outputs as one run through :class:`AuditState`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..core.io import write_text_atomic
from ..errors import CureEvalError
from .codec import decode_record, encode_record
from .fingerprint import dumps, fingerprint_diff, normal
from .shard import Shard

log = logging.getLogger("cure_eval.audit")

#: Name of rank 0's (and a single process's) state file in the audit folder.
STATE_FILE = "audit_state.json"
#: Lock file of the audit folder (byte ``r`` is rank ``r``'s lock).
LOCK_FILE = ".audit_state.lock"
#: Folder of the adversarial images kept beside the state (``keep_adversarials``): one safetensors
#: file per unit, ``<unit>__<chunk>.safetensors``, a tensor per attack.
ADVERSARIALS_DIR = "audit_adversarials"
#: Version tag of the state format; another tag is refused like other settings.
STATE_FORMAT = "cure_eval.audit_state/1"


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
            f"or stop it (a torchrun killed with -9 leaves its workers running), or use a new `out` folder") from None
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

    def __init__(self, out: Path, fingerprint: Mapping[str, Any], shard: Shard = Shard(), *,
                 keep_adversarials: bool = False) -> None:
        self.out = Path(out)
        self.keep_adversarials = keep_adversarials
        self.fingerprint: dict[str, Any] = normal(dict(fingerprint))
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
             restart: bool = False, keep_adversarials: bool = False) -> AuditState:
        """Load (and check) the state in ``out``, or discard it with ``restart``.

        ``keep_adversarials``: also keep each unit's adversarial images, in :data:`ADVERSARIALS_DIR`
        (the state file leaves them out). Raises :class:`CureEvalError` if a state file was made
        with other settings.
        """
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state = cls(out, fingerprint, shard, keep_adversarials=keep_adversarials)
        state._lock_fd = _lock(out, shard.rank)  # before touching anything
        try:
            if shard.is_main:
                for tmp in out.glob(".audit_state*.tmp"):  # torn writes of a killed run
                    tmp.unlink(missing_ok=True)
                if restart:
                    found = state_files(out)
                    for f in found:
                        f.unlink()
                    for f in (out / ADVERSARIALS_DIR).glob("*.safetensors"):
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
        write_text_atomic(self.path, dumps(data) + "\n")

    def __contains__(self, key: object) -> bool:
        return key in self.units

    def get(self, key: str) -> dict[str, Any]:
        """A finished unit's record, tensors decoded (with its adversarial images where kept)."""
        record = dict(decode_record(self.units[key]))
        side = self._adversarials_path(key)
        if self.keep_adversarials and "attacks" in record and side.exists():
            from safetensors.torch import load_file

            images = load_file(str(side))
            record["attacks"] = {a: ({**cols, "x_adv": images[a]} if a in images else cols)
                                 for a, cols in record["attacks"].items()}
        return record

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Record a finished unit (tensors encoded, images left out, or kept beside the state with
        ``keep_adversarials``) and save at once."""
        if self.keep_adversarials and "attacks" in record:
            from safetensors.torch import save_file

            from ..core.io import atomic_write

            images = {a: cols["x_adv"].contiguous() for a, cols in record["attacks"].items() if "x_adv" in cols}
            atomic_write(self._adversarials_path(key), lambda tmp: save_file(images, tmp))
        self.units[key] = normal(encode_record(record))
        self.save()

    def _adversarials_path(self, key: str) -> Path:
        return self.out / ADVERSARIALS_DIR / (key.replace("/", "__") + ".safetensors")

    def stage(self, name: str, settings: Mapping[str, Any], files: Sequence[str]) -> Any | None:
        """A finished stage's result if it was made with ``settings`` and its files exist."""
        prev = self.stages.get(name)
        if prev is None or prev.get("settings") != normal(dict(settings)):
            return None
        if not is_not_applicable(prev["result"]) and not all((self.out / f).exists() for f in files):
            return None
        return prev["result"]

    def put_stage(self, name: str, settings: Mapping[str, Any], result: Any) -> Any:
        """Record a finished stage; return its result as it reads back from the state."""
        entry = normal({"settings": dict(settings), "result": result})
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


class MemoryAuditState(AuditState):
    """:class:`AuditState` in memory: unit records kept as the runner made them, nothing written,
    no lock. Stage results read back as from JSON, like the file store's."""

    @classmethod
    def open(cls, out: Path, fingerprint: Mapping[str, Any], *, shard: Shard = Shard(),
             restart: bool = False, keep_adversarials: bool = False) -> AuditState:
        Path(out).mkdir(parents=True, exist_ok=True)
        return cls(Path(out), fingerprint, shard, keep_adversarials=keep_adversarials)

    def get(self, key: str) -> dict[str, Any]:
        return self.units[key]

    def put(self, key: str, record: dict[str, Any]) -> None:
        self.units[key] = record

    def save(self) -> None:
        """Nothing to write."""

    def finish_merge(self, units: Mapping[str, dict[str, Any]]) -> None:
        self.units.update(units)
