"""Causal masks only on the diagonal key tiles: interior tiles skip the mask, the result must not change.

Long causal rows (L = 300: several interior key tiles per row tile, in the flash forward and in pass 1, where
the split over key tiles also starts its masked loop on the right tile) without padding (the interior tiles
then apply no mask at all), against the float64 softmax and the reference.
"""

import pytest
import torch

pytest.importorskip("triton.language", reason="Triton is not installed (pip install 'vtprune[triton]')")

from vtprune.ops import attention_scores, attention_with_scores  # noqa: E402

TOL = {torch.float32: dict(atol=1e-6, rtol=1e-4), torch.bfloat16: dict(atol=2e-3, rtol=2e-2)}


def float64_scores(q, k, qspans, kspans, causal):
    B, H, L, d = q.shape
    logits = q.double() @ k.double().repeat_interleave(H // k.shape[1], 1).transpose(-1, -2) * d**-0.5
    if causal:
        logits = logits.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    probs = torch.softmax(logits, -1)
    out = torch.zeros(B, int(kspans[:, 1].max()), dtype=torch.float64)
    for b in range(B):
        (qs, qc), (ks, kc) = qspans[b].tolist(), kspans[b].tolist()
        out[b, :kc] = probs[b, :, qs : qs + qc, ks : ks + kc].sum((0, 1)) / (H * qc)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_long_rows_match(causal, dtype, device, poison):
    gen = torch.Generator().manual_seed(11)
    B, H, Hkv, L, d = 2, 2, 1, 300, 16
    q, k = torch.randn(B, H, L, d, generator=gen).to(dtype), torch.randn(B, Hkv, L, d, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, L, d, generator=gen).to(dtype)
    qspans, kspans = torch.tensor([[20, 260], [150, 100]]), torch.tensor([[20, 260], [0, 290]])
    kw = dict(query_spans=qspans, key_spans=kspans, causal=causal)
    want = float64_scores(q, k, qspans, kspans, causal)
    got = attention_scores(q.to(device), k.to(device), backend="triton", **kw).cpu()
    out, got2 = (t.cpu() for t in attention_with_scores(q.to(device), k.to(device), v.to(device), backend="triton",
                                                         **kw))
    ref_out, _ = attention_with_scores(q, k, v, backend="reference", **kw)
    for s in (got, got2):
        torch.testing.assert_close(s.double(), want, **TOL[dtype])
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               rtol=2e-2 if dtype == torch.bfloat16 else 1e-4)
