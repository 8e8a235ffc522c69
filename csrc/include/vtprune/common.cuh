// Shared helpers for the vtprune CUDA kernels and launchers: error checks and block-wide scans.
// Torch-free by design: launchers receive raw device pointers, sizes and a stream handle.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

// Throws std::runtime_error (pybind11 turns it into RuntimeError) when a CUDA call fails.
#define VTPRUNE_CUDA_CHECK(expr)                                                                \
  do {                                                                                          \
    const cudaError_t vtprune_err_ = (expr);                                                    \
    if (vtprune_err_ != cudaSuccess) {                                                          \
      throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(vtprune_err_) + \
                               " (" #expr ") at " __FILE__ ":" + std::to_string(__LINE__));     \
    }                                                                                           \
  } while (0)

// Argument check for launchers: throws std::runtime_error (RuntimeError in Python) with `msg`.
#define VTPRUNE_CHECK(cond, msg)                                  \
  do {                                                            \
    if (!(cond)) {                                                \
      throw std::runtime_error(std::string("vtprune: ") + (msg)); \
    }                                                             \
  } while (0)

namespace vtprune {

constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 32;  // 1024 threads per block at most

// Inclusive prefix sum across a warp (Kogge-Stone over shuffles); all 32 lanes must call it.
template <typename T>
__device__ __forceinline__ T warp_inclusive_sum(T v) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const T up = __shfl_up_sync(0xffffffffu, v, offset);
    if (lane >= offset) v += up;
  }
  return v;
}

// Exclusive prefix sum over the whole block, in thread order; also returns the block total.
// Every thread of the block must call it (it synchronises twice); blockDim.x must be a multiple of
// 32. `warp_sums` is shared scratch of kMaxWarps + 1 entries (the last holds the total); a caller
// that scans again must __syncthreads() in between, or a fast warp overwrites what a slow one
// reads.
template <typename T>
__device__ __forceinline__ T block_exclusive_sum(T v, T* warp_sums, T& total) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  const T inclusive = warp_inclusive_sum(v);
  if (lane == kWarpSize - 1) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    // Scan of the per-warp totals; lanes past num_warps hold zeros.
    const T s = lane < num_warps ? warp_sums[lane] : T(0);
    const T s_incl = warp_inclusive_sum(s);
    if (lane < num_warps) warp_sums[lane] = s_incl - s;  // exclusive offsets
    if (lane == num_warps - 1) warp_sums[kMaxWarps] = s_incl;
  }
  __syncthreads();
  total = warp_sums[kMaxWarps];
  return warp_sums[warp] + inclusive - v;
}

}  // namespace vtprune
