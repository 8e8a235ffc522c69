"""Triton attention output plus column scores (docs/ops.md#attention_scores, second form).

A flash-attention forward (online softmax, never ``L x L``) writes the layer's output for every row and the
base-2 log-sum-exp of every row; the column scores then reuse that LSE in the second pass of
:mod:`attention_scores` (only the query span's rows are re-read, each K tile once per KV group). Up to 4
packed query rows (CLIP's [CLS] row) take attention_scores' one-launch path instead (it recomputes the few
rows' LSE inside its split, cheaper than a second pass over 16 heads plus their sum). The forward
runs one query head per program: packing a GQA group's heads into the rows, as the score passes do, makes
every Q/O address a gather, and the 128 x 128 accumulator then spills (sm_90 compile, G = 7). A row with no
valid key outputs zeros (its running sum stays 0), not NaN; a row
with a NaN or +-inf logit among its keys outputs NaN, as the reference does.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

import vtprune._library  # noqa: F401  (registers torch.ops.vtprune.<op>)
from vtprune._host import host_max
from vtprune.triton_kernels._common import (
    cdiv,
    data_logits,
    finish_lse,
    mma,
    pow2,
    rows_dot_cols,
    to_device_i64,
    to_dtype,
)
from vtprune.triton_kernels._routed_ops import call
from vtprune.triton_kernels.attention_scores import (
    LOG2E,
    allowed_mask,
    check_head_dim,
    check_max_counts,
    column_scores,
    few_rows_scores,
    kernel_flags,
    key_ok,
    kpm_bytes,
    last_dim_contiguous,
    load_k_tile,
    load_q_rows,
    online_softmax_step,
    takes_few_rows,
    tile_config,
)


@triton.jit
def _fwd_tile(q, k_ptr, v_ptr, kpm_ptr, b, kvh, n0, pos, row_ok, m, l, acc, skb, skh, skl, svb, svh, svl, offs_d,
              offs_dv, L, D, DV, qk_scale, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, MASKED: tl.constexpr,
              BLOCK_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile of the flash forward: (max, sum, accumulator). Interior tiles (``MASKED`` False) are below
    the causal diagonal and inside [0, L): only padding (``HAS_KPM``) is masked there."""
    j = n0 + tl.arange(0, BLOCK_N)
    kok = key_ok(kpm_ptr, b, j, L, HAS_KPM)
    k = load_k_tile(k_ptr, b, kvh, j, j < L, skb, skh, skl, offs_d, D)  # [BLOCK_N, BLOCK_D]
    v = load_k_tile(v_ptr, b, kvh, j, j < L, svb, svh, svl, offs_dv, DV)  # [BLOCK_N, BLOCK_DV]
    s = data_logits(rows_dot_cols(q, k, False, IEEE, UPCAST) * qk_scale)  # [BLOCK_M, BLOCK_N], log2 units
    if MASKED:
        s = tl.where(allowed_mask(pos, row_ok, j, kok, CAUSAL), s, float("-inf"))
    elif HAS_KPM:
        s = tl.where(kok[None, :], s, float("-inf"))
    m, l, alpha, p = online_softmax_step(s, m, l)
    # P is rounded to V's dtype for the MMA, as flash attention does (error within the 2x rule)
    acc = acc * alpha[:, None] + mma(to_dtype(p, v.dtype, UPCAST), v, IEEE, UPCAST)
    return m, l, acc


