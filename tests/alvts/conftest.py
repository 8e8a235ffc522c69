"""ALVTS tests: Triton kernels run through the CPU interpreter when no CUDA device is visible.

TRITON_INTERPRET must be set before the kernels are decorated (at import), so it is set here, before any test
module of this folder imports them.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture
def unwritten_is_nan(monkeypatch):
    """``torch.empty`` returns NaN-filled (float) or -7-filled (int) tensors while the test runs, so an output
    element a kernel forgets to write shows up instead of passing as a lucky zero."""
    real = torch.empty

    def empty(*size, **kwargs):
        out = real(*size, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(-7)

    monkeypatch.setattr(torch, "empty", empty)
