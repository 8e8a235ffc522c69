// Shared-memory tile machinery of the attention kernels (attention_scores, attention_with_scores,
// lowrank_scores): 64 x 64 tiles, 4 warps, head dimension padded to a compile-time kD.
//
// Products of two tiles run on the tensor cores (WMMA 16x16x16, fp32 accumulate) for fp16/bf16
// inputs and on the FMA units for fp32 inputs (bit-for-bit fp32 products, as the fp32 tolerance
// needs; tf32 would be 3e-4 relative). Results land in a float tile in shared memory, because the
// softmax and masking steps need the (row, column) of every element and a WMMA accumulator's
// element layout is unspecified.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "vtprune/common.cuh"

namespace vtprune {
namespace attn {

constexpr int kBM = 64;        // query rows per tile
constexpr int kBN = 64;        // keys per tile
constexpr int kThreads = 128;  // 4 warps; in the WMMA path warp w owns query rows [16w, 16w + 16)
constexpr int kLdS = kBN + 4;  // float S tile row stride (WMMA stores need a multiple of 4 floats)
constexpr float kLog2e = 1.4426950408889634f;

// Row padding of a T tile. fp16/bf16: 8 elements (16 B) keep WMMA's ldm a multiple of 16 bytes and
// rows 16-byte aligned for vector stores while shifting banks by 4 per row. fp32 (FMA path): an
// odd stride, so the column reads of the FMA loops (one row per thread) hit 32 distinct banks.
template <typename T>
__host__ __device__ constexpr int tile_pad() {
  return std::is_same_v<T, float> ? 1 : 8;
}
template <typename T, int kD>
__host__ __device__ constexpr int tile_ld() {
  return kD + tile_pad<T>();
}
// P tile (softmax numerators) stride: fp32 P overwrites S in place; 16-bit P is its own tile.
template <typename T>
__host__ __device__ constexpr int p_ld() {
  return std::is_same_v<T, float> ? kLdS : kBN + 8;
}
template <int kD>
__host__ __device__ constexpr int o_ld() {
  return kD + 4;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else {
    return __float2bfloat16_rn(x);
  }
}

// smem[kRows][tile_ld] <- rows first_row + r (r < valid_rows) of a row-major [*, row_stride]
// matrix, columns [0, cols); everything else (missing rows, columns cols..kD) is zero, so padded
// rows and the padded head dimension add nothing to a product. `vec` (cols a multiple of
// 16 / sizeof(T) and the base 16-byte aligned) selects 16-byte global loads.
template <typename T, int kRows, int kD>
__device__ __forceinline__ void load_tile(T* smem, const T* __restrict__ base, int64_t row_stride,
                                          int64_t first_row, int valid_rows, int cols, bool vec) {
  constexpr int kLd = tile_ld<T, kD>();
  if (vec) {
    constexpr int kVec = 16 / sizeof(T);
    constexpr int kChunks = kD / kVec;  // 16-byte chunks per tile row
    for (int idx = threadIdx.x; idx < kRows * kChunks; idx += blockDim.x) {
      const int r = idx / kChunks;
      const int c = (idx % kChunks) * kVec;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (r < valid_rows && c < cols) {
        val = *reinterpret_cast<const uint4*>(base + (first_row + r) * row_stride + c);
      }
      if constexpr (sizeof(T) == 2) {
        *reinterpret_cast<uint4*>(smem + r * kLd + c) = val;  // rows are 16-byte aligned
      } else {
        const T* parts = reinterpret_cast<const T*>(&val);
#pragma unroll
        for (int e = 0; e < kVec; ++e) smem[r * kLd + c + e] = parts[e];
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < kRows * kD; idx += blockDim.x) {
      const int r = idx / kD;
      const int c = idx % kD;
      smem[r * kLd + c] = (r < valid_rows && c < cols) ? base[(first_row + r) * row_stride + c]
                                                       : from_float<T>(0.f);
    }
  }
}

// sS[kBM][kLdS] = sA[kBM][:d] . sB[kBN][:d]^T (rows of both tiles are dot-product operands).
// Only ceil(d / 16) k-steps run: a head dim of 80 in a kD = 128 tile costs 5 steps, not 8.
template <typename T, int kD>
__device__ __forceinline__ void qk_tile(const T* sA, const T* sB, float* sS, int d) {
  constexpr int kLd = tile_ld<T, kD>();
  if constexpr (std::is_same_v<T, float>) {
    // Thread (ty, tx) owns rows ty + 8r and columns tx + 16c: 32 accumulators, each A element
    // broadcast to 16 threads and each B element to 8.
    const int ty = threadIdx.x / 16;
    const int tx = threadIdx.x % 16;
    float acc[8][4] = {};
    for (int kk = 0; kk < d; ++kk) {
      float a[8], b[4];
#pragma unroll
      for (int r = 0; r < 8; ++r) a[r] = sA[(ty + 8 * r) * kLd + kk];
#pragma unroll
      for (int c = 0; c < 4; ++c) b[c] = sB[(tx + 16 * c) * kLd + kk];
#pragma unroll
      for (int r = 0; r < 8; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
    }
#pragma unroll
    for (int r = 0; r < 8; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) sS[(ty + 8 * r) * kLdS + tx + 16 * c] = acc[r][c];
  } else {
    namespace wmma = nvcuda::wmma;
    const int warp = threadIdx.x / kWarpSize;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kBN / 16];
#pragma unroll
    for (int n = 0; n < kBN / 16; ++n) wmma::fill_fragment(acc[n], 0.f);
    const int steps = (d + 15) / 16;
    for (int kk = 0; kk < steps; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, sA + warp * 16 * kLd + kk * 16, kLd);
#pragma unroll
      for (int n = 0; n < kBN / 16; ++n) {
        // B = sB^T: element (k, n) at sB[n * kLd + k], i.e. column-major with ldm kLd.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(b, sB + n * 16 * kLd + kk * 16, kLd);
        wmma::mma_sync(acc[n], a, b, acc[n]);
      }
    }
#pragma unroll
    for (int n = 0; n < kBN / 16; ++n) {
      wmma::store_matrix_sync(sS + warp * 16 * kLdS + n * 16, acc[n], kLdS, wmma::mem_row_major);
    }
  }
}

// sO[kBM][:dv] = sO * alpha[row] + sP[kBM][kBN] . sV[kBN][:dv]: the flash-attention rescale and
// update. Each thread (FMA) or warp (WMMA) rescales exactly the outputs it then accumulates, so
// no block barrier separates the two.
template <typename T, int kD>
__device__ __forceinline__ void pv_tile(float* sO, const T* sP, const T* sV, const float* alpha,
                                        int dv) {
  constexpr int kLd = tile_ld<T, kD>();
  constexpr int kLdO = o_ld<kD>();
  constexpr int kLdP = p_ld<T>();
  if constexpr (std::is_same_v<T, float>) {
    const int ty = threadIdx.x / 16;
    const int tx = threadIdx.x % 16;
#pragma unroll 1
    for (int n0 = 0; n0 < dv; n0 += 64) {
      float acc[8][4];
#pragma unroll
      for (int r = 0; r < 8; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          acc[r][c] = sO[(ty + 8 * r) * kLdO + n0 + tx + 16 * c] * alpha[ty + 8 * r];
        }
      for (int kk = 0; kk < kBN; ++kk) {
        float p[8], v[4];
#pragma unroll
        for (int r = 0; r < 8; ++r) p[r] = sP[(ty + 8 * r) * kLdP + kk];
#pragma unroll
        for (int c = 0; c < 4; ++c) v[c] = sV[kk * kLd + n0 + tx + 16 * c];
#pragma unroll
        for (int r = 0; r < 8; ++r)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(p[r], v[c], acc[r][c]);
      }
#pragma unroll
      for (int r = 0; r < 8; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          // Columns past kD exist only when kD is not a multiple of 64; kD always is.
          sO[(ty + 8 * r) * kLdO + n0 + tx + 16 * c] = acc[r][c];
        }
    }
  } else {
    namespace wmma = nvcuda::wmma;
    const int warp = threadIdx.x / kWarpSize;
    const int lane = threadIdx.x % kWarpSize;
    const int ncols = (dv + 15) / 16 * 16;
    for (int idx = lane; idx < 16 * ncols; idx += kWarpSize) {
      const int r = warp * 16 + idx / ncols;
      sO[r * kLdO + idx % ncols] *= alpha[r];
    }
    __syncwarp();
    for (int n = 0; n < ncols / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, sO + warp * 16 * kLdO + n * 16, kLdO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, sP + warp * 16 * kLdP + kk * 16, kLdP);
        wmma::load_matrix_sync(b, sV + kk * 16 * kLd + n * 16, kLd);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(sO + warp * 16 * kLdO + n * 16, acc, kLdO, wmma::mem_row_major);
    }
  }
}

}  // namespace attn
}  // namespace vtprune
