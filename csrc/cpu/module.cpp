// The Python module of one CPU-capability build of the CPU kernels (torch_vjp._cpu_<isa>, see setup.py).
// torch_vjp imports exactly one of them, the one torch.backends.cpu.get_cpu_capability() names.
#include "common/python_module.h"

namespace {
bool add_capability(PyObject* module) {
  return PyModule_AddStringConstant(module, "capability", TVJP_STR(CPU_CAPABILITY)) == 0;
}
}  // namespace

TVJP_PYTHON_MODULE("torch_vjp's CPU kernels for one CPU capability (registered as torch.ops.torch_vjp)",
                   add_capability)
