"""Run the public ops at real-model shapes and report what they selected and how long each backend took.

Shapes: CLIP-L/336 encoder layer -2 (577 tokens = [CLS] + 24x24 patches, 16 heads x 64; the [CLS] row scores
the patches) and a LLaVA-1.5 LLM stage (650 tokens, 32 heads x 128, image span of 576 starting at 35).
Inputs are random (no weights are downloaded), so the selections show the mechanics, not image content.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from vtprune import ops
from vtprune._backend import BackendUnavailableError, resolve


def _time(fn, rep: int, device: torch.device) -> float:
    fn()  # warm-up (compilation, caches)
    times = []
    for _ in range(rep):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _backends(op: str, device: torch.device, requested: list[str]) -> list[str]:
    usable = []
    for name in requested:
        try:
            resolve(op, name, device)
        except BackendUnavailableError as e:
            print(f"  {op:<22} {name:<9} unavailable: {e}")
            continue
        usable.append(name)
    return usable


def _bench(op: str, call, device: torch.device, backends: list[str], rep: int) -> None:
    """Time ``call(backend)`` on every requested backend that can run ``op`` here."""
    for be in _backends(op, device, backends):
        print(f"  {op:<22} {be:<9} {_time(lambda: call(be), rep, device):8.2f} ms")  # noqa: B023 (called now)


def _grid(idx: torch.Tensor, side: int) -> str:
    """A coarse text map (side x side patches shown 4x4 to a cell) of which patches were kept."""
    keep = torch.zeros(side * side, dtype=torch.bool)
    keep[idx] = True
    cells = keep.view(side // 4, 4, side // 4, 4).any(3).any(1)
    return "\n".join("    " + "".join("#" if c else "." for c in row) for row in cells.tolist())


def run_shapes(device: torch.device, dtype: torch.dtype, backends: list[str], rep: int) -> None:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    # CLIP-L/336, layer -2: score the 576 patches from the [CLS] row, keep CLS + 53 patches, merge into 10.
    q, k, v = randn(1, 16, 577, 64), randn(1, 16, 577, 64), randn(1, 16, 577, 64)
    cls, patches = torch.tensor([[0, 1]]), torch.tensor([[1, 576]])
    x, metric = randn(1, 576, 1024), k.mean(1)[:, 1:]
    print(f"CLIP-L/336 layer -2: 577 tokens, 16 heads x 64, {dtype}, {device}")
    bench = lambda op, call: _bench(op, call, device, backends, rep)
    bench("attention_with_scores", lambda be: ops.attention_with_scores(
        q, k, v, query_spans=cls, key_spans=patches, causal=False, backend=be))
    _, scores = ops.attention_with_scores(q, k, v, query_spans=cls, key_spans=patches, causal=False)
    bench("select_and_merge", lambda be: ops.select_and_merge(scores, x, metric, 53, 10, backend=be))
    tokens, keep, targets = ops.select_and_merge(scores, x, metric, 53, 10)
    print(f"  kept {keep.shape[1]} of 576 patches, merged the rest into {targets.shape[1]} contextual "
          f"tokens at targets {targets[0].tolist()}; output {tuple(tokens.shape)}")
    print(_grid(keep[0].cpu(), 24))

    # LLaVA-1.5 LLM stage: image tokens 35..610 of 650 score each other (causal), keep 70 + merge into 10.
    L, span = 650, torch.tensor([[35, 576]])
    q, k = randn(1, 32, L, 128), randn(1, 32, L, 128)
    print(f"LLaVA-1.5 LLM stage: {L} tokens, 32 heads x 128, image span 35..610, {dtype}, {device}")
    bench("attention_scores", lambda be: ops.attention_scores(
        q, k, query_spans=span, key_spans=span, causal=True, backend=be))
    scores = ops.attention_scores(q, k, query_spans=span, key_spans=span, causal=True)
    bench("topk_keep_order", lambda be: ops.topk_keep_order(scores, 70, backend=be))
    keep = ops.topk_keep_order(scores, 70)
    print(f"  kept image tokens {keep[0, :8].tolist()} ... {keep[0, -4:].tolist()} (70 of 576)")
    print(_grid(keep[0].cpu(), 24))


HELP = "run the raw ops at real-model shapes: what they select, time per backend"


def add_arguments(p) -> None:
    from vtprune.cli._args import positive_int

    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--backends", default=None,
                   help="comma list of reference, triton, cuda; default: reference + triton/cuda on a GPU")
    p.add_argument("--rep", type=positive_int, default=5, help="timed calls per op and backend (median)")


def run(a) -> None:
    from vtprune._backend import BACKENDS
    from vtprune.cli._args import choices_list, torch_device

    device = torch_device("--device", a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    default = ["reference", "triton", "cuda"] if device.type == "cuda" else ["reference"]
    named = tuple(b for b in BACKENDS if b != "auto")
    backends = choices_list("--backends", a.backends, named) if a.backends is not None else default
    if device.type == "cpu" and "triton" in backends and interp:
        print("note: Triton runs through the CPU interpreter here: its times are not kernel speed")
    run_shapes(device, dtype, backends, a.rep)


def main(argv=None) -> None:
    from vtprune.cli import main as cli_main

    cli_main(["ops", *(sys.argv[1:] if argv is None else argv)])

if __name__ == "__main__":
    main()
