"""Pass 2 of attention_scores adds the KV heads' partials itself: the last of a key tile's KV-head programs
to arrive (an arrival counter per batch row and key tile) sums them in head order.

Checked against the reference with several KV heads (GQA and not, two batch rows with different spans), for
bit-identical reruns, and for the counters being back at zero after each launch (the next launch on the
stream counts from there). Under the interpreter programs run one after another; on a GPU the same test
exercises the hand-off between programs.
"""

import pytest
import torch

pytest.importorskip("triton.language", reason="Triton is not installed (pip install 'vtprune[triton]')")

import vtprune.triton_kernels.attention_scores as AS  # noqa: E402
from vtprune.ops import attention_scores  # noqa: E402


@pytest.mark.parametrize("H,Hkv,causal", [(4, 4, True), (6, 3, False), (4, 2, True)])
def test_heads_summed_in_kernel_match_and_rerun_identically(H, Hkv, causal, spy_calls, device, poison):
    gen = torch.Generator().manual_seed(H * 7 + Hkv)
    B, L, d = 2, 150, 16
    q, k = torch.randn(B, H, L, d, generator=gen), torch.randn(B, Hkv, L, d, generator=gen)
    kw = dict(query_spans=torch.tensor([[10, 120], [30, 90]]), key_spans=torch.tensor([[10, 120], [5, 140]]),
              causal=causal)
    calls = spy_calls(AS, "column_scores")
    want = attention_scores(q, k, backend="reference", **kw)
    first = attention_scores(q.to(device), k.to(device), backend="triton", **kw)
    assert calls, "pass 2 was not launched"
    torch.testing.assert_close(first.cpu(), want, rtol=1e-4, atol=1e-6)
    counters = AS.arrival_counters(torch.device(device), 1)
    assert int(counters.abs().sum()) == 0, "a counter was left non-zero"
    for _ in range(2):
        again = attention_scores(q.to(device), k.to(device), backend="triton", **kw)
        assert torch.equal(again.cpu(), first.cpu())
