// Tensor-core passes of attention_scores / attention_with_scores for fp16 / bf16 inputs whose rows
// are 16-byte aligned (head dim a multiple of 8): the same math as attention_scores.cuh and
// attention_with_scores.cuh, restructured for sm_80..sm_90:
//
//   * mma.sync m16n8k16 (16-bit operands, fp32 accumulate) with the S tile in registers: warp w
//     owns query rows [16w, 16w + 16) of a 64-row tile; a thread holds rows g = lane / 4 and g + 8,
//     columns 2 (lane % 4) + {0, 1} of each 8-key slice. Operands come from shared memory through
//     ldmatrix (K as the col-major B operand, V through ldmatrix.trans).
//   * cp.async double buffering: the next key (or query) tile streams into shared memory while the
//     current one is multiplied; tiles stay 16-bit in shared memory (rows padded by 16 bytes, so
//     ldmatrix's eight row addresses fall in distinct banks).
//   * masks only where needed: a tile is masked element by element only when it crosses the
//     causal diagonal of the warp's rows, runs past L, or a padding mask is given.
//   * row statistics: the max is reduced over the 4 lanes of a row (two shuffles) per tile, the sum
//     stays per lane until the end; column sums stay in registers across all query tiles and are
//     reduced across lanes and warps once, in a fixed order (deterministic, no atomics).
//
// fp32 inputs, unaligned rows and (for the forward) head dims above 128 keep the kernels of
// attention_scores.cuh / attention_with_scores.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "vtprune/attention_scores.cuh"
#include "vtprune/attention_tiles.cuh"

namespace vtprune {
namespace attn {

constexpr int kStages = 2;  // cp.async buffers of the streamed tile

// ----------------------------------------------------------------------- PTX wrappers

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; `valid` false writes 16 zero bytes (src-size 0).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c += a (16x16, row-major) . b (16x8, col-major), fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                         unsigned b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats rounded to T and packed (x in the low half), the register form of an A fragment.
template <typename T>
__device__ __forceinline__ unsigned pack2(float x, float y) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<const unsigned*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(x, y);
    return *reinterpret_cast<const unsigned*>(&v);
  }
}

// ----------------------------------------------------------------------- tiles

// Async copy of smem[kRows][tile_ld] <- rows first_row + r (r < valid_rows), columns [0, cols) of
// a row-major [*, row_stride] 16-bit matrix; missing rows and columns cols..kD are zero-filled.
// Needs cols % 8 == 0, row_stride % 8 == 0 and a 16-byte aligned base (the launcher's `vec`).
template <typename T, int kRows, int kD>
__device__ __forceinline__ void cp_tile(T* smem, const T* __restrict__ base, int64_t row_stride,
                                        int64_t first_row, int valid_rows, int cols) {
  constexpr int kLd = tile_ld<T, kD>();
  constexpr int kChunks = kD / 8;  // 16-byte chunks per row
#pragma unroll
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
    const int r = idx / kChunks;
    const int c = (idx % kChunks) * 8;
    const bool ok = r < valid_rows && c < cols;
    cp_async16(smem + r * kLd + c, ok ? base + (first_row + r) * row_stride + c : base, ok);
  }
}

// acc[nt][*] += A (16 x 16, the warp's ldmatrix row address a_row) . B (16 x 64). B from shared
// memory as 4 ldmatrix x4 loads of two 8-column slices each, `np_stride` elements apart: kTransB
// false for B stored [n][k] (keys as rows), true for B stored [k][n] (ldmatrix.trans).
template <typename T, bool kTransB>
__device__ __forceinline__ void mma_16x64(float (&acc)[8][4], const T* a_row, const T* b_row,
                                          int np_stride) {
  unsigned a[4];
  ldmatrix_x4(a, a_row);
#pragma unroll
  for (int np = 0; np < 4; ++np) {
    unsigned b[4];
    if constexpr (kTransB) {
      ldmatrix_x4_trans(b, b_row + np * np_stride);
    } else {
      ldmatrix_x4(b, b_row + np * np_stride);
    }
    mma16816<T>(acc[2 * np], a, b[0], b[1]);
    mma16816<T>(acc[2 * np + 1], a, b[2], b[3]);
  }
}

