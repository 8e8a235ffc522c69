"""Static report of the CUDA kernels (csrc/) at the benchmark shapes: no GPU needed.

Every ``csrc/ops/*.cu`` is compiled for sm_90a with ``nvcc --resource-usage`` (registers, spills, static
shared memory per kernel) and disassembled with ``cuobjdump -sass`` (tensor-core and async-copy instructions,
instruction count). For each op, shape and batch, the kernels its launcher really runs are listed with the
launcher's grid and dynamic shared memory at that shape and an analytic roofline time at H100 SXM peaks,
labelled ``predicted_us``: nothing here is measured.

``cuda_records(shapes, batches)`` is imported by benchmarks/kernel_report.py; ``python
benchmarks/_report_cuda.py`` prints the records as JSON lines. Compiles are cached under
``build/kernel_report_cuda/<hash of csrc and nvcc>`` (~30 s on 2 cores the first time, instant after).

The roofline per kernel: ``max(tensor or FMA time, DRAM time, exp2 time) * max(1, 132 / CTAs)`` (a grid
smaller than the SM count leaves SMs idle) plus a fixed launch cost. Tensor-core rate = dense bf16 peak x
0.6 for ``mma.sync`` (no wgmma), FMA rate = fp32 peak; pair counts follow the kernels' 64 x 64 tiling
(causal skip, tile padding), bytes count each input read from DRAM once (re-reads hit L2).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCH = "sm_90a"
CACHE = ROOT / "build" / "kernel_report_cuda"

# H100 SXM peaks (datasheet, dense): what the predictions assume.
SMS = 132
TENSOR_FLOPS = 989e12 * 0.6  # mma.sync reaches ~60% of the wgmma peak on Hopper
FMA_FLOPS = 67e12
HBM_BYTES = 3.35e12
EXP2_PER_S = SMS * 16 * 1.83e9  # 16 MUFU ex2 per SM per clock
LAUNCH_US = 2.0  # launch + tail of a small kernel on a busy stream
TILE = 64  # kBM = kBN of the attention kernels
FINALIZE_THREADS = 256


@dataclass(frozen=True)
class Shape:
    """An attention call of the benchmark shapes (benchmarks/bench_visiondrop_ops.py) and the merge after it."""

    L: int
    H: int
    Hkv: int
    d: int
    qspan: tuple[int, int]  # (start, count)
    kspan: tuple[int, int]
    causal: bool
    D: int  # hidden size of the tokens merged
    dk: int  # metric dim
    keep: int  # dominant tokens
    contextual: int
    rank: int  # ALVTS low-rank R (LLM shapes)


SHAPES = {
    "clip": Shape(577, 16, 16, 64, (0, 1), (1, 576), False, 1024, 64, 47, 6, 0),
    "llava": Shape(650, 32, 32, 128, (35, 576), (35, 576), True, 4096, 128, 160, 32, 256),
    "llava_next": Shape(2950, 32, 32, 128, (35, 2880), (35, 2880), True, 4096, 128, 288, 32, 256),
    "qwen2_5_vl": Shape(4096, 28, 4, 128, (20, 3840), (20, 3840), True, 3584, 128, 384, 32, 256),
}


# ---------------------------------------------------------------- tools and compiles


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    return found or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)


def find_cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, else the copy bundled with Triton's NVIDIA backend."""
    found = shutil.which("cuobjdump")
    nvcc = find_nvcc()
    if found is None and nvcc:
        candidate = Path(nvcc).resolve().parent / "cuobjdump"
        found = str(candidate) if candidate.is_file() else None
    if found is None:
        spec = importlib.util.find_spec("triton")
        if spec and spec.origin:
            candidate = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
            found = str(candidate) if candidate.is_file() else None
    return found


def _sources() -> list[Path]:
    return sorted((ROOT / "csrc" / "ops").glob("*.cu"))


def _cache_dir(nvcc: str) -> Path:
    h = hashlib.sha256(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode())
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    return CACHE / h.hexdigest()[:16]


