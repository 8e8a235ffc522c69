"""Backport of triton-lang/triton#9172 for Triton's CPU interpreter under NumPy >= 2.4.

In the interpreter every scalar (kernel int arguments, ``tl.program_id``, loaded scalars) is a 1-element
NumPy array, and ``range(lo, hi)`` with such bounds calls ``int(array)``, which NumPy 2.4 made a TypeError
(an expired 1.25 deprecation). Triton 3.6 still has the old conversion, so every loop with runtime bounds
fails under ``TRITON_INTERPRET=1``. The fix (merged upstream after 3.6) converts through ``squeeze()``; this
module applies exactly that to the interpreter's tensor patching, and only when the interpreter is in use.
Compiled kernels are untouched.
"""

from __future__ import annotations

import numpy as np


def _broken() -> bool:
    try:
        int(np.zeros(1, dtype=np.int32))
    except TypeError:
        return True
    return False


def apply() -> None:
    """Make the interpreter's ``tensor.__index__`` NumPy-2.4 safe (idempotent; a no-op where not needed)."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "vtprune_index_fix", False) or not _broken():
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.vtprune_index_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor
