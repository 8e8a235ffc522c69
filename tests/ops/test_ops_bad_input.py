"""Bad input to the public ops raises ValueError naming the argument; backend selection errors are explicit."""

import pytest
import torch

from vtprune import BackendUnavailableError, _backend
from vtprune.ops import (
    attention_scores,
    attention_with_scores,
    contextual_merge,
    lowrank_scores,
    select_and_merge,
    topk_keep_order,
)

Q, K = torch.randn(2, 4, 8, 4), torch.randn(2, 2, 8, 4)
SP = torch.tensor([[0, 8], [1, 6]])


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=torch.randn(4, 8, 4)), "q must have 4 dimensions"),
    (dict(k=torch.randn(2, 3, 8, 4)), "multiple of k heads"),
    (dict(k=torch.randn(3, 2, 8, 4)), "k must have shape"),
    (dict(k=K.half()), "k must have the dtype of q"),
    (dict(q=Q.long()), "q must have dtype"),
    (dict(query_spans=torch.tensor([[0, 9], [0, 1]])), "query_spans: every span"),
    (dict(key_spans=torch.tensor([[0, 0], [0, 1]])), "key_spans: every count must be positive"),
    (dict(key_spans=torch.tensor([[0, 1]])), r"key_spans must have shape \[B, 2\]"),
    (dict(key_spans=SP.int()), "key_spans must have dtype"),
    (dict(key_padding_mask=torch.ones(2, 7, dtype=torch.bool)), "key_padding_mask must have shape"),
    (dict(key_padding_mask=torch.ones(2, 8)), "key_padding_mask must have dtype"),
    (dict(scale="x"), "scale must be"),
])
def test_attention_scores_errors(kwargs, match):
    args = dict(q=Q, k=K, query_spans=SP, key_spans=SP, causal=True, key_padding_mask=None, scale=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        attention_scores(**args)


def test_attention_with_scores_checks_v():
    with pytest.raises(ValueError, match="v must have shape"):
        attention_with_scores(Q, K, torch.randn(2, 2, 7, 4), query_spans=SP, key_spans=SP, causal=False)


def test_topk_errors():
    s = torch.randn(2, 5)
    with pytest.raises(ValueError, match="k must be <= the number of scores"):
        topk_keep_order(s, 6)
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk_keep_order(s, 0)
    with pytest.raises(ValueError, match="k must be an int"):
        topk_keep_order(s, 2.0)
    with pytest.raises(ValueError, match=r"lengths: every length must lie in \[3, 5\]"):
        topk_keep_order(s, 3, lengths=torch.tensor([5, 2]))
    with pytest.raises(ValueError, match="scores must have 2 dimensions"):
        topk_keep_order(torch.randn(5), 1)


def test_merge_errors():
    x = torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match="exceeds the tokens available"):
        contextual_merge(x, x, torch.tensor([[0, 1], [2, 3]]), 5)
    with pytest.raises(ValueError, match="keep_idx must be strictly ascending"):
        contextual_merge(x, x, torch.tensor([[1, 0], [2, 3]]), 1)
    with pytest.raises(ValueError, match="keep_idx must be strictly ascending"):
        contextual_merge(x, x, torch.tensor([[0, 4], [2, 3]]), 1, lengths=torch.tensor([4, 6]))
    with pytest.raises(ValueError, match="metric must have shape"):
        contextual_merge(x, torch.randn(2, 5, 4), torch.tensor([[0], [1]]), 1)
    with pytest.raises(ValueError, match="num_contextual must be >= 0"):
        select_and_merge(torch.randn(2, 6), x, x, 2, -1)
    with pytest.raises(ValueError, match="num_dominant must be <= the number of scores"):
        select_and_merge(torch.randn(2, 6), x, x, 7, 0)
    with pytest.raises(ValueError, match=r"num_dominant \+ num_contextual = 3 \+ 2 exceeds"):
        select_and_merge(torch.randn(2, 6), x, x, 3, 2, lengths=torch.tensor([6, 4]))
    with pytest.raises(ValueError, match="scores must have shape"):
        select_and_merge(torch.randn(2, 5), x, x, 2, 1)


