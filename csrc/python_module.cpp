// Makes the op library importable as `canet_kernels._C`; importing it runs
// the static TORCH_LIBRARY registrations. Binds one introspection function.
#include <Python.h>

#include <ATen/Parallel.h>

namespace {

// at::parallel_for is a header template: the CPU kernels run on several
// threads only if this library was compiled with torch's parallel backend.
PyObject* cpu_parallel(PyObject*, PyObject*) {
#ifdef INTRA_OP_PARALLEL
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"cpu_parallel", cpu_parallel, METH_NOARGS,
     "Whether the CPU kernels were built to run on several threads."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C",
                                   "canet op library", -1, methods};
  return PyModule_Create(&def);
}
