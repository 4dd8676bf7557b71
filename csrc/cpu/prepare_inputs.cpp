// CPU kernels of JeDi's input preparation: out = cat(x_t, x0 * (1 - m), m), one pass over memory.
// Contiguous (NCHW) and channels-last (NHWC) layouts each get a streaming loop; other layouts are made contiguous.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "check.h"

namespace jedi {
namespace {

void check_inputs(const at::Tensor& x_t, const at::Tensor& x0, const at::Tensor& m) {
  JEDI_CHECK(x_t.dim() == 4, "prepare_inputs: x_t must be (N, C, H, W), got ", x_t.sizes());
  JEDI_CHECK(x0.sizes() == x_t.sizes(), "prepare_inputs: x0 must have x_t's shape ", x_t.sizes(), ", got ",
             x0.sizes());
  JEDI_CHECK(x0.scalar_type() == x_t.scalar_type(), "prepare_inputs: x0 must have x_t's dtype");
  JEDI_CHECK(m.dim() == 1 && m.size(0) == x_t.size(0), "prepare_inputs: ng_mask must be (N,) with N = ",
             x_t.size(0), ", got ", m.sizes());
}

bool is_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

at::Tensor prepare_inputs_cpu(const at::Tensor& x_t_in, const at::Tensor& x0_in, const at::Tensor& mask_in) {
  check_inputs(x_t_in, x0_in, mask_in);
  const bool cl = is_channels_last(x_t_in);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  // one of the two streaming layouts; x0 follows x_t's layout
  at::Tensor x_t = x_t_in.contiguous(fmt), x0 = x0_in.contiguous(fmt);
  at::Tensor m = mask_in.to(at::kFloat).contiguous();
  const int64_t N = x_t.size(0), C = x_t.size(1), HW = x_t.size(2) * x_t.size(3), Co = 2 * C + 1;
  at::Tensor out = at::empty({N, Co, x_t.size(2), x_t.size(3)}, x_t.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "prepare_inputs_cpu", [&] {
    const scalar_t* a = x_t.data_ptr<scalar_t>();
    const scalar_t* b = x0.data_ptr<scalar_t>();
    const float* mp = m.data_ptr<float>();
    scalar_t* o = out.data_ptr<scalar_t>();
    if (!cl) {
      // NCHW: each output plane (n, c) is a copy, a scaled copy or a fill of HW elements
      at::parallel_for(0, N * Co, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const int64_t n = p / Co, c = p % Co;
          scalar_t* dst = o + p * HW;
          if (c < C) {
            std::memcpy(dst, a + (n * C + c) * HW, HW * sizeof(scalar_t));
          } else if (c < 2 * C) {
            // m is 0 or 1: the masked content is a copy or zeros (x0 * 0 == 0 for finite x0, as in the reference)
            const scalar_t* src = b + (n * C + (c - C)) * HW;
            if (mp[n] == 0.0f) {
              std::memcpy(dst, src, HW * sizeof(scalar_t));
            } else {
              const scalar_t keep = static_cast<scalar_t>(1.0f - mp[n]);
              for (int64_t i = 0; i < HW; ++i) dst[i] = src[i] * keep;
            }
          } else {
            std::fill_n(dst, HW, static_cast<scalar_t>(mp[n]));
          }
        }
      });
    } else {
      // NHWC: each pixel (n, hw) writes Co channels from C + C inputs
      at::parallel_for(0, N * HW, 256, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const int64_t n = p / HW;
          const scalar_t keep = static_cast<scalar_t>(1.0f - mp[n]);
          const scalar_t* sa = a + p * C;
          const scalar_t* sb = b + p * C;
          scalar_t* dst = o + p * Co;
          for (int64_t c = 0; c < C; ++c) dst[c] = sa[c];
          for (int64_t c = 0; c < C; ++c) dst[C + c] = sb[c] * keep;
          dst[2 * C] = static_cast<scalar_t>(mp[n]);
        }
      });
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> prepare_inputs_backward_cpu(const at::Tensor& grad_in, const at::Tensor& mask_in,
                                                               int64_t channels) {
  JEDI_CHECK(grad_in.dim() == 4 && grad_in.size(1) == 2 * channels + 1,
             "prepare_inputs_backward: grad_out must be (N, 2*channels+1, H, W), got ", grad_in.sizes());
  JEDI_CHECK(mask_in.dim() == 1 && mask_in.size(0) == grad_in.size(0), "prepare_inputs_backward: ng_mask must be (N,)");
  const bool cl = is_channels_last(grad_in);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor g = grad_in.contiguous(fmt);
  at::Tensor m = mask_in.to(at::kFloat).contiguous();
  const int64_t N = g.size(0), C = channels, HW = g.size(2) * g.size(3), Co = 2 * C + 1;
  auto opts = g.options().memory_format(fmt);
  at::Tensor gx = at::empty({N, C, g.size(2), g.size(3)}, opts), g0 = at::empty({N, C, g.size(2), g.size(3)}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "prepare_inputs_backward_cpu", [&] {
    const scalar_t* src = g.data_ptr<scalar_t>();
    const float* mp = m.data_ptr<float>();
    scalar_t* dx = gx.data_ptr<scalar_t>();
    scalar_t* d0 = g0.data_ptr<scalar_t>();
    if (!cl) {
      at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const int64_t n = p / C, c = p % C;
          const scalar_t keep = static_cast<scalar_t>(1.0f - mp[n]);
          const scalar_t* s1 = src + (n * Co + c) * HW;
          const scalar_t* s2 = src + (n * Co + C + c) * HW;
          for (int64_t i = 0; i < HW; ++i) dx[p * HW + i] = s1[i];
          for (int64_t i = 0; i < HW; ++i) d0[p * HW + i] = s2[i] * keep;
        }
      });
    } else {
      at::parallel_for(0, N * HW, 256, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const scalar_t keep = static_cast<scalar_t>(1.0f - mp[p / HW]);
          const scalar_t* s = src + p * Co;
          for (int64_t c = 0; c < C; ++c) dx[p * C + c] = s[c];
          for (int64_t c = 0; c < C; ++c) d0[p * C + c] = s[C + c] * keep;
        }
      });
    }
  });
  return {gx, g0};
}

}  // namespace

TORCH_LIBRARY_IMPL(jedi, CPU, m) {
  m.impl("prepare_inputs_ext", &prepare_inputs_cpu);
  m.impl("prepare_inputs_backward_ext", &prepare_inputs_backward_cpu);
}

}  // namespace jedi
