"""CPU checks of the CUDA extension's build: every op has a binding and a glue module, the launchers check
arguments before touching CUDA, and ptxas reports no local-memory spills for the kernels.

The resource checks compile csrc/ops/*.cu for sm_80 and sm_90a with ``--resource-usage`` through
benchmarks/_report_cuda.py (about 1-2 min of 2 cores the first time; cached under build/ by source content) and
read the SASS with cuobjdump; they need nvcc and pybind11-free sources only, so they run wherever nvcc is
found, GPU or not.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

from vtprune import ops

ROOT = Path(__file__).resolve().parents[1]
BUILD_REQUIRED = os.environ.get("VTPRUNE_BUILD_CUDA") == "1"
# Ops implemented in the glue by composing kernels of other bindings (topk_keep_order + contextual_merge), or
# by row kernels around the layer's own modules (routed_layer).
COMPOSED = {
    "select_and_merge": ("topk_keep_order", "contextual_merge"),
    "routed_layer": ("routed_gather_rmsnorm", "routed_gather_add_rmsnorm", "routed_add_scatter"),
}
# Known, measured exceptions: (kernel name prefix, largest spill in bytes). The fp32 flash kernel with a
# 64-wide head tile spills one 4-byte value with sm_90a's ptxas (13.0); 16-bit paths spill nothing.
SPILL_ALLOWED = {"void vtprune::attn::flash_forward_kernel<float, 64>": 8}


def _extension():
    try:
        return importlib.import_module("vtprune._C")
    except ImportError as e:
        if BUILD_REQUIRED:
            pytest.fail(f"VTPRUNE_BUILD_CUDA=1 but vtprune._C does not import ({e})")
        pytest.skip(f"vtprune._C is not built ({e})")


# routed_attention_mask is host-side mask construction with no kernel of its own.
WITHOUT_CUDA = {"routed_attention_mask"}


@pytest.mark.parametrize("op", [op for op in ops.__all__ if op not in WITHOUT_CUDA])
def test_every_op_has_a_binding_and_glue(op):
    extension = _extension()
    for name in COMPOSED.get(op, (op,)):
        assert callable(getattr(extension, name, None)), f"vtprune._C has no binding {name!r} (needed by {op})"
    module = importlib.import_module(f"vtprune.cuda.{op}")
    assert callable(getattr(module, op)), f"vtprune.cuda.{op} must define {op}()"


def test_launchers_check_arguments_before_cuda():
    extension = _extension()
    # Errors are RuntimeErrors naming the argument, raised before any CUDA call (no GPU here); an empty
    # batch returns without launching.
    with pytest.raises(RuntimeError, match="heads"):
        extension.attention_scores(0, 0, 0, 0, 0, 0, 0, 0, 1, 6, 4, 10, 64, 1, 1, 0.1, True, 0, 0)
    with pytest.raises(RuntimeError, match="max_queries"):
        extension.attention_scores(0, 0, 0, 0, 0, 0, 0, 0, 1, 8, 4, 10, 64, 11, 1, 0.1, True, 0, 0)
    assert extension.attention_scores(0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 4, 10, 64, 1, 1, 0.1, True, 0, 0) is None
    with pytest.raises(RuntimeError, match="value dim"):
        extension.attention_with_scores(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 8, 8, 10, 64, 300, 1, 0.1, True, 0, 0)
    with pytest.raises(RuntimeError, match=r"k \+ num_contextual"):
        extension.contextual_merge(0, 0, 0, 0, 0, 0, 0, 0, 1, 10, 8, 8, 6, 5, 0, 0, 0)
    assert extension.contextual_merge(0, 0, 0, 0, 0, 0, 0, 0, 0, 10, 8, 8, 6, 4, 0, 0, 0) is None
    with pytest.raises(RuntimeError, match="max_visual"):
        extension.lowrank_scores(0, 0, 0, 0, 0, 0, 0, 1, 10, 64, 11, 0)
    with pytest.raises(RuntimeError, match="routed <= length"):
        extension.routed_gather_rmsnorm(0, 0, 0, 0, 1, 10, 11, 64, 640, 64, 1e-6, 2, 0)
    with pytest.raises(RuntimeError, match="pointer is null"):
        extension.routed_add_scatter(0, 0, 0, 0, 1, 10, 5, 64, 640, 64, 2, 0)
    with pytest.raises(RuntimeError, match="dim 1048576 exceeds"):
        extension.routed_gather_add_rmsnorm(16, 16, 16, 16, 16, 1, 10, 5, 1 << 20, 1 << 20, 4096, 1e-6, 2, 0)
    assert extension.routed_add_scatter(0, 0, 0, 0, 0, 10, 5, 64, 640, 64, 2, 0) is None


def _report():
    """benchmarks/_report_cuda.py (compiles csrc/ops/*.cu with a content-keyed cache under build/)."""
    module = sys.modules.get("_report_cuda")
    if module is None:
        spec = importlib.util.spec_from_file_location("_report_cuda", ROOT / "benchmarks" / "_report_cuda.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["_report_cuda"] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
    if module.find_nvcc() is None:
        pytest.skip("nvcc not found: the resource-usage checks compile the kernels")
    return module


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_kernels_do_not_spill(arch):
    kernels = _report().kernel_table(arch, sass=False)
    for prefix in ("attn::row_lse_kernel", "attn::column_sum_kernel", "attn::single_query_logits_kernel",
                   "attn::flash_forward_kernel", "attn::row_pass_mma_kernel", "attn::column_sum_mma_kernel",
                   "merge::merge_assign_kernel", "merge::merge_output_kernel", "topk_keep_order_kernel",
                   "routed::routed_row_kernel"):
        assert any(prefix in name for name in kernels), f"no {prefix} in the {arch} resource report"
    spilling = {
        name: facts["spill_bytes"]
        for name, facts in kernels.items()
        if facts["spill_bytes"] > next((b for p, b in SPILL_ALLOWED.items() if name.startswith(p)), 0)
    }
    assert not spilling, f"kernels spill registers to local memory on {arch}: {spilling}"


# The tensor-core kernels (attention_mma.cuh, lowrank_project.cuh), every 16-bit type and head tile.
MMA_KERNELS = [f"vtprune::attn::{kernel}<{t}, {d}{extra}>" for t in ("__half", "__nv_bfloat16")
               for kernel, ds, extra in (("row_pass_mma_kernel", (64, 128, 256), ", false"),
                                         ("row_pass_mma_kernel", (64, 128), ", true"),
                                         ("column_sum_mma_kernel", (64, 128, 256), ""))
               for d in ds] + [f"vtprune::attn::lowrank_project_kernel<{t}>" for t in ("__half", "__nv_bfloat16")]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_tensor_core_kernels_keep_mma_and_async_copies(arch):
    """The 16-bit attention kernels and the lowrank projection must keep mma (HMMA) and cp.async (LDGSTS) in
    their SASS: a rewrite that falls back to scalar products or synchronous loads fails here, long before a GPU
    benchmark would show it."""
    report = _report()
    if report.find_cuobjdump() is None:
        pytest.skip("cuobjdump not found (CUDA toolkit, or the copy bundled with Triton)")
    kernels = report.kernel_table(arch)
    for prefix in MMA_KERNELS:
        name = next((n for n in kernels if prefix + "(" in n), None)
        assert name is not None, f"{prefix} is not compiled for {arch}"
        facts = kernels[name]
        assert facts["tensor_cores"], f"{name}: no HMMA/HGMMA in its {arch} SASS"
        assert facts["async_copies"], f"{name}: no LDGSTS (cp.async) in its {arch} SASS"
        assert facts["spill_bytes"] == 0, f"{name} spills {facts['spill_bytes']} bytes on {arch}"
    # The fp32 passes stay on the FMA units (bit-for-bit fp32 products): no tensor-core instruction.
    fp32 = [n for n in kernels if "row_lse_kernel<float" in n]
    assert fp32 and not any(kernels[n]["tensor_cores"] for n in fp32)
