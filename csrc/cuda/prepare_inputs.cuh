// Torch-free interface of the fused input preparation kernels (JeDi: out = cat(x_t, x0 * (1 - m), m)).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace jedi {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Layout of all tensors of one call: NCHW contiguous or NHWC (channels-last) contiguous.
struct PrepareParams {
  const void* x_t;   // (N, C, H, W)
  const void* x0;    // (N, C, H, W)
  const float* mask; // (N,) in {0, 1}
  void* out;         // (N, 2C+1, H, W)
  int64_t N, C, HW;
  bool channels_last;
};

struct PrepareBackwardParams {
  const void* grad_out; // (N, 2C+1, H, W)
  const float* mask;    // (N,)
  void* grad_x_t;       // (N, C, H, W)
  void* grad_x0;        // (N, C, H, W)
  int64_t N, C, HW;
  bool channels_last;
};

cudaError_t prepare_inputs_launch(const PrepareParams& p, DType dtype, cudaStream_t stream);
cudaError_t prepare_inputs_backward_launch(const PrepareBackwardParams& p, DType dtype, cudaStream_t stream);

}  // namespace jedi
