"""Triton top-k in original order (docs/ops.md#topk_keep_order): no host sync, no sort.

Rows of up to 4096 scores (:func:`_topk_tiles_kernel`, grid: position tiles x B, enough tiles to fill an
H100 at batch 1): every program holds the whole row in registers and finds the k-th largest key T by the
radix select below (:func:`select_row`), then writes the kept positions of its own tile to their ascending
slots. The select is repeated per program instead of combined across programs: a second launch would cost
more than the select (~3.5 K instructions per warp at 4 warps).

Longer rows (:func:`_topk_kernel`, one program per row) stream the row through a radix select:

1. Scores become order-preserving int32 keys: the float bits, with negative floats' magnitude bits flipped so
   signed integer order is float order; -0.0 is first folded into +0.0 and NaN becomes INT32_MIN, below
   -inf (whose key is INT32_MIN + 0x7FFFFF).
2. Radix select finds the k-th largest key T: four rounds over the 8-bit digits of the key (sign bit flipped,
   so the bytes order like unsigned integers), each a 256-bin histogram of the keys that match the digits
   chosen so far; the round keeps the highest digit whose suffix count still reaches the number of keys
   left to take. Positions at or past ``lengths[b]`` are masked out of every count, so they are never picked.
3. Compaction in position order: every key > T is taken and the first ``need`` keys == T (ties to the lower
   position); exclusive prefix sums give each taken position its output slot, so the output is ascending.

A row of up to 4096 scores stays in registers through the four rounds; longer rows are streamed in tiles
(each round re-reads the row, from L2 at these sizes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import vtprune._library  # noqa: F401  (registers torch.ops.vtprune.<op>)
from vtprune.triton_kernels._common import cdiv, pow2, to_device_i64
from vtprune.triton_kernels._routed_ops import call

SINGLE_TILE_MAX = 4096


@triton.jit
def order_keys(x):
    """float32 -> int32 keys with the same order (NaN lowest, -0.0 == +0.0)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(x != x, -2147483648, key)


@triton.jit
def _row_keys(scores_ptr, row, offs, length):
    """Keys of positions ``offs`` of one row and their validity (``offs < length``)."""
    valid = offs < length
    x = tl.load(scores_ptr + row + offs, mask=valid, other=0.0).to(tl.float32)  # fp16/bf16 -> fp32 is exact
    return order_keys(x), valid


