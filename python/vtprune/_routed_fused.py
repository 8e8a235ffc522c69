"""The fused routed-layer walk shared by the Triton and CUDA backends of ``routed_layer`` (docs/ops.md#routed_layer).

The decoder layer is re-run as its pre-norm structure, with the layer's own attention and MLP modules on the
compact ``[B, K, D]`` batch and three row kernels around them::

    n1 = RMSNorm1(x[I])                 gather_rmsnorm       (gather fused into the first read)
    a  = layer.self_attn(n1)            the layer's own attention (SDPA / FlashAttention / eager)
    n2 = RMSNorm2(x[I] + a)             gather_add_rmsnorm   (residual add and second norm; the sum overwrites a)
    x[I] = (x[I] + a) + layer.mlp(n2)   add_scatter          (scatter fused into the last write, in place)

Only ``[B, K, D]`` intermediates are allocated and skipped rows of ``x`` are never read or written. The
layer's own forward (and hooks on the decoder-layer module itself) is not called, which is why only layer
classes whose forward is exactly this structure are accepted. Each backend passes its three kernels.
"""

from __future__ import annotations

import weakref

import torch

from vtprune._compat import cache_kwargs

# Decoder layers whose forward is exactly norm -> self_attn -> residual -> norm -> mlp -> residual (checked
# against transformers 5.17-5.23). Others (Gemma's sandwich norms, (1 + w) norms, ...) would be silently
# wrong if re-implemented this way, so they are refused.
SUPPORTED_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen2_5_VLDecoderLayer",
                   "Qwen3VLTextDecoderLayer")  # Qwen3-VL: the same layer, its q/k norms inside self_attn


def gather_position_embeddings(position_embeddings, routed_idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gather ``(cos, sin)`` of the full sequence at the routed positions along the sequence dim (-2).

    Each tensor is ``[..., B or 1, L, d]`` (Qwen2.5-VL M-RoPE variants may carry a leading 3); a batch dim of
    1 (positions shared by the batch) is broadcast. ``routed_idx [B, K]`` -> ``[..., B, K, d]``. Shared
    positions take one ``index_select`` of the ``B * K`` rows (a gather over an expanded ``[B, L, d]`` view
    costs several times more on the CPU); the values are the same either way.
    """
    B, K = routed_idx.shape
    flat = None
    out = []
    for t in position_embeddings:
        *lead, b, L, d = t.shape
        if b == 1:
            if flat is None or flat.device != t.device:
                flat = routed_idx.reshape(-1).to(t.device)  # [B * K], shared by cos and sin
            out.append(t.index_select(-2, flat).view(*lead, B, K, d))
        else:
            idx = routed_idx.to(t.device)
            out.append(t.gather(-2, idx[:, :, None].expand(*lead, B, K, d)))
    return tuple(out)


def _rmsnorm_params(layer, name: str, x: torch.Tensor, backend: str) -> tuple[torch.Tensor, float]:
    # the modules' own dicts first: nn.Module.__getattr__ costs more than the rest of this check
    norm = layer._modules.get(name) if hasattr(layer, "_modules") else None
    norm = getattr(layer, name, None) if norm is None else norm
    w = norm._parameters.get("weight") if hasattr(norm, "_parameters") else None
    w = getattr(norm, "weight", None) if w is None else w
    eps = getattr(norm, "variance_epsilon", None)
    D = x.shape[-1]
    if not isinstance(w, torch.Tensor) or w.shape != (D,) or not isinstance(eps, (int, float)):
        raise ValueError(
            f"backend={backend!r} for routed_layer: layer.{name} must be an RMSNorm with weight [D = {D}] and "
            f"variance_epsilon (LLaMA/Qwen2 style), got {type(norm).__name__}; use backend='reference'"
        )
    if w.dtype != x.dtype or w.device != x.device:
        raise ValueError(
            f"backend={backend!r} for routed_layer: layer.{name}.weight must have hidden_states' dtype and "
            f"device ({x.dtype}, {x.device}), got ({w.dtype}, {w.device})"
        )
    return w if w.is_contiguous() else w.contiguous(), float(eps)


# id(layer) -> (weak reference, its two norm modules, their weights, the checked (w1, eps1, w2, eps2)): a layer
# checked before is re-checked by identity (same modules, same weight tensors, same dtype and device), which
# costs less than reading the modules again; replacing a norm or its weight falls back to the full check.
_CHECKED: dict[int, tuple] = {}


def check_layer(layer, hidden_states: torch.Tensor, backend: str) -> tuple[torch.Tensor, float, torch.Tensor, float]:
    """Norm parameters ``(w1, eps1, w2, eps2)`` of a layer the fused backends can re-run; ValueError otherwise."""
    if hidden_states.stride(-1) != 1:
        raise ValueError(f"hidden_states must have unit stride on D (it is updated in place), "
                         f"got strides {hidden_states.stride()}")
    hit = _CHECKED.get(id(layer))
    if hit is not None and hit[0]() is layer:
        _, n1, n2, w1, w2, params = hit
        mods = layer._modules
        if (mods.get("input_layernorm") is n1 and mods.get("post_attention_layernorm") is n2
                and n1._parameters.get("weight") is w1 and n2._parameters.get("weight") is w2
                and n1.variance_epsilon == params[1] and n2.variance_epsilon == params[3]
                and w1.dtype == hidden_states.dtype and w1.device == hidden_states.device
                and w2.dtype == hidden_states.dtype and w2.device == hidden_states.device
                and w1.shape[0] == hidden_states.shape[-1]):
            return params
    if type(layer).__name__ not in SUPPORTED_LAYERS:
        raise ValueError(
            f"backend={backend!r} for routed_layer re-implements the decoder layer's forward and supports "
            f"{', '.join(SUPPORTED_LAYERS)}; got {type(layer).__name__} (use backend='reference')"
        )
    params = (*_rmsnorm_params(layer, "input_layernorm", hidden_states, backend),
              *_rmsnorm_params(layer, "post_attention_layernorm", hidden_states, backend))
    mods = getattr(layer, "_modules", None)
    if mods is not None:
        n1, n2 = mods.get("input_layernorm"), mods.get("post_attention_layernorm")
        w1, w2 = n1._parameters.get("weight"), n2._parameters.get("weight")
        if w1 is params[0] and w2 is params[2]:  # contiguous weights: the parameters themselves
            if len(_CHECKED) >= 1024:
                _CHECKED.clear()
            _CHECKED[id(layer)] = (weakref.ref(layer), n1, n2, w1, w2, params)
    return params


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
                           **cache_kwargs(past_key_values), **kwargs)[0].contiguous()  # [B, K, D]
    del normed
    normed = gather_add_rmsnorm(x, routed_idx, attn, w2, eps2)  # attn := x[I] + attn (mid)
    mlp = layer.mlp(normed).contiguous()  # [B, K, D]
    add_scatter(x, routed_idx, attn, mlp)
    return x
