// A tiny Python module so that `import xma2_ops._C` loads the library and its op registrations.
// Only the Python build (setup.py) compiles this file; CMake builds the plain library.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "xma2_ops C++ operators", -1, nullptr};
  return PyModule_Create(&def);
}
