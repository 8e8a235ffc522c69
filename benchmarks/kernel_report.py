"""Static performance report of the kernels on Hopper, without a GPU: every figure here is *predicted*.

For each op at the benchmark shapes (CLIP-L/336, LLaVA-1.5-7B, LLaVA-NeXT-7B, Qwen2.5-VL-7B; batch 1 and 8)
the op's Triton launcher runs on CPU tensors of the real shapes while the launches are recorded, not run
(``_triton_sm90.capture_launches``). Each recorded launch is compiled for sm_90 with the specialisation the
JIT applies at launch, and the cubin / SASS / PTX give registers, spills, shared memory, CTAs per SM,
tensor-core and async-copy instructions and the SASS instructions of the main loop body (the longest
backward-branch span, one inner-loop tile). ``_roofline`` turns the launch arguments into FLOPs, bytes,
exponentials and loop iterations and predicts a time at H100 peaks (stated in the output). PyTorch kernels
the launcher runs between Triton launches are counted by a dispatch mode and charged a fixed cost.

Records (``benchmarks/results/kernel_report.json``): one per kernel launch (``record="kernel"``: op, kernel,
backend, shape, batch, regs, spill_bytes, smem_bytes, ctas_per_sm, grid_ctas, tensor_cores, wgmma,
async_copies, loop_instructions, flops, bytes, predicted_us, bound) and one per op, shape and batch
(``record="op"``: op, shape, batch, predicted_us, allowed_us, target, meets; ``floor_us``, the least time any
design could take under the model, where a target may be out of reach, and a ``reason`` when the op misses
its target). CUDA records come from the
optional module ``benchmarks/_report_cuda.py`` (``cuda_records(shapes, batches)``); without it the report
says so and writes the Triton records.

Run: ``python benchmarks/kernel_report.py [--shapes clip llava] [--batches 1 8] [--out PATH]`` with
TRITON_INTERPRET unset (a few minutes on a CPU; the sm_90 compiles dominate).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _roofline as RL  # noqa: E402
from benchmarks._triton_sm90 import capture_launches, compile_launch  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kernel_report.json")


@dataclass(frozen=True)
class Shape:
    """One model's geometry at the point where the ops run (see bench_visiondrop_ops / bench_alvts_ops)."""

    L: int  # sequence length the attention ops see
    H: int
    Hkv: int
    d: int
    qspan: tuple[int, int]
    kspan: tuple[int, int]
    causal: bool
    N: int  # tokens entering select_and_merge
    D: int  # their width
    dk: int  # metric width
    keep: int
    contextual: int
    hidden: int = 0  # LLM width (0: no LLM stage, no lowrank / routed layer)
    mlp: int = 0
    rank: int = 256
    routed_keep: int = 64  # image tokens kept by the routed layer (text rows are routed too)


SHAPES = {
    "clip": Shape(577, 16, 16, 64, (0, 1), (1, 576), False, 576, 1024, 64, 47, 6),
    "llava": Shape(650, 32, 32, 128, (35, 576), (35, 576), True, 576, 4096, 128, 160, 32, 4096, 11008),
    "llava_next": Shape(2950, 32, 32, 128, (35, 2880), (35, 2880), True, 2880, 4096, 128, 288, 32, 4096, 11008),
    "qwen2_5_vl": Shape(4096, 28, 4, 128, (20, 3840), (20, 3840), True, 3840, 3584, 128, 384, 32, 3584, 18944),
}
NO_KERNEL = {"empty", "empty_strided", "view", "_unsafe_view", "as_strided", "expand", "t", "transpose", "permute",
             "select", "slice", "unsqueeze", "squeeze", "alias", "detach", "lift_fresh", "_to_copy", "to",
             "clone", "contiguous", "new_empty", "empty_like", "lift_fresh_copy", "copy_", "_local_scalar_dense",
             "item", "max", "unbind"}


