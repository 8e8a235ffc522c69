"""Host overhead: microseconds of Python/C++ host work per public op call and per tiny-model decode step.

At batch 1 a GPU finishes a VisionDrop or ALVTS kernel in tens of microseconds, so the host work around each
launch (argument checks, backend dispatch, staging of spans, output allocation) decides whether the kernels
can win. This script measures that host work without a GPU:

* **ops** (``kind = "op"``; ``us_per_call`` = the fastest of 2000 calls, ``us_median`` their median, ``us_backend``
  = the fastest call of the backend function alone on the same checked arguments, so ``us_per_call - us_backend`` is
  the public op's own checks and dispatch): each public op on the Triton backend at the benchmark shapes of
  ``bench_visiondrop_ops.py`` / ``bench_alvts_ops.py`` (LLaVA-1.5 and CLIP-L/336, batch 1), spans and lengths as CPU
  tensors (as the README recommends). Data tensors are uninitialised CPU tensors; Triton kernel launches are
  replaced by a no-op (``TRITON_INTERPRET=1`` is set so the backend accepts CPU tensors), so what is timed is the
  host work around the kernels. The few torch ops an op runs besides its kernels act on small index tensors (a CPU
  op on them costs about what a CUDA launch costs the host). ``routed_layer`` runs with the layer's attention and
  MLP replaced by shape-only stand-ins. Not included: the pinned staging of CPU spans onto a GPU and device-side
  asserts (data and spans share the CPU here), and the CUDA driver's own launch cost (~2-5 us per kernel on a GPU).
* **model** (``kind = "decode"``): per decode step of the built-in tiny LLaVA-1.5 (``size="demo"``: 576 image
  tokens, 8 LLM layers, toy widths) on the CPU, unpatched vs patched, from ``generate`` with ``1 + T`` vs
  ``1`` new tokens (fastest of several runs each). On this model the step time is mostly host work, so the
  patched/unpatched ratio is the host overhead the patch adds per token.

Usage: ``python benchmarks/bench_host.py [--quick] [--out DIR]``; results go to
``benchmarks/results/host_cpu.json`` (``host_cpu_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend accepts non-CUDA tensors; launches are stubbed

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vtprune  # noqa: E402
from common import print_table, write_results  # noqa: E402
from vtprune import _backend, ops  # noqa: E402

DEV = torch.device("cpu")


@contextlib.contextmanager
def launches_stubbed():
    """Triton kernel launches do nothing (the JIT and interpreter launchers both)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    saved = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}
    try:
        for cls in saved:
            cls.run = lambda self, *a, **k: None
        yield
    finally:
        for cls, run in saved.items():
            cls.run = run