def test_lowrank_errors():
    h = torch.randn(1, 6, 8)
    with pytest.raises(ValueError, match="u.shape\\[0\\] must equal h's hidden size"):
        lowrank_scores(h, torch.randn(7, 2), torch.randn(8, 2), visual_spans=torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match="u and v must have the same shape"):
        lowrank_scores(h, torch.randn(8, 2), torch.randn(8, 3), visual_spans=torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match="visual_spans: every span"):
        lowrank_scores(h, torch.randn(8, 2), torch.randn(8, 2), visual_spans=torch.tensor([[4, 3]]))


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("VTPRUNE_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert _backend.resolve("topk_keep_order", "auto", cpu) == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        topk_keep_order(torch.randn(1, 3), 1, backend="numpy")
    monkeypatch.setenv("VTPRUNE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="VTPRUNE_BACKEND must be one of"):
        topk_keep_order(torch.randn(1, 3), 1)
    monkeypatch.setenv("VTPRUNE_BACKEND", "reference")
    assert _backend.resolve("topk_keep_order", None, cpu) == "reference"
    # Triton on CPU tensors needs the interpreter; explicit requests never fall back.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1|not installed"):
        topk_keep_order(torch.randn(1, 3), 1, backend="triton")
    with pytest.raises(BackendUnavailableError):
        topk_keep_order(torch.randn(1, 3), 1, backend="cuda")


# ---- issue #11 item 10: inputs that ran silently or failed with an internal error ------------------------------

EMPTY_BATCH = [
    ("attention_scores", lambda: attention_scores(torch.randn(0, 4, 8, 4), torch.randn(0, 2, 8, 4),
                                                  query_spans=torch.zeros(0, 2, dtype=torch.int64),
                                                  key_spans=torch.zeros(0, 2, dtype=torch.int64), causal=True), "q"),
    ("attention_with_scores", lambda: attention_with_scores(
        torch.randn(0, 4, 8, 4), torch.randn(0, 2, 8, 4), torch.randn(0, 2, 8, 4),
        query_spans=torch.zeros(0, 2, dtype=torch.int64), key_spans=torch.zeros(0, 2, dtype=torch.int64),
        causal=True), "q"),
    ("topk_keep_order", lambda: topk_keep_order(torch.randn(0, 5), 2), "scores"),
    ("contextual_merge", lambda: contextual_merge(torch.randn(0, 6, 4), torch.randn(0, 6, 4),
                                                  torch.zeros(0, 2, dtype=torch.int64), 1), "x"),
    ("select_and_merge", lambda: select_and_merge(torch.randn(0, 6), torch.randn(0, 6, 4), torch.randn(0, 6, 4),
                                                  2, 1), "x"),
    ("lowrank_scores", lambda: lowrank_scores(torch.randn(0, 6, 8), torch.randn(8, 2), torch.randn(8, 2),
                                              visual_spans=torch.zeros(0, 2, dtype=torch.int64)), "h"),
]


@pytest.mark.parametrize("op, call, name", EMPTY_BATCH, ids=[c[0] for c in EMPTY_BATCH])
def test_batch_zero_is_refused(op, call, name):
    with pytest.raises(ValueError, match=rf"{name} must have batch size B >= 1, got shape \(0,"):
        call()


def test_attention_with_scores_v_none():
    with pytest.raises(ValueError, match="v must be a Tensor .* got None"):
        attention_with_scores(Q, K, None, query_spans=SP, key_spans=SP, causal=True)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 0.0, -0.5, True])
@pytest.mark.parametrize("op", ["attention_scores", "attention_with_scores"])
def test_scale_must_be_finite_and_positive(op, scale):
    args = (Q, K) if op == "attention_scores" else (Q, K, K)
    fn = attention_scores if op == "attention_scores" else attention_with_scores
    with pytest.raises(ValueError, match="scale must be"):
        fn(*args, query_spans=SP, key_spans=SP, causal=True, scale=scale)


@pytest.mark.parametrize("causal", ["no", "False", 0, 1, None, torch.tensor(True)])
@pytest.mark.parametrize("op", ["attention_scores", "attention_with_scores"])
def test_causal_must_be_a_bool(op, causal):
    """``causal="no"`` used to run as causal (a non-empty string is truthy)."""
    args = (Q, K) if op == "attention_scores" else (Q, K, K)
    fn = attention_scores if op == "attention_scores" else attention_with_scores
    with pytest.raises(ValueError, match="causal must be a bool"):
        fn(*args, query_spans=SP, key_spans=SP, causal=causal)


def test_zero_width_tokens_and_metric_are_refused():
    x = torch.randn(2, 6, 4)
    keep = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="metric must have shape .* dk >= 1 channels, got \\(2, 6, 0\\)"):
        contextual_merge(x, torch.randn(2, 6, 0), keep, 1)
    with pytest.raises(ValueError, match="metric must have shape .* dk >= 1 channels"):
        select_and_merge(torch.randn(2, 6), x, torch.randn(2, 6, 0), 2, 1)
    with pytest.raises(ValueError, match="x must have N >= 1 tokens of D >= 1 channels"):
        contextual_merge(torch.randn(2, 6, 0), x, keep, 1)
    with pytest.raises(ValueError, match="rank R >= 1"):
        lowrank_scores(torch.randn(1, 6, 8), torch.randn(8, 0), torch.randn(8, 0), visual_spans=torch.tensor([[0, 3]]))
