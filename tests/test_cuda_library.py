"""CPU checks of the CUDA backend's torch.library ops (``torch.ops.vtprune.cuda_<op>``).

Their real implementations need the extension and a GPU (tests/gpu/); here: the schemas equal the Triton
ops', the fake implementations size every output as the reference backend does, graphs that call the ops
trace without a break and without running them, and the CUDA backend functions reach the ops while
torch.compile traces.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import vtprune._library as library
from vtprune import ops

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def inputs():
    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, L, d = 2, 4, 2, 9, 16
    return dict(
        q=torch.randn(B, H, L, d, generator=gen), k=torch.randn(B, Hkv, L, d, generator=gen),
        v=torch.randn(B, Hkv, L, 8, generator=gen),
        qspans=torch.tensor([[1, 6], [0, 8]]), kspans=torch.tensor([[2, 5], [3, 4]]),  # max counts 8, 5
        kpm=torch.tensor([[True] * 9, [False] * 2 + [True] * 7]),
        x=torch.randn(B, L, 8, generator=gen), metric=torch.randn(B, L, 4, generator=gen),
        scores=torch.rand(B, L, generator=gen), keep=torch.tensor([[0, 4, 7], [1, 2, 6]]),
        lengths=torch.tensor([9, 8]), h=torch.randn(B, L, 12, generator=gen),
        u=torch.randn(12, 4, generator=gen), w=torch.randn(12, 4, generator=gen),
        vspans=torch.tensor([[1, 5], [2, 6]]), idx=torch.tensor([[0, 3], [5, 8]]),
        norm_w=torch.randn(8, generator=gen),
    )


def cases(a):
    """(stem, custom-op args, the reference backend's outputs for the same call)."""
    ref = "reference"
    return [
        ("attention_scores", (a["q"], a["k"], a["qspans"], a["kspans"], True, a["kpm"], None, 8, 5),
         ops.attention_scores(a["q"], a["k"], query_spans=a["qspans"], key_spans=a["kspans"], causal=True,
                              key_padding_mask=a["kpm"], backend=ref)),
        ("attention_with_scores",
         (a["q"], a["k"], a["v"], a["qspans"], a["kspans"], False, None, 0.2, 8, 5),
         ops.attention_with_scores(a["q"], a["k"], a["v"], query_spans=a["qspans"], key_spans=a["kspans"],
                                   causal=False, scale=0.2, backend=ref)),
        ("topk_keep_order", (a["scores"], 3, a["lengths"]),
         ops.topk_keep_order(a["scores"], 3, lengths=a["lengths"], backend=ref)),
        ("contextual_merge", (a["x"], a["metric"], a["keep"], 2, a["lengths"]),
         ops.contextual_merge(a["x"], a["metric"], a["keep"], 2, lengths=a["lengths"], backend=ref)),
        ("select_and_merge", (a["scores"], a["x"], a["metric"], 3, 2, a["lengths"]),
         ops.select_and_merge(a["scores"], a["x"], a["metric"], 3, 2, lengths=a["lengths"], backend=ref)),
        ("lowrank_scores", (a["h"], a["u"], a["w"], a["vspans"], a["kpm"], 6),
         ops.lowrank_scores(a["h"], a["u"], a["w"], visual_spans=a["vspans"], key_padding_mask=a["kpm"],
                            backend=ref)),
        ("routed_gather_rmsnorm", (a["x"], a["idx"], a["norm_w"], 1e-6),
         torch.empty(2, 2, 8)),  # [B, K, D]: the routed rows (no reference op of their own)
    ]


STEMS = ["attention_scores", "attention_with_scores", "topk_keep_order", "contextual_merge", "select_and_merge",
         "lowrank_scores", "routed_gather_rmsnorm"]


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("stem", STEMS)
def test_fake_impl_sizes_outputs_like_the_reference(stem):
    """The CUDA op under FakeTensorMode (no kernel runs) gives the reference outputs' shapes and dtypes."""
    _, args, expected = next(c for c in cases(inputs()) if c[0] == stem)
    op = getattr(torch.ops.vtprune, f"cuda_{stem}")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = tuple(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args)
        got = as_tuple(op(*fake_args))
    expected = as_tuple(expected)
    assert [(tuple(t.shape), t.dtype) for t in got] == [(tuple(t.shape), t.dtype) for t in expected]


def test_every_cuda_op_is_registered_with_the_triton_schema():
    """One prototype per op: where both backends have an op, the schemas differ only in the name."""
    assert set(library.OPS) == {"attention_scores", "attention_with_scores", "topk_keep_order", "contextual_merge",
                                "select_and_merge", "lowrank_scores", "routed_gather_rmsnorm",
                                "routed_gather_add_rmsnorm", "routed_add_scatter"}
    for stem, backends in library.OPS.items():
        cuda = getattr(torch.ops.vtprune, f"cuda_{stem}").default._schema
        assert "cuda" in backends, stem
        if "triton" in backends:
            triton = getattr(torch.ops.vtprune, stem).default._schema
            assert str(cuda).replace(f"cuda_{stem}", stem) == str(triton)
    mutating = {stem: [a.name for a in getattr(torch.ops.vtprune, f"cuda_{stem}").default._schema.arguments
                       if a.alias_info is not None and a.alias_info.is_write] for stem in library.OPS}
    assert mutating["routed_gather_add_rmsnorm"] == ["delta"] and mutating["routed_add_scatter"] == ["x"]
    assert mutating["attention_scores"] == []


def test_graph_of_cuda_ops_traces_without_running_them():
    """torch.export (dynamo, strict) traces a function mixing the CUDA ops with torch code in one graph; the
    real implementations never run (they would need the extension and a GPU)."""
    a = inputs()

    class Prune(torch.nn.Module):
        def forward(self, q, k, v, x, metric, qspans, kspans):
            vt = torch.ops.vtprune
            out, s = vt.cuda_attention_with_scores(q, k, v, qspans, kspans, True, None, None, 8, 5)
            s = s + vt.cuda_attention_scores(q, k, qspans, kspans, True, None, None, 8, 5)
            keep = vt.cuda_topk_keep_order(s, 2, None)
            tokens, keep2, targets = vt.cuda_select_and_merge(s, x[:, :5], metric[:, :5], 2, 2, None)
            merged = vt.cuda_contextual_merge(x[:, :5], metric[:, :5], keep, 1, None)
            return out.sum(1) * 2, tokens + 1, merged, keep2 - keep, targets

    args = (a["q"], a["k"], a["v"], a["x"], a["metric"], a["qspans"], a["kspans"])
    graph = torch.export.export(Prune(), args, strict=True).graph
    called = [str(n.target) for n in graph.nodes if n.op == "call_function" and "vtprune" in str(n.target)]
    assert called == ["vtprune.cuda_attention_with_scores.default", "vtprune.cuda_attention_scores.default",
                      "vtprune.cuda_topk_keep_order.default", "vtprune.cuda_select_and_merge.default",
                      "vtprune.cuda_contextual_merge.default"]


def test_cuda_backend_functions_call_the_ops_while_compiling(monkeypatch):
    """While torch.compile traces, vtprune.cuda.<op>.<op> goes through torch.ops.vtprune.cuda_<op> with the
    host-read widths (a spy stands in for the ops, so nothing launches)."""
    import vtprune.cuda.attention_scores as cuda_scores
    import vtprune.cuda.select_and_merge as cuda_merge

    a = inputs()
    seen = []

    class Spy:
        def __getattr__(self, name):
            def op(*args):
                seen.append((name, args[-2:]))
                return "sentinel"

            return op

    monkeypatch.setattr(torch.ops, "vtprune", Spy())
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert cuda_scores.attention_scores(a["q"], a["k"], query_spans=a["qspans"], key_spans=a["kspans"],
                                        causal=True) == "sentinel"
    assert cuda_merge.select_and_merge(a["scores"], a["x"], a["metric"], 3, 2) == "sentinel"
    assert seen == [("cuda_attention_scores", (8, 5)), ("cuda_select_and_merge", (2, None))]


def test_widths_below_the_spans_are_rejected_before_the_extension_loads():
    """A max count below a CPU span's count would make the kernels write past their buffers."""
    a = inputs()
    from vtprune.cuda.attention_scores import attention_scores_launch
    from vtprune.cuda.lowrank_scores import lowrank_scores_launch

    with pytest.raises(ValueError, match="max_query"):
        attention_scores_launch(a["q"], a["k"], a["qspans"], a["kspans"], True, None, None, 7, 5)
    with pytest.raises(ValueError, match="max_key"):
        attention_scores_launch(a["q"], a["k"], a["qspans"], a["kspans"], True, None, None, 8, 4)
    with pytest.raises(ValueError, match="max_visual"):
        lowrank_scores_launch(a["h"], a["u"], a["w"], a["vspans"], None, 5)
