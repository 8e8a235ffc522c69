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
from vtprune.models import _tiny  # noqa: E402

PROMPT = (35, 20)  # text tokens before / after the image: LLaVA-1.5's system prompt and a short question


def llava15_7b_config(attn: str):
    """LLaVA-1.5-7B's shape: CLIP-L/336 (24 layers, 1024 wide, 576 patches) + Vicuna-7B (32 x 4096)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    cfg._attn_implementation = attn
    return cfg


def build(name: str, device: str, dtype, attn: str):
    """A random-weight model by name: ``llava15_7b`` (GPU shapes) or ``tiny_llava`` (demo-size, CPU)."""
    if name == "tiny_llava":
        return _tiny.tiny_llava("demo", attn_implementation=attn, dtype=dtype).to(device)
    if name == "llava15_7b":
        from transformers import LlavaForConditionalGeneration

        with torch.device(device):
            model = LlavaForConditionalGeneration(llava15_7b_config(attn))
        model.generation_config.pad_token_id = 0
        return model.to(dtype).eval()
    raise ValueError(f"unknown model {name!r}; known: llava15_7b, tiny_llava")


def inputs_for(model, batch: int, device: str, seed: int = 0) -> dict:
    """``batch`` identical-length prompts [text, <image> x N, text] with random ids and pixels."""
    cfg = model.config
    v = cfg.vision_config
    n = (v.image_size // v.patch_size) ** 2 + (cfg.vision_feature_select_strategy != "default")
    g = torch.Generator().manual_seed(seed)
    vocab = cfg.get_text_config().vocab_size
    image_id = cfg.image_token_id
    rows = []
    for _ in range(batch):
        text = torch.randint(1, min(vocab, image_id), (sum(PROMPT),), generator=g)
        rows.append(torch.cat([text[: PROMPT[0]], torch.full((n,), image_id), text[PROMPT[0]:]]))
    ids = torch.stack(rows)
    pixels = torch.randn(batch, 3, v.image_size, v.image_size, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, model.dtype)}


def _solve_ratio(target: float, n: int) -> float:
    """PyramidDrop keeps lambda^s of the image after stage s at 1/4, 2/4, 3/4 depth: mean = n(1+l+l^2+l^3)/4."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if n * (1 + mid + mid**2 + mid**3) / 4 < target else (lo, mid)
    return (lo + hi) / 2


def method_for(kind: str, budget: int, n_visual: int, n_layers: int, backend: str):
    """The method object whose average visual tokens over the LLM layers is ``budget``, or a reason string."""
    if kind == "visiondrop":
        return vtprune.VisionDrop(tokens=budget, backend=backend)
    if kind == "visionzip":
        dominant = max(1, round(budget * 54 / 64))
        return vtprune.VisionZip(dominant=dominant, contextual=budget - dominant, backend=backend)
    if kind == "pyramiddrop":
        if budget <= n_visual / 4:  # the first quarter of the layers always sees the whole image
            return f"PyramidDrop cannot average {budget} tokens: the first 1/4 of the layers keep all {n_visual}"
        return vtprune.PyramidDrop(ratio=_solve_ratio(budget, n_visual), backend=backend)
    if kind == "fastv":
        k = 2  # FastV's default: full image for the first K layers, then a fixed count
        kept = round((budget * n_layers - k * n_visual) / (n_layers - k))
        if kept < 1:
            return f"FastV(K=2) cannot average {budget} tokens over {n_layers} layers"
        return vtprune.FastV(layer=k, tokens=kept, backend=backend)
    if kind == "pool":
        side = round(budget**0.5)
        return vtprune.UniformPool(tokens=budget, backend=backend) if side * side == budget else (
            f"UniformPool needs a square budget, got {budget}")
    if kind == "alvts":
        try:
            from vtprune.methods.alvts import ALVTS
        except ImportError as e:
            return f"ALVTS unavailable ({e})"
        return ALVTS(keep=budget, backend=backend)
    raise ValueError(f"unknown method {kind!r}")


@torch.no_grad()
def ideal_ms(model, inputs, tokens_per_layer, device, warmup, rep) -> float:
    """Time of the model's own pieces fed the scheduled token counts with no selection work at all."""
    lm = model.model.language_model
    batch = inputs["input_ids"].shape[0]
    hidden = lm.config.hidden_size
    xs = [torch.randn(batch, n, hidden, device=device, dtype=model.dtype) for n in tokens_per_layer]
    pos = [torch.arange(n, device=device)[None].expand(batch, n) for n in tokens_per_layer]
    rope = [lm.rotary_emb(x, p) for x, p in zip(xs, pos)]

    def run():
        model.model.get_image_features(pixel_values=inputs["pixel_values"])
        h = None
        for i, layer in enumerate(lm.layers):
            h = layer(xs[i], attention_mask=None, position_ids=pos[i], position_embeddings=rope[i])
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
    p.add_argument("--models", default=None, help="comma list (default: llava15_7b on cuda, tiny_llava on cpu)")
    p.add_argument("--methods", default="visiondrop,fastv,visionzip,pyramiddrop,pool,alvts")
    p.add_argument("--budgets", default="192,128,64")
    p.add_argument("--batches", default=None, help="comma list (default 1,8 on cuda, 1,2 on cpu)")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--rep", type=int, default=None)
    p.add_argument("--decode-tokens", type=int, default=None)
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    a = p.parse_args(argv)
    from tqdm import tqdm

    gpu = a.device == "cuda"
    models = (a.models or ("llava15_7b" if gpu else "tiny_llava")).split(",")
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
        n_visual = seq - sum(PROMPT)
        from vtprune.flops import prefill_flops

        base_ideal = ideal_ms(model, inputs, [seq] * n_layers, a.device, warmup, rep)
        common = dict(model=name, batch=batch, device=a.device)
        rows.append(dict(common, method="unpruned", budget=n_visual, avg_visual=float(n_visual),
                         ideal_ms=base_ideal, overhead=base["prefill_ms"] / base_ideal, speedup=1.0,
                         tflops=prefill_flops(model.config, seq) / 1e12,
                         tflops_unpruned=prefill_flops(model.config, seq) / 1e12, **base))
        bar.update()
        for kind in methods:
            for budget in budgets:
                method = method_for(kind, budget, n_visual, n_layers, a.backend)
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


def plot(rows, path) -> None:
    """Prefill latency against average visual tokens, one line per method and model/batch (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = sorted({(r["model"], r["batch"], r["method"]) for r in rows if r["method"] != "unpruned"})
    for model, batch, method in keys:
        pts = sorted((r["avg_visual"], r["prefill_ms"]) for r in rows
                     if (r["model"], r["batch"], r["method"]) == (model, batch, method))
        ax.plot(*zip(*pts), marker="o", label=f"{method} ({model}, b={batch})")
    for r in rows:
        if r["method"] == "unpruned":
            ax.axhline(r["prefill_ms"], ls="--", lw=0.8, color="gray")
    ax.set_xlabel("average visual tokens per LLM layer")
    ax.set_ylabel("prefill latency (ms)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
