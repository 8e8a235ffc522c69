"""Helpers shared by the model tests (not in conftest.py: test modules import them by name, and another test
folder's conftest module would shadow this folder's in a session that collects both)."""

import torch


def row(inputs, b):
    """Batch row b alone, without its padding (every row of ``inputs`` has one image)."""
    keep = inputs["attention_mask"][b].bool()
    return {"input_ids": inputs["input_ids"][b:b + 1, keep], "attention_mask": inputs["attention_mask"][b:b + 1, keep],
            "pixel_values": inputs["pixel_values"][b:b + 1]}


SCHEDULE = dict(encoder=(12, 2), stages={1: (8, 2), 2: (6, 1), 3: (4, 1)})


def check_batch_equals_rows(model, batch, row, gen):
    """Last-token logits and greedy tokens of a padded two-row batch equal each row run alone (``row(batch, b)``)."""
    n = gen["max_new_tokens"]
    both = model(**batch).logits[:, -1]
    tokens = model.generate(**batch, **gen)[:, -n:]
    for b in range(2):
        torch.testing.assert_close(both[b], model(**row(batch, b)).logits[0, -1], atol=1e-4, rtol=1e-4)
        assert torch.equal(tokens[b], model.generate(**row(batch, b), **gen)[0, -n:])
