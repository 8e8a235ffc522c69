"""``vtprune demo``: run a LLaVA model (the built-in tiny random-weight one by default, or ``--model PATH``
for a local checkpoint) with and without a token-reduction method and print the visual tokens each decoder
layer ran on, the theoretical FLOPs ratio and the measured prefill latency; ``--image`` also saves a
retention map of the kept / merged patches per stage."""

from __future__ import annotations

import argparse
import statistics
import time

from vtprune.cli._args import Parser, UsageError, image_file, model_dir, positive_int, writable_output

METHODS = ("visiondrop", "alvts", "fastv", "visionzip", "pyramiddrop", "pool")
FAMILIES = ("llava", "llava_next", "qwen2_5_vl", "qwen3_vl")
HELP = "run a model with and without a method: tokens per layer, FLOPs, prefill latency"


def make_method(name: str, tokens: int | None, visual: int, tiles: int = 1, average: float | None = None):
    """A method object for the demo's ``--method`` / ``--tokens`` (``visual``: image tokens per image; ``tiles``:
    336 px tiles of the image, LLaVA-NeXT, where ``--tokens`` is per tile), or ``--average`` (the shared budget:
    average visual tokens per decoder layer, every method's ``average=``)."""
    import vtprune

    if average is not None:
        classes = dict(visiondrop="VisionDrop", alvts="ALVTS", fastv="FastV", visionzip="VisionZip",
                       pyramiddrop="PyramidDrop", pool="UniformPool")
        if name not in classes:
            raise ValueError(f"--method must be one of {METHODS}, got {name!r}")
        return getattr(vtprune, classes[name])(average=average)
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


def add_arguments(p) -> None:
    p.add_argument("--model", help="local LLaVA-1.5 checkpoint directory (default: built-in tiny random model)")
    p.add_argument("--family", default="llava", choices=FAMILIES,
                   help="model family of the built-in tiny model (LLaVA-NeXT: --tokens is per 336 px tile)")
    p.add_argument("--method", default="visiondrop", choices=METHODS)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=int, default=64,
                        help="the method's native budget (VisionDrop: average visual tokens; FastV: kept after "
                             "layer 2; ALVTS: image tokens routed through each layer)")
    budget.add_argument("--average", type=_average, default=None, metavar="N",
                        help="average visual tokens per decoder layer, for every method (its average=)")
    p.add_argument("--method-config", metavar="FILE",
                   help="a saved method config (JSON or YAML, see vtprune.config) instead of --method/--tokens")
    p.add_argument("--image", help="image file: fed to the model and used for the retention map")
    p.add_argument("--out", default="retention_map.png", help="retention-map PNG (with --image)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed prefills per setting (median)")


def _average(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    return int(value) if value.is_integer() else value


def _check_paths(args) -> None:
    """Everything about the arguments that can be checked before a model is loaded."""
    if args.family != "llava" and (args.model or args.image):
        raise UsageError(f"--model and --image are LLaVA-1.5 only; --family {args.family} runs the built-in "
                         "tiny model")
    if args.model is not None:
        model_dir("--model", args.model)
    if args.image is not None:
        image_file("--image", args.image)
        writable_output("--out", args.out, extensions=(".png",))


def _load_tiny(family):
    """Built-in tiny models: LLaVA-NeXT with a 2x2-tile 672 px image (5 x 576 tokens + newlines), Qwen2.5-VL and
    Qwen3-VL with a 64x64-patch image (1024 merged tokens)."""
    from vtprune.models import _tiny

    if family == "llava_next":
        model = _tiny.tiny_llava_next("demo")
        return model, _tiny.tiny_next_inputs(model, (35,), (20,), ((672, 672),))
    if family == "qwen3_vl":
        from vtprune.models._tiny_qwen3_vl import tiny_qwen3_vl

        model = tiny_qwen3_vl()
    else:
        model = _tiny.tiny_qwen2_5_vl()
    return model, _tiny.tiny_qwen_inputs(model, (35,), (20,), ((64, 64),))


def _load(args):
    import torch

    from vtprune.models._tiny import tiny_inputs, tiny_llava

    if args.family != "llava":
        return _load_tiny(args.family)
    if args.model is None:
        model = tiny_llava("demo")
        inputs = tiny_inputs(model, (35,), (20,))
        if args.image:
            inputs["pixel_values"] = _pixels(args.image, model.config.vision_config.image_size)
        return model, inputs
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    try:
        model = LlavaForConditionalGeneration.from_pretrained(args.model, torch_dtype="auto").eval()
        processor = AutoProcessor.from_pretrained(args.model)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"--model {args.model!r}: cannot load a LLaVA-1.5 checkpoint and processor ({line})") from None
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


def _method(args, model, inputs):
    """The method of ``--method-config`` or of ``--method`` / ``--tokens``; refusals become UsageErrors."""
    if args.method_config is not None:
        from vtprune.config import load_method_file

        try:
            return load_method_file(args.method_config, model=model)
        except (OSError, ValueError) as e:
            raise UsageError(f"--method-config {args.method_config!r}: {e}") from None
    visual = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    try:
        tiles = inputs["pixel_values"].shape[1] if args.family == "llava_next" else 1
        return make_method(args.method, args.tokens, visual, tiles, args.average)
    except ImportError as e:
        raise UsageError(f"--method {args.method}: {e}") from e
    except ValueError as e:  # a budget the method refuses
        raise UsageError(f"--method {args.method} {_budget_flag(args)}: {e}") from e


def _budget_flag(args) -> str:
    return f"--average {args.average:g}" if args.average is not None else f"--tokens {args.tokens}"


def run(args) -> None:
    import vtprune

    _check_paths(args)
    model, inputs = _load(args)
    visual = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    method = _method(args, model, inputs)
    what = f"--method-config {args.method_config}" if args.method_config else \
        f"--method {args.method} {_budget_flag(args)}"
    base_ms = _prefill_ms(model, inputs, args.repeats)
    try:
        handle = vtprune.apply(model, method)
    except ValueError as e:
        raise UsageError(f"{what} on --family {args.family}: {e}") from e
    with handle:
        try:
            pruned_ms = _prefill_ms(model, inputs, args.repeats)
        except ValueError as e:  # a budget this model's images cannot meet (checked on the first forward)
            raise UsageError(f"{what} on --family {args.family}: {e}") from e
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


def demo(argv) -> None:
    """``vtprune demo`` on its own: a refused argument raises ``SystemExit`` with the one-line message."""
    p = Parser(prog="vtprune demo", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        run(args)
    except UsageError as e:
        raise SystemExit(str(e)) from None
