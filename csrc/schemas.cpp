// Schemas of every op of the compiled extension: the one TORCH_LIBRARY block of namespace "jedi" (the Python module
// init is module.cpp). Kernels register their implementations in csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cpp (CUDA).
// The public, autograd-aware ops (jedi::prepare_inputs, jedi::set_attention_fwd/bwd) are torch.library.custom_op's
// defined in Python; they call these *_ext ops as their "cpu"/"cuda" backends. See docs/CONTRACT.md.
#include <torch/library.h>

TORCH_LIBRARY(jedi, m) {
  m.def("prepare_inputs_ext(Tensor x_t, Tensor x0, Tensor ng_mask) -> Tensor");
  m.def("prepare_inputs_backward_ext(Tensor grad_out, Tensor ng_mask, int channels) -> (Tensor, Tensor)");
  m.def(
      "set_attention_fwd_ext(Tensor q, Tensor k, Tensor v, int set_size, int heads, float scale, "
      "Tensor? set_mask) -> (Tensor, Tensor)");
  m.def(
      "set_attention_bwd_ext(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int set_size, "
      "int heads, float scale, Tensor? set_mask) -> (Tensor, Tensor, Tensor)");
}
