"""Ahead-of-time sm_90 builds of the Triton kernels, specialised exactly as a launch would specialise them.

No GPU is needed. The op launchers run on CPU tensors of the real shapes while :func:`capture_launches`
replaces ``JITFunction.run``: every ``kernel[grid](...)`` is recorded (kernel, arguments, grid) instead of
launched. :func:`compile_launch` then feeds the recorded arguments through the JIT's own binder
(``create_function_from_signature`` with the sm_90 backend) and ``JITFunction._pack_args`` -- the code a launch
runs -- so pointer alignment (divisibility by 16), integer divisibility and ints equal to 1 become the same
attributes and constants a launch on a GPU would compile with. A CPU tensor from the caching allocator is
64-byte aligned like a CUDA allocation, so the pointer hints match.

Must run with TRITON_INTERPRET unset (the kernels are compiled, not interpreted).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``."""

    fn: JITFunction
    args: tuple
    kwargs: dict
    grid: tuple

    @property
    def name(self) -> str:
        return self.fn.__name__

    @property
    def grid_ctas(self) -> int:
        n = 1
        for g in self.grid:
            n *= int(g)
        return n


@contextmanager
def capture_launches():
    """Record every Triton launch inside the block (nothing runs); yields the list of :class:`Launch`."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    launches: list[Launch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        grid = grid(dict(zip([p.name for p in self.params], args))) if callable(grid) else tuple(grid)
        launches.append(Launch(self, args, dict(kwargs), grid))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def specialisation(launch: Launch, arch: int = 90):
    """(signature, constexprs, attrs, options) exactly as ``JITFunction.run`` computes them for ``arch``."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    fn = launch.fn
    kwargs = dict(launch.kwargs, debug=launch.kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, spec, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, spec, options)
    return target, signature, constexprs, attrs, options


@dataclass
class Build:
    """Resources of one compiled kernel, read back from the cubin (ptxas) and its SASS/PTX."""

    kernel: str
    regs: int
    spill_bytes: int  # stack frame + local memory (register spills)
    smem_bytes: int
    num_warps: int
    tensor_cores: bool
    wgmma: bool
    async_copies: bool
    loop_instructions: int  # SASS instructions in the longest loop body (one inner-loop tile)
    sass_instructions: int
    constexprs: dict = field(default_factory=dict)
    loops: list = field(default_factory=list)  # instructions of every loop body, in SASS order


_CACHE: dict = {}


def compile_launch(launch: Launch, arch: int = 90) -> Build:
    """Compile ``launch`` for sm_``arch`` with the launch's specialisation (cached per specialisation)."""
    target, signature, constexprs, attrs, options = specialisation(launch, arch)
    key = (launch.name, arch, repr(sorted(signature.items())), repr(sorted(constexprs.items(), key=str)),
           repr(sorted(attrs.items(), key=str)), repr(options))
    if key in _CACHE:
        return _CACHE[key]
    src = ASTSource(launch.fn, signature, constexprs, attrs)
    kernel = triton.compile(src, target=target, options=options.__dict__)
    build = _read_back(launch.name, kernel, options.num_warps)
    names = [p.name for p in launch.fn.params]
    build.constexprs = {names[k[0]]: v for k, v in constexprs.items() if len(k) == 1 and
                        launch.fn.params[k[0]].is_constexpr}
    _CACHE[key] = build
    return build


def _read_back(name: str, kernel, num_warps: int) -> Build:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(TOOLS, "nvdisasm"), "-c", f.name],
                              capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", usage))
    ptx = kernel.asm["ptx"]
    body = [line for line in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", line)]
    wgmma = "HGMMA" in sass or "wgmma.mma_async" in ptx
    return Build(
        kernel=name, regs=int(fields["REG"]), spill_bytes=int(fields["STACK"]) + int(fields["LOCAL"]),
        smem_bytes=max(int(kernel.metadata.shared), int(fields.get("SHARED", 0))), num_warps=num_warps,
        tensor_cores=wgmma or "HMMA" in sass or "mma.sync" in ptx, wgmma=wgmma,
        async_copies=any(s in sass for s in ("LDGSTS", "UTMALDG", "UBLKCP")) or "cp.async" in ptx,
        loop_instructions=max(_loops(sass, merge=False), default=0), loops=_loops(sass), sass_instructions=len(body),
    )


def _loops(sass: str, merge: bool = True) -> list[int]:
    """SASS instructions from a label to a later backward branch to it, for every such loop in SASS order
    (``merge``: overlapping spans, nested loops, merged into their outermost extent).

    The longest single span is an approximation of one inner-loop tile's instruction count (the issue cost of
    a tile per warp): nested loops are counted once, predicated and branched-over paths as if all executed.
    """
    count, labels, spans = 0, {}, []
    for line in sass.splitlines():
        label = re.match(r"(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = count
        elif re.match(r"\s*/\*[0-9a-f]{4,}\*/", line):
            count += 1
            target = re.search(r"\bBRA\b.*`\((\.L_x_\d+)\)", line)
            if target and target.group(1) in labels and count - labels[target.group(1)] > 4:
                spans.append((labels[target.group(1)], count - labels[target.group(1)]))
    if not merge:
        return [length for _, length in spans]
    # nested loops: keep the outermost span of each overlapping group
    outer = []
    for start, length in sorted(spans):
        if outer and start < outer[-1][0] + outer[-1][1]:
            if start + length > outer[-1][0] + outer[-1][1]:
                outer[-1] = (outer[-1][0], start + length - outer[-1][0])
            continue
        outer.append((start, length))
    return [length for _, length in outer]
