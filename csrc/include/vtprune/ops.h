// Host-side declarations of the launchers in csrc/ops/*.cu, for csrc/bindings.cpp.
// Plain C++ (compiled by the host compiler): pointers are device addresses passed as integers, and
// `stream` is a cudaStream_t handle (0 = legacy default stream), as torch's Stream.cuda_stream
// gives.
#pragma once

#include <cstdint>

namespace vtprune {

// scores [B, N] float32 contiguous, lengths [B] int64 or 0 (every position valid), out [B, k]
// int64.
void topk_keep_order(std::uintptr_t scores, std::uintptr_t lengths, std::uintptr_t out,
                     std::int64_t batch, std::int64_t n, std::int64_t k, std::uintptr_t stream);

// Dtype codes: 0 float32, 1 float16, 2 bfloat16 (vtprune/dispatch.cuh). Spans are int64 [B, 2]
// (start, count); key_padding_mask is bool [B, L] or 0; all tensors contiguous on one device.

// q [B, H, L, d], k [B, Hkv, L, d]; workspaces lse float [B, H, Qm] and partial float [B, H, Km];
// out float [B, Km].
void attention_scores(std::uintptr_t q, std::uintptr_t k, std::uintptr_t query_spans,
                      std::uintptr_t key_spans, std::uintptr_t key_padding_mask, std::uintptr_t lse,
                      std::uintptr_t partial, std::uintptr_t out, std::int64_t batch,
                      std::int64_t heads, std::int64_t kv_heads, std::int64_t length,
                      std::int64_t head_dim, std::int64_t max_queries, std::int64_t max_keys,
                      double scale, bool causal, int dtype, std::uintptr_t stream);

// q [B, H, L, d], k [B, Hkv, L, d], v [B, Hkv, L, dv]; out [B, H, L, dv] in q's dtype; workspaces
// lse float [B, H, L] and partial float [B, H, Km]; scores float [B, Km].
void attention_with_scores(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                           std::uintptr_t query_spans, std::uintptr_t key_spans,
                           std::uintptr_t key_padding_mask, std::uintptr_t out, std::uintptr_t lse,
                           std::uintptr_t partial, std::uintptr_t scores, std::int64_t batch,
                           std::int64_t heads, std::int64_t kv_heads, std::int64_t length,
                           std::int64_t head_dim, std::int64_t value_dim, std::int64_t max_keys,
                           double scale, bool causal, int dtype, std::uintptr_t stream);

// x [B, N, D], metric [B, N, dk], keep_idx int64 [B, k] ascending, lengths int64 [B] or 0;
// outputs target_idx int64 [B, C] and out [B, k + C, D] (x's dtype); workspaces target_inv_norm
// float [B, C] and choice int32 [B, N].
void contextual_merge(std::uintptr_t x, std::uintptr_t metric, std::uintptr_t keep_idx,
                      std::uintptr_t lengths, std::uintptr_t target_idx,
                      std::uintptr_t target_inv_norm, std::uintptr_t choice, std::uintptr_t out,
                      std::int64_t batch, std::int64_t n, std::int64_t dim, std::int64_t metric_dim,
                      std::int64_t k, std::int64_t num_contextual, int x_dtype, int metric_dtype,
                      std::uintptr_t stream);

// a = h U and b = h V float [B, L, R]; visual_spans int64 [B, 2]; workspaces lse float [B, L] and
// partial float [2, B, Vm]; out float [B, Vm].
void lowrank_scores(std::uintptr_t a, std::uintptr_t b, std::uintptr_t visual_spans,
                    std::uintptr_t key_padding_mask, std::uintptr_t lse, std::uintptr_t partial,
                    std::uintptr_t out, std::int64_t batch, std::int64_t length, std::int64_t rank,
                    std::int64_t max_visual, std::uintptr_t stream);
// The projections of lowrank_scores on the tensor cores: a = h U, b = h V (float [M, R] each) from
// 16-bit h [M, D], U, V [D, R] of one dtype (1 fp16, 2 bf16), all contiguous and 16-byte aligned,
// D and R multiples of 8.
void lowrank_project(std::uintptr_t h, std::uintptr_t u, std::uintptr_t v, std::uintptr_t a,
                     std::uintptr_t b, std::int64_t rows, std::int64_t dim, std::int64_t rank,
                     int dtype, std::uintptr_t stream);

// Row kernels of routed_layer (docs/ops.md#routed_layer). x [B, L, D] with unit stride on D and
// batch / row strides in elements (updated in place by routed_add_scatter); idx int64 [B, K];
// weight [D]; delta, mid and out [B, K, D] contiguous; all in one dtype. Indices outside [0, L)
// read zeros and write nothing.

// out = RMSNorm(x[b, idx[b]]) with the weight and eps of a LlamaRMSNorm.
void routed_gather_rmsnorm(std::uintptr_t x, std::uintptr_t idx, std::uintptr_t weight,
                           std::uintptr_t out, std::int64_t batch, std::int64_t length,
                           std::int64_t routed, std::int64_t dim, std::int64_t batch_stride,
                           std::int64_t row_stride, double eps, int dtype, std::uintptr_t stream);

// delta <- x[b, idx[b]] + delta (in place), out = RMSNorm(delta).
void routed_gather_add_rmsnorm(std::uintptr_t x, std::uintptr_t idx, std::uintptr_t delta,
                               std::uintptr_t weight, std::uintptr_t out, std::int64_t batch,
                               std::int64_t length, std::int64_t routed, std::int64_t dim,
                               std::int64_t batch_stride, std::int64_t row_stride, double eps,
                               int dtype, std::uintptr_t stream);

// x[b, idx[b]] = mid + delta (in place; the other rows of x are not touched).
void routed_add_scatter(std::uintptr_t x, std::uintptr_t idx, std::uintptr_t mid,
                        std::uintptr_t delta, std::int64_t batch, std::int64_t length,
                        std::int64_t routed, std::int64_t dim, std::int64_t batch_stride,
                        std::int64_t row_stride, int dtype, std::uintptr_t stream);

}  // namespace vtprune
