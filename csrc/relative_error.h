// Shared argument checks for the relative-error op family (all devices).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace lsa_ext {

// Accumulation/output dtype: float64 for float64 input, float32 otherwise.
inline at::ScalarType acc_type_for(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Validates one clean/perturbed pair; `what` names the pair in messages ("" or "layer 3: ").
inline void check_pair(const at::Tensor& a, const at::Tensor& b, const std::string& what) {
  TORCH_CHECK_TYPE(
      a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble ||
          a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16,
      what, "clean must be a floating point tensor (float16, bfloat16, float32, float64), got ",
      a.scalar_type());
  TORCH_CHECK_TYPE(
      a.scalar_type() == b.scalar_type(), what, "clean and perturbed must have the same dtype, got ",
      a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_VALUE(
      a.device() == b.device(), what, "clean and perturbed must be on the same device, got ",
      a.device(), " and ", b.device());
  TORCH_CHECK_VALUE(
      a.dim() >= 1, what, "inputs must have a batch dimension [B, ...], got a 0-dim tensor");
  TORCH_CHECK_VALUE(
      a.sizes() == b.sizes(), what, "clean and perturbed must have the same shape, got ",
      a.sizes(), " and ", b.sizes());
}

// Validates lists of pairs: same length, non-empty, one batch size, one dtype and device.
inline void check_lists(at::TensorList as, at::TensorList bs) {
  TORCH_CHECK_VALUE(!as.empty(), "expected at least one layer, got an empty list");
  TORCH_CHECK_VALUE(
      as.size() == bs.size(), "cleans and perturbeds must have the same length, got ", as.size(),
      " and ", bs.size());
  for (size_t l = 0; l < as.size(); ++l) {
    check_pair(as[l], bs[l], "layer " + std::to_string(l) + ": ");
    TORCH_CHECK_VALUE(
        as[l].size(0) == as[0].size(0), "all layers must have the same batch size, layer 0 has ",
        as[0].size(0), " and layer ", l, " has ", as[l].size(0));
    TORCH_CHECK_TYPE(
        as[l].scalar_type() == as[0].scalar_type(), "all layers must have the same dtype, layer 0 is ",
        as[0].scalar_type(), " and layer ", l, " is ", as[l].scalar_type());
    TORCH_CHECK_VALUE(
        as[l].device() == as[0].device(), "all layers must be on the same device, layer 0 is on ",
        as[0].device(), " and layer ", l, " on ", as[l].device());
  }
}

// True when each sample of `t` occupies one dense block of numel/B elements and the tensor is
// non-overlapping and dense (contiguous, channels_last, channels_last_3d...), so a kernel can walk
// sample i as the flat range [i * stride(0), i * stride(0) + numel/B) of the storage.
inline bool sample_major_dense(const at::Tensor& t) {
  if (!t.is_non_overlapping_and_dense()) return false;
  if (t.dim() == 0 || t.size(0) <= 1) return true;
  return t.stride(0) * t.size(0) == t.numel() || t.numel() == 0;
}

// Returns `b` laid out with the same strides as `a` (copy only when they differ), and `a`
// made sample-major dense if it is not.
inline std::pair<at::Tensor, at::Tensor> same_layout(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor aa = sample_major_dense(a) ? a : a.contiguous();
  at::Tensor bb = b;
  if (bb.strides() != aa.strides()) {
    bb = at::empty_strided(aa.sizes(), aa.strides(), b.options());
    bb.copy_(b);
  }
  return {aa, bb};
}

// Parallel-execution facts of the CPU kernels (cpu/relative_error_kernel.cpp), exposed to Python
// as lsa_ext._C.cpu_threads_last_call() / lsa_ext._C.cpu_openmp_version():
// threads that ran the calling thread's last CPU kernel call (1: it ran serially; 0: no call yet),
int cpu_threads_last_call();
// and the _OPENMP version the kernels were compiled with (0: compiled without OpenMP, serial).
int cpu_openmp_version();

}  // namespace lsa_ext
