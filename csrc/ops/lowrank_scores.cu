// Launchers of lowrank_scores (ALVTS selector, docs/ops.md#lowrank_scores): the projections a = h
// U, b = h V (lowrank_project.cuh, for 16-bit inputs; the glue uses an fp32 torch matmul
// otherwise), then the score passes, those of attention_scores with a single head, every row as a
// query, causal, and two row classes (visual, text) whose column sums the finish multiplies: S =
// S_V2V * S_T2V, S_T2V = 1 without text.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "attention_passes.h"
#include "vtprune/common.cuh"
#include "vtprune/dispatch.cuh"
#include "vtprune/lowrank_project.cuh"
#include "vtprune/ops.h"

namespace vtprune {

void lowrank_scores(std::uintptr_t a, std::uintptr_t b, std::uintptr_t visual_spans,
                    std::uintptr_t key_padding_mask, std::uintptr_t lse, std::uintptr_t partial,
                    std::uintptr_t out, std::int64_t batch, std::int64_t length, std::int64_t rank,
                    std::int64_t max_visual, std::uintptr_t stream) {
  using namespace attn;
  VTPRUNE_CHECK(batch >= 0 && batch <= 65535,
                "lowrank_scores: batch must be in [0, 65535], got " + std::to_string(batch));
  VTPRUNE_CHECK(length >= 1 && length < (std::int64_t{1} << 30),
                "lowrank_scores: length must be in [1, 2^30), got " + std::to_string(length));
  VTPRUNE_CHECK(
      max_visual >= 1 && max_visual <= length,
      "lowrank_scores: max_visual must be in [1, length], got " + std::to_string(max_visual));
  if (batch == 0) return;
  VTPRUNE_CHECK(a != 0 && b != 0 && visual_spans != 0 && lse != 0 && partial != 0 && out != 0,
                "lowrank_scores: a required pointer is null");
  ScoreArgs args{};
  args.q = reinterpret_cast<const void*>(a);
  args.k = reinterpret_cast<const void*>(b);
  args.qspans = nullptr;  // every row is a query
  args.kspans = reinterpret_cast<const std::int64_t*>(visual_spans);
  args.kpm = reinterpret_cast<const bool*>(key_padding_mask);
  args.lse = reinterpret_cast<float*>(lse);
  args.part = reinterpret_cast<float*>(partial);
  args.B = static_cast<int>(batch);
  args.H = 1;
  args.Hkv = 1;
  args.L = static_cast<int>(length);
  args.d = static_cast<int>(rank);
  args.Qm = args.L;
  args.Km = static_cast<int>(max_visual);
  args.lse_stride = length;
  args.lse_by_position = true;
  args.scale_log2 = static_cast<float>(1.0 / std::sqrt(static_cast<double>(rank))) * kLog2e;
  args.causal = true;
  args.vec = rank % 4 == 0 && a % 16 == 0 && b % 16 == 0;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  launch_row_lse(args, kFloat32, s);
  launch_column_sums(args, kFloat32, true, s);
  launch_finalize(args, reinterpret_cast<float*>(out), 1, s);
}

void lowrank_project(std::uintptr_t h, std::uintptr_t u, std::uintptr_t v, std::uintptr_t a,
                     std::uintptr_t b, std::int64_t rows, std::int64_t dim, std::int64_t rank,
                     int dtype, std::uintptr_t stream) {
  using namespace attn;
  const char* op = "lowrank_project";
  VTPRUNE_CHECK(rows >= 0 && rows <= (std::int64_t{1} << 30),
                std::string(op) + ": rows must be in [0, 2^30], got " + std::to_string(rows));
  VTPRUNE_CHECK(
      dim >= 8 && dim % 8 == 0 && dim <= (std::int64_t{1} << 20),
      std::string(op) + ": dim must be a positive multiple of 8, got " + std::to_string(dim));
  VTPRUNE_CHECK(
      rank >= 8 && rank % 8 == 0 && rank <= 4096,
      std::string(op) + ": rank must be a multiple of 8 in [8, 4096], got " + std::to_string(rank));
  VTPRUNE_CHECK(
      dtype == kFloat16 || dtype == kBFloat16,
      std::string(op) + ": dtype must be 1 (fp16) or 2 (bf16), got " + std::to_string(dtype));
  if (rows == 0) return;
  VTPRUNE_CHECK(h != 0 && u != 0 && v != 0 && a != 0 && b != 0,
                std::string(op) + ": a required pointer is null");
  VTPRUNE_CHECK(h % 16 == 0 && u % 16 == 0 && v % 16 == 0,
                std::string(op) + ": h, u and v must be 16-byte aligned");
  ProjectArgs p{};
  p.h = reinterpret_cast<const void*>(h);
  p.u = reinterpret_cast<const void*>(u);
  p.v = reinterpret_cast<const void*>(v);
  p.a = reinterpret_cast<float*>(a);
  p.b = reinterpret_cast<float*>(b);
  p.M = static_cast<int>(rows);
  p.D = static_cast<int>(dim);
  p.R = static_cast<int>(rank);
  const dim3 grid(static_cast<unsigned>((rows + kBM - 1) / kBM),
                  static_cast<unsigned>((2 * rank + 63) / 64));
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, op, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (sizeof(T) == 2) {
      constexpr int bytes = project_smem_bytes<T>();
      set_smem(lowrank_project_kernel<T>, bytes, op);
      lowrank_project_kernel<T><<<grid, kThreads, bytes, s>>>(p);
    }
  });
  VTPRUNE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace vtprune
