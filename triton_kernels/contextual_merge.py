"""Triton contextual merge (docs/ops.md#contextual_merge): assignment kernel, a [B, N] integer sort, one packing kernel.

Per row, with ``R`` the non-kept valid positions, ``n = |R| = length - k`` and ``step = max(1, n // C)``:

* :func:`_assign_kernel` (grid: position tiles x B) finds for every position its rank in ``R`` by a
  binary search of ``keep_idx`` (``#kept < p``), hence whether it is a target (rank a multiple of ``step``
  below ``C * step``) or a member; the ``c``-th target is the ``(c * step)``-th element of ``R``, found by a
  binary search of ``keep[j] - j``. Each member's cosine similarity to all ``C`` targets is computed tile by
  tile in registers (``[N, C]`` never reaches HBM) with a running argmax; strict ``>`` across ascending
  target tiles and the leftmost maximum inside a tile send ties to the lower target. Out: the member's
  target slot, or ``C`` for kept, target and padding positions ([B, N] int32).
* a stable ``torch.sort`` of those slots lists each target's members in position order, and
  ``searchsorted`` gives each target's segment (CSR); both stay on the device, no host sync.
* :func:`_pack_kernel` (grid: output slots x D tiles x B) writes each packed output row exactly once:
  a dominant slot copies ``x[keep[s]]``, a contextual slot adds ``x[target]`` and the float32 mean of its
  members. Each member row is read once and in a fixed order, so the result is deterministic.

The metric is compared in float32 as the reference does (``F.normalize`` with eps 1e-12, then the dot
product): similarities feed an argmax, and TF32 or bf16 products would flip near-ties.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtprune.triton_kernels._common import cdiv, count_below, mma, pow2, to_device_i64, to_dtype, upcast_dot
from vtprune.triton_kernels._routed_ops import call

NORM_EPS = 1e-12  # F.normalize's default


@triton.jit
def _metric_tile(metric_ptr, base, rows, ok, cols, DK, smn):
    """float32 [len(rows), BLOCK_K] slice of the metric rows ``rows``, columns ``cols``."""
    ptrs = metric_ptr + base + rows[:, None] * smn + cols[None, :]
    return tl.load(ptrs, mask=ok[:, None] & (cols[None, :] < DK), other=0.0).to(tl.float32)


@triton.jit
def _row_norms(metric_ptr, base, rows, ok, offs_k, DK, smn, eps, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """max(||metric[row]||_2, eps) for each of ``rows``: F.normalize's denominator, float32 [ROWS]."""
    sq = tl.zeros([ROWS], tl.float32)
    for k0 in range(0, DK, BLOCK_K):
        mk = _metric_tile(metric_ptr, base, rows, ok, k0 + offs_k, DK, smn)
        sq += tl.sum(mk * mk, axis=1)
    return tl.maximum(tl.sqrt_rn(sq), eps)  # IEEE-rounded, as torch's norm: scaled copies must tie exactly


