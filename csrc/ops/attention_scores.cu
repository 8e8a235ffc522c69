// Launchers of attention_scores (csrc/include/vtprune/attention_scores.cuh) and of its passes,
// which attention_with_scores.cu and lowrank_scores.cu reuse.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "attention_passes.h"
#include "vtprune/attention_mma.cuh"
#include "vtprune/attention_scores.cuh"
#include "vtprune/common.cuh"
#include "vtprune/dispatch.cuh"
#include "vtprune/ops.h"

namespace vtprune {
namespace attn {

namespace {

constexpr std::int64_t kMaxGridYZ = 65535;

unsigned tiles(std::int64_t n, int tile) { return static_cast<unsigned>((n + tile - 1) / tile); }

}  // namespace

void launch_row_lse(const ScoreArgs& args, int dtype, cudaStream_t stream) {
  const dim3 grid(tiles(args.Qm, kBM), args.H, args.B);
  dispatch_dtype(dtype, "attention_scores", [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(args.d, "attention_scores", "head dim d", [&](auto dim) {
      constexpr int kD = decltype(dim)::value;
      if constexpr (sizeof(T) == 2) {
        if (args.vec) {  // tensor-core path (attention_mma.cuh)
          RowPassArgs r{};
          r.q = args.q;
          r.k = args.k;
          r.qspans = args.qspans;
          r.kpm = args.kpm;
          r.lse = args.lse;
          r.H = args.H;
          r.Hkv = args.Hkv;
          r.L = args.L;
          r.d = args.d;
          r.lse_stride = args.lse_stride;
          r.lse_by_position = args.lse_by_position;
          r.scale_log2 = args.scale_log2;
          r.causal = args.causal;
          constexpr int bytes = row_pass_smem_bytes<T, kD, false>();
          set_smem(row_pass_mma_kernel<T, kD, false>, bytes, "attention_scores");
          row_pass_mma_kernel<T, kD, false><<<grid, kThreads, bytes, stream>>>(r);
          return;
        }
      }
      constexpr int bytes = scores_smem_bytes<T, kD>();
      set_smem(row_lse_kernel<T, kD>, bytes, "attention_scores");
      row_lse_kernel<T, kD><<<grid, kThreads, bytes, stream>>>(args);
    });
  });
  VTPRUNE_CUDA_CHECK(cudaGetLastError());
}

void launch_column_sums(const ScoreArgs& args, int dtype, bool two_class, cudaStream_t stream) {
  const dim3 grid(tiles(args.Km, kBN), args.H, args.B);
  if (two_class) {  // lowrank_scores: fp32 projections only
    VTPRUNE_CHECK(dtype == kFloat32, "lowrank column sums take fp32 projections");
    dispatch_head_dim(args.d, "lowrank_scores", "rank R", [&](auto dim) {
      constexpr int kD = decltype(dim)::value;
      constexpr int bytes = scores_smem_bytes<float, kD>();
      set_smem(column_sum_kernel<float, kD, true>, bytes, "lowrank_scores");
      column_sum_kernel<float, kD, true><<<grid, kThreads, bytes, stream>>>(args);
    });
  } else {
    dispatch_dtype(dtype, "attention_scores", [&](auto tag) {
      using T = decltype(tag);
      dispatch_head_dim(args.d, "attention_scores", "head dim d", [&](auto dim) {
        constexpr int kD = decltype(dim)::value;
        if constexpr (sizeof(T) == 2) {
          if (args.vec) {  // tensor-core path (attention_mma.cuh)
            constexpr int bytes = column_pass_smem_bytes<T, kD>();
            set_smem(column_sum_mma_kernel<T, kD>, bytes, "attention_scores");
            column_sum_mma_kernel<T, kD><<<grid, kThreads, bytes, stream>>>(args);
            return;
          }
        }
        constexpr int bytes = scores_smem_bytes<T, kD>();
        set_smem(column_sum_kernel<T, kD, false>, bytes, "attention_scores");
        column_sum_kernel<T, kD, false><<<grid, kThreads, bytes, stream>>>(args);
      });
    });
  }
  VTPRUNE_CUDA_CHECK(cudaGetLastError());
}

void launch_finalize(const ScoreArgs& args, float* out, int mode, cudaStream_t stream) {
  const dim3 grid(tiles(args.Km, kFinalizeThreads), args.B);
  if (mode == 0) {
    finalize_kernel<0><<<grid, kFinalizeThreads, 0, stream>>>(args, out);
  } else {
    finalize_kernel<1><<<grid, kFinalizeThreads, 0, stream>>>(args, out);
  }
  VTPRUNE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace attn

void attention_scores(std::uintptr_t q, std::uintptr_t k, std::uintptr_t query_spans,
                      std::uintptr_t key_spans, std::uintptr_t key_padding_mask, std::uintptr_t lse,
                      std::uintptr_t partial, std::uintptr_t out, std::int64_t batch,
                      std::int64_t heads, std::int64_t kv_heads, std::int64_t length,
                      std::int64_t head_dim, std::int64_t max_queries, std::int64_t max_keys,
                      double scale, bool causal, int dtype, std::uintptr_t stream) {
  using namespace attn;
  VTPRUNE_CHECK(batch >= 0 && batch <= kMaxGridYZ,
                "attention_scores: batch must be in [0, 65535], got " + std::to_string(batch));
  VTPRUNE_CHECK(heads >= 1 && heads <= kMaxGridYZ && kv_heads >= 1 && heads % kv_heads == 0,
                "attention_scores: heads (" + std::to_string(heads) +
                    ") must be a positive multiple of kv_heads (" + std::to_string(kv_heads) + ")");
  VTPRUNE_CHECK(length >= 1 && length < (std::int64_t{1} << 30),
                "attention_scores: length must be in [1, 2^30), got " + std::to_string(length));
  VTPRUNE_CHECK(max_queries >= 1 && max_queries <= length && max_keys >= 1 && max_keys <= length,
                "attention_scores: max_queries and max_keys must be in [1, length]");
  if (batch == 0) return;
  VTPRUNE_CHECK(q != 0 && k != 0 && query_spans != 0 && key_spans != 0 && partial != 0 && out != 0,
                "attention_scores: a required pointer is null");
  ScoreArgs args{};
  args.q = reinterpret_cast<const void*>(q);
  args.k = reinterpret_cast<const void*>(k);
  args.qspans = reinterpret_cast<const std::int64_t*>(query_spans);
  args.kspans = reinterpret_cast<const std::int64_t*>(key_spans);
  args.kpm = reinterpret_cast<const bool*>(key_padding_mask);
  args.lse = reinterpret_cast<float*>(lse);
  args.part = reinterpret_cast<float*>(partial);
  args.B = static_cast<int>(batch);
  args.H = static_cast<int>(heads);
  args.Hkv = static_cast<int>(kv_heads);
  args.L = static_cast<int>(length);
  args.d = static_cast<int>(head_dim);
  args.Qm = static_cast<int>(max_queries);
  args.Km = static_cast<int>(max_keys);
  args.lse_stride = max_queries;
  args.lse_by_position = false;
  args.scale_log2 = static_cast<float>(scale) * kLog2e;
  args.causal = causal;
  const int elem = dtype == kFloat32 ? 4 : 2;
  args.vec = (head_dim * elem) % 16 == 0 && q % 16 == 0 && k % 16 == 0;
  const auto s = reinterpret_cast<cudaStream_t>(stream);

  VTPRUNE_CHECK(lse != 0, "attention_scores: lse workspace pointer is null");
  if (max_queries == 1 && heads <= kSingleMaxHeads) {
    // Every row has one query (CLIP's [CLS]): a thread per key, then one finishing kernel. The lse
    // workspace holds each 64-key chunk's (max, sum) here: [B, H, 2 ceil(L / 64)].
    args.lse_stride = 2 * single_query_chunks(args.L);
    const dim3 grid(static_cast<unsigned>(single_query_chunks(args.L)), args.H, args.B);
    dispatch_dtype(dtype, "attention_scores", [&](auto tag) {
      using T = decltype(tag);
      dispatch_head_dim(args.d, "attention_scores", "head dim d", [&](auto dim) {
        single_query_logits_kernel<T, decltype(dim)::value><<<grid, kSingleKeys, 0, s>>>(args);
      });
    });
    VTPRUNE_CUDA_CHECK(cudaGetLastError());
    constexpr int kFinish = 256;
    const dim3 finish_grid(tiles(args.Km, kFinish), args.B);
    single_query_finish_kernel<kFinish>
        <<<finish_grid, kFinish, args.H * sizeof(float), s>>>(args, reinterpret_cast<float*>(out));
    VTPRUNE_CUDA_CHECK(cudaGetLastError());
    return;
  }
  launch_row_lse(args, dtype, s);
  launch_column_sums(args, dtype, false, s);
  launch_finalize(args, reinterpret_cast<float*>(out), 0, s);
}

}  // namespace vtprune
