// attention_scores (docs/ops.md#attention_scores): score[b, j] = 1/(H |Qs|) sum_h sum_{i in Qs}
// exp(s_hij - lse_hi), s = q . k * scale, for j in the key span; lse over every valid key of row i
// (causal by index, key padding excluded). Never materialises L x L:
//
//   pass 1  row_lse_kernel       grid (Q tiles, H, B): online max / sum over key tiles, like the
//                                flash forward without V -> lse [B, H, Qm] (log2 domain)
//   pass 2  column_sum_kernel    grid (K tiles, H, B): for one key tile, sum exp2(s - lse) over the
//                                query tiles -> per-head partials [B, H, Km]
//   finish  finalize_kernel      sum over heads / (H |Qs|) -> [B, Km]; no atomics, so reruns are
//                                bit-identical
//   Qm == 1 single_query_*       CLIP's [CLS] row: a thread per key over (L / 64, H, B) blocks,
//                                then the heads' lse and the scores in one finishing kernel
//
// The same passes serve lowrank_scores (a, b as a single head, all rows, two row classes) and the
// score half of attention_with_scores (lse indexed by position, written by the flash kernel).
// Exponentials are base 2 with log2(e) folded into the scale; an empty row has lse = +inf, so its
// exp2(s - lse) is 0 and it contributes nothing (the reference's all-zero row).
#pragma once

#include <cmath>
#include <cstdint>

#include "vtprune/attention_tiles.cuh"
#include "vtprune/common.cuh"

namespace vtprune {
namespace attn {

// (start, count) of batch row b, or the whole sequence when `spans` is null.
__device__ __forceinline__ void span_of(const int64_t* spans, int b, int L, int& start,
                                        int& count) {
  if (spans == nullptr) {
    start = 0;
    count = L;
  } else {
    start = static_cast<int>(spans[2 * b]);
    count = static_cast<int>(spans[2 * b + 1]);
  }
}

__device__ __forceinline__ bool key_real(const bool* kpm, int b, int L, int j) {
  return kpm == nullptr || kpm[static_cast<int64_t>(b) * L + j];
}

// Key flags of the tile [n0, n0 + kBN): 1 for a real key inside the sequence. Threads < kBN write.
__device__ __forceinline__ void load_key_flags(float* sKeyOk, const bool* kpm, int b, int L,
                                               int n0) {
  if (threadIdx.x < kBN) {
    const int j = n0 + threadIdx.x;
    sKeyOk[threadIdx.x] = (j < L && key_real(kpm, b, L, j)) ? 1.f : 0.f;
  }
}

// s2[cc] = log2-scaled logit of column 2 cc + half of `row` in the S tile (-inf where the key is
// padding, past L, or after query position i when causal); returns their max.
__device__ __forceinline__ float row_logits(const float* sS, const float* sKeyOk, int row, int half,
                                            int n0, int i, bool causal, float scale_log2,
                                            float (&s2)[kBN / 2]) {
  float tile_max = -INFINITY;
#pragma unroll
  for (int cc = 0; cc < kBN / 2; ++cc) {
    const int c = 2 * cc + half;
    const bool ok = sKeyOk[c] != 0.f && (!causal || n0 + c <= i);
    s2[cc] = ok ? sS[row * kLdS + c] * scale_log2 : -INFINITY;
    tile_max = fmaxf(tile_max, s2[cc]);
  }
  return tile_max;
}

// Row class for the column sums: 0 counts into part[0], 1 into part[1], 2 nowhere. Scores use one
// class; lowrank_scores splits rows into visual (0) and text = real and not visual (1).
template <bool kTwoClass>
__device__ __forceinline__ int row_class(int i, int vstart, int vcount, bool real) {
  if (!kTwoClass) return 0;
  if (i >= vstart && i < vstart + vcount) return 0;
  return real ? 1 : 2;
}

struct ScoreArgs {
  const void* q;          // [B, H, L, d]
  const void* k;          // [B, Hkv, L, d]
  const int64_t* qspans;  // [B, 2] or null (all rows)
  const int64_t* kspans;  // [B, 2]
  const bool* kpm;        // [B, L] (true = real token) or null
  float* lse;             // pass 1 output / pass 2 input, see lse_by_position
  float* part;            // [classes, B, H, Km]
  int B, H, Hkv, L, d;
  int Qm, Km;            // largest query / key count
  int64_t lse_stride;    // per (b, h) row of lse: Qm (span-indexed) or L (position-indexed)
  bool lse_by_position;  // lse indexed by the row position i (true) or its rank in the span
  float scale_log2;      // scale * log2(e)
  bool causal;
  bool vec;  // q, k rows 16-byte aligned with d a multiple of 16 / sizeof(T)
};

template <typename T, int kD>
constexpr int scores_smem_bytes() {
  return 2 * kBM * tile_ld<T, kD>() * static_cast<int>(sizeof(T)) + kBM * kLdS * 4 + 2 * kBM * 4;
}

// Pass 1: lse2[b, h, t] = log2 sum_j exp2(s2_ij) over the valid keys of query row i = start + t.
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) row_lse_kernel(ScoreArgs args) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int kLd = tile_ld<T, kD>();
  T* sQ = reinterpret_cast<T*>(smem_raw);                // [kBM][kLd]
  T* sK = sQ + kBM * kLd;                                // [kBN][kLd]
  float* sS = reinterpret_cast<float*>(sK + kBN * kLd);  // [kBM][kLdS]
  float* sKeyOk = sS + kBM * kLdS;                       // [kBN] 1 = real key

