// topk_keep_order: the k highest scores of each row in ascending position order; same ranking as
// vtprune.reference.topk_keep_order (ties to the lower position, NaN below -inf, -0.0 == +0.0).
//
// One block per row, no host sync. (1) Radix select: scores map to order-preserving uint32 keys and
// four 8-bit passes of a shared histogram find the threshold key (the k-th largest) and how many
// keys equal to it are kept. (2) Compaction: a block-wide prefix sum over position chunks gives
// each kept position its output slot, so the result comes out in position order. The row is re-read
// each pass; at the sizes of interest (N <= 64K floats) it stays in L1/L2.
#pragma once

#include <cstdint>

#include "vtprune/common.cuh"

namespace vtprune {
namespace topk_keep_order_detail {

constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;
constexpr int kRadixPasses = 32 / kRadixBits;
// The bin search lets thread t own bin 255 - t, so a block needs at least kRadixBins threads.
constexpr int kMinThreads = kRadixBins;
constexpr int kMaxThreads = kMaxWarps * kWarpSize;

// a > b as floats iff key(a) > key(b): negatives flip all bits (larger magnitude = smaller key),
// positives set the sign bit. NaN -> 0, below -inf (0x007fffff); -0.0 -> key(+0.0).
__device__ __forceinline__ uint32_t order_key(float x) {
  if (isnan(x)) return 0u;
  uint32_t bits = __float_as_uint(x);
  if (bits == 0x80000000u) bits = 0u;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

struct SharedStorage {
  uint32_t hist[kRadixBins];
  uint32_t warp_sums[kMaxWarps + 1];
  uint32_t prefix;     // selected high bits of the threshold key
  uint32_t remaining;  // rank of the threshold among the keys that match `prefix`
  uint32_t whole_bin;  // 1 when every key matching `prefix` is kept: later passes are unnecessary
};

}  // namespace topk_keep_order_detail

// Grid B, blockDim.x a multiple of 32 in [kMinThreads, kMaxThreads]. Contract: k <= lengths[b];
// a row with fewer valid positions keeps them all and pads its output with -1.
template <typename IdxT>
__global__ void __launch_bounds__(topk_keep_order_detail::kMaxThreads)
    topk_keep_order_kernel(const float* __restrict__ scores, const int64_t* __restrict__ lengths,
                           IdxT* __restrict__ out, int n_cols, int k) {
  namespace detail = topk_keep_order_detail;
  __shared__ detail::SharedStorage smem;

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const float* row = scores + static_cast<int64_t>(blockIdx.x) * n_cols;  // [N]
  IdxT* out_row = out + static_cast<int64_t>(blockIdx.x) * k;             // [k]

  int n = n_cols;
  if (lengths != nullptr) {
    const int64_t len = lengths[blockIdx.x];
    n = len < 0 ? 0 : (len < n_cols ? static_cast<int>(len) : n_cols);
  }
  const uint32_t take = static_cast<uint32_t>(min(k, n));

  // ---- 1. radix select of the threshold key, most significant digit first ----
  uint32_t prefix = 0;  // bits of the threshold found so far
  uint32_t mask = 0;    // which bits of `prefix` are determined
  uint32_t remaining = take;
  for (int pass = 0; pass < detail::kRadixPasses && take > 0; ++pass) {
    const int shift = 32 - detail::kRadixBits * (pass + 1);
    for (int i = tid; i < detail::kRadixBins; i += blockDim.x) smem.hist[i] = 0;
    __syncthreads();

    // `base` is uniform, so the warp intrinsics below always see full warps.
    for (int base = 0; base < n; base += blockDim.x) {
      const int j = base + tid;
      uint32_t digit = 0;
      bool candidate = false;
      if (j < n) {
        const uint32_t key = detail::order_key(row[j]);
        candidate = (key & mask) == prefix;
        digit = (key >> shift) & (detail::kRadixBins - 1);
      }
      // One atomic per distinct digit per warp: ties would otherwise serialise on one address.
      const unsigned active = __ballot_sync(0xffffffffu, candidate);
      if (candidate) {
        const unsigned peers = __match_any_sync(active, digit);
        if (lane == __ffs(peers) - 1) atomicAdd(&smem.hist[digit], __popc(peers));
      }
    }
    __syncthreads();

    // Thread t looks at bin 255 - t, so the exclusive scan counts the candidates in higher bins.
    const int bin = detail::kRadixBins - 1 - tid;
    const uint32_t count = tid < detail::kRadixBins ? smem.hist[bin] : 0u;
    uint32_t total;
    const uint32_t above = block_exclusive_sum(count, smem.warp_sums, total);
    if (tid < detail::kRadixBins && above < remaining && remaining <= above + count) {
      smem.prefix = prefix | (static_cast<uint32_t>(bin) << shift);
      smem.remaining = remaining - above;
      smem.whole_bin = (remaining - above == count) ? 1u : 0u;
    }
    __syncthreads();
    prefix = smem.prefix;
    remaining = smem.remaining;
    mask |= static_cast<uint32_t>(detail::kRadixBins - 1) << shift;
    if (smem.whole_bin) break;
  }

  // ---- 2. compaction: all keys above the threshold, the first `remaining` equal to it ----
  // Kept position j goes to slot greater_before(j) + min(equal_before(j), remaining).
  uint32_t greater_seen = 0;
  uint32_t equal_seen = 0;
  for (int base = 0; base < n && take > 0; base += blockDim.x) {
    const int j = base + tid;
    uint32_t greater = 0;
    uint32_t equal = 0;
    if (j < n) {
      const uint32_t masked = detail::order_key(row[j]) & mask;
      greater = masked > prefix;
      equal = masked == prefix;
    }
    // One scan for both counts: a chunk holds at most 1024 positions, so 16 bits each suffice.
    uint32_t chunk_total;
    const uint32_t before =
        block_exclusive_sum(greater | (equal << 16), smem.warp_sums, chunk_total);
    const uint32_t greater_before = greater_seen + (before & 0xffffu);
    const uint32_t equal_before = equal_seen + (before >> 16);
    if (greater || (equal && equal_before < remaining)) {
      out_row[greater_before + min(equal_before, remaining)] = static_cast<IdxT>(j);
    }
    greater_seen += chunk_total & 0xffffu;
    equal_seen += chunk_total >> 16;
    __syncthreads();  // smem.warp_sums is reused by the next scan
    if (greater_seen + remaining == take && equal_seen >= remaining) break;  // all slots written
  }

  for (uint32_t i = take + tid; i < static_cast<uint32_t>(k); i += blockDim.x) {
    out_row[i] = static_cast<IdxT>(-1);
  }
}

}  // namespace vtprune
