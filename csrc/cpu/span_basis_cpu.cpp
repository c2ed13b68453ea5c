#include <vector>

#include "kernels_cpu.h"

namespace ccsmerge::cpu {

// LU with partial pivoting, Y = P L U: the unit lower-trapezoidal P L spans
// what Y spans, has entries of magnitude <= 1, and costs about a quarter of
// the flops of Householder QR (geqrf + orgqr). Only the power iterations use
// it; the final basis that the projection needs stays orthonormal.
at::Tensor span_basis(const at::Tensor& y) {
  TORCH_CHECK(y.dim() >= 2, "span_basis: expected a (..., rows, l) tensor");
  TORCH_CHECK(y.size(-2) >= y.size(-1), "span_basis: panels must be tall, got ", y.sizes());
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble,
              "span_basis: expected float32 or float64, got ", y.scalar_type());
  const int64_t rows = y.size(-2);
  const int64_t l = y.size(-1);
  if (y.numel() == 0) return at::zeros_like(y, at::MemoryFormat::Contiguous);

  // A zero pivot (a rank-deficient panel) leaves a unit column in L, so the
  // basis keeps full rank and still spans Y; the info flag is not an error.
  auto [lower, pivots, info] = at::linalg_lu_factor_ex(y, /*pivot=*/true, /*check_errors=*/false);
  lower.tril_(-1);  // in place: the panel's workspace stays at two copies of y
  lower.diagonal(0, -2, -1).fill_(1);

  // LAPACK's pivots are sequential row swaps (1-based); replaying them on
  // 0..rows-1 gives perm with Y[perm] = L U, so the basis is L scattered back
  // to rows perm.
  const auto batch = lower.reshape({-1, rows, l});
  const auto piv = pivots.reshape({-1, l}).to(at::kLong).contiguous();
  auto out = at::empty({batch.size(0), rows, l}, y.options());
  std::vector<int64_t> perm(rows);
  const auto* piv_data = piv.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch.size(0); ++b) {
    for (int64_t r = 0; r < rows; ++r) perm[r] = r;
    for (int64_t i = 0; i < l; ++i) std::swap(perm[i], perm[piv_data[b * l + i] - 1]);
    const auto index = at::from_blob(perm.data(), {rows}, at::kLong);
    out.select(0, b).index_copy_(0, index, batch.select(0, b));
  }
  return out.view(y.sizes());
}

}  // namespace ccsmerge::cpu
