"""Triton attention column scores (docs/ops.md#attention_scores) in two passes, never materialising ``L x L``.

``score[b, j] = 1/(H |Qs|) * sum_h sum_{i in Qs} exp(s_hij - lse_hi)`` with ``s = q . k * scale``:

* pass 1 (:func:`_row_lse_kernel`): the log-sum-exp of every query row of the span over **all** its valid
  keys (causal by index, padding excluded), an online max/sum like flash attention's forward without V;
* pass 2 (:func:`column_scores_kernel`): for each key tile of the key span, sum ``exp(s - lse)`` over the
  query span and the query heads.

GQA packing: query heads of one KV group share their keys, so rows of the group's heads are packed into the
M dimension (packed row ``r`` = query ``r // G`` of head ``kv * G + r % G``). A K tile is loaded once and
serves the whole group. Few rows stay cheap: up to 4 packed rows (CLIP's [CLS] row, G = 1) run as a
broadcast product on the CUDA cores (``SMALL_M``), up to 16 (a 7-head group's last token) as one 16-row MMA.
Exponentials are base 2 with ``log2(e)`` folded into the scale.

Determinism: every column tile is owned by one program per (batch row, KV head); the KV heads' partial sums
[B, Hkv, K] are added by the last of a tile's programs to arrive (an arrival counter), always in head order
as one tile, so bit-identical reruns and no PyTorch kernel after the launch.

Few rows (up to 4 packed rows, e.g. CLIP's [CLS] row: one row per head against 577 keys) take one launch
instead (:func:`few_rows_scores_kernel`): the keys are split over >= 132 programs, each stores its logits and
its tile's (max, sum); the last program of each batch row to arrive (an atomic counter per batch row, reset
by that program) combines them in a fixed order, so the result is still bit-identical across reruns.
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
    combined_lse,
    data_logits,
    finish_lse,
    pow2,
    rows_dot_cols,
    split_for,
    to_device_i64,
    upcast_dot,
)
from vtprune.triton_kernels._routed_ops import call

LOG2E = 1.4426950408889634


@triton.jit
def load_q_rows(q_ptr, b, kvh, r, pos, row_ok, sqb, sqh, sql, offs_d, D, G: tl.constexpr):
    """Query tile [BLOCK_M, BLOCK_D] of packed rows ``r`` (head ``kvh * G + r % G``, position ``pos``)."""
    head = kvh * G + r % G
    ptrs = q_ptr + b * sqb + head[:, None] * sqh + pos[:, None] * sql + offs_d[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def load_k_tile(k_ptr, b, kvh, j, col_ok, skb, skh, skl, offs_d, D):
    """Key (or value) tile [BLOCK_N, BLOCK_D] at positions ``j``."""
    ptrs = k_ptr + b * skb + kvh * skh + j[:, None] * skl + offs_d[None, :]
    return tl.load(ptrs, mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def key_ok(kpm_ptr, b, j, L, HAS_KPM: tl.constexpr):
    """Keys ``j`` that exist and are not padding: bool [BLOCK_N]."""
    ok = j < L
    if HAS_KPM:
        ok = ok & (tl.load(kpm_ptr + b * L + j, mask=ok, other=0) != 0)
    return ok


@triton.jit
def allowed_mask(pos, row_ok, j, kok, CAUSAL: tl.constexpr):
    """Which (query row, key) pairs enter the softmax: [BLOCK_M, BLOCK_N] (causal by index)."""
    allowed = row_ok[:, None] & kok[None, :]
    if CAUSAL:
        allowed = allowed & (j[None, :] <= pos[:, None])
    return allowed


@triton.jit
def online_softmax_step(s, m, l):
    """One key tile of the online softmax: new (max, sum, rescale factor, tile probabilities), base 2.

    A row whose keys so far are all masked keeps max = -inf; subtracting 0 instead of -inf there keeps the
    exponentials at exp2(-inf) = 0 rather than NaN.
    """
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_sub)
    p = tl.exp2(s - m_sub[:, None])
    return m_new, l * alpha + tl.sum(p, axis=1), alpha, p


@triton.jit
def _lse_tile(q, k_ptr, kpm_ptr, b, kvh, n0, pos, row_ok, m, l, skb, skh, skl, offs_d, L, D, qk_scale,
              CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
              SMALL_M: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile of pass 1: the running (max, sum). Interior tiles (``MASKED`` False) lie below the causal
    diagonal and inside [0, L): only padding (``HAS_KPM``) is masked there."""
    j = n0 + tl.arange(0, BLOCK_N)
    kok = key_ok(kpm_ptr, b, j, L, HAS_KPM)
    k = load_k_tile(k_ptr, b, kvh, j, j < L, skb, skh, skl, offs_d, D)  # [BLOCK_N, BLOCK_D]
    s = data_logits(rows_dot_cols(q, k, SMALL_M, IEEE, UPCAST) * qk_scale)  # [BLOCK_M, BLOCK_N], log2
    if MASKED:
        s = tl.where(allowed_mask(pos, row_ok, j, kok, CAUSAL), s, float("-inf"))
    elif HAS_KPM:
        s = tl.where(kok[None, :], s, float("-inf"))
    m, l, _, _ = online_softmax_step(s, m, l)
    return m, l


