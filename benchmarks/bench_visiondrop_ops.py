"""VisionDrop op benchmarks: every backend of each op against what users run instead, at real-model shapes.

Per op and shape (batch 1 and 8): ``reference`` (vtprune's PyTorch spec), ``triton``, ``cuda`` (when the
extension is built and has the op), ``compile(reference)`` (``torch.compile`` of the reference), and the
user's baselines: for scores, eager attention materialising softmax(QK^T) [B, H, L, L] and then column sums;
for attention + scores, eager attention with its weights, and SDPA followed by a separate reference score
pass; for top-k, ``torch.topk`` then a sort. Each row gives the median time, the speed-up over the reference
and over the fastest baseline, the achieved TFLOP/s (attention) or GB/s (top-k, merge), and the time over
the floor: max(FLOPs / matmul peak, bytes / copy bandwidth), both ceilings measured at start on this device.

Shapes: CLIP-L/336 layer -2 (577 tokens, 16 heads x 64, [CLS] row vs the 576 patches), LLaVA-1.5 LLM
(650 tokens, 32 x 128, image span 576), LLaVA-NeXT (2950 / 2880), Qwen2.5-VL-7B (GQA 28/4 x 128, 1k/4k/8k
tokens); merge at D 1024 (CLIP) and 4096 (LLM). bf16 on CUDA, float32 on the CPU. ``--quick`` uses tiny
shapes; on the CPU it finishes in well under a minute and runs Triton only under ``TRITON_INTERPRET=1``,
labelled ``triton (interpreter)``: interpreter times measure Python, not the kernel.

Usage::

    python benchmarks/bench_visiondrop_ops.py --device cuda            # -> results/visiondrop_ops_cuda.json
    python benchmarks/bench_visiondrop_ops.py --device cpu [--quick] [--threads 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script too

from benchmarks.common import print_table, time_ms, write_results  # noqa: E402
from vtprune import ops  # noqa: E402


@dataclass(frozen=True)
class AttnShape:
    name: str
    L: int
    H: int
    Hkv: int
    d: int
    qspan: tuple[int, int]
    kspan: tuple[int, int]
    causal: bool


@dataclass(frozen=True)
class MergeShape:
    name: str
    N: int
    D: int
    dk: int
    k: int
    C: int


ATTN_FULL = [
    AttnShape("clip-l336-cls", 577, 16, 16, 64, (0, 1), (1, 576), False),
    AttnShape("llava-1.5", 650, 32, 32, 128, (35, 576), (35, 576), True),
    AttnShape("llava-next", 2950, 32, 32, 128, (35, 2880), (35, 2880), True),
    AttnShape("qwen2.5-vl-1k", 1024, 28, 4, 128, (20, 960), (20, 960), True),
    AttnShape("qwen2.5-vl-4k", 4096, 28, 4, 128, (20, 3840), (20, 3840), True),
    AttnShape("qwen2.5-vl-8k", 8192, 28, 4, 128, (20, 7936), (20, 7936), True),
]
ATTN_QUICK = [
    AttnShape("tiny-cls", 65, 4, 4, 32, (0, 1), (1, 64), False),
    AttnShape("tiny-llm-gqa", 96, 4, 2, 32, (8, 64), (8, 64), True),
]
MERGE_FULL = [  # (dominant, contextual) as the VisionDrop presets use them
    MergeShape("clip-l336", 576, 1024, 64, 47, 6),
    MergeShape("llava-1.5", 576, 4096, 128, 160, 32),
    MergeShape("llava-next", 2880, 4096, 128, 288, 32),
]
MERGE_QUICK = [MergeShape("tiny", 96, 64, 16, 12, 4)]
TOPK_FULL = [(576, 47), (2880, 288), (7936, 1024)]
TOPK_QUICK = [(96, 12)]


# ---- ceilings -------------------------------------------------------------------------------------------


def measure_peaks(device: str, dtype: torch.dtype, quick: bool) -> dict:
    """Matmul rate (FLOP/s) in ``dtype`` and copy bandwidth (bytes read + written per s), measured here."""
    n = 1024 if device == "cpu" or quick else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t_mm = time_ms(lambda: a @ b, device=device) / 1e3
    numel = (1 << 24 if device == "cpu" or quick else 1 << 28) // 4  # 16 MiB / 256 MiB of float32
    src, dst = torch.randn(numel, device=device), torch.empty(numel, device=device)
    t_cp = time_ms(lambda: dst.copy_(src), device=device) / 1e3
    return {"matmul_flops": 2 * n**3 / t_mm, "copy_bytes_per_s": 2 * 4 * numel / t_cp, "matmul_n": n}


def pairs(rows: tuple[int, int], cols: tuple[int, int], causal: bool) -> int:
    """Number of (query i, key j) with i in rows, j in cols and, when causal, j <= i."""
    i = torch.arange(rows[0], rows[0] + rows[1])
    per_row = (i + 1).clamp(max=cols[0] + cols[1]) - cols[0] if causal else torch.full_like(i, cols[1])
    return int(per_row.clamp(min=0).sum())


# ---- the users' baselines ------------------------------------------------------------------------------


def eager_probs(q, k, causal):
    """softmax(QK^T / sqrt(d)) [B, H, L, L] as HF eager attention makes it (fp32 softmax, cast back)."""
    g = q.shape[1] // k.shape[1]
    w = q @ k.repeat_interleave(g, 1).transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        L = q.shape[2]
        w = w.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(w.float(), -1).to(q.dtype)


def span_columns(p, s: AttnShape):
    (qs, qc), (ks, kc) = s.qspan, s.kspan
    return p[:, :, qs : qs + qc, ks : ks + kc].float().mean((1, 2))


def eager_scores(q, k, s: AttnShape):
    return span_columns(eager_probs(q, k, s.causal), s)


def eager_with_scores(q, k, v, s: AttnShape):
    p = eager_probs(q, k, s.causal)
    return p @ v.repeat_interleave(q.shape[1] // v.shape[1], 1), span_columns(p, s)


def sdpa_then_scores(q, k, v, s: AttnShape, spans):
    out = F.scaled_dot_product_attention(q, k, v, is_causal=s.causal, enable_gqa=k.shape[1] != q.shape[1])
    return out, ops.attention_scores(q, k, query_spans=spans[0], key_spans=spans[1], causal=s.causal,
                                     backend="reference")


def topk_then_sort(scores, k):
    return torch.topk(scores, k, dim=1).indices.sort(dim=1).values


# ---- runner --------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, device: str, dtype: torch.dtype, peaks: dict, compile_policy: str):
        self.device, self.dtype, self.peaks = device, dtype, peaks
        self.compile_policy = compile_policy  # "first": compile(reference) on each op's first case only
        self.rows: list[dict] = []
        self.skips: dict[str, str] = {}
        self.compiled_ops: set[str] = set()
        self.backends = available_backends(device)

    def run(self, op: str, shape: str, batch: int, impls: dict, flops: float, nbytes: float) -> None:
        """Check every implementation against the reference once, time it, and append the rows."""
        floor_s = max(flops / self.peaks["matmul_flops"], nbytes / self.peaks["copy_bytes_per_s"])
        want = impls["reference"]()
        block = []
        for name, fn in impls.items():
            row = dict(op=op, shape=shape, batch=batch, impl=name, flops=flops, bytes=nbytes,
                       floor_ms=floor_s * 1e3)
            try:
                row["agrees"] = agrees(fn(), want)
                row["ms"] = time_ms(fn, **self.reps(fn, name), device=self.device)
            except torch.OutOfMemoryError:  # the materialising baselines at 8k tokens x 8
                row["status"] = "out of memory"
                torch.cuda.empty_cache()
            except Exception as e:
                if not name.startswith(("compile", "baseline")):
                    raise  # vtprune's own backends never skip silently
                # e.g. torch.compile without a working compiler: say why once, keep going
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                if name not in self.skips:
                    print(f"skipped {name} ({op}/{shape}): {reason}")
                self.skips[name] = reason
                row["status"] = "skipped: " + reason
            block.append(row)
        timed = [r for r in block if "ms" in r]
        ref = next((r["ms"] for r in timed if r["impl"] == "reference"), None)
        base = min((r["ms"] for r in timed if r["impl"].startswith("baseline")), default=None)
        for r in timed:
            r["speedup_vs_reference"] = ref / r["ms"] if ref else None
            r["speedup_vs_baseline"] = base / r["ms"] if base else None
            r["tflops"] = flops / r["ms"] / 1e9 if flops else None
            r["gbps"] = nbytes / r["ms"] / 1e6
            r["x_floor"] = r["ms"] / r["floor_ms"]
        self.rows += block
        print(f"  {op:22s} {shape:16s} B={batch}: " + ", ".join(
            f"{r['impl']} {r['ms']:.3g} ms" if "ms" in r else f"{r['impl']} -" for r in block), flush=True)

    def reps(self, fn, name: str) -> dict:
        """Warm-up and repetitions: ~2 s of timed runs per implementation, 5 to 30 of them."""
        if "interpreter" in name:  # Python speed: a few runs say enough
            return dict(warmup=1, rep=3)
        one_ms = time_ms(fn, warmup=0, rep=1, device=self.device)  # fn already ran once (agrees)
        return dict(warmup=1 if one_ms > 100 else 3, rep=max(5, min(30, int(2000 / max(one_ms, 1e-3)))))

    def impls(self, op: str, call, baselines: dict) -> dict:
        """``call(backend)`` runs the public op on one backend; plus compile(reference) and the baselines."""
        out = {}
        for backend in self.backends:
            if backend == "cuda" and importlib.util.find_spec(f"vtprune.cuda.{op}") is None:
                continue
            label = "triton (interpreter)" if backend == "triton" and self.device == "cpu" else backend
            out[label] = lambda b=backend: call(b)
        if self.compile_policy == "all" or (self.compile_policy == "first" and op not in self.compiled_ops):
            self.compiled_ops.add(op)
            out["compile(reference)"] = compiled(lambda: call("reference"))
        out.update({f"baseline: {k}": v for k, v in baselines.items()})
        return out


def agrees(got, want) -> bool:
    """Same result as the reference: equal indices, floats within bf16-level relative error (2e-2)."""
    if isinstance(want, tuple):
        return all(agrees(g, w) for g, w in zip(got, want))
    if not want.is_floating_point():
        return bool(torch.equal(got, want))
    err = (got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30)
    return bool(err <= 2e-2)


def available_backends(device: str) -> list[str]:
    from vtprune._backend import _triton_interpret, triton_available
    from vtprune._ext import extension_available

    backends = ["reference"]
    if triton_available() and (device != "cpu" or _triton_interpret()):
        backends.append("triton")
    elif device == "cpu":
        print("triton: skipped on the CPU (set TRITON_INTERPRET=1 to time the interpreter, which is meaningless)")
    if device != "cpu" and extension_available():
        backends.append("cuda")
    return backends


def compiled(fn):
    """torch.compile(fn) specialised to this shape, compiled on first use (in the warm-up runs).

    Raises (-> a 'skipped' row with the reason) where compile is unavailable. Every case's lambda shares one
    code object, so the recompile limit is raised: past it dynamo would silently run eager code.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    state = {}

    def run():
        if "fn" not in state:
            state["fn"] = torch.compile(fn, dynamic=False)
        return state["fn"]()

    return run


