"""Triton attention_scores / attention_with_scores vs a float64 materialised softmax and vs the reference."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton.language", reason="Triton is not installed (pip install 'vtprune[triton]')")

from utils import DTYPES, SCORE_ATOL, left_padding_mask, random_spans  # noqa: E402
from vtprune.ops import attention_scores, attention_with_scores  # noqa: E402


def float64_truth(q, k, v, qspans, kspans, causal, kpm, scale):
    """(out [B, H, L, dv] or None, scores [B, Kmax]) from the full L x L softmax in float64, batched."""
    B, H, L, d = q.shape
    g = H // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    kd = k.double().repeat_interleave(g, dim=1)  # [B, H, L, d]
    allowed = torch.ones(B, 1, L, L, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool).tril()
    if kpm is not None:
        allowed = allowed & kpm[:, None, None, :]
    logits = (q.double() @ kd.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, -1).nan_to_num(0.0)  # [B, H, L, L]; a row with no valid key is all zero
    out = None if v is None else probs @ v.double().repeat_interleave(g, dim=1)
    scores = torch.zeros(B, int(kspans[:, 1].max()), dtype=torch.float64)
    for b in range(B):  # spans differ per row: slice each row's query rows and key columns
        (qs, qc), (ks, kc) = qspans[b].tolist(), kspans[b].tolist()
        scores[b, :kc] = probs[b, :, qs : qs + qc, ks : ks + kc].sum((0, 1)) / (H * qc)
    return out, scores


def make_inputs(B, H, Hkv, L, d, dtype, seed, pads=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, d, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, L, d, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, L, d, generator=gen).to(dtype)
    kpm = None if pads is None else left_padding_mask(B, L, pads)
    return q, k, v, kpm, gen


def run_both(q, k, v, qspans, kspans, causal, kpm, scale, device):
    """Triton (scores, out, scores of the fused call) on ``device``, back on the CPU."""
    dev = [t.to(device) if t is not None else None for t in (q, k, v, kpm)]
    kw = dict(query_spans=qspans, key_spans=kspans, causal=causal, key_padding_mask=dev[3], scale=scale,
              backend="triton")
    s = attention_scores(dev[0], dev[1], **kw)
    out, s2 = attention_with_scores(dev[0], dev[1], dev[2], **kw)
    return s.cpu(), out.cpu(), s2.cpu()


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
def test_random_spans_match_float64_and_reference(B, H, Hkv, L, d, causal, pads, dtype, device, poison):
    q, k, v, kpm, gen = make_inputs(B, H, Hkv, L, d, dtype, seed=L * 10 + B, pads=pads)
    qspans, kspans = random_spans(B, L, gen), random_spans(B, L, gen)
    scale = 0.3 if d == 24 else None
    got, _, got2 = run_both(q, k, v, qspans, kspans, causal, kpm, scale, device)
    _, want = float64_truth(q, k, v, qspans, kspans, causal, kpm, scale)
    ref = attention_scores(q, k, query_spans=qspans, key_spans=kspans, causal=causal, key_padding_mask=kpm,
                           scale=scale, backend="reference")
    assert got.dtype == torch.float32 and got.shape == want.shape
    for s in (got, got2):
        torch.testing.assert_close(s.double(), want, atol=SCORE_ATOL[dtype], rtol=1e-4)
        torch.testing.assert_close(s, ref, atol=SCORE_ATOL[dtype], rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("last_count", [1, 5])
def test_single_query_rows_and_spans_at_the_end(H, Hkv, last_count, dtype, device, poison):
    """CLIP's [CLS] row and a last-token query, spans ending at the last position.

    With every query count 1 the packed rows per KV group are G = 1, 2 or 4: the CUDA-core small-M path.
    """
    B, L, d = 3, 33, 16
    q, k, v, kpm, _ = make_inputs(B, H, Hkv, L, d, dtype, seed=7, pads=[0, 0, 4])
    qspans = torch.tensor([[0, 1], [L - 1, 1], [L - last_count, last_count]])
    kspans = torch.tensor([[1, L - 1], [L - 3, 3], [4, L - 4]])
    for causal in (False, True):
        got, _, got2 = run_both(q, k, v, qspans, kspans, causal, kpm, None, device)
        _, want = float64_truth(q, k, v, qspans, kspans, causal, kpm, None)
        torch.testing.assert_close(got.double(), want, atol=SCORE_ATOL[dtype], rtol=1e-4)
        torch.testing.assert_close(got2.double(), want, atol=SCORE_ATOL[dtype], rtol=1e-4)
        assert (got[1, 3:] == 0).all() and (got[0, L - 1 :] == 0).all()  # zero past each row's count


def test_rows_without_a_valid_key_contribute_zero_and_output_zeros(device, poison):
    """Causal + left padding: query rows inside the padding see no key; the mean still divides by |Qs|."""
    B, H, L, d = 1, 2, 9, 16
    q, k, v, kpm, _ = make_inputs(B, H, H, L, d, torch.float32, seed=3, pads=[4])
    qspans, kspans = torch.tensor([[0, 9]]), torch.tensor([[0, 9]])
    got, out, got2 = run_both(q, k, v, qspans, kspans, True, kpm, None, device)
    want_out, want = float64_truth(q, k, v, qspans, kspans, True, kpm, None)
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
def test_output_within_twice_pytorchs_error(B, H, Hkv, L, d, causal, pads, dtype, device, poison):
    """The 2x rule: error vs float64 at most 2x that of PyTorch's SDPA in the same precision (+1e-6)."""
    q, k, v, kpm, gen = make_inputs(B, H, Hkv, L, d, dtype, seed=L + d, pads=pads)
    qspans = kspans = random_spans(B, L, gen)
    _, out, _ = run_both(q, k, v, qspans, kspans, causal, kpm, None, device)
    want_out, _ = float64_truth(q, k, v, qspans, kspans, causal, kpm, None)
    assert out.dtype == dtype and out.shape == (B, H, L, d)
    rows_ok = rows_with_a_key(kpm, B, L, causal)[:, None, :].expand(B, H, L)
    assert (out[~rows_ok] == 0).all()
    err = float((out.double() - want_out)[rows_ok].abs().max())
    pt_err = low_precision_error(q, k, v, causal, kpm, rows_ok, want_out)
    assert err <= 2 * pt_err + 1e-6, f"error {err:.3g} > 2 x PyTorch's {pt_err:.3g}"


def test_reruns_are_bit_identical(device):
    """No atomics: the KV heads' partial column sums are reduced in a fixed order."""
    q, k, v, kpm, gen = make_inputs(2, 8, 2, 33, 16, torch.bfloat16, seed=5, pads=[0, 2])
    spans = random_spans(2, 33, gen)
    first = run_both(q, k, v, spans, spans, True, kpm, None, device)
    second = run_both(q, k, v, spans, spans, True, kpm, None, device)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
