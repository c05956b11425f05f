// torch_vjp._direct: each registered op as a Python callable that calls it below autograd.
//
// Why: the Python layer calls an op without recording autograd (no input requires grad) and from inside
// its autograd.Functions (which record the node themselves). Through torch.ops, each such call pays about
// 1 µs for Python-side argument matching and a context manager for the below-autograd guard; for an 8×8
// tensor that is most of the call. Here one pybind11 call does both in C++, like torch's own bindings:
// the GIL is released, and the dispatcher still runs every key above the backend except autograd
// (autocast, functorch batching, Python modes and fake tensors see the call as usual).
//
// make(name, signature, keep_layout) returns the callable for torch_vjp::<name>, or None for a signature
// not listed below (the Python layer then uses torch.ops). The signature spells the schema's argument
// types: T Tensor, f float, i int, b bool, s str. keep_layout: an elementwise op's output keeps the layout
// of its last tensor argument (below; torch_vjp/_ops.py does the same around torch.ops).
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

namespace {

template <class A>
struct PyArg {
  using type = A;
};
template <>
struct PyArg<c10::string_view> {  // pybind11 converts str to std::string; the schema's type is c10's view
  using type = std::string;
};

// An elementwise op keeps the memory format of its last tensor argument (the input, or the VJP op's saved
// tensor), as TensorIterator lays out torch's own elementwise outputs: the tensors are permuted so that
// it is in decreasing-stride order (the kernels then read it contiguously), and the result back.
std::vector<int64_t> stride_order(const at::Tensor& t) {
  std::vector<int64_t> perm(t.dim());
  std::iota(perm.begin(), perm.end(), 0);
  std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) { return t.stride(a) > t.stride(b); });
  return perm;
}

template <class A>
A permuted(A arg, const std::vector<int64_t>&) {
  return arg;
}
at::Tensor permuted(const at::Tensor& t, const std::vector<int64_t>& perm) { return t.permute(perm); }

template <class A>
const at::Tensor* last_tensor(const A&, const at::Tensor* found) {
  return found;
}
const at::Tensor* last_tensor(const at::Tensor& t, const at::Tensor*) { return &t; }

template <class... Args>
py::object bind(const std::string& name, bool keep_layout) {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow(("torch_vjp::" + name).c_str(), "")
                .typed<at::Tensor(Args...)>();
  return py::cpp_function([op, keep_layout](typename PyArg<Args>::type... args) {
    py::gil_scoped_release no_gil;
    at::AutoDispatchBelowAutograd below_autograd;
    if (keep_layout) {
      const at::Tensor* like = nullptr;
      ((like = last_tensor(args, like)), ...);
      if (!like->is_contiguous()) {
        const auto perm = stride_order(*like);
        if (!std::is_sorted(perm.begin(), perm.end())) {
          std::vector<int64_t> inverse(perm.size());
          for (size_t i = 0; i < perm.size(); ++i) inverse[perm[i]] = static_cast<int64_t>(i);
          return op.call(permuted(Args(args), perm)...).permute(inverse);
        }
      }
    }
    return op.call(Args(args)...);
  });
}

py::object make(const std::string& name, const std::string& signature, bool keep_layout) {
  using T = const at::Tensor&;
  using s = c10::string_view;
  if (signature == "T") return bind<T>(name, keep_layout);
  if (signature == "TT") return bind<T, T>(name, keep_layout);
  if (signature == "Tff") return bind<T, double, double>(name, keep_layout);
  if (signature == "TTff") return bind<T, T, double, double>(name, keep_layout);
  if (signature == "Ts") return bind<T, s>(name, keep_layout);
  if (signature == "TTs") return bind<T, T, s>(name, keep_layout);
  if (signature == "Ti") return bind<T, int64_t>(name, keep_layout);
  if (signature == "TTi") return bind<T, T, int64_t>(name, keep_layout);
  if (signature == "Tib") return bind<T, int64_t, bool>(name, keep_layout);
  if (signature == "TTTib") return bind<T, T, T, int64_t, bool>(name, keep_layout);
  return py::none();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "torch_vjp's ops called below autograd, one pybind11 call each (see csrc/python/direct.cpp)";
  m.def("make", &make, py::arg("name"), py::arg("signature"), py::arg("keep_layout"));
}
