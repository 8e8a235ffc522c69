// The passes of attention_scores (csrc/include/vtprune/attention_scores.cuh), launched from
// csrc/ops/attention_scores.cu and shared by attention_with_scores and lowrank_scores, so each
// kernel is compiled once.
#pragma once

#include <cuda_runtime.h>

#include "vtprune/attention_scores.cuh"

namespace vtprune {
namespace attn {

// Pass 1 over every (query tile, head, batch row): args.lse <- row lse.
void launch_row_lse(const ScoreArgs& args, int dtype, cudaStream_t stream);
// Pass 2: args.part <- per-head column sums (two row classes for lowrank_scores).
void launch_column_sums(const ScoreArgs& args, int dtype, bool two_class, cudaStream_t stream);
// out [B, Km] <- the partials finished (mode 0 attention mean, mode 1 lowrank product).
void launch_finalize(const ScoreArgs& args, float* out, int mode, cudaStream_t stream);

}  // namespace attn
}  // namespace vtprune
