"""``attention_scores`` and ``attention_with_scores`` on every backend against the float64 truth of
docs/ops.md#attention_scores (tests/ops/truths.py), plus the output's error against PyTorch's own SDPA."""

import pytest
import torch
import torch.nn.functional as F
from backends import require
from truths import attention

from utils import DTYPES, SCORE_ATOL, left_padding_mask, random_spans
from vtprune.ops import attention_scores, attention_with_scores

# the attention output is rounded to the input dtype once: one rounding step of that dtype
OUT_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_inputs(B, H, Hkv, L, d, dtype, seed, pads=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, d, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, L, d, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, L, d, generator=gen).to(dtype)
    kpm = None if pads is None else left_padding_mask(B, L, pads)
    return q, k, v, kpm, gen


def run(q, k, v, qspans, kspans, causal, kpm, scale, backend, device):
    """(scores, out, scores of the fused call) of ``backend`` with the data on ``device`` (spans on the CPU),
    back on the CPU."""
    dev = [t.to(device) if t is not None else None for t in (q, k, v, kpm)]
    kw = dict(
        query_spans=qspans, key_spans=kspans, causal=causal, key_padding_mask=dev[3], scale=scale, backend=backend
    )
    s = attention_scores(dev[0], dev[1], **kw)
    out, s2 = attention_with_scores(dev[0], dev[1], dev[2], **kw)
    return s.cpu(), out.cpu(), s2.cpu()


# B, H, Hkv, L, d, causal, padded: one token, GQA 4/2 with a custom scale, GQA 4/1 non-causal, 6/3 heads
SMALL_CASES = [
    (1, 2, 2, 1, 8, True, False),
    (2, 4, 2, 7, 16, True, True),
    (3, 4, 1, 33, 8, False, True),
    (2, 6, 3, 20, 4, True, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Hkv,L,d,causal,padded", SMALL_CASES)
def test_scores_and_output_match_float64(B, H, Hkv, L, d, causal, padded, dtype, backend, device, poison):
    gen = torch.Generator().manual_seed(B * 100 + L)
    q = torch.randn(B, H, L, d, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, L, d, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, L, d, generator=gen).to(dtype)
    qspans, kspans = random_spans(B, L, gen), random_spans(B, L, gen)
    kpm = left_padding_mask(B, L, [min(b, L - 1) for b in range(B)]) if padded else None
    scale = None if d != 16 else 0.3
    got, out, got2 = run(q, k, v, qspans, kspans, causal, kpm, scale, backend, device)
    want_out, want = attention(q, k, v, qspans, kspans, causal, kpm, scale)
    assert got.dtype == torch.float32 and got.shape == want.shape
    for s in (got, got2):
        torch.testing.assert_close(s.double(), want, atol=SCORE_ATOL[dtype], rtol=1e-4)
    assert out.dtype == dtype and not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), want_out, atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])


def test_scores_of_a_full_span_sum_to_one(backend, device):
    """Non-causal, no padding, key span = the whole sequence: every query row's probabilities sum to 1."""
    q, k = torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8)
    spans = torch.tensor([[0, 9], [0, 9]])
    s = attention_scores(
        q.to(device),
        k.to(device),
        query_spans=torch.tensor([[3, 4], [0, 1]]),
        key_spans=spans,
        causal=False,
        backend=backend,
    )
    torch.testing.assert_close(s.cpu().sum(1), torch.ones(2))


def test_zero_past_each_rows_key_count_and_gqa_counts_every_head(backend, device):
    q, k = torch.randn(2, 4, 10, 8, device=device), torch.randn(2, 1, 10, 8, device=device)
    kw = dict(
        query_spans=torch.tensor([[0, 10], [0, 10]]),
        key_spans=torch.tensor([[2, 3], [1, 8]]),
        causal=True,
        backend=backend,
    )
    s = attention_scores(q, k, **kw)
    assert s.shape == (2, 8) and (s[0, 3:] == 0).all() and (s[0, :3] > 0).all()
    # GQA with one KV head equals MHA with the KV head repeated
    torch.testing.assert_close(s, attention_scores(q, k.expand(2, 4, 10, 8), **kw))


def test_query_row_without_valid_key_contributes_zero(backend, device):
    """Causal + left padding: a padded query row sees no real key; it adds 0 but counts in the mean."""
    q, k = torch.randn(1, 2, 5, 4, device=device), torch.randn(1, 2, 5, 4, device=device)
    kpm = left_padding_mask(1, 5, [2]).to(device)
    spans = torch.tensor([[0, 5]])
    s = attention_scores(
        q, k, query_spans=spans, key_spans=spans, causal=True, key_padding_mask=kpm, backend=backend
    ).cpu()
    assert not torch.isnan(s).any()
    torch.testing.assert_close(s.sum(), torch.tensor(3 / 5))  # 3 real rows of 5, each summing to 1
    assert (s[0, :2] == 0).all()


