// Python module init of jedi_kernels._C. Importing it (after torch) runs the static registrations of schemas.cpp and
// the kernels; the module itself only reports how it was built.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "jedi_kernels compiled ops (registered in torch.ops.jedi on import)";
  mod.def("with_cuda", []() {
#ifdef JEDI_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
