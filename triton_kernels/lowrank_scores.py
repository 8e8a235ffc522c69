"""Triton ALVTS selector scores (docs/ops.md#lowrank_scores): a low-rank single-head attention, never
materialising ``L x L``.

``a = h U``, ``b = h V`` (``[B, L, R]``), ``s = a b^T / sqrt(R)`` causal with key padding, and for visual key
``j``: ``S_V2V[j] = mean_{i visual} exp(s_ij - lse_i)``, ``S_T2V[j] = mean_{i text} exp(s_ij - lse_i)``,
``S = S_V2V * S_T2V`` (``S_T2V = 1`` for a row without text). Four launches:

* :func:`_project_kernel`: ``[h U | h V]`` in one launch (h read once from HBM, its tiles re-read from L2 by
  the V half), fp32 accumulation, fp32 output ``[B, L, 2R]``: ``2 L R`` floats keep the logits as exact as the
  reference's.
* :func:`_row_lse_kernel`: running max and sum (base 2) of every query row at or after the image start, the
  key tiles split ``SPLIT`` ways (interleaved, so causal rows balance) so that the grid covers the GPU at
  batch 1; rows before the image cannot see a visual key (causal) and do no work.
* :func:`_visual_columns_kernel`: per (visual key tile, split, batch row) the query rows that can see the
  tile (``i >= j``), split ``SPLIT`` ways; it combines the row splits' max/sum into the LSE on load and writes
  visual-row and text-row column sums per split.
* :func:`_finish_kernel`: adds the splits in a fixed order (no atomics: bit-identical reruns), counts the
  text rows, applies the means and the product.

The ``L^2 R`` dots run on float32 ``a, b``: IEEE products for float32 inputs, 3xTF32 tensor-core products
for fp16/bf16 inputs. bf16 ``a, b`` would halve the dot time but cost ~1e-3 relative on the scores, and the
Triton backend is held to 2e-5 of the float64 truth (tests/ops/test_lowrank_scores.py). ``R`` is
looped in 16..32-wide chunks so R = 256 (LLaVA) does not need a 256-wide register tile (64 spills).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtprune._host import call, host_max
from vtprune.triton_kernels import _routed_ops  # noqa: F401  (registers torch.ops.vtprune.lowrank_scores)
from vtprune.triton_kernels._common import (
    cdiv,
    combined_lse,
    data_logits,
    mma,
    pow2,
    split_for,
    to_device_i64,
    upcast_dot,
)
from vtprune.triton_kernels.attention_scores import LOG2E, key_ok, kpm_bytes, online_softmax_step


@triton.jit
def _project_kernel(
    h_ptr, u_ptr, v_ptr, out_ptr, M, L, D, R, shb, shl, sud, sur, svd, svr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    # grid: (row tiles of the B*L rows, column tiles of U then of V); out [M, 2R] float32 contiguous = [a | b]
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_r = tl.cdiv(R, BLOCK_R)
    tile = tl.program_id(1)
    cols = (tile % n_r) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok, col_ok = rows < M, cols < R
    if tile < n_r:  # one launch projects with both factors: h's tile is read from L2 by the V half
        w_ptr, swd, swr, out_col = u_ptr, sud, sur, cols
    else:
        w_ptr, swd, swr, out_col = v_ptr, svd, svr, R + cols
    # h may be a strided [B, L, D] view: address row (b, l) through its own strides
    hrow = (rows // L).to(tl.int64) * shb + (rows % L).to(tl.int64) * shl
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(h_ptr + hrow[:, None] + k[None, :], mask=row_ok[:, None] & (k[None, :] < D), other=0.0)
        w = tl.load(w_ptr + k[:, None] * swd + cols[None, :] * swr,
                    mask=(k[:, None] < D) & col_ok[None, :], other=0.0)
        acc += mma(x, w, IEEE, UPCAST)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * (2 * R) + out_col[None, :], acc,
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _logits(ab_ptr, base, i, i_ok, j, j_ok, R, qk_scale,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    """``a[i] . b[j] * qk_scale`` as a [BLOCK_M, BLOCK_N] tile (rows of ``ab`` are ``[a | b]``, 2R wide),
    looping over R in BLOCK_R chunks."""
    s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        a = tl.load(ab_ptr + base + i[:, None] * (2 * R) + r[None, :],
                    mask=i_ok[:, None] & (r[None, :] < R), other=0.0)
        b = tl.load(ab_ptr + base + R + j[None, :] * (2 * R) + r[:, None],
                    mask=j_ok[None, :] & (r[:, None] < R), other=0.0)
        if IEEE:
            s += tl.dot(a, b, input_precision="ieee")
        else:  # 3xTF32: float32-grade logits on the tensor cores (the tests hold Triton to 1e-5 of float32)
            s += tl.dot(a, b, input_precision="tf32x3")
    return s * qk_scale


@triton.jit
def _row_lse_kernel(
    ab_ptr, kpm_ptr, span_ptr, m_ptr, l_ptr, L, R, qk_scale,
    HAS_KPM: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
):
    # grid: (query tiles, SPLIT, B). Split s takes key tiles s, s + SPLIT, ... and writes its running max and
    # sum (base 2) to m/l [B, SPLIT, L]; the column pass combines the splits in a fixed order (deterministic).
    m0 = tl.program_id(0) * BLOCK_M
    split = tl.program_id(1)
    bid = tl.program_id(2).to(tl.int64)
    vstart = tl.load(span_ptr + 2 * bid).to(tl.int32)
    i = m0 + tl.arange(0, BLOCK_M)
    i_ok = (i < L) & (i >= vstart)
    base = bid * L * 2 * R
    # causal: keys up to the tile's last row; a tile wholly before the image has nothing to do
    hi = tl.minimum(m0 + BLOCK_M, L) * (m0 + BLOCK_M > vstart).to(tl.int32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lsum = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(split * BLOCK_N, hi, SPLIT * BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        s = _logits(ab_ptr, base, i, i_ok, j, j < L, R, qk_scale, BLOCK_M, BLOCK_N, BLOCK_R, IEEE)
        allowed = i_ok[:, None] & key_ok(kpm_ptr, bid, j, L, HAS_KPM)[None, :] & (j[None, :] <= i[:, None])
        m, lsum, _, _ = online_softmax_step(tl.where(allowed, data_logits(s), float("-inf")), m, lsum)
    out = (bid * SPLIT + split) * L + i
    tl.store(m_ptr + out, m, mask=i < L)
    tl.store(l_ptr + out, lsum, mask=i < L)


@triton.jit
def _visual_columns_kernel(
    ab_ptr, kpm_ptr, span_ptr, m_ptr, l_ptr, part_ptr, L, R, VM, qk_scale,
    HAS_KPM: tl.constexpr, SPLIT: tl.constexpr, LSE_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
):
    # grid: (visual key tiles, SPLIT, B). Split s takes query tiles s, s + SPLIT, ... and writes its visual-row
    # and text-row column sums to part [B, SPLIT, 2, VM]; _finish_kernel adds the splits in a fixed order.
    n0 = tl.program_id(0) * BLOCK_N
    split = tl.program_id(1)
    bid = tl.program_id(2).to(tl.int64)
    vstart = tl.load(span_ptr + 2 * bid).to(tl.int32)
    vcount = tl.load(span_ptr + 2 * bid + 1).to(tl.int32)
    col = n0 + tl.arange(0, BLOCK_N)
    col_ok = col < vcount
    j = vstart + col  # [BLOCK_N] key positions
    kok = col_ok & key_ok(kpm_ptr, bid, j, L, HAS_KPM)
    base = bid * L * 2 * R
    # queries before the tile's first key see none of it (causal); a tile past the count has no rows
    lo = vstart + n0
    hi = L * (n0 < vcount).to(tl.int32)
    acc_v = tl.zeros([BLOCK_N], tl.float32)
    acc_t = tl.zeros([BLOCK_N], tl.float32)
    for m0 in range(lo + split * BLOCK_M, hi, SPLIT * BLOCK_M):
        i = m0 + tl.arange(0, BLOCK_M)
        i_ok = i < L
        lse = combined_lse(m_ptr, l_ptr, bid * LSE_SPLIT * L, L, i, i_ok, LSE_SPLIT)
        s = _logits(ab_ptr, base, i, i_ok, j, col_ok, R, qk_scale, BLOCK_M, BLOCK_N, BLOCK_R, IEEE)
        allowed = i_ok[:, None] & kok[None, :] & (j[None, :] <= i[:, None])
        p = tl.exp2(tl.where(allowed, s - lse[:, None], float("-inf")))  # masked before exp: no overflow
        visual = (i >= vstart) & (i < vstart + vcount)
        text = i_ok & ~visual
        if HAS_KPM:  # padding rows are neither visual nor text (the reference's real & ~visual)
            text = text & (tl.load(kpm_ptr + bid * L + i, mask=i_ok, other=0) != 0)
        acc_v += tl.sum(tl.where(visual[:, None], p, 0.0), axis=0)
        acc_t += tl.sum(tl.where(text[:, None], p, 0.0), axis=0)
    out = part_ptr + ((bid * SPLIT + split) * 2) * VM + col
    tl.store(out, acc_v, mask=col < VM)
    tl.store(out + VM, acc_t, mask=col < VM)


@triton.jit
def _finish_kernel(
    part_ptr, kpm_ptr, span_ptr, out_ptr, L, VM,
    HAS_KPM: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # grid: (column tiles, B); out [B, VM] = mean over visual rows * mean over text rows (1 without text)
    bid = tl.program_id(1).to(tl.int64)
    col = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    vstart = tl.load(span_ptr + 2 * bid).to(tl.int32)
    vcount = tl.load(span_ptr + 2 * bid + 1).to(tl.int32)
    ntxt = L - vcount  # text rows = real tokens outside the image span
    if HAS_KPM:
        ntxt = 0
        for l0 in range(0, L, BLOCK_L):
            pos = l0 + tl.arange(0, BLOCK_L)
            real = tl.load(kpm_ptr + bid * L + pos, mask=pos < L, other=0) != 0
            outside = (pos < vstart) | (pos >= vstart + vcount)
            ntxt += tl.sum((real & outside).to(tl.int32), axis=0)
    acc_v = tl.zeros([BLOCK], tl.float32)
    acc_t = tl.zeros([BLOCK], tl.float32)
    for s in tl.static_range(SPLIT):  # fixed order: bit-identical reruns
        acc_v += tl.load(part_ptr + ((bid * SPLIT + s) * 2) * VM + col, mask=col < VM, other=0.0)
        acc_t += tl.load(part_ptr + ((bid * SPLIT + s) * 2 + 1) * VM + col, mask=col < VM, other=0.0)
    s_v2v = acc_v / vcount.to(tl.float32)
    s_t2v = tl.where(ntxt > 0, acc_t / tl.maximum(ntxt, 1).to(tl.float32), 1.0)  # no text: neutral factor
    tl.store(out_ptr + bid * VM + col, tl.where(col < vcount, s_v2v * s_t2v, 0.0), mask=col < VM)


def _project(h: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[h @ u | h @ v]`` for h [B, L, D], u/v [D, R] -> float32 [B, L, 2R] in one launch."""
    B, L, D = h.shape
    R = u.shape[1]
    out = torch.empty(B, L, 2 * R, dtype=torch.float32, device=h.device)
    block_r = min(64, pow2(R, 16))
    grid = (cdiv(B * L, 64), 2 * cdiv(R, block_r))
    _project_kernel[grid](
        h, u, v, out, B * L, L, D, R, h.stride(0), h.stride(1), u.stride(0), u.stride(1), v.stride(0), v.stride(1),
        BLOCK_M=64, BLOCK_R=block_r, BLOCK_K=64, IEEE=h.dtype == torch.float32, UPCAST=upcast_dot(h.dtype),
        num_warps=4,
    )
    return out


