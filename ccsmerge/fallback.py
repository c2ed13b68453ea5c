"""Pure-PyTorch implementations of the ccsmerge ops.

They serve any device the compiled library has no kernel for, and they are
what the fake (meta) kernels mirror. Same signatures and results as the
compiled kernels, within floating-point rounding."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def mean(xs: list[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    acc = xs[0].to(compute_dtype(xs[0].dtype), copy=True)
    for x in xs[1:]:
        acc += x.to(acc.dtype)
    acc.div_(len(xs))
    return acc if dtype is None else acc.to(dtype)


def centered_matmul(
    xs: list[torch.Tensor], center: torch.Tensor | None, rhs: torch.Tensor, transpose: bool
) -> torch.Tensor:
    dtype = compute_dtype(xs[0].dtype)
    outs = []
    for t, x in enumerate(xs):
        x = x.to(dtype)
        r = rhs if rhs.dim() == 2 else rhs[t]
        prod = (x.mT if transpose else x) @ r
        if center is not None:
            prod -= (center.mT if transpose else center) @ r
        outs.append(prod)
    return torch.stack(outs)


def orthonormalize(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q.contiguous()


def span_basis(y: torch.Tensor) -> torch.Tensor:
    if y.numel() == 0:
        return torch.zeros_like(y)
    lu, pivots, _ = torch.linalg.lu_factor_ex(y)  # Y = P L U
    lower = lu.tril(-1)
    lower.diagonal(dim1=-2, dim2=-1).fill_(1)
    rows, cols = y.shape[-2:]
    lower = lower.reshape(-1, rows, cols)
    out = torch.empty_like(lower)
    for b, swaps in enumerate(pivots.reshape(-1, cols).tolist()):
        perm = list(range(rows))
        for i, j in enumerate(swaps):  # LAPACK's 1-based sequential row swaps
            perm[i], perm[j - 1] = perm[j - 1], perm[i]
        out[b, perm] = lower[b]
    return out.view(y.shape)


def lowrank_update(
    center: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float, dtype: torch.dtype
) -> torch.Tensor:
    return torch.addmm(center, left, right, alpha=alpha).to(dtype)
