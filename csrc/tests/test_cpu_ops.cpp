// ctest: the CPU kernels of the extension, called through the dispatcher exactly as Python calls them, against
// at::cat / slicing references. Prints "N passed, M failed" and exits non-zero on any failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <string>
#include <vector>

namespace {

int passed = 0, failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

at::Tensor reference(const at::Tensor& x_t, const at::Tensor& x0, const at::Tensor& m) {
  auto mm = m.to(x_t.scalar_type()).view({-1, 1, 1, 1});
  return at::cat({x_t, x0 * (1 - mm), mm.expand({x_t.size(0), 1, x_t.size(2), x_t.size(3)})}, 1);
}

}  // namespace

int main() {
  auto fwd = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("jedi::prepare_inputs_ext", "")
                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  auto bwd = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("jedi::prepare_inputs_backward_ext", "")
                 .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t)>();
  at::manual_seed(0);
  const std::vector<std::vector<int64_t>> shapes = {{8, 4, 16, 16}, {1, 3, 7, 7}, {3, 4, 5, 9}, {2, 1, 1, 1}};
  const std::vector<at::ScalarType> dtypes = {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble};
  for (const auto& shape : shapes) {
    for (auto dt : dtypes) {
      for (bool cl : {false, true}) {
        auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
        auto x_t = at::randn(shape).to(dt).contiguous(fmt);
        auto x0 = at::randn(shape).to(dt).contiguous(fmt);
        auto m = at::rand({shape[0]}) < 0.5;
        m.index_put_({0}, true);
        const std::string tag = std::string(c10::toString(dt)) + (cl ? " nhwc " : " nchw ") + c10::str(shape);
        auto out = fwd.call(x_t, x0, m);
        check(at::equal(out, reference(x_t, x0, m)), "forward " + tag);
        auto g = at::randn(out.sizes()).to(dt).contiguous(fmt);
        auto [gx, g0] = bwd.call(g, m, shape[1]);
        auto keep = (1 - m.to(dt)).view({-1, 1, 1, 1});
        check(at::equal(gx, g.narrow(1, 0, shape[1])), "grad x_t " + tag);
        check(at::equal(g0, g.narrow(1, shape[1], shape[1]) * keep), "grad x0 " + tag);
      }
    }
  }
  bool threw = false;
  try {
    fwd.call(at::randn({2, 4, 8}), at::randn({2, 4, 8}), at::ones({2}));
  } catch (const c10::Error&) {
    threw = true;
  }
  check(threw, "rank-3 x_t is rejected");
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
