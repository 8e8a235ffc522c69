"""Every Triton kernel compiles for sm_90 at the launches the ops really make, without register spills.

The interpreter accepts constructs the GPU compiler rejects, and says nothing about registers: this compiles
each recorded launch with Triton's NVIDIA backend and the ptxas shipped in the triton wheel (no GPU needed),
in a subprocess where TRITON_INTERPRET is unset (see sm90_compile.py), with the specialisation the JIT
applies at launch. A second test checks that specialisation against the launch's own arguments.
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton.language", reason="Triton is not installed (pip install 'vtprune[triton]')")

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
SCRIPT = os.path.join(HERE, "sm90_compile.py")
PTXAS = os.path.join(os.path.dirname(os.path.dirname(triton.__file__)), "backends", "nvidia", "bin", "ptxas")
SMEM_LIMIT = 227 * 1024  # sm_90's largest shared-memory allocation per block
EVERY_KERNEL = {"_row_lse_kernel", "column_scores_kernel", "few_rows_scores_kernel", "few_rows_lse_scores_kernel",
                "_attention_fwd_kernel",
                "_assign_kernel", "_merge_rows_kernel", "_topk_kernel", "_topk_tiles_kernel", "_project_kernel",
                "_visual_columns_kernel", "_finish_kernel", "gather_rmsnorm_kernel", "gather_add_rmsnorm_kernel",
                "add_scatter_kernel"}
needs_ptxas = pytest.mark.skipif(not os.path.exists(PTXAS), reason=f"this triton install has no NVIDIA ptxas ({PTXAS})")


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@needs_ptxas
def test_every_kernel_compiles_for_sm90_without_spills():
    run = subprocess.run([sys.executable, SCRIPT, "90"], capture_output=True, text=True, env=_env(), timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert {r["kernel"] for r in rows} == EVERY_KERNEL
    bad = [r for r in rows if r["spill_bytes"] or r["smem_bytes"] > SMEM_LIMIT]
    assert not bad, "spills or too much shared memory:\n" + "\n".join(map(json.dumps, bad))
    # the hot attention kernels at bf16 must reach the tensor cores and pipeline their loads
    hot = [r for r in rows if r["kernel"] in ("_attention_fwd_kernel",) and r["dtype"] == "bf16"]
    assert hot and all(r["tensor_cores"] and r["async_copies"] for r in hot), hot


CHECK_SPECIALISATION = r"""
import sys, torch
sys.path.insert(0, ROOT)
from benchmarks._triton_sm90 import capture_launches, specialisation
from vtprune.triton_kernels.attention_scores import attention_scores_launch

B, H, L, d = 1, 1, 40, 32
q = torch.empty(B, H, L, d, dtype=torch.bfloat16)
k = torch.empty(B * H * L * d + 1, dtype=torch.bfloat16)[1:].view(B, H, L, d)  # 2 bytes off: no pointer hint
spans = torch.tensor([[0, 32]])
with capture_launches() as launches:
    attention_scores_launch(q, k, spans, spans, True, None, None, 32, 32)
launch = launches[0]
names = [p.name for p in launch.fn.params]
_, signature, constexprs, attrs, _ = specialisation(launch)
hinted = {names[i[0]] for i, a in attrs.items() if ["tt.divisibility", 16] in a}
const = {names[i[0]]: v for i, v in constexprs.items() if not launch.fn.params[i[0]].is_constexpr}
assert "q_ptr" in hinted and "k_ptr" not in hinted, hinted  # 16-byte aligned data pointer vs misaligned
assert {"sqb", "sqh", "sql", "D"} <= hinted, hinted  # 1280, 1280, 32, 32: multiples of 16
assert "L" not in hinted and signature["L"] == "i32", hinted  # 40 is not a multiple of 16
assert const == {"kpm_ptr": None, "HKV": 1}, const  # None and an int equal to 1 are compiled in as constants
"""


@needs_ptxas
def test_compile_uses_the_launch_specialisation():
    """Aligned pointers and multiples of 16 get the divisibility hint, misaligned ones do not, and an int
    argument equal to 1 becomes a constant, exactly as JITFunction.run would specialise the launch."""
    code = CHECK_SPECIALISATION.replace("ROOT", repr(ROOT))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
