// Launcher of attention_with_scores: the flash forward (csrc/include/vtprune/
// attention_with_scores.cuh) writes out and every row's lse; the column pass and finish of
// attention_scores then read that lse by position.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "attention_passes.h"
#include "vtprune/attention_mma.cuh"
#include "vtprune/attention_with_scores.cuh"
#include "vtprune/common.cuh"
#include "vtprune/dispatch.cuh"
#include "vtprune/ops.h"

namespace vtprune {

void attention_with_scores(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                           std::uintptr_t query_spans, std::uintptr_t key_spans,
                           std::uintptr_t key_padding_mask, std::uintptr_t out, std::uintptr_t lse,
                           std::uintptr_t partial, std::uintptr_t scores, std::int64_t batch,
                           std::int64_t heads, std::int64_t kv_heads, std::int64_t length,
                           std::int64_t head_dim, std::int64_t value_dim, std::int64_t max_keys,
                           double scale, bool causal, int dtype, std::uintptr_t stream) {
  using namespace attn;
  const char* op = "attention_with_scores";
  VTPRUNE_CHECK(batch >= 0 && batch <= 65535,
                std::string(op) + ": batch must be in [0, 65535], got " + std::to_string(batch));
  VTPRUNE_CHECK(heads >= 1 && heads <= 65535 && kv_heads >= 1 && heads % kv_heads == 0,
                std::string(op) + ": heads must be a positive multiple of kv_heads");
  VTPRUNE_CHECK(length >= 1 && length < (std::int64_t{1} << 30),
                std::string(op) + ": length must be in [1, 2^30), got " + std::to_string(length));
  VTPRUNE_CHECK(max_keys >= 1 && max_keys <= length,
                std::string(op) + ": max_keys must be in [1, length]");
  VTPRUNE_CHECK(
      head_dim >= 1 && value_dim >= 1 && value_dim <= 256,
      std::string(op) + ": value dim must be in [1, 256], got " + std::to_string(value_dim));
  if (batch == 0) return;
  VTPRUNE_CHECK(q != 0 && k != 0 && v != 0 && out != 0 && lse != 0 && partial != 0 && scores != 0,
                std::string(op) + ": a required pointer is null");
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const int elem = dtype == kFloat32 ? 4 : 2;

  FlashArgs f{};
  f.q = reinterpret_cast<const void*>(q);
  f.k = reinterpret_cast<const void*>(k);
  f.v = reinterpret_cast<const void*>(v);
  f.kpm = reinterpret_cast<const bool*>(key_padding_mask);
  f.out = reinterpret_cast<void*>(out);
  f.lse = reinterpret_cast<float*>(lse);
  f.H = static_cast<int>(heads);
  f.Hkv = static_cast<int>(kv_heads);
  f.L = static_cast<int>(length);
  f.d = static_cast<int>(head_dim);
  f.dv = static_cast<int>(value_dim);
  f.scale_log2 = static_cast<float>(scale) * kLog2e;
  f.causal = causal;
  f.vec_qk = (head_dim * elem) % 16 == 0 && q % 16 == 0 && k % 16 == 0;
  f.vec_v = (value_dim * elem) % 16 == 0 && v % 16 == 0;
  // One tile width covers both head dims (the V tile shares the K tile's stride).
  const int tile_dim = static_cast<int>(head_dim > value_dim ? head_dim : value_dim);
  const dim3 grid(static_cast<unsigned>((length + kBM - 1) / kBM), f.H,
                  static_cast<unsigned>(batch));
  dispatch_dtype(dtype, op, [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(tile_dim, op, "max(head dim, value dim)", [&](auto dim) {
      constexpr int kD = decltype(dim)::value;
      if constexpr (sizeof(T) == 2 && kD <= 128) {
        // Tensor-core forward (attention_mma.cuh); a 256-wide O would not fit the registers.
        if (f.vec_qk && f.vec_v) {
          RowPassArgs r{};
          r.q = f.q;
          r.k = f.k;
          r.v = f.v;
          r.qspans = nullptr;  // every row: the layer's output needs them all
          r.kpm = f.kpm;
          r.out = f.out;
          r.lse = f.lse;
          r.H = f.H;
          r.Hkv = f.Hkv;
          r.L = f.L;
          r.d = f.d;
          r.dv = f.dv;
          r.lse_stride = f.L;
          r.lse_by_position = true;
          r.scale_log2 = f.scale_log2;
          r.causal = f.causal;
          constexpr int bytes = row_pass_smem_bytes<T, kD, true>();
          set_smem(row_pass_mma_kernel<T, kD, true>, bytes, op);
          row_pass_mma_kernel<T, kD, true><<<grid, kThreads, bytes, s>>>(r);
          return;
        }
      }
      constexpr int bytes = flash_smem_bytes<T, kD>();
      set_smem(flash_forward_kernel<T, kD>, bytes, op);
      flash_forward_kernel<T, kD><<<grid, kThreads, bytes, s>>>(f);
    });
  });
  VTPRUNE_CUDA_CHECK(cudaGetLastError());

  ScoreArgs a{};
  a.q = f.q;
  a.k = f.k;
  a.qspans = reinterpret_cast<const std::int64_t*>(query_spans);
  a.kspans = reinterpret_cast<const std::int64_t*>(key_spans);
  a.kpm = f.kpm;
  a.lse = f.lse;
  a.part = reinterpret_cast<float*>(partial);
  a.B = static_cast<int>(batch);
  a.H = f.H;
  a.Hkv = f.Hkv;
  a.L = f.L;
  a.d = f.d;
  a.Qm = f.L;  // only the grid of pass 1 uses Qm, and pass 1 does not run
  a.Km = static_cast<int>(max_keys);
  a.lse_stride = length;
  a.lse_by_position = true;
  a.scale_log2 = f.scale_log2;
  a.causal = causal;
  a.vec = f.vec_qk;
  launch_column_sums(a, dtype, false, s);
  launch_finalize(a, reinterpret_cast<float*>(scores), 0, s);
}

}  // namespace vtprune
