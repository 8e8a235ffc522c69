"""Every public op on the Triton backend runs without a host-device sync (issue #12), counted on the CPU.

Data tensors are on the simulated device of :mod:`vtprune.testing.syncs` (they behave as CUDA tensors for
sync purposes); spans and lengths are CPU tensors as the README recommends, or device tensors. Kernels run
through Triton's interpreter on the host values, so each op's result is also checked against the reference
backend on plain CPU tensors.
"""

import pytest
import torch

from utils import triton_installed
from vtprune import ops
from vtprune.testing.syncs import DeviceTensor, SyncCounter, SyncError, on_device, to_device, to_host

if not triton_installed():
    pytest.skip("Triton is not installed", allow_module_level=True)

B, H, HKV, L, D_HEAD = 2, 4, 2, 12, 16


def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        q=torch.randn(B, H, L, D_HEAD, generator=g), k=torch.randn(B, HKV, L, D_HEAD, generator=g),
        v=torch.randn(B, HKV, L, D_HEAD, generator=g),
        qspans=torch.tensor([[1, 6], [0, 9]]), kspans=torch.tensor([[2, 5], [3, 8]]),
        kpm=torch.tensor([[True] * L, [False] * 2 + [True] * (L - 2)]),
        scores=torch.rand(B, L, generator=g), x=torch.randn(B, L, 8, generator=g),
        metric=torch.randn(B, L, 4, generator=g), keep=torch.tensor([[0, 4, 7], [1, 2, 8]]),
        lengths=torch.tensor([12, 10]), h=torch.randn(B, L, 32, generator=g), u=torch.randn(32, 8, generator=g),
        w=torch.randn(32, 8, generator=g),
    )


CALLS = {
    "attention_scores": lambda a, **kw: ops.attention_scores(
        a["q"], a["k"], query_spans=a["qspans"], key_spans=a["kspans"], causal=True, key_padding_mask=a["kpm"],
        **kw),
    "attention_with_scores": lambda a, **kw: ops.attention_with_scores(
        a["q"], a["k"], a["v"], query_spans=a["qspans"], key_spans=a["kspans"], causal=False, **kw),
    "topk_keep_order": lambda a, **kw: ops.topk_keep_order(a["scores"], 4, lengths=a["lengths"], **kw),
    "contextual_merge": lambda a, **kw: ops.contextual_merge(a["x"], a["metric"], a["keep"], 3,
                                                             lengths=a["lengths"], **kw),
    "select_and_merge": lambda a, **kw: ops.select_and_merge(a["scores"], a["x"], a["metric"], 4, 3,
                                                             lengths=a["lengths"], **kw),
    "lowrank_scores": lambda a, **kw: ops.lowrank_scores(a["h"], a["u"], a["w"], visual_spans=a["kspans"],
                                                         key_padding_mask=a["kpm"], **kw),
}
DATA = ("q", "k", "v", "kpm", "scores", "x", "metric", "keep", "h", "u", "w")  # what lives on the device


def on_sim_device(a, extra=()):
    return {name: to_device(t) if name in DATA + tuple(extra) else t for name, t in a.items()}


def assert_close(out, ref):
    for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        assert isinstance(o, DeviceTensor)  # the result stays on the device
        o = to_host(o)
        if r.dtype.is_floating_point:
            torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-4)
        else:
            assert torch.equal(o, r)


@pytest.mark.parametrize("op", sorted(CALLS))
def test_op_is_sync_free_with_cpu_spans(op):
    a = inputs()
    ref = CALLS[op](a, backend="reference")
    dev = on_sim_device(a)
    with SyncCounter(launches="interpret") as syncs:
        out = CALLS[op](dev, backend="triton")
    syncs.assert_at_most(0, f"{op} with CPU spans")
    assert syncs.launches > 0
    assert_close(out, ref)


@pytest.mark.parametrize("op", sorted(CALLS))
def test_op_is_sync_free_with_device_spans(op):
    """Spans and lengths on the device too: checked by device asserts; score widths are then L (documented)."""
    a = inputs()
    ref = CALLS[op](a, backend="reference")
    dev = on_sim_device(a, extra=("qspans", "kspans", "lengths"))
    with SyncCounter(launches="interpret") as syncs:
        out = CALLS[op](dev, backend="triton")
    syncs.assert_at_most(0, f"{op} with device spans")
    if op in ("attention_scores", "lowrank_scores", "attention_with_scores"):
        width = 8  # the largest key (visual) count of kspans
        scores = to_host(out[1] if isinstance(out, tuple) else out)
        assert scores.shape == (B, L) and not scores[:, width:].any()  # zero past every count
        out = (out[0], to_device(scores[:, :width])) if isinstance(out, tuple) else to_device(scores[:, :width])
    assert_close(out, ref)


def test_device_span_values_are_checked_on_the_device():
    """A bad device span is not read on the host, but the device-side assert still refuses it."""
    a = on_sim_device(inputs(), extra=("kspans",))
    a["kspans"] = to_device(torch.tensor([[2, 5], [8, 8]]))  # 8 + 8 > L
    with SyncCounter(launches="interpret") as syncs, pytest.raises(RuntimeError, match="key_spans: every span"):
        CALLS["attention_scores"](a, backend="triton")
    assert syncs.count == 0


def test_device_keep_idx_is_checked_on_the_device():
    a = on_sim_device(inputs())
    a["keep"] = to_device(torch.tensor([[0, 4, 4], [1, 2, 8]]))  # not strictly ascending
    with SyncCounter(launches="interpret") as syncs, pytest.raises(RuntimeError, match="strictly ascending"):
        CALLS["contextual_merge"](a, backend="triton")
    assert syncs.count == 0


def test_routed_layer_is_sync_free():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, 0).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, L, 32, generator=g)
    cos, sin = torch.randn(B, L, 8, generator=g), torch.randn(B, L, 8, generator=g)
    idx = torch.tensor([[0, 2, 3, 7, 11], [1, 4, 5, 6, 9]])
    with torch.no_grad():
        ref = ops.routed_layer(layer, x.clone(), idx, position_embeddings=(cos, sin), backend="reference")
        for where in ("cpu", "device"):
            with on_device(layer):
                dx, dcos, dsin = to_device((x.clone(), cos, sin))
                didx = idx if where == "cpu" else to_device(idx)
                with SyncCounter(launches="interpret") as syncs:
                    out = ops.routed_layer(layer, dx, didx, position_embeddings=(dcos, dsin), backend="triton")
            syncs.assert_at_most(0, f"routed_layer with a {where} routed_idx")
            torch.testing.assert_close(to_host(out), ref, atol=1e-5, rtol=1e-4)


def test_harness_catches_an_item_added_to_a_hot_path(monkeypatch):
    """The sync count is not vacuous: one `.item()` slipped into a launcher fails the budget, naming the line."""
    import vtprune.triton_kernels.topk_keep_order as topk_module

    real = topk_module.topk_keep_order_launch

    def launch_with_a_sync(scores, k, lengths):
        if scores.sum().item() > -1:  # what a careless edit of the hot path looks like
            return real(scores, k, lengths)

    monkeypatch.setattr(topk_module, "topk_keep_order_launch", launch_with_a_sync)
    a = on_sim_device(inputs())
    with SyncCounter(launches="interpret") as syncs:
        CALLS["topk_keep_order"](a, backend="triton")
    with pytest.raises(SyncError, match=r"(?s)synchronised 1 times.*item.*test_op_syncs.py:\d+ in launch_with_a_sync"):
        syncs.assert_at_most(0)
