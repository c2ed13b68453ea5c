"""Low-precision arithmetic for the randomized engine, where the accuracy target allows it.

- `centered_product`: op(xs[t] - center) @ rhs (as kernels.centered_matmul) with the centered
  matrix formed in float32 one panel at a time (the difference of two bf16 inputs is exact
  there) and multiplied in the product precision: bf16 GEMMs on CPUs with AVX512-BF16 or AMX,
  TF32 tensor cores on CUDA. The panel's rounding is relative to the task vector D_t, not to
  the weights, so it is far below a bf16 input's own rounding. Forming the difference first
  matters: X R - C R in bf16 would round C at the weights' scale.
- `cholesky_qr`: a basis of each tall panel's column space by CholeskyQR with a float32 Gram
  matrix, its Cholesky factor in float64 and a float32 triangular solve; Householder QR when
  the Gram matrix is too ill-conditioned for that. One round gives a well-conditioned basis of
  the same span (enough between power iterations); two rounds an orthonormal one.

Measured on a 2-core Xeon with AMX (4096 x 4096 by 4096 x 654): a float32 GEMM 70 ms, bf16
12.6 ms; the bf16 centered product with its panels 27-33 ms against ~75 ms in float32.
Householder QR of 4096 x 654 80 ms, one CholeskyQR round 26 ms."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence

import torch

from . import accuracy, kernels
from .numerics import one_thread_factorizations

# Columns (or rows) of the centered panel: ~4 MiB of float32 stays in cache between
# the subtraction, the rounding and the GEMM that reads it.
PANEL_BYTES = 4 << 20
# A CholeskyQR round leaves Q^T Q - I of about eps32 * cond(Y)^2: a panel whose Cholesky
# factor shows a condition number above this goes to Householder QR, and so does one whose
# second round's Gram matrix is off the identity by more than _MAX_ORTHOGONALITY_LOSS (the
# first round too inaccurate for the second to repair), as in the CUDA kernel.
_MAX_GRAM_CONDITION = 0.1 / torch.finfo(torch.float32).eps
_MAX_ORTHOGONALITY_LOSS = 0.1


@functools.cache
def _cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16), so that a bf16
    GEMM is faster than a float32 one (without them oneDNN emulates it, slower)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags)) and torch.backends.mkldnn.is_available()


def rounding_dtype(device: torch.device) -> torch.dtype | None:
    """The precision the fast products round their operands to on this device (for the
    error estimate: TF32 keeps float16's 10-bit mantissa), or None where there is none."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and _cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Fast products apply to float32 computations on a device that has them."""
    return dtype == torch.float32 and rounding_dtype(device) is not None


def product_noise(device: torch.device, centered_rms: float) -> float:
    """Per-entry standard deviation of the fast products' rounding, as a perturbation of
    D (entries of RMS centered_rms): the centered panel, the right-hand side and the
    output are each rounded once (three independent roundings of that size)."""
    return math.sqrt(3.0) * accuracy.rounding_level(rounding_dtype(device)) * centered_rms


@contextlib.contextmanager
def _tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def centered_product(
    xs: Sequence[torch.Tensor], center: torch.Tensor | None, rhs: torch.Tensor, transpose: bool = False
) -> torch.Tensor:
    """(T, rows, l) stack of op(xs[t] - center) @ rhs_t in the device's product precision,
    returned in float32 (rhs: (r, l) shared or (T, r, l), float32)."""
    xs = list(xs)
    x0 = xs[0]
    rows = x0.shape[1] if transpose else x0.shape[0]
    out = torch.empty((len(xs), rows, rhs.shape[-1]), dtype=torch.float32, device=x0.device)
    if x0.device.type == "cuda":
        with _tf32():
            for t, x in enumerate(xs):
                d = _centered(x, center)
                r = rhs if rhs.dim() == 2 else rhs[t]
                torch.mm(d.mT if transpose else d, r, out=out[t])
        return out
    low = torch.bfloat16
    shared = rhs.to(low) if rhs.dim() == 2 else None
    for t, x in enumerate(xs):
        r = shared if shared is not None else rhs[t].to(low)
        if transpose:  # column panels: every output row is one whole product, rounded once
            step = max(16, PANEL_BYTES // (4 * x.shape[0]))
            for s in range(0, x.shape[1], step):
                cols = slice(s, s + step)
                d = _centered(x[:, cols], None if center is None else center[:, cols]).to(low)
                out[t, cols] = d.mT @ r
        else:
            step = max(16, PANEL_BYTES // (4 * x.shape[1]))
            for s in range(0, x.shape[0], step):
                part = slice(s, s + step)
                d = _centered(x[part], None if center is None else center[part]).to(low)
                out[t, part] = d @ r
    return out


def _centered(x: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
    """x - center in float32, a new tensor (never a view of the input)."""
    if center is None:
        return x.to(torch.float32, copy=True)
    return torch.sub(x, center) if x.dtype != torch.float32 else x - center


def basis(y: torch.Tensor, rounds: int = 2) -> torch.Tensor:
    """The fast path's basis of each panel: cholesky_qr on the CPU; on CUDA the compiled
    orthonormalize, which is CholeskyQR2 in float64 already (per-panel host checks would stall it)."""
    if y.device.type == "cpu":
        return cholesky_qr(y, rounds)
    return kernels.orthonormalize(y)


def cholesky_qr(y: torch.Tensor, rounds: int = 2) -> torch.Tensor:
    """A basis of each (rows, l) panel's column space (y: (..., rows, l) float32):
    `rounds` CholeskyQR rounds per panel, Householder QR for a panel whose Gram matrix
    is not numerically positive definite or too ill-conditioned."""
    flat = y.reshape(-1, *y.shape[-2:])
    out = torch.empty_like(flat)
    for i, panel in enumerate(flat):
        q = panel
        for round_ in range(rounds):
            q = _cholesky_round(q, check_identity=round_ > 0)
            if q is None:
                break
        if q is None:
            with one_thread_factorizations(panel.device):
                q = torch.linalg.qr(panel, mode="reduced").Q
        out[i] = q
    return out.reshape(y.shape)


def _cholesky_round(y: torch.Tensor, check_identity: bool) -> torch.Tensor | None:
    """Y R^-1 with R^T R = Y^T Y, or None when the factor is unusable."""
    gram = (y.mT @ y).to(torch.float64)
    if check_identity:
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        if float((gram - eye).abs().amax()) > _MAX_ORTHOGONALITY_LOSS:
            return None
    with one_thread_factorizations(gram.device):
        lower, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return None
    diagonal = lower.diagonal()
    if float(diagonal.min()) <= 0 or float(diagonal.max() / diagonal.min()) ** 2 > _MAX_GRAM_CONDITION:
        return None
    return torch.linalg.solve_triangular(lower.mT.to(y.dtype), y, upper=True, left=False)
