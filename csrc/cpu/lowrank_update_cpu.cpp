#include <ATen/Parallel.h>

#include "../common/checks.h"
#include "kernels_cpu.h"

namespace ccsmerge::cpu {

namespace {
// Rows per block: a block's float32 tile (rows x n) stays small enough to be
// cast while still in cache.
constexpr int64_t kRowsPerBlock = 32;
}  // namespace

at::Tensor lowrank_update(const at::Tensor& center, const at::Tensor& left,
                          const at::Tensor& right, double alpha, at::ScalarType dtype) {
  check_lowrank_update_args(center, left, right, dtype);
  auto out = at::empty(center.sizes(), center.options().dtype(dtype));
  if (center.numel() == 0) return out;
  if (dtype == center.scalar_type()) {
    // Same dtype: one multi-threaded GEMM accumulates straight into the output.
    return at::addmm_out(out, center, left, right, /*beta=*/1, alpha);
  }
  // Narrower output: each row block is updated in the compute dtype and cast
  // at once, so no full-size temporary is ever held.
  const auto c = center.contiguous();
  const auto l = left.contiguous();
  const auto r = right.contiguous();
  const int64_t m = c.size(0);
  at::parallel_for(0, (m + kRowsPerBlock - 1) / kRowsPerBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row = b * kRowsPerBlock;
      const int64_t rows = std::min(kRowsPerBlock, m - row);
      auto tile = at::addmm(c.narrow(0, row, rows), l.narrow(0, row, rows), r, 1, alpha);
      out.narrow(0, row, rows).copy_(tile);
    }
  });
  return out;
}

}  // namespace ccsmerge::cpu
