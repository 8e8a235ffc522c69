"""Compile the Triton kernels for a GPU target without a GPU and report each kernel's resources.

Run as a script (``python tests/triton/sm90_compile.py [arch]``) in a process where TRITON_INTERPRET is unset:
the kernels are compiled through Triton's NVIDIA backend and the ptxas bundled with the triton wheel, with the
launch configurations the launchers use at the benchmark shapes, and ``cuobjdump`` reads back registers,
stack (spills) and shared memory. Prints one JSON object per kernel on stdout. Lowering errors (a construct
the GPU compiler rejects while the interpreter accepts it) and register spills show up here on any machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vtprune.triton_kernels import attention_scores as A  # noqa: E402
from vtprune.triton_kernels import attention_with_scores as W  # noqa: E402
from vtprune.triton_kernels import contextual_merge as M  # noqa: E402
from vtprune.triton_kernels import topk_keep_order as T  # noqa: E402

TL = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
LAUNCH = ("num_warps", "num_stages")


def compile_one(fn, arg_types: dict, constexprs: dict, arch: int) -> dict:
    """Compile ``fn``; arguments not in ``constexprs`` take their type from ``arg_types`` (default i32)."""
    names = [p.name for p in fn.params]
    consts = {k: v for k, v in constexprs.items() if k not in LAUNCH}
    signature = {n: "constexpr" if n in consts else arg_types.get(n, "i32") for n in names}
    src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in consts.items()})
    options = {k: constexprs[k] for k in LAUNCH if k in constexprs}
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    return dict(kernel=fn.__name__, regs=int(fields["REG"]), stack=int(fields["STACK"]),
                local=int(fields["LOCAL"]), dynamic_smem=kernel.metadata.shared,
                config={k: v for k, v in constexprs.items()})


def attention_jobs(dtype):
    t = TL[dtype]
    ptrs = dict(q_ptr=f"*{t}", k_ptr=f"*{t}", v_ptr=f"*{t}", out_ptr=f"*{t}", kpm_ptr="*u8", qspan_ptr="*i64",
                kspan_ptr="*i64", lse_ptr="*fp32", part_ptr="*fp32", qk_scale="fp32", inv_heads="fp32")
    flags = dict(CAUSAL=True, HAS_KPM=True, IEEE=dtype == torch.float32, UPCAST=False)
    # (rows, d, G): LLaVA-1.5 span, Qwen2.5-VL GQA 28/4 (image span; last token), CLIP [CLS] row, d = 256
    for rows, d, G in ((576, 128, 1), (7 * 3840, 128, 7), (7, 128, 7), (1, 64, 1), (576, 256, 1)):
        cfg = dict(A.tile_config(rows, d, dtype), G=G, **flags)
        yield A._row_lse_kernel, ptrs, cfg
        yield A.column_scores_kernel, ptrs, dict(cfg, LSE_ABSOLUTE=False)
    for L, d, G in ((650, 128, 1), (4096, 128, 7), (577, 64, 1), (300, 256, 1)):
        yield W._attention_fwd_kernel, ptrs, dict(W.forward_config(G * L, d, d, dtype), G=G, **flags)


def merge_jobs(dtype):
    t = TL[dtype]
    ptrs = dict(metric_ptr=f"*{t}", x_ptr=f"*{t}", out_ptr=f"*{t}", keep_ptr="*i64", lengths_ptr="*i64",
                assign_ptr="*i32", target_ptr="*i64", order_ptr="*i64", offsets_ptr="*i64", eps="fp32")
    for dk in (64, 128):
        yield M._assign_kernel, ptrs, dict(M.assign_config(dk), HAS_LENGTHS=True, KEEP_ITERS=9)
    yield M._pack_kernel, ptrs, dict(M.pack_config(4096), ROUND_BY_HAND=False)
    for N in (576, 4096, 16384):
        yield T._topk_kernel, dict(scores_ptr=f"*{t}", lengths_ptr="*i64", out_ptr="*i64"), \
            dict(T.topk_config(N), HAS_LENGTHS=True)


def main() -> None:
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for fn, types, cfg in (*attention_jobs(dtype), *merge_jobs(dtype)):
            print(json.dumps(dict(compile_one(fn, types, cfg, arch), dtype=TL[dtype], arch=arch)), flush=True)


if __name__ == "__main__":
    main()
