"""Truncated SVDs of centered matrices: randomized (the engine) and exact.

Both take T same-shape matrices xs and a center C and return the top-k
factors of every D_t = xs[t] - C, batched: U (T, m, k), S (T, k), Vh (T, k, n)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import accuracy, fast_arithmetic, kernels
from .numerics import compute_dtype, one_thread_factorizations


def product_svd(left: torch.Tensor, right: torch.Tensor):
    """U, s, Vh of left @ right (m x R and R x n, R small) without forming it:
    with left = Q_l R_l and right^T = Q_r R_r (thin QRs), left @ right =
    Q_l (R_l R_r^T) Q_r^T, so its SVD is the R x R core's, rotated."""
    with one_thread_factorizations(left.device):
        q_left, r_left = torch.linalg.qr(left)
        q_right, r_right = torch.linalg.qr(right.mT)
        u, s, vh = torch.linalg.svd(r_left @ r_right.mT)
    return q_left @ u, s, vh @ q_right.mT


def sketch_width(k: int, oversample: int, m: int, n: int) -> int:
    return min(k + oversample, m, n)


def gaussian_test_matrix(n: int, width: int, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The Gaussian test matrix, drawn on the CPU whatever the device, so that a
    seed gives the same sketch, and merges that agree up to rounding, on every device."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=generator, dtype=dtype).to(device)


def _check_rank(k: int, m: int, n: int) -> None:
    if not 1 <= k <= min(m, n):
        raise ValueError(f"rank k={k} must be in [1, min(m, n)={min(m, n)}]")


# rows start:stop of the T matrices and of their center (or None), on the compute device.
CenteredRows = Callable[[int, int], "tuple[list[torch.Tensor], torch.Tensor | None]"]


def centered_randomized_svd(
    xs: Sequence[torch.Tensor],
    center: torch.Tensor | None,
    k: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko-Martinsson-Tropp randomized SVD of every xs[t] - center at once
    (the whole matrices as one row block of randomized_svd_over_rows)."""
    xs = list(xs)
    m, n = xs[0].shape
    return randomized_svd_over_rows(
        lambda start, stop: (xs, center),
        (m, n),
        [(0, m)],
        k,
        oversample=oversample,
        power_iters=power_iters,
        seed=seed,
        dtype=compute_dtype(xs[0].dtype),
        device=xs[0].device,
    )


def randomized_svd_over_rows(
    rows: CenteredRows,
    shape: tuple[int, int],
    blocks: list[tuple[int, int]],
    k: int,
    *,
    oversample: int,
    power_iters: int,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
    first_pass: Callable[[list[torch.Tensor], torch.Tensor | None], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized SVD of every D_t = xs[t] - center, reading the matrices one
    row block at a time: Y = D Omega is assembled block by block and D^T Q is
    summed over blocks, so only the (m x l) and (n x l) factors stay whole.
    A whole matrix is one block. One Gaussian test matrix serves all T
    matrices; the centering is folded into each product (ops.centered_matmul);
    every product is re-orthonormalised, so power iterations stay stable in
    float32. first_pass(xs, center) sees every block of the first pass (for
    finiteness checks)."""
    m, n = shape
    _check_rank(k, m, n)
    if oversample < 0 or power_iters < 0:
        raise ValueError("oversample and power_iters must be >= 0")
    width = sketch_width(k, oversample, m, n)
    omega = gaussian_test_matrix(n, width, seed, dtype, device)
    passes = _RowPasses(rows, blocks, m, width, dtype, device)
    q = passes.range_basis(omega, first_pass)  # (T, m, l)
    for _ in range(power_iters):
        q = passes.range_basis(kernels.orthonormalize(passes.transposed_product(q)))
    # B_t = Q_t^T D_t holds D_t's top singular triplets; centered_matmul gives its transpose.
    return top_triplets(q, passes.transposed_product(q), k)


class _RowPasses:
    """The blocked algorithm's two products: orth(D rhs), assembled block by block,
    and D^T q, summed over row blocks. With fast set, the products run in the device's
    low precision (fast_arithmetic.centered_product) and the bases come from CholeskyQR;
    otherwise they are the compiled kernels' float32 (or float64) products and QR."""

    def __init__(self, rows: CenteredRows, blocks, m: int, width: int, dtype, device):
        self.rows, self.blocks, self.m, self.width, self.dtype, self.device = rows, blocks, m, width, dtype, device
        self.whole = blocks == [(0, m)]
        self.fast = False
        self.sketch_energy = 0.0  # ||D_t Omega||_F^2 summed over t, from the first range basis

    def _product(self, xs, center, rhs, transpose=False):
        if self.fast:
            return fast_arithmetic.centered_product(xs, center, rhs, transpose)
        return kernels.centered_matmul(xs, center, rhs, transpose)

    def orthonormalize_rhs(self, bt):  # the next right-hand side: only its span matters
        return fast_arithmetic.basis(bt, rounds=1) if self.fast else kernels.orthonormalize(bt)

    def range_basis(self, rhs, check=None):  # orth(D rhs)
        y = None
        for start, stop in self.blocks:
            xs, center = self.rows(start, stop)
            if check is not None:
                check(xs, center)
            part = self._product(xs, center, rhs)
            if self.whole:
                y = part
                break
            if y is None:
                y = torch.empty((part.shape[0], self.m, self.width), dtype=self.dtype, device=self.device)
            y[:, start:stop] = part
        if check is not None:
            self.sketch_energy = float(torch.linalg.vector_norm(y)) ** 2
        return fast_arithmetic.basis(y, rounds=2) if self.fast else kernels.orthonormalize(y)

    def transposed_product(self, q):  # D^T q, summed over row blocks
        total = None
        for start, stop in self.blocks:
            xs, center = self.rows(start, stop)
            part = self._product(xs, center, q if self.whole else q[:, start:stop].contiguous(), transpose=True)
            total = part if total is None else total.add_(part)
        return total


@dataclass(frozen=True)
class SketchReport:
    """What an adaptive randomized SVD did for one tensor: power iterations run, sketch
    width, the estimated relative error of the update sum_t U_t S_t Vh_t, the target it
    aimed at, the estimated rounding floor of the inputs (what "auto" aims below),
    whether it stopped at the cap above the target, and whether the passes after the
    first ran in low precision (fast_arithmetic)."""

    power_iters: int
    width: int
    estimated_error: float
    target: float
    rounding_floor: float
    reached_cap: bool
    fast_products: bool = False


def adaptive_randomized_svd_over_rows(
    rows: CenteredRows,
    shape: tuple[int, int],
    blocks: list[tuple[int, int]],
    k: int,
    *,
    oversample: int,
    tolerance: float | str,
    max_power_iters: int,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
    storage_dtype: torch.dtype,
    name: str,
    first_pass: Callable[[list[torch.Tensor], torch.Tensor | None], None] | None = None,
    fast: bool = True,
    warn_at_cap: bool = True,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], SketchReport]:
    """randomized_svd_over_rows with as many power iterations as the target needs
    (accuracy.resolve_target of tolerance), at most max_power_iters, with a warning
    naming the tensor when the cap stops it above the target. Every iterate is the
    one the fixed algorithm gives after that many iterations (same products, same
    bytes); each adds, besides its two passes, the eigen-decomposition of its sketch's
    Gram matrix (O(T (n l^2 + l^3))) and a probe of g = 16 columns (O(T (m + n) l g);
    the factors are formed once, at the end), so the estimate needs no extra
    pass over the inputs: it is computed from the sketch the blocked algorithm
    already holds (Q whole, D^T Q summed over blocks). The rounding floor's noise
    level comes from the center's norm, summed in the first pass.

    fast: after the first iterate (always float32), the remaining passes use the device's
    low-precision products (fast_arithmetic) when their own rounding floor, at
    accuracy.FAST_MARGIN times its first-order estimate, takes at most
    accuracy.FAST_SHARE of the target; the estimate then carries that term."""
    m, n = shape
    _check_rank(k, m, n)
    accuracy.check_tolerance(tolerance)
    if tolerance is None:
        raise ValueError("adaptive_randomized_svd_over_rows needs a tolerance")
    if oversample < 0 or max_power_iters < 1:
        raise ValueError("oversample must be >= 0 and max_power_iters >= 1")
    width = sketch_width(k, oversample, m, n)
    omega = gaussian_test_matrix(n, width, seed, dtype, device)
    passes = _RowPasses(rows, blocks, m, width, dtype, device)
    energy = [0.0, 0, 0]  # sum of squares and entry count of the center (or inputs), task count

    def first(xs, center):
        if first_pass is not None:
            first_pass(xs, center)
        reference = [center] if center is not None else xs
        # in the block's own dtype: a float64 copy would overrun the planned memory
        energy[0] += sum(float(torch.linalg.vector_norm(x)) ** 2 for x in reference)
        energy[1] += sum(x.numel() for x in reference)
        energy[2] = len(xs)

    monitor = accuracy.ConvergenceMonitor(accuracy.probe_matrix(n, seed, dtype, device), k, width == min(m, n))
    q = passes.range_basis(omega, first)
    bt = passes.transposed_product(q)
    weights_rms = math.sqrt(energy[0] / max(energy[1], 1))
    noise = accuracy.rounding_noise(storage_dtype, weights_rms, energy[2])
    # The arithmetic's own rounding (the centered products cancel at the weights' scale)
    # bounds how close any iterate gets to the exact update: it enters like a rounding
    # of the inputs to the compute dtype.
    arithmetic_noise = accuracy.rounding_noise(dtype, weights_rms, energy[2])
    # E ||D_t Omega||_F^2 = l ||D_t||_F^2: the centered matrices' RMS, for the fast products' noise
    centered_rms = math.sqrt(passes.sketch_energy / (width * energy[2] * m * n)) if energy[2] else 0.0
    fast_candidate = fast and fast_arithmetic.available(device, dtype)
    fast_floor = 0.0
    iters = 0
    while True:
        # An iterate's estimate needs only the eigen-decomposition of its sketch and the update
        # seen through the probe; the factors are formed once, for the iterate that stops.
        eigen, spectra = _sketch_eigen(bt)
        arithmetic_floor = accuracy.FAST_MARGIN * fast_floor if passes.fast else 0.0
        seen = _probe_update_from_eigen(q, bt, eigen, k, monitor.probe)
        estimate = monitor.observe(seen, spectra, noise_level=arithmetic_floor)
        estimate += accuracy.ARITHMETIC_MARGIN * accuracy.rounding_floor(
            spectra, k, shape, arithmetic_noise, monitor.update_norm
        ) + arithmetic_floor
        floor = accuracy.rounding_floor(spectra, k, shape, noise, monitor.update_norm)
        target = accuracy.resolve_target(tolerance, floor)
        if estimate <= target or iters == max_power_iters:
            break
        if fast_candidate and iters == 0:
            fast_noise = fast_arithmetic.product_noise(device, centered_rms)
            fast_floor = accuracy.rounding_floor(spectra, k, shape, fast_noise, monitor.update_norm)
            passes.fast = accuracy.FAST_MARGIN * fast_floor <= accuracy.FAST_SHARE * target
        # What stays alive is what the fixed algorithm holds: not the previous D^T Q while
        # the next basis is formed.
        del eigen, spectra, seen
        rhs = passes.orthonormalize_rhs(bt)
        del bt
        q = passes.range_basis(rhs)
        del rhs
        bt = passes.transposed_product(q)
        iters += 1
    factors = _factors_from_eigen(q, bt, eigen, k)
    capped = estimate > target
    if capped and warn_at_cap:
        warnings.warn(
            f"tensor '{name}': {iters} power iterations (the cap) leave an estimated update error of "
            f"{estimate:.2%}, above the target {target:.2%}; raise power_iters or oversample, or use svd='exact'"
        )
    return factors, SketchReport(iters, width, estimate, target, floor, capped, passes.fast)


def top_triplets(q: torch.Tensor, bt: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k SVD of Q B from bt = B^T.

    float32: eigenvectors W of the small l x l Gram matrix B B^T in float64
    (twice the working precision, so squaring the spectrum loses nothing the
    float32 factors carry), U = Q W, and sigma v = B^T w, whose norm gives sigma
    with full relative accuracy; 2x faster than an SVD of bt on the CPU, 4-5x
    on the GPU. float64 has no wider type to square into: plain SVD of bt."""
    return _factors_from_eigen(q, bt, _sketch_eigen(bt)[0], k)


def _sketch_eigen(bt):
    """(eigen, spectra) of every B_t from bt = B^T: float32, the eigen-decomposition of the
    l x l Gram matrix B B^T in float64 (eigenvalues ascending); float64, the SVD of bt itself
    (no wider type to square into). spectra: the l singular values (T, l), descending."""
    if bt.dtype == torch.float64:
        with one_thread_factorizations(bt.device):
            eigen = torch.linalg.svd(bt, full_matrices=False)  # bt = v diag(s) wh
        return eigen, eigen.S
    # The float64 copies of the (n x l) B^T are made one task at a time: their
    # memory is that of one task, not T. The l x l eigenproblems stay batched.
    gram = torch.stack([b.mT @ b for b in (bt[t].to(torch.float64) for t in range(bt.shape[0]))])
    with one_thread_factorizations(gram.device):
        eigen = torch.linalg.eigh(gram)
    return eigen, eigen.eigenvalues.clamp_min(0).sqrt().flip(-1)


def _factors_from_eigen(q, bt, eigen, k):
    """The top-k triplets (U, S, Vh) of every Q_t B_t from _sketch_eigen's decomposition."""
    if bt.dtype == torch.float64:
        v, s, wh = eigen
        return q @ wh.mT[..., :k], s[..., :k], v.mT[..., :k, :]
    ws = eigen.eigenvectors[..., -k:]
    dtype = q.dtype
    us, ss, vhs = [], [], []
    for t in range(bt.shape[0]):
        scaled_v = bt[t].to(torch.float64) @ ws[t]  # (n, k) columns sigma_i v_i
        s = torch.linalg.vector_norm(scaled_v, dim=0)
        s, order = s.sort(descending=True)
        w, scaled_v = ws[t][:, order], scaled_v[:, order]
        vh = (scaled_v / s.clamp_min(torch.finfo(torch.float64).tiny)).mT
        del scaled_v
        us.append(q[t] @ w.to(dtype))
        ss.append(s.to(dtype))
        vhs.append(_polar_step(vh).to(dtype))
    return torch.stack(us), torch.stack(ss), torch.stack(vhs)


def _probe_update_from_eigen(q, bt, eigen, k, probe: torch.Tensor) -> torch.Tensor:
    """sum_t U_t S_t Vh_t G (float64, m x g) without forming the factors: U_t S_t Vh_t is
    Q_t W_t W_t^T B_t, the projection of the sketch on its top k left singular vectors,
    so the probe costs O(T (m + n) l g) instead of the factors' O(T (m + n) l k)."""
    if bt.dtype == torch.float64:
        return accuracy.probe_update(_factors_from_eigen(q, bt, eigen, k), probe)
    ws = eigen.eigenvectors[..., -k:]
    seen = None
    for t in range(bt.shape[0]):
        projected = ws[t] @ (ws[t].mT @ (bt[t].mT @ probe).to(torch.float64))  # (l, g)
        part = (q[t] @ projected.to(q.dtype)).to(torch.float64)
        seen = part if seen is None else seen.add_(part)
    return seen


def _polar_step(x: torch.Tensor) -> torch.Tensor:
    """One Newton-Schulz step towards orthonormal rows, X <- 1.5 X - 0.5 X X^T X.

    V from the Gram matrix is orthonormal to ~eps64 * (sigma_1 / sigma_k)^2,
    which exceeds float32's precision once sigma_1 / sigma_k > ~2e4; the step
    squares that error and leaves the rows otherwise in place (zero rows stay zero)."""
    return 1.5 * x - 0.5 * ((x @ x.mT) @ x)


def centered_exact_svd(
    xs: Sequence[torch.Tensor], center: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k factors of every xs[t] - center through torch.linalg.svd (the reference path)."""
    xs = list(xs)
    m, n = xs[0].shape
    _check_rank(k, m, n)
    dtype = compute_dtype(xs[0].dtype)
    us, ss, vhs = [], [], []
    for x in xs:  # one centered matrix alive at a time
        d = x.to(dtype) if center is None else x.to(dtype) - center
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    return torch.stack(us), torch.stack(ss), torch.stack(vhs)


def randomized_svd(
    a: torch.Tensor, k: int, oversample: int = 10, power_iters: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-k randomized SVD of one matrix: U (m, k), S (k,), Vh (k, n), in
    float32 (float64 for float64 input); bf16/fp16 inputs are accepted."""
    if a.dim() != 2:
        raise ValueError(f"randomized_svd: expected a 2-D matrix, got shape {tuple(a.shape)}")
    u, s, vh = centered_randomized_svd(
        [a], None, k, oversample=oversample, power_iters=power_iters, seed=seed
    )
    return u[0], s[0], vh[0]
