// Launcher for topk_keep_order_kernel (csrc/include/vtprune/topk_keep_order.cuh).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "vtprune/common.cuh"
#include "vtprune/ops.h"
#include "vtprune/topk_keep_order.cuh"

namespace vtprune {

namespace {

// Chunk loops in the kernel index positions with int; keep base + blockDim.x far from overflow.
constexpr std::int64_t kMaxColumns = std::int64_t{1} << 30;
constexpr std::int64_t kMaxGrid = 0x7fffffff;  // gridDim.x limit

// One thread per position up to a full block: a row of 576 tokens is a single chunk per pass.
int threads_for(std::int64_t n) {
  const std::int64_t rounded = (n + kWarpSize - 1) / kWarpSize * kWarpSize;
  return static_cast<int>(std::clamp<std::int64_t>(rounded, topk_keep_order_detail::kMinThreads,
                                                   topk_keep_order_detail::kMaxThreads));
}

}  // namespace

void topk_keep_order(std::uintptr_t scores, std::uintptr_t lengths, std::uintptr_t out,
                     std::int64_t batch, std::int64_t n, std::int64_t k, std::uintptr_t stream) {
  VTPRUNE_CHECK(batch >= 0 && batch <= kMaxGrid,
                "topk_keep_order: batch must be in [0, 2^31), got " + std::to_string(batch));
  VTPRUNE_CHECK(n >= 0 && n <= kMaxColumns,
                "topk_keep_order: n must be in [0, 2^30], got " + std::to_string(n));
  VTPRUNE_CHECK(k >= 0 && k <= n, "topk_keep_order: k must be in [0, n=" + std::to_string(n) +
                                      "], got " + std::to_string(k));
  if (batch == 0 || k == 0) return;
  VTPRUNE_CHECK(scores != 0, "topk_keep_order: scores pointer is null");
  VTPRUNE_CHECK(out != 0, "topk_keep_order: out pointer is null");

  const dim3 grid(static_cast<unsigned>(batch));
  const dim3 block(threads_for(n));
  topk_keep_order_kernel<std::int64_t><<<grid, block, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const float*>(scores), reinterpret_cast<const std::int64_t*>(lengths),
      reinterpret_cast<std::int64_t*>(out), static_cast<int>(n), static_cast<int>(k));
  VTPRUNE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace vtprune
