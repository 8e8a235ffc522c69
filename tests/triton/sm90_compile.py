"""Compile every Triton kernel for a GPU target without a GPU, as a launch would, and report its resources.

Run as a script (``python tests/triton/sm90_compile.py [arch]``) in a process where TRITON_INTERPRET is unset.
Each op's launcher runs on CPU tensors of the benchmark shapes while its launches are recorded, not run
(``benchmarks/_triton_sm90.py``); every recorded launch is compiled through Triton's NVIDIA backend with the
specialisation the JIT computes at launch (16-byte pointer alignment, integer divisibility, ints equal to 1
as constants) and the ptxas bundled with the triton wheel. Prints one JSON object per distinct build on
stdout: registers, spills (stack + local bytes), shared memory, tensor-core and async-copy instructions.
Lowering errors (a construct the GPU compiler rejects while the interpreter accepts it) and register
spills show up here on any machine.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from benchmarks._triton_sm90 import compile_launch  # noqa: E402
from benchmarks.kernel_report import SHAPES, ops_for, run_op  # noqa: E402

TL = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def jobs():
    """(shape name, batch, dtype, op): bf16 (the GPU dtype) at every benchmark shape and batch 1 and 8;
    fp16 and float32 at the LLaVA and CLIP shapes; head dim 256 (the largest the kernels take)."""
    shapes = dict(SHAPES, llava_d256=replace(SHAPES["llava"], d=256, H=16, Hkv=16))
    for name, s in shapes.items():
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            if dtype != torch.bfloat16 and name not in ("clip", "llava", "llava_d256"):
                continue
            for batch in (1, 8) if dtype == torch.bfloat16 and name in SHAPES else (1,):
                for op in ops_for(s):
                    yield name, s, batch, dtype, op


def long_row_topk():
    """Rows longer than one register tile take the streaming top-k kernel (no benchmark shape has them)."""
    from benchmarks._triton_sm90 import capture_launches
    from vtprune.triton_kernels.topk_keep_order import topk_keep_order_launch

    with capture_launches() as launches:
        topk_keep_order_launch(torch.rand(1, 16384), 1024, None)
    return launches


def main() -> None:
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    seen = set()
    work = [(name, s, batch, dtype, op) for name, s, batch, dtype, op in jobs()]
    work.append(("long_row", None, 1, torch.float32, "topk_keep_order"))
    for name, s, batch, dtype, op in work:
        launches = long_row_topk() if s is None else run_op(op, s, batch, dtype)[0]
        for launch in launches:
            b = compile_launch(launch, arch)
            key = (b.kernel, json.dumps(b.constexprs, sort_keys=True, default=str), TL[dtype], b.num_warps)
            if key in seen:
                continue
            seen.add(key)
            print(json.dumps(dict(kernel=b.kernel, op=op, shape=name, batch=batch, dtype=TL[dtype], arch=arch,
                                  regs=b.regs, spill_bytes=b.spill_bytes, smem_bytes=b.smem_bytes,
                                  tensor_cores=b.tensor_cores, async_copies=b.async_copies,
                                  num_warps=b.num_warps, config=b.constexprs), default=str), flush=True)


if __name__ == "__main__":
    main()
