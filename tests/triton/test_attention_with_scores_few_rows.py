"""attention_with_scores for up to 4 packed query rows (CLIP's [CLS] row): scores from the forward's LSE.

One program per key tile covers every head-row (no split softmax, no counter). Checked against the
reference on spans that differ per batch row, causal masks, padding, GQA (2 query rows x 2 heads per
group), non-finite logits and a row whose keys are all padding; the path must really be taken (a spy).
"""

import pytest
import torch

pytest.importorskip("triton.language", reason="Triton is not installed (pip install 'vtprune[triton]')")

import vtprune.triton_kernels.attention_with_scores as AW  # noqa: E402
from vtprune.ops import attention_with_scores  # noqa: E402


@pytest.fixture
def lse_calls(monkeypatch):
    calls = []
    real = AW.few_rows_lse_scores

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(AW, "few_rows_lse_scores", spy)
    return calls


def check(q, k, v, calls, device, **kw):
    want_out, want = attention_with_scores(q, k, v, backend="reference", **kw)
    dev = {n: (x.to(device) if torch.is_tensor(x) and n == "key_padding_mask" else x) for n, x in kw.items()}
    out, got = attention_with_scores(q.to(device), k.to(device), v.to(device), backend="triton", **dev)
    got = got.cpu()
    assert calls, "the few-rows LSE path was not taken"
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    ok = ~torch.isnan(want)
    torch.testing.assert_close(got[ok], want[ok], rtol=1e-4, atol=1e-6)
    return got


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H,Hkv,qcount", [(4, 4, 1), (4, 2, 2), (3, 3, 1)])
def test_matches_reference(H, Hkv, qcount, causal, lse_calls, device, poison):
    gen = torch.Generator().manual_seed(H * 10 + qcount + 7)
    B, L, d = 2, 70, 16
    q, k, v = (torch.randn(B, h, L, d, generator=gen) for h in (H, Hkv, Hkv))
    qs = torch.tensor([[0, qcount], [50, qcount]])  # the second row's queries see 50+ keys when causal
    ks = torch.tensor([[1, 69], [3, 40]])
    check(q, k, v, lse_calls, device, query_spans=qs, key_spans=ks, causal=causal)


def test_padding_and_a_row_without_keys(lse_calls, device, poison):
    gen = torch.Generator().manual_seed(14)
    B, H, L, d = 2, 2, 40, 8
    q, k, v = (torch.randn(B, H, L, d, generator=gen) for _ in range(3))
    kpm = torch.ones(B, L, dtype=torch.bool)
    kpm[0, :7] = False  # left padding
    kpm[1, :] = False  # no valid key at all: the row's scores are 0
    got = check(q, k, v, lse_calls, device, query_spans=torch.tensor([[39, 1], [39, 1]]),
                key_spans=torch.tensor([[0, 39], [0, 39]]), causal=False, key_padding_mask=kpm)
    assert torch.all(got[1] == 0)
    assert torch.all(got[0, :7] == 0) and torch.all(got[0, 7:] > 0)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_logit_makes_the_row_nan(bad, lse_calls, device, poison):
    gen = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=gen) for _ in range(3))
    k[0, 1, 12, 3] = bad  # one key of head 1: that head's [CLS] row is NaN, hence every score
    got = check(q, k, v, lse_calls, device, query_spans=torch.tensor([[0, 1]]),
                key_spans=torch.tensor([[1, 29]]), causal=False)
    assert torch.isnan(got).all()


def test_geometry_covers_the_keys_and_falls_back_when_too_wide():
    rows_p, bn = AW.few_rows_lse_geometry(1, 16, 1, 64, 576)  # CLIP-L/336: 16 heads x 64 dims
    assert (rows_p, bn) == (16, 4) and 576 // bn >= 132
    assert AW.few_rows_lse_geometry(1, 64, 4, 256, 576) is None  # 256 head-rows x 256 dims: the split path
