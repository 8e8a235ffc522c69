"""Triton ALVTS selector scores (DESIGN §3.4): a low-rank single-head attention, never materialising ``L x L``.

``a = h U``, ``b = h V`` (``[B, L, R]``), ``s = a b^T / sqrt(R)`` causal with key padding, and for visual key
``j``: ``S_V2V[j] = mean_{i visual} exp(s_ij - lse_i)``, ``S_T2V[j] = mean_{i text} exp(s_ij - lse_i)``,
``S = S_V2V * S_T2V`` (``S_T2V = 1`` for a row without text). Three launches:

* :func:`_project_kernel`: ``h @ W`` for ``W = U`` then ``V``, fp32 accumulation, fp32 output. The projections
  are tiny GEMMs (``D x R``) that read ``h`` in its own dtype on the tensor cores; keeping ``a, b`` in fp32
  costs ``2 L R`` floats and keeps the logits as exact as the reference's.
* :func:`_row_lse_kernel`: log-sum-exp (base 2) of every query row at or after the image start. Rows before
  the image cannot see a visual key (causal), so their LSE is never needed and their tiles do no work.
* :func:`_visual_columns_kernel`: one program per (visual key tile, batch row) loops over the query rows that
  can see the tile (``i >= j``), accumulating visual-row and text-row column sums separately, then applies
  the means and the product in the epilogue. No atomics: each output column has one owner.

The ``L^2 R`` dots run on float32 ``a, b``: IEEE products for float32 inputs, 3xTF32 tensor-core products
for fp16/bf16 inputs (float32-grade logits; plain TF32 would cost ~1e-3 relative, 3xTF32 costs ~3x its
time, still ~1% of the layer at LLaVA-NeXT's L ~ 3k). ``R`` is looped in 16..64-wide chunks so R = 256
(LLaVA) does not need a 256-wide register tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtprune.reference._common import host_max
from vtprune.triton_kernels._common import mma, pow2, to_device_i64, upcast_dot
from vtprune.triton_kernels.attention_scores import LOG2E, key_ok, kpm_bytes, online_softmax_step


@triton.jit
def _project_kernel(
    h_ptr, w_ptr, out_ptr, M, L, D, R, shb, shl, swd, swr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    # grid: (row tiles of the B*L rows, column tiles of R); out [M, R] float32 contiguous
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok, col_ok = rows < M, cols < R
    # h may be a strided [B, L, D] view: address row (b, l) through its own strides
    hrow = (rows // L).to(tl.int64) * shb + (rows % L).to(tl.int64) * shl
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(h_ptr + hrow[:, None] + k[None, :], mask=row_ok[:, None] & (k[None, :] < D), other=0.0)
        w = tl.load(w_ptr + k[:, None] * swd + cols[None, :] * swr,
                    mask=(k[:, None] < D) & col_ok[None, :], other=0.0)
        acc += mma(x, w, IEEE, UPCAST)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * R + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _logits(a_ptr, b_ptr, base, i, i_ok, j, j_ok, R, qk_scale,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    """``a[i] . b[j] * qk_scale`` as a [BLOCK_M, BLOCK_N] tile, looping over R in BLOCK_R chunks."""
    s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        a = tl.load(a_ptr + base + i[:, None] * R + r[None, :], mask=i_ok[:, None] & (r[None, :] < R), other=0.0)
        b = tl.load(b_ptr + base + j[None, :] * R + r[:, None], mask=j_ok[None, :] & (r[:, None] < R), other=0.0)
        if IEEE:
            s += tl.dot(a, b, input_precision="ieee")
        else:  # 3xTF32: float32-grade logits on the tensor cores, ~3x a plain TF32 dot (still tiny at L^2 R)
            s += tl.dot(a, b, input_precision="tf32x3")
    return s * qk_scale


@triton.jit
def _row_lse_kernel(
    a_ptr, b_ptr, kpm_ptr, span_ptr, lse_ptr, L, R, qk_scale,
    HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr,
):
    # grid: (query tiles, B); lse [B, L] float32, log2 units, +inf for a row without a valid key
    m0 = tl.program_id(0) * BLOCK_M
    bid = tl.program_id(1).to(tl.int64)
    vstart = tl.load(span_ptr + 2 * bid).to(tl.int32)
    i = m0 + tl.arange(0, BLOCK_M)
    i_ok = (i < L) & (i >= vstart)
    base = bid * L * R
    # causal: keys up to the tile's last row; a tile wholly before the image has nothing to do
    hi = tl.minimum(m0 + BLOCK_M, L) * (m0 + BLOCK_M > vstart).to(tl.int32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lsum = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        s = _logits(a_ptr, b_ptr, base, i, i_ok, j, j < L, R, qk_scale, BLOCK_M, BLOCK_N, BLOCK_R, IEEE)
        allowed = i_ok[:, None] & key_ok(kpm_ptr, bid, j, L, HAS_KPM)[None, :] & (j[None, :] <= i[:, None])
        m, lsum, _, _ = online_softmax_step(tl.where(allowed, s, float("-inf")), m, lsum)
    lse = tl.where(lsum > 0, m + tl.log2(tl.where(lsum > 0, lsum, 1.0)), float("inf"))
    tl.store(lse_ptr + bid * L + i, lse, mask=i_ok)


@triton.jit
def _visual_columns_kernel(
    a_ptr, b_ptr, kpm_ptr, span_ptr, ntxt_ptr, lse_ptr, out_ptr, L, R, VM, qk_scale,
    HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    IEEE: tl.constexpr,
):
    # grid: (visual key tiles, B); out [B, VM] float32
    n0 = tl.program_id(0) * BLOCK_N
    bid = tl.program_id(1).to(tl.int64)
    vstart = tl.load(span_ptr + 2 * bid).to(tl.int32)
    vcount = tl.load(span_ptr + 2 * bid + 1).to(tl.int32)
    col = n0 + tl.arange(0, BLOCK_N)
    col_ok = col < vcount
    j = vstart + col  # [BLOCK_N] key positions
    kok = col_ok & key_ok(kpm_ptr, bid, j, L, HAS_KPM)
    base = bid * L * R
    # queries before the tile's first key see none of it (causal); a tile past the count has no rows
    lo = vstart + n0
    hi = L * (n0 < vcount).to(tl.int32)
    acc_v = tl.zeros([BLOCK_N], tl.float32)
    acc_t = tl.zeros([BLOCK_N], tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        i = m0 + tl.arange(0, BLOCK_M)
        i_ok = i < L
        lse = tl.load(lse_ptr + bid * L + i, mask=i_ok, other=float("inf"))
        s = _logits(a_ptr, b_ptr, base, i, i_ok, j, col_ok, R, qk_scale, BLOCK_M, BLOCK_N, BLOCK_R, IEEE)
        allowed = i_ok[:, None] & kok[None, :] & (j[None, :] <= i[:, None])
        p = tl.exp2(tl.where(allowed, s - lse[:, None], float("-inf")))  # masked before exp: no overflow
        visual = (i >= vstart) & (i < vstart + vcount)
        text = i_ok & ~visual
        if HAS_KPM:  # padding rows are neither visual nor text (the reference's real & ~visual)
            text = text & (tl.load(kpm_ptr + bid * L + i, mask=i_ok, other=0) != 0)
        acc_v += tl.sum(tl.where(visual[:, None], p, 0.0), axis=0)
        acc_t += tl.sum(tl.where(text[:, None], p, 0.0), axis=0)
    ntxt = tl.load(ntxt_ptr + bid)
    s_v2v = acc_v / vcount.to(tl.float32)
    s_t2v = tl.where(ntxt > 0, acc_t / tl.maximum(ntxt, 1).to(tl.float32), 1.0)  # no text: neutral factor
    tl.store(out_ptr + bid * VM + col, tl.where(col_ok, s_v2v * s_t2v, 0.0), mask=col < VM)


def _project(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``h [B, L, D] @ w [D, R]`` -> float32 [B, L, R]."""
    B, L, D = h.shape
    R = w.shape[1]
    out = torch.empty(B, L, R, dtype=torch.float32, device=h.device)
    block_r = min(64, pow2(R, 16))
    grid = (triton.cdiv(B * L, 64), triton.cdiv(R, block_r))
    _project_kernel[grid](
        h, w, out, B * L, L, D, R, h.stride(0), h.stride(1), w.stride(0), w.stride(1),
        BLOCK_M=64, BLOCK_R=block_r, BLOCK_K=64, IEEE=h.dtype == torch.float32, UPCAST=upcast_dot(h.dtype),
        num_warps=4,
    )
    return out


