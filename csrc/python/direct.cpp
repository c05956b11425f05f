// torch_vjp._direct: each registered op as a Python callable that calls it below autograd.
//
// Why: the Python layer calls an op without recording autograd (no input requires grad) and from inside
// its autograd.Functions (which record the node themselves). Through torch.ops, each such call pays about
// 1 µs for Python-side argument matching and a context manager for the below-autograd guard; for an 8×8
// tensor that is most of the call. Here one pybind11 call does both in C++, like torch's own bindings:
// the GIL is released, and the dispatcher still runs every key above the backend except autograd
// (autocast, functorch batching, Python modes and fake tensors see the call as usual).
//
// make(name, signature) returns the callable for torch_vjp::<name>, or None for a signature not listed
// below (the Python layer then uses torch.ops). The signature spells the schema's argument types:
// T Tensor, f float, i int, b bool, s str.
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <string>

namespace {

template <class A>
struct PyArg {
  using type = A;
};
template <>
struct PyArg<c10::string_view> {  // pybind11 converts str to std::string; the schema's type is c10's view
  using type = std::string;
};

template <class... Args>
py::object bind(const std::string& name) {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow(("torch_vjp::" + name).c_str(), "")
                .typed<at::Tensor(Args...)>();
  return py::cpp_function([op](typename PyArg<Args>::type... args) {
    py::gil_scoped_release no_gil;
    at::AutoDispatchBelowAutograd below_autograd;
    return op.call(Args(args)...);
  });
}

py::object make(const std::string& name, const std::string& signature) {
  using T = const at::Tensor&;
  using s = c10::string_view;
  if (signature == "T") return bind<T>(name);
  if (signature == "TT") return bind<T, T>(name);
  if (signature == "Tff") return bind<T, double, double>(name);
  if (signature == "TTff") return bind<T, T, double, double>(name);
  if (signature == "Ts") return bind<T, s>(name);
  if (signature == "TTs") return bind<T, T, s>(name);
  if (signature == "Ti") return bind<T, int64_t>(name);
  if (signature == "TTi") return bind<T, T, int64_t>(name);
  if (signature == "Tib") return bind<T, int64_t, bool>(name);
  if (signature == "TTTib") return bind<T, T, T, int64_t, bool>(name);
  return py::none();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "torch_vjp's ops called below autograd, one pybind11 call each (see csrc/python/direct.cpp)";
  m.def("make", &make, py::arg("name"), py::arg("signature"));
}
