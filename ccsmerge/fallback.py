"""Pure-PyTorch implementations of the ccsmerge ops.

They serve any device the compiled library has no kernel for, and they are
what the fake (meta) kernels mirror. Same signatures and results as the
compiled kernels, within floating-point rounding."""

from __future__ import annotations

import torch

from .numerics import compute_dtype


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


def lowrank_update(
    center: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float, dtype: torch.dtype
) -> torch.Tensor:
    return torch.addmm(center, left, right, alpha=alpha).to(dtype)
