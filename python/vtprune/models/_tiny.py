"""Built-in tiny random-weight models and inputs (no download): for tests, the demo and examples.

``tiny_llava(size="test")`` is a 56x56 / 7-pixel-patch CLIP (64 patches) with a 4-layer LLaMA;
``size="demo"`` keeps LLaVA-1.5's real geometry (336 px, 14-pixel patches: 576 patches + [CLS], feature layer
-2, 8 LLM layers) at toy widths so the demo shows real token counts on a CPU in seconds.
``tiny_llava_next`` adds anyres tiles (test: 56 px tiles on a 1x2 / 2x1 / 2x2 grid, up to 5 x 64 tokens;
demo: LLaVA-NeXT's 336 px tiles and pinpoints, up to 2880 tokens); ``tiny_qwen2_5_vl`` is a window-attention
ViT (patch merger 2x2, one full-attention block) with a 4-layer Qwen2 LLM (GQA, 3-D M-RoPE).
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


def _size(size: str) -> dict:
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    return SIZES[size]


def _clip_llama(s):
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(hidden_size=s["v_hidden"], intermediate_size=2 * s["v_hidden"],
                              num_hidden_layers=s["v_layers"], num_attention_heads=s["v_heads"],
                              image_size=s["image"], patch_size=s["patch"], projection_dim=s["v_hidden"])
    text = LlamaConfig(hidden_size=s["hidden"], intermediate_size=2 * s["hidden"], num_hidden_layers=s["layers"],
                       num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=VOCAB,
                       max_position_embeddings=8192, pad_token_id=PAD_TOKEN)
    return vision, text


def _finish(cls, config, attn_implementation, dtype, seed):
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = cls(config)
    # random init gives near-uniform attention; larger weights make scores (and pruning) matter
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.to(dtype).eval()


def tiny_llava(size: str = "test", *, attn_implementation: str = "sdpa", dtype=torch.float32, seed: int = 0):
    """A ``LlavaForConditionalGeneration`` with random weights, in eval mode."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision, text = _clip_llama(_size(size))
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    return _finish(LlavaForConditionalGeneration, config, attn_implementation, dtype, seed)


def tiny_llava_next(size: str = "test", *, attn_implementation: str = "sdpa", dtype=torch.float32,
                    seed: int = 0):
    """A ``LlavaNextForConditionalGeneration`` with random weights (anyres tiles of the CLIP image size)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    s = _size(size)
    t = s["image"]
    vision, text = _clip_llama(s)
    pinpoints = [[t, 2 * t], [2 * t, t], [2 * t, 2 * t], [3 * t, t], [t, 3 * t]]
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=pinpoints)
    return _finish(LlavaNextForConditionalGeneration, config, attn_implementation, dtype, seed)


def _left_pad(rows):
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD_TOKEN)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - len(r):] = r
        mask[b, length - len(r):] = 1
    return ids, mask


def _prompts(counts, prefix_lengths, suffix_lengths, g, image_token=IMAGE_TOKEN, start=None, end=None):
    """Rows ``[prefix text, (start), <image> x counts[b], (end), suffix text]``, left-padded."""
    rows = []
    for p, s, n in zip(prefix_lengths, suffix_lengths, counts):
        text = torch.randint(1, min(image_token, start or image_token, end or image_token) - 1, (p + s,), generator=g)
        img = torch.full((n,), image_token)
        if n and start is not None:
            img = torch.cat([torch.tensor([start]), img, torch.tensor([end])])
        rows.append(torch.cat([text[:p], img, text[p:]]))
    return _left_pad(rows)


def tiny_next_inputs(model, prefix_lengths=(3,), suffix_lengths=(5,), image_sizes=((50, 100),), *, seed: int = 0):
    """Left-padded inputs for ``tiny_llava_next``: one image of ``image_sizes[b]`` (height, width) per row."""
    from vtprune.models.llava_next import image_tokens as next_image_tokens

    g = torch.Generator().manual_seed(seed)
    counts = [next_image_tokens(model, s) for s in image_sizes]
    ids, mask = _prompts(counts, prefix_lengths, suffix_lengths, g)
    return _next_batch(model, ids, mask, image_sizes, g)


def _next_batch(model, ids, mask, image_sizes, g) -> dict:
    """LLaVA-NeXT inputs from prompts and image sizes: random tiles per image (its anyres tile count), zero-padded
    to the batch's most tiles as the processor does."""
    hf = __import__(type(model).__module__, fromlist=["image_size_to_num_patches"])
    cfg = model.config
    t = cfg.vision_config.image_size
    tiles = [hf.image_size_to_num_patches(list(s), cfg.image_grid_pinpoints, t) for s in image_sizes]
    pixels = torch.zeros(len(image_sizes), max(tiles), 3, t, t)
    for i, n in enumerate(tiles):
        pixels[i, :n] = torch.randn(n, 3, t, t, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels.to(model.dtype),
            "image_sizes": torch.tensor(image_sizes)}


