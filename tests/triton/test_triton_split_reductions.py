"""Split-K passes (few query rows over a long key range) against the float64 truth, and their determinism.

The [CLS] row of CLIP and the last token of a GQA group split pass 1's key tiles across programs and
combine the partial (max, sum) pairs in a fixed order; splits that get no key tile must contribute nothing.
"""

import pytest
import torch

pytest.importorskip("triton.language", reason="Triton is not installed (pip install 'vtprune[triton]')")

from test_triton_attention_scores import float64_truth, make_inputs  # noqa: E402

from utils import SCORE_ATOL  # noqa: E402
from vtprune.ops import attention_scores  # noqa: E402
from vtprune.triton_kernels._common import split_for  # noqa: E402

CASES = {
    # name: (B, H, Hkv, L, d, query span, key span, causal): 10 key tiles split 16 ways (empty splits)
    "cls_row": (1, 2, 2, 300, 64, (0, 1), (1, 299), False),
    "gqa_last_token_causal": (1, 4, 1, 260, 32, (259, 1), (3, 250), True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_split_row_pass_matches_truth_and_reruns_identically(case, poison):
    B, H, Hkv, L, d, qspan, kspan, causal = CASES[case]
    q, k, _, _, _ = make_inputs(B, H, Hkv, L, d, torch.float32, seed=11)
    qspans, kspans = torch.tensor([qspan]), torch.tensor([kspan])
    _, truth = float64_truth(q, k, None, qspans, kspans, causal, None, None)
    run = lambda: attention_scores(q, k, query_spans=qspans, key_spans=kspans, causal=causal, backend="triton")  # noqa: E731
    out = run()
    torch.testing.assert_close(out.double(), truth, rtol=1e-4, atol=SCORE_ATOL[torch.float32])
    assert torch.equal(out, run())


def test_split_count_covers_the_gpu_and_depends_on_the_shape_only():
    assert split_for(1 * 16, 1, 16) == 16  # CLIP [CLS]: 16 heads -> 256 CTAs
    assert split_for(45, 1) == 4  # LowRank at LLaVA-NeXT: 47 query tiles -> 188 CTAs
    assert split_for(1440, 1) == 1  # enough CTAs already
    assert split_for(3, 1) == 8  # capped
