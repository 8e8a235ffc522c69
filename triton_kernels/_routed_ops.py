"""``torch.library`` custom ops of the ALVTS Triton kernels, so patched models trace under torch.compile.

The ops are opaque to the compiler: the real implementation launches the Triton kernels, the fake one only
sizes outputs. In eager mode the Triton backends call the launchers directly (:func:`call`): the dispatcher
costs ~10 us a call, which the routed layer (three row kernels per decoder layer, on as few as ~150 tokens)
cannot afford. Output widths that depend on tensor values are explicit ``int`` arguments.

Importing this module registers the ops; it imports neither Triton nor the kernels (those load on first call).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vtprune._host import call  # noqa: F401  (the launchers import it from here)


@torch.library.custom_op("vtprune::lowrank_scores", mutates_args=())
def lowrank_scores_op(h: Tensor, u: Tensor, v: Tensor, visual_spans: Tensor, key_padding_mask: Tensor | None,
                      max_visual: int) -> Tensor:
    """float32 [B, max_visual] selector scores (see :mod:`vtprune.triton_kernels.lowrank_scores`)."""
    from vtprune.triton_kernels.lowrank_scores import lowrank_scores_launch

    return lowrank_scores_launch(h, u, v, visual_spans, key_padding_mask, max_visual)


@lowrank_scores_op.register_fake
def _(h, u, v, visual_spans, key_padding_mask, max_visual):
    return h.new_empty((h.shape[0], max_visual), dtype=torch.float32)


@torch.library.custom_op("vtprune::routed_gather_rmsnorm", mutates_args=())
def routed_gather_rmsnorm_op(x: Tensor, idx: Tensor, weight: Tensor, eps: float) -> Tensor:
    """[B, K, D] = RMSNorm(x[b, idx[b]])."""
    from vtprune.triton_kernels._routed_kernels import gather_rmsnorm

    return gather_rmsnorm(x, idx, weight, eps)


@routed_gather_rmsnorm_op.register_fake
def _(x, idx, weight, eps):
    return x.new_empty((x.shape[0], idx.shape[1], x.shape[2]))


@torch.library.custom_op("vtprune::routed_gather_add_rmsnorm", mutates_args=("delta",))
def routed_gather_add_rmsnorm_op(x: Tensor, idx: Tensor, delta: Tensor, weight: Tensor, eps: float) -> Tensor:
    """delta <- x[idx] + delta (in place); returns RMSNorm(delta) [B, K, D]."""
    from vtprune.triton_kernels._routed_kernels import gather_add_rmsnorm

    return gather_add_rmsnorm(x, idx, delta, weight, eps)


@routed_gather_add_rmsnorm_op.register_fake
def _(x, idx, delta, weight, eps):
    return x.new_empty((x.shape[0], idx.shape[1], x.shape[2]))


@torch.library.custom_op("vtprune::routed_add_scatter", mutates_args=("x",))
def routed_add_scatter_op(x: Tensor, idx: Tensor, mid: Tensor, delta: Tensor) -> None:
    """x[b, idx[b]] = mid + delta (in place)."""
    from vtprune.triton_kernels._routed_kernels import add_scatter

    add_scatter(x, idx, mid, delta)
