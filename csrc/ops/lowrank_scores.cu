// Launcher of lowrank_scores (ALVTS selector, DESIGN 3.4). The glue computes the projections
// a = h U, b = h V in fp32 (torch matmul; no cuBLAS dependency here); the score passes are those of
// attention_scores with a single head, every row as a query, causal, and two row classes (visual,
// text) whose column sums the finish multiplies: S = S_V2V * S_T2V, S_T2V = 1 without text.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "attention_passes.h"
#include "vtprune/common.cuh"
#include "vtprune/dispatch.cuh"
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

}  // namespace vtprune