def compile_for_report(arch: str = ARCH, sass: bool = True) -> dict[str, tuple[str, str]]:
    """{source stem: (ptxas resource report, SASS text or "" without ``sass``)} of every csrc/ops/*.cu for
    ``arch`` ("sm_80", "sm_90a"), cached by content."""
    nvcc, cuobjdump = find_nvcc(), find_cuobjdump() if sass else None
    if nvcc is None or (sass and cuobjdump is None):
        raise RuntimeError(f"the CUDA report needs nvcc and cuobjdump (found nvcc={nvcc}, cuobjdump={cuobjdump})")
    out = _cache_dir(nvcc) / arch
    out.mkdir(parents=True, exist_ok=True)
    virtual = arch.replace("sm_", "compute_")

    def one(src: Path) -> tuple[str, tuple[str, str]]:
        obj, res, dis = (out / f"{src.stem}{ext}" for ext in (".o", ".res.txt", ".sass.txt"))
        if not (res.is_file() and obj.is_file()):
            cmd = [nvcc, "-std=c++17", "-O3", "--resource-usage", f"-gencode=arch={virtual},code={arch}",
                   f"-I{ROOT / 'csrc' / 'include'}", "-c", str(src), "-o", str(obj)]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src.name}:\n{r.stderr[-4000:]}")
            res.write_text(r.stdout + r.stderr)
        if sass and not dis.is_file():
            d = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, timeout=300)
            if d.returncode != 0:
                raise RuntimeError(f"cuobjdump failed on {obj.name}:\n{d.stderr[-2000:]}")
            dis.write_text(d.stdout)
        return src.stem, (res.read_text(), dis.read_text() if sass else "")

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        return dict(pool.map(one, _sources()))


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return out[: len(names)]


