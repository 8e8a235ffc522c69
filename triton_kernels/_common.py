"""Pieces shared by the VisionDrop Triton kernels: launch helpers and small ``@triton.jit`` building blocks."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtprune import _host

_INTERPRETING = _host.triton_interpret()


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``).

    Read once, at import: Triton decides it when the kernels are decorated, and launchers ask per call.
    """
    return _INTERPRETING


if interpreting():
    from vtprune.triton_kernels import _interpreter_compat

    _interpreter_compat.apply()


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether kernels on ``dtype`` data must work around the interpreter's bfloat16 arithmetic.

    Triton 3.6's interpreter multiplies bfloat16 tiles as raw 16-bit integers (garbage) and rounds float32 to
    bfloat16 toward zero. A GPU's bf16 MMA computes exact products with float32 accumulation, and its
    conversion rounds to nearest even; float32 copies and rounding by hand give the same numbers, so tests under
    the interpreter measure the GPU's accuracy. Compiled kernels never take these paths (the flag is False).
    """
    return interpreting() and dtype == torch.bfloat16


def pow2(n: int, lo: int = 1) -> int:
    """Smallest power of two >= max(n, lo). Plain Python: ``triton.next_power_of_2`` is a constexpr function
    whose host call costs ~1-2 us, several times per launch."""
    return max(lo, 1 << (max(1, n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for grid sizes (plain Python, see :func:`pow2`)."""
    return -(-a // b)


# int64 contiguous copy on ``device`` (spans and lengths may be passed on the CPU), staged through pinned memory
# and queued without a sync; re-exported for the kernels' launchers
to_device_i64 = _host.to_device_i64


@triton.jit
def mma(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in float32.

    float32 operands use exact IEEE products (TF32 would cost ~1e-3 relative on the logits, far above the
    float32 score tolerance); fp16/bf16 operands use the tensor cores' native path.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def to_dtype(x, DTYPE: tl.constexpr, ROUND_BY_HAND: tl.constexpr):
    """float32 -> ``DTYPE`` rounding to nearest even (by hand on the interpreter, see :func:`upcast_dot`)."""
    if ROUND_BY_HAND:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # RTNE to the top 16 bits
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def rows_dot_cols(a, bt, SMALL_M: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``a [M, K] @ bt [N, K]^T -> [M, N]`` in float32.

    ``tl.dot`` needs M >= 16; for 1-4 rows (CLIP's single [CLS] query) a broadcast multiply-reduce on the CUDA
    cores costs no more than the K tile's load, instead of padding the rows to a 16-row MMA.
    """
    if SMALL_M:
        return tl.sum(a[:, None, :].to(tl.float32) * bt[None, :, :].to(tl.float32), axis=2)
    else:
        return mma(a, tl.trans(bt), IEEE, UPCAST)


@triton.jit
def count_below(sorted_ptr, n, value, ITERS: tl.constexpr, SUBTRACT_INDEX: tl.constexpr):
    """Per element of ``value``: how many ``sorted_ptr[j] (- j if SUBTRACT_INDEX)`` for ``j < n`` are < it.

    A vectorised binary search over a non-decreasing int64 sequence of ``n`` entries; ``ITERS`` must be at
    least ``ceil(log2(n + 1))``. ``SUBTRACT_INDEX`` searches ``keep[j] - j`` (non-decreasing when ``keep`` is
    strictly ascending) without materialising it.
    """
    lo = tl.zeros_like(value)
    hi = tl.zeros_like(value) + n
    for _ in tl.static_range(ITERS):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(sorted_ptr + mid, mask=active, other=0)
        if SUBTRACT_INDEX:
            v = v - mid
        right = active & (v < value)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    return lo


@triton.jit
def combined_lse(m_ptr, l_ptr, row0, stride, i, i_ok, SPLIT: tl.constexpr):
    """Base-2 log-sum-exp of rows ``i`` from ``SPLIT`` partial (max, sum) pairs at ``row0 + s * stride + i``.

    The splits are combined in a fixed order (deterministic); +inf for a row whose splits saw no valid key,
    so that ``exp2(s - lse)`` is 0 there; NaN when a split's sum is NaN.
    """
    mx = tl.full(i.shape, float("-inf"), tl.float32)
    for s in tl.static_range(SPLIT):
        mx = tl.maximum(mx, tl.load(m_ptr + row0 + s * stride + i, mask=i_ok, other=float("-inf")))
    m_sub = tl.where(mx == float("-inf"), 0.0, mx)
    total = tl.zeros(i.shape, tl.float32)
    for s in tl.static_range(SPLIT):
        ms = tl.load(m_ptr + row0 + s * stride + i, mask=i_ok, other=float("-inf"))
        total += tl.load(l_ptr + row0 + s * stride + i, mask=i_ok, other=0.0) * tl.exp2(ms - m_sub)
    return finish_lse(mx, total)


@triton.jit
def finish_lse(m, total):
    """``m + log2(total)`` (base 2); +inf for a row without a valid key (total 0), NaN stays NaN (a NaN or
    +inf logit among the row's keys: the reference's softmax semantics)."""
    return tl.where(total == 0, float("inf"), m + tl.log2(tl.where(total == 0, 1.0, total)))


@triton.jit
def data_logits(s):
    """A -inf logit computed from the data becomes NaN (masking with -inf comes after): the reference's rule
    that non-finite inputs make their rows NaN (vtprune.reference._common.masked_softmax)."""
    return tl.where(s == float("-inf"), float("nan"), s)


def split_for(tiles: int, B: int, most: int = 8) -> int:
    """Splits of a long loop so that ``tiles * B * split`` CTAs cover the 132 SMs of an H100 (at most
    ``most``); a function of the shape only, so the reduction order, and the result, never vary between runs."""
    return min(most, pow2(cdiv(132, max(1, tiles * B))))