def lowrank_scores_launch(h, u, v, visual_spans, key_padding_mask, max_visual: int) -> torch.Tensor:
    """Four launches on checked arguments (the body of the custom op ``vtprune::lowrank_scores``)."""
    B, L, _ = h.shape
    R = u.shape[1]
    if h.stride(-1) != 1:
        h = h.contiguous()
    dev = h.device
    ab = _project(h, u, v)  # [B, L, 2R] float32: [a | b]
    spans = to_device_i64(visual_spans, dev)
    kpm = kpm_bytes(key_padding_mask)
    block = 64
    lse_split = split_for(cdiv(L, block), B)
    col_split = split_for(cdiv(max_visual, block), B)
    m = torch.empty(B, lse_split, L, dtype=torch.float32, device=dev)  # partial max per split
    lsum = torch.empty(B, lse_split, L, dtype=torch.float32, device=dev)  # partial sum per split
    part = torch.empty(B, col_split, 2, max_visual, dtype=torch.float32, device=dev)
    out = torch.empty(B, max_visual, dtype=torch.float32, device=dev)
    cfg = dict(BLOCK_M=block, BLOCK_N=block, BLOCK_R=min(32, pow2(R, 16)), IEEE=h.dtype == torch.float32,
               HAS_KPM=kpm is not None, num_warps=4)
    qk_scale = R**-0.5 * LOG2E
    _row_lse_kernel[(cdiv(L, block), lse_split, B)](ab, kpm, spans, m, lsum, L, R, qk_scale,
                                                           SPLIT=lse_split, **cfg)
    _visual_columns_kernel[(cdiv(max_visual, block), col_split, B)](
        ab, kpm, spans, m, lsum, part, L, R, max_visual, qk_scale, SPLIT=col_split, LSE_SPLIT=lse_split, **cfg
    )
    _finish_kernel[(cdiv(max_visual, 256), B)](part, kpm, spans, out, L, max_visual, HAS_KPM=kpm is not None,
                                                      SPLIT=col_split, BLOCK=256, BLOCK_L=1024, num_warps=4)
    return out


def lowrank_scores(h, u, v, *, visual_spans, key_padding_mask=None):
    """Triton backend of :func:`vtprune.ops.lowrank_scores` (arguments checked there).

    Under ``torch.compile`` it runs as the custom op ``torch.ops.vtprune.lowrank_scores``; in eager mode it
    launches directly. The output width: the largest visual count of CPU spans, ``L`` for spans on the device.
    """
    return call(torch.ops.vtprune.lowrank_scores, lowrank_scores_launch, h, u, v, visual_spans, key_padding_mask,
                host_max(visual_spans, h.shape[1]))
