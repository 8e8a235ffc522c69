// attention_with_scores (docs/ops.md#attention_scores, second form): the layer's attention output
// and the column scores. The flash-attention forward below writes out [B, H, L, dv] and the row
// log-sum-exp of every row ([B, H, L], log2 domain); the scores are then pass 2 and the finish of
// attention_scores.cuh reading that lse by position, so pass 1 costs nothing extra.
//
// One block per (64-row query tile, h, b); per key tile: S = Q K^T (tensor cores for 16-bit
// inputs), online softmax on thread pairs per row, O = O * alpha + P V. O lives in shared memory
// as fp32 because WMMA accumulators cannot be rescaled row by row in registers.
#pragma once

#include <cmath>
#include <cstdint>

#include "vtprune/attention_scores.cuh"
#include "vtprune/attention_tiles.cuh"

namespace vtprune {
namespace attn {

struct FlashArgs {
  const void* q;    // [B, H, L, d]
  const void* k;    // [B, Hkv, L, d]
  const void* v;    // [B, Hkv, L, dv]
  const bool* kpm;  // [B, L] or null
  void* out;        // [B, H, L, dv], q's dtype
  float* lse;       // [B, H, L] log2 domain, +inf for a row without valid keys
  int H, Hkv, L, d, dv;
  float scale_log2;
  bool causal;
  bool vec_qk, vec_v;  // 16-byte loads possible for q/k rows, v rows
};

template <typename T, int kD>
constexpr int flash_smem_bytes() {
  // sQ, sK, sV tiles; sS (fp32 P aliases it); 16-bit P tile; sO; alpha and key flags.
  constexpr int p_bytes = std::is_same_v<T, float> ? 0 : kBM * p_ld<T>() * 2;
  return 3 * kBM * tile_ld<T, kD>() * static_cast<int>(sizeof(T)) + kBM * kLdS * 4 + p_bytes +
         kBM * o_ld<kD>() * 4 + 2 * kBM * 4;
}

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) flash_forward_kernel(FlashArgs args) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int kLd = tile_ld<T, kD>();
  constexpr int kLdO = o_ld<kD>();
  constexpr int kLdP = p_ld<T>();
  T* sQ = reinterpret_cast<T*>(smem_raw);                // [kBM][kLd]
  T* sK = sQ + kBM * kLd;                                // [kBN][kLd]
  T* sV = sK + kBN * kLd;                                // [kBN][kLd]
  float* sS = reinterpret_cast<float*>(sV + kBN * kLd);  // [kBM][kLdS]
  float* sO = sS + kBM * kLdS;                           // [kBM][kLdO]
  float* sAlpha = sO + kBM * kLdO;                       // [kBM] rescale of each O row
  float* sKeyOk = sAlpha + kBM;                          // [kBN]
  T* sP;                                                 // [kBM][kLdP]
  if constexpr (std::is_same_v<T, float>) {
    sP = sS;  // in place: each thread overwrites exactly the S entries it read
  } else {
    sP = reinterpret_cast<T*>(sKeyOk + kBN);
  }

  const int b = blockIdx.z, h = blockIdx.y;
  const int q0 = blockIdx.x * kBM;
  const int L = args.L, d = args.d, dv = args.dv;
  const int64_t bh = static_cast<int64_t>(b) * args.H + h;
  const int64_t bkv = static_cast<int64_t>(b) * args.Hkv + h / (args.H / args.Hkv);
  const T* qbh = static_cast<const T*>(args.q) + bh * L * d;
  const T* kbh = static_cast<const T*>(args.k) + bkv * L * d;
  const T* vbh = static_cast<const T*>(args.v) + bkv * L * dv;
  const int rows = min(kBM, L - q0);
  load_tile<T, kBM, kD>(sQ, qbh, d, q0, rows, d, args.vec_qk);
  for (int idx = threadIdx.x; idx < kBM * kLdO; idx += blockDim.x) sO[idx] = 0.f;

  const int row = threadIdx.x / 2, half = threadIdx.x % 2;
  const int i = q0 + row;
  float m = -INFINITY, l = 0.f;
  const int key_end = args.causal ? q0 + rows : L;
  for (int n0 = 0; n0 < key_end; n0 += kBN) {
    __syncthreads();  // the previous tile's readers of sK, sV, sP are done
    const int keys = min(kBN, L - n0);
    load_tile<T, kBN, kD>(sK, kbh, d, n0, keys, d, args.vec_qk);
    load_tile<T, kBN, kD>(sV, vbh, dv, n0, keys, dv, args.vec_v);
    load_key_flags(sKeyOk, args.kpm, b, L, n0);
    __syncthreads();
    qk_tile<T, kD>(sQ, sK, sS, d);
    __syncthreads();
    float s2[kBN / 2];
    float tile_max = row_logits(sS, sKeyOk, row, half, n0, i, args.causal, args.scale_log2, s2);
    // Both halves of a row must use the same running max, since they share O's row.
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float m_new = fmaxf(m, tile_max);
    const float alpha = m_new == -INFINITY ? 1.f : exp2f(m - m_new);
    float lsum = 0.f;
#pragma unroll
    for (int cc = 0; cc < kBN / 2; ++cc) {
      // fp32 P: written over the S entries this thread just read (same thread, no race).
      const float p = m_new == -INFINITY ? 0.f : exp2f(s2[cc] - m_new);
      lsum += p;  // unrounded, so the lse that the scores reuse is the fp32 one
      sP[row * kLdP + 2 * cc + half] = from_float<T>(p);
    }
    l = l * alpha + lsum;
    m = m_new;
    if (half == 0) sAlpha[row] = alpha;
    __syncthreads();
    pv_tile<T, kD>(sO, sP, sV, sAlpha, dv);
  }
  __syncthreads();
  const float l_row = l + __shfl_xor_sync(0xffffffffu, l, 1);
  if (half == 0) {
    sAlpha[row] = l_row > 0.f ? 1.f / l_row : 0.f;  // a row without valid keys outputs zeros
    if (i < L) args.lse[bh * L + i] = l_row > 0.f ? m + log2f(l_row) : INFINITY;
  }
  __syncthreads();
  T* obh = static_cast<T*>(args.out) + bh * L * dv;
  for (int idx = threadIdx.x; idx < rows * dv; idx += blockDim.x) {
    const int r = idx / dv, c = idx % dv;
    obh[static_cast<int64_t>(q0 + r) * dv + c] = from_float<T>(sO[r * kLdO + c] * sAlpha[r]);
  }
}

}  // namespace attn
}  // namespace vtprune