  const int b = blockIdx.z, h = blockIdx.y;
  int qstart, qcount;
  span_of(args.qspans, b, args.L, qstart, qcount);
  const int q0 = blockIdx.x * kBM;
  if (q0 >= qcount) return;
  const int L = args.L, d = args.d;
  const T* qbh = static_cast<const T*>(args.q) + (static_cast<int64_t>(b) * args.H + h) * L * d;
  const T* kbh = static_cast<const T*>(args.k) +
                 (static_cast<int64_t>(b) * args.Hkv + h / (args.H / args.Hkv)) * L * d;
  const int rows = min(kBM, qcount - q0);
  load_tile<T, kBM, kD>(sQ, qbh, d, qstart + q0, rows, d, args.vec);

  // Thread pair (2 row, 2 row + 1) shares query row `row`; each takes every other column.
  const int row = threadIdx.x / 2, half = threadIdx.x % 2;
  const int i = qstart + q0 + row;
  float m = -INFINITY, l = 0.f;
  // Causal: no row of this tile sees keys past its last row.
  const int key_end = args.causal ? qstart + q0 + rows : L;
  for (int n0 = 0; n0 < key_end; n0 += kBN) {
    __syncthreads();  // the previous tile's sK / sS readers are done
    load_tile<T, kBN, kD>(sK, kbh, d, n0, min(kBN, L - n0), d, args.vec);
    load_key_flags(sKeyOk, args.kpm, b, L, n0);
    __syncthreads();
    qk_tile<T, kD>(sQ, sK, sS, d);
    __syncthreads();
    float s2[kBN / 2];
    const float tile_max =
        row_logits(sS, sKeyOk, row, half, n0, i, args.causal, args.scale_log2, s2);
    const float m_new = fmaxf(m, tile_max);
    if (m_new != -INFINITY) {  // else nothing valid yet: keep (m, l) = (-inf, 0), avoid inf - inf
      l *= exp2f(m - m_new);
#pragma unroll
      for (int cc = 0; cc < kBN / 2; ++cc) l += exp2f(s2[cc] - m_new);
      m = m_new;
    }
  }
  // Merge the two halves of the row (adjacent lanes).
  const float m_other = __shfl_xor_sync(0xffffffffu, m, 1);
  const float l_other = __shfl_xor_sync(0xffffffffu, l, 1);
  const float m_row = fmaxf(m, m_other);
  float l_row = 0.f;
  if (m_row != -INFINITY) l_row = l * exp2f(m - m_row) + l_other * exp2f(m_other - m_row);
  if (half == 0 && q0 + row < qcount) {
    const int64_t bh = static_cast<int64_t>(b) * args.H + h;
    const int64_t idx = args.lse_by_position ? i : q0 + row;
    args.lse[bh * args.lse_stride + idx] = l_row > 0.f ? m_row + log2f(l_row) : INFINITY;
  }
}