def tiny_next_multi_inputs(model, rows, *, seed: int = 0):
    """Left-padded inputs for ``tiny_llava_next`` with any number of images per prompt.

    rows : per batch row, its parts in prompt order, e.g. ``[3, (50, 100), 2, (100, 100), 4]``: an int is that many
        random text tokens, a pair an image of that (height, width).
    """
    from vtprune.models.llava_next import image_tokens as next_image_tokens

    g = torch.Generator().manual_seed(seed)
    ids, sizes = [], []
    for parts in rows:
        row = []
        for p in parts:
            if isinstance(p, int):
                row.append(torch.randint(1, IMAGE_TOKEN, (p,), generator=g))
            else:
                sizes.append(tuple(p))
                row.append(torch.full((next_image_tokens(model, p),), IMAGE_TOKEN))
        ids.append(torch.cat(row))
    ids, mask = _left_pad(ids)
    return _next_batch(model, ids, mask, sizes, g)


QWEN = dict(patch=4, v_hidden=32, v_layers=3, v_heads=4, window=16, hidden=64, layers=4, heads=4, kv_heads=2)
VIDEO_TOKEN, VISION_START, VISION_END = VOCAB - 2, VOCAB - 3, VOCAB - 4


def tiny_qwen2_5_vl(*, attn_implementation: str = "sdpa", dtype=torch.float32, seed: int = 0):
    """A ``Qwen2_5_VLForConditionalGeneration`` with random weights: 4-pixel patches, 2x2 merger, windows of
    2x2 merged tokens, blocks 0 and 2 windowed and block 1 full attention; 4-layer Qwen2 LLM (4 heads / 2 kv)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    s = QWEN
    vision = dict(depth=s["v_layers"], hidden_size=s["v_hidden"], intermediate_size=2 * s["v_hidden"],
                  num_heads=s["v_heads"], patch_size=s["patch"], spatial_merge_size=2, temporal_patch_size=2,
                  window_size=s["window"], out_hidden_size=s["hidden"], fullatt_block_indexes=[1])
    text = dict(hidden_size=s["hidden"], intermediate_size=2 * s["hidden"], num_hidden_layers=s["layers"],
                num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=VOCAB,
                max_position_embeddings=4096, pad_token_id=PAD_TOKEN, bos_token_id=1, eos_token_id=2,
                # M-RoPE sections (temporal, height, width) of the 8 rotary frequencies of a 16-dim head
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                              video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                              vision_end_token_id=VISION_END)
    return _finish(Qwen2_5_VLForConditionalGeneration, config, attn_implementation, dtype, seed)


def tiny_qwen_inputs(model, prefix_lengths=(3,), suffix_lengths=(5,), grids=((8, 12),), *, seed: int = 0):
    """Left-padded inputs for ``tiny_qwen2_5_vl``: one image per row with a ``grids[b]`` (height, width) patch
    grid (even numbers; ``h*w/4`` merged tokens), wrapped in vision start/end tokens like Qwen's processor."""
    g = torch.Generator().manual_seed(seed)
    v = model.config.vision_config
    counts = [h * w // v.spatial_merge_size**2 for h, w in grids]
    ids, mask = _prompts(counts, prefix_lengths, suffix_lengths, g, start=VISION_START, end=VISION_END)
    per_patch = 3 * v.temporal_patch_size * v.patch_size**2
    pixels = torch.randn(sum(h * w for h, w in grids), per_patch, generator=g).to(model.dtype)
    out = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
           "image_grid_thw": torch.tensor([[1, h, w] for h, w in grids])}
    out["mm_token_type_ids"] = (ids == IMAGE_TOKEN).int()
    return out


