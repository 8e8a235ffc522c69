"""The ground truths of the op tests: docs/ops.md written plainly, in float64 (or exact Python), per op.

One module, so that every backend is held to the same transcription of the spec. Written for clarity, not
speed: full ``L x L`` softmaxes, Python loops over rows; only small test shapes call them.
"""

from __future__ import annotations

import math

import torch


def topk_by_rule(row: list[float], k: int, length: int) -> list[int]:
    """docs/ops.md#topk_keep_order for one row: rank the first ``length`` positions valid-first (NaN last), higher
    score first (``-0.0`` equals ``+0.0``), lower position first; return the first ``k`` ascending."""

    def rank(j):
        v = row[j]
        return (1, 0.0, j) if math.isnan(v) else (0, -v, j)

    return sorted(sorted(range(length), key=rank)[:k])


def attention(q, k, v, qspans, kspans, causal, kpm, scale):
    """docs/ops.md#attention_scores: ``(out [B, H, L, dv] or None, scores [B, Kmax])`` in float64.

    The full ``L x L`` softmax per head (GQA: query head h reads key head ``h // (H // Hkv)``), masked causally
    and by ``kpm``; a query row with no valid key is all zero. ``scores[b, j]`` = the mean over query heads and
    the query span's rows of the probability of key ``Ks_start + j``; zero past each row's key count.
    """
    B, H, L, d = q.shape
    g = H // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    kd = k.double().repeat_interleave(g, dim=1)  # [B, H, L, d]
    allowed = torch.ones(B, 1, L, L, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool).tril()
    if kpm is not None:
        allowed = allowed & kpm[:, None, None, :]
    logits = (q.double() @ kd.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, -1).nan_to_num(0.0)  # [B, H, L, L]; a row with no valid key is all zero
    out = None if v is None else probs @ v.double().repeat_interleave(g, dim=1)
    scores = torch.zeros(B, int(kspans[:, 1].max()), dtype=torch.float64)
    for b in range(B):  # spans differ per row: slice each row's query rows and key columns
        (qs, qc), (ks, kc) = qspans[b].tolist(), kspans[b].tolist()
        scores[b, :kc] = probs[b, :, qs : qs + qc, ks : ks + kc].sum((0, 1)) / (H * qc)
    return out, scores


def merge_targets(n_valid: int, keep: list[int], C: int) -> tuple[list[int], list[int]]:
    """docs/ops.md#contextual_merge targets of one row: ``(targets, the other non-kept valid positions)``."""
    rest = [p for p in range(n_valid) if p not in keep]
    step = max(1, len(rest) // max(C, 1))
    targets = rest[0::step][:C]
    return targets, [p for p in rest if p not in targets]


def contextual_merge(x, m, keep, C, length):
    """docs/ops.md#contextual_merge for one row: ``(tokens [k + C, D] float64, targets)``.

    Every non-target member joins the target of largest cosine similarity of ``m`` (ties: the lower target);
    a contextual token is its target plus the mean of its members.
    """
    x, m = x.double(), m.double()
    keep = keep.tolist()
    dominant = [x[p] for p in keep]
    if C == 0:
        return torch.stack(dominant), []
    T, rest = merge_targets(length, keep, C)
    unit = m / m.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    members = {t: [] for t in T}
    for a in rest:
        sims = [float(unit[a] @ unit[t]) for t in T]
        best = max(range(len(T)), key=lambda i: (sims[i], -i))  # ties -> lower target
        members[T[best]].append(a)
    ctx = [x[t] + (torch.stack([x[a] for a in members[t]]).mean(0) if members[t] else 0) for t in T]
    return torch.stack(dominant + ctx), T


def lowrank_scores(h, u, v, spans, kpm):
    """docs/ops.md#lowrank_scores in float64, per batch row: ``S = S_V2V * S_T2V`` [B, Vmax], zero past each
    row's visual count; a row without a text token has ``S_T2V = 1``."""
    B, L, _ = h.shape
    R = u.shape[1]
    out = torch.zeros(B, int(spans[:, 1].max()), dtype=torch.float64)
    for b in range(B):
        a, bb = h[b].double() @ u.double(), h[b].double() @ v.double()
        allowed = torch.ones(L, L, dtype=torch.bool).tril()
        real = torch.ones(L, dtype=torch.bool) if kpm is None else kpm[b]
        allowed &= real[None, :]
        p = torch.softmax((a @ bb.T / R**0.5).masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        s, c = spans[b].tolist()
        vis = torch.zeros(L, dtype=torch.bool)
        vis[s : s + c] = True
        txt = real & ~vis
        s_v2v = p[vis][:, s : s + c].mean(0)
        s_t2v = p[txt][:, s : s + c].mean(0) if txt.any() else torch.ones(c, dtype=torch.float64)
        out[b, :c] = s_v2v * s_t2v
    return out
