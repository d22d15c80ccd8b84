"""The shared core every layer stands on: model modes (:mod:`~cure_eval.core.modes`), devices and
seeded RNGs (:mod:`~cure_eval.core.device`), atomic files and figures (:mod:`~cure_eval.core.io`),
the entry-point registry (:mod:`~cure_eval.core.registry`), the process group
(:mod:`~cure_eval.core.distributed`) and passive OpenMP for the CLIs (``_openmp``).

This ``__init__`` imports nothing: ``cure_eval/__init__.py`` runs ``core._openmp`` before torch loads.
"""
