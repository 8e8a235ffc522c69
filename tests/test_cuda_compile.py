"""CPU checks of the CUDA extension's build: every op has a binding and a glue module, the launchers check
arguments before touching CUDA, and ptxas reports no local-memory spills for the kernels.

The resource check compiles csrc/ops/*.cu for sm_90a with ``--resource-usage`` (about 10-20 s on 2 cores);
it needs nvcc and pybind11-free sources only, so it runs wherever nvcc is found, GPU or not.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
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


def _nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None
    )


def _resource_report(nvcc: str, source: Path) -> str:
    cmd = [nvcc, "-std=c++17", "-O3", "--resource-usage", "-gencode=arch=compute_90a,code=sm_90a",
           f"-I{ROOT / 'csrc' / 'include'}", "-c", str(source), "-o", os.devnull]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return out[: len(names)]


def test_kernels_do_not_spill():
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the resource-usage check compiles the kernels")
    sources = sorted((ROOT / "csrc" / "ops").glob("*.cu"))
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        reports = list(pool.map(lambda s: _resource_report(nvcc, s), sources))
    entries = []  # (mangled name, spill bytes)
    for report in reports:
        current = None
        for line in report.splitlines():
            found = re.search(r"Compiling entry function '(\S+)'", line)
            if found:
                current = found.group(1)
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if spill and current:
                entries.append((current, max(int(spill.group(1)), int(spill.group(2)))))
                current = None
    names = _demangle([name for name, _ in entries])
    kernels = {name: spill for name, (_, spill) in zip(names, entries, strict=True)}
    for prefix in ("attn::row_lse_kernel", "attn::column_sum_kernel", "attn::single_query_kernel",
                   "attn::flash_forward_kernel", "merge::merge_assign_kernel", "merge::merge_output_kernel",
                   "topk_keep_order_kernel", "routed::routed_row_kernel"):
        assert any(prefix in name for name in kernels), f"no {prefix} in the resource report"
    spilling = {
        name: spill
        for name, spill in kernels.items()
        if spill > next((b for p, b in SPILL_ALLOWED.items() if name.startswith(p)), 0)
    }
    assert not spilling, f"kernels spill registers to local memory: {spilling}"