def attention_cases(bench: Bench, shapes, batches) -> None:
    for s in shapes:
        for B in batches:
            gen = torch.Generator(device=bench.device).manual_seed(s.L + B)
            q = torch.randn(B, s.H, s.L, s.d, device=bench.device, dtype=bench.dtype, generator=gen)
            k = torch.randn(B, s.Hkv, s.L, s.d, device=bench.device, dtype=bench.dtype, generator=gen)
            v = torch.randn(B, s.Hkv, s.L, s.d, device=bench.device, dtype=bench.dtype, generator=gen)
            attention_case(bench, s, q, k, v)


def attention_case(bench: Bench, s: AttnShape, q, k, v) -> None:
    B, es = q.shape[0], q.element_size()
    spans = (torch.tensor([s.qspan] * B), torch.tensor([s.kspan] * B))  # CPU spans: no device sync
    kw = dict(query_spans=spans[0], key_spans=spans[1], causal=s.causal)
    logits = pairs(s.qspan, (0, s.L), s.causal) + pairs(s.qspan, s.kspan, s.causal)  # both passes
    bench.run("attention_scores", s.name, B, bench.impls(
        "attention_scores", lambda b: ops.attention_scores(q, k, **kw, backend=b),
        {"eager softmax + column sums": lambda: eager_scores(q, k, s)},
    ), flops=2 * s.d * B * s.H * logits,
        nbytes=(B * s.H * s.qspan[1] * s.d + k.numel()) * es + B * s.kspan[1] * 4)
    # forward: QK^T and PV over every row; scores: the second pass over the query span only
    fwd = pairs((0, s.L), (0, s.L), s.causal)
    bench.run("attention_with_scores", s.name, B, bench.impls(
        "attention_with_scores", lambda b: ops.attention_with_scores(q, k, v, **kw, backend=b),
        {"eager attention + weights": lambda: eager_with_scores(q, k, v, s),
         "SDPA + separate score pass": lambda: sdpa_then_scores(q, k, v, s, spans)},
    ), flops=2 * s.d * B * s.H * (2 * fwd + pairs(s.qspan, s.kspan, s.causal)),
        nbytes=(2 * q.numel() + k.numel() + v.numel()) * es + B * s.kspan[1] * 4)


