"""``torch.library`` custom ops of the GPU backends, so patched models trace under torch.compile.

One module registers both backends from one prototype per op: ``torch.ops.vtprune.<op>`` launches the Triton
kernels of ``vtprune.triton_kernels.<op>`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) and
``torch.ops.vtprune.cuda_<op>`` the kernels of the compiled extension through ``vtprune.cuda.<op>``. Both share
the schema and the fake implementation, which only sizes the outputs. Output widths that depend on tensor
*values* (the largest query/key span count) are therefore explicit ``int`` arguments: the backend functions
``vtprune.<backend>.<op>.<op>`` read them on the host (where the public ops' checks already read the spans)
and call these ops.

The ALVTS Triton ops (``lowrank_scores`` and the three routed row kernels) are registered by
``vtprune.triton_kernels._routed_ops``; their CUDA twins are registered here with the same schemas.

Importing this module registers the ops; it imports neither Triton nor the extension (those load on the
first real call).
"""

import importlib
import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from vtprune._host import call

__all__ = ["OPS", "call"]

# op stem -> {backend: torch.library.CustomOpDef}; filled by _define below.
OPS: dict[str, dict[str, object]] = {}


def _launcher(module: str, name: str, first: bool = False) -> Callable:
    """A function that imports ``module`` on its first call and runs ``module.name`` (lazy: no Triton or
    extension import at registration); ``first`` keeps only the first output of a tuple."""

    def run(*args, **kwargs):
        out = getattr(importlib.import_module(module), name)(*args, **kwargs)
        return out[0] if first else out

    return run


def _define(stem: str, prototype: Callable, fake: Callable, launchers: dict[str, tuple],
            mutates_args: tuple[str, ...] = ()) -> None:
    """Register ``vtprune::<stem>`` (backend "triton") and ``vtprune::cuda_<stem>`` (backend "cuda").

    ``prototype`` gives the schema (its annotated signature; its body is never run), ``fake`` the output
    sizing, ``launchers`` maps a backend to the :func:`_launcher` arguments of the real implementation.
    """
    for backend, where in launchers.items():
        impl = _launcher(*where)
        impl.__signature__ = inspect.signature(prototype)  # custom_op infers the schema from it
        impl.__doc__ = prototype.__doc__
        qualname = f"vtprune::{stem}" if backend == "triton" else f"vtprune::{backend}_{stem}"
        op = torch.library.custom_op(qualname, impl, mutates_args=mutates_args)
        op.register_fake(fake)
        OPS.setdefault(stem, {})[backend] = op


def _both(stem: str, triton_first: bool = False) -> dict[str, tuple]:
    return {"triton": (f"vtprune.triton_kernels.{stem}", f"{stem}_launch", triton_first),
            "cuda": (f"vtprune.cuda.{stem}", f"{stem}_launch")}


def _cuda_only(module: str, name: str) -> dict[str, tuple]:
    return {"cuda": (f"vtprune.cuda.{module}", name)}


# ---------------------------------------------------------------- VisionDrop / FastV / baselines


def _attention_scores(q: Tensor, k: Tensor, query_spans: Tensor, key_spans: Tensor, causal: bool,
                      key_padding_mask: Tensor | None, scale: float | None, max_query: int,
                      max_key: int) -> Tensor:
    """float32 [B, max_key] column scores; ``max_query``/``max_key`` = the largest span counts."""


def _attention_scores_fake(q, k, query_spans, key_spans, causal, key_padding_mask, scale, max_query, max_key):
    return q.new_empty((q.shape[0], max_key), dtype=torch.float32)


def _attention_with_scores(q: Tensor, k: Tensor, v: Tensor, query_spans: Tensor, key_spans: Tensor,
                           causal: bool, key_padding_mask: Tensor | None, scale: float | None, max_query: int,
                           max_key: int) -> tuple[Tensor, Tensor]:
    """(out [B, H, L, dv] in q's dtype, float32 scores [B, max_key])."""


def _attention_with_scores_fake(q, k, v, query_spans, key_spans, causal, key_padding_mask, scale, max_query,
                                max_key):
    B, H, L, _ = q.shape
    return q.new_empty((B, H, L, v.shape[-1])), q.new_empty((B, max_key), dtype=torch.float32)


