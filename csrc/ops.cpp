// Operator schemas of the ccsmerge library. Kernels are registered per device
// in csrc/cpu/ and csrc/cuda/; the Python wrappers live in ccsmerge/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing ccsmerge._C runs the static registrations below; the module itself
// exposes nothing, so it needs no pybind11.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ccsmerge, m) {
  // T-way mean of same-shape tensors, accumulated in float32 (float64 for
  // float64 inputs) and returned in that type, or rounded once to dtype.
  m.def("mean(Tensor[] xs, ScalarType? dtype=None) -> Tensor");
  // out[t] = op(xs[t] - center) @ rhs_t with op = transpose or identity,
  // without materialising xs[t] - center. rhs is (r, l) shared by all t or
  // (T, r, l). Returns (T, rows, l).
  m.def("centered_matmul(Tensor[] xs, Tensor? center, Tensor rhs, bool transpose) -> Tensor");
  // Orthonormal basis of the column space of each (rows, l) panel of y.
  m.def("orthonormalize(Tensor y) -> Tensor");
  // (center + alpha * left @ right) written in dtype.
  m.def("lowrank_update(Tensor center, Tensor left, Tensor right, float alpha, ScalarType dtype) -> Tensor");
}
