"""What to run in an audit: :class:`AuditOptions`, and the radii it resolves per dataset."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..attacks import DEFAULT_ATTACKS, expand_presets
from ..data import DatasetSpec
from ..errors import UsageError
from ..masking.findings import gradient_free_points


@dataclass
class AuditOptions:
    """What to run in an audit. ε, PGD step and the sweep radii in [0, 1] pixel units
    (``None``: the dataset's default); ``n`` points (``None``: all on digits, 1000 otherwise);
    ``features_layers``: module names for ``features`` (``None``: the network's stages);
    ``attacks``: attack names or the presets ``"default"`` / ``"thorough"``
    (:data:`~cure_eval.attacks.ATTACK_PRESETS`; default :data:`~cure_eval.attacks.DEFAULT_ATTACKS`).
    ``masking_spsa_n``: how many of the masking check's points SPSA and Square attack (a number,
    ``"all"``, or ``"auto"``: :func:`~cure_eval.masking.findings.gradient_free_points`).
    ``cascade``: each attack only on the points still robust (``None``, the default: a cascade for
    the default suite, whose order is cheap → strong by measured strength per pass, and every
    attack on every clean-correct point for any other list, whose columns are then each attack's
    own robust accuracy)."""

    eps: float | None = None
    alpha: float | None = None
    n: int | None = None
    attacks: list[str] = field(default_factory=lambda: list(DEFAULT_ATTACKS))
    spsa_iterations: int = 100
    cascade: bool | None = None
    eps_sweep: list[float] = field(default_factory=list)
    masking_check: bool = False
    masking_n: int | None = None
    masking_spsa_n: int | str = "auto"
    geometry: bool = False
    geometry_n: int = 20
    h: float | None = None
    top_k: int = 10
    features: bool = False
    features_n: int = 100
    features_layers: list[str] | None = None
    batch_size: int = 256
    seed: int = 0
    data_dir: str = "data"
    download: bool = False
    save_adversarials: bool = False

    def __post_init__(self) -> None:
        self.attacks = expand_presets(self.attacks)  # "default", "thorough": their attacks
        gradient_free_points(1, self.masking_spsa_n, name="masking_spsa_n")  # bad values fail before any attack
        if self.cascade is None:
            self.cascade = tuple(self.attacks) == DEFAULT_ATTACKS


def resolve_radii(opts: AuditOptions, spec: DatasetSpec) -> tuple[float, float]:
    """``(eps, pgd step)`` in [0, 1] pixel units: the options', else the dataset's defaults."""
    eps = spec.default_eps / 255 if opts.eps is None else float(opts.eps)
    if not 0.0 < eps <= 1.0:
        raise UsageError(f"eps = {eps:g} is not a radius in (0, 1] ([0, 1] pixel units; 0 attacks nothing)")
    alpha = spec.pgd_alpha / 255 if opts.alpha is None else float(opts.alpha)
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"the PGD step alpha = {alpha:g} must be in [0, 1] ([0, 1] pixel units)")
    return eps, alpha
