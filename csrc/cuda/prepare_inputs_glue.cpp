// Torch glue of the CUDA input preparation: argument checks, layout choice, allocation, stream, launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "check.h"
#include "prepare_inputs.cuh"

namespace jedi {
namespace {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: JEDI_CHECK(false, "prepare_inputs: x_t must be float16/bfloat16/float32/float64, got ", t);
  }
}

bool is_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

at::Tensor prepare_inputs_cuda(const at::Tensor& x_t_in, const at::Tensor& x0_in, const at::Tensor& mask_in) {
  JEDI_CHECK(x_t_in.is_cuda(), "prepare_inputs: x_t must be a CUDA tensor");
  JEDI_CHECK(x_t_in.dim() == 4, "prepare_inputs: x_t must be (N, C, H, W), got ", x_t_in.sizes());
  JEDI_CHECK(x0_in.sizes() == x_t_in.sizes(), "prepare_inputs: x0 must have x_t's shape ", x_t_in.sizes(), ", got ",
             x0_in.sizes());
  JEDI_CHECK(x0_in.scalar_type() == x_t_in.scalar_type(), "prepare_inputs: x0 must have x_t's dtype");
  JEDI_CHECK(x0_in.device() == x_t_in.device() && mask_in.device() == x_t_in.device(),
             "prepare_inputs: x0 and ng_mask must be on x_t's device");
  JEDI_CHECK(mask_in.dim() == 1 && mask_in.size(0) == x_t_in.size(0), "prepare_inputs: ng_mask must be (N,) with N = ",
             x_t_in.size(0), ", got ", mask_in.sizes());
  const c10::cuda::CUDAGuard guard(x_t_in.device());
  const bool cl = is_channels_last(x_t_in);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor x_t = x_t_in.contiguous(fmt), x0 = x0_in.contiguous(fmt);
  at::Tensor m = mask_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({x_t.size(0), 2 * x_t.size(1) + 1, x_t.size(2), x_t.size(3)},
                             x_t.options().memory_format(fmt));
  PrepareParams p{x_t.data_ptr(), x0.data_ptr(), m.data_ptr<float>(), out.data_ptr(),
                  x_t.size(0),    x_t.size(1),   x_t.size(2) * x_t.size(3), cl};
  const cudaError_t err = prepare_inputs_launch(p, to_dtype(x_t.scalar_type()), c10::cuda::getCurrentCUDAStream());
  JEDI_CHECK(err == cudaSuccess, "prepare_inputs: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

std::tuple<at::Tensor, at::Tensor> prepare_inputs_backward_cuda(const at::Tensor& grad_in, const at::Tensor& mask_in,
                                                                int64_t channels) {
  JEDI_CHECK(grad_in.is_cuda(), "prepare_inputs_backward: grad_out must be a CUDA tensor");
  JEDI_CHECK(grad_in.dim() == 4 && grad_in.size(1) == 2 * channels + 1,
             "prepare_inputs_backward: grad_out must be (N, 2*channels+1, H, W), got ", grad_in.sizes());
  JEDI_CHECK(mask_in.dim() == 1 && mask_in.size(0) == grad_in.size(0), "prepare_inputs_backward: ng_mask must be (N,)");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const bool cl = is_channels_last(grad_in);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor g = grad_in.contiguous(fmt);
  at::Tensor m = mask_in.to(at::kFloat).contiguous();
  auto opts = g.options().memory_format(fmt);
  at::Tensor gx = at::empty({g.size(0), channels, g.size(2), g.size(3)}, opts);
  at::Tensor g0 = at::empty({g.size(0), channels, g.size(2), g.size(3)}, opts);
  PrepareBackwardParams p{g.data_ptr(), m.data_ptr<float>(), gx.data_ptr(), g0.data_ptr(),
                          g.size(0),    channels,            g.size(2) * g.size(3), cl};
  const cudaError_t err =
      prepare_inputs_backward_launch(p, to_dtype(g.scalar_type()), c10::cuda::getCurrentCUDAStream());
  JEDI_CHECK(err == cudaSuccess, "prepare_inputs_backward: CUDA launch failed: ", cudaGetErrorString(err));
  return {gx, g0};
}

}  // namespace

TORCH_LIBRARY_IMPL(jedi, CUDA, m) {
  m.impl("prepare_inputs_ext", &prepare_inputs_cuda);
  m.impl("prepare_inputs_backward_ext", &prepare_inputs_backward_cuda);
}

}  // namespace jedi
