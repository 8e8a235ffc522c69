"""CUDA backend of ``routed_layer`` (kernels: csrc/include/vtprune/routed_layer.cuh).

The decoder layer is re-run as its pre-norm structure, with the layer's own attention and MLP modules on the
compact ``[B, K, D]`` batch and three row kernels around them::

    n1 = RMSNorm1(x[I])                 gather_rmsnorm       (gather fused into the first read)
    a  = layer.self_attn(n1)
    n2 = RMSNorm2(x[I] + a)             gather_add_rmsnorm   (the sum overwrites ``a``)
    x[I] = (x[I] + a) + layer.mlp(n2)   add_scatter          (scatter fused into the last write, in place)

:func:`fused_routed_layer` is that walk with the three kernels as a parameter, so the Triton backend can run
the same code with its kernels (it keeps its own copy of the walk for now).
"""

from __future__ import annotations

import torch

from vtprune._ext import load_extension
from vtprune.cuda import current_stream, device_i64, dtype_code, pointer
from vtprune.reference.routed_layer import gather_position_embeddings

# Decoder layers whose forward is exactly norm -> self_attn -> residual -> norm -> mlp -> residual (checked
# against transformers 5.17-5.23). Others (Gemma's sandwich norms, (1 + w) norms, ...) would be silently
# wrong if re-implemented this way, so they are refused.
SUPPORTED_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen2_5_VLDecoderLayer")


def _rmsnorm_params(layer, name: str, x: torch.Tensor, backend: str) -> tuple[torch.Tensor, float]:
    norm = getattr(layer, name, None)
    w, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    D = x.shape[-1]
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (D,) or not isinstance(eps, (int, float)):
        raise ValueError(
            f"backend={backend!r} for routed_layer: layer.{name} must be an RMSNorm with weight [D = {D}] and "
            f"variance_epsilon (LLaMA/Qwen2 style), got {type(norm).__name__}; use backend='reference'"
        )
    if w.dtype != x.dtype or w.device != x.device:
        raise ValueError(
            f"backend={backend!r} for routed_layer: layer.{name}.weight must have hidden_states' dtype and "
            f"device ({x.dtype}, {x.device}), got ({w.dtype}, {w.device})"
        )
    return w.contiguous(), float(eps)


def check_layer(layer, hidden_states: torch.Tensor, backend: str) -> tuple[torch.Tensor, float, torch.Tensor, float]:
    """Norm parameters ``(w1, eps1, w2, eps2)`` of a layer the fused backends can re-run; ValueError otherwise."""
    if type(layer).__name__ not in SUPPORTED_LAYERS:
        raise ValueError(
            f"backend={backend!r} for routed_layer re-implements the decoder layer's forward and supports "
            f"{', '.join(SUPPORTED_LAYERS)}; got {type(layer).__name__} (use backend='reference')"
        )
    if hidden_states.stride(-1) != 1:
        raise ValueError(f"hidden_states must have unit stride on D (it is updated in place), "
                         f"got strides {hidden_states.stride()}")
    return (*_rmsnorm_params(layer, "input_layernorm", hidden_states, backend),
            *_rmsnorm_params(layer, "post_attention_layernorm", hidden_states, backend))


def fused_routed_layer(layer, hidden_states, routed_idx, kernels, *, backend: str, position_embeddings,
                       attention_mask, past_key_values, cache_position, layer_kwargs):
    """``x[I] = Layer(x[I])`` in place with ``kernels = (gather_rmsnorm, gather_add_rmsnorm, add_scatter)``.

    The kernels have the signatures of this module's launchers; ``routed_idx`` is int64 [B, K] on x's device.
    """
    gather_rmsnorm, gather_add_rmsnorm, add_scatter = kernels
    w1, eps1, w2, eps2 = check_layer(layer, hidden_states, backend)
    x = hidden_states  # [B, L, D], updated in place
    normed = gather_rmsnorm(x, routed_idx, w1, eps1)  # [B, K, D]
    kwargs = dict(layer_kwargs, position_ids=None)  # positions travel in the gathered (cos, sin)
    if cache_position is not None:
        kwargs["cache_position"] = cache_position
    attn = layer.self_attn(hidden_states=normed, attention_mask=attention_mask,
                           position_embeddings=gather_position_embeddings(position_embeddings, routed_idx),
                           past_key_values=past_key_values, **kwargs)[0].contiguous()  # [B, K, D]
    del normed
    normed = gather_add_rmsnorm(x, routed_idx, attn, w2, eps2)  # attn := x[I] + attn (mid)
    mlp = layer.mlp(normed).contiguous()  # [B, K, D]
    add_scatter(x, routed_idx, attn, mlp)
    return x


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


KERNELS = (gather_rmsnorm, gather_add_rmsnorm, add_scatter)


def routed_layer(layer, hidden_states, routed_idx, *, position_embeddings, attention_mask=None,
                 past_key_values=None, cache_position=None, **layer_kwargs):
    """CUDA backend of :func:`vtprune.ops.routed_layer` (arguments checked there)."""
    idx = device_i64(routed_idx, hidden_states.device)  # [B, K]; a CPU index is copied without a sync
    return fused_routed_layer(layer, hidden_states, idx, KERNELS, backend="cuda",
                              position_embeddings=position_embeddings, attention_mask=attention_mask,
                              past_key_values=past_key_values, cache_position=cache_position,
                              layer_kwargs=layer_kwargs)
