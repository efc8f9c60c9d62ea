// Fresh buffers for large CPU outputs that a kernel writes once, front to back (the gradients).
#pragma once

#include <ATen/ATen.h>

namespace lsa_ext {
namespace cpu {

// A tensor with at::empty_like(like)'s sizes, strides and dtype (uninitialised). Buffers of at
// least 8 MiB come, on Linux, from their own 2 MiB-aligned anonymous mapping advised as
// transparent huge pages: the first write to fresh memory faults every page in, and in a VM a
// 4 KiB fault costs ~1.2 us against ~80 us per 2 MiB huge page (zeroing included), so a 64 MB
// gradient pair spends ~40 ms in faults on 4 KiB pages and ~5 ms on huge pages. (The default
// allocator's 64-byte-aligned blocks leave up to 2 MiB at each end of a buffer on 4 KiB pages.)
// Smaller buffers, other systems, or LSA_EXT_HUGEPAGES=0: at::empty_like(like).
at::Tensor empty_like_for_write(const at::Tensor& like);

// True for outputs of at least 8 MiB: far larger than a core's caches, so the kernels write them
// with streaming stores (and empty_like_for_write gives them huge pages).
bool is_large_output(const at::Tensor& t);

}  // namespace cpu
}  // namespace lsa_ext
