"""Reference contextual merge (docs/ops.md#contextual_merge, the official VisionDrop / VisionZip rule), batched.

Per row: R = non-kept valid positions ascending, n = |R|, step = max(1, n // C), targets T = R[0::step][:C].
Every other token of R joins the target whose key metric has the largest cosine similarity (ties: lower
target). contextual_t = x[t] + mean(x[a] for a assigned to t), or x[t] alone when none joined. Output:
dominant tokens in position order, then the C contextual tokens in target order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtprune._host import to_device_i64


def merge_with_targets(x, metric, keep_idx, num_contextual, lengths=None):
    """The merge, also returning the target positions: (tokens [B, k+C, D], target_idx [B, C])."""
    B, N, D = x.shape
    C = num_contextual
    dev = x.device
    dominant = x.gather(1, keep_idx[:, :, None].expand(-1, -1, D))  # [B, k, D]
    if C == 0:
        return dominant, torch.empty(B, 0, dtype=torch.int64, device=dev)
    pos = torch.arange(N, device=dev)
    length = torch.full((B,), N, device=dev) if lengths is None else to_device_i64(lengths, dev)
    rest = (pos < length[:, None]).scatter(1, keep_idx, False)  # [B, N] the set R
    rank = rest.long().cumsum(1) - 1  # rank of each position inside R
    step = (rest.sum(1) // C).clamp(min=1)[:, None]  # [B, 1]
    is_target = rest & (rank % step == 0) & (rank // step < C)
    slot = torch.where(is_target, rank // step, C)  # C = "not a target" sink slot
    target_idx = torch.zeros(B, C + 1, dtype=torch.int64, device=dev).scatter(1, slot, pos.expand(B, N))[:, :C]

    m = F.normalize(metric.float(), dim=-1)  # cosine similarity = dot product of unit vectors
    sim = m @ m.gather(1, target_idx[:, :, None].expand(-1, -1, m.shape[-1])).transpose(1, 2)  # [B, N, C]
    choice = sim.argmax(-1)  # first maximum: ties go to the lower target
    member = rest & ~is_target
    into = torch.where(member, choice, C)  # non-members go to the sink slot
    xf = x.float()
    sums = torch.zeros(B, C + 1, D, device=dev).scatter_add(1, into[:, :, None].expand(-1, -1, D), xf)[:, :C]
    counts = torch.zeros(B, C + 1, device=dev).scatter_add(1, into, member.float())[:, :C]
    targets = xf.gather(1, target_idx[:, :, None].expand(-1, -1, D))
    contextual = targets + sums / counts.clamp(min=1)[:, :, None]
    return torch.cat([dominant, contextual.to(x.dtype)], dim=1), target_idx


def contextual_merge(x, metric, keep_idx, num_contextual, *, lengths=None):
    return merge_with_targets(x, metric, keep_idx, num_contextual, lengths)[0]
