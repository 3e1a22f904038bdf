// Makes the op library importable as `canet_kernels._C`; importing it runs
// the static TORCH_LIBRARY registrations. No Python functions are bound.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C",
                                   "canet op library", -1, nullptr};
  return PyModule_Create(&def);
}
