// contextual_merge (docs/ops.md#contextual_merge, the official VisionDrop / VisionZip rule), per
// batch row: R = non-kept valid positions ascending, n = |R| = length - k, step = max(1, n / C),
// targets T = R[0::step][:C]; every other token of R joins the target of largest cosine similarity
// of `metric` (ties: lower target); contextual_t = x[t] + mean(x[a] joined to t).
//
//   merge_targets_kernel  warp per target: its position (binary search over keep_idx, no scan of
//                         the row) and 1 / max(|m_t|, eps)
//   merge_assign_kernel   warp per position: member? then argmax_t cos(m_a, m_t) -> choice [B, N]
//   merge_output_kernel   block per output row: the dominant rows copied; a contextual row sums its
//                         members in position order (deterministic, fp32) from 16-byte loads
//
// Global scratch: choice [B, N] int32 and 1/|m_t| [B, C]; nothing N x C or N x D.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "vtprune/attention_tiles.cuh"
#include "vtprune/common.cuh"

namespace vtprune {
namespace merge {

using attn::from_float;
using attn::to_float;

constexpr float kNormEps = 1e-12f;  // torch.nn.functional.normalize's eps
constexpr int kWarpsPerBlock = 8;
constexpr int kOutThreads = 128;
// A block covers kOutThreads * kOutVecsPerThread vectors of a row (1024 bf16), so D = 4096 gives
// each contextual token 4 blocks: C = 32 targets fill 128 blocks instead of 32.
constexpr int kOutVecsPerThread = 1;
constexpr int kInFlight = 4;  // member rows loaded before the first is accumulated

struct MergeArgs {
  const void* x;           // [B, N, D]
  const void* metric;      // [B, N, dk]
  const int64_t* keep;     // [B, k] strictly ascending
  const int64_t* lengths;  // [B] or null (= N)
  int64_t* target_idx;     // [B, C]
  float* target_inv_norm;  // [B, C]
  int32_t* choice;         // [B, N] target slot of a member, -1 otherwise
  void* out;               // [B, k + C, D]
  int N, D, dk, k, C;
};

__device__ __forceinline__ int row_length(const MergeArgs& a, int b) {
  return a.lengths == nullptr ? a.N : static_cast<int>(a.lengths[b]);
}

// Number of kept positions < j (lower bound in the ascending keep row).
__device__ __forceinline__ int kept_before(const int64_t* keep, int k, int64_t j) {
  int lo = 0, hi = k;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (keep[mid] < j)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename M>
__device__ __forceinline__ float dot_rows(const M* a, const M* b, int dk, int lane) {
  float s = 0.f;
  for (int c = lane; c < dk; c += kWarpSize) s = fmaf(to_float(a[c]), to_float(b[c]), s);
  return warp_sum(s);
}

// Grid (ceil(C / kWarpsPerBlock), B). Target s is the rest position of rank r = s * step. Since
// keep is strictly ascending, keep[m] - m (the rest positions before keep[m]) is nondecreasing, so
// the number of kept positions before it is #{m : keep[m] - m <= r}, found by binary search.
template <typename M>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize) merge_targets_kernel(MergeArgs a) {
  const int b = blockIdx.y;
  const int s = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (s >= a.C) return;
  const int64_t* keep = a.keep + static_cast<int64_t>(b) * a.k;
  const int n = row_length(a, b) - a.k;
  const int step = max(1, n / a.C);
  const int64_t r = static_cast<int64_t>(s) * step;
  int lo = 0, hi = a.k;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (keep[mid] - mid <= r)
      lo = mid + 1;
    else
      hi = mid;
  }
  const int64_t pos = r + lo;
  const M* mrow = static_cast<const M*>(a.metric) + (static_cast<int64_t>(b) * a.N + pos) * a.dk;
  const float norm = sqrtf(dot_rows(mrow, mrow, a.dk, lane));
  if (lane == 0) {
    a.target_idx[static_cast<int64_t>(b) * a.C + s] = pos;
    a.target_inv_norm[static_cast<int64_t>(b) * a.C + s] = 1.f / fmaxf(norm, kNormEps);
  }
}

// Grid (ceil(N / kWarpsPerBlock), B). The member's metric row is cached in registers (8 floats a
// lane: dk <= 256); longer rows read the rest from L1. Targets' rows are shared by every warp of
// the block, so they stay in L1 too.
template <typename M>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarpSize) merge_assign_kernel(MergeArgs a) {
  constexpr int kCached = 8;
  const int b = blockIdx.y;
  const int j = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (j >= a.N) return;
  int32_t* choice = a.choice + static_cast<int64_t>(b) * a.N;
  const int len = row_length(a, b);
  const int64_t* keep = a.keep + static_cast<int64_t>(b) * a.k;
  const int before = kept_before(keep, a.k, j);
  const bool kept = before < a.k && keep[before] == j;
  const int n = len - a.k;
  const int step = max(1, n / a.C);
  const int rank = j - before;  // rank of j among the rest positions
  const bool target = rank % step == 0 && rank / step < a.C;
  if (j >= len || kept || target) {
    if (lane == 0) choice[j] = -1;
    return;
  }
  const M* metric = static_cast<const M*>(a.metric) + static_cast<int64_t>(b) * a.N * a.dk;
  const M* mj = metric + static_cast<int64_t>(j) * a.dk;
  float cached[kCached];
#pragma unroll
  for (int e = 0; e < kCached; ++e) {
    const int c = lane + kWarpSize * e;
    cached[e] = c < a.dk ? to_float(mj[c]) : 0.f;
  }
  float self = 0.f;
#pragma unroll
  for (int e = 0; e < kCached; ++e) self = fmaf(cached[e], cached[e], self);
  for (int c = lane + kWarpSize * kCached; c < a.dk; c += kWarpSize) {
    self = fmaf(to_float(mj[c]), to_float(mj[c]), self);
  }
  const float inv_self = 1.f / fmaxf(sqrtf(warp_sum(self)), kNormEps);
  const int64_t* targets = a.target_idx + static_cast<int64_t>(b) * a.C;
  const float* inv_norms = a.target_inv_norm + static_cast<int64_t>(b) * a.C;
  float best = -INFINITY;
  int best_slot = 0;
  for (int s = 0; s < a.C; ++s) {
    const M* mt = metric + targets[s] * a.dk;
    float dot = 0.f;
#pragma unroll
    for (int e = 0; e < kCached; ++e) {
      const int c = lane + kWarpSize * e;
      if (c < a.dk) dot = fmaf(cached[e], to_float(mt[c]), dot);
    }
    for (int c = lane + kWarpSize * kCached; c < a.dk; c += kWarpSize) {
      dot = fmaf(to_float(mj[c]), to_float(mt[c]), dot);
    }
    // Both unit vectors' scales applied after the dot, as normalize-then-matmul would within
    // rounding. Strict > keeps the lower target on ties, like torch.argmax.
    const float sim = warp_sum(dot) * inv_self * inv_norms[s];
    if (sim > best) {
      best = sim;
      best_slot = s;
    }
  }
  if (lane == 0) choice[j] = best_slot;
}

