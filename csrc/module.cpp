// The Python module mmr_ext._C: empty. Importing it loads the shared library, whose static
// initialisers register torch.ops.mmr_ext (csrc/ops.cpp and the kernels of each backend).
#include <Python.h>

PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "Native kernels of mmr_ext (see torch.ops.mmr_ext).",
                               -1, nullptr};
  return PyModule_Create(&module);
}
