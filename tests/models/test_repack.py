"""A batch is re-packed to its longest real row after each prune (issue 12, item 4): a text-only row, or a row
whose image keeps fewer tokens, does not hold the batch at the unpruned length, and every row still computes
what it computes alone."""

import pytest
import torch

import vtprune
from vtprune._compat import cache_kwargs
from vtprune.models._tiny import image_tokens, tiny_inputs, tiny_llava

PREFIX, SUFFIX = (3, 6), (5, 7)  # row 0: 8 text tokens + its image; row 1: 13 text tokens, no image


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _alone(model, b):
    one = tiny_inputs(model, PREFIX, SUFFIX, images=[True, False], seed=3)
    real = one["attention_mask"][b].bool()
    ids = one["input_ids"][b][real][None]
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if b == 0:
        out["pixel_values"] = one["pixel_values"]
    return out


@pytest.mark.parametrize("method, lengths", [
    # FastV keeps every image token until layer 2, then 8: layers 2.. run on max(8 + 8, 13) tokens
    (lambda: vtprune.FastV(layer=2, tokens=8, backend="reference"), lambda n: (8 + n, 8 + n, 16, 16)),
    # the encoder stage keeps 6 tokens: every layer runs on max(8 + 6, 13), then 8 + 4
    (lambda: vtprune.VisionDrop(encoder=(4, 2), stages={2: (3, 1)}, backend="reference"),
     lambda n: (14, 14, 13, 13)),
])
def test_batch_is_repacked_to_its_longest_real_row(model, method, lengths):
    batch = tiny_inputs(model, PREFIX, SUFFIX, images=[True, False], seed=3)
    n = image_tokens(model)
    assert batch["input_ids"].shape[1] == 8 + n  # the text-only row is padded to the image row's length
    with vtprune.apply(model, method()):
        out = model(**batch, use_cache=True)
        cache = out.past_key_values
        assert [cache.get_seq_length(i) for i in range(4)] == list(lengths(n))
        for b in range(2):  # each row's last-token logits are the ones it gets alone
            alone = model(**_alone(model, b)).logits[0, -1]
            torch.testing.assert_close(out.logits[b, -1], alone, atol=1e-4, rtol=1e-4)
        # decoding continues on the re-packed cache as each row alone would
        B = 2
        step = {"input_ids": torch.full((B, 1), 5),
                "attention_mask": torch.cat([batch["attention_mask"], torch.ones(B, 1, dtype=torch.long)], 1)}
        nxt = model(**step, use_cache=True, **cache_kwargs(cache)).logits[:, -1]
        for b in range(2):
            one = _alone(model, b)
            first = model(**one, use_cache=True)
            grown = {"input_ids": torch.full((1, 1), 5),
                     "attention_mask": torch.ones(1, one["input_ids"].shape[1] + 1, dtype=torch.long)}
            ref = model(**grown, use_cache=True, **cache_kwargs(first.past_key_values)).logits[0, -1]
            torch.testing.assert_close(nxt[b], ref, atol=1e-4, rtol=1e-4)
