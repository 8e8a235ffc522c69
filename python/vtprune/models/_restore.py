"""Undo log for per-instance patches: every attribute vtprune sets on a module is recorded and restored."""

from __future__ import annotations

_MISSING = object()


class Restorer:
    def __init__(self):
        self._log = []

    def set_attr(self, obj, name: str, value) -> None:
        """Set ``obj.name`` on the instance, remembering whether the instance had its own attribute."""
        self._log.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, value)

    def restore(self) -> None:
        for obj, name, old in reversed(self._log):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        self._log.clear()
