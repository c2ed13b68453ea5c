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

// Accumulates in acc_t and rounds once to out_t; with out_t == acc_t the
// block accumulates in the output itself.
template <typename scalar_t, typename acc_t, typename out_t>
void mean_kernel(const std::vector<const scalar_t*>& inputs, out_t* out, int64_t n) {
  const auto T = static_cast<int64_t>(inputs.size());
  const acc_t count = static_cast<acc_t>(T);
  at::parallel_for(0, n, 16 * kBlock, [&](int64_t begin, int64_t end) {
    acc_t local[std::is_same_v<acc_t, out_t> ? 1 : kBlock];
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t len = std::min(kBlock, end - b);
      acc_t* o;
      if constexpr (std::is_same_v<acc_t, out_t>) {
        o = out + b;
      } else {
        o = local;
      }
      const scalar_t* x0 = inputs[0] + b;
      for (int64_t i = 0; i < len; ++i) o[i] = static_cast<acc_t>(x0[i]);
      for (int64_t t = 1; t < T; ++t) {
        const scalar_t* x = inputs[t] + b;
        for (int64_t i = 0; i < len; ++i) o[i] += static_cast<acc_t>(x[i]);
      }
      if constexpr (std::is_same_v<acc_t, out_t>) {
        for (int64_t i = 0; i < len; ++i) o[i] /= count;
      } else {
        out_t* dst = out + b;
        for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<out_t>(o[i] / count);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void mean_into(const std::vector<const scalar_t*>& inputs, at::Tensor& out) {
  const auto n = out.numel();
  switch (out.scalar_type()) {
    case at::kFloat:
      return mean_kernel<scalar_t, acc_t>(inputs, out.mutable_data_ptr<float>(), n);
    case at::kDouble:
      return mean_kernel<scalar_t, acc_t>(inputs, out.mutable_data_ptr<double>(), n);
    case at::kBFloat16:
      return mean_kernel<scalar_t, acc_t>(inputs, out.mutable_data_ptr<at::BFloat16>(), n);
    case at::kHalf:
      return mean_kernel<scalar_t, acc_t>(inputs, out.mutable_data_ptr<at::Half>(), n);
    default:
      TORCH_CHECK(false, "mean: unsupported output dtype ", out.scalar_type());
  }
}

}  // namespace

at::Tensor mean(at::TensorList xs, std::optional<at::ScalarType> dtype) {
  check_same_stack(xs, "mean");
  const auto& x0 = xs[0];
  TORCH_CHECK(x0.device().is_cpu(), "mean (cpu): tensors must be on the CPU");
  const auto out_dtype = mean_out_dtype(x0.scalar_type(), dtype);
  auto out = at::empty(x0.sizes(), x0.options().dtype(out_dtype));
  std::vector<at::Tensor> contiguous;
  contiguous.reserve(xs.size());
  for (const auto& x : xs) contiguous.push_back(x.contiguous());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x0.scalar_type(), "ccsmerge_mean_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    std::vector<const scalar_t*> ptrs;
    for (const auto& x : contiguous) ptrs.push_back(x.const_data_ptr<scalar_t>());
    mean_into<scalar_t, acc_t>(ptrs, out);
  });
  return out;
}

}  // namespace ccsmerge::cpu