@triton.jit
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, kpm_ptr, out_ptr, lse_ptr,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
    L, D, DV, HKV, qk_scale,
    G: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    # grid: (row tiles over all L positions, B * H)
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // (HKV * G), bh % (HKV * G)
    kvh = h // G
    pos = m0 + tl.arange(0, BLOCK_M)  # [BLOCK_M] query positions
    row_ok = pos < L
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q = load_q_rows(q_ptr, b, h, pos, pos, row_ok, sqb, sqh, sql, offs_d, D, 1)  # [BLOCK_M, BLOCK_D]

    hi = L
    interior = L // BLOCK_N * BLOCK_N  # key tiles inside [0, L): no bounds mask
    if CAUSAL:
        hi = tl.minimum(L, m0 + BLOCK_M)
        interior = tl.minimum(m0 + 1, L) // BLOCK_N * BLOCK_N  # keys <= the tile's first query: no causal mask
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(0, interior, BLOCK_N):  # rows past L compute garbage here, never stored
        m, l, acc = _fwd_tile(q, k_ptr, v_ptr, kpm_ptr, b, kvh, n0, pos, row_ok, m, l, acc, skb, skh, skl, svb, svh,
                              svl, offs_d, offs_dv, L, D, DV, qk_scale, CAUSAL, HAS_KPM, False, BLOCK_N, IEEE, UPCAST)
    for n0 in range(interior, hi, BLOCK_N):  # the diagonal tiles and the last partial one: masked
        m, l, acc = _fwd_tile(q, k_ptr, v_ptr, kpm_ptr, b, kvh, n0, pos, row_ok, m, l, acc, skb, skh, skl, svb, svh,
                              svl, offs_d, offs_dv, L, D, DV, qk_scale, CAUSAL, HAS_KPM, True, BLOCK_N, IEEE, UPCAST)
    out = tl.where(l[:, None] == 0, 0.0, acc / tl.where(l == 0, 1.0, l)[:, None])  # a NaN row stays NaN
    o_ptrs = out_ptr + b * sob + h * soh + pos[:, None] * sol + offs_dv[None, :]
    tl.store(o_ptrs, to_dtype(out, out_ptr.dtype.element_ty, UPCAST), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    # LSE in the packed layout of the score passes: [B, Hkv, L * G], row pos * G + h % G
    lse = finish_lse(m, l)
    tl.store(lse_ptr + (b * HKV + kvh) * (L * G) + pos * G + h % G, lse, mask=row_ok)


@triton.jit
def few_rows_lse_scores_kernel(
    q_ptr, k_ptr, kpm_ptr, qspan_ptr, kspan_ptr, lse_ptr, out_ptr,
    sqb, sqh, sql, skb, skh, skl,
    L, D, HKV, KM, qk_scale, inv_heads,
    G: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr, ROWS_P: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Scores of a few packed query rows (CLIP's [CLS]) from the forward's LSE: no split softmax to combine.

    Each program owns ``BLOCK_N`` keys of the key span for **every** head: the head-rows ``hr = kvh * BLOCK_M
    + r`` (packed row ``r`` of KV head ``kvh``) times the keys give ``[ROWS_P, BLOCK_N]`` logits on the CUDA
    cores, ``exp2(s - lse)`` with the forward's base-2 LSE, and the sum over head-rows is the output. Nothing
    crosses programs: one launch, no counter, no partials, a fixed reduction order.
    """
    # grid: (key tiles of the key span, B)
    n0 = tl.program_id(0) * BLOCK_N
    b = tl.program_id(1).to(tl.int64)
    qstart, qcount = tl.load(qspan_ptr + 2 * b), tl.load(qspan_ptr + 2 * b + 1)
    kstart, kcount = tl.load(kspan_ptr + 2 * b), tl.load(kspan_ptr + 2 * b + 1)
    hr = tl.arange(0, ROWS_P)
    kvh, r = hr // BLOCK_M, hr % BLOCK_M
    row_ok = (kvh < HKV) & (r < qcount * G)
    pos = qstart + r // G  # [ROWS_P] query positions
    offs_d = tl.arange(0, BLOCK_D)
    q = load_q_rows(q_ptr, b, kvh, r, pos, row_ok, sqb, sqh, sql, offs_d, D, G)  # [ROWS_P, BLOCK_D]
    col = n0 + tl.arange(0, BLOCK_N)
    col_ok = col < kcount
    j = kstart + col  # [BLOCK_N] key positions
    kok = col_ok & key_ok(kpm_ptr, b, j, L, HAS_KPM)
    k_ptrs = (k_ptr + b * skb + kvh[:, None, None] * skh + j[None, :, None] * skl + offs_d[None, None, :])
    k = tl.load(k_ptrs, mask=row_ok[:, None, None] & col_ok[None, :, None] & (offs_d < D)[None, None, :],
                other=0.0)  # [ROWS_P, BLOCK_N, BLOCK_D]: each head-row's own keys
    s = data_logits(tl.sum(q[:, None, :].to(tl.float32) * k.to(tl.float32), axis=2) * qk_scale)
    # the forward's LSE, packed [B, Hkv, L * G] at row pos * G + head % G (head % G == r % G)
    lse = tl.load(lse_ptr + (b * HKV + kvh) * (L * G) + pos * G + r % G, mask=row_ok, other=float("inf"))
    p = tl.where(allowed_mask(pos, row_ok, j, kok, CAUSAL), tl.exp2(s - lse[:, None]), 0.0)
    out = tl.where(col_ok, tl.sum(p, axis=0) * (inv_heads / qcount.to(tl.float32)), 0.0)
    tl.store(out_ptr + b * KM + col, out, mask=col < KM)


FEW_ROWS_LSE_TILE = 4096  # head-rows x keys x head dims of one program's product (32 fp32 values a thread)


@functools.lru_cache(maxsize=256)
def few_rows_lse_geometry(B: int, hkv: int, bm: int, block_d: int, max_key: int) -> tuple[int, int] | None:
    """(padded head-rows, keys per program) of :func:`few_rows_lse_scores`, or None where every head-row
    with 2 keys already exceeds the tile (many KV heads at a large head dim: the split launch then)."""
    rows_p = pow2(hkv * bm)
    bn = FEW_ROWS_LSE_TILE // (rows_p * block_d)
    if bn < 2:
        return None
    bn = pow2(bn + 1) // 2  # a power of two, at most the tile
    while bn > 2 and cdiv(max_key, bn) * B < 132:  # >= 132 programs when the keys allow it
        bn //= 2
    return rows_p, bn


def few_rows_lse_scores(q, k, kpm, qspans, kspans, lse, causal, qk_scale, max_key, cfg, geometry):
    """:func:`few_rows_lse_scores_kernel` on the forward's packed LSE: float32 [B, max_key]."""
    B, H, L, d = q.shape
    hkv = k.shape[1]
    rows_p, bn = geometry
    out = torch.empty(B, max_key, dtype=torch.float32, device=q.device)  # [B, max_key]
    flags = kernel_flags(q, causal, kpm)
    few_rows_lse_scores_kernel[(cdiv(max_key, bn), B)](
        q, k, kpm, qspans, kspans, lse, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        L, d, hkv, max_key, qk_scale, 1.0 / H,
        G=H // hkv, CAUSAL=flags["CAUSAL"], HAS_KPM=flags["HAS_KPM"], BLOCK_M=cfg["BLOCK_M"], ROWS_P=rows_p,
        BLOCK_N=bn, BLOCK_D=cfg["BLOCK_D"], num_warps=4,
    )
    return out


@functools.lru_cache(maxsize=256)
def forward_config(rows: int, d: int, dv: int, dtype: torch.dtype, heads: int = 132) -> dict:
    """Tiles of the forward for ``rows`` query rows and ``heads = B * H`` programs per row tile: the largest
    without spills on sm_90 (see tile_config), halved to 64 rows where 128-row tiles leave SMs of an H100 idle
    (CLIP-L/336 at batch 1: 5 x 16 = 80 CTAs -> 160)."""
    block_d, block_dv = pow2(d, 16), pow2(dv, 16)
    dims = dict(BLOCK_D=block_d, BLOCK_DV=block_dv)
    if dtype == torch.float32:  # IEEE products on the CUDA cores
        return dict(dims, BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
    if max(block_d, block_dv) > 128:
        return dict(dims, BLOCK_M=64, BLOCK_N=32, num_warps=8)
    block_m = min(128, pow2(rows, 16))
    if block_m == 128 and cdiv(rows, 128) * heads < 132:
        block_m = 64
    return dict(dims, BLOCK_M=block_m, BLOCK_N=64, num_warps=8 if block_m > 64 else 4)


def attention_with_scores_launch(q, k, v, query_spans, key_spans, causal, key_padding_mask, scale,
                                 max_query, max_key):
    """Forward then pass 2 (the body of the custom op ``vtprune::attention_with_scores``)."""
    B, H, L, d = q.shape
    dv = v.shape[-1]
    check_head_dim(max(d, dv))
    hkv = k.shape[1]
    G = H // hkv
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    qspans, kspans = to_device_i64(query_spans, q.device), to_device_i64(key_spans, q.device)
    kpm = kpm_bytes(key_padding_mask)
    qk_scale = (q.shape[-1] ** -0.5 if scale is None else scale) * LOG2E
    check_max_counts(query_spans, key_spans, max_query, max_key)
    out = torch.empty(B, H, L, dv, dtype=q.dtype, device=q.device)  # [B, H, L, dv]
    lse = torch.empty(B, hkv, G * L, dtype=torch.float32, device=q.device)  # [B, Hkv, L * G] packed
    cfg = forward_config(L, d, dv, q.dtype, B * H)
    _attention_fwd_kernel[(cdiv(L, cfg["BLOCK_M"]), B * H)](
        q, k, v, kpm, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        L, d, dv, hkv, qk_scale,
        G=G, **kernel_flags(q, causal, kpm), **cfg,
    )
    cfg = tile_config(G * max_query, d, q.dtype)
    if cfg["SMALL_M"]:  # CLIP's [CLS] row: every head in one program, on the forward's LSE
        geometry = few_rows_lse_geometry(B, hkv, cfg["BLOCK_M"], cfg["BLOCK_D"], max_key)
        if geometry is not None:
            return out, few_rows_lse_scores(q, k, kpm, qspans, kspans, lse, causal, qk_scale, max_key, cfg,
                                            geometry)
    if takes_few_rows(cfg, hkv, L):  # one launch, no KV-head sum (see attention_scores)
        return out, few_rows_scores(q, k, kpm, qspans, kspans, causal, qk_scale, max_key, cfg)
    scores = column_scores(q, k, kpm, qspans, kspans, lse, True, max_query, max_key, qk_scale, causal)
    return out, scores


def attention_with_scores(q, k, v, *, query_spans, key_spans, causal, key_padding_mask=None, scale=None):
    """Triton backend of :func:`vtprune.ops.attention_with_scores` (arguments checked there).

    Under ``torch.compile`` it runs as the custom op ``torch.ops.vtprune.attention_with_scores``; in eager
    mode it launches directly. Output width as in :func:`vtprune.triton_kernels.attention_scores.attention_scores`.
    """
    L = q.shape[2]
    return call(torch.ops.vtprune.attention_with_scores, attention_with_scores_launch,
                q, k, v, query_spans, key_spans, bool(causal), key_padding_mask,
                None if scale is None else float(scale), host_max(query_spans, L), host_max(key_spans, L))
