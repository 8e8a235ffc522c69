"""Everything runs under ``torch.inference_mode()``, as evaluation harnesses call models.

Tensors made under inference mode have no version counter; host-side caches keyed on it must not read it
(before: "Inference tensors do not track version counter" from the ops' span summaries).
"""

import pytest
import torch

import vtprune
from vtprune.models._tiny import tiny_inputs, tiny_llava

METHODS = {
    "visiondrop": lambda: vtprune.VisionDrop(tokens=16, backend="reference"),
    "alvts": lambda: vtprune.ALVTS(keep=16, backend="reference"),
    "fastv": lambda: vtprune.FastV(layer=2, tokens=16, backend="reference"),
}


def test_ops_under_inference_mode_equal_no_grad():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 12, 8, generator=gen), torch.randn(2, 2, 12, 8, generator=gen)
    spans = [[1, 9], [0, 12]]
    with torch.no_grad():
        want = vtprune.ops.attention_scores(q, k, query_spans=torch.tensor(spans), key_spans=torch.tensor(spans),
                                            causal=True, backend="reference")
    with torch.inference_mode():
        s = torch.tensor(spans)  # an inference tensor: no version counter
        for _ in range(2):  # the second call finds the span summary cached
            got = vtprune.ops.attention_scores(q, k, query_spans=s, key_spans=s, causal=True, backend="reference")
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_patched_generate_under_inference_mode(method):
    model = tiny_llava()
    batch = tiny_inputs(model, (3, 7), (6, 4), seed=1)
    with vtprune.apply(model, METHODS[method]()):
        with torch.no_grad():
            want = model.generate(**batch, max_new_tokens=4, do_sample=False)
        with torch.inference_mode():
            got = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)
