"""Shared test helpers: tolerances, relative errors and random spans/masks."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Absolute tolerance on float32 attention-score entries (each in [0, 1]) by input dtype: the inputs are
# rounded to the dtype before the float64 ground truth is computed, so only accumulation order differs.
SCORE_ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}


def in_ci() -> bool:
    """The environment variable ``CI`` is set (CI installs every test dependency, Triton included)."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def triton_installed() -> bool:
    """Whether the ``triton`` package imports. Without it the Triton tests skip, except under ``CI``, which installs
    it: there a missing Triton is an error, so those tests cannot pass by skipping."""
    try:
        import triton.language  # noqa: F401  (not just "triton": tests/triton could pass for a namespace package)
    except ImportError as e:
        if in_ci():
            raise RuntimeError(f"CI is set but Triton does not import ({e}); CI must run the Triton tests") from e
        return False
    return True


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere gives inf)."""
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def random_spans(batch: int, length: int, gen: torch.Generator, min_count: int = 1) -> torch.Tensor:
    """int64 [B, 2] random (start, count) spans inside [0, length) with count >= min_count."""
    rows = []
    for _ in range(batch):
        count = int(torch.randint(min_count, length + 1, (1,), generator=gen))
        start = int(torch.randint(0, length - count + 1, (1,), generator=gen))
        rows.append([start, count])
    return torch.tensor(rows, dtype=torch.int64)


def left_padding_mask(batch: int, length: int, pads: list[int]) -> torch.Tensor:
    """bool [B, L], False on the first pads[b] positions (left padding)."""
    pos = torch.arange(length)
    return pos[None, :] >= torch.tensor(pads)[:, None]


def poison_cuda_cache() -> None:
    """Fill blocks of torch's caching allocator (small and large pools) with 0xFF bytes (NaN as floats, -1 as
    integers) and free them, so outputs the kernels forget to write come back poisoned, not zero."""
    blocks = [torch.empty(1 << 19, dtype=torch.uint8, device="cuda") for _ in range(64)]
    blocks += [torch.empty(1 << 25, dtype=torch.uint8, device="cuda") for _ in range(8)]
    for block in blocks:
        block.fill_(0xFF)
    del blocks


def require_extension():
    """Import vtprune._C, skipping (or failing, when VTPRUNE_BUILD_CUDA=1 says it was built) without it."""
    try:
        return importlib.import_module("vtprune._C")
    except ImportError as e:
        if os.environ.get("VTPRUNE_BUILD_CUDA") == "1":
            pytest.fail(f"VTPRUNE_BUILD_CUDA=1 but vtprune._C does not import ({e})")
        pytest.skip(f"vtprune._C is not built ({e}); build it with VTPRUNE_BUILD_CUDA=1 pip install -e .")
