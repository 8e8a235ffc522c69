"""The reference's rule for non-finite inputs (vtprune.reference._common.masked_softmax), case by case.

A NaN or +-inf logit among a row's allowed keys makes that row NaN, so exactly the scores the row adds to are
NaN; a -inf logit from the data counts too (it is not a mask); masked keys never contribute.
"""

import torch

from vtprune.ops import attention_scores

L, D = 12, 4
SPANS = dict(query_spans=torch.tensor([[2, 10]]), key_spans=torch.tensor([[2, 10]]))


def inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, 1, L, D, generator=gen).abs() + 0.1, torch.randn(1, 1, L, D, generator=gen).abs() + 0.1


def test_inf_in_a_causal_query_row_poisons_exactly_the_columns_it_sees():
    q, k = inputs()
    q[0, 0, 6, 1] = float("inf")  # row 6 sees keys 0..6: key-span columns 0..4
    out = attention_scores(q, k, causal=True, backend="reference", **SPANS)[0]
    assert torch.isnan(out[:5]).all() and torch.isfinite(out[5:]).all()


def test_all_minus_inf_row_is_nan_not_an_empty_row():
    q, k = inputs()  # all positive: -inf in q gives -inf on every key of the row
    q[0, 0, 11, 2] = float("-inf")
    out = attention_scores(q, k, causal=False, backend="reference", **SPANS)[0]
    assert torch.isnan(out).all()


def test_a_masked_key_never_poisons():
    q, k = inputs()
    k[0, 0, 11, 0] = float("nan")  # key 11: only row 11 sees it under the causal mask
    kpm = torch.ones(1, L, dtype=torch.bool)
    kpm[0, 11] = False  # and it is padding
    out = attention_scores(q, k, causal=True, key_padding_mask=kpm, backend="reference",
                           query_spans=torch.tensor([[2, 9]]), key_spans=torch.tensor([[2, 9]]))[0]
    assert torch.isfinite(out).all()
