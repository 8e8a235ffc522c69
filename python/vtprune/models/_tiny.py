"""Built-in tiny random-weight models and inputs (no download): for tests, the demo and examples.

``tiny_llava(size="test")`` is a 56x56 / 7-pixel-patch CLIP (64 patches) with a 4-layer LLaMA;
``size="demo"`` keeps LLaVA-1.5's real geometry (336 px, 14-pixel patches: 576 patches + [CLS], feature layer
-2, 8 LLM layers) at toy widths so the demo shows real token counts on a CPU in seconds.
"""

from __future__ import annotations

import torch

SIZES = {
    "test": dict(image=56, patch=7, v_hidden=32, v_layers=3, v_heads=4, hidden=64, layers=4, heads=4, kv_heads=2),
    "demo": dict(image=336, patch=14, v_hidden=64, v_layers=4, v_heads=4, hidden=128, layers=8, heads=4,
                 kv_heads=2),
}
VOCAB = 256
IMAGE_TOKEN = VOCAB - 1
PAD_TOKEN = 0


def tiny_llava(size: str = "test", *, attn_implementation: str = "sdpa", dtype=torch.float32, seed: int = 0):
    """A ``LlavaForConditionalGeneration`` with random weights, in eval mode."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    s = SIZES[size]
    vision = CLIPVisionConfig(hidden_size=s["v_hidden"], intermediate_size=2 * s["v_hidden"],
                              num_hidden_layers=s["v_layers"], num_attention_heads=s["v_heads"],
                              image_size=s["image"], patch_size=s["patch"], projection_dim=s["v_hidden"])
    text = LlamaConfig(hidden_size=s["hidden"], intermediate_size=2 * s["hidden"], num_hidden_layers=s["layers"],
                       num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=VOCAB,
                       max_position_embeddings=4096, pad_token_id=PAD_TOKEN)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    # random init gives near-uniform attention; larger weights make scores (and pruning) matter
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.to(dtype).eval()


def image_tokens(model) -> int:
    """Placeholder tokens per image of the unpatched model (patches; +1 with the "full" strategy)."""
    v = model.config.vision_config
    n = (v.image_size // v.patch_size) ** 2
    return n if model.config.vision_feature_select_strategy == "default" else n + 1


def tiny_inputs(model, prefix_lengths=(3,), suffix_lengths=(5,), *, images=None, seed: int = 0):
    """Left-padded ``input_ids``, ``attention_mask`` and ``pixel_values`` for prompts
    ``[prefix text, <image> x N, suffix text]``; ``images[b]`` = False gives row b no image."""
    g = torch.Generator().manual_seed(seed)
    n = image_tokens(model)
    rows, has_image = [], []
    for b, (p, s) in enumerate(zip(prefix_lengths, suffix_lengths)):
        with_image = True if images is None else bool(images[b])
        text = torch.randint(1, IMAGE_TOKEN, (p + s,), generator=g)
        img = torch.full((n if with_image else 0,), IMAGE_TOKEN)
        rows.append(torch.cat([text[:p], img, text[p:]]))
        has_image.append(with_image)
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD_TOKEN)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - len(r):] = r
        mask[b, length - len(r):] = 1
    v = model.config.vision_config
    pixels = torch.randn(sum(has_image), 3, v.image_size, v.image_size, generator=g).to(model.dtype)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
