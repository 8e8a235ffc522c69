"""Helpers of the CUDA-kernel GPU tests: the extension fixture, output poisoning and tolerances."""

from __future__ import annotations

import torch

from utils import poison_cuda_cache, require_extension  # noqa: F401  (the GPU tests import them from here)

# Relative error bound ||out - ref|| / ||ref|| of float32 scores by input dtype: fp32 runs FMA (only the
# summation order differs); fp16/bf16 products are exact in the tensor cores' fp32 accumulators, so the
# inputs' rounding (applied to the reference too) leaves only accumulation order and exp2 approximation.
SCORE_RTOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def llama_7b_layer():
    """(fp32 LLaMA-7B-shaped decoder layer on the GPU, its rotary embedding, config), random weights large
    enough for peaked attention and norms away from 1."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=2, vocab_size=32000, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        layer = LlamaDecoderLayer(cfg, 1).eval()
        with torch.no_grad():
            for name, p in layer.named_parameters():
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.03 * torch.randn_like(p))
        rot = LlamaRotaryEmbedding(cfg)
    return layer, rot, cfg
