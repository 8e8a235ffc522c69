"""CUDA backend of ``routed_layer`` (kernels: csrc/include/vtprune/routed_layer.cuh).

The launchers of the three row kernels; the layer walk around them is shared with the Triton backend
(:mod:`vtprune._routed_fused`).
"""

from __future__ import annotations

from functools import partial

import torch

from vtprune._ext import load_extension
from vtprune._host import call
from vtprune._routed_fused import fused_routed_layer
from vtprune.cuda import current_stream, custom_op, device_i64, dtype_code, pointer


def _check_rows(x: torch.Tensor, idx: torch.Tensor, **rows: torch.Tensor) -> None:
    """Every compact operand must be a contiguous [B, K, D] tensor of x's dtype (the kernels read raw bytes)."""
    shape = (x.shape[0], idx.shape[1], x.shape[2])
    for name, t in rows.items():
        if t.dtype != x.dtype or tuple(t.shape) != shape or not t.is_contiguous() or t.device != x.device:
            raise ValueError(f"{name} must be a contiguous {list(shape)} {x.dtype} tensor on {x.device}, got "
                             f"{list(t.shape)} {t.dtype} on {t.device} (contiguous: {t.is_contiguous()})")


def gather_rmsnorm(x, idx, weight, eps: float) -> torch.Tensor:
    """``RMSNorm(x[b, idx[b]])``: x [B, L, D] (unit stride on D), idx int64 [B, K] -> [B, K, D]."""
    B, L, D = x.shape
    K = idx.shape[1]
    out = torch.empty(B, K, D, dtype=x.dtype, device=x.device)  # [B, K, D]
    with torch.cuda.device(x.device):
        load_extension().routed_gather_rmsnorm(
            pointer(x), pointer(idx), pointer(weight), pointer(out), B, L, K, D, x.stride(0), x.stride(1),
            float(eps), dtype_code(x.dtype), current_stream(x.device),
        )
    return out


def gather_add_rmsnorm(x, idx, delta, weight, eps: float) -> torch.Tensor:
    """``delta <- x[I] + delta`` in place and return ``RMSNorm(delta)`` [B, K, D] (delta contiguous)."""
    B, L, D = x.shape
    K = idx.shape[1]
    _check_rows(x, idx, delta=delta)
    out = torch.empty(B, K, D, dtype=x.dtype, device=x.device)  # [B, K, D]
    with torch.cuda.device(x.device):
        load_extension().routed_gather_add_rmsnorm(
            pointer(x), pointer(idx), pointer(delta), pointer(weight), pointer(out), B, L, K, D, x.stride(0),
            x.stride(1), float(eps), dtype_code(x.dtype), current_stream(x.device),
        )
    return out


def add_scatter(x, idx, mid, delta) -> None:
    """``x[b, idx[b]] = mid + delta`` in place (mid, delta [B, K, D] contiguous)."""
    B, L, D = x.shape
    _check_rows(x, idx, mid=mid, delta=delta)
    with torch.cuda.device(x.device):
        load_extension().routed_add_scatter(
            pointer(x), pointer(idx), pointer(mid), pointer(delta), B, L, idx.shape[1], D, x.stride(0),
            x.stride(1), dtype_code(x.dtype), current_stream(x.device),
        )


def _kernels():
    """The three row kernels, each through its custom op ``torch.ops.vtprune.cuda_routed_*`` while
    torch.compile traces, else launched directly."""
    return tuple(partial(call, custom_op(f"routed_{fn.__name__}"), fn)
                 for fn in (gather_rmsnorm, gather_add_rmsnorm, add_scatter))


def routed_layer(layer, hidden_states, routed_idx, *, position_embeddings, attention_mask=None,
                 past_key_values=None, cache_position=None, **layer_kwargs):
    """CUDA backend of :func:`vtprune.ops.routed_layer` (arguments checked there)."""
    idx = device_i64(routed_idx, hidden_states.device)  # [B, K]; a CPU index is copied without a sync
    return fused_routed_layer(layer, hidden_states, idx, _kernels(), backend="cuda",
                              position_embeddings=position_embeddings, attention_mask=attention_mask,
                              past_key_values=past_key_values, cache_position=cache_position,
                              layer_kwargs=layer_kwargs)