// Pass 2: part[cls, b, h, t] = sum over rows i of class cls of exp2(s2_ij - lse2_i), j = kstart +
// t.
template <typename T, int kD, bool kTwoClass>
__global__ void __launch_bounds__(kThreads) column_sum_kernel(ScoreArgs args) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int kLd = tile_ld<T, kD>();
  T* sQ = reinterpret_cast<T*>(smem_raw);                // [kBM][kLd]
  T* sK = sQ + kBM * kLd;                                // [kBN][kLd]
  float* sS = reinterpret_cast<float*>(sK + kBN * kLd);  // [kBM][kLdS]
  float* sLse = sS + kBM * kLdS;                         // [kBM] lse2 of the tile's rows
  float* sCls = sLse + kBM;                              // [kBM] row class (as float)

  const int b = blockIdx.z, h = blockIdx.y;
  int qstart, qcount, kstart, kcount;
  span_of(args.qspans, b, args.L, qstart, qcount);
  span_of(args.kspans, b, args.L, kstart, kcount);
  const int k0 = blockIdx.x * kBN;
  if (k0 >= kcount) return;
  const int L = args.L, d = args.d;
  const int64_t bh = static_cast<int64_t>(b) * args.H + h;
  const T* qbh = static_cast<const T*>(args.q) + bh * L * d;
  const T* kbh = static_cast<const T*>(args.k) +
                 (static_cast<int64_t>(b) * args.Hkv + h / (args.H / args.Hkv)) * L * d;
  load_tile<T, kBN, kD>(sK, kbh, d, kstart + k0, min(kBN, kcount - k0), d, args.vec);

  // Thread pair shares column `col`; each takes every other row. Acc per class.
  const int col = threadIdx.x / 2, half = threadIdx.x % 2;
  const int j = kstart + k0 + col;
  const bool col_ok = k0 + col < kcount && key_real(args.kpm, b, L, j);
  float acc0 = 0.f, acc1 = 0.f;
  // Causal: rows before the tile's first key see none of its keys; start at that row's tile.
  int t_begin = 0;
  if (args.causal) t_begin = max(0, kstart + k0 - qstart) / kBM * kBM;
  for (int t0 = t_begin; t0 < qcount; t0 += kBM) {
    __syncthreads();  // previous sQ / sS / sLse readers are done
    load_tile<T, kBM, kD>(sQ, qbh, d, qstart + t0, min(kBM, qcount - t0), d, args.vec);
    if (threadIdx.x < kBM) {
      const int t = t0 + threadIdx.x;
      const int i = qstart + t;
      float lse2 = INFINITY;  // padded rows contribute exp2(-inf) = 0
      int cls = 2;
      if (t < qcount) {
        cls = row_class<kTwoClass>(i, kstart, kcount, key_real(args.kpm, b, L, i));
        lse2 = args.lse[bh * args.lse_stride + (args.lse_by_position ? i : t)];
      }
      sLse[threadIdx.x] = cls == 2 ? INFINITY : lse2;
      sCls[threadIdx.x] = static_cast<float>(cls);
    }
    __syncthreads();
    qk_tile<T, kD>(sQ, sK, sS, d);
    __syncthreads();
    if (col_ok) {
#pragma unroll 8
      for (int rr = 0; rr < kBM / 2; ++rr) {
        const int r = 2 * rr + half;
        const int i = qstart + t0 + r;
        float p = exp2f(sS[r * kLdS + col] * args.scale_log2 - sLse[r]);
        if (args.causal && j > i) p = 0.f;
        if (kTwoClass && sCls[r] != 0.f) {
          acc1 += p;  // class 2 rows have lse = +inf, so p = 0
        } else {
          acc0 += p;
        }
      }
    }
  }
  acc0 += __shfl_xor_sync(0xffffffffu, acc0, 1);
  acc1 += __shfl_xor_sync(0xffffffffu, acc1, 1);
  if (half == 0 && k0 + col < kcount) {
    const int64_t per_class = static_cast<int64_t>(args.B) * args.H * args.Km;
    args.part[bh * args.Km + k0 + col] = acc0;
    if (kTwoClass) args.part[per_class + bh * args.Km + k0 + col] = acc1;
  }
}

