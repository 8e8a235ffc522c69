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

}  // namespace vtprune
