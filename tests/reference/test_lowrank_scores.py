"""Reference ALVTS selector scores vs float64 math written per batch row."""

import pytest
import torch

from utils import left_padding_mask
from vtprune.ops import lowrank_scores


def truth(h, u, v, spans, kpm):
    B, L, _ = h.shape
    R = u.shape[1]
    out = torch.zeros(B, int(spans[:, 1].max()), dtype=torch.float64)
    for b in range(B):
        a, bb = h[b].double() @ u.double(), h[b].double() @ v.double()
        allowed = torch.ones(L, L, dtype=torch.bool).tril()
        real = torch.ones(L, dtype=torch.bool) if kpm is None else kpm[b]
        allowed &= real[None, :]
        p = torch.softmax((a @ bb.T / R**0.5).masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        s, c = spans[b].tolist()
        vis = torch.zeros(L, dtype=torch.bool)
        vis[s : s + c] = True
        txt = real & ~vis
        s_v2v = p[vis][:, s : s + c].mean(0)
        s_t2v = p[txt][:, s : s + c].mean(0) if txt.any() else torch.ones(c, dtype=torch.float64)
        out[b, :c] = s_v2v * s_t2v
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,L,D,R,spans,pads", [
    (1, 9, 16, 4, [[2, 5]], None),
    (2, 17, 12, 3, [[4, 10], [3, 6]], [3, 0]),
    (2, 6, 8, 8, [[0, 6], [1, 4]], None),  # row 0 has no text: S_T2V = 1
])
def test_matches_float64(B, L, D, R, spans, pads, dtype):
    gen = torch.Generator().manual_seed(L)
    h = torch.randn(B, L, D, generator=gen).to(dtype)
    u, v = (torch.randn(D, R, generator=gen) * 0.5).to(dtype), (torch.randn(D, R, generator=gen) * 0.5).to(dtype)
    spans = torch.tensor(spans)
    kpm = None if pads is None else left_padding_mask(B, L, pads)
    got = lowrank_scores(h, u, v, visual_spans=spans, key_padding_mask=kpm, backend="reference")
    want = truth(h, u, v, spans, kpm)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-4)
