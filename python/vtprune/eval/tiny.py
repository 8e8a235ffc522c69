"""Built-in tiny checkpoints for the evaluation path: the random-weight models of :mod:`vtprune.models._tiny`,
with a processor built here (character-level tokenizer, the family's image processor, a chat template), for the
evaluation path (``--model tiny:llava`` etc.). LLaVA-1.5 and LLaVA-NeXT also save and load through
``save_pretrained`` / ``AutoProcessor`` like a real checkpoint; Qwen2.5-VL's processor is built in-process (its
saved form needs the video processor, i.e. torchvision). No download: everything is constructed locally.

The tokenizer maps each character to one id: printable ASCII and newline to their code points, the other ids
below the image tokens to single characters from U+0100 on (so any generated id decodes to one character and
encodes back to itself), and the ids from 252 up to the family's special tokens (``<image>``; Qwen's
``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>``, ``<|video_pad|>``).
"""

from __future__ import annotations

import os

FAMILIES = ("llava", "llava_next", "qwen2_5_vl")
PAD, BOS, EOS = "[PAD]", "<s>", "</s>"
LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %} {% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = LLAVA_TEMPLATE.replace("<image>\n", "<|vision_start|><|image_pad|><|vision_end|>")


def _specials(family: str) -> dict:
    from vtprune.models import _tiny

    if family == "qwen2_5_vl":
        return {"<|image_pad|>": _tiny.IMAGE_TOKEN, "<|video_pad|>": _tiny.VIDEO_TOKEN,
                "<|vision_start|>": _tiny.VISION_START, "<|vision_end|>": _tiny.VISION_END}
    return {"<image>": _tiny.IMAGE_TOKEN}


def tokenizer(family: str):
    """A character-level ``PreTrainedTokenizerFast`` over the tiny models' 256 ids (left padding)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vtprune.models import _tiny

    specials = _specials(family)
    named = {PAD: _tiny.PAD_TOKEN, BOS: 1, EOS: 2, **specials}
    taken = set(named.values())
    vocab = dict(named)
    for i in range(_tiny.VOCAB):
        if i in taken:
            continue
        vocab[chr(i) if (32 <= i < 127 or i == 10) else chr(0x100 + i)] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                  padding_side="left")
    out.add_special_tokens({"additional_special_tokens": list(specials)})
    for name, i in specials.items():
        if out.convert_tokens_to_ids(name) != i:
            raise RuntimeError(f"tiny tokenizer: {name} got id {out.convert_tokens_to_ids(name)}, expected {i}")
    return out


def processor(family: str, model):
    """The family's processor for the tiny ``model`` (its image size, patch size and grid pinpoints)."""
    tok = tokenizer(family)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        v = model.config.vision_config
        factor = v.patch_size * v.spatial_merge_size
        images = Qwen2VLImageProcessorPil(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                          temporal_patch_size=v.temporal_patch_size,
                                          size={"shortest_edge": (4 * factor) ** 2, "longest_edge": (8 * factor) ** 2})
        return _qwen_processor_class(Qwen2_5_VLProcessor)(images, tok, chat_template=QWEN_TEMPLATE)
    v = model.config.vision_config
    side = {"height": v.image_size, "width": v.image_size}
    common = dict(tokenizer=tok, patch_size=v.patch_size, vision_feature_select_strategy="default",
                  num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE, image_token="<image>")
    if family == "llava_next":
        from transformers import LlavaNextProcessor
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        images = LlavaNextImageProcessorPil(size={"shortest_edge": v.image_size}, crop_size=side,
                                            image_grid_pinpoints=model.config.image_grid_pinpoints)
        return LlavaNextProcessor(image_processor=images, **common)
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(size={"shortest_edge": v.image_size}, crop_size=side)
    return LlavaProcessor(image_processor=images, **common)


def _qwen_processor_class(base):
    """``Qwen2_5_VLProcessor`` without its video processor, which needs torchvision (the ``qwen`` extra); images
    only, which is all the tiny task feeds. In-process only: ``AutoProcessor`` loads the full class."""
    from transformers.processing_utils import ProcessorMixin

    class TinyQwenProcessor(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return TinyQwenProcessor


def build(family: str):
    """``(model, processor)`` of the tiny ``family`` (``llava``, ``llava_next``, ``qwen2_5_vl``)."""
    from vtprune.models import _tiny

    builders = {"llava": _tiny.tiny_llava, "llava_next": _tiny.tiny_llava_next, "qwen2_5_vl": _tiny.tiny_qwen2_5_vl}
    if family not in builders:
        raise ValueError(f"tiny family must be one of {FAMILIES}, got {family!r}")
    model = builders[family]()
    model.generation_config.eos_token_id = 2
    return model, processor(family, model)


def save(family: str, path: str | os.PathLike) -> str:
    """Write the tiny ``family`` checkpoint (model, processor) to ``path``; returns ``path``."""
    model, proc = build(family)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return str(path)
