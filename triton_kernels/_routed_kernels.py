"""Row kernels of the routed decoder layer (docs/ops.md#routed_layer): gather/scatter fused into the norms and
residuals.

The layer ``y = x; y[I] = Layer(x[I])`` is split as::

    n1  = RMSNorm1(x[I])                 gather_rmsnorm      (gather fused into the first read)
    a   = self_attn(n1)                  the layer's own module (SDPA / FlashAttention), compact [B, K, D]
    mid = x[I] + a;  n2 = RMSNorm2(mid)  gather_add_rmsnorm  (mid overwrites a in place)
    m   = mlp(n2)                        the layer's own module
    x[I] = mid + m                       add_scatter         (scatter fused into the last write)

so only ``[B, K, D]`` buffers exist and the full ``x`` is read at ``I`` twice and written at ``I`` once.
Each program owns one routed row (``B * K`` programs, one ``D``-wide tile), so no atomics and no ordering
between programs: rows of ``I`` are distinct.

Rounding follows the Hugging Face modules exactly: RMSNorm squares and averages in float32, rounds
``x * rsqrt(var + eps)`` to the input dtype, then multiplies by the weight (rounding once more); the residual
adds round their float32 sum once, as a bf16/fp16 ``+`` does. Only the order of the variance's float32 sum
differs from PyTorch's.

Routed indices are trusted on the device (checking them would synchronise with the host every layer), but
every load and store is masked to ``0 <= t < L`` so a bad index can never touch memory outside ``x``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vtprune.triton_kernels._common import interpreting, pow2


@triton.jit
def _round(v, dtype: tl.constexpr, RNE: tl.constexpr):
    """float32 ``v`` rounded to ``dtype`` to nearest even, as PyTorch and the GPU's conversion do.

    Triton 3.6's interpreter truncates float32 -> bfloat16; with ``RNE`` (interpreter and bf16 only) the
    rounding is done on the bits first, after which the conversion is exact.
    """
    if RNE:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _rmsnorm_store(v, w_ptr, out_ptr, cols, D, eps, RNE: tl.constexpr):
    """Store ``weight * round(v * rsqrt(mean(v^2) + eps))`` (v float32 [BLOCK_D], zero past D)."""
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    var = tl.sum(v * v, axis=0) / D
    xn = _round(v * tl.math.rsqrt(var + eps), dtype, RNE)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0)
    tl.store(out_ptr + cols, _round(w.to(tl.float32) * xn.to(tl.float32), dtype, RNE), mask=cols < D)


@triton.jit
def _routed_row(x_ptr, idx_ptr, row, K, L, D, sxb, sxl, BLOCK_D: tl.constexpr):
    """(address of routed row ``row`` of x, its column count: ``D``, or 0 when its index is out of range,
    column offsets).

    The range test is folded into a column bound so that every mask is one vector comparison: Triton 3.9's
    interpreter turns ``vector_bool & scalar_bool`` into int32, which loads and stores refuse as a mask.
    """
    b = row // K
    t = tl.load(idx_ptr + row)
    cols = tl.arange(0, BLOCK_D)
    return x_ptr + b * sxb + t * sxl, tl.where((t >= 0) & (t < L), D, 0), cols


@triton.jit
def gather_rmsnorm_kernel(x_ptr, idx_ptr, w_ptr, out_ptr, K, L, D, sxb, sxl, eps,
                          BLOCK_D: tl.constexpr, RNE: tl.constexpr):
    # grid: (B * K,); out [B, K, D] contiguous
    row = tl.program_id(0).to(tl.int64)
    src, cols_ok, cols = _routed_row(x_ptr, idx_ptr, row, K, L, D, sxb, sxl, BLOCK_D)
    v = tl.load(src + cols, mask=cols < cols_ok, other=0.0).to(tl.float32)
    _rmsnorm_store(v, w_ptr, out_ptr + row * D, cols, D, eps, RNE)


@triton.jit
def gather_add_rmsnorm_kernel(
    x_ptr, idx_ptr, delta_ptr, w_ptr, out_ptr, K, L, D, sxb, sxl, eps, BLOCK_D: tl.constexpr, RNE: tl.constexpr
):
    # grid: (B * K,); delta [B, K, D] contiguous (the attention output) becomes mid = x[I] + delta in place
    row = tl.program_id(0).to(tl.int64)
    src, cols_ok, cols = _routed_row(x_ptr, idx_ptr, row, K, L, D, sxb, sxl, BLOCK_D)
    x = tl.load(src + cols, mask=cols < cols_ok, other=0.0)
    d = tl.load(delta_ptr + row * D + cols, mask=cols < D, other=0.0)
    mid = _round(x.to(tl.float32) + d.to(tl.float32), x.dtype, RNE)  # one rounding, as `residual + h`
    tl.store(delta_ptr + row * D + cols, mid, mask=cols < D)
    _rmsnorm_store(mid.to(tl.float32), w_ptr, out_ptr + row * D, cols, D, eps, RNE)


@triton.jit
def add_scatter_kernel(x_ptr, idx_ptr, mid_ptr, delta_ptr, K, L, D, sxb, sxl,
                       BLOCK_D: tl.constexpr, RNE: tl.constexpr):
    # grid: (B * K,); x[b, I[b, k]] = mid[b, k] + delta[b, k]
    row = tl.program_id(0).to(tl.int64)
    dst, cols_ok, cols = _routed_row(x_ptr, idx_ptr, row, K, L, D, sxb, sxl, BLOCK_D)
    mid = tl.load(mid_ptr + row * D + cols, mask=cols < D, other=0.0)
    d = tl.load(delta_ptr + row * D + cols, mask=cols < D, other=0.0)
    tl.store(dst + cols, _round(mid.to(tl.float32) + d.to(tl.float32), mid.dtype, RNE), mask=cols < cols_ok)


def _launch_cfg(x: torch.Tensor) -> dict:
    return _row_cfg(x.shape[-1], x.dtype, interpreting())


@functools.lru_cache(maxsize=64)
def _row_cfg(D: int, dtype: torch.dtype, interpret: bool) -> dict:
    """Launch options of the row kernels for width ``D``, cached (host time per launch; read-only dict)."""
    block = pow2(D)
    return dict(BLOCK_D=block, num_warps=max(1, min(16, block // 512)), RNE=interpret and dtype == torch.bfloat16)


def gather_rmsnorm(x, idx, weight, eps: float) -> torch.Tensor:
    """``RMSNorm(x[b, idx[b]])``: x [B, L, D] (unit stride on D), idx int64 [B, K] -> [B, K, D]."""
    B, L, D = x.shape
    K = idx.shape[1]
    out = torch.empty(B, K, D, dtype=x.dtype, device=x.device)
    gather_rmsnorm_kernel[(B * K,)](x, idx, weight, out, K, L, D, x.stride(0), x.stride(1), float(eps),
                                    **_launch_cfg(x))
    return out


def gather_add_rmsnorm(x, idx, delta, weight, eps: float) -> torch.Tensor:
    """``delta <- x[I] + delta`` in place and return ``RMSNorm(delta)`` [B, K, D] (delta contiguous)."""
    B, L, D = x.shape
    K = idx.shape[1]
    out = torch.empty(B, K, D, dtype=x.dtype, device=x.device)
    gather_add_rmsnorm_kernel[(B * K,)](x, idx, delta, weight, out, K, L, D, x.stride(0), x.stride(1),
                                        float(eps), **_launch_cfg(x))
    return out


def add_scatter(x, idx, mid, delta) -> None:
    """``x[b, idx[b]] = mid + delta`` in place (mid, delta [B, K, D] contiguous)."""
    B, L, D = x.shape
    K = idx.shape[1]
    add_scatter_kernel[(B * K,)](x, idx, mid, delta, K, L, D, x.stride(0), x.stride(1), **_launch_cfg(x))
