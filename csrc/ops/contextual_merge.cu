// Launcher of contextual_merge (csrc/include/vtprune/contextual_merge.cuh): targets, assignment,
// packed output, three kernels on one stream. select_and_merge is topk_keep_order then this.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "vtprune/common.cuh"
#include "vtprune/contextual_merge.cuh"
#include "vtprune/dispatch.cuh"
#include "vtprune/ops.h"

namespace vtprune {

void contextual_merge(std::uintptr_t x, std::uintptr_t metric, std::uintptr_t keep_idx,
                      std::uintptr_t lengths, std::uintptr_t target_idx,
                      std::uintptr_t target_inv_norm, std::uintptr_t choice, std::uintptr_t out,
                      std::int64_t batch, std::int64_t n, std::int64_t dim, std::int64_t metric_dim,
                      std::int64_t k, std::int64_t num_contextual, int x_dtype, int metric_dtype,
                      std::uintptr_t stream) {
  using namespace merge;
  const char* op = "contextual_merge";
  VTPRUNE_CHECK(batch >= 0 && batch <= 65535,
                std::string(op) + ": batch must be in [0, 65535], got " + std::to_string(batch));
  VTPRUNE_CHECK(n >= 1 && n < (std::int64_t{1} << 30) && dim >= 1 && metric_dim >= 1,
                std::string(op) + ": n, dim and metric_dim must be positive (n < 2^30)");
  VTPRUNE_CHECK(k >= 0 && num_contextual >= 0 && k + num_contextual <= n,
                std::string(op) + ": k + num_contextual must be in [0, n=" + std::to_string(n) +
                    "], got " + std::to_string(k) + " + " + std::to_string(num_contextual));
  VTPRUNE_CHECK(k + num_contextual <= 0x7fffffff, std::string(op) + ": too many output rows");
  if (batch == 0 || k + num_contextual == 0) return;
  VTPRUNE_CHECK(x != 0 && out != 0 && (k == 0 || keep_idx != 0),
                std::string(op) + ": a required pointer is null");
  VTPRUNE_CHECK(num_contextual == 0 ||
                    (metric != 0 && target_idx != 0 && target_inv_norm != 0 && choice != 0),
                std::string(op) + ": a workspace pointer is null");
  MergeArgs a{};
  a.x = reinterpret_cast<const void*>(x);
  a.metric = reinterpret_cast<const void*>(metric);
  a.keep = reinterpret_cast<const std::int64_t*>(keep_idx);
  a.lengths = reinterpret_cast<const std::int64_t*>(lengths);
  a.target_idx = reinterpret_cast<std::int64_t*>(target_idx);
  a.target_inv_norm = reinterpret_cast<float*>(target_inv_norm);
  a.choice = reinterpret_cast<std::int32_t*>(choice);
  a.out = reinterpret_cast<void*>(out);
  a.N = static_cast<int>(n);
  a.D = static_cast<int>(dim);
  a.dk = static_cast<int>(metric_dim);
  a.k = static_cast<int>(k);
  a.C = static_cast<int>(num_contextual);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const unsigned threads = kWarpsPerBlock * kWarpSize;

  if (a.C > 0) {
    dispatch_dtype(metric_dtype, op, [&](auto tag) {
      using M = decltype(tag);
      const dim3 target_grid((a.C + kWarpsPerBlock - 1) / kWarpsPerBlock, batch);
      merge_targets_kernel<M><<<target_grid, threads, 0, s>>>(a);
      VTPRUNE_CUDA_CHECK(cudaGetLastError());
      const dim3 assign_grid((a.N + kWarpsPerBlock - 1) / kWarpsPerBlock, batch);
      merge_assign_kernel<M><<<assign_grid, threads, 0, s>>>(a);
      VTPRUNE_CUDA_CHECK(cudaGetLastError());
    });
  }
  dispatch_dtype(x_dtype, op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = dim % kVec == 0 && x % 16 == 0 && out % 16 == 0;
    const int chunk = kOutThreads * kOutVecsPerThread * (vec ? kVec : 1);
    const dim3 grid(static_cast<unsigned>(k + num_contextual), static_cast<unsigned>(batch),
                    static_cast<unsigned>((dim + chunk - 1) / chunk));
    if (vec) {
      merge_output_kernel<T, kVec><<<grid, kOutThreads, 0, s>>>(a);
    } else {
      merge_output_kernel<T, 1><<<grid, kOutThreads, 0, s>>>(a);
    }
  });
  VTPRUNE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace vtprune
