"""CUDA backend of ``lowrank_scores`` (ALVTS selector; score passes: csrc/include/vtprune/attention_scores.cuh).

The projections ``a = h U``, ``b = h V`` (``O(L D R)``) run on the tensor cores in the extension
(csrc/include/vtprune/lowrank_project.cuh: 16-bit products, exact in fp32, fp32 sums and outputs) when h, U
and V share a 16-bit dtype and D, R are multiples of 8; otherwise as one fp32 torch matmul. The score kernels
do the ``O(L^2 R)`` part: row lse over the causal keys, the visual and text column sums, and the
``S_V2V * S_T2V`` epilogue.
"""

from __future__ import annotations

import torch

from vtprune._ext import load_extension
from vtprune._host import call, host_max
from vtprune.cuda import check_width, current_stream, custom_op, device_i64, dtype_code, pointer


def project(ext, h, u, v):
    """``(h U, h V)`` as float32 [B, L, R] each. The outputs stay fp32 like the reference's: bf16-rounded
    projections would shift logits by ~|logit| * 2^-9."""
    B, L, D = h.shape
    R = u.shape[1]
    h2 = h.reshape(B * L, D).contiguous()  # [B*L, D]
    u, v = u.contiguous(), v.contiguous()  # [D, R]
    if (h.dtype in (torch.float16, torch.bfloat16) and u.dtype == v.dtype == h.dtype and D % 8 == 0
            and R % 8 == 0 and all(t.data_ptr() % 16 == 0 for t in (h2, u, v))):
        a = torch.empty(B, L, R, dtype=torch.float32, device=h.device)  # [B, L, R]
        b = torch.empty_like(a)  # [B, L, R]
        with torch.cuda.device(h.device):
            ext.lowrank_project(pointer(h2), pointer(u), pointer(v), pointer(a), pointer(b), B * L, D, R,
                                dtype_code(h.dtype), current_stream(h.device))
        return a, b
    ab = h.float() @ torch.cat([u, v], dim=1).float()  # [B, L, 2R]
    return ab[..., :R].contiguous(), ab[..., R:].contiguous()


def lowrank_scores_launch(h, u, v, visual_spans, key_padding_mask, max_visual):
    """Projection and the three passes (the body of the custom op ``vtprune::cuda_lowrank_scores``);
    float32 [B, max_visual]."""
    check_width("max_visual", visual_spans, max_visual)
    ext = load_extension()
    B, L, _ = h.shape
    R = u.shape[1]
    device = h.device
    Vm = max_visual
    a, b = project(ext, h, u, v)  # float32 [B, L, R] each
    vspans = device_i64(visual_spans, device)  # [B, 2]
    kpm = None if key_padding_mask is None else key_padding_mask.contiguous()  # [B, L] bool
    out = torch.empty(B, Vm, dtype=torch.float32, device=device)  # [B, Vm]
    if B == 0:
        return out
    lse = torch.empty(B, L, dtype=torch.float32, device=device)  # [B, L] every row's lse
    partial = torch.empty(2, B, Vm, dtype=torch.float32, device=device)  # [visual | text, B, Vm]
    with torch.cuda.device(device):
        ext.lowrank_scores(
            pointer(a), pointer(b), pointer(vspans), pointer(kpm), pointer(lse), pointer(partial),
            pointer(out), B, L, R, Vm, current_stream(device),
        )
    return out


def lowrank_scores(h, u, v, *, visual_spans, key_padding_mask=None):
    """float32 [B, max visual count]; see ``vtprune.ops.lowrank_scores``. Under torch.compile it runs as the
    custom op ``torch.ops.vtprune.cuda_lowrank_scores``."""
    return call(custom_op("lowrank_scores"), lowrank_scores_launch, h, u, v, visual_spans, key_padding_mask,
                host_max(visual_spans, h.shape[1]))
