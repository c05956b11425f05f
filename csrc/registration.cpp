// Every schema of torch_vjp, defined once. Kernels are registered per backend in csrc/cpu/ and
// csrc/cuda/; autograd, fake (meta) kernels and vmap rules in torch_vjp/ (Python).
//
// Naming: `op` is the forward, `op_backward` its vector-Jacobian product. A backward op takes the
// gradient first, then what the forward saved, then the forward's non-tensor arguments.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(torch_vjp, m) {
  // Elementwise family (math/elementwise.h). exp, sigmoid, tanh save their output; the rest their input.
  m.def("exp(Tensor input) -> Tensor");
  m.def("exp_backward(Tensor grad_output, Tensor output) -> Tensor");
  m.def("sigmoid(Tensor input) -> Tensor");
  m.def("sigmoid_backward(Tensor grad_output, Tensor output) -> Tensor");
  m.def("tanh(Tensor input) -> Tensor");
  m.def("tanh_backward(Tensor grad_output, Tensor output) -> Tensor");
  m.def("softplus(Tensor input, float beta, float threshold) -> Tensor");
  m.def("softplus_backward(Tensor grad_output, Tensor input, float beta, float threshold) -> Tensor");
  m.def("gelu(Tensor input, str approximate) -> Tensor");
  m.def("gelu_backward(Tensor grad_output, Tensor input, str approximate) -> Tensor");
  m.def("silu(Tensor input) -> Tensor");
  m.def("silu_backward(Tensor grad_output, Tensor input) -> Tensor");
  m.def("mish(Tensor input) -> Tensor");
  m.def("mish_backward(Tensor grad_output, Tensor input) -> Tensor");

  // Softmax family (math/softmax.h).
  m.def("softmax(Tensor input, int dim) -> Tensor");
  m.def("softmax_backward(Tensor grad_output, Tensor output, int dim) -> Tensor");
  m.def("log_softmax(Tensor input, int dim) -> Tensor");
  m.def("log_softmax_backward(Tensor grad_output, Tensor output, int dim) -> Tensor");
  m.def("logsumexp(Tensor input, int dim, bool keepdim) -> Tensor");
  m.def("logsumexp_backward(Tensor grad_output, Tensor input, Tensor output, int dim, bool keepdim) -> Tensor");
}

// `import torch_vjp._C` loads this library, which runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "torch_vjp kernels (registered as torch.ops.torch_vjp)",
                               -1, nullptr};
  return PyModule_Create(&module);
}
