// Launchers of the routed layer's row kernels (csrc/include/vtprune/routed_layer.cuh): gather +
// RMSNorm, residual + RMSNorm, residual + scatter. The layer's attention and MLP run between them
// (the Python glue calls the Hugging Face modules).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "vtprune/common.cuh"
#include "vtprune/dispatch.cuh"
#include "vtprune/ops.h"
#include "vtprune/routed_layer.cuh"

namespace vtprune {
namespace {

using routed::RowArgs;
using routed::RowOp;

bool aligned16(std::uintptr_t p) { return p % 16 == 0; }

// Checks the shapes, picks the 16-byte or the scalar path and launches B * K blocks on `stream`.
template <RowOp kOp>
void launch_rows(const char* op, RowArgs a, std::int64_t batch, std::int64_t length,
                 std::int64_t routed, std::int64_t dim, int dtype, std::uintptr_t stream) {
  VTPRUNE_CHECK(batch >= 0 && length >= 1 && routed >= 0 && routed <= length,
                std::string(op) + ": need batch >= 0 and 0 <= routed <= length, got batch " +
                    std::to_string(batch) + ", routed " + std::to_string(routed) + ", length " +
                    std::to_string(length));
  VTPRUNE_CHECK(dim >= 1 && dim < (std::int64_t{1} << 30),
                std::string(op) + ": dim must be in [1, 2^30), got " + std::to_string(dim));
  VTPRUNE_CHECK(
      batch * routed <= 0x7fffffff,
      std::string(op) + ": batch * routed must be < 2^31, got " + std::to_string(batch * routed));
  if (batch * routed == 0) return;
  const bool has_inputs = kOp == RowOp::kAddScatter ? a.mid != nullptr && a.delta != nullptr
                                                    : a.weight != nullptr && a.out != nullptr;
  VTPRUNE_CHECK(a.x != nullptr && a.idx != nullptr && has_inputs &&
                    (kOp != RowOp::kGatherAddNorm || a.delta != nullptr),
                std::string(op) + ": a required pointer is null");
  a.L = length;
  a.K = static_cast<int>(routed);
  a.D = static_cast<int>(dim);
  a.inv_dim = 1.f / static_cast<float>(dim);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const auto ptr = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p); };
    const bool vec = dim % kVec == 0 && a.sxb % kVec == 0 && a.sxl % kVec == 0 &&
                     aligned16(ptr(a.x)) && aligned16(ptr(a.weight)) && aligned16(ptr(a.delta)) &&
                     aligned16(ptr(a.mid)) && aligned16(ptr(a.out));
    const std::int64_t per_thread =
        vec ? std::int64_t{routed::kVecsPerThread} * kVec : routed::kScalarsPerThread;
    const std::int64_t warps = (dim + per_thread * kWarpSize - 1) / (per_thread * kWarpSize);
    VTPRUNE_CHECK(warps <= routed::kMaxThreads / kWarpSize,
                  std::string(op) + ": dim " + std::to_string(dim) +
                      " exceeds what a block holds (" +
                      std::to_string(per_thread * routed::kMaxThreads) +
                      (vec ? ")" : " without 16-byte alignment of rows and strides)"));
    const unsigned threads = static_cast<unsigned>(warps * kWarpSize);
    const unsigned grid = static_cast<unsigned>(batch * routed);
    if (vec) {
      routed::routed_row_kernel<T, kVec, routed::kVecsPerThread, kOp><<<grid, threads, 0, s>>>(a);
    } else {
      routed::routed_row_kernel<T, 1, routed::kScalarsPerThread, kOp><<<grid, threads, 0, s>>>(a);
    }
  });
  VTPRUNE_CUDA_CHECK(cudaGetLastError());
}

RowArgs row_args(std::uintptr_t x, std::uintptr_t idx, std::int64_t batch_stride,
                 std::int64_t row_stride) {
  RowArgs a{};
  a.x = reinterpret_cast<void*>(x);
  a.idx = reinterpret_cast<const std::int64_t*>(idx);
  a.sxb = batch_stride;
  a.sxl = row_stride;
  return a;
}

}  // namespace

void routed_gather_rmsnorm(std::uintptr_t x, std::uintptr_t idx, std::uintptr_t weight,
                           std::uintptr_t out, std::int64_t batch, std::int64_t length,
                           std::int64_t routed, std::int64_t dim, std::int64_t batch_stride,
                           std::int64_t row_stride, double eps, int dtype, std::uintptr_t stream) {
  RowArgs a = row_args(x, idx, batch_stride, row_stride);
  a.weight = reinterpret_cast<const void*>(weight);
  a.out = reinterpret_cast<void*>(out);
  a.eps = static_cast<float>(eps);
  launch_rows<RowOp::kGatherNorm>("routed_gather_rmsnorm", a, batch, length, routed, dim, dtype,
                                  stream);
}

void routed_gather_add_rmsnorm(std::uintptr_t x, std::uintptr_t idx, std::uintptr_t delta,
                               std::uintptr_t weight, std::uintptr_t out, std::int64_t batch,
                               std::int64_t length, std::int64_t routed, std::int64_t dim,
                               std::int64_t batch_stride, std::int64_t row_stride, double eps,
                               int dtype, std::uintptr_t stream) {
  RowArgs a = row_args(x, idx, batch_stride, row_stride);
  a.delta = reinterpret_cast<void*>(delta);
  a.weight = reinterpret_cast<const void*>(weight);
  a.out = reinterpret_cast<void*>(out);
  a.eps = static_cast<float>(eps);
  launch_rows<RowOp::kGatherAddNorm>("routed_gather_add_rmsnorm", a, batch, length, routed, dim,
                                     dtype, stream);
}

void routed_add_scatter(std::uintptr_t x, std::uintptr_t idx, std::uintptr_t mid,
                        std::uintptr_t delta, std::int64_t batch, std::int64_t length,
                        std::int64_t routed, std::int64_t dim, std::int64_t batch_stride,
                        std::int64_t row_stride, int dtype, std::uintptr_t stream) {
  RowArgs a = row_args(x, idx, batch_stride, row_stride);
  a.mid = reinterpret_cast<const void*>(mid);
  a.delta = reinterpret_cast<void*>(delta);
  launch_rows<RowOp::kAddScatter>("routed_add_scatter", a, batch, length, routed, dim, dtype,
                                  stream);
}

}  // namespace vtprune
