"""End-to-end speed: prefill and decode latency, peak memory and FLOPs of whole models, unpruned vs each method.

    python benchmarks/bench_e2e.py --device cuda                 # 7B-shaped random-weight models, bf16
    python benchmarks/bench_e2e.py --device cpu --quick          # tiny models, the same table, < 2 minutes

Weights are random (speed does not depend on them), so no checkpoint is needed. For every (model, batch,
method, budget) the script reports:

* ``prefill_ms``: one forward over the prompt (median of ``--rep`` runs after warm-up; CUDA events on a GPU);
* ``ideal_ms``: the same model's pieces fed the *scheduled* token counts directly (vision tower + projector on
  the image, then each decoder layer on the number of tokens the method left it, then the LM head), so
  ``overhead = prefill_ms / ideal_ms`` is what scoring, merging and routing cost on top of the smaller
  sequences;
* ``decode_ms``: per generated token, from ``generate`` with ``1 + T`` vs ``1`` new tokens;
* ``peak_gib``: peak allocated GPU memory of the prefill (GPU only);
* ``tflops`` / ``tflops_unpruned``: theoretical decoder prefill FLOPs (:mod:`vtprune.flops`) from the per-layer
  token counts the handle reports.

Budgets are *average visual tokens over the LLM layers* (the PyramidDrop/VisionDrop convention); each method's
knobs are solved for that average (see :func:`method_for`). A method that cannot reach a budget on a model is
skipped with the reason printed.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vtprune  # noqa: E402
from common import print_table, time_ms, write_results  # noqa: E402
from vtprune.flops import prefill_flops  # noqa: E402
from vtprune.models import _tiny  # noqa: E402

PROMPT = (35, 20)  # text tokens before / after the image: LLaVA-1.5's system prompt and a short question


def _clip_l336():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, projection_dim=768)


def _vicuna_7b():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=8192, pad_token_id=0)


def _qwen_config(hidden, intermediate, layers, heads, kv_heads):
    """Qwen2.5-VL's vision tower (32 blocks, 1280 wide, full attention at 7/15/23/31) with a Qwen2.5 LLM."""
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=hidden,
                  fullatt_block_indexes=[7, 15, 23, 31])
    text = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=152064,
                max_position_embeddings=32768, pad_token_id=_tiny.PAD_TOKEN, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=_tiny.IMAGE_TOKEN,
                            video_token_id=_tiny.VIDEO_TOKEN, vision_start_token_id=_tiny.VISION_START,
                            vision_end_token_id=_tiny.VISION_END)


def real_config(name: str):
    """Real-model shapes; special-token ids are the tiny models' so the same input builders serve both."""
    from transformers import LlavaConfig, LlavaNextConfig

    if name == "llava15_7b":  # CLIP-L/336 (576 patches) + Vicuna-7B (32 x 4096)
        return LlavaConfig(vision_config=_clip_l336(), text_config=_vicuna_7b(), image_token_id=_tiny.IMAGE_TOKEN,
                           vision_feature_layer=-2, vision_feature_select_strategy="default")
    if name == "llava_next_7b":  # anyres: base + up to 4 tiles of 336 px (2880 patches + newlines)
        pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        return LlavaNextConfig(vision_config=_clip_l336(), text_config=_vicuna_7b(),
                               image_token_index=_tiny.IMAGE_TOKEN, vision_feature_layer=-2,
                               vision_feature_select_strategy="default", image_grid_pinpoints=pins)
    if name == "qwen25vl_7b":
        return _qwen_config(3584, 18944, 28, 28, 4)
    if name == "qwen25vl_3b":
        return _qwen_config(2048, 11008, 36, 16, 2)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")


MODELS = ("llava15_7b", "llava_next_7b", "qwen25vl_7b", "qwen25vl_3b", "tiny_llava", "tiny_llava_next",
          "tiny_qwen2_5_vl")


