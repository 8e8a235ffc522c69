"""Analytic cost of each Triton kernel launch and a roofline time at H100 SXM peaks (all figures *predicted*).

Per launch the model counts, from the recorded launch arguments (spans, sizes, tile constexprs), the work the
kernel really does tile by tile (causal skipping and span bounds included): tensor-core FLOPs, CUDA-core FLOPs,
exponentials, unique HBM bytes (re-reads are assumed to hit the 50 MB L2) and loop iterations per CTA. The
predicted time is a fixed per-launch overhead plus the largest of:

* tensor-core, CUDA-core, MUFU (exp2) and HBM time, each at its peak times the fraction of SMs the grid
  occupies (a grid below 132 CTAs leaves SMs idle; HBM saturates from 66 busy SMs);
* issue time: SASS instructions executed (loop body x iterations x warps, see ``_triton_sm90``) at 4 warp
  instructions per clock per busy SM;
* the critical path: the longest CTA's iterations, each at least its loop body's issue time for its warps,
  plus one memory latency per iteration when the loop has no asynchronous copies (loads not pipelined),
  plus one memory latency per dependent round trip outside loops where a cost function counts them
  (``round_trips``). A cost function may name the loop that runs (``loop_instructions``, one of
  ``Build.loops``) where the longest one only runs on rare inputs, or give the iterations of each source loop
  (``loop_iters``, in SASS order: interior and masked key tiles) to be charged at that loop's size.
"""

from __future__ import annotations