def parse_resources(report: str) -> dict[str, dict]:
    """{mangled kernel: {regs, spill_bytes, static_smem}} from ``ptxas --resource-usage`` output."""
    kernels: dict[str, dict] = {}
    current = None
    for line in report.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            current = m.group(1)
            kernels[current] = {"regs": 0, "spill_bytes": 0, "static_smem": 0}
        elif current and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            kernels[current]["spill_bytes"] = max(int(m.group(1)), int(m.group(2)))
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            kernels[current]["regs"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                kernels[current]["static_smem"] = int(s.group(1))
    return kernels


def parse_sass(sass: str) -> dict[str, dict]:
    """{mangled kernel: {tensor_cores, async_copies, instructions}} from ``cuobjdump -sass``."""
    kernels: dict[str, dict] = {}
    current = None
    for line in sass.splitlines():
        if m := re.search(r"Function : (\S+)", line):
            current = kernels.setdefault(m.group(1), {"tensor_cores": False, "async_copies": False,
                                                      "instructions": 0})
        elif current is not None and (m := re.search(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)):
            op = m.group(2)
            current["instructions"] += 1
            current["tensor_cores"] |= op.startswith(("HMMA", "HGMMA"))
            current["async_copies"] |= op.startswith(("LDGSTS", "UTMALDG"))
    return kernels


def kernel_table(arch: str = ARCH, sass: bool = True) -> dict[str, dict]:
    """{demangled kernel signature: resources and (with ``sass``) SASS facts}, over every translation unit."""
    table: dict[str, dict] = {}
    for res, sass_text in compile_for_report(arch, sass).values():
        resources, facts = parse_resources(res), parse_sass(sass_text)
        names = list(resources)
        for name, pretty in zip(names, demangle(names), strict=True):
            table[pretty] = {**resources[name], **facts.get(name, {})}
    return table


# ---------------------------------------------------------------- the launchers' choices at a shape


def tiles(n: int, t: int = TILE) -> int:
    return -(-n // t)


def head_tile(d: int) -> int:
    return 64 if d <= 64 else 128 if d <= 128 else 256


def ld(kd: int, elem: int) -> int:
    return kd + (8 if elem == 2 else 1)


def row_pairs(s: Shape, qstart: int, qcount: int, causal: bool) -> int:
    """(row, key) products a row pass computes: 64-row query tiles times the key tiles each visits."""
    total = 0
    for t in range(tiles(qcount)):
        rows = min(TILE, qcount - TILE * t)
        key_end = qstart + TILE * t + rows if causal else s.L
        total += TILE * tiles(key_end) * TILE
    return total


def column_pairs(s: Shape, qspan, kspan, causal: bool) -> int:
    """Products of the column pass: per 64-key tile, the query tiles from the first one that sees it."""
    (qs, qc), (ks, kc) = qspan, kspan
    total = 0
    for t in range(tiles(kc)):
        begin = max(0, ks + TILE * t - qs) // TILE * TILE if causal else 0
        if qc > begin:
            total += TILE * tiles(qc - begin) * TILE
    return total


def predict_us(flops: float, bytes_: float, exps: float, ctas: int, tensor: bool) -> float:
    rate = TENSOR_FLOPS if tensor else FMA_FLOPS
    busy = max(flops / rate, bytes_ / HBM_BYTES, exps / EXP2_PER_S) * 1e6
    return round(busy * max(1.0, SMS / max(ctas, 1)) + LAUNCH_US, 2)


def _bf16(kd: int) -> str:
    return f"__nv_bfloat16, {kd}"


def launches(op: str, s: Shape, B: int) -> list[dict]:
    """The kernels ``op``'s launcher runs for bf16 inputs at shape ``s``, batch ``B``: name (a prefix of the
    demangled signature), grid CTAs, dynamic smem bytes and the roofline inputs."""
    (qs, qc), (_, kc) = s.qspan, s.kspan
    kd = head_tile(s.d)
    tile_b = TILE * ld(kd, 2) * 2  # one 16-bit [64][kD + 8] tile
    fin = dict(kernel="vtprune::attn::finalize_kernel<0>", ctas=tiles(kc, FINALIZE_THREADS) * B, smem=0,
               flops=0, bytes=B * (s.H + 1) * kc * 4, exps=0)
    col = dict(kernel=f"vtprune::attn::column_sum_mma_kernel<{_bf16(kd)}>", ctas=tiles(kc) * s.H * B,
               smem=3 * tile_b, flops=2 * s.d * column_pairs(s, s.qspan, s.kspan, s.causal) * s.H * B,
               bytes=B * (s.H * qc * s.d * 2 + s.Hkv * kc * s.d * 2 + s.H * (qc + kc) * 4),
               exps=column_pairs(s, s.qspan, s.kspan, s.causal) * s.H * B)
    if op == "attention_scores":
        if qc == 1:  # the [CLS] row: a thread per key, then the heads' lse and the scores
            logits = dict(kernel=f"vtprune::attn::single_query_logits_kernel<{_bf16(kd)}>",
                          ctas=tiles(s.L) * s.H * B, smem=0, flops=2 * s.d * s.L * s.H * B,
                          bytes=B * (s.Hkv * s.L * s.d * 2 + s.H * kc * 4), exps=s.L * s.H * B)
            finish = dict(kernel="vtprune::attn::single_query_finish_kernel<256>",
                          ctas=tiles(kc, FINALIZE_THREADS) * B, smem=s.H * 4, flops=0,
                          bytes=B * (s.H * kc * 4 + kc * 4), exps=s.H * kc * B)
            return [logits, finish]
        pairs = row_pairs(s, qs, qc, s.causal) * s.H * B
        row = dict(kernel=f"vtprune::attn::row_pass_mma_kernel<{_bf16(kd)}, false>", ctas=tiles(qc) * s.H * B,
                   smem=3 * tile_b + 2 * TILE, flops=2 * s.d * pairs,
                   bytes=B * (s.H * qc * s.d * 2 + s.Hkv * s.L * s.d * 2 + s.H * qc * 4), exps=pairs)
        return [row, col, fin]
    if op == "attention_with_scores":
        pairs = row_pairs(s, 0, s.L, s.causal) * s.H * B
        fwd = dict(kernel=f"vtprune::attn::row_pass_mma_kernel<{_bf16(kd)}, true>", ctas=tiles(s.L) * s.H * B,
                   smem=5 * tile_b + 2 * TILE, flops=4 * s.d * pairs,
                   bytes=B * (2 * s.H * s.L * s.d * 2 + 2 * s.Hkv * s.L * s.d * 2 + s.H * s.L * 4), exps=pairs)
        return [fwd, col, fin]
    if op == "topk_keep_order":
        n = kc
        return [dict(kernel="vtprune::topk_keep_order_kernel", ctas=B, smem=0, flops=0,
                     bytes=B * (n * 4 * 4 + s.keep * 8), exps=0)]  # 4 radix passes over the row
    if op == "contextual_merge":
        n, C, k = kc, s.contextual, s.keep
        out_chunk = 128 * 8  # kOutThreads x 16-byte vector of bf16
        return [
            dict(kernel="vtprune::merge::merge_targets_kernel<__nv_bfloat16>", ctas=tiles(C, 8) * B, smem=0,
                 flops=0, bytes=B * C * s.dk * 2, exps=0),
            dict(kernel="vtprune::merge::merge_assign_kernel<__nv_bfloat16>", ctas=tiles(n, 8) * B, smem=0,
                 flops=2 * n * C * s.dk * B, bytes=B * n * s.dk * 2, exps=0),
            dict(kernel="vtprune::merge::merge_output_kernel<__nv_bfloat16, 8>",
                 ctas=(k + C) * B * tiles(s.D, out_chunk), smem=0, flops=n * s.D * B,
                 bytes=B * (n + k + C) * s.D * 2, exps=0),
        ]
    if op == "lowrank_scores":
        if not s.rank:
            return []
        R, L = s.rank, s.L
        kr = head_tile(R)
        tile_f = TILE * ld(kr, 4) * 4
        rows = row_pairs(s, 0, L, True) * B
        cols = column_pairs(s, (0, L), s.kspan, True) * B
        return [
            dict(kernel="vtprune::attn::lowrank_project_kernel<__nv_bfloat16>",
                 ctas=tiles(B * L) * tiles(2 * R), smem=2 * 2 * TILE * ld(TILE, 2) * 2,
                 flops=2 * B * L * s.D * 2 * R, bytes=B * L * s.D * 2 + 2 * s.D * R * 2 + B * L * 2 * R * 4,
                 exps=0),
            dict(kernel=f"vtprune::attn::row_lse_kernel<float, {kr}>", ctas=tiles(L) * B,
                 smem=2 * tile_f + TILE * (TILE + 4) * 4 + 2 * TILE * 4, flops=2 * R * rows,
                 bytes=B * 2 * L * R * 4, exps=rows),
            dict(kernel=f"vtprune::attn::column_sum_kernel<float, {kr}, true>", ctas=tiles(kc) * B,
                 smem=2 * tile_f + TILE * (TILE + 4) * 4 + 2 * TILE * 4, flops=2 * R * cols,
                 bytes=B * (2 * L * R * 4 + 2 * kc * 4), exps=cols),
            dict(kernel="vtprune::attn::finalize_kernel<1>", ctas=tiles(kc, FINALIZE_THREADS) * B, smem=0,
                 flops=0, bytes=B * 3 * kc * 4, exps=0),
        ]
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


OPS = ("attention_scores", "attention_with_scores", "topk_keep_order", "contextual_merge", "lowrank_scores")


def _lookup(table: dict[str, dict], prefix: str) -> tuple[str, dict]:
    """The compiled kernel whose demangled signature contains ``prefix`` (the first in name order)."""
    hits = sorted(name for name in table if prefix in name)
    if not hits:
        raise KeyError(f"no compiled kernel matches {prefix!r}")
    return hits[0], table[hits[0]]


def cuda_records(shapes: list[str], batches: list[int]) -> list[dict]:
    """One record per (op, kernel, shape, batch) of the CUDA backend, bf16 inputs, sm_90a.

    Parameters
    ----------
    shapes : names from ``SHAPES`` ("clip", "llava", "llava_next", "qwen2_5_vl")
    batches : batch sizes, e.g. [1, 8]

    Returns
    -------
    list of dict with op, kernel, backend="cuda", shape, batch, regs, spill_bytes, smem_bytes (static +
    dynamic), grid_ctas, tensor_cores, async_copies, instructions (SASS, whole kernel), predicted_us.
    """
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ValueError(f"shapes must be among {sorted(SHAPES)}, got {unknown}")
    table = kernel_table()
    records = []
    for shape in shapes:
        for batch in batches:
            for op in OPS:
                for launch in launches(op, SHAPES[shape], batch):
                    name, facts = _lookup(table, launch["kernel"])
                    records.append(dict(
                        op=op, kernel=name, backend="cuda", shape=shape, batch=batch, regs=facts["regs"],
                        spill_bytes=facts["spill_bytes"], smem_bytes=facts["static_smem"] + launch["smem"],
                        grid_ctas=launch["ctas"], tensor_cores=facts.get("tensor_cores", False),
                        async_copies=facts.get("async_copies", False),
                        instructions=facts.get("instructions", 0),
                        predicted_us=predict_us(launch["flops"], launch["bytes"], launch["exps"], launch["ctas"],
                                                facts.get("tensor_cores", False)),
                    ))
    return records


if __name__ == "__main__":
    for record in cuda_records(list(SHAPES), [1, 8]):
        sys.stdout.write(json.dumps(record) + "\n")
