"""Triton follows the reference on non-finite inputs and on exact cosine ties (hypothesis, on purpose).

Semantics (vtprune.reference._common.masked_softmax, vtprune.reference.contextual_merge): a NaN or +-inf
logit among a query row's allowed keys makes that row NaN, so every score the row adds to is NaN; masked
keys never contribute. An exact cosine tie in the merge assignment goes to the lower target.
"""

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton.language", reason="Triton is not installed (pip install 'vtprune[triton]')")

from vtprune.ops import attention_scores, attention_with_scores, contextual_merge  # noqa: E402
from vtprune.ops.lowrank_scores import lowrank_scores  # noqa: E402

# interpreter runs are slow: a fixed example set, no shrinking (a failure prints its inputs)
SLOW = settings(max_examples=10, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow])
BAD = st.sampled_from([float("inf"), float("-inf"), float("nan")])


def same_nans_and_close(out, ref, rtol=1e-4, atol=1e-6):
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), (out, ref)
    ok = ~torch.isnan(ref)
    torch.testing.assert_close(out[ok], ref[ok], rtol=rtol, atol=atol)


@SLOW
@given(seed=st.integers(0, 2**16), which=st.sampled_from(["q", "k"]), bad=BAD, pos=st.integers(0, 23),
       dim=st.integers(0, 15), causal=st.booleans(), same_sign=st.booleans())
def test_attention_scores_nonfinite_inputs(seed, which, bad, pos, dim, causal, same_sign):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 2, 24, 16, generator=gen), torch.randn(1, 2, 24, 16, generator=gen)
    if same_sign:  # every logit of the poisoned row/column in that channel has one sign: all -inf on purpose
        k[..., dim] = k[..., dim].abs() + 0.5
        q[..., dim] = q[..., dim].abs() + 0.5
    (q if which == "q" else k)[0, 0, pos, dim] = bad
    spans = dict(query_spans=torch.tensor([[4, 16]]), key_spans=torch.tensor([[4, 16]]), causal=causal)
    ref = attention_scores(q, k, backend="reference", **spans)
    out = attention_scores(q, k, backend="triton", **spans)
    same_nans_and_close(out, ref)
    ref_o, ref_s = attention_with_scores(q, k, k, backend="reference", **spans)
    out_o, out_s = attention_with_scores(q, k, k, backend="triton", **spans)
    same_nans_and_close(out_s, ref_s)
    same_nans_and_close(out_o, ref_o, rtol=1e-3, atol=1e-4)


@SLOW
@given(seed=st.integers(0, 2**16), bad=BAD, pos=st.integers(0, 19), dim=st.integers(0, 15))
def test_lowrank_scores_nonfinite_inputs(seed, bad, pos, dim):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(1, 20, 16, generator=gen)
    u, v = torch.randn(16, 8, generator=gen) / 2, torch.randn(16, 8, generator=gen) / 2
    h[0, pos, dim] = bad
    spans = torch.tensor([[3, 12]])
    ref = lowrank_scores(h, u, v, visual_spans=spans, backend="reference")
    out = lowrank_scores(h, u, v, visual_spans=spans, backend="triton")
    same_nans_and_close(out, ref)


@SLOW
@given(seed=st.integers(0, 2**16), copies=st.lists(st.integers(0, 3), min_size=4, max_size=4),
       scales=st.lists(st.sampled_from([1.0, 2.0, 0.5, 4.0]), min_size=4, max_size=4), zero_member=st.booleans())
def test_merge_exact_ties_go_to_the_lower_target(seed, copies, scales, zero_member):
    """Targets that are (scaled) copies of one another tie exactly for every member; a zero member ties
    with every target. Reference and Triton must merge the same members into the same targets."""
    gen = torch.Generator().manual_seed(seed)
    N, D, dk, C = 24, 8, 8, 4
    x = torch.randn(1, N, D, generator=gen)
    metric = torch.randn(1, N, dk, generator=gen)
    keep = torch.tensor([[0, 5, 11, 17]])
    # R = positions not kept; n = 20, step = 5: targets are R[0], R[5], R[10], R[15]
    rest = [p for p in range(N) if p not in keep[0].tolist()]
    targets = [rest[c * 5] for c in range(C)]
    for c in range(C):  # target c copies target copies[c] (scaled): exact cosine ties
        metric[0, targets[c]] = metric[0, targets[copies[c]]] * scales[c]
    members = [p for p in rest if p not in targets]
    for i, p in enumerate(members[:6]):  # members that point along a target: ties between its copies
        metric[0, p] = metric[0, targets[i % C]] * 3.0
    if zero_member:
        metric[0, members[-1]] = 0.0
    ref = contextual_merge(x, metric, keep, C, backend="reference")
    out = contextual_merge(x, metric, keep, C, backend="triton")
    # x is random, so a member merged into another target changes that target's mean
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
