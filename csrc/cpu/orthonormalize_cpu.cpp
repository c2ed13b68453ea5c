#include "kernels_cpu.h"

namespace ccsmerge::cpu {

// Householder QR through LAPACK: robust for any conditioning, and on the CPU
// the thin panels make it about as fast as Cholesky-based schemes.
at::Tensor orthonormalize(const at::Tensor& y) {
  TORCH_CHECK(y.dim() >= 2, "orthonormalize: expected a (..., rows, l) tensor");
  TORCH_CHECK(y.size(-2) >= y.size(-1), "orthonormalize: panels must be tall, got ",
              y.sizes());
  // LAPACK leaves Q column-major; the op's contract is a contiguous result.
  return std::get<0>(at::linalg_qr(y, "reduced")).contiguous();
}

}  // namespace ccsmerge::cpu
