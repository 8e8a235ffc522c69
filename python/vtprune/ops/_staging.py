"""Host-to-device copies of small index tensors (spans, lengths, indices) that never wait for the device.

A copy from pageable host memory is synchronous on CUDA (the driver stages it and waits); from pinned memory
with ``non_blocking=True`` it is queued on the current stream like a kernel. The pinned buffer comes from
torch's caching host allocator, which keeps it alive until the queued copy has run.
"""

from __future__ import annotations

import torch


def to_device_i64(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """int64 contiguous ``t`` on ``device``; a CPU tensor bound for an accelerator goes through pinned memory.

    ``meta`` tensors carry no values, so nothing is staged for them.
    """
    if t is None:
        return None
    if t.device.type == "cpu" and device.type not in ("cpu", "meta"):
        staged = torch.empty(t.shape, dtype=torch.int64, pin_memory=True)
        staged.copy_(t)
        return staged.to(device, non_blocking=True)
    return t.to(device=device, dtype=torch.int64).contiguous()