def build(name: str, device: str, dtype, attn: str):
    """A random-weight model by name, in eval mode on ``device``."""
    if name == "tiny_llava":
        return _tiny.tiny_llava("demo", attn_implementation=attn, dtype=dtype).to(device)
    if name == "tiny_llava_next":
        return _tiny.tiny_llava_next("demo", attn_implementation=attn, dtype=dtype).to(device)
    if name == "tiny_qwen2_5_vl":
        return _tiny.tiny_qwen2_5_vl(attn_implementation=attn, dtype=dtype).to(device)
    import transformers

    config = real_config(name)
    config._attn_implementation = attn
    cls = getattr(transformers, type(config).__name__.replace("Config", "ForConditionalGeneration"))
    with torch.device(device):
        model = cls(config)
    model.generation_config.pad_token_id = _tiny.PAD_TOKEN
    return model.to(dtype).eval()


def inputs_for(model, batch: int, device: str, seed: int = 0) -> dict:
    """``batch`` identical prompts [35 text, image, 20 text] with random ids and pixels: LLaVA one 336 px
    image; LLaVA-NeXT a 672 x 672 image (base + 4 tiles); Qwen2.5-VL a 784 x 1176 px image (1176 tokens)."""
    kind = type(model).__name__
    pre, post = (PROMPT[0],) * batch, (PROMPT[1],) * batch
    if kind.startswith("LlavaNext"):
        side = 2 * model.config.vision_config.image_size
        raw = _tiny.tiny_next_inputs(model, pre, post, ((side, side),) * batch, seed=seed)
    elif kind.startswith("Qwen2_5_VL"):
        grid = (8, 12) if model.config.text_config.hidden_size < 256 else (56, 84)
        raw = _tiny.tiny_qwen_inputs(model, pre, post, (grid,) * batch, seed=seed)
    else:
        raw = _tiny.tiny_inputs(model, pre, post, seed=seed)
    return {k: v.to(device) for k, v in raw.items()}


def n_visual_tokens(model, inputs) -> int:
    """Image placeholder tokens in batch row 0."""
    cfg = model.config
    image_id = getattr(cfg, "image_token_id", None) or cfg.image_token_index
    return int((inputs["input_ids"][0] == image_id).sum())


