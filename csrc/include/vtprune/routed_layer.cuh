// routed_layer (docs/ops.md#routed_layer, ALVTS skip-and-reintegrate): the row kernels around the
// decoder layer's own attention and MLP, with the gather fused into the first read and the scatter
// into the last write. For routed positions I [B, K] of x [B, L, D]:
//
//   kGatherNorm     out = RMSNorm1(x[I])                      before self_attn
//   kGatherAddNorm  delta := x[I] + delta; out = RMSNorm2(delta)  delta = attention out -> mid
//   kAddScatter     x[I] = mid + delta                         delta = MLP out; in place in x
//
// One block per routed row (grid B * K): the row is held in registers (kPer 16-byte vectors a
// thread, all loads issued before the first use), the sum of squares is reduced over the block in
// fp32, and the row is written once. Rows of I are distinct, so blocks never touch the same memory.
//
// Rounding is the Hugging Face modules' (LlamaRMSNorm, `residual + h`): the variance is a float32
// mean of squares, `x * rsqrt(var + eps)` is rounded to T, then multiplied by the weight in T (one
// more rounding); a residual add rounds its float32 sum once. Only the order of the float32 sum of
// squares differs from PyTorch's reduction.
//
// Indices are trusted (a host check would synchronise every layer), but an index outside [0, L)
// reads zeros and writes nothing, so a bad one can never touch memory outside x.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "vtprune/attention_tiles.cuh"
#include "vtprune/common.cuh"

namespace vtprune {
namespace routed {

using attn::from_float;
using attn::to_float;

enum class RowOp { kGatherNorm, kGatherAddNorm, kAddScatter };

constexpr int kMaxThreads =
    512;  // a 128-register cap: the row, its weight and residual stay in registers
// 16-byte vectors a thread holds: D = 4096 is 128 threads in bf16/fp16 and 256 in fp32. The scalar
// path (x unaligned or D not a multiple of the vector) holds 16 elements a thread.
constexpr int kVecsPerThread = 4;
constexpr int kScalarsPerThread = 16;

struct RowArgs {
  void* x;             // [B, L, D], unit stride on D; batch / row strides sxb / sxl in elements
  const int64_t* idx;  // [B, K] routed positions (ascending in practice; only distinctness matters)
  const void* weight;  // [D] RMSNorm weight (norm ops)
  void* delta;         // [B, K, D] contiguous: attention output (-> mid), or the MLP output
  const void* mid;     // [B, K, D] contiguous: kAddScatter's residual
  void* out;           // [B, K, D] contiguous: the normalised rows
  int64_t L, sxb, sxl;
  int K, D;
  float eps;      // the norm's variance_epsilon
  float inv_dim;  // 1 / D, as torch's mean multiplies by it
};

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

// Sum of `v` over the block, identical in every thread (fixed order: warps, then warp totals).
__device__ __forceinline__ float block_sum(float v, float* warp_sums) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (threadIdx.x % kWarpSize == 0) warp_sums[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < static_cast<int>(blockDim.x / kWarpSize); ++w) total += warp_sums[w];
  return total;
}

// First element of a thread's i-th vector of the row.
template <int kVec>
__device__ __forceinline__ int column(int i) {
  return (i * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * kVec;
}

// out[row] = weight * round(x * rsqrt(mean(x^2) + eps)) for the row held in `xv` (zeros past D).
template <typename T, int kVec, int kPer>
__device__ __forceinline__ void normalise_store(const RowArgs& a, const Vec<T, kVec> (&xv)[kPer],
                                                const Vec<T, kVec> (&wv)[kPer], int64_t off,
                                                float* warp_sums) {
  float sumsq = 0.f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) sumsq = fmaf(to_float(xv[i].v[e]), to_float(xv[i].v[e]), sumsq);
  }
  // var + eps with two roundings, as torch's mean and add (no contraction into one FMA).
  const float var = __fmul_rn(block_sum(sumsq, warp_sums), a.inv_dim);
  const float inv_rms = rsqrtf(__fadd_rn(var, a.eps));
  T* out = static_cast<T*>(a.out) + off;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int c = column<kVec>(i);
    if (c < a.D) {
      Vec<T, kVec> o;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        // weight * hidden.to(input_dtype): round the normalised value, then the product.
        const float xn = to_float(from_float<T>(to_float(xv[i].v[e]) * inv_rms));
        o.v[e] = from_float<T>(to_float(wv[i].v[e]) * xn);
      }
      *reinterpret_cast<Vec<T, kVec>*>(out + c) = o;
    }
  }
}

// Grid (B * K), blockDim.x threads with kPer * kVec * blockDim.x >= D (checked by the launcher).
template <typename T, int kVec, int kPer, RowOp kOp>
__global__ void __launch_bounds__(kMaxThreads) routed_row_kernel(RowArgs a) {
  using V = Vec<T, kVec>;
  __shared__ float warp_sums[kMaxWarps];
  const int64_t row = blockIdx.x;  // b * K + k
  const int64_t t = a.idx[row];
  const bool in_range = t >= 0 && t < a.L;
  T* xrow = static_cast<T*>(a.x) + (row / a.K) * a.sxb + (in_range ? t : 0) * a.sxl;
  const int64_t off = row * a.D;  // the row in the compact [B, K, D] buffers
  T* delta = static_cast<T*>(a.delta) + off;

  // Every load of the row is issued before any is used: one row is only 8 KB (bf16, D = 4096), so
  // latency, not bandwidth, bounds a block.
  V xv[kPer], dv[kPer], wv[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int c = column<kVec>(i);
    xv[i] = V{};  // zeros past D and for an out-of-range index: they add nothing to the variance
    dv[i] = V{};
    wv[i] = V{};
    if (c < a.D) {
      if constexpr (kOp == RowOp::kAddScatter) {
        xv[i] = *reinterpret_cast<const V*>(static_cast<const T*>(a.mid) + off + c);
      } else if (in_range) {
        xv[i] = *reinterpret_cast<const V*>(xrow + c);
      }
      if constexpr (kOp != RowOp::kGatherNorm) dv[i] = *reinterpret_cast<const V*>(delta + c);
      if constexpr (kOp != RowOp::kAddScatter) {
        wv[i] = *reinterpret_cast<const V*>(static_cast<const T*>(a.weight) + c);
      }
    }
  }

  // The residual adds: one rounding of the float32 sum, as `residual + hidden_states` in T.
  if constexpr (kOp != RowOp::kGatherNorm) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        xv[i].v[e] = from_float<T>(to_float(xv[i].v[e]) + to_float(dv[i].v[e]));
      }
      const int c = column<kVec>(i);
      if (c < a.D) {
        if constexpr (kOp == RowOp::kAddScatter) {
          if (in_range) *reinterpret_cast<V*>(xrow + c) = xv[i];  // the scatter: x[I] = mid + delta
        } else {
          *reinterpret_cast<V*>(delta + c) = xv[i];  // mid overwrites the attention output
        }
      }
    }
  }
  if constexpr (kOp != RowOp::kAddScatter)
    normalise_store<T, kVec, kPer>(a, xv, wv, off, warp_sums);
}

}  // namespace routed
}  // namespace vtprune
