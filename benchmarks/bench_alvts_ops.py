"""ALVTS op benchmarks: the selector's cost against a layer, and the routed layer against its alternatives.

Selector rows (per shape): ``lowrank_scores`` + ``topk_keep_order`` (what ALVTS adds before a layer) against
one decoder layer's attention module and the whole layer on the same L tokens. GPU target: selector <= 10%
of the layer.

Routed-layer rows (LLaVA-1.5, keep 192/128/64 of 576 image tokens): ``vtprune.ops.routed_layer`` (fused
Triton on CUDA), its reference (gather + layer + scatter), the unfused PyTorch path a user would write
(boolean-mask indexing + ``index_put_``), the full layer on L tokens, and a plain layer on the same number
of tokens K (the ideal). GPU target: routed at 64/576 <= 1.15x the plain layer on K tokens.

Shapes: LLaVA-1.5-7B (L ~ 650, 576 image tokens after a 35-token prefix) and LLaVA-NeXT-7B (L ~ 2950,
2880 image tokens), D = 4096, 32 heads, MLP 11008, R = 256, random weights (speed does not depend on
them), bf16 on CUDA. ``--device cpu --quick`` runs tiny shapes in float32 with the reference backends (the
Triton interpreter is no timing tool) and writes ``results/alvts_ops_cpu.json``.

Usage::

    python benchmarks/bench_alvts_ops.py                    # CUDA, full shapes -> results/alvts_ops_gpu.json
    python benchmarks/bench_alvts_ops.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # runs as a script or as -m benchmarks.<name>
from common import print_table, time_ms, write_results  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    prefix: int  # text tokens before the image
    visual: int
    suffix: int  # text tokens after the image
    hidden: int
    heads: int
    mlp: int
    rank: int

    @property
    def length(self) -> int:
        return self.prefix + self.visual + self.suffix


FULL = [Shape("llava-1.5", 35, 576, 39, 4096, 32, 11008, 256), Shape("llava-next", 35, 2880, 39, 4096, 32, 11008, 256)]
QUICK = [Shape("tiny", 8, 64, 8, 256, 4, 512, 16), Shape("tiny-long", 8, 192, 8, 256, 4, 512, 16)]
KEEPS = (192, 128, 64)  # of 576 (LLaVA-1.5)


def make_layer(shape: Shape, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.mlp, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.heads, num_hidden_layers=1, vocab_size=32000,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        layer = LlamaDecoderLayer(cfg, 0).to(dtype).eval()
        rot = LlamaRotaryEmbedding(cfg)
    return layer, rot, cfg


def selector_rows(shape: Shape, device: str, dtype: torch.dtype, backends, rep: int) -> list[dict]:
    from vtprune.alvts import svd_factors

    layer, rot, _ = make_layer(shape, device, dtype)
    L = shape.length
    x = torch.randn(1, L, shape.hidden, device=device, dtype=dtype)
    pe = rot(x, torch.arange(L, device=device)[None])
    u, v = svd_factors(layer, shape.rank)
    with torch.no_grad():
        h = layer.input_layernorm(x)
        t_attn = time_ms(lambda: layer.self_attn(h, position_embeddings=pe, attention_mask=None), rep=rep,
                         device=device)
        t_layer = time_ms(lambda: layer(x, position_embeddings=pe), rep=rep, device=device)
        rows = [_selector_row(shape, h, u, v, backend, rep, device) for backend in backends]
    return [dict(r, attention_ms=t_attn, layer_ms=t_layer,
                 selector_over_layer=(r["lowrank_scores_ms"] + r["topk_ms"]) / t_layer) for r in rows]


def _selector_row(shape: Shape, h, u, v, backend: str, rep: int, device: str) -> dict:
    from vtprune.ops.lowrank_scores import lowrank_scores
    from vtprune.ops.topk_keep_order import topk_keep_order

    spans = torch.tensor([[shape.prefix, shape.visual]])
    k = max(1, shape.visual // 9)  # keep 64 of 576
    scores = lowrank_scores(h, u, v, visual_spans=spans, backend=backend)
    t_sel = time_ms(lambda: lowrank_scores(h, u, v, visual_spans=spans, backend=backend), rep=rep, device=device)
    t_topk = time_ms(lambda: topk_keep_order(scores, k, backend=backend), rep=rep, device=device)
    return dict(bench="selector", shape=shape.name, L=shape.length, R=shape.rank, backend=backend,
                lowrank_scores_ms=t_sel, topk_ms=t_topk)


def routed_rows(shape: Shape, device: str, dtype: torch.dtype, backends, rep: int) -> list[dict]:
    layer, rot, _ = make_layer(shape, device, dtype)
    L = shape.length
    x = torch.randn(1, L, shape.hidden, device=device, dtype=dtype)
    pe = rot(x, torch.arange(L, device=device)[None])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        t_full = time_ms(lambda: layer(x, position_embeddings=pe), rep=rep, device=device)
        rows = []
        for keep in KEEPS:
            keep = max(1, keep * shape.visual // 576)
            picked = torch.randperm(shape.visual, generator=gen)[:keep].sort().values + shape.prefix
            text = torch.cat([torch.arange(shape.prefix), torch.arange(shape.prefix + shape.visual, L)])
            idx = torch.cat([text, picked]).sort().values[None].to(device)  # [1, K]
            row = _routed_row(layer, x, pe, idx, backends, rep, device)
            rows.append(dict(row, shape=shape.name, L=L, keep=keep, full_layer_ms=t_full,
                             routed_over_full=row["routed_best_ms"] / t_full))
    return rows


def _routed_row(layer, x, pe, idx, backends, rep: int, device: str) -> dict:
    from vtprune.ops.routed_layer import routed_layer

    K = idx.shape[1]
    mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=device)
    mask[0, idx[0]] = True
    xk = x[:, :K].clone()
    pe_k = tuple(t[:, idx[0]] for t in pe)

    def unfused():  # what a user writes: boolean-mask gather, the layer, index_put_ back
        y = layer(x[mask].view(1, K, -1), position_embeddings=pe_k)
        x.index_put_((mask,), y.view(K, -1))

    row = dict(bench="routed_layer", K=K,
               plain_layer_on_K_ms=time_ms(lambda: layer(xk, position_embeddings=pe_k), rep=rep, device=device),
               unfused_torch_ms=time_ms(unfused, rep=rep, device=device))
    for backend in backends:
        row[f"routed_{backend}_ms"] = time_ms(
            lambda b=backend: routed_layer(layer, x, idx, position_embeddings=pe, backend=b), rep=rep, device=device)
    row["routed_best_ms"] = min(row[f"routed_{b}_ms"] for b in backends)
    row["routed_over_plain_K"] = row["routed_best_ms"] / row["plain_layer_on_K_ms"]
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CI / CPU)")
    parser.add_argument("--out", default=None, help="directory for the JSON result (default benchmarks/results)")
    args = parser.parse_args(argv)
    device = args.device
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    backends = ("triton", "reference") if cuda else ("reference",)
    rep = 50 if cuda else 20
    shapes = QUICK if args.quick else FULL
    torch.manual_seed(0)
    rows = []
    for shape in shapes:
        rows += selector_rows(shape, device, dtype, backends, rep)
    rows += routed_rows(shapes[0], device, dtype, backends, rep)
    print_table([r for r in rows if r["bench"] == "selector"],
                ["shape", "L", "R", "backend", "lowrank_scores_ms", "topk_ms", "attention_ms", "layer_ms",
                 "selector_over_layer"])
    print_table([r for r in rows if r["bench"] == "routed_layer"],
                ["shape", "L", "K", "keep", "full_layer_ms", "plain_layer_on_K_ms", "unfused_torch_ms",
                 *(f"routed_{b}_ms" for b in backends), "routed_over_plain_K"])
    name = f"alvts_ops_{'gpu' if cuda else 'cpu'}"
    meta = dict(dtype=str(dtype).replace("torch.", ""), quick=args.quick, backends=list(backends))
    print("wrote", write_results(name, [dict(r, **meta) for r in rows], out_dir=args.out))


if __name__ == "__main__":
    main()
