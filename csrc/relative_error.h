// Shared argument checks for the relative-error op family (all devices).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <limits>
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

// The denominator guard of the relative error (the semantics of lsa_ext.reference.ratio and
// eps_floor): the result is sqrt(d) / max(sqrt(n), floor) with floor = max(eps, tiny of the input
// dtype). When floor^2 is a normal number of the accumulation dtype, max(sqrt(n), floor) is
// computed as sqrt(max(n, floor^2)) (as the reference does), else as max(sqrt(n), floor).
struct RatioGuard {
  double floor;      // max(eps, tiny(input dtype))
  bool clamp_norm;   // compare n with floor^2 (true) or sqrt(n) with floor (false)
};

// Validates eps (finite, >= 0) and derives the guard for inputs of dtype `input`.
inline RatioGuard ratio_guard(double eps, at::ScalarType input) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps must be a finite number >= 0, got ", eps);
  double tiny = 0;
  switch (input) {
    case at::kHalf: tiny = 6.103515625e-05; break;  // 2**-14
    case at::kDouble: tiny = std::numeric_limits<double>::min(); break;
    default: tiny = static_cast<double>(std::numeric_limits<float>::min()); break;  // 2**-126
  }
  const double floor = std::max(eps, tiny);
  const double acc_tiny = input == at::kDouble ? std::numeric_limits<double>::min()
                                               : static_cast<double>(std::numeric_limits<float>::min());
  return {floor, floor * floor >= acc_tiny};
}

// sqrt(d) / max(sqrt(n), floor) in the accumulation type T, bitwise as the reference's PyTorch
// ops compute it (IEEE sqrt and division; NaN in d or n propagates). `floor_t` and `floor_sq_t`
// are the guard's floor and floor^2 rounded to T.
template <typename T>
C10_HOST_DEVICE inline T guarded_ratio(T d, T n, T floor_t, T floor_sq_t, bool clamp_norm) {
  T den;
  if (clamp_norm) {
    den = std::sqrt(n < floor_sq_t ? floor_sq_t : n);
  } else {
    const T s = std::sqrt(n);
    den = s < floor_t ? floor_t : s;
  }
  return std::sqrt(d) / den;
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
