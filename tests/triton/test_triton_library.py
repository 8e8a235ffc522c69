"""The torch.library custom ops: schema, fake (meta) impls, and torch.compile of code that calls them."""

import pytest
import torch

pytest.importorskip("triton.language", reason="Triton is not installed (pip install 'vtprune[triton]')")

import vtprune._library  # noqa: E402, F401  (registers torch.ops.vtprune.*)
from vtprune import ops  # noqa: E402


def small_inputs(device):
    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, L, d = 2, 4, 2, 9, 16
    q = torch.randn(B, H, L, d, generator=gen).to(device)
    k = torch.randn(B, Hkv, L, d, generator=gen).to(device)
    v = torch.randn(B, Hkv, L, d, generator=gen).to(device)
    qspans, kspans = torch.tensor([[1, 6], [0, 8]]), torch.tensor([[2, 5], [3, 4]])  # max counts 8 and 5
    kpm = torch.tensor([[True] * 9, [False] * 2 + [True] * 7], device=device)
    x = torch.randn(B, L, 8, generator=gen).to(device)
    metric = torch.randn(B, L, 4, generator=gen).to(device)
    scores = torch.rand(B, L, generator=gen).to(device)
    keep = torch.tensor([[0, 4, 7], [1, 2, 8]], device=device)
    lengths = torch.tensor([9, 8])
    return dict(q=q, k=k, v=v, qspans=qspans, kspans=kspans, kpm=kpm, x=x, metric=metric, scores=scores,
                keep=keep, lengths=lengths)


def op_calls(a):
    """(op, args) for every custom op; max counts as the Triton backend functions compute them."""
    vt = torch.ops.vtprune
    return [
        (vt.attention_scores, (a["q"], a["k"], a["qspans"], a["kspans"], True, a["kpm"], None, 8, 5)),
        (vt.attention_with_scores, (a["q"], a["k"], a["v"], a["qspans"], a["kspans"], False, None, 0.2, 8, 5)),
        (vt.topk_keep_order, (a["scores"], 3, a["lengths"])),
        (vt.contextual_merge, (a["x"], a["metric"], a["keep"], 2, a["lengths"])),
        (vt.select_and_merge, (a["scores"], a["x"], a["metric"], 3, 2, a["lengths"])),
    ]


@pytest.mark.parametrize("index", range(5))
def test_opcheck(index, device):
    """Schema, fake-tensor impl (shapes, dtypes, devices as the real op) and AOT dispatch, static and dynamic."""
    op, args = op_calls(small_inputs(device))[index]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("compiling", [False, True])
def test_backend_functions_route_through_the_custom_ops_when_compiling(device, monkeypatch, compiling):
    """backend='triton' reaches torch.ops.vtprune.<op> while torch.compile traces (a counting wrapper in
    torch.ops sees every call); in eager mode it launches directly (one dispatch layer, no custom-op cost)."""
    a = small_inputs(device)
    seen = []
    real = torch.ops.vtprune

    class Spy:
        def __getattr__(self, name):
            op = getattr(real, name)

            def counted(*args, **kwargs):
                seen.append(name)
                return op(*args, **kwargs)

            return counted

    monkeypatch.setattr(torch.ops, "vtprune", Spy())
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    ops.attention_scores(a["q"], a["k"], query_spans=a["qspans"], key_spans=a["kspans"], causal=True,
                         backend="triton")
    ops.attention_with_scores(a["q"], a["k"], a["v"], query_spans=a["qspans"], key_spans=a["kspans"],
                              causal=True, backend="triton")
    ops.topk_keep_order(a["scores"], 3, backend="triton")
    ops.contextual_merge(a["x"], a["metric"], a["keep"], 2, backend="triton")
    ops.select_and_merge(a["scores"], a["x"], a["metric"], 3, 2, backend="triton")
    called = [name for name in seen if not name.startswith("routed_")]
    expected = ["attention_scores", "attention_with_scores", "topk_keep_order", "contextual_merge",
                "select_and_merge"]
    assert called == (expected if compiling else [])


def test_torch_compile_fullgraph(device):
    """A compiled function mixing the custom ops with ordinary torch code traces in one graph and matches eager.

    fullgraph=True fails on any graph break, so the fake impls must give every output's shape from the
    arguments alone (the max span counts are int arguments for that reason).
    """
    a = small_inputs(device)
    vt = torch.ops.vtprune

    def prune(q, k, v, x, metric, qspans, kspans):
        out, s = vt.attention_with_scores(q, k, v, qspans, kspans, True, None, None, 8, 5)
        s = s + vt.attention_scores(q, k, qspans, kspans, True, None, None, 8, 5)
        keep = vt.topk_keep_order(s, 2, None)  # [B, 2] of the 5 key-span columns
        tokens, keep2, targets = vt.select_and_merge(s, x[:, :5], metric[:, :5], 2, 2, None)
        merged = vt.contextual_merge(x[:, :5], metric[:, :5], keep, 1, None)
        return out.sum(1) * 2, tokens + 1, merged, keep2 - keep, targets

    args = (a["q"], a["k"], a["v"], a["x"], a["metric"], a["qspans"], a["kspans"])
    eager = prune(*args)
    compiled = torch.compile(prune, fullgraph=True, backend="inductor")(*args)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


def test_output_widths_below_the_spans_are_rejected(device):
    """A max count below a span's count would make the kernels write past their buffers: it raises instead."""
    a = small_inputs(device)
    with pytest.raises(ValueError, match="max_query"):
        torch.ops.vtprune.attention_scores(a["q"], a["k"], a["qspans"], a["kspans"], True, None, None, 7, 5)
    with pytest.raises(ValueError, match="max_key"):
        torch.ops.vtprune.attention_with_scores(a["q"], a["k"], a["v"], a["qspans"], a["kspans"], True, None,
                                                None, 8, 4)
