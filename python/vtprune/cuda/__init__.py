"""Glue between torch tensors and the CUDA kernels of the compiled extension ``vtprune._C``.

``vtprune.cuda.<op>.<op>`` takes tensors already checked by the public op ``vtprune.ops.<op>``, makes them
contiguous in the dtype the kernel reads, allocates the outputs and launches the kernel on the current
stream, passing raw device pointers (the extension has no torch dependency).
"""

from __future__ import annotations

import torch

from vtprune._host import host_max, to_device_i64

# Ops whose CUDA kernel ``backend="auto"`` may pick. An op is listed only after its kernel passed the GPU
# tests (tests/gpu/) on a real GPU and beat the Triton kernel in the committed results under
# benchmarks/results/. Nothing is validated yet: no CUDA kernel has run on a GPU so far, so "auto"
# uses Triton on CUDA tensors and the CUDA kernels run only when asked for with backend="cuda".
VALIDATED: frozenset[str] = frozenset()


def current_stream(device: torch.device) -> int:
    """The ``cudaStream_t`` handle (as an int) of torch's current stream on ``device``."""
    return torch.cuda.current_stream(device).cuda_stream


def pointer(tensor: torch.Tensor | None) -> int:
    """Device address of ``tensor``'s first element, or 0 for ``None`` (the kernels' "absent")."""
    return 0 if tensor is None else tensor.data_ptr()


# Element-type codes of the extension's launchers (csrc/include/vtprune/dispatch.cuh).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def dtype_code(dtype: torch.dtype) -> int:
    """The extension's code for a float dtype (0 fp32, 1 fp16, 2 bf16)."""
    return DTYPE_CODES[dtype]


# An int64 index tensor (spans, lengths, indices) contiguous on ``device``; a CPU tensor goes through pinned
# memory, so the copy is queued on the current stream instead of waiting for it.
device_i64 = to_device_i64


def check_width(name: str, counts: torch.Tensor | None, given: int) -> None:
    """An output width (``max_query``, ``max_key``, ``max_visual``) must cover every row's count, or the
    kernels index past their buffers. ``counts`` is [B, 2] spans or [B] lengths; checked only when it is
    on the CPU (read once per tensor, :func:`vtprune._host.host_max`), so a device tensor costs no sync."""
    if counts is None or not counts.is_cpu or counts.numel() == 0:
        return
    largest = host_max(counts)
    if largest > given:
        raise ValueError(f"{name} ({given}) is below the largest count ({largest})")


def custom_op(stem: str):
    """``torch.ops.vtprune.cuda_<stem>`` (registered by :mod:`vtprune._library`)."""
    import vtprune._library  # noqa: F401  (registers the custom ops)

    return getattr(torch.ops.vtprune, f"cuda_{stem}")
