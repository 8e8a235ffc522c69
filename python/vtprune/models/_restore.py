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

    def lift(self) -> list:
        """Take the patch's attributes off for a moment (e.g. to copy the unpatched model); returns what
        :meth:`put_back` needs to put the very same objects back. The log is kept."""
        lifted = []
        for obj, name, old in reversed(self._log):
            lifted.append((obj, name, obj.__dict__[name]))
            if old is _MISSING:
                del obj.__dict__[name]
            else:
                obj.__dict__[name] = old
        return lifted

    def put_back(self, lifted: list) -> None:
        for obj, name, value in reversed(lifted):
            obj.__dict__[name] = value

    def restore(self) -> None:
        for obj, name, old in reversed(self._log):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        self._log.clear()
