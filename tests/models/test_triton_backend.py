"""The model patch on the Triton kernels, through the interpreter on the CPU (TRITON_INTERPRET=1, which
tests/conftest.py sets when no CUDA device is visible)."""

import pytest
import torch
from models_common import SCHEDULE

import vtprune
from utils import triton_installed


@pytest.mark.skipif(not triton_installed(), reason="Triton is not installed (pip install 'vtprune[triton]')")
class TestTritonBackend:
    def test_same_tokens_as_reference(self, llava, inputs):
        with vtprune.apply(llava, vtprune.VisionDrop(**SCHEDULE, backend="reference")) as h:
            ref = llava(**inputs).logits
            ref_sel = h.stats.selections
        with vtprune.apply(llava, vtprune.VisionDrop(**SCHEDULE, backend="triton")) as h:
            out = llava(**inputs).logits
            assert h.stats.selections == ref_sel
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, equal_nan=True)  # NaN: pruned positions