def us_per_call(fn, *, calls: int) -> tuple[float, float]:
    """(fastest, median) time of one call over ``calls`` timed calls, in microseconds.

    The fastest call is the figure to read on a shared machine: other processes only ever add time, and the
    host work of a call is deterministic.
    """
    for _ in range(max(3, calls // 10)):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e6, statistics.median(times) * 1e6


def spans(*pairs) -> torch.Tensor:
    return torch.tensor(pairs, dtype=torch.int64)  # CPU [B, 2]


def op_cases():
    """(name, shape label, op call, backend call) per public op at batch 1, Triton backend, CPU spans.

    The backend call is the function the op dispatches to (``vtprune.triton_kernels.<op>.<op>``) on the same,
    already checked arguments: the op's own share of the host time (checks, dispatch) is the difference.
    """
    t = "triton"
    cases = []

    def case(name, shape, op, tensor, *args, **kwargs):
        backend_fn = _backend.implementation(name, t, tensor)
        cases.append((name, shape, lambda: getattr(ops, name)(*args, backend=t, **kwargs),
                      lambda: backend_fn(*args, **kwargs)))

    # LLaVA-1.5 LLM stage: L = 650, 32 heads of 128, image span (35, 576); CLIP-L/336 layer -2: [CLS] row
    q = torch.empty(1, 32, 650, 128, dtype=torch.float16, device=DEV)
    img = spans((35, 576))
    case("attention_scores", "llava-1.5 L=650 H=32 d=128", ops.attention_scores, q, q, q, query_spans=img,
         key_spans=img, causal=True)
    qc = torch.empty(1, 16, 577, 64, dtype=torch.float16, device=DEV)
    cls, patches = spans((0, 1)), spans((1, 576))
    case("attention_with_scores", "clip-l336 L=577 H=16 d=64", ops.attention_with_scores, qc, qc, qc, qc,
         query_spans=cls, key_spans=patches, causal=False)
    scores = torch.empty(1, 576, dtype=torch.float32, device=DEV)
    case("topk_keep_order", "N=576 k=160", ops.topk_keep_order, scores, scores, 160)
    x = torch.empty(1, 576, 4096, dtype=torch.float16, device=DEV)
    metric = torch.empty(1, 576, 128, dtype=torch.float16, device=DEV)
    keep = torch.arange(0, 480, 3, device=DEV)[None]  # [1, 160] ascending
    lengths = torch.tensor([576])
    case("contextual_merge", "N=576 D=4096 k=160 C=32", ops.contextual_merge, x, x, metric, keep, 32,
         lengths=lengths)
    case("select_and_merge", "N=576 D=4096 k=160 C=32", ops.select_and_merge, x, scores, x, metric, 160, 32,
         lengths=lengths)
    h = torch.empty(1, 650, 4096, dtype=torch.float16, device=DEV)
    u = torch.empty(4096, 256, dtype=torch.float16, device=DEV)
    case("lowrank_scores", "L=650 D=4096 R=256", ops.lowrank_scores, h, h, u, u, visual_spans=img)
    layer, hs, idx, pe = routed_layer_case()
    case("routed_layer", "L=650 D=4096 K=99 (attention, MLP stubbed)", ops.routed_layer, hs, layer, hs, idx,
         position_embeddings=pe)
    return cases


def routed_layer_case():
    """A LLaMA-7B-shaped decoder layer on meta whose attention and MLP only size their outputs."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):  # no weights are needed: the stand-ins below never read them
        layer = LlamaDecoderLayer(config, 0).to(torch.float16)
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        norm.weight = torch.nn.Parameter(torch.ones(4096, dtype=torch.float16), requires_grad=False)
    layer.self_attn.forward = lambda hidden_states, **kw: (torch.empty_like(hidden_states), None)
    layer.mlp.forward = lambda x: torch.empty_like(x)
    hs = torch.empty(1, 650, 4096, dtype=torch.float16, device=DEV)
    idx = torch.arange(0, 99 * 6, 6, device=DEV)[None]  # [1, 99]: 35 text + 64 routed image tokens
    cos = torch.empty(1, 650, 128, dtype=torch.float16, device=DEV)
    return layer, hs, idx, (cos, cos)


def decode_rows(quick: bool, repeats: int) -> list[dict]:
    """Per-token decode time of the tiny LLaVA-1.5, unpatched and patched (CPU tensors, reference backend)."""
    from vtprune.models._tiny import tiny_inputs, tiny_llava

    model = tiny_llava("test" if quick else "demo")
    inputs = tiny_inputs(model)
    steps = 4 if quick else 16
    methods = [("unpatched", None), ("visiondrop", vtprune.VisionDrop(tokens=64 if not quick else 16)),
               ("alvts", vtprune.ALVTS(keep=64 if not quick else 16))]
    rows = []
    for name, method in methods:
        ctx = vtprune.apply(model, method) if method is not None else contextlib.nullcontext()

        def gen(t):
            return model.generate(**inputs, max_new_tokens=t, min_new_tokens=t, do_sample=False)

        with torch.no_grad(), ctx:
            gen(1 + steps)  # warm-up
            one = min(_timed(lambda: gen(1)) for _ in range(repeats))  # fastest: others' load only adds time
            more = min(_timed(lambda: gen(1 + steps)) for _ in range(repeats))
        rows.append({"kind": "decode", "name": name, "shape": f"tiny llava ({'test' if quick else 'demo'})",
                     "us_per_call": (more - one) / steps * 1e6})
    base = rows[0]["us_per_call"]  # the unpatched model
    for r in rows:
        r["ratio_to_unpatched"] = r["us_per_call"] / base
    return rows


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few repeats and the small tiny model (smoke test)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--no-model", action="store_true", help="ops only")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # host overhead is single-threaded; keeps the figure stable on a shared machine
    calls = 50 if args.quick else 2000
    # calibration: how fast this machine runs the cheapest torch call now (shared machines inflate everything)
    rows = [{"kind": "calibration", "name": "torch.empty(1)", "shape": "-",
             "us_per_call": us_per_call(lambda: torch.empty(1), calls=calls)[0]}]
    with launches_stubbed(), torch.no_grad():
        for name, shape, fn, backend_fn in op_cases():
            row = {"kind": "op", "name": name, "shape": shape, "us_per_call": None}
            try:
                row["us_per_call"], row["us_median"] = us_per_call(fn, calls=calls)
                row["us_backend"] = us_per_call(backend_fn, calls=calls)[0]
            except Exception as e:  # e.g. an op that reads a device tensor on the host (meta has no values)
                row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
    if not args.no_model:
        rows += decode_rows(args.quick, 3 if args.quick else 7)
    print_table(rows, ["kind", "name", "shape", "us_per_call", "us_median", "us_backend", "ratio_to_unpatched",
                       "error"])
    for r in rows:
        r["load_average_1min"] = os.getloadavg()[0]  # other processes on the machine inflate the medians
    path = write_results("host_cpu_quick" if args.quick else "host_cpu", rows, out_dir=args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
