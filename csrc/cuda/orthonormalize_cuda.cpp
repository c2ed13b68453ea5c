#include <c10/cuda/CUDAGuard.h>

#include "kernels_cuda.h"

namespace ccsmerge::cuda {

namespace {

constexpr int64_t kLeaf = 64;

// Inverse of a batch of lower-triangular (..., n, n) matrices, n = kLeaf * 2^j,
// by 2 x 2 block recursion: inv([[A, 0], [C, B]]) = [[A^-1, 0], [-B^-1 C A^-1, B^-1]].
// A and B of every level are stacked into one batch, so a level costs two
// batched GEMMs and the leaves one batched triangular solve: a few dozen
// launches, where a triangular solve of the whole l x l matrix takes hundreds.
at::Tensor lower_inverse_pow2(const at::Tensor& lower) {
  const int64_t n = lower.size(-1);
  if (n <= kLeaf) {
    const auto eye = at::eye(n, lower.options()).expand_as(lower);
    return at::linalg_solve_triangular(lower, eye, /*upper=*/false);
  }
  const int64_t h = n / 2;
  const auto a = lower.narrow(-2, 0, h).narrow(-1, 0, h);
  const auto b = lower.narrow(-2, h, h).narrow(-1, h, h);
  const auto c = lower.narrow(-2, h, h).narrow(-1, 0, h);
  const auto both = lower_inverse_pow2(at::cat({a, b}, 0));
  const auto a_inv = both.narrow(0, 0, lower.size(0));
  const auto b_inv = both.narrow(0, lower.size(0), lower.size(0));
  auto out = at::zeros_like(lower);
  out.narrow(-2, 0, h).narrow(-1, 0, h).copy_(a_inv);
  out.narrow(-2, h, h).narrow(-1, h, h).copy_(b_inv);
  out.narrow(-2, h, h).narrow(-1, 0, h).copy_(at::matmul(b_inv, at::matmul(c, a_inv)).neg_());
  return out;
}

// Pads each matrix with an identity block up to a power-of-two size.
at::Tensor lower_inverse(const at::Tensor& lower) {
  const int64_t n = lower.size(-1);
  int64_t size = kLeaf;
  while (size < n) size *= 2;
  const auto flat = lower.reshape({-1, n, n});
  auto padded = at::eye(size, lower.options()).repeat({flat.size(0), 1, 1});
  padded.narrow(-2, 0, n).narrow(-1, 0, n).copy_(flat);
  return lower_inverse_pow2(padded).narrow(-2, 0, n).narrow(-1, 0, n).reshape(lower.sizes());
}

}  // namespace

// CholeskyQR2 in float64: two rounds of Q <- Q R^-1, R^T R the Cholesky
// factorisation of the Gram matrix Q^T Q. Every step on the tall panel is a
// GEMM (the small l x l triangle is inverted once and applied as one), where
// Householder QR or a triangular solve over the panel is a long chain of small
// kernels on the GPU. float64 keeps the Gram matrix positive definite for
// condition numbers up to ~1e7; a panel that fails that (or that is
// rank-deficient) falls back to Householder QR. One host sync per call.
at::Tensor orthonormalize(const at::Tensor& y) {
  TORCH_CHECK(y.dim() >= 2, "orthonormalize: expected a (..., rows, l) tensor");
  TORCH_CHECK(y.size(-2) >= y.size(-1), "orthonormalize: panels must be tall, got ",
              y.sizes());
  const c10::cuda::CUDAGuard guard(y.device());
  if (y.numel() == 0) return y.clone();
  const int64_t l = y.size(-1);
  auto q = y.to(at::kDouble);
  const auto eye = at::eye(l, q.options());
  at::Tensor failed;
  for (int round = 0; round < 2; ++round) {
    const auto gram = at::matmul(q.mT(), q);
    auto [lower, info] = at::linalg_cholesky_ex(gram);
    auto round_failed = info.ne(0).any();
    if (round == 1) {
      // After one round the Gram matrix is ~I; far from it means the first
      // factor was too inaccurate for the second round to repair.
      round_failed = round_failed.logical_or((gram - eye).abs().amax().gt(0.1));
    }
    failed = round == 0 ? round_failed : failed.logical_or(round_failed);
    q = at::matmul(q, lower_inverse(lower).mT());  // q R^-1 with R = L^T
  }
  if (failed.item<bool>()) {
    return std::get<0>(at::linalg_qr(y, "reduced")).contiguous();
  }
  return q.to(y.scalar_type());
}

}  // namespace ccsmerge::cuda