// Grid (k + C, B, D chunks), kOutThreads threads. kVec elements per access (16 bytes, or 1 when x
// / out are not 16-byte aligned or D is not a multiple of it).
template <typename T, int kVec>
__global__ void __launch_bounds__(kOutThreads) merge_output_kernel(MergeArgs a) {
  struct alignas(sizeof(T) * kVec) Vec {
    T v[kVec];
  };
  constexpr int kChunk = kOutThreads * kOutVecsPerThread * kVec;  // elements of D per block
  __shared__ int members[kOutThreads];
  __shared__ int scan_scratch[kMaxWarps + 1];
  const int b = blockIdx.y;
  const int r = blockIdx.x;
  const int d0 = blockIdx.z * kChunk;
  const T* x = static_cast<const T*>(a.x) + static_cast<int64_t>(b) * a.N * a.D;
  T* out = static_cast<T*>(a.out) + (static_cast<int64_t>(b) * (a.k + a.C) + r) * a.D;

  if (r < a.k) {  // dominant token: a copy
    const T* src = x + a.keep[static_cast<int64_t>(b) * a.k + r] * a.D;
    for (int c = d0 + threadIdx.x * kVec; c < min(a.D, d0 + kChunk); c += kOutThreads * kVec) {
      *reinterpret_cast<Vec*>(out + c) = *reinterpret_cast<const Vec*>(src + c);
    }
    return;
  }
  const int s = r - a.k;
  const int len = row_length(a, b);
  const int32_t* choice = a.choice + static_cast<int64_t>(b) * a.N;
  float acc[kOutVecsPerThread][kVec] = {};
  int count = 0;
  for (int base = 0; base < len; base += kOutThreads) {
    // Compact this chunk's members of target s into `members`, in position order.
    const int j = base + threadIdx.x;
    const int mine = (j < len && choice[j] == s) ? 1 : 0;
    int total;
    const int slot = block_exclusive_sum(mine, scan_scratch, total);
    if (mine) members[slot] = j;
    __syncthreads();
    // kInFlight member rows' loads are issued before any is added: a target has ~n / C members read
    // one after another, so latency, not bandwidth, bounds a one-at-a-time loop.
    for (int m0 = 0; m0 < total; m0 += kInFlight) {
      Vec vals[kInFlight][kOutVecsPerThread];
#pragma unroll
      for (int f = 0; f < kInFlight; ++f) {
        const T* src = x + static_cast<int64_t>(members[min(m0 + f, total - 1)]) * a.D;
#pragma unroll
        for (int u = 0; u < kOutVecsPerThread; ++u) {
          const int c = d0 + (u * kOutThreads + threadIdx.x) * kVec;
          Vec val{};  // zeros: a missing member or column adds nothing
          if (c < a.D && m0 + f < total) val = *reinterpret_cast<const Vec*>(src + c);
          vals[f][u] = val;
        }
      }
#pragma unroll
      for (int f = 0; f < kInFlight; ++f) {
#pragma unroll
        for (int u = 0; u < kOutVecsPerThread; ++u) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[u][e] += to_float(vals[f][u].v[e]);
        }
      }
    }
    count += total;
    __syncthreads();  // `members` and the scan scratch are rewritten by the next chunk
  }
  const float n_members = static_cast<float>(max(count, 1));
  const T* target = x + a.target_idx[static_cast<int64_t>(b) * a.C + s] * a.D;
#pragma unroll
  for (int u = 0; u < kOutVecsPerThread; ++u) {
    const int c = d0 + (u * kOutThreads + threadIdx.x) * kVec;
    if (c < a.D) {
      const Vec t = *reinterpret_cast<const Vec*>(target + c);
      Vec o;
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        o.v[e] = from_float<T>(to_float(t.v[e]) + acc[u][e] / n_members);
      *reinterpret_cast<Vec*>(out + c) = o;
    }
  }
}

}  // namespace merge
}  // namespace vtprune
