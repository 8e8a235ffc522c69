"""``vtprune calibrate``: fit ALVTS selector factors to a local checkpoint on local images and questions.

The data is a folder of images (each asked ``--question``) or a JSON-lines file of ``{"image": path, "question":
text}`` records (paths relative to the file). Each sample goes through the model's own processor; the visual span
(first image token, count) is read from the processor's ``input_ids``, so nothing about the prompt format needs
to be given. Prints the selector's fit error (relative MSE to the layer's own attention score, per layer) before
and after, and writes a factors file that records the model's fingerprint (checked when it is loaded).
"""

from __future__ import annotations

import json
import os

from vtprune.cli._args import UsageError, model_dir, positive_int, readable_file, writable_output

HELP = "fit ALVTS selector factors to a model on local image/question data"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
SUPPORTED = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
             "Qwen3VLForConditionalGeneration")


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="local checkpoint directory (model and processor)")
    p.add_argument("--data", required=True, help="folder of images, or a JSON-lines file of {image, question}")
    p.add_argument("--out", required=True, help="factors file to write (.safetensors)")
    p.add_argument("--question", default="Describe the image in detail.", help="question for a folder of images")
    p.add_argument("--rank", type=positive_int, default=None, help="selector rank R (default hidden size / 16)")
    p.add_argument("--steps", type=positive_int, default=100, help="Adam steps per layer")
    p.add_argument("--lr", type=float, default=1e-2, help="step size relative to the factors' RMS")
    p.add_argument("--limit", type=positive_int, default=None, help="use at most this many samples")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")


def samples(data: str, question: str) -> list[tuple[str, str]]:
    """``(image path, question)`` pairs of a folder or a JSON-lines file."""
    if os.path.isdir(data):
        paths = sorted(os.path.join(data, f) for f in os.listdir(data) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not paths:
            raise UsageError(f"--data {data!r}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
        return [(p, question) for p in paths]
    readable_file("--data", data)
    base, out = os.path.dirname(os.path.abspath(data)), []
    with open(data, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                image, q = rec["image"], rec.get("question", question)
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UsageError(f"--data {data!r} line {n}: expected a JSON object with \"image\" (and optionally "
                                 "\"question\")") from None
            path = image if os.path.isabs(image) else os.path.join(base, image)
            if not os.path.isfile(path):
                raise UsageError(f"--data {data!r} line {n}: image {image!r} not found")
            out.append((path, q))
    if not out:
        raise UsageError(f"--data {data!r}: no records")
    return out


def _prompt(processor, question: str) -> str:
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    token = getattr(processor, "image_token", "<image>")
    return f"USER: {token}\n{question} ASSISTANT:"


def visual_span(input_ids, image_token_id: int):
    """int64 [1, 2] ``(start, count)`` of the image tokens of a one-row ``input_ids``; they must be contiguous."""
    import torch

    pos = (input_ids[0] == image_token_id).nonzero().flatten()
    if pos.numel() == 0:
        raise ValueError("the processor output has no image token")
    start, count = int(pos[0]), int(pos.numel())
    if int(pos[-1]) != start + count - 1:
        raise ValueError("the image tokens are not one contiguous span (several images per sample are not supported)")
    return torch.tensor([[start, count]])


def load_model(path: str, device):
    import transformers
    from transformers import AutoConfig, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(path)
        arch = (getattr(config, "architectures", None) or [""])[0]
        if arch not in SUPPORTED:
            raise UsageError(f"--model {path!r}: architecture {arch!r}; supported: {', '.join(SUPPORTED)}")
        model = getattr(transformers, arch).from_pretrained(path, dtype="auto").eval().to(device)
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"--model {path!r}: cannot load the model and its processor ({line})") from None
    return model, processor


def batches(model, processor, pairs) -> list[dict]:
    """One model-input dict per sample (only the keys the model's forward takes) plus its ``visual_spans``."""
    import inspect

    from PIL import Image

    named = set(inspect.signature(type(model).forward).parameters)
    token = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index", None)
    out = []
    for path, question in pairs:
        with Image.open(path) as img:
            inputs = processor(images=img.convert("RGB"), text=_prompt(processor, question), return_tensors="pt")
        try:
            spans = visual_span(inputs["input_ids"], token)
        except ValueError as e:
            raise UsageError(f"--data: {path}: {e}") from None
        batch = {k: v.to(model.device) for k, v in inputs.items() if k in named}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        out.append({**batch, "visual_spans": spans})
    return out


def run(args) -> None:
    import torch

    from vtprune.alvts import calibrate, init_factors, selector_loss
    from vtprune.alvts.calibrate import capture_layer_inputs
    from vtprune.alvts.factors import decoder_layers
    from vtprune.cli._args import torch_device

    model_dir("--model", args.model)
    pairs = samples(args.data, args.question)[: args.limit]
    writable_output("--out", args.out, extensions=(".safetensors",))
    if not args.lr > 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    device = torch_device("--device", args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, processor = load_model(args.model, device)
    layers = decoder_layers(model)
    try:
        factors = init_factors(layers, args.rank)
    except ValueError as e:
        raise UsageError(f"--rank {args.rank}: {e}") from None
    print(f"{len(pairs)} samples, {len(layers)} decoder layers, rank {factors.rank}")
    records = capture_layer_inputs(model, batches(model, processor, pairs), layers=layers)
    before = selector_loss(layers, records, factors, progress=True)
    factors = calibrate(layers, records, factors=factors, steps=args.steps, lr=args.lr, progress=True)
    after = selector_loss(layers, records, factors, progress=True)
    print("fit error (relative MSE of the selector score to the layer's attention score), per layer:")
    for i, (b, a) in enumerate(zip(before, after)):
        print(f"  layer {i:>3}: {b:.4f} -> {a:.4f}")
    print(f"  mean     : {sum(before) / len(before):.4f} -> {sum(after) / len(after):.4f}")
    name = os.path.basename(os.path.abspath(args.model))
    factors.meta.update({"calibration_samples": str(len(pairs)), "model": name})
    factors.save(args.out)
    print(f"factors: {args.out} (ALVTS(factors={args.out!r}))")