@triton.jit
def _row_lse_kernel(
    q_ptr, k_ptr, kpm_ptr, qspan_ptr, lse_ptr, l_ptr,
    sqb, sqh, sql, skb, skh, skl,
    L, D, HKV, R_STRIDE, qk_scale,
    G: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SMALL_M: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    # grid: (packed-row tiles of the query span, B * Hkv, SPLIT). With SPLIT > 1 (few rows and a long key
    # range: CLIP's [CLS] row) split s takes key tiles s, s + SPLIT, ... and stores its running max and sum
    # to lse/l [B * Hkv, SPLIT, R_STRIDE]; pass 2 combines them (combined_lse). SPLIT == 1 stores the LSE.
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    b, kvh = bh // HKV, bh % HKV
    qstart, qcount = tl.load(qspan_ptr + 2 * b), tl.load(qspan_ptr + 2 * b + 1)
    qcount = tl.minimum(qcount, R_STRIDE // G)  # never past the lse buffer, whatever max_query said
    r = m0 + tl.arange(0, BLOCK_M)  # packed rows of this tile
    row_ok = r < qcount * G
    pos = qstart + r // G  # [BLOCK_M] query positions
    offs_d = tl.arange(0, BLOCK_D)
    q = load_q_rows(q_ptr, b, kvh, r, pos, row_ok, sqb, sqh, sql, offs_d, D, G)  # [BLOCK_M, BLOCK_D]

    hi = L
    interior = L // BLOCK_N * BLOCK_N  # key tiles inside [0, L): no bounds mask
    if CAUSAL:  # keys past the tile's last query position are masked for every row of the tile
        last = qstart + tl.minimum(qcount - 1, (m0 + BLOCK_M - 1) // G)
        hi = (last + 1) * (m0 < qcount * G).to(tl.int64)
        # keys <= the tile's first query position: no causal mask for any row
        interior = tl.minimum(tl.minimum(qstart + m0 // G + 1, L) // BLOCK_N * BLOCK_N, hi)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(split * BLOCK_N, interior, SPLIT * BLOCK_N):  # rows past the span: garbage, never stored
        m, l = _lse_tile(q, k_ptr, kpm_ptr, b, kvh, n0, pos, row_ok, m, l, skb, skh, skl, offs_d, L, D, qk_scale,
                         CAUSAL, HAS_KPM, False, BLOCK_N, SMALL_M, IEEE, UPCAST)
    t0 = interior // BLOCK_N  # this split's first tile at or after the interior ones
    for n0 in range((t0 + (split - t0 % SPLIT + SPLIT) % SPLIT) * BLOCK_N, hi, SPLIT * BLOCK_N):
        m, l = _lse_tile(q, k_ptr, kpm_ptr, b, kvh, n0, pos, row_ok, m, l, skb, skh, skl, offs_d, L, D, qk_scale,
                         CAUSAL, HAS_KPM, True, BLOCK_N, SMALL_M, IEEE, UPCAST)
    if SPLIT == 1:
        # +inf for a row with no valid key: pass 2's exp2(s - lse) is then 0, the row contributes nothing
        tl.store(lse_ptr + bh * R_STRIDE + r, finish_lse(m, l), mask=row_ok)
    else:
        out = (bh * SPLIT + split) * R_STRIDE + r
        tl.store(lse_ptr + out, m, mask=row_ok)
        tl.store(l_ptr + out, l, mask=row_ok)


@triton.jit
def _column_tile(q_ptr, lse_ptr, l_ptr, k, acc, b, kvh, bh, r0, r_hi, qstart, j, kok, sqb, sqh, sql, offs_d, D,
                 R_STRIDE, qk_scale, G: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                 LSE_ABSOLUTE: tl.constexpr, LSE_SPLIT: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
                 SMALL_M: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """One row tile of pass 2 added to ``acc``. Interior tiles (``MASKED`` False): every row valid and causally
    past the key tile, so only padding keys are masked."""
    r = r0 + tl.arange(0, BLOCK_M)
    row_ok = r < r_hi
    i = r // G
    pos = qstart + i
    q = load_q_rows(q_ptr, b, kvh, r, pos, row_ok, sqb, sqh, sql, offs_d, D, G)  # [BLOCK_M, BLOCK_D]
    lse_row = r
    if LSE_ABSOLUTE:
        lse_row = pos * G + r % G
    if LSE_SPLIT == 1:
        lse = tl.load(lse_ptr + bh * R_STRIDE + lse_row, mask=row_ok, other=float("inf"))
    else:
        lse = combined_lse(lse_ptr, l_ptr, bh * LSE_SPLIT * R_STRIDE, R_STRIDE, lse_row, row_ok, LSE_SPLIT)
    s = rows_dot_cols(q, k, SMALL_M, IEEE, UPCAST) * qk_scale  # [BLOCK_M, BLOCK_N]
    p = tl.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(allowed_mask(pos, row_ok, j, kok, CAUSAL), p, 0.0)
    elif HAS_KPM:
        p = tl.where(kok[None, :], p, 0.0)
    return acc + p


@triton.jit
def column_scores_kernel(
    q_ptr, k_ptr, kpm_ptr, qspan_ptr, kspan_ptr, lse_ptr, l_ptr, part_ptr, count_ptr, out_ptr,
    sqb, sqh, sql, skb, skh, skl,
    L, D, HKV, R_STRIDE, KM, qk_scale, inv_heads,
    G: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, LSE_ABSOLUTE: tl.constexpr,
    LSE_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SMALL_M: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, HKV_P: tl.constexpr,
):
    """Pass 2: partial column sums ``part[b, kv, n]`` of the KV group's heads, already divided by H |Qs|.

    ``lse`` is packed like the query rows (with ``LSE_SPLIT > 1``: pass 1's partial max in ``lse`` and sums
    in ``l``, combined on load); ``LSE_ABSOLUTE`` means it covers every position (the flash forward
    of attention_with_scores) rather than the query span only.

    With ``HKV_P > 1`` (several KV heads) the last of a key tile's ``HKV`` programs to arrive (an atomic
    counter per batch row and key tile, reset by that program) adds the heads' partials as one
    ``[HKV_P, BLOCK_N]`` tile and writes ``out[b, n]``: a fixed reduction order (bit-identical reruns) and no
    PyTorch sum after the launch. With one KV head ``part`` is the output.
    """
    # grid: (key tiles of the key span, B * Hkv)
    n0 = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    b, kvh = bh // HKV, bh % HKV
    qstart, qcount = tl.load(qspan_ptr + 2 * b), tl.load(qspan_ptr + 2 * b + 1)
    kstart, kcount = tl.load(kspan_ptr + 2 * b), tl.load(kspan_ptr + 2 * b + 1)
    if not LSE_ABSOLUTE:
        qcount = tl.minimum(qcount, R_STRIDE // G)  # as pass 1: never read past the lse buffer
    col = n0 + tl.arange(0, BLOCK_N)
    col_ok = col < kcount
    j = kstart + col  # [BLOCK_N] key positions
    kok = col_ok & key_ok(kpm_ptr, b, j, L, HAS_KPM)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_k_tile(k_ptr, b, kvh, j, col_ok, skb, skh, skl, offs_d, D)  # loaded once for the whole group

    r_hi = qcount * G * (n0 < kcount).to(tl.int64)  # no rows for columns past this row's key count
    r_lo = 0
    if CAUSAL:  # query rows before the tile's first key see none of its keys
        r_lo = tl.maximum(kstart + n0 - qstart, 0) * G
    # interior row tiles: every row valid and past the tile's last key (causal), so no mask but padding;
    # the row tiles before them (the diagonal) and the last partial one take the mask
    r_full = r_lo
    if CAUSAL:
        r_full = tl.maximum(kstart + n0 + BLOCK_N - 1 - qstart, 0) * G
    r_in = tl.minimum(r_lo + tl.cdiv(tl.maximum(r_full - r_lo, 0), BLOCK_M) * BLOCK_M, r_hi)
    r_in_hi = r_in + tl.maximum(r_hi - r_in, 0) // BLOCK_M * BLOCK_M
    head = tl.cdiv(r_in - r_lo, BLOCK_M)  # masked tiles before the interior ones
    # a [BLOCK_M, BLOCK_N] accumulator: the column sum across rows (and warps) runs once, after the loops
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r0 in range(r_in, r_in_hi, BLOCK_M):
        acc = _column_tile(q_ptr, lse_ptr, l_ptr, k, acc, b, kvh, bh, r0, r_hi, qstart, j, kok, sqb, sqh, sql, offs_d,
                           D, R_STRIDE, qk_scale, G, CAUSAL, HAS_KPM, LSE_ABSOLUTE, LSE_SPLIT, False, BLOCK_M, SMALL_M,
                           IEEE, UPCAST)
    for t in range(0, head + tl.cdiv(r_hi - r_in_hi, BLOCK_M)):
        r0 = tl.where(t < head, r_lo + t * BLOCK_M, r_in_hi + (t - head) * BLOCK_M)
        acc = _column_tile(q_ptr, lse_ptr, l_ptr, k, acc, b, kvh, bh, r0, r_hi, qstart, j, kok, sqb, sqh, sql, offs_d,
                           D, R_STRIDE, qk_scale, G, CAUSAL, HAS_KPM, LSE_ABSOLUTE, LSE_SPLIT, True, BLOCK_M, SMALL_M,
                           IEEE, UPCAST)
    acc = tl.where(col_ok, tl.sum(acc, axis=0) * inv_heads / qcount.to(tl.float32), 0.0)
    tl.store(part_ptr + bh * KM + col, acc, mask=col < KM)
    if HKV_P > 1:
        tl.debug_barrier()  # every thread's stores issued before the release below
        counter = count_ptr + b * tl.num_programs(0) + tl.program_id(0)
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == HKV - 1:  # the tile's last KV head
            tl.store(counter, 0)  # ready for the next launch (stream order)
            heads = tl.arange(0, HKV_P)
            ptrs = part_ptr + (b * HKV + heads)[:, None] * KM + col[None, :]
            parts = tl.load(ptrs, mask=(heads < HKV)[:, None] & (col < KM)[None, :], other=0.0,
                            cache_modifier=".cg")  # [HKV_P, BLOCK_N], from L2
            tl.store(out_ptr + b * KM + col, tl.sum(parts, axis=0), mask=col < KM)


@triton.jit
def few_rows_scores_kernel(
    q_ptr, k_ptr, kpm_ptr, qspan_ptr, kspan_ptr, s_ptr, part_ptr, count_ptr, out_ptr,
    sqb, sqh, sql, skb, skh, skl,
    L, D, HKV, NT, KM, qk_scale, inv_heads,
    G: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, ROWS_P: tl.constexpr, NT_P: tl.constexpr,
    BLOCK_KC: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK_KC2: tl.constexpr,
):
    """Scores of a few packed query rows (CLIP's [CLS]) in one launch: split over key tiles, reduced by the
    last program of the batch row.

    Every program (key tile n of all L keys, batch row b, KV head) stores its logits ``s [BLOCK_M, BLOCK_N]``
    and its tile's running max and sum; a per-row counter (atomic, acquire-release) tells the last program
    of the row, which combines the tiles' (max, sum) into each row's LSE and sums ``exp2(s - lse)`` over the
    rows and heads for the key span, in a fixed order (deterministic), and resets the counter to 0. The
    interpreter runs programs one after another, so the hand-off between programs (a CTA barrier, then the
    release/acquire atomic, then L2-only loads) is only exercised on a GPU (tests/gpu).
    """
    # grid: (NT key tiles over [0, L), B * Hkv)
    n0 = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    b, kvh = bh // HKV, bh % HKV
    qstart, qcount = tl.load(qspan_ptr + 2 * b), tl.load(qspan_ptr + 2 * b + 1)
    r = tl.arange(0, BLOCK_M)  # packed rows
    row_ok = r < qcount * G
    pos = qstart + r // G
    offs_d = tl.arange(0, BLOCK_D)
    q = load_q_rows(q_ptr, b, kvh, r, pos, row_ok, sqb, sqh, sql, offs_d, D, G)  # [BLOCK_M, BLOCK_D]
    j = n0 + tl.arange(0, BLOCK_N)
    kok = key_ok(kpm_ptr, b, j, L, HAS_KPM)
    k = load_k_tile(k_ptr, b, kvh, j, j < L, skb, skh, skl, offs_d, D)  # [BLOCK_N, BLOCK_D]
    s = data_logits(rows_dot_cols(q, k, True, IEEE, UPCAST) * qk_scale)  # [BLOCK_M, BLOCK_N], log2 units
    s = tl.where(allowed_mask(pos, row_ok, j, kok, CAUSAL), s, float("-inf"))
    m = tl.max(s, axis=1)
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(tl.exp2(s - m_sub[:, None]), axis=1)
    hr = kvh * BLOCK_M + r  # head-row of this program's rows: [Hkv * BLOCK_M] per batch row
    tl.store(s_ptr + (b * HKV * BLOCK_M + hr)[:, None] * L + j[None, :], s, mask=(j < L)[None, :])
    part = part_ptr + ((b * HKV * BLOCK_M + hr) * NT + tl.program_id(0)) * 2
    tl.store(part, m)
    tl.store(part + 1, l)
    tl.debug_barrier()  # every thread's stores issued before the release below
    done = tl.atomic_add(count_ptr + b, 1, sem="acq_rel", scope="gpu")
    if done == NT * HKV - 1:  # the last program of batch row b
        tl.store(count_ptr + b, 0)  # ready for the next launch (stream order)
        rows = tl.arange(0, ROWS_P)  # every head-row of the batch row
        rows_ok = rows < HKV * BLOCK_M
        t = tl.arange(0, NT_P)
        pp = part_ptr + ((b * HKV * BLOCK_M + rows)[:, None] * NT + t[None, :]) * 2
        ok2 = rows_ok[:, None] & (t < NT)[None, :]
        pm = tl.load(pp, mask=ok2, other=float("-inf"), cache_modifier=".cg")  # [ROWS_P, NT_P]
        pl = tl.load(pp + 1, mask=ok2, other=0.0, cache_modifier=".cg")
        mx = tl.max(pm, axis=1)
        mx_sub = tl.where(mx == float("-inf"), 0.0, mx)
        lse = finish_lse(mx, tl.sum(pl * tl.exp2(pm - mx_sub[:, None]), axis=1))  # [ROWS_P], +inf: no key
        kstart, kcount = tl.load(kspan_ptr + 2 * b), tl.load(kspan_ptr + 2 * b + 1)
        scale = inv_heads / qcount.to(tl.float32)
        if ONE_CHUNK:  # the whole key span at once: its loads overlap the partials' (no loop), as one power-of-two
            # chunk and the rest (576 keys: 512 + 64, not 1024)
            _few_rows_chunk(s_ptr, out_ptr, b, 0, rows, rows_ok, lse, scale, kstart, kcount, L, KM, HKV * BLOCK_M,
                            BLOCK_KC)
            if BLOCK_KC2 > 0:
                _few_rows_chunk(s_ptr, out_ptr, b, BLOCK_KC, rows, rows_ok, lse, scale, kstart, kcount, L, KM,
                                HKV * BLOCK_M, BLOCK_KC2)
        else:
            for c0 in range(0, KM, BLOCK_KC):
                _few_rows_chunk(s_ptr, out_ptr, b, c0, rows, rows_ok, lse, scale, kstart, kcount, L, KM,
                                HKV * BLOCK_M, BLOCK_KC)


@triton.jit
def _few_rows_chunk(s_ptr, out_ptr, b, c0, rows, rows_ok, lse, scale, kstart, kcount, L, KM, HR,
                    BLOCK_KC: tl.constexpr):
    """Scores of key-span columns [c0, c0 + BLOCK_KC): sum over head-rows of exp2(s - lse), scaled."""
    col = c0 + tl.arange(0, BLOCK_KC)
    col_ok = col < kcount
    sv = tl.load(s_ptr + (b * HR + rows)[:, None] * L + (kstart + col)[None, :],
                 mask=rows_ok[:, None] & col_ok[None, :], other=float("-inf"), cache_modifier=".cg")
    p = tl.exp2(sv - lse[:, None])  # 0 for masked logits and for rows without a valid key
    tl.store(out_ptr + b * KM + col, tl.where(col_ok, tl.sum(p, axis=0) * scale, 0.0), mask=col < KM)


@functools.lru_cache(maxsize=256)
def tile_config(rows: int, d: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options of both passes for ``rows`` packed query rows, head dim ``d``.

    Cached per shape (host time per launch); callers read the dict and never change it.

    Chosen from sm_90 compiles (registers / spills / shared memory reported by ptxas, no GPU timing yet):
    these are the largest tiles that compile without spilling. One D tile: the kernels take d <= 256.
    """
    block_d = pow2(d, 16)
    if rows <= 4:  # CUDA-core path: the broadcast product BLOCK_M x BLOCK_N x BLOCK_D stays near 2K values
        block_m = pow2(rows)
        return dict(BLOCK_M=block_m, BLOCK_N=max(16, 2048 // (block_m * block_d)), BLOCK_D=block_d,
                    SMALL_M=True, num_warps=4)
    if dtype == torch.float32:  # IEEE products run on the CUDA cores: 64 x 64 tiles spill; a second stage
        # of prefetched fp32 Q rows spills under Triton 3.9 (400 B at d 128, 4.8 KB at d 256, 32 x 32 tiles)
        return dict(BLOCK_M=32, BLOCK_N=16, BLOCK_D=block_d, SMALL_M=False, num_warps=8, num_stages=1)
    # a few rows (one query of a 7-head GQA group: FastV's last token on Qwen2.5-VL) get a 16-row MMA.
    # One warpgroup (4 warps) per 64-row tile: 8 warps split the same tile's columns and repeat its per-warp
    # work (addresses, row max/sum shuffles): sm_90 compiles at LLaVA-1.5 give 410 SASS instructions per pass-1
    # key tile at 4 warps against 283 at 8 (1640 vs 2264 warp-instructions), 295 vs 209 for pass 2.
    return dict(BLOCK_M=min(64, pow2(rows, 16)), BLOCK_N=64 if block_d <= 128 else 32, BLOCK_D=block_d,
                SMALL_M=False, num_warps=4)


def check_head_dim(d: int) -> None:
    if d > 256:
        raise ValueError(f"the Triton attention kernels take head dim d <= 256 (one register tile), got {d}")


def check_max_counts(query_spans, key_spans, max_query, max_key) -> None:
    """The output widths must cover every span; checked when the spans are on the CPU (no device sync)."""
    for name, spans, given in (("max_query", query_spans, max_query), ("max_key", key_spans, max_key)):
        if spans.device.type == "cpu" and host_max(spans) > given:
            raise ValueError(f"{name} ({given}) is below the largest span count ({host_max(spans)})")


def kernel_flags(q: torch.Tensor, causal: bool, key_padding_mask) -> dict:
    return dict(CAUSAL=bool(causal), HAS_KPM=key_padding_mask is not None, IEEE=q.dtype == torch.float32,
                UPCAST=upcast_dot(q.dtype))


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch/head/position strides but need unit stride on the head dim."""
    return t if t.stride(-1) == 1 else t.contiguous()


def kpm_bytes(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """bool [B, L] -> uint8 [B, L] (same bytes), the form the kernels load."""
    return None if key_padding_mask is None else key_padding_mask.contiguous().view(torch.uint8)


def column_scores(q, k, kpm, qspans, kspans, lse, lse_absolute, max_query, max_key, qk_scale, causal,
                  lsum=None):
    """Launch pass 2 and reduce the KV heads' partials: float32 [B, max_key].

    ``lsum`` given: ``lse`` and ``lsum`` are pass 1's split partials [B, Hkv, SPLIT, R] (max, sum).
    """
    B, H, L, d = q.shape
    hkv = k.shape[1]
    G = H // hkv
    part = torch.empty(B, hkv, max_key, dtype=torch.float32, device=q.device)  # [B, Hkv, K]
    out = torch.empty(B, max_key, dtype=torch.float32, device=q.device) if hkv > 1 else part.view(B, max_key)
    cfg = tile_config(G * max_query, d, q.dtype)
    grid = (cdiv(max_key, cfg["BLOCK_N"]), B * hkv)
    column_scores_kernel[grid](
        q, k, kpm, qspans, kspans, lse, lse if lsum is None else lsum, part,
        arrival_counters(q.device, B * grid[0]), out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        L, d, hkv, lse.shape[-1], max_key, qk_scale, 1.0 / H,
        G=G, LSE_ABSOLUTE=lse_absolute, LSE_SPLIT=1 if lsum is None else lse.shape[2], HKV_P=pow2(hkv),
        **kernel_flags(q, causal, kpm), **cfg,
    )
    return out


FEW_ROWS_PARTIALS = 16384  # the last program holds (max, sum) of every head-row x key tile in registers
_COUNTERS: dict = {}


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """int32 [>= n] zeros for the last-program reductions (one per batch row, or per batch row and key tile),
    one buffer per device and stream, allocated once (each launch leaves it at zero again; 4096 counters
    cover every benchmark shape at batch 8); stream order keeps launches on one stream from sharing a count."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf


def takes_few_rows(cfg: dict, hkv: int, L: int) -> bool:
    """Whether the one-launch path serves these rows: the CUDA-core tile (<= 4 packed rows) and the last
    program's partials (every head-row x 16-key tile) within FEW_ROWS_PARTIALS."""
    return cfg["SMALL_M"] and pow2(hkv * cfg["BLOCK_M"]) * pow2(cdiv(L, 16)) <= FEW_ROWS_PARTIALS


@functools.lru_cache(maxsize=256)
def _few_rows_geometry(B: int, hkv: int, L: int, bm: int, max_key: int) -> tuple:
    """(key tile, key tiles, padded head-rows, key chunk, one chunk?, second chunk) of :func:`few_rows_scores`,
    cached per shape. When the key span fits the last program's registers it is read at once as the largest
    power of two inside it plus the rest rounded up (0: none)."""
    bn = 128  # the widest key tile that still gives >= 132 programs (at least 16 keys)
    while bn > 16 and cdiv(L, bn) * B * hkv < 132:
        bn //= 2
    rows_p = pow2(hkv * bm)
    kc = max(16, min(pow2(max_key), 16384 // rows_p))
    if kc < max_key:
        return bn, cdiv(L, bn), rows_p, kc, False, 0
    kc = max(16, pow2(max_key + 1) // 2)
    return bn, cdiv(L, bn), rows_p, kc, True, pow2(max_key - kc, 16) if max_key > kc else 0


def few_rows_scores(q, k, kpm, qspans, kspans, causal, qk_scale, max_key, cfg):
    """One launch for up to 4 packed query rows (:func:`few_rows_scores_kernel`): float32 [B, max_key]."""
    B, H, L, d = q.shape
    hkv = k.shape[1]
    bm = cfg["BLOCK_M"]
    bn, nt, rows_p, kc, one, kc2 = _few_rows_geometry(B, hkv, L, bm, max_key)
    logits = torch.empty(B, hkv * bm, L, dtype=torch.float32, device=q.device)  # [B, Hkv * BM, L]
    part = torch.empty(B, hkv * bm, nt, 2, dtype=torch.float32, device=q.device)  # per key tile (max, sum)
    out = torch.empty(B, max_key, dtype=torch.float32, device=q.device)  # [B, max_key]
    few_rows_scores_kernel[(nt, B * hkv)](
        q, k, kpm, qspans, kspans, logits, part, arrival_counters(q.device, B), out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        L, d, hkv, nt, max_key, qk_scale, 1.0 / H,
        G=H // hkv, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg["BLOCK_D"], ROWS_P=rows_p, NT_P=pow2(nt),
        BLOCK_KC=kc, ONE_CHUNK=one, BLOCK_KC2=kc2, num_warps=4,
        **{k_: v for k_, v in kernel_flags(q, causal, kpm).items()},
    )
    return out


def attention_scores_launch(q, k, query_spans, key_spans, causal, key_padding_mask, scale, max_query, max_key):
    """Both passes on prepared arguments (the body of the custom op ``vtprune::attention_scores``)."""
    B, H, L, d = q.shape
    check_head_dim(d)
    hkv = k.shape[1]
    G = H // hkv
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    qspans, kspans = to_device_i64(query_spans, q.device), to_device_i64(key_spans, q.device)
    kpm = kpm_bytes(key_padding_mask)
    qk_scale = (q.shape[-1] ** -0.5 if scale is None else scale) * LOG2E
    check_max_counts(query_spans, key_spans, max_query, max_key)
    rows = G * max_query
    cfg = tile_config(rows, d, q.dtype)
    if takes_few_rows(cfg, hkv, L):
        return few_rows_scores(q, k, kpm, qspans, kspans, causal, qk_scale, max_key, cfg)
    row_tiles = cdiv(rows, cfg["BLOCK_M"])
    # few row tiles over a long key range (CLIP's [CLS] row: 16 CTAs x 19 key tiles): split the keys
    split = split_for(row_tiles * hkv, B, 16) if cdiv(L, cfg["BLOCK_N"]) >= 4 else 1
    lse = torch.empty(B, hkv, split, rows, dtype=torch.float32, device=q.device)  # [B, Hkv, S, G * Qmax]
    lsum = torch.empty_like(lse) if split > 1 else None
    _row_lse_kernel[(row_tiles, B * hkv, split)](
        q, k, kpm, qspans, lse, lse if lsum is None else lsum,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        L, d, hkv, rows, qk_scale,
        G=G, SPLIT=split, **kernel_flags(q, causal, kpm), **cfg,
    )
    return column_scores(q, k, kpm, qspans, kspans, lse, False, max_query, max_key, qk_scale, causal, lsum)


def attention_scores(q, k, *, query_spans, key_spans, causal, key_padding_mask=None, scale=None):
    """Triton backend of :func:`vtprune.ops.attention_scores` (arguments checked there).

    Under ``torch.compile`` it runs as the custom op ``torch.ops.vtprune.attention_scores``; in eager mode it
    launches directly (one dispatch layer). The output width is the largest span count of CPU spans, read
    on the host as Python ints, or ``L`` for spans on the device (no host read).
    """
    L = q.shape[2]
    return call(torch.ops.vtprune.attention_scores, attention_scores_launch,
                q, k, query_spans, key_spans, bool(causal), key_padding_mask,
                None if scale is None else float(scale), host_max(query_spans, L), host_max(key_spans, L))

