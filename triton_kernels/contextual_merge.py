"""Triton contextual merge (docs/ops.md#contextual_merge) in two launches: assignment, then one pass over ``x``.

Per row, with ``R`` the non-kept valid positions, ``n = |R| = length - k`` and ``step = max(1, n // C)``:

* :func:`_assign_kernel` (grid: position tiles x B) classifies every position: kept, target (rank in ``R``
  a multiple of ``step`` below ``C * step``) or member, and sends each member to the target of largest
  cosine similarity (running argmax over target tiles in registers, ``[N, C]`` never reaches HBM; strict
  ``>`` across ascending tiles and the leftmost maximum inside a tile send ties to the lower target). Out:
  ``code[b, p]`` = the member's target slot, or ``C`` for every other position, and ``target_idx``.
  The kept set comes either from ``keep_idx`` (binary searches of the sorted list in global memory) or,
  with ``SELECT`` (the fused ``select_and_merge``), from the scores themselves: every program selects the
  row's top ``k`` in registers (:func:`vtprune.triton_kernels.topk_keep_order.select_row`), so top-k and
  assignment share one launch, and program 0 writes ``keep_idx``.
* :func:`_merge_rows_kernel` reads every row of ``x`` once. Its first programs each own a column tile and
  stream the row's positions: member sums are a one-hot product ``onehot(code)[C, BLOCK_N] @ x[BLOCK_N, D]``
  on the tensor cores (exact 0/1 weights, float32 accumulation in a fixed order: deterministic, no sort, no
  atomics), then ``x[target] + sum / count`` is written. The other programs copy the dominant rows.

Non-finite ``x``: a product ``0 * inf`` would spread an infinite member into every target of its column, so
the one-hot product runs on ``x`` with non-finite entries zeroed, and a second one-hot product of small
integer flags (``+inf`` 1, ``-inf`` 512, NaN 2**18 per entry; 32 rows per step, so the sums decode
exactly) records which targets saw ``+inf``, ``-inf`` or NaN; the mean is then set as float32 summation
would (NaN, or both infinities: NaN; one infinity: that infinity), as the reference's ``scatter_add`` does.

The metric is compared in float32 as the reference does (``F.normalize`` with eps 1e-12, then the dot
product): similarities feed an argmax, and TF32 or bf16 products would flip near-ties.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import vtprune._library  # noqa: F401  (registers torch.ops.vtprune.<op>)
from vtprune.triton_kernels._common import (
    cdiv,
    count_below,
    interpreting,
    mma,
    pow2,
    to_device_i64,
    to_dtype,
    upcast_dot,
)
from vtprune.triton_kernels._routed_ops import call
from vtprune.triton_kernels.topk_keep_order import SINGLE_TILE_MAX, select_row

NORM_EPS = 1e-12  # F.normalize's default
TRITON_3_9 = tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 9)
FLAG_NEG = tl.constexpr(512.0)  # one-hot flag weight of a -inf entry (+inf: 1); > the 32 rows of a step
FLAG_NAN = tl.constexpr(262144.0)  # of a NaN entry


@triton.jit
def _metric_tile(metric_ptr, base, rows, ok, cols, DK, smn):
    """float32 [len(rows), BLOCK_K] slice of the metric rows ``rows``, columns ``cols``."""
    ptrs = metric_ptr + base + rows[:, None] * smn + cols[None, :]
    return tl.load(ptrs, mask=ok[:, None] & (cols[None, :] < DK), other=0.0).to(tl.float32)


@triton.jit
def _row_norms(metric_ptr, base, rows, ok, offs_k, DK, smn, eps, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
               K_TILES: tl.constexpr):
    """max(||metric[row]||_2, eps) for each of ``rows``: F.normalize's denominator, float32 [ROWS]."""
    sq = tl.zeros([ROWS], tl.float32)
    for k0 in tl.static_range(0, K_TILES * BLOCK_K, BLOCK_K):
        mk = _metric_tile(metric_ptr, base, rows, ok, k0 + offs_k, DK, smn)
        sq += tl.sum(mk * mk, axis=1)
    return tl.maximum(tl.sqrt_rn(sq), eps)  # IEEE-rounded, as torch's norm: scaled copies must tie exactly