SMS = 132
CLOCK = 1.83e9  # Hz, H100 SXM sustained boost
PEAK = dict(bf16=989e12, tf32=494e12, fp32=67e12)  # dense FLOP/s: tensor cores bf16/fp16, TF32; FP32 FMA
EXP_RATE = SMS * 16 * CLOCK  # MUFU ex2 results per second (16 per clock per SM)
HBM = 3.35e12  # bytes/s
LAUNCH_US = 1.5  # launch, ramp-up and tail of one kernel on the GPU timeline
MEM_LATENCY_US = 0.4  # one dependent DRAM/L2 round trip in a loop without async copies
TORCH_OP_US = 3.0  # a small PyTorch kernel between the Triton launches (reduction, copy, arange)
TORCH_SORT_US = 8.0  # torch.sort / searchsorted of a [B, N] row (several kernels)
PEAKS_TEXT = (f"H100 SXM: {SMS} SMs at {CLOCK / 1e9:.2f} GHz, bf16 tensor {PEAK['bf16'] / 1e12:.0f} TFLOP/s, "
              f"TF32 {PEAK['tf32'] / 1e12:.0f}, FP32 FMA {PEAK['fp32'] / 1e12:.0f}, exp2 {EXP_RATE / 1e12:.2f} T/s "
              f"(16/clk/SM), HBM {HBM / 1e12:.2f} TB/s, {LAUNCH_US} us per launch, "
              f"{MEM_LATENCY_US} us per unpipelined loop iteration, 4 warp-instructions/clk/SM")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def ctas_per_sm(regs: int, smem: int, num_warps: int) -> int:
    """Resident CTAs per SM on sm_90: registers (per-warp allocation in 256-register units), shared memory
    (228 KiB, 1 KiB reserved per CTA), 64 warps and 32 CTAs."""
    per_warp = cdiv(max(regs, 1) * 32, 256) * 256
    by_regs = (65536 // per_warp) // num_warps
    by_smem = (233472 // (smem + 1024)) if smem else 32
    return max(0, min(by_regs, by_smem, 64 // num_warps, 32))


def time_us(cost: dict, build, grid_ctas: int) -> dict:
    """Predicted microseconds of one launch and the bound that sets it."""
    busy = min(SMS, grid_ctas) / SMS
    mem_busy = min(1.0, min(SMS, grid_ctas) / (SMS / 2))
    w = build.num_warps
    loop = cost.get("loop_instructions", build.loop_instructions)
    lat = 0 if build.async_copies else MEM_LATENCY_US * 1e-6
    if len(cost.get("loop_iters", ())) == len(build.loops) > 0:  # per source loop, in SASS order
        looped = sum(t * n for (t, _), n in zip(cost["loop_iters"], build.loops))
        chain_loops = sum(mx * (n * max(1.0, w / 4) / CLOCK + lat)
                          for (_, mx), n in zip(cost["loop_iters"], build.loops))
    else:
        looped = cost["iters_total"] * loop
        chain_loops = cost["iters_max"] * (loop * max(1.0, w / 4) / CLOCK + lat)
    insts = looped * w + grid_ctas * w * build.sass_instructions
    terms = {
        "tensor": cost.get("flops_tc", 0) / (PEAK[cost.get("tc_kind", "bf16")] * busy),
        "fp32": cost.get("flops_fp32", 0) / (PEAK["fp32"] * busy),
        "exp": cost.get("exps", 0) / (EXP_RATE * busy),
        "hbm": cost["bytes"] / (HBM * mem_busy),
        "issue": insts / (4 * CLOCK * SMS * busy),
        "chain": (chain_loops + cost.get("round_trips", 0) * MEM_LATENCY_US * 1e-6
                  + build.sass_instructions * max(1.0, w / 4) / CLOCK),
    }
    bound = max(terms, key=terms.get)
    return dict(predicted_us=LAUNCH_US + terms[bound] * 1e6, bound=bound,
                terms_us={k: round(v * 1e6, 2) for k, v in terms.items()})


def _spans(t, b):
    return int(t[b, 0]), int(t[b, 1])


def _iters(per_cta: list[int]) -> dict:
    return dict(iters_total=sum(per_cta), iters_max=max(per_cta, default=0))


def attn_row_lse(a: dict, c: dict) -> dict:
    q, qs = a["q_ptr"], a["qspan_ptr"]
    B, G, BM, BN, BD = q.shape[0], c["G"], c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_D"]
    hkv, L, es = a["HKV"], a["L"], q.element_size()
    per, inner = [], []
    S = c.get("SPLIT", 1)  # split s takes key tiles s, s + S, ...
    for b in range(B):
        qstart, qcount = _spans(qs, b)
        for m0 in range(0, G * qs[:, 1].max().item(), BM):
            last = qstart + min(qcount - 1, (m0 + BM - 1) // G)
            hi = (last + 1 if c["CAUSAL"] else L) if m0 < qcount * G else 0
            full = min((min(qstart + m0 // G + 1, L) if c["CAUSAL"] else L) // BN, cdiv(hi, BN))
            per += [cdiv(max(0, cdiv(hi, BN) - s), S) for s in range(S)] * hkv
            inner += [cdiv(max(0, full - s), S) for s in range(S)] * hkv
    edge = [p - i for p, i in zip(per, inner)]
    loops = dict(loop_iters=[(sum(inner), max(inner, default=0)), (sum(edge), max(edge, default=0))])
    n = sum(per)
    dot = dict(flops_fp32=2 * n * BM * BN * BD) if c["SMALL_M"] else dict(flops_tc=2 * n * BM * BN * BD)
    rows = int(qs[:, 1].sum()) * G * hkv
    return dict(dot, **loops, exps=n * BM * BN, bytes=rows * a["D"] * es + B * hkv * L * a["D"] * es + rows * 4,
                **_iters(per))


def attn_columns(a: dict, c: dict) -> dict:
    q, qs, ks = a["q_ptr"], a["qspan_ptr"], a["kspan_ptr"]
    B, G, BM, BN, BD = q.shape[0], c["G"], c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_D"]
    hkv, es = a["HKV"], q.element_size()
    per, inner = [], []
    for b in range(B):
        qstart, qcount = _spans(qs, b)
        kstart, kcount = _spans(ks, b)
        for n0 in range(0, a["KM"], BN):
            r_hi = qcount * G if n0 < kcount else 0
            r_lo = max(kstart + n0 - qstart, 0) * G if c["CAUSAL"] else 0
            r_full = max(kstart + n0 + BN - 1 - qstart, 0) * G if c["CAUSAL"] else r_lo
            r_in = min(r_lo + cdiv(max(r_full - r_lo, 0), BM) * BM, r_hi)
            per += [max(0, cdiv(r_hi - r_lo, BM))] * hkv
            inner += [max(r_hi - r_in, 0) // BM] * hkv
    edge = [p - i for p, i in zip(per, inner)]
    loops = dict(loop_iters=[(sum(inner), max(inner, default=0)), (sum(edge), max(edge, default=0))])
    n = sum(per)
    dot = dict(flops_fp32=2 * n * BM * BN * BD) if c["SMALL_M"] else dict(flops_tc=2 * n * BM * BN * BD)
    rows, keys = int(qs[:, 1].sum()) * G * hkv, int(ks[:, 1].sum()) * hkv
    # several KV heads: the tile's last program (arrival atomic, then the heads' partials) writes the sum
    trips = 2 if c["HKV_P"] > 1 else 0
    return dict(dot, **loops, exps=n * BM * BN, round_trips=trips,
                bytes=(rows + keys) * a["D"] * es + rows * 4 + B * hkv * a["KM"] * 4, **_iters(per))


def attn_few_rows(a: dict, c: dict) -> dict:
    """One key tile per program (no loop); the last program of each batch row reads every tile's (max, sum)
    and the logits of the key span (at once with ONE_CHUNK, as chunks of BLOCK_KC and BLOCK_KC2, else a loop
    over chunks of BLOCK_KC, each charged as an unpipelined iteration). Round trips: Q/K loads, the arrival
    atomic, the partials and logits."""
    q = a["q_ptr"]
    B, BM, BN, BD = q.shape[0], c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_D"]
    hkv, L, NT, KM, es = a["HKV"], a["L"], a["NT"], a["KM"], q.element_size()
    n = B * hkv * NT
    chunks = cdiv(KM, c["BLOCK_KC"])
    per = [0] * (n - B) + [0 if c["ONE_CHUNK"] else chunks] * B
    span = c["BLOCK_KC"] + c["BLOCK_KC2"] if c["ONE_CHUNK"] else chunks * c["BLOCK_KC"]
    return dict(flops_fp32=2 * n * BM * BN * BD, exps=n * BM * BN + B * c["ROWS_P"] * span,
                bytes=B * hkv * L * a["D"] * es + 2 * B * hkv * BM * L * 4 + B * KM * 4, round_trips=3,
                **_iters(per))


def attn_few_rows_lse(a: dict, c: dict) -> dict:
    """One key tile of every head-row per program on the forward's LSE (no loop): Q, K, LSE loads (one round
    trip), then the output."""
    q, ks = a["q_ptr"], a["kspan_ptr"]
    B, RP, BN, BD, es = q.shape[0], c["ROWS_P"], c["BLOCK_N"], c["BLOCK_D"], q.element_size()
    n = B * cdiv(a["KM"], BN)
    keys = int(ks[:, 1].sum()) * a["HKV"]
    return dict(flops_fp32=2 * n * RP * BN * BD, exps=n * RP * BN,
                bytes=keys * a["D"] * es + B * RP * (a["D"] * es + 4) + B * a["KM"] * 4, round_trips=1,
                iters_total=0, iters_max=0)


def attn_forward(a: dict, c: dict) -> dict:
    """Two loops per program: interior key tiles (no causal or bounds mask), then the masked ones."""
    q, k = a["q_ptr"], a["k_ptr"]
    B, H, L, d = q.shape
    BM, BN, BD, BDV = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_D"], c["BLOCK_DV"]
    per = [cdiv(min(L, m0 + BM) if c["CAUSAL"] else L, BN) for m0 in range(0, L, BM)] * (B * H)
    inner = [(min(m0 + 1, L) if c["CAUSAL"] else L) // BN for m0 in range(0, L, BM)] * (B * H)
    edge = [p - i for p, i in zip(per, inner)]
    loop_iters = [(sum(inner), max(inner)), (sum(edge), max(edge))]
    n = sum(per)
    es = q.element_size()
    key = "flops_fp32" if c["IEEE"] else "flops_tc"
    return {key: 2 * n * BM * BN * (BD + BDV), "exps": n * BM * BN, "loop_iters": loop_iters,
            "bytes": 2 * B * H * L * d * es + 2 * k.numel() * es + B * H * L * 4, **_iters(per)}


def topk(a: dict, c: dict) -> dict:
    s = a["scores_ptr"]
    B, N = s.shape
    tiles = cdiv(N, c["BLOCK"])
    per = [tiles * (1 if c["SINGLE"] else 5)] * B
    return dict(bytes=s.numel() * s.element_size() + B * a["K"] * 8, **_iters(per))


def topk_tiles(a: dict, c: dict) -> dict:
    """Every program selects from the whole row (L2 after the first read); the search is unrolled (no loop)."""
    s = a["scores_ptr"]
    return dict(bytes=s.numel() * s.element_size() + s.shape[0] * a["K"] * 8, round_trips=1, iters_total=0,
                iters_max=0)


def assign(a: dict, c: dict) -> dict:
    """No loop (targets and metric columns unrolled). Dependent round trips: the score row then the metric
    rows with SELECT; else the binary searches of keep_idx (KEEP_ITERS loads each) then the metric rows."""
    m = a["metric_ptr"]
    B, N, DK = m.shape
    BM, BC = c["BLOCK_M"], c["BLOCK_C"]
    ctas = cdiv(N, BM) * B
    scores = B * N * a["scores_ptr"].element_size() if c["SELECT"] else 0
    trips = 2 if c["SELECT"] else 2 * c["KEEP_ITERS"] + 1
    return dict(flops_fp32=2 * ctas * c["C_TILES"] * BM * BC * c["K_TILES"] * c["BLOCK_K"],
                bytes=m.numel() * m.element_size() + B * N * 4 + scores, round_trips=trips,
                iters_total=0, iters_max=0)


def merge_rows(a: dict, c: dict, build=None) -> dict:
    """Column programs stream every position (the one-hot products of the first loop in SASS order; the
    exact re-run loop runs only on column tiles holding non-finite x); copy programs do no loop."""
    x = a["x_ptr"]
    B, N, D = x.shape
    K, C, ctx = a["K"], a["C"], a["CTX_TILES"]
    BN, BC, BD = c["BLOCK_N"], c["BLOCK_C"], c["BLOCK_D"]
    copies = cdiv(K, c["COPY_ROWS"]) * a["COPY_D_TILES"]
    per = ([cdiv(N, BN)] * ctx + [0] * copies) * B
    flops = 2 * 2 * sum(per) * BC * BN * BD
    dot = dict(flops_fp32=flops) if c["IEEE"] else dict(flops_tc=flops)
    out = dict(dot, bytes=B * (N + K + C) * D * x.element_size() + B * N * 4,  # x once, output, codes
               round_trips=1, **_iters(per))  # the target rows, after the loop
    if build is not None and build.loops:
        out["loop_instructions"] = build.loops[0]
    return out


def project(a: dict, c: dict) -> dict:
    h = a["h_ptr"]
    M, D, R = a["M"], a["D"], a["R"]
    weights = [a[k] for k in ("w_ptr", "u_ptr", "v_ptr") if k in a]
    cols = R * len(weights)
    per = [cdiv(D, c["BLOCK_K"])] * (cdiv(M, c["BLOCK_M"]) * cdiv(cols, c["BLOCK_R"]))
    key = "flops_fp32" if c["IEEE"] else "flops_tc"
    return {key: 2 * M * D * cols, "bytes": M * D * h.element_size() + sum(w.numel() * w.element_size()
                                                                           for w in weights) + M * cols * 4,
            **_iters(per)}


def _lowrank_dot(a, c, n_tiles):
    flops = 2 * n_tiles * c["BLOCK_M"] * c["BLOCK_N"] * a["R"]
    if c["IEEE"]:
        return dict(flops_fp32=flops)
    return dict(flops_tc=3 * flops, tc_kind="tf32")  # 3xTF32


def _ab(a):
    return a["ab_ptr"] if "ab_ptr" in a else a["a_ptr"]


def lowrank_lse(a: dict, c: dict) -> dict:
    sp = a["span_ptr"]
    B, L, R, BM, BN = sp.shape[0], a["L"], a["R"], c["BLOCK_M"], c["BLOCK_N"]
    S, rc = c.get("SPLIT", 1), cdiv(R, c["BLOCK_R"])
    per = []
    for b in range(B):
        vstart = int(sp[b, 0])
        for m0 in range(0, L, BM):
            tiles = cdiv(min(m0 + BM, L), BN) if m0 + BM > vstart else 0
            per += [cdiv(max(0, tiles - s), S) * rc for s in range(S)]
    n = sum(per) // rc
    return dict(_lowrank_dot(a, c, n), exps=n * BM * BN, bytes=2 * B * L * R * 4 + 2 * S * B * L * 4, **_iters(per))


def lowrank_columns(a: dict, c: dict) -> dict:
    sp = a["span_ptr"]
    B, L, R, BM, BN, VM = sp.shape[0], a["L"], a["R"], c["BLOCK_M"], c["BLOCK_N"], a["VM"]
    S, rc = c.get("SPLIT", 1), cdiv(R, c["BLOCK_R"])
    per = []
    for b in range(B):
        vstart, vcount = _spans(sp, b)
        for n0 in range(0, VM, BN):
            tiles = cdiv(L - vstart - n0, BM) if n0 < vcount else 0
            per += [cdiv(max(0, tiles - s), S) * rc for s in range(S)]
    n = sum(per) // rc
    return dict(_lowrank_dot(a, c, n), exps=n * BM * BN, bytes=2 * B * L * R * 4 + B * L * 4 + 2 * S * B * VM * 4,
                **_iters(per))


def lowrank_finish(a: dict, c: dict) -> dict:
    B, VM = a["span_ptr"].shape[0], a["VM"]
    return dict(bytes=(2 * c["SPLIT"] + 1) * B * VM * 4, iters_total=0, iters_max=0)


def routed(reads_writes: int):
    def cost(a: dict, c: dict) -> dict:
        x = a["x_ptr"]
        rows = a["idx_ptr"].numel()
        return dict(bytes=reads_writes * rows * a["D"] * x.element_size(), iters_total=0, iters_max=0)
    return cost


MODELS = {
    "attention_scores._row_lse_kernel": attn_row_lse,
    "attention_scores.column_scores_kernel": attn_columns,
    "attention_scores.few_rows_scores_kernel": attn_few_rows,
    "attention_with_scores._attention_fwd_kernel": attn_forward,
    "attention_with_scores.few_rows_lse_scores_kernel": attn_few_rows_lse,
    "topk_keep_order._topk_kernel": topk,
    "topk_keep_order._topk_tiles_kernel": topk_tiles,
    "contextual_merge._assign_kernel": assign,
    "contextual_merge._merge_rows_kernel": merge_rows,
    "lowrank_scores._project_kernel": project,
    "lowrank_scores._row_lse_kernel": lowrank_lse,
    "lowrank_scores._visual_columns_kernel": lowrank_columns,
    "lowrank_scores._finish_kernel": lowrank_finish,
    "_routed_kernels.gather_rmsnorm_kernel": routed(2),
    "_routed_kernels.gather_add_rmsnorm_kernel": routed(4),
    "_routed_kernels.add_scatter_kernel": routed(3),
}


def kernel_key(fn) -> str:
    return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"


def launch_cost(launch, build) -> dict:
    """Cost terms and predicted time of one recorded launch (see the module docstring)."""
    args = dict(zip([p.name for p in launch.fn.params], launch.args))
    args.update({k: v for k, v in launch.kwargs.items()})
    model = MODELS[kernel_key(launch.fn)]
    cost = model(args, args, build) if "build" in model.__code__.co_varnames else model(args, args)
    out = dict(flops=cost.get("flops_tc", 0) + cost.get("flops_fp32", 0), bytes=cost["bytes"],
               exps=cost.get("exps", 0), iters_max=cost["iters_max"])
    return dict(out, **time_us(cost, build, launch.grid_ctas))
