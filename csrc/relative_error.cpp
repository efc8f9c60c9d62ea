// Operator schemas of the lsa_ext library and the Python module stub.
//
// The device kernels live beside this file: cpu/relative_error_kernel.cpp registers the CPU
// implementations, cuda/relative_error_kernel.cu the CUDA ones. Autograd and fake (meta)
// implementations are registered from Python (lsa_ext/ops.py).
#include <Python.h>
#include <torch/library.h>

#include "relative_error.h"

namespace {

PyObject* py_cpu_threads_last_call(PyObject*, PyObject*) {
  return PyLong_FromLong(lsa_ext::cpu_threads_last_call());
}

PyObject* py_cpu_openmp_version(PyObject*, PyObject*) {
  return PyLong_FromLong(lsa_ext::cpu_openmp_version());
}

PyMethodDef module_methods[] = {
    {"cpu_threads_last_call", py_cpu_threads_last_call, METH_NOARGS,
     "Threads that ran this thread's last CPU kernel call (1: serial, 0: none yet)."},
    {"cpu_openmp_version", py_cpu_openmp_version, METH_NOARGS,
     "_OPENMP version the CPU kernels were compiled with (0: without OpenMP, serial)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// Importing lsa_ext._C loads this shared library, whose static initialisers register the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "lsa_ext compiled operators", -1, module_methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lsa_ext, m) {
  // Per-sample squared sums for a clean/perturbed pair of one shape [B, ...]:
  //   diff[i] = sum_j (clean[i, j] - perturbed[i, j])^2,  norm[i] = sum_j clean[i, j]^2
  // Outputs are [B], float64 for float64 input, float32 otherwise.
  m.def("sq_sums(Tensor clean, Tensor perturbed) -> (Tensor, Tensor)");
  // grad_clean = 2 (clean - perturbed) grad_diff[i] + 2 clean grad_norm[i]
  // grad_perturbed = -2 (clean - perturbed) grad_diff[i]
  m.def(
      "sq_sums_backward(Tensor grad_diff, Tensor grad_norm, Tensor clean, Tensor perturbed)"
      " -> (Tensor, Tensor)");
  // L layers (any shapes, one batch size B) in one call: outputs are [L, B].
  m.def("sq_sums_multi(Tensor[] cleans, Tensor[] perturbeds) -> (Tensor, Tensor)");
  m.def(
      "sq_sums_multi_backward(Tensor grad_diff, Tensor grad_norm, Tensor[] cleans,"
      " Tensor[] perturbeds) -> (Tensor[], Tensor[])");
  // The comparison measure itself, in one pass: (ratio, diff, norm), each [B], where
  //   ratio[i] = sqrt(diff[i]) / max(sqrt(norm[i]), eps, tiny)
  // (tiny: the input dtype's smallest normal number; see RatioGuard in relative_error.h) and
  // diff/norm are sq_sums' outputs (kept for the backward, which is sq_sums_backward's).
  m.def(
      "relative_error(Tensor clean, Tensor perturbed, float eps) -> (Tensor, Tensor, Tensor)");
  // L layers in one call: outputs are [L, B].
  m.def(
      "relative_error_multi(Tensor[] cleans, Tensor[] perturbeds, float eps)"
      " -> (Tensor, Tensor, Tensor)");
}
