"""A tiny random-weight Qwen3-VL (no download) and its inputs: images, several images per prompt, videos.

The vision tower has 3 full-attention blocks (4-pixel patches, 2x2 patch merger); blocks 0 and 1 feed the two
deepstack mergers, whose features are added to the image positions after decoder layers 0 and 1 of a 4-layer
Qwen3 language model (GQA 4 / 2 heads, q/k RMS norms, interleaved 3-D M-RoPE). The token ids are
:mod:`vtprune.models._tiny`'s, so its single-image :func:`~vtprune.models._tiny.tiny_qwen_inputs` serves this
model too.
"""

from __future__ import annotations

import torch

from vtprune.models._tiny import (
    IMAGE_TOKEN,
    PAD_TOKEN,
    QWEN,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    VOCAB,
    _finish,
    tiny_qwen_multi_inputs,
)

DEEPSTACK = [0, 1]  # vision blocks whose output feeds a deepstack merger (added after decoder layers 0 and 1)


def tiny_qwen3_vl(*, attn_implementation: str = "sdpa", dtype=torch.float32, seed: int = 0):
    """A ``Qwen3VLForConditionalGeneration`` with random weights, in eval mode (see the module docstring)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    s = QWEN
    vision = dict(depth=s["v_layers"], hidden_size=s["v_hidden"], intermediate_size=2 * s["v_hidden"],
                  num_heads=s["v_heads"], patch_size=s["patch"], spatial_merge_size=2, temporal_patch_size=2,
                  out_hidden_size=s["hidden"], num_position_embeddings=16, deepstack_visual_indexes=DEEPSTACK)
    text = dict(hidden_size=s["hidden"], intermediate_size=2 * s["hidden"], num_hidden_layers=s["layers"],
                num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], head_dim=16, vocab_size=VOCAB,
                max_position_embeddings=4096, pad_token_id=PAD_TOKEN,
                # interleaved M-RoPE over the 8 rotary frequencies of a 16-dim head: h on 1, 4 and w on 2, 5
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                 "mrope_interleaved": True})
    config = Qwen3VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                           video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                           vision_end_token_id=VISION_END)
    model = _finish(Qwen3VLForConditionalGeneration, config, attn_implementation, dtype, seed)
    with torch.no_grad():  # q/k norm gains away from 1, so that a q/k recompute without them is caught
        g = torch.Generator().manual_seed(seed + 1)
        for layer in model.model.language_model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) * 1.5 + 0.25)
    return model


def tiny_qwen3_multi_inputs(model, rows, *, seed: int = 0):
    """Left-padded inputs with any number of images and videos per prompt, laid out as Qwen3-VL's processor does
    (:func:`~vtprune.models._tiny.tiny_qwen_multi_inputs` with a timestamp before each frame group).

    rows : per batch row, its parts in prompt order, e.g. ``[3, (8, 8), 2, (3, 8, 12), 4]``: an int is that many
        random text tokens; ``(h, w)`` an image of an ``h x w`` patch grid (even numbers; ``h*w/4`` merged tokens)
        in vision start / end tokens; ``(t, h, w)`` a video of ``t`` frame groups: per frame group a timestamp (2
        text tokens here), vision start, ``h*w/4`` video tokens, vision end.
    """
    return tiny_qwen_multi_inputs(model, rows, timestamps=True, seed=seed)


def tiny_qwen3_video_inputs(model, frames: int = 3, grid=(8, 8), prefix: int = 3, suffix: int = 4, *,
                            seed: int = 0):
    """One prompt ``[text, video of frames x grid, text]`` (see :func:`tiny_qwen3_multi_inputs`)."""
    return tiny_qwen3_multi_inputs(model, [[prefix, (frames, *grid), suffix]], seed=seed)
