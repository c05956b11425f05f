// Every schema of torch_vjp, defined once. Kernels are registered per backend in csrc/cpu/ (a library of
// their own per CPU capability) and csrc/cuda/ (built into this library); autograd, fake (meta) kernels
// and vmap rules in torch_vjp/ (Python).
//
// Naming: `op` is the forward, `op_backward` its vector-Jacobian product. A backward op takes the
// gradient first, then what the forward saved, then the forward's non-tensor arguments.
#include <torch/library.h>

#include "common/python_module.h"

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

  // Gated family (math/gated.h): f(gate) ⊙ up; the backward returns (grad_gate, grad_up).
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad_output, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("geglu(Tensor gate, Tensor up, str approximate) -> Tensor");
  m.def("geglu_backward(Tensor grad_output, Tensor gate, Tensor up, str approximate) -> (Tensor, Tensor)");

  // Softmax family (math/softmax.h).
  m.def("softmax(Tensor input, int dim) -> Tensor");
  m.def("softmax_backward(Tensor grad_output, Tensor output, int dim) -> Tensor");
  m.def("log_softmax(Tensor input, int dim) -> Tensor");
  m.def("log_softmax_backward(Tensor grad_output, Tensor output, int dim) -> Tensor");
  m.def("logsumexp(Tensor input, int dim, bool keepdim) -> Tensor");
  m.def("logsumexp_backward(Tensor grad_output, Tensor input, Tensor output, int dim, bool keepdim) -> Tensor");

  // Normalization family (math/norm.h). The forwards also return the per-row statistics the VJP needs
  // (mean, rstd; normalize: the norm), in the compute type; output_mask says which gradients to compute
  // (input, weight, bias), and an absent parameter's gradient is None.
  m.def("layer_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight, Tensor? bias, float eps) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, "
        "Tensor? bias, SymInt[] normalized_shape, bool[3] output_mask) -> (Tensor?, Tensor?, Tensor?)");
  // rms_norm scales by offset + weight (Gemma: offset 1); casting_mode "llama" rounds x̂ to the input dtype
  // before the weight multiplies it, "torch" (and "gemma", the same rounding) does not.
  m.def("rms_norm(Tensor input, SymInt[] normalized_shape, Tensor? weight, float eps, float offset=0., "
        "str casting_mode=\"torch\") -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad_output, Tensor input, Tensor rstd, Tensor? weight, SymInt[] normalized_shape, "
        "bool[2] output_mask, float offset=0.) -> (Tensor?, Tensor?)");
  // add_rms_norm / add_layer_norm: s = input + residual (rounded to the input dtype), then the norm of s;
  // they return (y, s, statistics). The VJP op reads s and adds grad_sum (the gradient reaching s from its
  // other uses) into dx, the gradient of both input and residual.
  m.def("add_rms_norm(Tensor input, Tensor residual, SymInt[] normalized_shape, Tensor? weight, float eps, "
        "float offset=0., str casting_mode=\"torch\") -> (Tensor, Tensor, Tensor)");
  m.def("add_rms_norm_backward(Tensor grad_output, Tensor? grad_sum, Tensor sum, Tensor rstd, Tensor? weight, "
        "SymInt[] normalized_shape, bool[2] output_mask, float offset=0.) -> (Tensor?, Tensor?)");
  m.def("add_layer_norm(Tensor input, Tensor residual, SymInt[] normalized_shape, Tensor? weight, Tensor? bias, "
        "float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("add_layer_norm_backward(Tensor grad_output, Tensor? grad_sum, Tensor sum, Tensor mean, Tensor rstd, "
        "Tensor? weight, Tensor? bias, SymInt[] normalized_shape, bool[3] output_mask) -> (Tensor?, Tensor?, Tensor?)");
  m.def("normalize(Tensor input, int dim, float eps) -> (Tensor, Tensor)");
  m.def("normalize_backward(Tensor grad_output, Tensor output, Tensor norm, int dim, float eps) -> Tensor");

  // Rotary position embedding (math/rope.h), transformers' apply_rotary_pos_emb for q and k in one call.
  // The backward is the transposed rotation of the gradients (None where the output took no part); given
  // q and k (saved only when cos or sin require grad) it also returns the gradients of cos and sin.
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin, int unsqueeze_dim) -> (Tensor, Tensor)");
  m.def("rope_backward(Tensor? grad_q, Tensor? grad_k, Tensor cos, Tensor sin, Tensor? q, Tensor? k, "
        "int unsqueeze_dim) -> (Tensor?, Tensor?, Tensor?, Tensor?)");

  // Losses (math/cross_entropy.h). cross_entropy also returns the per-row statistics its VJP needs, the max
  // and log Σ exp(x - max) (their sum is the log-sum-exp, never rounded into one value).
  // fused_linear_cross_entropy returns its loss in the compute type (float32 for half types: the public
  // function rounds it, but under autocast), and with compute_grad=True also the gradients for
  // grad_output = 1 (three matrix products in all); its _backward recomputes the logits chunk by chunk for any
  // grad_output.
  // Class weights (cross_entropy's `weight`, the fused op's `class_weight`, (C,) like torch's weight=) are not
  // differentiable, as torch's.
  // softcap c > 0: the loss of z = c·tanh(x / c) (Gemma 2's final-logit softcapping; 0: off), and then the
  // statistics are z's. lse_square_scale λ > 0: PaLM's z-loss, λ·lse² added to each counted row's loss (0: off).
  // Both default to off, so callers written before them keep working.
  m.def("cross_entropy(Tensor input, Tensor target, Tensor? weight, int ignore_index, str reduction, "
        "float label_smoothing, float softcap=0., float lse_square_scale=0.) -> (Tensor, Tensor, Tensor)");
  m.def("cross_entropy_backward(Tensor grad_output, Tensor input, Tensor target, Tensor? weight, Tensor row_max, "
        "Tensor log_sum, int ignore_index, str reduction, float label_smoothing, float softcap=0., "
        "float lse_square_scale=0.) -> Tensor");
  m.def("fused_linear_cross_entropy(Tensor input, Tensor weight, Tensor target, Tensor? bias, Tensor? class_weight, "
        "int ignore_index, str reduction, float label_smoothing, bool compute_grad, float softcap=0., "
        "float lse_square_scale=0.) -> (Tensor, Tensor?, Tensor?, Tensor?)");
  m.def("fused_linear_cross_entropy_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor target, "
        "Tensor? bias, Tensor? class_weight, int ignore_index, str reduction, float label_smoothing, "
        "float softcap=0., float lse_square_scale=0.) -> (Tensor, Tensor, Tensor?)");
}

namespace {
// `cuda_archs`: the CUDA architectures compiled in ("8.0,9.0"), or None in a CPU-only build.
bool add_cuda_archs(PyObject* module) {
#ifdef TORCH_VJP_WITH_CUDA
  return PyModule_AddStringConstant(module, "cuda_archs", TVJP_STR(TORCH_VJP_CUDA_ARCHS)) == 0;
#else
  Py_INCREF(Py_None);
  if (PyModule_AddObject(module, "cuda_archs", Py_None) == 0) return true;
  Py_DECREF(Py_None);
  return false;
#endif
}
}  // namespace

TVJP_PYTHON_MODULE("torch_vjp's op schemas and CUDA kernels (registered as torch.ops.torch_vjp)", add_cuda_archs)