// s[nt][*] = the warp's 16 rows of sA . (64 rows of sB)^T over the first `steps` 16-wide k slices.
// sA points at the warp's first row; both tiles are [rows][tile_ld] 16-bit.
template <typename T, int kD>
__device__ __forceinline__ void qk_warp(const T* sA, const T* sB, int steps, float (&s)[8][4]) {
  constexpr int kLd = tile_ld<T, kD>();
  const int lane = threadIdx.x % kWarpSize;
  // ldmatrix row addresses: A rows lane % 16, k half lane / 16; B (keys as rows) n = lane % 8 +
  // 8 (lane / 16), k half (lane / 8) % 2, giving b0 b1 of two 8-key slices per x4 load.
  const T* a_row = sA + (lane % 16) * kLd + (lane / 16) * 8;
  const T* b_row = sB + (lane % 8 + 8 * (lane / 16)) * kLd + ((lane / 8) % 2) * 8;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    if (kk >= steps) break;  // a head dim of 80 in a 128 tile runs 5 slices, not 8
    mma_16x64<T, false>(s, a_row + kk * 16, b_row + kk * 16, 16 * kLd);
  }
}

// ----------------------------------------------------------------------- row pass (+ forward)

// Pass 1 of attention_scores (kWithV false) or the flash forward of attention_with_scores (true).
struct RowPassArgs {
  const void* q;          // [B, H, L, d]
  const void* k;          // [B, Hkv, L, d]
  const void* v;          // [B, Hkv, L, dv] (kWithV)
  const int64_t* qspans;  // [B, 2], or null: every row of the sequence
  const bool* kpm;        // [B, L] (true = real token) or null
  void* out;              // [B, H, L, dv] in T (kWithV)
  float* lse;             // log2 domain, +inf for a row without valid keys
  int H, Hkv, L, d, dv;
  int64_t lse_stride;    // per (b, h): Qm (span-indexed) or L (position-indexed)
  bool lse_by_position;  // index lse by the row position i, else by its rank in the span
  float scale_log2;
  bool causal;
};

template <typename T, int kD, bool kWithV>
constexpr int row_pass_smem_bytes() {
  return (1 + kStages * (kWithV ? 2 : 1)) * kBM * tile_ld<T, kD>() * 2 + kStages * kBN;
}