class TorchOps(TorchDispatchMode):
    """Counts the PyTorch kernels a launcher runs (views, allocations and host copies of spans excluded)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in NO_KERNEL:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def spans(span, B):
    return torch.tensor([list(span)] * B, dtype=torch.int64)


def run_op(op: str, s: Shape, B: int, dtype: torch.dtype = torch.bfloat16):
    """Run ``op``'s Triton launcher at shape ``s`` (launches recorded, not run); (launches, torch ops)."""
    from vtprune.triton_kernels import _routed_kernels as RK
    from vtprune.triton_kernels.attention_scores import attention_scores_launch
    from vtprune.triton_kernels.attention_with_scores import attention_with_scores_launch
    from vtprune.triton_kernels.contextual_merge import contextual_merge_launch
    from vtprune.triton_kernels.lowrank_scores import lowrank_scores_launch
    from vtprune.triton_kernels.select_and_merge import select_and_merge_launch
    from vtprune.triton_kernels.topk_keep_order import topk_keep_order_launch

    e = torch.empty
    from vtprune.triton_kernels.attention_scores import arrival_counters

    arrival_counters(torch.device("cpu"), B)  # allocated once per device and stream: steady state excludes it
    scores = torch.rand(B, s.N)  # made outside the dispatch count: the op's inputs
    keep = torch.arange(s.keep).expand(B, s.keep).contiguous()
    with capture_launches() as launches, TorchOps() as mode:
        if op in ("attention_scores", "attention_with_scores"):
            q = e(B, s.H, s.L, s.d, dtype=dtype)
            k = e(B, s.Hkv, s.L, s.d, dtype=dtype)
            qs, ks = spans(s.qspan, B), spans(s.kspan, B)
            common = (qs, ks, s.causal, None, None, s.qspan[1], s.kspan[1])
            if op == "attention_scores":
                attention_scores_launch(q, k, *common)
            else:
                attention_with_scores_launch(q, k, e(B, s.Hkv, s.L, s.d, dtype=dtype), *common)
        elif op == "select_and_merge":
            select_and_merge_launch(scores, e(B, s.N, s.D, dtype=dtype), e(B, s.N, s.dk, dtype=dtype),
                                    s.keep, s.contextual, None)
        elif op == "contextual_merge":  # keep_idx given: the assignment launch binary-searches it
            contextual_merge_launch(e(B, s.N, s.D, dtype=dtype), e(B, s.N, s.dk, dtype=dtype), keep, s.contextual,
                                    None)
        elif op == "topk_keep_order":
            topk_keep_order_launch(scores, s.keep, None)
        elif op == "lowrank_scores":
            L = s.kspan[0] + s.kspan[1] + 39
            lowrank_scores_launch(e(B, L, s.hidden, dtype=dtype), e(s.hidden, s.rank, dtype=dtype),
                                  e(s.hidden, s.rank, dtype=dtype), spans(s.kspan, B), None, s.kspan[1])
        elif op == "routed_layer_rows":
            K = s.kspan[0] + s.routed_keep + 39
            L = s.kspan[0] + s.kspan[1] + 39
            x, w = e(B, L, s.hidden, dtype=dtype), e(s.hidden, dtype=dtype)
            idx = torch.arange(K).expand(B, K).contiguous()
            a = RK.gather_rmsnorm(x, idx, w, 1e-6)
            RK.gather_add_rmsnorm(x, idx, a, w, 1e-6)
            RK.add_scatter(x, idx, a, a)
        else:
            raise ValueError(f"unknown op {op!r}")
    return launches, mode.ops


def ops_for(s: Shape) -> list[str]:
    ops = ["attention_scores", "attention_with_scores", "select_and_merge", "contextual_merge", "topk_keep_order"]
    return ops + (["lowrank_scores", "routed_layer_rows"] if s.hidden else [])


# --- targets (issues #4/#5/#13): the time each target allows, from predicted baselines ------------------------
SDPA_TFLOPS = 330e12  # PyTorch SDPA's flash forward on H100 (FlashAttention-2 class), about a third of peak


def sdpa_us(s: Shape, B: int) -> float:
    flops = 4 * B * s.H * s.L * s.L * s.d * (0.5 if s.causal else 1.0)
    return RL.LAUNCH_US + flops / SDPA_TFLOPS * 1e6