def lowrank_scores_launch(h, u, v, visual_spans, key_padding_mask, max_visual: int) -> torch.Tensor:
    """All three launches on checked arguments (the body of the custom op ``vtprune::lowrank_scores``)."""
    B, L, _ = h.shape
    R = u.shape[1]
    if h.stride(-1) != 1:
        h = h.contiguous()
    dev = h.device
    a, b = _project(h, u), _project(h, v)  # [B, L, R] float32 each
    spans = to_device_i64(visual_spans, dev)
    kpm = kpm_bytes(key_padding_mask)
    # text rows per batch row = real tokens outside the image span: O(B L) on the device, no host sync
    pos = torch.arange(L, device=dev)
    is_text = (pos < spans[:, :1]) | (pos >= spans[:, :1] + spans[:, 1:])
    if key_padding_mask is not None:
        is_text &= key_padding_mask
    ntxt = is_text.sum(1, dtype=torch.int32)
    lse = torch.empty(B, L, dtype=torch.float32, device=dev)
    out = torch.empty(B, max_visual, dtype=torch.float32, device=dev)
    cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_R=min(64, pow2(R, 16)), IEEE=h.dtype == torch.float32,
               HAS_KPM=kpm is not None, num_warps=4)
    qk_scale = R**-0.5 * LOG2E
    _row_lse_kernel[(triton.cdiv(L, 64), B)](a, b, kpm, spans, lse, L, R, qk_scale, **cfg)
    _visual_columns_kernel[(triton.cdiv(max_visual, 64), B)](
        a, b, kpm, spans, ntxt, lse, out, L, R, max_visual, qk_scale, **cfg
    )
    return out


def lowrank_scores(h, u, v, *, visual_spans, key_padding_mask=None):
    """Triton backend of :func:`vtprune.ops.lowrank_scores` (arguments checked there).

    Under ``torch.compile`` it runs as the custom op ``torch.ops.vtprune.lowrank_scores``; in eager mode it
    launches directly. The output width: the largest visual count of CPU spans, ``L`` for spans on the device.
    """
    from vtprune.triton_kernels._routed_ops import call

    return call(torch.ops.vtprune.lowrank_scores, lowrank_scores_launch, h, u, v, visual_spans, key_padding_mask,
                host_max(visual_spans, h.shape[1]))