# B, H, Hkv, L, d, causal, pads: GQA 4/2 and 4/1, MHA, left padding, odd lengths, d not a power of two, and
# L = 150 for several key tiles and packed-row tiles (causal tile skipping in both passes)
CASES = [
    (1, 2, 2, 1, 16, True, None),
    (2, 4, 2, 7, 16, True, [0, 3]),
    (3, 4, 1, 33, 24, False, [0, 5, 32]),
    (2, 4, 4, 33, 8, True, [2, 0]),
    (2, 4, 2, 150, 16, True, [0, 70]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Hkv,L,d,causal,pads", CASES)
def test_random_spans_match_float64(B, H, Hkv, L, d, causal, pads, dtype, backend, device, poison):
    q, k, v, kpm, gen = make_inputs(B, H, Hkv, L, d, dtype, seed=L * 10 + B, pads=pads)
    qspans, kspans = random_spans(B, L, gen), random_spans(B, L, gen)
    scale = 0.3 if d == 24 else None
    got, _, got2 = run(q, k, v, qspans, kspans, causal, kpm, scale, backend, device)
    _, want = attention(q, k, v, qspans, kspans, causal, kpm, scale)
    assert got.dtype == torch.float32 and got.shape == want.shape
    for s in (got, got2):
        torch.testing.assert_close(s.double(), want, atol=SCORE_ATOL[dtype], rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("last_count", [1, 5])
def test_single_query_rows_and_spans_at_the_end(H, Hkv, last_count, dtype, backend, device, poison):
    """CLIP's [CLS] row and a last-token query, spans ending at the last position.

    With every query count 1 the packed rows per KV group are G = 1, 2 or 4: Triton's CUDA-core small-M path.
    """
    B, L, d = 3, 33, 16
    q, k, v, kpm, _ = make_inputs(B, H, Hkv, L, d, dtype, seed=7, pads=[0, 0, 4])
    qspans = torch.tensor([[0, 1], [L - 1, 1], [L - last_count, last_count]])
    kspans = torch.tensor([[1, L - 1], [L - 3, 3], [4, L - 4]])
    for causal in (False, True):
        got, _, got2 = run(q, k, v, qspans, kspans, causal, kpm, None, backend, device)
        _, want = attention(q, k, v, qspans, kspans, causal, kpm, None)
        torch.testing.assert_close(got.double(), want, atol=SCORE_ATOL[dtype], rtol=1e-4)
        torch.testing.assert_close(got2.double(), want, atol=SCORE_ATOL[dtype], rtol=1e-4)
        assert (got[1, 3:] == 0).all() and (got[0, L - 1 :] == 0).all()  # zero past each row's count


def test_rows_without_a_valid_key_contribute_zero_and_output_zeros(backend, device, poison):
    """Causal + left padding: query rows inside the padding see no key; the mean still divides by |Qs|."""
    B, H, L, d = 1, 2, 9, 16
    q, k, v, kpm, _ = make_inputs(B, H, H, L, d, torch.float32, seed=3, pads=[4])
    qspans, kspans = torch.tensor([[0, 9]]), torch.tensor([[0, 9]])
    got, out, _ = run(q, k, v, qspans, kspans, True, kpm, None, backend, device)
    want_out, want = attention(q, k, v, qspans, kspans, True, kpm, None)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    assert float(got.sum()) == pytest.approx(5 / 9, rel=1e-5)  # 5 of 9 query rows have keys, each sums to 1
    assert (out[:, :, :4] == 0).all() and not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)


def rows_with_a_key(kpm, B, L, causal):
    """bool [B, L]: query rows with at least one valid key (causal: a real key at or before the row)."""
    if kpm is None:
        return torch.ones(B, L, dtype=torch.bool)
    return kpm.cumsum(1) > 0 if causal else kpm.any(1, keepdim=True).expand(B, L)


def low_precision_error(q, k, v, causal, kpm, rows_ok, want_out):
    """Max error of PyTorch's own SDPA run in q's dtype, over rows that have a valid key."""
    g = q.shape[1] // k.shape[1]
    L = q.shape[2]
    allowed = torch.ones(q.shape[0], 1, L, L, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool).tril()
    if kpm is not None:
        allowed = allowed & kpm[:, None, None, :]
    pt = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=allowed)
    return float((pt.double() - want_out)[rows_ok].abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Hkv,L,d,causal,pads", CASES[1:])
def test_output_within_twice_pytorchs_error(B, H, Hkv, L, d, causal, pads, dtype, backend, device, poison):
    """The 2x rule: error vs float64 at most 2x that of PyTorch's SDPA in the same precision (+1e-6)."""
    q, k, v, kpm, gen = make_inputs(B, H, Hkv, L, d, dtype, seed=L + d, pads=pads)
    qspans = kspans = random_spans(B, L, gen)
    _, out, _ = run(q, k, v, qspans, kspans, causal, kpm, None, backend, device)
    want_out, _ = attention(q, k, v, qspans, kspans, causal, kpm, None)
    assert out.dtype == dtype and out.shape == (B, H, L, d)
    rows_ok = rows_with_a_key(kpm, B, L, causal)[:, None, :].expand(B, H, L)
    assert (out[~rows_ok] == 0).all()
    err = float((out.double() - want_out)[rows_ok].abs().max())
    pt_err = low_precision_error(q, k, v, causal, kpm, rows_ok, want_out)
    assert err <= 2 * pt_err + 1e-6, f"error {err:.3g} > 2 x PyTorch's {pt_err:.3g}"


def test_reruns_are_bit_identical(backend, device):
    """No atomics: the KV heads' partial column sums are reduced in a fixed order."""
    q, k, v, kpm, gen = make_inputs(2, 8, 2, 33, 16, torch.bfloat16, seed=5, pads=[0, 2])
    spans = random_spans(2, 33, gen)
    first = run(q, k, v, spans, spans, True, kpm, None, backend, device)
    second = run(q, k, v, spans, spans, True, kpm, None, backend, device)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


SPLIT_CASES = {
    # name: (B, H, Hkv, L, d, query span, key span, causal): Triton splits 10 key tiles 16 ways (empty splits)
    "cls_row": (1, 2, 2, 300, 64, (0, 1), (1, 299), False),
    "gqa_last_token_causal": (1, 4, 1, 260, 32, (259, 1), (3, 250), True),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_few_query_rows_over_long_keys_match_float64_and_rerun_identically(case, backend, device, poison):
    """The [CLS] row of CLIP and the last token of a GQA group: Triton splits pass 1's key tiles across programs
    and combines the partial (max, sum) pairs in a fixed order; splits without a key tile add nothing."""
    B, H, Hkv, L, d, qspan, kspan, causal = SPLIT_CASES[case]
    q, k, _, _, _ = make_inputs(B, H, Hkv, L, d, torch.float32, seed=11)
    qspans, kspans = torch.tensor([qspan]), torch.tensor([kspan])
    _, truth = attention(q, k, None, qspans, kspans, causal, None, None)
    q, k = q.to(device), k.to(device)

    def once():
        return attention_scores(q, k, query_spans=qspans, key_spans=kspans, causal=causal, backend=backend).cpu()

    out = once()
    torch.testing.assert_close(out.double(), truth, rtol=1e-4, atol=SCORE_ATOL[torch.float32])
    assert torch.equal(out, once())


def test_triton_split_count_covers_the_gpu_and_depends_on_the_shape_only():
    require("triton")
    from vtprune.triton_kernels._common import split_for

    assert split_for(1 * 16, 1, 16) == 16  # CLIP [CLS]: 16 heads -> 256 CTAs
    assert split_for(45, 1) == 4  # LowRank at LLaVA-NeXT: 47 query tiles -> 188 CTAs
    assert split_for(1440, 1) == 1  # enough CTAs already
    assert split_for(3, 1) == 8  # capped


# Non-finite inputs (vtprune.reference._common.masked_softmax): a NaN or +-inf logit among a row's allowed keys
# makes that row NaN, so exactly the scores the row adds to are NaN; a -inf logit from the data counts too (it is
# not a mask); masked keys never contribute.
NF_L = 12
NF_SPANS = dict(query_spans=torch.tensor([[2, 10]]), key_spans=torch.tensor([[2, 10]]))


def nonfinite_inputs():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, NF_L, 4, generator=gen).abs() + 0.1
    return q, torch.randn(1, 1, NF_L, 4, generator=gen).abs() + 0.1


def test_inf_in_a_causal_query_row_poisons_exactly_the_columns_it_sees(backend, device):
    q, k = nonfinite_inputs()
    q[0, 0, 6, 1] = float("inf")  # row 6 sees keys 0..6: key-span columns 0..4
    out = attention_scores(q.to(device), k.to(device), causal=True, backend=backend, **NF_SPANS)[0].cpu()
    assert torch.isnan(out[:5]).all() and torch.isfinite(out[5:]).all()


def test_all_minus_inf_row_is_nan_not_an_empty_row(backend, device):
    q, k = nonfinite_inputs()  # all positive: -inf in q gives -inf on every key of the row
    q[0, 0, 11, 2] = float("-inf")
    out = attention_scores(q.to(device), k.to(device), causal=False, backend=backend, **NF_SPANS)[0].cpu()
    assert torch.isnan(out).all()


def test_a_masked_key_never_poisons(backend, device):
    q, k = nonfinite_inputs()
    k[0, 0, 11, 0] = float("nan")  # key 11: only row 11 sees it under the causal mask
    kpm = torch.ones(1, NF_L, dtype=torch.bool)
    kpm[0, 11] = False  # and it is padding
    out = attention_scores(
        q.to(device),
        k.to(device),
        causal=True,
        key_padding_mask=kpm.to(device),
        backend=backend,
        query_spans=torch.tensor([[2, 9]]),
        key_spans=torch.tensor([[2, 9]]),
    )
    assert torch.isfinite(out).all()