def _topk_keep_order(scores: Tensor, k: int, lengths: Tensor | None) -> Tensor:
    """int64 [B, k], ascending positions of the k highest scores per row."""


def _topk_keep_order_fake(scores, k, lengths):
    return scores.new_empty((scores.shape[0], k), dtype=torch.int64)


def _contextual_merge(x: Tensor, metric: Tensor, keep_idx: Tensor, num_contextual: int,
                      lengths: Tensor | None) -> Tensor:
    """[B, k + C, D] packed tokens in x's dtype."""


def _contextual_merge_fake(x, metric, keep_idx, num_contextual, lengths):
    return x.new_empty((x.shape[0], keep_idx.shape[1] + num_contextual, x.shape[2]))


def _select_and_merge(scores: Tensor, x: Tensor, metric: Tensor, num_dominant: int, num_contextual: int,
                      lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens [B, k + C, D], keep_idx int64 [B, k], target_idx int64 [B, C])."""


def _select_and_merge_fake(scores, x, metric, num_dominant, num_contextual, lengths):
    B, _, D = x.shape
    return (x.new_empty((B, num_dominant + num_contextual, D)),
            x.new_empty((B, num_dominant), dtype=torch.int64),
            x.new_empty((B, num_contextual), dtype=torch.int64))


_define("attention_scores", _attention_scores, _attention_scores_fake, _both("attention_scores"))
_define("attention_with_scores", _attention_with_scores, _attention_with_scores_fake,
        _both("attention_with_scores"))
_define("topk_keep_order", _topk_keep_order, _topk_keep_order_fake, _both("topk_keep_order"))
# The Triton launcher also returns the target positions (select_and_merge needs them); the op keeps the tokens.
_define("contextual_merge", _contextual_merge, _contextual_merge_fake, _both("contextual_merge", triton_first=True))
_define("select_and_merge", _select_and_merge, _select_and_merge_fake, _both("select_and_merge"))

# ------------------------------------------------- ALVTS (Triton ops: vtprune.triton_kernels._routed_ops)


def _lowrank_scores(h: Tensor, u: Tensor, v: Tensor, visual_spans: Tensor, key_padding_mask: Tensor | None,
                    max_visual: int) -> Tensor:
    """float32 [B, max_visual] selector scores."""


def _lowrank_scores_fake(h, u, v, visual_spans, key_padding_mask, max_visual):
    return h.new_empty((h.shape[0], max_visual), dtype=torch.float32)


def _routed_gather_rmsnorm(x: Tensor, idx: Tensor, weight: Tensor, eps: float) -> Tensor:
    """[B, K, D] = RMSNorm(x[b, idx[b]])."""


def _routed_rows_fake(x, idx, *rest):
    return x.new_empty((x.shape[0], idx.shape[1], x.shape[2]))


def _routed_gather_add_rmsnorm(x: Tensor, idx: Tensor, delta: Tensor, weight: Tensor, eps: float) -> Tensor:
    """delta <- x[idx] + delta (in place); returns RMSNorm(delta) [B, K, D]."""


def _routed_add_scatter(x: Tensor, idx: Tensor, mid: Tensor, delta: Tensor) -> None:
    """x[b, idx[b]] = mid + delta (in place)."""


def _nothing(*args):
    return None


_define("lowrank_scores", _lowrank_scores, _lowrank_scores_fake,
        _cuda_only("lowrank_scores", "lowrank_scores_launch"))
_define("routed_gather_rmsnorm", _routed_gather_rmsnorm, _routed_rows_fake,
        _cuda_only("routed_layer", "gather_rmsnorm"))
_define("routed_gather_add_rmsnorm", _routed_gather_add_rmsnorm, _routed_rows_fake,
        _cuda_only("routed_layer", "gather_add_rmsnorm"), mutates_args=("delta",))
_define("routed_add_scatter", _routed_add_scatter, _nothing, _cuda_only("routed_layer", "add_scatter"),
        mutates_args=("x",))
