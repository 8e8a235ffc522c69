"""What an evaluation asks of a model, without the harness: batched generation and continuation loglikelihood for
image + text prompts, on a supported checkpoint with or without a vtprune method applied.

Both requests go through the model's own processor (chat template, image tokens) with left padding, and the
method is applied once with :func:`vtprune.apply` for the runner's lifetime. Loglikelihood reads the forward's
logits at input positions (:mod:`vtprune.outputs` places a pruned prefill's logits there), so the patched and the
unpatched model are scored by the same code: ``logits[:, t]`` scores token ``t + 1`` of the prompt + continuation.
Requests run under ``torch.no_grad()``, not ``torch.inference_mode()``: the ops' span checks read tensor version
counters, which inference tensors do not have. The lmms-eval model (:mod:`vtprune.eval.lmms_model`) is a thin
adapter over this class.
"""

from __future__ import annotations

import os

SUPPORTED = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
TINY_PREFIX = "tiny:"


def load(pretrained: str, device: str = "cpu", dtype: str = "auto"):
    """``(model, processor)`` of a local checkpoint directory, or of a built-in tiny model (``tiny:llava``,
    ``tiny:llava_next``, ``tiny:qwen2_5_vl``: random weights, character-level processor, for tests)."""
    import torch

    if pretrained.startswith(TINY_PREFIX):
        from vtprune.eval import tiny

        model, processor = tiny.build(pretrained[len(TINY_PREFIX):])
        return model.to(device), processor
    import transformers
    from transformers import AutoConfig, AutoProcessor

    if not os.path.isdir(pretrained):
        raise ValueError(f"pretrained must be a local checkpoint directory or tiny:FAMILY, got {pretrained!r}")
    arch = (getattr(AutoConfig.from_pretrained(pretrained), "architectures", None) or [""])[0]
    if arch not in SUPPORTED:
        raise ValueError(f"pretrained {pretrained!r}: architecture {arch!r}; supported: {', '.join(SUPPORTED)}")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = getattr(transformers, arch).from_pretrained(pretrained, dtype=torch_dtype, attn_implementation="sdpa")
    return model.eval().to(device), AutoProcessor.from_pretrained(pretrained)


class Runner:
    """A model (and its processor) with a method applied.

    Parameters
    ----------
    pretrained : checkpoint directory or ``tiny:FAMILY``
    method_config : a method config (dict, or JSON / YAML file; :func:`vtprune.load_method`), or None for the
        unpatched model
    device, dtype : where and in which dtype to load the model (``dtype="auto"``: the checkpoint's)
    batch_size : requests per forward
    """

    def __init__(self, pretrained: str, method_config=None, *, device: str = "cpu", dtype: str = "auto",
                 batch_size: int = 1):
        import vtprune

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model, self.processor = load(pretrained, device, dtype)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"  # pruning methods and the scoring below need left padding
        self.batch_size = batch_size
        self.method = None if method_config is None else vtprune.load_method(method_config)
        self.handle = None if self.method is None else vtprune.apply(self.model, self.method)
        # ALVTS routing decoder layer 0 (the papers' recipes: first_layer=0) refuses a KV cache; generation then
        # recomputes the sequence at each step (slower, same tokens)
        self.use_cache = getattr(self.method, "first_layer", None) != 0

    @property
    def device(self):
        return self.model.device

    def close(self) -> None:
        """Remove the method's patch (the model is the unpatched one again)."""
        if self.handle is not None:
            self.handle.remove()

    # ------------------------------------------------------------------ inputs
    def prompt(self, context: str, images: int) -> str:
        """The chat-formatted user turn with ``images`` image slots, up to the assistant's reply."""
        content = [{"type": "image"}] * images + [{"type": "text", "text": context}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def inputs(self, texts: list, images: list) -> dict:
        """Processor outputs for a batch (left-padded), on the model's device, with only the keys forward takes."""
        import inspect

        flat = [img.convert("RGB") for row in images for img in row]
        out = self.processor(text=texts, images=flat or None, padding=True, return_tensors="pt")
        named = set(inspect.signature(type(self.model).forward).parameters)
        batch = {k: v.to(self.device) for k, v in out.items() if k in named}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        return batch

    # ------------------------------------------------------------------ requests
    def generate(self, contexts: list, images: list, max_new_tokens: int = 32, until=()) -> list:
        """Greedy continuation of each prompt, cut at the first of ``until``.

        contexts : [N] question texts; images : [N] lists of PIL images
        """
        import torch

        out = []
        for lo in range(0, len(contexts), self.batch_size):
            rows = range(lo, min(lo + self.batch_size, len(contexts)))
            batch = self.inputs([self.prompt(contexts[i], len(images[i])) for i in rows], [images[i] for i in rows])
            with torch.no_grad():
                ids = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id, use_cache=self.use_cache)
            for text in self.tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True):
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                out.append(text)
        return out

    def loglikelihood(self, contexts: list, continuations: list, images: list) -> list:
        """``(log P(continuation | prompt), whether greedy decoding gives it)`` per request.

        The continuation is appended to the chat-formatted prompt as text; its token count is that of the
        prompt + continuation minus that of the prompt alone (tokenised without images, so the image slot counts
        the same in both)."""
        import torch

        out = []
        for lo in range(0, len(contexts), self.batch_size):
            rows = list(range(lo, min(lo + self.batch_size, len(contexts))))
            prompts = [self.prompt(contexts[i], len(images[i])) for i in rows]
            texts = [p + continuations[i] for p, i in zip(prompts, rows)]
            ids_of = lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"]
            counts = [len(ids_of(t)) - len(ids_of(p)) for t, p in zip(texts, prompts)]
            for i, n in zip(rows, counts):
                if n < 1:
                    raise ValueError(f"continuation {continuations[i]!r} adds no token to its prompt")
            batch = self.inputs(texts, [images[i] for i in rows])
            with torch.no_grad():
                logits = self.model(**batch, use_cache=False).logits  # [B, L, V] in input coordinates
            ids = batch["input_ids"]
            L = ids.shape[1]
            for b, n in enumerate(counts):  # left padding: every row ends at L - 1
                target = ids[b, L - n:]
                scores = torch.log_softmax(logits[b, L - n - 1:L - 1].float(), -1)  # predictions of the n tokens
                logprob = scores.gather(-1, target[:, None]).sum()
                out.append((float(logprob), bool((scores.argmax(-1) == target).all())))
        return out
