#include "centered_matmul.h"

#include <algorithm>

#include "checks.h"

namespace ccsmerge {

namespace {

// Rows of a narrower (bf16/fp16) input converted at a time on the CPU: ~4 MiB
// of float32 stays in cache between the conversion and the GEMM that reads it,
// where converting the whole matrix first writes and re-reads a full float32
// copy (and allocates it) in every product of every power iteration.
constexpr int64_t kPanelBytes = int64_t{4} << 20;

// out = op(x) @ r - c (c undefined: no subtraction), x converted to out's
// dtype one row panel at a time. op = transpose sums the panels' products.
void panelled_product(at::Tensor& out, const at::Tensor& x, const at::Tensor& r,
                      const at::Tensor& c, bool transpose) {
  const int64_t rows = x.size(0);
  const int64_t cols = x.size(1);
  const int64_t step = std::max<int64_t>(16, kPanelBytes / (cols * out.element_size()));
  auto panel = at::empty({std::min(step, rows), cols}, out.options());
  if (transpose) {
    if (c.defined()) {
      at::neg_out(out, c);
    } else {
      out.zero_();
    }
  }
  for (int64_t start = 0; start < rows; start += step) {
    const int64_t n = std::min(step, rows - start);
    auto p = panel.narrow(0, 0, n);
    p.copy_(x.narrow(0, start, n));
    if (transpose) {
      out.addmm_(p.t(), r.narrow(0, start, n));  // out += P^T R[start:start+n]
    } else {
      auto out_rows = out.narrow(0, start, n);
      if (c.defined()) {
        at::addmm_out(out_rows, c.narrow(0, start, n), p, r, /*beta=*/-1, /*alpha=*/1);
      } else {
        at::mm_out(out_rows, p, r);
      }
    }
  }
}

}  // namespace

at::Tensor centered_matmul(at::TensorList xs, const std::optional<at::Tensor>& center,
                           const at::Tensor& rhs, bool transpose) {
  check_same_stack(xs, "centered_matmul");
  const auto& x0 = xs[0];
  TORCH_CHECK(x0.dim() == 2, "centered_matmul: expected 2-D tensors, got ", x0.dim(), "-D");
  const auto T = static_cast<int64_t>(xs.size());
  const auto dtype = compute_dtype(x0.scalar_type());
  const int64_t rows = transpose ? x0.size(1) : x0.size(0);
  const int64_t inner = transpose ? x0.size(0) : x0.size(1);
  TORCH_CHECK(rhs.scalar_type() == dtype, "centered_matmul: rhs must be ", dtype, ", got ",
              rhs.scalar_type());
  TORCH_CHECK(rhs.device() == x0.device(), "centered_matmul: rhs is on ", rhs.device(),
              ", xs on ", x0.device());
  const bool shared = rhs.dim() == 2;
  TORCH_CHECK(shared || (rhs.dim() == 3 && rhs.size(0) == T),
              "centered_matmul: rhs must be (r, l) or (T, r, l) with T = ", T, ", got ",
              rhs.sizes());
  TORCH_CHECK(rhs.size(-2) == inner, "centered_matmul: rhs has ", rhs.size(-2),
              " rows, the product needs ", inner);
  const int64_t l = rhs.size(-1);

  auto out = at::empty({T, rows, l}, x0.options().dtype(dtype));

  // The centering is folded into the products: (X_t - C) R_t = X_t R_t - C R_t,
  // and C R_t for every t is one GEMM over the concatenated R_t.
  at::Tensor center_products;  // (T, rows, l) view, or (rows, l) when shared
  if (center.has_value()) {
    const auto& c = *center;
    TORCH_CHECK(c.sizes() == x0.sizes(), "centered_matmul: center has shape ", c.sizes(),
                ", xs have ", x0.sizes());
    TORCH_CHECK(c.scalar_type() == dtype, "centered_matmul: center must be ", dtype, ", got ",
                c.scalar_type());
    const auto c_op = transpose ? c.t() : c;
    if (shared) {
      center_products = at::mm(c_op, rhs);
    } else {
      auto stacked = rhs.permute({1, 0, 2}).reshape({inner, T * l});
      center_products = at::mm(c_op, stacked).view({rows, T, l}).permute({1, 0, 2});
    }
  }

  const bool panelled = x0.is_cpu() && x0.scalar_type() != dtype;
  for (int64_t t = 0; t < T; ++t) {
    auto out_t = out.select(0, t);
    const auto r = shared ? rhs : rhs.select(0, t);
    const auto c_t = !center_products.defined() ? at::Tensor()
                     : shared                   ? center_products
                                                : center_products.select(0, t);
    if (panelled) {
      panelled_product(out_t, xs[t], r, c_t, transpose);
      continue;
    }
    const auto x = xs[t].to(dtype);  // no copy for inputs already in the compute dtype
    const auto x_op = transpose ? x.t() : x;
    if (c_t.defined()) {
      // out_t = -C R_t + X_t R_t in one GEMM (beta = -1).
      at::addmm_out(out_t, c_t, x_op, r, /*beta=*/-1, /*alpha=*/1);
    } else {
      at::mm_out(out_t, x_op, r);
    }
  }
  return out;
}

}  // namespace ccsmerge
