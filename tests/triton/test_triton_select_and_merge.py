"""Triton select_and_merge (top-k -> merge, fused on the device) vs the reference and vs its two steps."""

import pytest
import torch

pytest.importorskip("triton.language", reason="Triton is not installed (pip install 'vtprune[triton]')")

from utils import DTYPES  # noqa: E402
from vtprune.ops import contextual_merge, select_and_merge, topk_keep_order  # noqa: E402

TOKEN_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.float16: dict(atol=1e-3, rtol=1e-3),
             torch.bfloat16: dict(atol=1e-2, rtol=8e-3)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,D,k,C,lengths,integer_scores", [
    (2, 40, 16, 6, 5, [40, 31], False),
    (3, 70, 24, 1, 9, [70, 12, 33], True),  # tied scores; several position tiles of the merge
    (1, 9, 8, 9, 0, None, False),  # k = N, nothing to merge
    (2, 11, 8, 4, 7, None, True),  # C = n: every non-kept token is a target
])
def test_matches_reference(B, N, D, k, C, lengths, integer_scores, dtype, device, poison):
    gen = torch.Generator().manual_seed(N * 3 + k)
    scores = torch.randint(0, 4, (B, N), generator=gen).float() if integer_scores else torch.rand(B, N, generator=gen)
    x = torch.randn(B, N, D, generator=gen).to(dtype)
    metric = torch.randn(B, N, 8, generator=gen).to(dtype)
    lengths = None if lengths is None else torch.tensor(lengths)
    dev = [t.to(device) for t in (scores, x, metric)]
    tokens, keep, targets = (t.cpu() for t in select_and_merge(*dev, k, C, lengths=lengths, backend="triton"))
    want = select_and_merge(scores, x, metric, k, C, lengths=lengths, backend="reference")
    assert torch.equal(keep, want[1]) and torch.equal(targets, want[2])
    assert tokens.dtype == dtype and tokens.shape == (B, k + C, x.shape[-1])
    torch.testing.assert_close(tokens, want[0], **TOKEN_TOL[dtype])

    # the fused path is exactly its two steps
    keep2 = topk_keep_order(dev[0], k, lengths=lengths, backend="triton")
    assert torch.equal(keep2.cpu(), keep)
    assert torch.equal(contextual_merge(dev[1], dev[2], keep2, C, lengths=lengths, backend="triton").cpu(), tokens)
