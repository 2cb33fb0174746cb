// The one place where tcfa's op schemas are declared. Each op's math is
// stated in its docstring in tcfa/ops/__init__.py; CPU kernels live in csrc/cpu/ (one
// library per instruction-set level), Triton (CUDA) kernels in tcfa/kernels/
// and are registered from tcfa/ops/registration.py.
#include <Python.h>
#include <torch/library.h>

namespace tcfa {
PyMethodDef* dispatch_methods();  // csrc/cpu_dispatch.cpp
}

extern "C" {
// `import tcfa._C` loads this library, which runs the registrations below and
// those of the CPU forwarders (csrc/cpu_dispatch.cpp).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          tcfa::dispatch_methods()};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(tcfa, m) {
  m.def(
      "softmin(Tensor x, Tensor y, Tensor x_offsets, Tensor y_offsets, Tensor h, "
      "Tensor log_b, float eps, str cost, Tensor? active=None) -> Tensor");
  m.def(
      "softmin_dense(Tensor cost, Tensor x_offsets, Tensor y_offsets, Tensor log_a, "
      "Tensor log_b, Tensor h, float eps, int dim, Tensor? active=None) -> Tensor");
  // Returns (f, g, n_iter, error) after up to max_iter iterations (annealing stages included).
  m.def(
      "sinkhorn_dense(Tensor cost, Tensor x_offsets, Tensor y_offsets, Tensor log_a, "
      "Tensor log_b, Tensor f, Tensor g, float eps, int max_iter, float tol, float tau_a=1.0, "
      "float tau_b=1.0, float[] schedule=[], float omega=1.0, Tensor? symmetric=None) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cost(Tensor x, Tensor y, Tensor x_offsets, Tensor y_offsets, str cost) -> Tensor");
  m.def(
      "barycentric(Tensor x, Tensor y, Tensor x_offsets, Tensor y_offsets, Tensor g, "
      "Tensor log_b, Tensor values, float eps, str cost) -> Tensor");
  // Returns (out, gates, index, z); index and z are empty in dense mode (top_k=None).
  m.def(
      "gated_stitch(Tensor x, Tensor gate_weight, Tensor gate_bias, Tensor U, Tensor V, "
      "Tensor mu_x, Tensor mu_y, int? top_k=None, float temperature=1.0) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Returns the gradients of (x, gate_weight, gate_bias, U, V, mu_x, mu_y).
  m.def(
      "gated_stitch_backward(Tensor grad_out, Tensor x, Tensor gate_weight, "
      "Tensor gate_bias, Tensor U, Tensor V, Tensor mu_x, Tensor mu_y, Tensor gates, "
      "Tensor index, Tensor z, int? top_k=None, float temperature=1.0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "segment_moments(Tensor x, Tensor y, Tensor labels, int num_segments, bool xx=True, "
      "bool yy=True, bool xy=True) -> (Tensor count, Tensor mean_x, Tensor mean_y, "
      "Tensor sxx, Tensor syy, Tensor sxy)");
  // Returns (values, vectors, ok): the k largest eigenpairs, ok[b] false where
  // the kernel's own check failed (the Python wrapper recomputes those).
  m.def("symmetric_top_eigh(Tensor A, int k) -> (Tensor values, Tensor vectors, Tensor ok)");
  // Returns (L, n, n): the upper triangle of each (centred) layer's Gram, zeros below.
  m.def("gram_triu(Tensor[] xs, bool centre=True) -> Tensor");
}