def topk_cases(bench: Bench, sizes, batches) -> None:
    for N, k in sizes:
        for B in batches:
            topk_case(bench, torch.rand(B, N, device=bench.device), k)


def topk_case(bench: Bench, scores, k: int) -> None:
    B, N = scores.shape
    bench.run("topk_keep_order", f"N={N},k={k}", B, bench.impls(
        "topk_keep_order", lambda b: ops.topk_keep_order(scores, k, backend=b),
        {"torch.topk + sort": lambda: topk_then_sort(scores, k)},
    ), flops=0, nbytes=B * N * 4 + B * k * 8)


def merge_cases(bench: Bench, shapes, batches) -> None:
    for s in shapes:
        for B in batches:
            x = torch.randn(B, s.N, s.D, device=bench.device, dtype=bench.dtype)
            metric = torch.randn(B, s.N, s.dk, device=bench.device, dtype=bench.dtype)
            merge_case(bench, s, torch.rand(B, s.N, device=bench.device), x, metric)


def merge_case(bench: Bench, s: MergeShape, scores, x, metric) -> None:
    B, es = x.shape[0], x.element_size()
    keep = ops.topk_keep_order(scores, s.k, backend="reference")
    nbytes = (x.numel() + metric.numel()) * es + B * (s.k + s.C) * s.D * es  # read all, write packed
    flops = 2 * B * (s.N - s.k) * s.C * s.dk  # the cosine similarities
    bench.run("contextual_merge", s.name, B, bench.impls(
        "contextual_merge", lambda b: ops.contextual_merge(x, metric, keep, s.C, backend=b), {},
    ), flops=flops, nbytes=nbytes)
    bench.run("select_and_merge", s.name, B, bench.impls(
        "select_and_merge", lambda b: ops.select_and_merge(scores, x, metric, s.k, s.C, backend=b), {},
    ), flops=flops, nbytes=nbytes + B * s.N * 4)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a CPU run finishes in < 1 minute)")
    parser.add_argument("--out", default=None, help="directory for the JSON result (default benchmarks/results)")
    parser.add_argument("--compile", choices=("first", "all", "none"), default="first",
                        help="compile(reference) rows: each op's first case only (default; every compile costs "
                             "seconds to a minute), every case, or none")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); 1 keeps a shared CPU's timings stable")
    args = parser.parse_args(argv)
    device, quick = args.device, args.quick
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    started = time.time()
    peaks = measure_peaks(device, dtype, quick)
    print(f"ceilings on {device}: matmul {peaks['matmul_flops'] / 1e12:.3g} TFLOP/s ({dtype}), "
          f"copy {peaks['copy_bytes_per_s'] / 1e9:.3g} GB/s")
    bench = Bench(device, dtype, peaks, args.compile)
    cpu_full = device == "cpu" and not quick  # the CPU path at real shapes: the small models only, batch 1
    batches = (1, 2) if quick else (1,) if cpu_full else (1, 8)
    attention_cases(bench, ATTN_QUICK if quick else ATTN_FULL[:2] if cpu_full else ATTN_FULL, batches)
    topk_cases(bench, TOPK_QUICK if quick else TOPK_FULL, batches)
    merge_cases(bench, MERGE_QUICK if quick else MERGE_FULL[:2] if cpu_full else MERGE_FULL, batches)
    print_table(bench.rows, ["op", "shape", "batch", "impl", "ms", "agrees", "speedup_vs_reference",
                             "speedup_vs_baseline", "tflops", "gbps", "x_floor", "status"])
    meta = dict(device_kind=device, dtype=str(dtype).replace("torch.", ""), quick=quick, peaks=peaks,
                cpu_threads=torch.get_num_threads(), compile_policy=args.compile,
                backends=bench.backends, note="triton (interpreter) times run Python on the CPU: not kernel times")
    path = write_results(f"visiondrop_ops_{device}", [dict(r, **meta) for r in bench.rows], out_dir=args.out)
    print(f"wrote {path} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