// Query count 1 in every batch row (CLIP's [CLS], FastV's last token): two launches over all keys
// in parallel instead of a 64-row MMA tile that would be 63/64 padding.
//   single_query_logits_kernel  grid (L / 64, H, B), a thread per key: s2_j = q . k_j (log2 domain,
//                               -inf where masked) kept for the key span in part[b, h, t], and the
//                               chunk's (max, sum exp2) in ws[b, h, 2 c .. 2 c + 1]
//   single_query_finish_kernel  grid (Km / 256, B): each head's lse from its chunks, then
//                               score[t] = sum_h exp2(s2 - lse_h) / H
constexpr int kSingleKeys = 64;  // keys (threads) per block of the logits kernel
constexpr int kSingleMaxHeads = 4096;

__host__ __device__ constexpr int single_query_chunks(int L) {
  return (L + kSingleKeys - 1) / kSingleKeys;
}

template <typename T, int kD>
__global__ void __launch_bounds__(kSingleKeys) single_query_logits_kernel(ScoreArgs args) {
  __shared__ float sq[kD];  // the query row times scale * log2(e)
  __shared__ float s_red[kSingleKeys / kWarpSize];
  const int b = blockIdx.z, h = blockIdx.y;
  const int L = args.L, d = args.d;
  int qstart, qcount, kstart, kcount;
  span_of(args.qspans, b, L, qstart, qcount);
  span_of(args.kspans, b, L, kstart, kcount);
  const int i = qstart;
  const int64_t bh = static_cast<int64_t>(b) * args.H + h;
  const T* qrow = static_cast<const T*>(args.q) + (bh * L + i) * d;
  const T* kbh = static_cast<const T*>(args.k) +
                 (static_cast<int64_t>(b) * args.Hkv + h / (args.H / args.Hkv)) * L * d;
  for (int c = threadIdx.x; c < kD; c += kSingleKeys) {
    sq[c] = c < d ? to_float(qrow[c]) * args.scale_log2 : 0.f;
  }
  __syncthreads();
  const int j = blockIdx.x * kSingleKeys + threadIdx.x;
  const int key_end = args.causal ? i + 1 : L;
  float s2 = -INFINITY;
  if (j < key_end && key_real(args.kpm, b, L, j)) {
    const T* krow = kbh + static_cast<int64_t>(j) * d;
    float acc = 0.f;
    if (args.vec) {
      // 16-byte loads, 8 in flight per round; columns past d are never read (d % vec == 0).
      constexpr int kVec = 16 / sizeof(T);
      for (int c0 = 0; c0 < d; c0 += 8 * kVec) {
        uint4 raw[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int c = c0 + u * kVec;
          raw[u] = c < d ? *reinterpret_cast<const uint4*>(krow + c) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const T* parts = reinterpret_cast<const T*>(&raw[u]);
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const int c = c0 + u * kVec + e;
            if (c < kD) acc = fmaf(sq[c], to_float(parts[e]), acc);  // sq is 0 past d
          }
        }
      }
    } else {
      for (int c = 0; c < d; ++c) acc = fmaf(sq[c], to_float(krow[c]), acc);
    }
    s2 = acc;
  }
  const int t = j - kstart;
  if (t >= 0 && t < kcount) args.part[bh * args.Km + t] = s2;
  // The chunk's max, then its sum of exp2(s2 - max): warp shuffles, then the block's two warps.
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  float m = s2;
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2)
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  if (lane == 0) s_red[warp] = m;
  __syncthreads();
  m = s_red[0];
#pragma unroll
  for (int w = 1; w < kSingleKeys / kWarpSize; ++w) m = fmaxf(m, s_red[w]);
  __syncthreads();
  float l = m == -INFINITY ? 0.f : exp2f(s2 - m);
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) l += __shfl_xor_sync(0xffffffffu, l, off);
  if (lane == 0) s_red[warp] = l;
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kSingleKeys / kWarpSize; ++w) sum += s_red[w];
    args.lse[bh * args.lse_stride + 2 * blockIdx.x] = m;
    args.lse[bh * args.lse_stride + 2 * blockIdx.x + 1] = sum;
  }
}

