"""Tiny LLaMA / Qwen2 / Qwen2.5-VL decoder layers and models for the ALVTS tests (random weights)."""

from __future__ import annotations

import torch

FAMILIES = ("llama", "qwen2", "qwen2_5_vl")


def tiny_config(family: str, attn: str = "sdpa", layers: int = 2):
    """hidden 64, 4 query heads, 2 KV heads (GQA), head dim 16."""
    common = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=layers, vocab_size=100, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    if family == "llama":
        from transformers import LlamaConfig

        cfg = LlamaConfig(**common)
    elif family == "qwen2":
        from transformers import Qwen2Config

        cfg = Qwen2Config(**common)
    else:
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

        cfg = Qwen2_5_VLTextConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                              "mrope_section": [2, 3, 3]})
    cfg._attn_implementation = attn
    return cfg


def layer_classes(family: str):
    """(decoder layer class, rotary embedding class) of a family."""
    if family == "llama":
        from transformers.models.llama import modeling_llama as m

        return m.LlamaDecoderLayer, m.LlamaRotaryEmbedding
    if family == "qwen2":
        from transformers.models.qwen2 import modeling_qwen2 as m

        return m.Qwen2DecoderLayer, m.Qwen2RotaryEmbedding
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m

    return m.Qwen2_5_VLDecoderLayer, m.Qwen2_5_VLRotaryEmbedding


def spread_weights(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Weights large enough for peaked attention (HF's 0.02 init gives near-uniform softmaxes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else std * noise)


def tiny_layer(family: str, attn: str = "sdpa", dtype=torch.float32, layer_idx: int = 1, seed: int = 0):
    """(decoder layer in eval mode, rotary embedding module, config)."""
    cfg = tiny_config(family, attn)
    layer_cls, rot_cls = layer_classes(family)
    layer = layer_cls(cfg, layer_idx).eval()
    spread_weights(layer, seed)
    return layer.to(dtype), rot_cls(cfg), cfg


def rope(rot, x: torch.Tensor, pos: torch.Tensor):
    """(cos, sin) for positions [B, L] (Qwen2.5-VL text positions are broadcast to its 3 M-RoPE axes)."""
    if type(rot).__name__.startswith("Qwen2_5_VL"):
        pos = pos[None].expand(3, *pos.shape)
    return rot(x, pos)


def left_padded_positions(kpm: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded batch as transformers' generate builds them (0 at the first real token)."""
    return (kpm.long().cumsum(1) - 1).clamp(min=0)
