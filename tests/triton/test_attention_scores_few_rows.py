"""The few-rows paths of the scores (up to 4 packed query rows: CLIP's [CLS] row, a last token).

attention_scores: programs split the keys; the last program of each batch row (an arrival counter) combines
the tiles and writes the row's scores. attention_with_scores: one program per key tile covers every
head-row on the flash forward's LSE (no split softmax, no counter). Both are checked against the reference
on spans that differ per batch row, causal masks, padding, GQA (2 query rows x 2 heads per group),
non-finite logits and a row whose keys are all padding, plus bit-identical reruns (the counter is left at
zero and the reduction order is fixed); a spy makes sure the path was really taken.
"""

import pytest
import torch

pytest.importorskip("triton.language", reason="Triton is not installed (pip install 'vtprune[triton]')")

import vtprune.triton_kernels.attention_scores as AS  # noqa: E402
import vtprune.triton_kernels.attention_with_scores as AW  # noqa: E402
from vtprune.ops import attention_scores, attention_with_scores  # noqa: E402

PATHS = {"attention_scores": (AS, "few_rows_scores"), "attention_with_scores": (AW, "few_rows_lse_scores")}


@pytest.fixture(params=list(PATHS))
def op(request, spy_calls):
    """(op name, calls of its few-rows launcher)."""
    return request.param, spy_calls(*PATHS[request.param])


def scores_of(name, q, k, backend, **kw):
    if name == "attention_scores":
        return attention_scores(q, k, backend=backend, **kw)
    return attention_with_scores(q, k, k.flip(-1), backend=backend, **kw)[1]  # any values: scores only


def check(op, q, k, device, **kw):
    name, calls = op
    want = scores_of(name, q, k, "reference", **kw)
    dev = {n: (v.to(device) if torch.is_tensor(v) and n == "key_padding_mask" else v) for n, v in kw.items()}
    got = scores_of(name, q.to(device), k.to(device), "triton", **dev).cpu()
    assert calls, f"the few-rows path of {name} was not taken"
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    ok = ~torch.isnan(want)
    torch.testing.assert_close(got[ok], want[ok], rtol=1e-4, atol=1e-6)
    return got


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H,Hkv,qcount", [(4, 4, 1), (4, 2, 2), (3, 3, 1)])
def test_matches_reference(H, Hkv, qcount, causal, op, device, poison):
    gen = torch.Generator().manual_seed(H * 10 + qcount)
    B, L, d = 2, 70, 16
    q, k = torch.randn(B, H, L, d, generator=gen), torch.randn(B, Hkv, L, d, generator=gen)
    qs = torch.tensor([[0, qcount], [50, qcount]])  # the second row's queries see 50+ keys when causal
    ks = torch.tensor([[1, 69], [3, 40]])
    check(op, q, k, device, query_spans=qs, key_spans=ks, causal=causal)


def test_padding_and_a_row_without_keys(op, device, poison):
    gen = torch.Generator().manual_seed(4)
    B, H, L, d = 2, 2, 40, 8
    q, k = torch.randn(B, H, L, d, generator=gen), torch.randn(B, H, L, d, generator=gen)
    kpm = torch.ones(B, L, dtype=torch.bool)
    kpm[0, :7] = False  # left padding
    kpm[1, :] = False  # no valid key at all: the row's scores are 0
    got = check(op, q, k, device, query_spans=torch.tensor([[39, 1], [39, 1]]),
                key_spans=torch.tensor([[0, 39], [0, 39]]), causal=False, key_padding_mask=kpm)
    assert torch.all(got[1] == 0)
    assert torch.all(got[0, :7] == 0) and torch.all(got[0, 7:] > 0)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_logit_makes_the_row_nan(bad, op, device, poison):
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 2, 30, 8, generator=gen), torch.randn(1, 2, 30, 8, generator=gen)
    k[0, 1, 12, 3] = bad  # one key of head 1: that head's [CLS] row is NaN, hence every score
    got = check(op, q, k, device, query_spans=torch.tensor([[0, 1]]), key_spans=torch.tensor([[1, 29]]),
                causal=False)
    assert torch.isnan(got).all()


def test_reruns_are_bit_identical(op, device, poison):
    gen = torch.Generator().manual_seed(6)
    q, k = torch.randn(3, 4, 90, 16, generator=gen), torch.randn(3, 4, 90, 16, generator=gen)
    kw = dict(query_spans=torch.tensor([[0, 1]] * 3), key_spans=torch.tensor([[1, 89]] * 3), causal=False)
    first = check(op, q, k, device, **kw)
    for _ in range(2):  # the counters were reset by the previous launch
        again = scores_of(op[0], q.to(device), k.to(device), "triton", **kw).cpu()
        assert torch.equal(again, first)


def test_lse_geometry_covers_the_keys_and_falls_back_when_too_wide():
    rows_p, bn = AW.few_rows_lse_geometry(1, 16, 1, 64, 576)  # CLIP-L/336: 16 heads x 64 dims
    assert (rows_p, bn) == (16, 4) and 576 // bn >= 132
    assert AW.few_rows_lse_geometry(1, 64, 4, 256, 576) is None  # 256 head-rows x 256 dims: the split path