def _solve_ratio(target: float) -> float:
    """PyramidDrop keeps lambda^s of the image after stage s at 1/4, 2/4, 3/4 depth: mean = (1+l+l^2+l^3)/4."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (1 + mid + mid**2 + mid**3) / 4 < target else (lo, mid)
    return (lo + hi) / 2


def method_for(kind: str, budget: int, model, n_visual: int, backend: str):
    """The method object whose average visual tokens over the LLM layers is ``budget / 576`` of the image
    (``budget`` in LLaVA-1.5 units: 64 means 64 of 576, 320 of LLaVA-NeXT's 5 x 576), or a reason string."""
    family = type(model).__name__
    n_layers = model.config.get_text_config().num_hidden_layers
    r = budget / 576
    llava = family.startswith("LlavaForConditional")
    if kind == "visiondrop":
        return vtprune.VisionDrop(tokens=budget, backend=backend) if llava else vtprune.VisionDrop(
            ratio=r, backend=backend)
    if kind == "visionzip":  # integer budgets: per image for LLaVA / Qwen, per 336 px tile for LLaVA-NeXT
        total = budget if not family.startswith("Qwen") else round(r * n_visual)
        dominant = max(1, round(total * 54 / 64))
        return vtprune.VisionZip(dominant=dominant, contextual=total - dominant, backend=backend)
    if kind == "pyramiddrop":
        if r <= 0.25:  # the first quarter of the layers always sees the whole image
            return f"PyramidDrop cannot average {budget} of 576: the first 1/4 of the layers keep every token"
        return vtprune.PyramidDrop(ratio=_solve_ratio(r), backend=backend)
    if kind == "fastv":
        k = 2  # FastV's default: every image token for the first K layers, then a fixed fraction
        frac = (r * n_layers - k) / (n_layers - k)
        if frac <= 0:
            return f"FastV(K=2) cannot average {budget} of 576 over {n_layers} layers"
        return vtprune.FastV(layer=k, ratio=frac, backend=backend)
    if kind == "pool":
        side = round(budget**0.5)
        if not llava or side * side != budget:
            return f"UniformPool runs on LLaVA-1.5 with a square budget here, got {family} / {budget}"
        return vtprune.UniformPool(tokens=budget, backend=backend)
    if kind == "alvts":
        try:
            from vtprune.methods.alvts import ALVTS
        except ImportError as e:
            return f"ALVTS unavailable ({e})"
        return ALVTS(keep=budget, backend=backend) if llava else ALVTS(ratio=r, backend=backend)
    raise ValueError(f"unknown method {kind!r}")


@torch.no_grad()
def ideal_ms(model, inputs, tokens_per_layer, device, warmup, rep) -> float:
    """Time of the model's own pieces fed the scheduled token counts with no selection work at all."""
    lm = model.model.language_model
    batch = inputs["input_ids"].shape[0]
    hidden = lm.config.hidden_size
    mrope = type(model).__name__.startswith("Qwen2_5_VL")  # 3-D positions [3, B, n]
    xs = [torch.randn(batch, n, hidden, device=device, dtype=model.dtype) for n in tokens_per_layer]
    pos = [torch.arange(n, device=device).expand(*((3,) if mrope else ()), batch, n) for n in tokens_per_layer]
    rope = [lm.rotary_emb(x, p) for x, p in zip(xs, pos)]
    image_kwargs = {k: inputs[k] for k in ("pixel_values", "image_sizes", "image_grid_thw") if k in inputs}

    def run():
        model.model.get_image_features(**image_kwargs)
        h = None
        for i, layer in enumerate(lm.layers):
            h = layer(xs[i], attention_mask=None, position_embeddings=rope[i])
            h = h[0] if isinstance(h, tuple) else h
        model.lm_head(lm.norm(h))

    return time_ms(run, warmup=warmup, rep=rep, device=device)


@torch.no_grad()
def measure(model, inputs, device, warmup, rep, decode_tokens) -> dict:
    fwd = lambda: model(**inputs, use_cache=False)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prefill = time_ms(fwd, warmup=warmup, rep=rep, device=device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    decode = None
    if decode_tokens:
        gen = lambda t: model.generate(**inputs, max_new_tokens=t, min_new_tokens=t, do_sample=False)
        one = time_ms(lambda: gen(1), warmup=1, rep=max(3, rep // 3), device=device)
        more = time_ms(lambda: gen(1 + decode_tokens), warmup=1, rep=max(3, rep // 3), device=device)
        decode = (more - one) / decode_tokens
    return {"prefill_ms": prefill, "peak_gib": peak, "decode_ms": decode}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny model, few repeats (the CPU smoke test)")
    p.add_argument("--models", default=None, help=f"comma list of {', '.join(MODELS)} (default: the 7B/3B shapes "
                   "on cuda, the tiny models on cpu, tiny_llava alone with --quick)")
    p.add_argument("--methods", default="visiondrop,fastv,visionzip,pyramiddrop,pool,alvts")
    p.add_argument("--budgets", default="192,128,64",
                   help="average visual tokens per 576 image tokens (64 = 320 of LLaVA-NeXT's 2880)")
    p.add_argument("--batches", default=None, help="comma list (default 1,8 on cuda, 1,2 on cpu)")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--rep", type=int, default=None)
    p.add_argument("--decode-tokens", type=int, default=None)
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    a = p.parse_args(argv)
    from tqdm import tqdm

    gpu = a.device == "cuda"
    default = ("llava15_7b,llava_next_7b,qwen25vl_7b,qwen25vl_3b" if gpu else
               "tiny_llava" if a.quick else "tiny_llava,tiny_llava_next,tiny_qwen2_5_vl")
    models = (a.models or default).split(",")
    batches = [int(b) for b in (a.batches or ("1,8" if gpu else "1,2")).split(",")]
    budgets = [int(b) for b in a.budgets.split(",")]
    methods = a.methods.split(",")
    rep = a.rep or (10 if gpu else (2 if a.quick else 5))
    warmup = 3 if gpu else 1
    decode_tokens = a.decode_tokens if a.decode_tokens is not None else (16 if gpu else (0 if a.quick else 4))
    dtype = torch.bfloat16 if gpu else torch.float32

    rows = []
    grid = [(m, b) for m in models for b in batches]
    bar = tqdm(total=len(grid) * (1 + len(methods) * len(budgets)), desc="bench_e2e", file=sys.stderr)
    for name, batch in grid:
        model = build(name, a.device, dtype, a.attn)
        inputs = inputs_for(model, batch, a.device)
        n_layers = model.config.get_text_config().num_hidden_layers
        base = measure(model, inputs, a.device, warmup, rep, decode_tokens)
        seq = inputs["input_ids"].shape[1]
        n_visual = n_visual_tokens(model, inputs)
        base_ideal = ideal_ms(model, inputs, [seq] * n_layers, a.device, warmup, rep)
        common = dict(model=name, batch=batch, device=a.device)
        rows.append(dict(common, method="unpruned", budget=n_visual, avg_visual=float(n_visual),
                         ideal_ms=base_ideal, overhead=base["prefill_ms"] / base_ideal, speedup=1.0,
                         tflops=prefill_flops(model.config, seq) / 1e12,
                         tflops_unpruned=prefill_flops(model.config, seq) / 1e12, **base))
        bar.update()
        for kind in methods:
            for budget in budgets:
                method = method_for(kind, budget, model, n_visual, a.backend)
                if isinstance(method, str):
                    tqdm.write(f"skip {name} {kind}@{budget}: {method}", file=sys.stderr)
                    bar.update()
                    continue
                with vtprune.apply(model, method) as handle:
                    res = measure(model, inputs, a.device, warmup, rep, decode_tokens)
                    st = handle.stats
                ideal = ideal_ms(model, inputs, st.tokens_per_layer, a.device, warmup, rep)
                rows.append(dict(common, method=kind, budget=budget, avg_visual=st.average_visual_tokens,
                                 ideal_ms=ideal, overhead=res["prefill_ms"] / ideal,
                                 speedup=base["prefill_ms"] / res["prefill_ms"], tflops=st.flops / 1e12,
                                 tflops_unpruned=st.flops_unpruned / 1e12, **res))
                bar.update()
        del model
        if gpu:
            torch.cuda.empty_cache()
    bar.close()
    print_table(rows, ["model", "batch", "method", "budget", "avg_visual", "prefill_ms", "ideal_ms", "overhead",
                       "speedup", "decode_ms", "peak_gib", "tflops", "tflops_unpruned"])
    tag = "gpu" if gpu else "cpu"
    path = write_results(f"e2e_{tag}{'_quick' if a.quick else ''}", rows, out_dir=a.out)
    print(f"results: {path}")
    if not a.quick:
        plot(rows, path.replace(".json", ".png"))
        plot_breakdown(rows, path.replace(".json", "_breakdown.png"))


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    return plt


def plot_breakdown(rows, path) -> None:
    """Where prefill time goes at batch 1: the schedule's ideal time and the selection overhead on top."""
    plt = _pyplot()
    if plt is None:
        return
    sel = [r for r in rows if r["batch"] == min(x["batch"] for x in rows)]
    labels = [f"{r['model']}\n{r['method']}@{r['budget']}" for r in sel]
    ideal = [r["ideal_ms"] for r in sel]
    extra = [max(0.0, r["prefill_ms"] - r["ideal_ms"]) for r in sel]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(sel)), 4.5))
    ax.bar(range(len(sel)), ideal, label="ideal (layers on the scheduled token counts)")
    ax.bar(range(len(sel)), extra, bottom=ideal, label="scoring / merging / routing overhead")
    ax.set_xticks(range(len(sel)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("prefill latency (ms)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def plot(rows, path) -> None:
    """Prefill latency against average visual tokens: one panel per model (smallest batch), a line per method,
    the unpruned model as a dashed line (needs matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return
    batch = min(r["batch"] for r in rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and r["batch"] == batch]
        for method in dict.fromkeys(r["method"] for r in mine if r["method"] != "unpruned"):
            pts = sorted((r["avg_visual"], r["prefill_ms"]) for r in mine if r["method"] == method)
            ax.plot(*zip(*pts), marker="o", label=method)
        for r in mine:
            if r["method"] == "unpruned":
                ax.axhline(r["prefill_ms"], ls="--", lw=0.8, color="gray", label="unpruned")
        ax.set_title(f"{model}, batch {batch}", fontsize=9)
        ax.set_xlabel("average visual tokens per LLM layer")
        ax.set_ylabel("prefill latency (ms)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
