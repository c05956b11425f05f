// The Python module of one of torch_vjp's compiled libraries. Importing it loads the library, which runs
// the library's TORCH_LIBRARY / TORCH_LIBRARY_IMPL registrations; the module itself only carries a few
// facts about the build. TORCH_EXTENSION_NAME (set by torch's build helpers) is the module's name.
#pragma once

#include <Python.h>

#define TVJP_CAT_(a, b) a##b
#define TVJP_CAT(a, b) TVJP_CAT_(a, b)
#define TVJP_STR_(...) #__VA_ARGS__
#define TVJP_STR(...) TVJP_STR_(__VA_ARGS__)

// Defines PyInit_<TORCH_EXTENSION_NAME>. `add_attributes(PyObject* module) -> bool` adds the build's facts
// (false on a Python error).
#define TVJP_PYTHON_MODULE(doc, add_attributes)                                                       \
  PyMODINIT_FUNC TVJP_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {                                      \
    static PyModuleDef definition = {PyModuleDef_HEAD_INIT, TVJP_STR(TORCH_EXTENSION_NAME), doc, -1, \
                                     nullptr, nullptr, nullptr, nullptr, nullptr};                    \
    PyObject* module = PyModule_Create(&definition);                                                  \
    if (module != nullptr && !add_attributes(module)) {                                               \
      Py_DECREF(module);                                                                              \
      return nullptr;                                                                                 \
    }                                                                                                 \
    return module;                                                                                    \
  }
