"""The model patch on the Triton kernels, through the interpreter on the CPU (TRITON_INTERPRET=1)."""

import importlib.util
import os

import pytest
import torch
from models_common import SCHEDULE

import vtprune

OPS = ("attention_scores", "attention_with_scores", "select_and_merge")
MISSING = list(OPS) if importlib.util.find_spec("vtprune.triton_kernels") is None else \
    [op for op in OPS if importlib.util.find_spec(f"vtprune.triton_kernels.{op}") is None]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available(),
                    reason="Triton on the CPU needs TRITON_INTERPRET=1 (set it to run this class)")
@pytest.mark.skipif(bool(MISSING), reason=f"Triton kernels not written yet: {', '.join(MISSING)}")
class TestTritonBackend:
    def test_same_tokens_as_reference(self, llava, inputs):
        with vtprune.apply(llava, vtprune.VisionDrop(**SCHEDULE, backend="reference")) as h:
            ref = llava(**inputs).logits
            ref_sel = h.stats.selections
        with vtprune.apply(llava, vtprune.VisionDrop(**SCHEDULE, backend="triton")) as h:
            out = llava(**inputs).logits
            assert h.stats.selections == ref_sel
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
