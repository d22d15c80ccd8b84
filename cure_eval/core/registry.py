"""One plugin registry, shared by the training methods and the attacks (timm-style: small, typed).

A :class:`PluginRegistry` holds classes deriving from one base class, keyed by their ``name``:
those installed under an entry-point group (scanned on every call, so newly installed plugins
appear; loaded classes are cached; a plugin that fails to load is logged and skipped) overridden
by explicit :meth:`PluginRegistry.register` calls. This module imports nothing from the package.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

P = TypeVar("P", bound=type)


class PluginRegistry(Generic[P]):
    """Classes deriving from ``base``, from the entry-point group ``group`` and from
    :meth:`register`. ``kind`` names them in messages (``"method"``, ``"attack"``)."""

    def __init__(self, *, group: str, base: type, kind: str) -> None:
        self.group = group
        self.base = base
        self.kind = kind
        self._explicit: dict[str, P] = {}
        self._loaded: dict[str, P] = {}

    def _check(self, cls: Any) -> bool:
        return isinstance(cls, type) and issubclass(cls, self.base)

    def register(self, cls: P) -> P:
        """Register ``cls`` under ``cls.name`` (re-registering a name replaces it)."""
        if not self._check(cls):
            raise TypeError(f"{cls!r} is not a subclass of {self.base.__module__}.{self.base.__name__}")
        self._explicit[getattr(cls, "name")] = cls  # noqa: B009  (P is any class with a name)
        return cls

    def unregister(self, name: str) -> None:
        """Remove a class added with :meth:`register` (entry points are unaffected)."""
        self._explicit.pop(name, None)

    def available(self) -> dict[str, P]:
        """Every installed class by name: entry points, overridden by explicit registrations."""
        found: dict[str, P] = {}
        for ep in entry_points(group=self.group):
            key = f"{ep.name}={ep.value}"
            if key not in self._loaded:
                try:
                    cls = ep.load()
                except Exception as exc:  # a broken third-party plugin must not hide the others
                    log.warning("%s plugin %s (%s) failed to load: %s", self.kind, ep.name, ep.value, exc)
                    continue
                if not self._check(cls):
                    log.warning("%s plugin %s (%s) is not a %s.%s", self.kind, ep.name, ep.value,
                                self.base.__module__, self.base.__name__)
                    continue
                self._loaded[key] = cls
            found[ep.name] = self._loaded[key]
        return {**found, **self._explicit}