template <typename T, int kD, bool kWithV>
__global__ void __launch_bounds__(kThreads) row_pass_mma_kernel(RowPassArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int kLd = tile_ld<T, kD>();
  constexpr int kTile = kBM * kLd;
  constexpr int kNo = kWithV ? kD / 8 : 1;  // 8-wide output slices a thread accumulates
  T* sQ = reinterpret_cast<T*>(smem_raw);   // [kBM][kLd]
  T* sK = sQ + kTile;                       // [kStages][kBN][kLd]
  T* sV = sK + kStages * kTile;             // [kStages][kBN][kLd] (kWithV)
  unsigned char* sOk = reinterpret_cast<unsigned char*>(sV + (kWithV ? kStages * kTile : 0));

  const int b = blockIdx.z, h = blockIdx.y;
  const int L = a.L, d = a.d, dv = a.dv;
  int qstart, qcount;
  span_of(a.qspans, b, L, qstart, qcount);
  const int q0 = blockIdx.x * kBM;
  if (q0 >= qcount) return;
  const int64_t bh = static_cast<int64_t>(b) * a.H + h;
  const int64_t bkv = static_cast<int64_t>(b) * a.Hkv + h / (a.H / a.Hkv);
  const T* qbh = static_cast<const T*>(a.q) + bh * L * d;
  const T* kbh = static_cast<const T*>(a.k) + bkv * L * d;
  const T* vbh = kWithV ? static_cast<const T*>(a.v) + bkv * L * dv : nullptr;
  const int rows = min(kBM, qcount - q0);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, tq = lane % 4;
  const int row_first = qstart + q0 + warp * 16;  // position of the warp's first row
  // Causal: no row of this tile sees keys past its last row.
  const int key_end = a.causal ? qstart + q0 + rows : L;
  const int ntiles = (key_end + kBN - 1) / kBN;

  auto issue = [&](int it) {
    const int n0 = it * kBN, st = it % kStages;
    const int keys = min(kBN, L - n0);
    cp_tile<T, kBN, kD>(sK + st * kTile, kbh, d, n0, keys, d);
    if constexpr (kWithV) cp_tile<T, kBN, kD>(sV + st * kTile, vbh, dv, n0, keys, dv);
    if (threadIdx.x < kBN) {
      const int j = n0 + threadIdx.x;
      sOk[st * kBN + threadIdx.x] = j < L && key_real(a.kpm, b, L, j);
    }
  };
  cp_tile<T, kBM, kD>(sQ, qbh, d, qstart + q0, rows, d);
  issue(0);
  cp_async_commit();

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[kNo][4];
#pragma unroll
  for (int n = 0; n < kNo; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[n][e] = 0.f;
  const int steps = (d + 15) / 16;
  for (int it = 0; it < ntiles; ++it) {
    if (it + 1 < ntiles) issue(it + 1);
    cp_async_commit();  // possibly empty: keeps "all but the newest group" = this tile
    cp_async_wait<1>();
    __syncthreads();
    const int st = it % kStages, n0 = it * kBN;
    float s[8][4];
    qk_warp<T, kD>(sQ + warp * 16 * kLd, sK + st * kTile, steps, s);
    // Element masks only on tiles that need them (diagonal, ragged end, padding mask).
    const bool masked = a.kpm != nullptr || n0 + kBN > L || (a.causal && n0 + kBN - 1 > row_first);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * a.scale_log2;
        if (masked) {
          const int c = nt * 8 + 2 * tq + (e & 1);
          const int i = row_first + g + 8 * (e >> 1);
          if (!sOk[st * kBN + c] || (a.causal && n0 + c > i)) x = -INFINITY;
        }
        s[nt][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    float alpha[2], m_new[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      m_new[r] = fmaxf(m[r], mx[r]);
      // Nothing valid yet: keep (m, l) = (-inf, 0) and p = 0, avoiding inf - inf.
      alpha[r] = m_new[r] == -INFINITY ? 1.f : exp2f(m[r] - m_new[r]);
    }
    float lsum[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const float p = m_new[r] == -INFINITY ? 0.f : exp2f(s[nt][e] - m_new[r]);
        lsum[r] += p;  // unrounded: the lse the scores reuse is the fp32 one
        s[nt][e] = p;
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[r] = l[r] * alpha[r] + lsum[r];
      m[r] = m_new[r];
    }
    if constexpr (kWithV) {
#pragma unroll
      for (int n = 0; n < kNo; ++n) {
        o[n][0] *= alpha[0];
        o[n][1] *= alpha[0];
        o[n][2] *= alpha[1];
        o[n][3] *= alpha[1];
      }
      const T* sVst = sV + st * kTile;
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        // The S accumulators of two 8-key slices are exactly the A fragment of a 16-key slice.
        const unsigned pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]),
                                pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
        const T* v_row = sVst + (kk * 16 + lane % 16) * kLd + (lane / 16) * 8;
#pragma unroll
        for (int np = 0; np < kNo / 2; ++np) {
          if (np * 16 >= dv) break;
          unsigned vb[4];
          ldmatrix_x4_trans(vb, v_row + np * 16);
          mma16816<T>(o[2 * np], pa, vb[0], vb[1]);
          mma16816<T>(o[2 * np + 1], pa, vb[2], vb[3]);
        }
      }
    }
    __syncthreads();  // this stage's readers are done before the next issue overwrites it
  }
  cp_async_wait<0>();  // only empty groups remain; leave nothing in flight
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int t = q0 + warp * 16 + g + 8 * r;  // rank of the row in the span
    if (t >= qcount) continue;
    const int i = qstart + t;
    if (tq == 0) {
      const int64_t idx = a.lse_by_position ? i : t;
      a.lse[bh * a.lse_stride + idx] = l[r] > 0.f ? m[r] + log2f(l[r]) : INFINITY;
    }
    if constexpr (kWithV) {
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;  // a row without valid keys outputs zeros
      T* orow = static_cast<T*>(a.out) + (bh * L + i) * dv;
#pragma unroll
      for (int n = 0; n < kNo; ++n) {
        const int c = n * 8 + 2 * tq;
        if (c < dv) orow[c] = from_float<T>(o[n][2 * r] * inv);
        if (c + 1 < dv) orow[c + 1] = from_float<T>(o[n][2 * r + 1] * inv);
      }
    }
  }
}

// ----------------------------------------------------------------------- column pass

template <typename T, int kD>
constexpr int column_pass_smem_bytes() {
  return (1 + kStages) * kBM * tile_ld<T, kD>() * 2 + (kThreads / kWarpSize) * kBN * 4;
}