def eager_scores_us(s: Shape, B: int) -> float:
    """Eager PyTorch scores: fp32 probabilities [B, H, L, L] written by the matmul, read and written by the
    softmax, read by the column sum (4 passes) plus ~6 small kernels."""
    return 6 * RL.TORCH_OP_US + 4 * B * s.H * s.L * s.L * 4 / RL.HBM * 1e6


def layer_us(s: Shape, B: int, tokens: int) -> float:
    """One decoder layer's prefill on ``tokens`` tokens at 60 % of the bf16 tensor peak."""
    flops = 2 * B * tokens * (4 * s.hidden * s.hidden + 3 * s.hidden * s.mlp) + 2 * B * tokens * tokens * s.hidden
    return flops / (0.6 * RL.PEAK["bf16"]) * 1e6


def target(op: str, shape: str, s: Shape, B: int) -> tuple[float | None, str]:
    if op == "attention_scores":
        if shape == "clip":
            return eager_scores_us(s, B) / 20, ">= 20x eager PyTorch scores"
        return 1.5 * sdpa_us(s, B), "<= 1.5x one SDPA forward"
    if op == "attention_with_scores":
        return 1.6 * sdpa_us(s, B), "<= 1.6x one SDPA forward"
    if op == "select_and_merge":
        words = ">= 50 % of HBM bandwidth (scores, metric, x read once, output written)"
        return select_bytes(s, B) / (0.5 * RL.HBM) * 1e6, words
    if op == "lowrank_scores":
        return 0.1 * layer_us(s, B, s.kspan[0] + s.kspan[1] + 39), "<= 10 % of one decoder layer"
    if op == "routed_layer_rows":
        K = s.kspan[0] + s.routed_keep + 39
        return 0.15 * layer_us(s, B, K), "routed layer <= 1.15x the plain layer on K tokens (row kernels' share)"
    return None, "none"


def select_bytes(s: Shape, B: int) -> int:
    """select_and_merge's unavoidable HBM bytes: scores, metric and x read once, the output written."""
    return B * (s.N * 4 + s.N * s.dk * 2 + s.N * s.D * 2 + (s.keep + s.contextual) * s.D * 2)


def floor(op: str, shape: str, s: Shape, B: int) -> tuple[float, str] | None:
    """The least time any kernel design could take under this model where a target may be out of reach:
    (predicted µs, why), or None. Launch cost and memory latency are the model's own (``_roofline``); raising
    the launch cost towards the 2-3 µs often quoted for H100 only raises these floors."""
    launch, lat = RL.LAUNCH_US, RL.MEM_LATENCY_US
    if op == "attention_scores" and shape == "clip":
        keys = B * s.Hkv * s.L * s.d * 2 / RL.HBM * 1e6
        one_cta = keys * RL.SMS / 2
        return launch + 2 * lat + max(lat, keys), (
            f"one launch ({launch} us) plus the 3 dependent memory round trips ({lat} us each; the first at least "
            f"the keys' {keys:.2f} us at full HBM bandwidth) that any split of the keys over CTAs needs (the "
            f"keys; the arrival atomic; the other CTAs' partials), since every "
            f"score needs each head's softmax over all keys; one CTA alone would stream the keys at its share "
            f"of HBM ({one_cta:.0f} us), two launches cost {2 * launch} us before any byte moves")
    if op == "select_and_merge":
        hbm = select_bytes(s, B) / RL.HBM * 1e6
        one, two = launch + hbm + 4 * lat, 2 * launch + hbm + 2 * lat
        return min(one, two), (
            f"two launches (this design) take at least {two:.1f} us: {2 * launch} us of launches, the bytes at "
            f"full HBM bandwidth ({hbm:.1f} us) and 2 round trips (the score row, then the targets' metric rows); "
            f"one launch (a hand-off design, not built) at least {one:.1f} us: {launch} us, the bytes, and 4 round "
            f"trips (scores, metric rows, a device-wide hand-off of the assignment: an atomic and its read); "
            f"without the hand-off every program repeats the row's selection and assignment (see "
            f"docs/performance.md)")
    return None


