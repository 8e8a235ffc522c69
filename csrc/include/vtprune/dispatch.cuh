// Host-side dispatch of run-time dtype codes and head-dimension tiles to kernel templates.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>
#include <type_traits>

#include "vtprune/common.cuh"

namespace vtprune {

// Dtype codes of the Python glue (vtprune.cuda.dtype_code): float32, float16, bfloat16.
enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// f(T{}) with T the element type of `code`.
template <typename F>
void dispatch_dtype(int code, const char* op, F&& f) {
  switch (code) {
    case kFloat32:
      f(float{});
      break;
    case kFloat16:
      f(__half{});
      break;
    case kBFloat16:
      f(__nv_bfloat16{});
      break;
    default:
      throw std::runtime_error(std::string("vtprune: ") + op + ": unknown dtype code " +
                               std::to_string(code) + " (expected 0 fp32, 1 fp16, 2 bf16)");
  }
}

// f(std::integral_constant<int, kD>{}) with kD the smallest of 64 / 128 / 256 holding `dim`:
// head dimensions are zero-padded to a tile width, so three instantiations cover every model.
template <typename F>
void dispatch_head_dim(int dim, const char* op, const char* name, F&& f) {
  if (dim >= 1 && dim <= 64) {
    f(std::integral_constant<int, 64>{});
  } else if (dim <= 128) {
    f(std::integral_constant<int, 128>{});
  } else if (dim <= 256) {
    f(std::integral_constant<int, 256>{});
  } else {
    throw std::runtime_error(std::string("vtprune: ") + op + ": " + name +
                             " must be in [1, 256], got " + std::to_string(dim));
  }
}

// Raises a kernel's dynamic shared-memory limit to `bytes`, or throws naming what did not fit.
template <typename Kernel>
void set_smem(Kernel kernel, int bytes, const char* op) {
  int device = 0, limit = 0;
  VTPRUNE_CUDA_CHECK(cudaGetDevice(&device));
  VTPRUNE_CUDA_CHECK(
      cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  VTPRUNE_CHECK(bytes <= limit, std::string(op) + ": needs " + std::to_string(bytes) +
                                    " bytes of shared memory per block, the device allows " +
                                    std::to_string(limit) +
                                    " (use a 16-bit dtype or a smaller head dim)");
  VTPRUNE_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

}  // namespace vtprune
