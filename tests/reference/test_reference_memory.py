"""The reference ops (the CPU path) bound their memory: no [L, L] block per head, chunked over query rows, with
results equal to the unchunked computation (issue 11, item 5).

The largest tensor any aten op produces during a call is recorded with a dispatch mode; with the chunk budget
set small, no intermediate may exceed max(budget, the largest input/output tensor).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vtprune.reference import _common
from vtprune.reference.attention_scores import attention_scores
from vtprune.reference.attention_with_scores import attention_with_scores
from vtprune.reference.lowrank_scores import lowrank_scores


class LargestOutput(TorchDispatchMode):
    """Largest storage (bytes) any op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


B, H, HKV, L, D = 2, 4, 2, 512, 8
SPAN = torch.tensor([[5, 300], [0, 512]])
KEYS = torch.tensor([[5, 300], [40, 200]])


def inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, L, D, generator=g) for h in (H, HKV, HKV))
    kpm = torch.ones(B, L, dtype=torch.bool)
    kpm[0, :5] = False  # left padding in row 0
    h = torch.randn(B, L, 32, generator=g)
    u, w = torch.randn(32, 8, generator=g) * 0.3, torch.randn(32, 8, generator=g) * 0.3
    return q, k, v, kpm, h, u, w


def calls():
    q, k, v, kpm, h, u, w = inputs()
    kw = dict(query_spans=SPAN, key_spans=KEYS, causal=True, key_padding_mask=kpm)
    return {
        "attention_scores": (lambda: attention_scores(q, k, **kw), (q, k)),
        "attention_with_scores": (lambda: attention_with_scores(q, k, v, **kw), (q, k, v)),
        "lowrank_scores": (lambda: lowrank_scores(h, u, w, visual_spans=SPAN, key_padding_mask=kpm), (h,)),
    }


def largest(fn):
    with LargestOutput() as mode:
        fn()
    return mode.largest


@pytest.mark.parametrize("op", ["attention_scores", "attention_with_scores", "lowrank_scores"])
def test_no_intermediate_exceeds_the_chunk_budget(monkeypatch, op):
    fn, tensors = calls()[op]
    # float32 copies of the inputs (K/V heads expanded to the query heads) are allowed; blocks of 4 query rows
    io = max(t.numel() * 4 * (H // t.shape[1] if t.dim() == 4 else 1) for t in tensors)
    budget = 4 * B * L * 4
    monkeypatch.setattr(_common, "_CHUNK_BYTES", budget)
    bound = max(budget, io)
    assert bound < B * L * L * 4 // 8  # the bound is far below one [B, L, L] block
    assert largest(fn) <= bound
    # the measurement can fail: unchunked, the same call materialises at least one [B, L, L] float32 block
    monkeypatch.setattr(_common, "_CHUNK_BYTES", 1 << 40)
    assert largest(fn) >= B * L * L * 4


@pytest.mark.parametrize("budget", [4 * B * L * 4, 3 * B * L * 4 + 8])  # 4 rows, 3 rows (not a divisor of L)
@pytest.mark.parametrize("op", ["attention_scores", "attention_with_scores", "lowrank_scores"])
def test_chunked_equals_unchunked(monkeypatch, op, budget):
    monkeypatch.setattr(_common, "_CHUNK_BYTES", 1 << 40)
    expected = calls()[op][0]()
    monkeypatch.setattr(_common, "_CHUNK_BYTES", budget)
    got = calls()[op][0]()
    as_tuple = lambda x: x if isinstance(x, tuple) else (x,)
    for a, b in zip(as_tuple(got), as_tuple(expected)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # float32 summation order


def test_blocks_rule():
    assert _common.blocks(1, 32, 100, 100)[0] > 1  # whole heads when a head's rows fit
    old = _common._CHUNK_BYTES
    try:
        _common._CHUNK_BYTES = 4 * 100 * 10
        assert _common.blocks(1, 8, 100, 100) == (1, 10)
        assert _common.blocks(1, 8, 5, 100) == (2, 5)
        _common._CHUNK_BYTES = 1
        assert _common.blocks(2, 8, 100, 100) == (1, 1)  # never below one row of one head
    finally:
        _common._CHUNK_BYTES = old
