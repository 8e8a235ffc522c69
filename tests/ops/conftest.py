"""Fixtures of the op tests: ``backend`` (each of :data:`backends.BACKENDS`), its ``device``, and ``poison``."""

from __future__ import annotations

import pytest
import torch
from backends import BACKENDS, device_of, require

from utils import poison_cuda_cache


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    require(request.param)
    return request.param


@pytest.fixture
def device(backend) -> str:
    return device_of(backend)


@pytest.fixture
def poison(backend, monkeypatch):
    """Outputs and workspaces a GPU backend forgets to write come back as garbage, not a lucky zero.

    Triton (and the reference, which runs with it on the CPU): every ``torch.empty`` returns NaN (or -7 for
    integers) while the test runs. CUDA: blocks of torch's caching allocator are filled with 0xFF and freed.
    """
    if backend == "cuda":
        poison_cuda_cache()
        return
    if backend == "reference":
        return
    real_empty = torch.empty

    def empty(*size, **kwargs):
        t = real_empty(*size, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", empty)
