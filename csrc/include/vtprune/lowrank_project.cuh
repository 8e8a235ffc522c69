// The projections of lowrank_scores (docs/ops.md#lowrank_scores): a = h U, b = h V for 16-bit h, U,
// V, on the tensor cores with fp32 accumulation and fp32 outputs. Products of two 16-bit values are
// exact in fp32, so this matches the reference's `h.float() @ U.float()` up to the order of the
// fp32 sums.
//
// One CTA per (64 rows of h, 64 columns of [U | V]): 4 warps, warp w owns rows [16w, 16w + 16);
// the D dimension streams in 64-wide slices through cp.async double buffers (h slice [64][64] and
// the matching [64][64] slice of [U | V], taken from U or V per 16-byte chunk, so the glue never
// concatenates them). mma.sync m16n8k16 with A from ldmatrix and B (row-major [k][n]) from
// ldmatrix.trans.
#pragma once

#include <cstdint>

#include "vtprune/attention_mma.cuh"

namespace vtprune {
namespace attn {

struct ProjectArgs {
  const void* h;  // [M, D] rows of h (M = B * L), 16-bit, contiguous
  const void* u;  // [D, R], h's dtype, contiguous
  const void* v;  // [D, R]
  float* a;       // [M, R] = h U
  float* b;       // [M, R] = h V
  int M, D, R;    // D % 8 == 0, R % 8 == 0, 16-byte aligned bases (checked by the launcher)
};

constexpr int kProjK = 64;  // D slice per pipeline stage

template <typename T>
constexpr int project_smem_bytes() {
  return kStages * 2 * kBM * tile_ld<T, kProjK>() * 2;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lowrank_project_kernel(ProjectArgs p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int kLd = tile_ld<T, kProjK>();
  constexpr int kTile = kBM * kLd;
  T* sH = reinterpret_cast<T*>(smem_raw);  // [kStages][kBM rows][kProjK]
  T* sW = sH + kStages * kTile;            // [kStages][kProjK][64 columns]
  const int m0 = blockIdx.x * kBM;
  const int n0 = blockIdx.y * 64;  // column of [U | V], in [0, 2R)
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, tq = lane % 4;
  const T* h = static_cast<const T*>(p.h);
  const T* u = static_cast<const T*>(p.u);
  const T* v = static_cast<const T*>(p.v);
  const int slices = (p.D + kProjK - 1) / kProjK;

  // cp_tile reads columns [0, cols) from its base: point it at column k0 of h.
  auto issue_h = [&](int it) {
    const int k0 = it * kProjK, st = it % kStages;
    cp_tile<T, kBM, kProjK>(sH + st * kTile, h + k0, p.D, m0, min(kBM, p.M - m0),
                            min(kProjK, p.D - k0));
  };
  // [U | V] slice [kProjK][64]: a thread copies one 16-byte column chunk of 4 rows; the chunk's
  // column (and so its source, U or V: R % 8 == 0, no chunk straddles them) is fixed per thread.
  const int wc = (threadIdx.x % 8) * 8;
  const int wn = n0 + wc;
  const bool wcol_ok = wn < 2 * p.R;
  const T* wcol = wn < p.R ? u + wn : v + (wn - p.R);
  auto issue_w = [&](int it) {
    const int k0 = it * kProjK, st = it % kStages;
#pragma unroll
    for (int j = 0; j < kProjK * 8 / kThreads; ++j) {
      const int r = threadIdx.x / 8 + j * (kThreads / 8);
      const bool ok = wcol_ok && k0 + r < p.D;
      cp_async16(sW + st * kTile + r * kLd + wc, ok ? wcol + static_cast<int64_t>(k0 + r) * p.R : u,
                 ok);
    }
  };
  issue_h(0);
  issue_w(0);
  cp_async_commit();

  float acc[8][4];
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
  for (int it = 0; it < slices; ++it) {
    if (it + 1 < slices) {
      issue_h(it + 1);
      issue_w(it + 1);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* a_row = sH + (it % kStages) * kTile + (warp * 16 + lane % 16) * kLd + (lane / 16) * 8;
    const T* w_row = sW + (it % kStages) * kTile + (lane % 16) * kLd + (lane / 16) * 8;
#pragma unroll
    for (int kk = 0; kk < kProjK / 16; ++kk) {
      mma_16x64<T, true>(acc, a_row + kk * 16, w_row + kk * 16 * kLd, 16);
    }
    __syncthreads();
  }
  cp_async_wait<0>();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int m = m0 + warp * 16 + g + 8 * r;
    if (m >= p.M) continue;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int n = n0 + nt * 8 + 2 * tq + c;
        if (n >= 2 * p.R) continue;
        float* dst = n < p.R ? p.a + static_cast<int64_t>(m) * p.R + n
                             : p.b + static_cast<int64_t>(m) * p.R + (n - p.R);
        *dst = acc[nt][2 * r + c];
      }
  }
}

}  // namespace attn
}  // namespace vtprune
