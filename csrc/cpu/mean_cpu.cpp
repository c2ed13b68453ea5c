#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../common/checks.h"
#include "kernels_cpu.h"

namespace ccsmerge::cpu {

namespace {

// Elements per inner block: the accumulator block stays in L1 while the T
// inputs stream through it.
constexpr int64_t kBlock = 2048;

template <typename scalar_t, typename acc_t>
void mean_kernel(const std::vector<const scalar_t*>& inputs, acc_t* out, int64_t n) {
  const auto T = static_cast<int64_t>(inputs.size());
  const acc_t count = static_cast<acc_t>(T);
  at::parallel_for(0, n, 16 * kBlock, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t len = std::min(kBlock, end - b);
      acc_t* o = out + b;
      const scalar_t* x0 = inputs[0] + b;
      for (int64_t i = 0; i < len; ++i) o[i] = static_cast<acc_t>(x0[i]);
      for (int64_t t = 1; t < T; ++t) {
        const scalar_t* x = inputs[t] + b;
        for (int64_t i = 0; i < len; ++i) o[i] += static_cast<acc_t>(x[i]);
      }
      for (int64_t i = 0; i < len; ++i) o[i] /= count;
    }
  });
}

}  // namespace

at::Tensor mean(at::TensorList xs) {
  check_same_stack(xs, "mean");
  const auto& x0 = xs[0];
  TORCH_CHECK(x0.device().is_cpu(), "mean (cpu): tensors must be on the CPU");
  const auto dtype = compute_dtype(x0.scalar_type());
  auto out = at::empty(x0.sizes(), x0.options().dtype(dtype));
  std::vector<at::Tensor> contiguous;
  contiguous.reserve(xs.size());
  for (const auto& x : xs) contiguous.push_back(x.contiguous());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x0.scalar_type(), "ccsmerge_mean_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    std::vector<const scalar_t*> ptrs;
    for (const auto& x : contiguous) ptrs.push_back(x.const_data_ptr<scalar_t>());
    mean_kernel<scalar_t, acc_t>(ptrs, out.mutable_data_ptr<acc_t>(), out.numel());
  });
  return out;
}

}  // namespace ccsmerge::cpu