@triton.jit
def _digit_histogram(key, valid, prefix, SHIFT: tl.constexpr):
    """Counts [256] of digit ``SHIFT`` among valid keys whose higher digits equal ``prefix``'s."""
    biased = key ^ -2147483648  # sign bit flipped: bytes now order like unsigned integers
    match = valid
    if SHIFT < 24:
        match = match & ((biased >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
    return tl.histogram((biased >> SHIFT) & 0xFF, 256, mask=match)


@triton.jit
def select_row(row_ptr, length, K, NB: tl.constexpr):
    """int32 [NB] flags of the ``K`` largest of ``row_ptr[0:length]`` (1 = kept; ties to the lower position).

    T, the K-th largest key, by the radix select of :func:`_topk_kernel` on a row held in registers (four
    256-bin histogram rounds); every key > T is kept, and the first ``K - #(keys > T)`` keys == T in
    position order.
    """
    offs = tl.arange(0, NB)
    key, valid = _row_keys(row_ptr, 0, offs, length)
    digits = tl.arange(0, 256)
    prefix = tl.zeros([], tl.int32)  # biased bits of T chosen so far
    remaining = K  # how many keys >= the current prefix are still to be taken
    for rnd in tl.static_range(4):
        hist = _digit_histogram(key, valid, prefix, 24 - 8 * rnd)
        at_least = tl.cumsum(hist, 0, reverse=True)  # [256] keys with this digit or a higher one
        chosen = tl.sum((at_least >= remaining).to(tl.int32), 0) - 1
        remaining -= tl.sum(tl.where(digits > chosen, hist, 0), 0)
        prefix = prefix | (chosen << (24 - 8 * rnd))
    threshold = prefix ^ -2147483648
    eq = (valid & (key == threshold)).to(tl.int32)
    return ((valid & (key > threshold)) | ((eq != 0) & (tl.cumsum(eq, 0) - eq < remaining))).to(tl.int32)


@triton.jit
def _topk_tiles_kernel(scores_ptr, lengths_ptr, out_ptr, N, K, HAS_LENGTHS: tl.constexpr, NB: tl.constexpr,
                       TILE: tl.constexpr):
    # grid: (position tiles of TILE, B)
    lo = tl.program_id(0) * TILE
    b = tl.program_id(1).to(tl.int64)
    length = N
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + b).to(tl.int32)
    kept = select_row(scores_ptr + b * N, length, K, NB)
    offs = tl.arange(0, NB)
    slot = tl.cumsum(kept, 0) - kept  # kept positions before: the output stays ascending
    mine = (kept != 0) & (offs >= lo) & (offs < lo + TILE)
    tl.store(out_ptr + b * K + slot, offs.to(tl.int64), mask=mine)


@triton.jit
def _topk_kernel(scores_ptr, lengths_ptr, out_ptr, N, K,
                 HAS_LENGTHS: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    # grid: (B,)
    b = tl.program_id(0).to(tl.int64)
    row = b * N
    length = N
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + b).to(tl.int32)
    offs = tl.arange(0, BLOCK)
    digits = tl.arange(0, 256)
    if SINGLE:
        key, valid = _row_keys(scores_ptr, row, offs, length)  # [BLOCK], kept in registers

    prefix = tl.zeros([], tl.int32)  # biased bits of T chosen so far
    remaining = K  # how many keys >= the current prefix are still to be taken
    for rnd in tl.static_range(4):  # digit shifts 24, 16, 8, 0 (compile-time)
        if SINGLE:
            hist = _digit_histogram(key, valid, prefix, 24 - 8 * rnd)
        else:
            hist = tl.zeros([256], tl.int32)
            for t0 in range(0, N, BLOCK):
                tkey, tvalid = _row_keys(scores_ptr, row, t0 + offs, length)
                hist += _digit_histogram(tkey, tvalid, prefix, 24 - 8 * rnd)
        at_least = tl.cumsum(hist, 0, reverse=True)  # [256] keys with this digit or a higher one
        chosen = tl.sum((at_least >= remaining).to(tl.int32), 0) - 1  # suffix counts only decrease
        remaining -= tl.sum(tl.where(digits > chosen, hist, 0), 0)
        prefix = prefix | (chosen << (24 - 8 * rnd))
    threshold = prefix ^ -2147483648  # T as a signed key

    # every key > T is taken, and the first `remaining` keys == T in position order
    eq_before = tl.zeros([], tl.int32)
    taken_before = tl.zeros([], tl.int32)
    for t0 in range(0, N, BLOCK):
        pos = t0 + offs
        if not SINGLE:
            key, valid = _row_keys(scores_ptr, row, pos, length)
        eq = (valid & (key == threshold)).to(tl.int32)
        eq_rank = tl.cumsum(eq, 0) - eq + eq_before
        take = (valid & (key > threshold)) | ((eq != 0) & (eq_rank < remaining))
        take_i = take.to(tl.int32)
        slot = tl.cumsum(take_i, 0) - take_i + taken_before  # exclusive prefix: ascending output
        tl.store(out_ptr + b * K + slot, pos.to(tl.int64), mask=take)
        eq_before += tl.sum(eq, 0)
        taken_before += tl.sum(take_i, 0)


def topk_config(N: int) -> dict:
    """One register tile for rows up to 4096 scores, else 4096-wide tiles streamed per round.

    About 32 keys per thread: wider tiles or fewer warps spill on sm_90 (ptxas report).
    """
    single = N <= SINGLE_TILE_MAX
    block = pow2(N, 16) if single else SINGLE_TILE_MAX
    return dict(BLOCK=block, SINGLE=single, num_warps=min(16, max(4, block // 128)))


def tiles_config(N: int, B: int) -> int:
    """Positions per program: the largest power of two (16 to the row) that still gives >= 132 programs."""
    tile = 16
    while tile < N and cdiv(N, 2 * tile) * B >= 132:
        tile *= 2
    return tile


def topk_keep_order_launch(scores: torch.Tensor, k: int, lengths: torch.Tensor | None) -> torch.Tensor:
    """Launch on prepared arguments (the body of the custom op ``vtprune::topk_keep_order``)."""
    B, N = scores.shape
    scores = scores.contiguous()  # [B, N]
    out = torch.empty(B, k, dtype=torch.int64, device=scores.device)  # [B, k]
    if B == 0:
        return out
    lengths = to_device_i64(lengths, scores.device)
    if N <= SINGLE_TILE_MAX:
        nb = pow2(N, 16)
        tile = tiles_config(N, B)
        _topk_tiles_kernel[(cdiv(N, tile), B)](scores, lengths, out, N, k, HAS_LENGTHS=lengths is not None, NB=nb,
                                               TILE=tile, num_warps=8)
        return out
    _topk_kernel[(B,)](
        scores, lengths, out, N, k, HAS_LENGTHS=lengths is not None,
        **topk_config(N),
    )
    return out


def topk_keep_order(scores, k, *, lengths=None):
    """Triton backend of :func:`vtprune.ops.topk_keep_order` (arguments checked there).

    Under ``torch.compile`` it runs as the custom op ``torch.ops.vtprune.topk_keep_order``; in eager mode it launches
    directly (one dispatch layer).
    """
    return call(torch.ops.vtprune.topk_keep_order, topk_keep_order_launch, scores, int(k), lengths)