@triton.jit
def _unit_rows(metric_ptr, base, rows, ok, offs_k, DK, smn, eps):
    """float32 unit vectors of the metric rows ``rows`` (one tile holds the whole row), as F.normalize: the
    norm IEEE-rounded, then a correctly rounded division, so scaled copies give identical vectors."""
    m = _metric_tile(metric_ptr, base, rows, ok, offs_k, DK, smn)
    norm = tl.maximum(tl.sqrt_rn(tl.sum(m * m, axis=1)), eps)
    return tl.div_rn(m, norm[:, None])


@triton.jit
def _first_reaching(seen, want, NB: tl.constexpr, ITERS: tl.constexpr):
    """Per element of ``want``: the first index ``i`` with ``seen[i] >= want`` (``NB`` if none), a binary search
    of the non-decreasing register tensor ``seen [NB]`` through ``tl.gather``; ``ITERS >= log2(NB) + 1``."""
    lo = tl.zeros_like(want)
    hi = tl.zeros_like(want) + NB
    for _ in tl.static_range(ITERS):
        active = lo < hi
        mid = tl.minimum((lo + hi) // 2, NB - 1)
        right = active & (tl.gather(seen, mid, 0) < want)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    return lo


@triton.jit
def _assign_kernel(
    scores_ptr, metric_ptr, keep_ptr, lengths_ptr, code_ptr, target_ptr,
    smb, smn, N, DK, K, C, eps,
    SELECT: tl.constexpr, HAS_LENGTHS: tl.constexpr, KEEP_ITERS: tl.constexpr, NB: tl.constexpr,
    SEARCH_ITERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    C_TILES: tl.constexpr, K_TILES: tl.constexpr,
):
    # grid: (position tiles, B)
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    length = N
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + b).to(tl.int32)
    step = tl.maximum((length - K) // tl.maximum(C, 1), 1)
    keep_row = keep_ptr + b * K
    base = b * smb
    p = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] positions

    if SELECT:  # the row's top K, selected in registers by every program (a [NB] row is a few KB)
        kept_row = select_row(scores_ptr + b * N, length, K, NB)  # int32 [NB], 1 = kept
        offs = tl.arange(0, NB)
        before_row = tl.cumsum(kept_row, 0) - kept_row  # kept positions < p
        if pid == 0:  # keep_idx, ascending: the kept position p goes to slot before_row[p]
            tl.store(keep_row + before_row, offs.to(tl.int64), mask=kept_row != 0)
        seen = tl.cumsum(((offs < length) & (kept_row == 0)).to(tl.int32), 0)  # |R & [0, p]|
        pc = tl.minimum(p, NB - 1)
        kept = tl.gather(kept_row, pc, 0) != 0
        before = tl.gather(before_row, pc, 0)
    else:
        before = count_below(keep_row, K, p, KEEP_ITERS, False)  # kept positions < p
        kept = (before < K) & (tl.load(keep_row + before, mask=before < K, other=-1) == p)
    rank = p - before  # rank inside R when p is not kept
    rest = (p < length) & ~kept
    member = rest & ~((rank % step == 0) & (rank // step < C))

    offs_k = tl.arange(0, BLOCK_K)
    if K_TILES == 1:  # the whole metric row in one tile: load once, unit vectors once
        mu = _unit_rows(metric_ptr, base, p, member, offs_k, DK, smn, eps)
    else:
        norm_m = _row_norms(metric_ptr, base, p, member, offs_k, DK, smn, eps, BLOCK_M, BLOCK_K, K_TILES)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_c = tl.zeros([BLOCK_M], tl.int32)
    for c0 in tl.static_range(0, C_TILES * BLOCK_C, BLOCK_C):  # C_TILES = cdiv(C, BLOCK_C): no loop
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        r = c * step
        if SELECT:
            t = _first_reaching(seen, r + 1, NB, SEARCH_ITERS)  # the r-th position of R
        else:
            t = r + count_below(keep_row, K, r + 1, KEEP_ITERS, True)
        if pid == 0:  # one tile writes the targets (a branch, not `c_ok & (pid == 0)`: Triton >= 3.9 wants int1 masks)
            tl.store(target_ptr + b * C + c, t, mask=c_ok)
        if K_TILES == 1:
            sim = mma(mu, tl.trans(_unit_rows(metric_ptr, base, t, c_ok, offs_k, DK, smn, eps)), True, False)
        else:
            norm_t = _row_norms(metric_ptr, base, t, c_ok, offs_k, DK, smn, eps, BLOCK_C, BLOCK_K, K_TILES)
            sim = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
            for k0 in tl.static_range(0, K_TILES * BLOCK_K, BLOCK_K):
                # unit vectors first, by correctly rounded division as F.normalize: scaled copies tie exactly
                mk = tl.div_rn(_metric_tile(metric_ptr, base, p, member, k0 + offs_k, DK, smn), norm_m[:, None])
                tk = tl.div_rn(_metric_tile(metric_ptr, base, t, c_ok, k0 + offs_k, DK, smn), norm_t[:, None])
                sim += mma(mk, tl.trans(tk), True, False)  # [BLOCK_M, BLOCK_C] cosine similarities
        sim = tl.where(c_ok[None, :], sim, float("-inf"))
        tile_best, tile_arg = tl.max(sim, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_c = tl.where(better, c0 + tile_arg, best_c)
    tl.store(code_ptr + b * N + p, tl.where(member, best_c, C), mask=p < N)


@triton.jit
def _merge_rows_kernel(
    x_ptr, code_ptr, keep_ptr, target_ptr, out_ptr,
    sxb, sxn, sob, son, N, D, K, C, CTX_TILES, COPY_D_TILES,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, COPY_ROWS: tl.constexpr,
    COPY_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, FLAGS_FP32: tl.constexpr,
):
    # grid: (CTX_TILES column tiles of the contextual rows + dominant-row copy tiles, B)
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    x_row = x_ptr + b * sxb
    if pid < CTX_TILES:
        d = pid * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < D
        cidx = tl.arange(0, BLOCK_C)
        acc = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)  # member sums
        counts = tl.zeros([BLOCK_C, 16], tl.float32)  # member counts (every column the same)
        ones = tl.full([BLOCK_N, 16], 1.0, tl.float32)  # made in fp32: Triton 3.6's interpreter has no bf16 constants
        if not UPCAST:
            ones = ones.to(x_ptr.dtype.element_ty)
        for n0 in range(0, N, BLOCK_N):  # the one-hot pass
            pos = n0 + tl.arange(0, BLOCK_N)
            code = tl.load(code_ptr + b * N + pos, mask=pos < N, other=C)
            xm = tl.load(x_row + pos[:, None] * sxn + d[None, :], mask=(code < C)[:, None] & d_ok[None, :],
                         other=0.0)
            if UPCAST:  # the interpreter's bf16 arithmetic is wrong (see _common.upcast_dot); fp32 is exact here
                xm = xm.to(tl.float32)
            hot = (cidx[:, None] == code[None, :]).to(xm.dtype)  # [BLOCK_C, BLOCK_N] one-hot rows of the targets
            acc += mma(hot, xm, IEEE, UPCAST)
            counts += mma(hot, ones, IEEE, UPCAST)
        count = tl.max(counts, axis=1)
        # 0 * inf = NaN: a non-finite member leaves its whole column non-finite. Such column tiles (and
        # finite sums that overflowed) are summed again exactly, with flags for the infinities and NaNs.
        if tl.sum((tl.abs(acc) < float("inf")).to(tl.int32)) < BLOCK_C * BLOCK_D:
            acc = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
            flags = tl.zeros([BLOCK_C, BLOCK_D], tl.int32)  # 1: a +inf member, 2: a -inf member, 4: a NaN member
            for n0 in range(0, N, 32):  # 32 rows per step: registers stay below the one-hot pass's
                pos = n0 + tl.arange(0, 32)
                code = tl.load(code_ptr + b * N + pos, mask=pos < N, other=C)
                xm = tl.load(x_row + pos[:, None] * sxn + d[None, :], mask=(code < C)[:, None] & d_ok[None, :],
                             other=0.0)
                if UPCAST:
                    xm = xm.to(tl.float32)
                hot = cidx[:, None] == code[None, :]
                finite = tl.abs(xm) < float("inf")  # False for +-inf and NaN
                acc += mma(hot.to(xm.dtype), tl.where(finite, xm, 0.0), IEEE, UPCAST)
                bad = tl.where(finite, 0.0, tl.where(xm != xm, FLAG_NAN, tl.where(xm > 0, 1.0, FLAG_NEG)))
                if FLAGS_FP32:  # the interpreter's bf16 products are wrong (see _common.upcast_dot)
                    seen = tl.dot(hot.to(tl.float32), bad, input_precision="ieee")
                else:  # weights 0/1 and powers of two: exact in bf16, sums exact in float32
                    seen = tl.dot(hot.to(tl.bfloat16), bad.to(tl.bfloat16))
                flags |= tl.where(seen >= FLAG_NAN, 4, tl.where(seen >= FLAG_NEG, 2, 0))
                flags |= tl.where((seen < FLAG_NAN) & ((seen.to(tl.int32) % 512) != 0), 1, 0)
            acc = tl.where((flags & 1) != 0, float("inf"), acc)
            acc = tl.where((flags & 2) != 0, float("-inf"), acc)
            acc = tl.where(((flags & 4) != 0) | ((flags & 3) == 3), float("nan"), acc)
        c_ok = cidx < C
        t = tl.load(target_ptr + b * C + cidx, mask=c_ok, other=0)
        both = c_ok[:, None] & d_ok[None, :]
        xt = tl.load(x_row + t[:, None] * sxn + d[None, :], mask=both, other=0.0).to(tl.float32)
        mean = tl.div_rn(acc, tl.zeros_like(acc) + tl.maximum(count, 1.0)[:, None])
        o_ptrs = out_ptr + b * sob + (K + cidx)[:, None] * son + d[None, :]
        tl.store(o_ptrs, to_dtype(xt + mean, out_ptr.dtype.element_ty, UPCAST), mask=both)
    else:  # dominant rows: out[s] = x[keep[s]], COPY_ROWS rows x COPY_D features per program
        q = pid - CTX_TILES
        slots = (q // COPY_D_TILES) * COPY_ROWS + tl.arange(0, COPY_ROWS)
        cols = (q % COPY_D_TILES) * COPY_D + tl.arange(0, COPY_D)
        inside = (slots < K)[:, None] & (cols < D)[None, :]
        src = tl.load(keep_ptr + b * K + slots, mask=slots < K, other=0)
        rows = tl.load(x_row + src[:, None] * sxn + cols[None, :], mask=inside)
        tl.store(out_ptr + b * sob + slots[:, None] * son + cols[None, :], rows, mask=inside)


def assign_config(N: int, B: int, dk: int, C: int, select: bool) -> dict:
    """Position tiles of 16-64 rows, as many as fill the 132 SMs of an H100 at batch B, x 16 targets (C <= 16)
    or 32 x 64 metric columns (float32, unpipelined: larger tiles spill on sm_90), unrolled over the targets and
    metric columns (no loop). A 16-wide target tile at CLIP (C = 6) halves the similarity products and the
    targets' unit vectors: select_and_merge 8.9 -> 8.4 us at batch 8 (sm_90, predicted). With ``SELECT``
    every program holds the whole score row, so fewer programs per row at larger batches (the selection is
    repeated per program): 4 warps where Triton >= 3.9 compiles it without
    spills (fewer instructions per program), else 8 (Triton 3.6 spills the 4096-score row at 4 warps).
    With ``SELECT`` the rows per program are N * B / 132 rounded to the nearest power of two rather than down,
    as the repeated selection outweighs a short tail of programs: 120 programs of 32 positions at
    Qwen2.5-VL batch 1 instead of 240 of 16 (sm_90, predicted 18.8 -> 17.2 us for select_and_merge)."""
    per = max(1, N * B // 132)
    rows = 1 << max(4, min(6, per.bit_length() - 1))
    if select and rows < 64 and 2 * per >= 3 * rows:
        rows *= 2
    block_k = min(64, pow2(dk, 16))
    block_c = min(32, pow2(C, 16))  # 16 targets or fewer (CLIP's 6): half the products of a 32-wide tile
    return dict(BLOCK_M=rows if select else min(rows, 32), BLOCK_C=block_c, BLOCK_K=block_k,
                C_TILES=cdiv(C, block_c),
                K_TILES=cdiv(dk, block_k), num_warps=4 if not select or (rows <= 32 and TRITON_3_9) else 8,
                num_stages=1)


def merge_rows_config(D: int, B: int, dtype: torch.dtype) -> dict:
    """Column tiles of 16-64 features (the narrowest that still gives >= 128 programs at batch B) x 128
    positions per step (32 for float32); dominant rows copied 8 x 1024 per program."""
    block_d = 64
    while block_d > 16 and B * cdiv(D, block_d) < 128:
        block_d //= 2
    # float32 products on the CUDA cores: 128 x 32 steps spill (8 B; 64 x 32 under Triton 3.6), 64 x 16 ones
    # too (24 B; sm_90 compiles)
    rows = 32 if dtype == torch.float32 and block_d >= 32 else 128
    return dict(BLOCK_N=rows, BLOCK_D=block_d, COPY_ROWS=8, COPY_D=min(1024, pow2(D, 16)), num_warps=4)


def merge_launch(x, metric, C, lengths, keep_idx=None, scores=None, k=None):
    """(tokens [B, k + C, D], keep_idx int64 [B, k], target_idx int64 [B, C]) on prepared arguments.

    Either ``keep_idx`` is given (contextual_merge) or it is selected from ``scores [B, N]`` (top ``k``,
    select_and_merge) inside the assignment launch; ``lengths`` is None or an int64 tensor on x's device.
    """
    B, N, D = x.shape
    dk = metric.shape[-1]
    dev = x.device
    select = keep_idx is None
    k = int(k) if select else keep_idx.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    metric = metric if metric.stride(-1) == 1 else metric.contiguous()
    out = torch.empty(B, k + C, D, dtype=x.dtype, device=dev)  # [B, k + C, D], written once
    target_idx = torch.empty(B, C, dtype=torch.int64, device=dev)  # [B, C]
    if select:
        keep = torch.empty(B, k, dtype=torch.int64, device=dev)  # [B, k], written by the assignment launch
        scores = scores.contiguous()
    else:
        keep = keep_idx.to(device=dev, dtype=torch.int64).contiguous()  # [B, k]
    if B == 0:
        return out, keep, target_idx
    code = keep  # unused by the row pass when C == 0
    if C > 0 or select:
        code = torch.empty(B, N, dtype=torch.int32, device=dev)  # [B, N] member -> target slot, else C
        cfg = assign_config(N, B, dk, C, select)
        nb = pow2(N, 16)
        _assign_kernel[(cdiv(N, cfg["BLOCK_M"]), B)](
            scores if select else keep, metric, keep, lengths, code, target_idx,
            metric.stride(0), metric.stride(1), N, dk, k, C, NORM_EPS,
            SELECT=select, HAS_LENGTHS=lengths is not None, KEEP_ITERS=max(1, k.bit_length()),
            NB=nb if select else 16, SEARCH_ITERS=nb.bit_length(), **cfg,
        )
    cfg = merge_rows_config(D, B, x.dtype)
    ctx = cdiv(D, cfg["BLOCK_D"]) if C > 0 else 0
    copy_d = cdiv(D, cfg["COPY_D"])
    grid = (ctx + cdiv(k, cfg["COPY_ROWS"]) * copy_d, B)
    if grid[0] > 0:
        _merge_rows_kernel[grid](
            x, code, keep, target_idx, out,
            x.stride(0), x.stride(1), out.stride(0), out.stride(1), N, D, k, C, ctx, copy_d,
            BLOCK_C=max(16, pow2(C)), IEEE=x.dtype == torch.float32, UPCAST=upcast_dot(x.dtype),
            FLAGS_FP32=interpreting(), **cfg,
        )
    return out, keep, target_idx


def select_fits(N: int) -> bool:
    """Whether the assignment launch can select the top k itself (the row in registers)."""
    return N <= SINGLE_TILE_MAX


def contextual_merge_launch(x, metric, keep_idx, num_contextual, lengths):
    """(tokens [B, k + C, D], target_idx int64 [B, C]) on prepared arguments (custom-op bodies)."""
    lengths = to_device_i64(lengths, x.device)
    out, _, target_idx = merge_launch(x, metric, num_contextual, lengths, keep_idx=keep_idx)
    return out, target_idx


def _contextual_merge_tokens(x, metric, keep_idx, num_contextual, lengths):
    return contextual_merge_launch(x, metric, keep_idx, num_contextual, lengths)[0]


def contextual_merge(x, metric, keep_idx, num_contextual, *, lengths=None):
    """Triton backend of :func:`vtprune.ops.contextual_merge` (arguments checked there).

    Under ``torch.compile`` it runs as the custom op ``torch.ops.vtprune.contextual_merge``; in eager mode it launches
    directly (one dispatch layer).
    """
    return call(torch.ops.vtprune.contextual_merge, _contextual_merge_tokens, x, metric, keep_idx,
                int(num_contextual), lengths)
