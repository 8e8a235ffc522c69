"""Reference attention scores vs a float64 materialised softmax, written plainly per batch row."""

import pytest
import torch

from utils import DTYPES, SCORE_ATOL, left_padding_mask, random_spans
from vtprune.ops import attention_scores, attention_with_scores


def truth(q, k, v, qspans, kspans, causal, kpm, scale):
    """Float64 ground truth: full L x L softmax per head, then the span means of docs/ops.md#attention_scores."""
    B, H, L, d = q.shape
    g = H // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    kmax = int(kspans[:, 1].max())
    scores = torch.zeros(B, kmax, dtype=torch.float64)
    out = torch.zeros(B, H, L, v.shape[-1], dtype=torch.float64) if v is not None else None
    for b in range(B):
        allowed = torch.ones(L, L, dtype=torch.bool)
        if causal:
            allowed &= torch.ones(L, L, dtype=torch.bool).tril()
        if kpm is not None:
            allowed &= kpm[b][None, :]
        acc = torch.zeros(L, dtype=torch.float64)
        for h in range(H):
            logits = q[b, h].double() @ k[b, h // g].double().T * scale
            logits = logits.masked_fill(~allowed, float("-inf"))
            p = torch.softmax(logits, -1).nan_to_num(0.0)  # rows with no valid key -> 0
            qs, qc = qspans[b].tolist()
            acc += p[qs : qs + qc].sum(0)
            if out is not None:
                out[b, h] = p @ v[b, h // g].double()
        ks, kc = kspans[b].tolist()
        scores[b, :kc] = acc[ks : ks + kc] / (H * qspans[b, 1])
    return out, scores


CASES = [
    # B, H, Hkv, L, d, causal, padded
    (1, 2, 2, 1, 8, True, False),
    (2, 4, 2, 7, 16, True, True),
    (3, 4, 1, 33, 8, False, True),
    (2, 6, 3, 20, 4, True, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Hkv,L,d,causal,padded", CASES)
def test_scores_match_float64(B, H, Hkv, L, d, causal, padded, dtype):
    gen = torch.Generator().manual_seed(B * 100 + L)
    q = torch.randn(B, H, L, d, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, L, d, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, L, d, generator=gen).to(dtype)
    qspans, kspans = random_spans(B, L, gen), random_spans(B, L, gen)
    kpm = left_padding_mask(B, L, [min(b, L - 1) for b in range(B)]) if padded else None
    scale = None if d != 16 else 0.3
    got = attention_scores(q, k, query_spans=qspans, key_spans=kspans, causal=causal,
                           key_padding_mask=kpm, scale=scale, backend="reference")
    want_out, want = truth(q, k, v, qspans, kspans, causal, kpm, scale)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=SCORE_ATOL[dtype], rtol=1e-4)

    out, got2 = attention_with_scores(q, k, v, query_spans=qspans, key_spans=kspans, causal=causal,
                                      key_padding_mask=kpm, scale=scale, backend="reference")
    torch.testing.assert_close(got2.double(), want, atol=SCORE_ATOL[dtype], rtol=1e-4)
    assert out.dtype == dtype and not torch.isnan(out).any()
    # the output is rounded to the input dtype once: allow one rounding step of that dtype
    atol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.double(), want_out, atol=atol, rtol=atol)


def test_scores_of_a_full_span_sum_to_one():
    """Non-causal, no padding, key span = the whole sequence: every query row's probabilities sum to 1."""
    q, k = torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8)
    spans = torch.tensor([[0, 9], [0, 9]])
    s = attention_scores(q, k, query_spans=torch.tensor([[3, 4], [0, 1]]), key_spans=spans, causal=False)
    torch.testing.assert_close(s.sum(1), torch.ones(2))


def test_zero_past_each_rows_key_count_and_gqa_counts_every_head():
    q, k = torch.randn(2, 4, 10, 8), torch.randn(2, 1, 10, 8)
    s = attention_scores(q, k, query_spans=torch.tensor([[0, 10], [0, 10]]),
                         key_spans=torch.tensor([[2, 3], [1, 8]]), causal=True)
    assert s.shape == (2, 8) and (s[0, 3:] == 0).all() and (s[0, :3] > 0).all()
    # GQA with one KV head equals MHA with the KV head repeated
    s_rep = attention_scores(q, k.expand(2, 4, 10, 8), query_spans=torch.tensor([[0, 10], [0, 10]]),
                             key_spans=torch.tensor([[2, 3], [1, 8]]), causal=True)
    torch.testing.assert_close(s, s_rep)


def test_query_row_without_valid_key_contributes_zero():
    """Causal + left padding: a padded query row sees no real key; it adds 0 but counts in the mean."""
    q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    kpm = left_padding_mask(1, 5, [2])
    spans = torch.tensor([[0, 5]])
    s = attention_scores(q, k, query_spans=spans, key_spans=spans, causal=True, key_padding_mask=kpm)
    assert not torch.isnan(s).any()
    torch.testing.assert_close(s.sum(), torch.tensor(3 / 5))  # 3 real rows of 5, each summing to 1
    assert (s[0, :2] == 0).all()
