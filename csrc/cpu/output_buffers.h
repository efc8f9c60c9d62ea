// Fresh buffers for large CPU outputs that a kernel writes once, front to back (the gradients).
#pragma once

#include <ATen/ATen.h>

namespace lsa_ext {
namespace cpu {

// A tensor with at::empty_like(like)'s sizes, strides and dtype (uninitialised).
//
// Buffers of at least 32 MiB come, on Linux, from their own 2 MiB-aligned anonymous mapping
// advised as transparent huge pages. At that size glibc's malloc (which PyTorch's CPU allocator
// uses) maps fresh memory for every allocation anyway (its mmap threshold is capped at 32 MiB),
// and the first write to fresh memory faults every page in: in a VM a 4 KiB fault costs ~1.2 us
// against ~80 us per 2 MiB huge page (zeroing included), so a 64 MB gradient pair spends ~20 ms
// in faults on 4 KiB pages and ~3 ms on huge pages; the default allocator's 64-byte-aligned
// blocks would also leave up to 2 MiB at each end on 4 KiB pages. Buffers of 8 to 32 MiB come
// from the default allocator, which often hands back recycled, already mapped memory (no faults
// at all), with their 2 MiB-aligned interior advised as huge pages for when it does not. Smaller
// buffers, other systems, or LSA_EXT_HUGEPAGES=0: at::empty_like(like).
at::Tensor empty_like_for_write(const at::Tensor& like);

// True for outputs of at least 8 MiB: far larger than a core's caches (and than the inputs'
// share of them), so the kernels write them with streaming stores.
bool is_large_output(const at::Tensor& t);

}  // namespace cpu
}  // namespace lsa_ext