@triton.jit
def _assign_kernel(
    metric_ptr, keep_ptr, lengths_ptr, assign_ptr, target_ptr,
    smb, smn, N, DK, K, C, eps,
    HAS_LENGTHS: tl.constexpr, KEEP_ITERS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid: (position tiles, B)
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    length = N
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + b)
    step = tl.maximum((length - K) // C, 1)
    keep_row = keep_ptr + b * K
    base = b * smb

    p = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] positions
    before = count_below(keep_row, K, p, KEEP_ITERS, False)  # kept positions < p
    kept = (before < K) & (tl.load(keep_row + before, mask=before < K, other=-1) == p)
    rank = p - before  # rank inside R when p is not kept
    rest = (p < length) & ~kept
    member = rest & ~((rank % step == 0) & (rank // step < C))

    offs_k = tl.arange(0, BLOCK_K)
    norm_m = _row_norms(metric_ptr, base, p, member, offs_k, DK, smn, eps, BLOCK_M, BLOCK_K)

    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_c = tl.zeros([BLOCK_M], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        r = c * step
        t = r + count_below(keep_row, K, r + 1, KEEP_ITERS, True)  # the r-th position of R
        if pid == 0:  # one tile writes the targets (a branch, not `c_ok & (pid == 0)`: Triton >= 3.9 wants int1 masks)
            tl.store(target_ptr + b * C + c, t, mask=c_ok)
        norm_t = _row_norms(metric_ptr, base, t, c_ok, offs_k, DK, smn, eps, BLOCK_C, BLOCK_K)
        sim = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        for k0 in range(0, DK, BLOCK_K):
            # unit vectors first, by correctly rounded division as F.normalize: scaled copies tie exactly
            mk = tl.div_rn(_metric_tile(metric_ptr, base, p, member, k0 + offs_k, DK, smn), norm_m[:, None])
            tk = tl.div_rn(_metric_tile(metric_ptr, base, t, c_ok, k0 + offs_k, DK, smn), norm_t[:, None])
            sim += mma(mk, tl.trans(tk), True, False)  # [BLOCK_M, BLOCK_C] cosine similarities
        sim = tl.where(c_ok[None, :], sim, float("-inf"))
        tile_best, tile_arg = tl.max(sim, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_c = tl.where(better, c0 + tile_arg, best_c)
    tl.store(assign_ptr + b * N + p, tl.where(member, best_c, C), mask=p < N)


@triton.jit
def _pack_kernel(
    x_ptr, keep_ptr, target_ptr, order_ptr, offsets_ptr, out_ptr,
    sxb, sxn, sob, son, N, D, K, C,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, ROUND_BY_HAND: tl.constexpr,
):
    # grid: (k + C output slots, D tiles, B)
    s = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    x_row = x_ptr + b * sxb
    o_ptrs = out_ptr + b * sob + s * son + d
    if s < K:  # dominant token: a copy
        pos = tl.load(keep_ptr + b * K + s)
        tl.store(o_ptrs, tl.load(x_row + pos * sxn + d, mask=d_ok), mask=d_ok)
    else:  # contextual token: target + mean(members)
        c = s - K
        lo = tl.load(offsets_ptr + b * (C + 1) + c)
        hi = tl.load(offsets_ptr + b * (C + 1) + c + 1)
        acc = tl.zeros([BLOCK_J, BLOCK_D], tl.float32)
        for j0 in range(lo, hi, BLOCK_J):
            jj = j0 + tl.arange(0, BLOCK_J)
            ok = jj < hi
            pos = tl.load(order_ptr + b * N + jj, mask=ok, other=0)  # [BLOCK_J] member positions
            acc += tl.load(x_row + pos[:, None] * sxn + d[None, :], mask=ok[:, None] & d_ok[None, :],
                           other=0.0).to(tl.float32)
        t = tl.load(target_ptr + b * C + c)
        mean = tl.div_rn(tl.sum(acc, axis=0), tl.maximum(hi - lo, 1).to(tl.float32))
        res = tl.load(x_row + t * sxn + d, mask=d_ok).to(tl.float32) + mean
        tl.store(o_ptrs, to_dtype(res, out_ptr.dtype.element_ty, ROUND_BY_HAND), mask=d_ok)


def assign_config(dk: int) -> dict:
    """32 x 32 x 64 float32 tiles, unpipelined: the largest that compile without spills on sm_90."""
    return dict(BLOCK_M=32, BLOCK_C=32, BLOCK_K=min(64, pow2(dk, 16)), num_warps=4, num_stages=1)


def pack_config(D: int) -> dict:
    """8 member rows x 512 features per step (16 KiB of float32 partial sums in registers)."""
    return dict(BLOCK_J=8, BLOCK_D=min(512, pow2(D, 16)), num_warps=4)


def contextual_merge_launch(x, metric, keep_idx, num_contextual, lengths):
    """(tokens [B, k + C, D], target_idx int64 [B, C]) on prepared arguments (custom-op bodies)."""
    B, N, D = x.shape
    dk = metric.shape[-1]
    k, C = keep_idx.shape[1], num_contextual
    dev = x.device
    x = x if x.stride(-1) == 1 else x.contiguous()
    metric = metric if metric.stride(-1) == 1 else metric.contiguous()
    keep = keep_idx.to(device=dev, dtype=torch.int64).contiguous()  # [B, k]
    lengths = to_device_i64(lengths, dev)
    out = torch.empty(B, k + C, D, dtype=x.dtype, device=dev)  # [B, k + C, D], written once
    target_idx = torch.empty(B, C, dtype=torch.int64, device=dev)  # [B, C]
    offsets = order = keep  # unused by the pack kernel when C == 0
    if C > 0:
        assign = torch.empty(B, N, dtype=torch.int32, device=dev)  # [B, N] target slot, C = none
        cfg = assign_config(dk)
        _assign_kernel[(cdiv(N, cfg["BLOCK_M"]), B)](
            metric, keep, lengths, assign, target_idx,
            metric.stride(0), metric.stride(1), N, dk, k, C, NORM_EPS,
            HAS_LENGTHS=lengths is not None, KEEP_ITERS=max(1, k.bit_length()), **cfg,
        )
        slots, order = torch.sort(assign, dim=1, stable=True)  # members grouped by target, positions ascending
        bounds = torch.arange(C + 1, dtype=torch.int32, device=dev).expand(B, C + 1).contiguous()
        offsets = torch.searchsorted(slots, bounds)  # [B, C + 1] each target's segment of `order`
    if k + C > 0 and B > 0:
        cfg = pack_config(D)
        _pack_kernel[(k + C, cdiv(D, cfg["BLOCK_D"]), B)](
            x, keep, target_idx, order, offsets, out,
            x.stride(0), x.stride(1), out.stride(0), out.stride(1), N, D, k, C,
            ROUND_BY_HAND=upcast_dot(x.dtype), **cfg,
        )
    return out, target_idx


def _contextual_merge_tokens(x, metric, keep_idx, num_contextual, lengths):
    return contextual_merge_launch(x, metric, keep_idx, num_contextual, lengths)[0]


def contextual_merge(x, metric, keep_idx, num_contextual, *, lengths=None):
    """Triton backend of :func:`vtprune.ops.contextual_merge` (arguments checked there).

    Under ``torch.compile`` it runs as the custom op ``torch.ops.vtprune.contextual_merge``; in eager mode it launches
    directly (one dispatch layer).
    """
    import vtprune.ops._library  # noqa: F401  (registers the custom ops)

    return call(torch.ops.vtprune.contextual_merge, _contextual_merge_tokens, x, metric, keep_idx,
                int(num_contextual), lengths)
