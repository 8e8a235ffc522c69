"""Glue between torch tensors and the CUDA kernels of the compiled extension ``vtprune._C``.

``vtprune.cuda.<op>.<op>`` takes tensors already checked by the public op ``vtprune.ops.<op>``, makes them
contiguous in the dtype the kernel reads, allocates the outputs and launches the kernel on the current
stream, passing raw device pointers (the extension has no torch dependency).
"""

from __future__ import annotations

import torch

# Ops whose CUDA kernel ``backend="auto"`` may pick. An op is listed only after its kernel passed the GPU
# tests (tests/gpu/) on a real GPU and beat the Triton kernel in the committed results under
# benchmarks/results/. Nothing is validated yet: no GPU has been lent to the project so far, so "auto"
# uses Triton on CUDA tensors and the CUDA kernels run only when asked for with backend="cuda".
VALIDATED: frozenset[str] = frozenset()


def current_stream(device: torch.device) -> int:
    """The ``cudaStream_t`` handle (as an int) of torch's current stream on ``device``."""
    return torch.cuda.current_stream(device).cuda_stream


def pointer(tensor: torch.Tensor | None) -> int:
    """Device address of ``tensor``'s first element, or 0 for ``None`` (the kernels' "absent")."""
    return 0 if tensor is None else tensor.data_ptr()