// Pass 2 (one row class): part[b, h, t] = sum over the query span's rows i of exp2(s2_ij - lse2_i),
// j = kstart + t. The key tile stays resident; query tiles stream through cp.async buffers.
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) column_sum_mma_kernel(ScoreArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int kLd = tile_ld<T, kD>();
  constexpr int kTile = kBM * kLd;
  constexpr int kWarps = kThreads / kWarpSize;
  T* sK = reinterpret_cast<T*>(smem_raw);                        // [kBN][kLd]
  T* sQ = sK + kTile;                                            // [kStages][kBM][kLd]
  float* sRed = reinterpret_cast<float*>(sQ + kStages * kTile);  // [kWarps][kBN]

  const int b = blockIdx.z, h = blockIdx.y;
  const int L = a.L, d = a.d;
  int qstart, qcount, kstart, kcount;
  span_of(a.qspans, b, L, qstart, qcount);
  span_of(a.kspans, b, L, kstart, kcount);
  const int k0 = blockIdx.x * kBN;
  if (k0 >= kcount) return;
  const int64_t bh = static_cast<int64_t>(b) * a.H + h;
  const T* qbh = static_cast<const T*>(a.q) + bh * L * d;
  const T* kbh =
      static_cast<const T*>(a.k) + (static_cast<int64_t>(b) * a.Hkv + h / (a.H / a.Hkv)) * L * d;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, tq = lane % 4;
  const int j_first = kstart + k0;  // position of the tile's first key
  // Causal: rows before the tile's first key see none of its keys; start at that row's tile.
  const int t_begin = a.causal ? max(0, j_first - qstart) / kBM * kBM : 0;
  const int ntiles = qcount > t_begin ? (qcount - t_begin + kBM - 1) / kBM : 0;

  auto issue = [&](int it) {
    const int t0 = t_begin + it * kBM;
    cp_tile<T, kBM, kD>(sQ + (it % kStages) * kTile, qbh, d, qstart + t0, min(kBM, qcount - t0), d);
  };
  cp_tile<T, kBN, kD>(sK, kbh, d, j_first, min(kBN, kcount - k0), d);
  if (ntiles > 0) issue(0);
  cp_async_commit();

  float acc[8][2];
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) acc[nt][0] = acc[nt][1] = 0.f;
  const int steps = (d + 15) / 16;
  for (int it = 0; it < ntiles; ++it) {
    if (it + 1 < ntiles) issue(it + 1);
    cp_async_commit();
    const int t0 = t_begin + it * kBM;
    const int row_first = qstart + t0 + warp * 16;
    float lse2[2];  // loaded before the wait so the latency overlaps the copy
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int t = t0 + warp * 16 + g + 8 * r;
      lse2[r] = t < qcount ? a.lse[bh * a.lse_stride + (a.lse_by_position ? qstart + t : t)]
                           : INFINITY;  // padded rows contribute exp2(-inf) = 0
    }
    cp_async_wait<1>();
    __syncthreads();
    float s[8][4];
    qk_warp<T, kD>(sQ + (it % kStages) * kTile + warp * 16 * kLd, sK, steps, s);
    const bool diagonal = a.causal && j_first + kBN - 1 > row_first;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float p = exp2f(s[nt][e] * a.scale_log2 - lse2[e >> 1]);
        if (diagonal && j_first + nt * 8 + 2 * tq + (e & 1) > row_first + g + 8 * (e >> 1)) p = 0.f;
        acc[nt][e & 1] += p;
      }
    __syncthreads();
  }
  cp_async_wait<0>();  // the key tile when no query tile ran
  // Sum the 8 row groups of the warp (lanes with equal lane % 4), then the warps, in fixed order.
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      float v = acc[nt][c];
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      v += __shfl_xor_sync(0xffffffffu, v, 8);
      v += __shfl_xor_sync(0xffffffffu, v, 16);
      if (g == 0) sRed[warp * kBN + nt * 8 + 2 * tq + c] = v;
    }
  __syncthreads();
  if (threadIdx.x < kBN && k0 + static_cast<int>(threadIdx.x) < kcount) {
    const int c = threadIdx.x;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += sRed[w * kBN + c];
    // Padding keys: their sums may be anything (even inf), so select rather than multiply.
    a.part[bh * a.Km + k0 + c] = key_real(a.kpm, b, L, j_first + c) ? sum : 0.f;
  }
}

}  // namespace attn
}  // namespace vtprune
