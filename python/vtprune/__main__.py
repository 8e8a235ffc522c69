"""Command line: ``python -m vtprune <command>``.

``demo``: the main job. Runs a LLaVA model (the built-in tiny random-weight one by default, or ``--model PATH``
for a local checkpoint) with and without a token-reduction method and prints the visual tokens each decoder
layer ran on, the theoretical FLOPs ratio and the measured prefill latency; ``--image`` also saves a
retention map of the kept / merged patches per stage.

``ops``: run the ops at real-model shapes (see :mod:`vtprune.ops_demo`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

METHODS = ("visiondrop", "alvts", "fastv", "visionzip", "pyramiddrop", "pool")


def make_method(name: str, tokens: int | None, visual: int, tiles: int = 1):
    """A method object for the demo's ``--method`` / ``--tokens`` (``visual``: image tokens per image; ``tiles``:
    336 px tiles of the image, LLaVA-NeXT, where ``--tokens`` is per tile)."""
    import vtprune

    if name == "visiondrop":
        return vtprune.VisionDrop(tokens=tokens)
    if name == "fastv":
        return vtprune.FastV() if tokens is None else vtprune.FastV(tokens=tokens)
    if name == "visionzip":
        t = 64 if tokens is None else tokens
        contextual = max(1, t * 10 // 64)  # VisionZip's default 54 + 10 = 64 split
        return vtprune.VisionZip(dominant=t - contextual, contextual=contextual)
    if name == "pyramiddrop":
        return vtprune.PyramidDrop()
    if name == "pool":
        return vtprune.UniformPool(tokens=64 if tokens is None else tokens)
    if name == "alvts":
        ALVTS = vtprune.ALVTS  # raises a clear ImportError while ALVTS is not in this build
        # image tokens routed through each layer (LLaVA-NeXT: 64 x 5)
        return ALVTS(keep=(64 if tokens is None else tokens) * tiles)
    raise ValueError(f"--method must be one of {METHODS}, got {name!r}")


FAMILIES = ("llava", "llava_next", "qwen2_5_vl")


def _load_tiny(family):
    """Built-in tiny models: LLaVA-NeXT with a 2x2-tile 672 px image (5 x 576 tokens + newlines), Qwen2.5-VL
    with a 64x64-patch image (1024 merged tokens)."""
    from vtprune.models import _tiny

    if family == "llava_next":
        model = _tiny.tiny_llava_next("demo")
        return model, _tiny.tiny_next_inputs(model, (35,), (20,), ((672, 672),))
    model = _tiny.tiny_qwen2_5_vl()
    return model, _tiny.tiny_qwen_inputs(model, (35,), (20,), ((64, 64),))


def _load(args):
    import torch

    from vtprune.models._tiny import tiny_inputs, tiny_llava

    if args.family != "llava":
        if args.model or args.image:
            raise SystemExit(f"--model and --image are LLaVA-1.5 only; --family {args.family} runs the built-in "
                             "tiny model")
        return _load_tiny(args.family)
    if args.model is None:
        model = tiny_llava("demo")
        inputs = tiny_inputs(model, (35,), (20,))
        if args.image:
            inputs["pixel_values"] = _pixels(args.image, model.config.vision_config.image_size)
        return model, inputs
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(args.model, torch_dtype="auto").eval()
    processor = AutoProcessor.from_pretrained(args.model)
    from PIL import Image

    image = Image.open(args.image) if args.image else Image.new("RGB", (336, 336), (128, 128, 128))
    prompt = "USER: <image>\nDescribe the image. ASSISTANT:"
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    return model, {k: v.to(device) for k, v in inputs.items()}


def _pixels(path, size):
    import torch
    from PIL import Image

    img = Image.open(path).convert("RGB").resize((size, size))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1) / 255.0
    mean = torch.tensor([0.4815, 0.4578, 0.4082])[:, None, None]  # CLIP normalisation
    std = torch.tensor([0.2686, 0.2613, 0.2758])[:, None, None]
    return ((x - mean) / std)[None]


def _prefill_ms(model, inputs, repeats: int) -> float:
    import torch

    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    times = []
    with torch.no_grad():
        model(**inputs)  # warm-up
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            model(**inputs)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def demo(argv) -> None:
    p = argparse.ArgumentParser(prog="python -m vtprune demo", description=__doc__.split("\n\n")[1])
    p.add_argument("--model", help="local LLaVA-1.5 checkpoint directory (default: built-in tiny random model)")
    p.add_argument("--family", default="llava", choices=FAMILIES,
                   help="model family of the built-in tiny model (LLaVA-NeXT: --tokens is per 336 px tile)")
    p.add_argument("--method", default="visiondrop", choices=METHODS)
    p.add_argument("--tokens", type=int, default=64,
                   help="average visual tokens (method budget; ALVTS: image tokens routed through each layer)")
    p.add_argument("--image", help="image file: fed to the model and used for the retention map")
    p.add_argument("--out", default="retention_map.png", help="retention-map PNG (with --image)")
    p.add_argument("--repeats", type=int, default=5, help="timed prefills per setting (median)")
    args = p.parse_args(argv)

    import vtprune
    model, inputs = _load(args)
    visual = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    try:
        tiles = inputs["pixel_values"].shape[1] if args.family == "llava_next" else 1
        method = make_method(args.method, args.tokens, visual, tiles)
    except ImportError as e:
        raise SystemExit(f"--method {args.method}: {e}") from e
    except ValueError as e:  # a budget the method refuses
        raise SystemExit(f"--method {args.method} --tokens {args.tokens}: {e}") from e
    base_ms = _prefill_ms(model, inputs, args.repeats)
    try:
        handle = vtprune.apply(model, method)
    except ValueError as e:
        raise SystemExit(f"--method {args.method} on --family {args.family}: {e}") from e
    with handle:
        try:
            pruned_ms = _prefill_ms(model, inputs, args.repeats)
        except ValueError as e:  # a budget this model's images cannot meet (checked on the first forward)
            raise SystemExit(f"--method {args.method} --tokens {args.tokens} on --family {args.family}: {e}") from e
        st = handle.stats
    name = f"tiny random {args.family} (demo size)" if args.model is None else args.model
    print(f"model: {name}; method: {method!r}")
    print(f"visual tokens per decoder layer (of {visual}): {st.visual_tokens_per_layer}")
    print(f"average visual tokens: {st.average_visual_tokens:.1f}")
    print(f"decoder prefill FLOPs: {st.flops / 1e9:.3f} G vs {st.flops_unpruned / 1e9:.3f} G unpruned "
          f"(ratio {st.flops_ratio:.3f})")
    print(f"prefill latency (median of {args.repeats}): {pruned_ms:.1f} ms pruned vs {base_ms:.1f} ms unpruned "
          f"({base_ms / pruned_ms:.2f}x)")
    if args.image:
        if not st.selections:
            print(f"no retention map: {args.method} records no patch selection")
            return
        from PIL import Image

        from vtprune.retention_map import save_retention_map

        v = model.config.vision_config
        save_retention_map(args.out, st.selections, v.image_size // v.patch_size, Image.open(args.image))
        print(f"retention map: {args.out}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = ("demo", "ops")
    if not argv or argv[0] not in commands:
        print(f"usage: python -m vtprune {{{','.join(commands)}}} [options]  (--help after a command for more)")
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    if argv[0] == "demo":
        demo(argv[1:])
        return
    from vtprune import ops_demo

    ops_demo.main(argv[1:])


if __name__ == "__main__":
    main()