template <int kThreadsPerBlock>
__global__ void __launch_bounds__(kThreadsPerBlock)
    single_query_finish_kernel(ScoreArgs args, float* __restrict__ out) {
  extern __shared__ float s_lse[];  // [H] lse2 of each head's row
  const int b = blockIdx.y;
  const int chunks = single_query_chunks(args.L);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  constexpr int kWarps = kThreadsPerBlock / kWarpSize;
  // A warp per head: combine the chunks' (max, sum) in a fixed order (lane-strided, then a fixed
  // butterfly), so reruns are bit-identical.
  for (int h = warp; h < args.H; h += kWarps) {
    const float* ws = args.lse + (static_cast<int64_t>(b) * args.H + h) * args.lse_stride;
    float m = -INFINITY;
    for (int c = lane; c < chunks; c += kWarpSize) m = fmaxf(m, ws[2 * c]);
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off /= 2)
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float l = 0.f;
    if (m != -INFINITY) {
      for (int c = lane; c < chunks; c += kWarpSize) {
        const float mc = ws[2 * c];
        if (mc != -INFINITY) l += ws[2 * c + 1] * exp2f(mc - m);
      }
    }
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off /= 2) l += __shfl_xor_sync(0xffffffffu, l, off);
    if (lane == 0) s_lse[h] = l > 0.f ? m + log2f(l) : INFINITY;
  }
  __syncthreads();
  const int t = blockIdx.x * kThreadsPerBlock + threadIdx.x;
  if (t >= args.Km) return;
  int kstart, kcount;
  span_of(args.kspans, b, args.L, kstart, kcount);
  float score = 0.f;
  if (t < kcount) {
    for (int h = 0; h < args.H; ++h) {
      // exp2(-inf - lse) = 0 for masked keys; exp2(x - inf) = 0 for a head without valid keys.
      score += exp2f(args.part[(static_cast<int64_t>(b) * args.H + h) * args.Km + t] - s_lse[h]);
    }
    score /= static_cast<float>(args.H);  // one query per row: the mean over the span is the value
  }
  out[static_cast<int64_t>(b) * args.Km + t] = score;
}

// score[b, t] from the partials. Mode 0 (attention): sum_h part / (H * qcount). Mode 1 (lowrank,
// H = 1): (part0 / n_visual) * (part1 / n_text), or part0 / n_visual alone when the row has no
// text token (S_T2V = 1, the neutral factor of docs/ops.md#lowrank_scores). Zero past each row's
// key count.
constexpr int kFinalizeThreads = 256;

template <int kMode>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(ScoreArgs args, float* __restrict__ out) {
  const int b = blockIdx.y;
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  int qstart, qcount, kstart, kcount;
  span_of(args.qspans, b, args.L, qstart, qcount);
  span_of(args.kspans, b, args.L, kstart, kcount);
  int n_text = 0;
  if (kMode == 1) {
    // Text rows = real rows outside the visual span; every block of the row counts them (L bytes).
    __shared__ int warp_counts[kFinalizeThreads / kWarpSize];
    int local = 0;
    for (int i = threadIdx.x; i < args.L; i += blockDim.x) {
      local += (i < kstart || i >= kstart + kcount) && key_real(args.kpm, b, args.L, i);
    }
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off /= 2)
      local += __shfl_xor_sync(0xffffffffu, local, off);
    if (threadIdx.x % kWarpSize == 0) warp_counts[threadIdx.x / kWarpSize] = local;
    __syncthreads();
    for (int w = 0; w < kFinalizeThreads / kWarpSize; ++w) n_text += warp_counts[w];
  }
  if (t >= args.Km) return;
  float score = 0.f;
  if (t < kcount) {
    const int64_t per_class = static_cast<int64_t>(args.B) * args.H * args.Km;
    if (kMode == 0) {
      float sum = 0.f;
      for (int h = 0; h < args.H; ++h)
        sum += args.part[(static_cast<int64_t>(b) * args.H + h) * args.Km + t];
      score = sum / (static_cast<float>(args.H) * static_cast<float>(qcount));
    } else {
      const float v2v =
          args.part[static_cast<int64_t>(b) * args.Km + t] / static_cast<float>(kcount);
      const float t2v = n_text > 0 ? args.part[per_class + static_cast<int64_t>(b) * args.Km + t] /
                                         static_cast<float>(n_text)
                                   : 1.f;
      score = v2v * t2v;
    }
  }
  out[static_cast<int64_t>(b) * args.Km + t] = score;
}

}  // namespace attn
}  // namespace vtprune