def torch_ops_us(ops: list[str]) -> float:
    return sum(RL.TORCH_SORT_US if o in ("sort", "searchsorted") else RL.TORCH_OP_US for o in ops)


def triton_records(shapes: list[str], batches: list[int], log=print) -> list[dict]:
    records = []
    for shape in shapes:
        s = SHAPES[shape]
        for B in batches:
            for op in ops_for(s):
                launches, torch_ops = run_op(op, s, B)
                total = torch_ops_us(torch_ops)
                for launch in launches:
                    build = compile_launch(launch)
                    cost = RL.launch_cost(launch, build)
                    total += cost["predicted_us"]
                    records.append(dict(
                        record="kernel", op=op, kernel=RL.kernel_key(launch.fn), backend="triton", shape=shape,
                        batch=B, regs=build.regs, spill_bytes=build.spill_bytes, smem_bytes=build.smem_bytes,
                        num_warps=build.num_warps,
                        ctas_per_sm=RL.ctas_per_sm(build.regs, build.smem_bytes, build.num_warps),
                        grid_ctas=launch.grid_ctas, sms=RL.SMS, tensor_cores=build.tensor_cores, wgmma=build.wgmma,
                        async_copies=build.async_copies, loop_instructions=build.loop_instructions,
                        config={k: v for k, v in build.constexprs.items() if k.isupper()},
                        flops=cost["flops"], bytes=cost["bytes"], exps=cost["exps"], iters_max=cost["iters_max"],
                        predicted_us=round(cost["predicted_us"], 2), bound=cost["bound"], terms_us=cost["terms_us"]))
                allowed, words = target(op, shape, s, B)
                extra = {}
                least = floor(op, shape, s, B)
                if least is not None:
                    extra["floor_us"] = round(least[0], 2)
                    if allowed is not None and total > allowed:
                        extra["reason"] = (f"out of reach under this model: {least[1]}" if least[0] > allowed
                                           else f"missed; the floor is below the allowed time: {least[1]}")
                records.append(dict(record="op", op=op, shape=shape, batch=B, backend="triton",
                                    predicted_us=round(total, 2), torch_ops=torch_ops,
                                    allowed_us=None if allowed is None else round(allowed, 2), target=words,
                                    meets=None if allowed is None else total <= allowed, **extra))
                log(f"{op:22s} {shape:11s} B={B}: predicted {total:8.1f} us, allowed "
                    f"{'-' if allowed is None else f'{allowed:8.1f}'} us ({len(launches)} launches, "
                    f"{len(torch_ops)} torch ops)")
    return records


def cuda_records(shapes, batches, log=print) -> list[dict]:
    try:
        module = importlib.import_module("benchmarks._report_cuda")
    except ModuleNotFoundError as err:
        log(f"NOTE: no CUDA records: benchmarks/_report_cuda.py is missing ({err}); Triton records only")
        return []
    return module.cuda_records(shapes, batches)


def table(records: list[dict]) -> str:
    """Markdown table of the op records (all *predicted*)."""
    lines = ["| op | shape | batch | backend | predicted µs | allowed µs | floor µs | target | meets |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("record") == "op":
            allowed = "-" if r["allowed_us"] is None else f"{r['allowed_us']:.1f}"
            least = f"{r['floor_us']:.1f}" if "floor_us" in r else "-"
            meets = "-" if r["meets"] is None else ("yes" if r["meets"] else "no")
            if r["meets"] is False and "floor_us" in r and r["floor_us"] > r["allowed_us"]:
                meets = "no (out of reach)"
            lines.append(f"| {r['op']} | {r['shape']} | {r['batch']} | {r.get('backend', 'triton')} | "
                         f"{r['predicted_us']:.1f} | {allowed} | {least} | {r['target']} | {meets} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    import triton

    print(f"predicted at {RL.PEAKS_TEXT}; triton {triton.__version__}, sm_90 compiles, no GPU")
    records = triton_records(args.shapes, args.batches)
    records += cuda_records(args.shapes, args.batches)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump([dict(r, predicted=True) for r in records], f, indent=1)
    print(table(records))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