def tiny_qwen_multi_inputs(model, rows, *, timestamps: bool = False, seed: int = 0):
    """Left-padded Qwen2.5-VL / Qwen3-VL inputs with any number of images and videos per prompt.

    rows : per batch row, its parts in prompt order, e.g. ``[3, (8, 8), 2, (3, 8, 12), 4]``: an int is that many
        random text tokens; ``(h, w)`` an image of an ``h x w`` patch grid (even numbers; ``h*w/4`` merged tokens)
        in vision start / end tokens; ``(t, h, w)`` a video of ``t`` frame groups of ``h*w/4`` video tokens each.
        Qwen2.5-VL's processor puts a video in one vision start / end pair (``timestamps=False``); Qwen3-VL's puts
        a timestamp (2 text tokens here) and a vision start / end pair around each frame group.
    """
    g = torch.Generator().manual_seed(seed)
    m = model.config.vision_config.spatial_merge_size
    width = 3 * model.config.vision_config.temporal_patch_size * model.config.vision_config.patch_size**2

    def text(n):
        return torch.randint(1, VISION_END - 1, (n,), generator=g)

    ids, grids = [], {"image": [], "video": []}
    for parts in rows:
        row = []
        for p in parts:
            if isinstance(p, int):
                row.append(text(p))
                continue
            t, h, w = (1, *p) if len(p) == 2 else p
            token = IMAGE_TOKEN if len(p) == 2 else VIDEO_TOKEN
            grids["image" if len(p) == 2 else "video"].append([t, h, w])
            if len(p) == 3 and not timestamps:
                row.append(torch.tensor([VISION_START] + [token] * (t * h * w // m**2) + [VISION_END]))
                continue
            for _ in range(t):
                row += [] if len(p) == 2 else [text(2)]
                row.append(torch.tensor([VISION_START] + [token] * (h * w // m**2) + [VISION_END]))
        ids.append(torch.cat(row))
    ids, mask = _left_pad(ids)
    out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == IMAGE_TOKEN).int()
           + 2 * (ids == VIDEO_TOKEN).int()}
    for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        if grids[kind]:
            n = sum(t * h * w for t, h, w in grids[kind])
            out[key] = torch.randn(n, width, generator=g).to(model.dtype)
            out[f"{kind}_grid_thw"] = torch.tensor(grids[kind])
    return out


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
    ids, mask = _left_pad(rows)
    v = model.config.vision_config
    pixels = torch.randn(sum(has_image), 3, v.image_size, v.image_size, generator=g).to(model.dtype)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


# ---------------------------------------------------------------------- one entry per family
NEXT_SIZES = ((50, 100), (100, 100))  # 1 + 1x2 tiles (unpadded rows) and 1 + 2x2 tiles: different token counts
QWEN_GRIDS = ((8, 12), (12, 12))  # 24 and 36 merged tokens, several 2x2-token windows each


def _keep(inputs, b, *names):
    """Row b of the per-token inputs ``names``, without its padding."""
    keep = inputs["attention_mask"][b].bool()
    return {n: inputs[n][b:b + 1, keep] for n in names}


def _llava_row(inputs, b):
    return {**_keep(inputs, b, "input_ids", "attention_mask"), "pixel_values": inputs["pixel_values"][b:b + 1]}


def _next_row(inputs, b):
    return {**_llava_row(inputs, b), "image_sizes": inputs["image_sizes"][b:b + 1]}


def _qwen_row(inputs, b):
    patches = inputs["image_grid_thw"].prod(-1).tolist()
    start = sum(patches[:b])
    return {**_keep(inputs, b, "input_ids", "attention_mask", "mm_token_type_ids"),
            "pixel_values": inputs["pixel_values"][start:start + patches[b]],
            "image_grid_thw": inputs["image_grid_thw"][b:b + 1]}


def _qwen_batch(model, prefix_lengths=(3,), suffix_lengths=(5,), seed=0):
    return tiny_qwen_inputs(model, prefix_lengths, suffix_lengths, QWEN_GRIDS[:len(prefix_lengths)], seed=seed)


def _tiny_qwen3_vl(**kwargs):
    from vtprune.models._tiny_qwen3_vl import tiny_qwen3_vl  # imports this module's token ids: imported late

    return tiny_qwen3_vl(**kwargs)


class TinyFamily:
    """A family's tiny model for the generic tests and the examples.

    build(attn_implementation="sdpa") -> model; batch(model, prefix_lengths, suffix_lengths, seed) -> left-padded
    inputs with one image per row (images of different sizes where the family takes dynamic resolutions);
    row(inputs, b) -> row ``b`` of such a batch alone, without its padding.
    """

    def __init__(self, build, batch, row):
        self.build, self.batch, self.row = build, batch, row


# transformers' model class name -> its tiny family (the keys of vtprune.models.FAMILIES)
TINY_FAMILIES = {
    "LlavaForConditionalGeneration": TinyFamily(
        tiny_llava, lambda m, p=(3,), s=(5,), seed=0: tiny_inputs(m, p, s, seed=seed), _llava_row),
    "LlavaNextForConditionalGeneration": TinyFamily(
        tiny_llava_next, lambda m, p=(3,), s=(5,), seed=0: tiny_next_inputs(m, p, s, NEXT_SIZES[:len(p)], seed=seed),
        _next_row),
    "Qwen2_5_VLForConditionalGeneration": TinyFamily(tiny_qwen2_5_vl, _qwen_batch, _qwen_row),
    "Qwen3VLForConditionalGeneration": TinyFamily(_tiny_qwen3_vl, _qwen_batch, _qwen_row),
}
