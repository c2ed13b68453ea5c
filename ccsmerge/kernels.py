"""The compiled ccsmerge operators' Python wrappers (a leaf module).

Each op runs the compiled kernel for the tensors' device when there is one
(`torch.ops.ccsmerge.*`), and otherwise the pure-PyTorch fallback in
`ccsmerge.fallback`, with a one-time warning. Fake kernels make the compiled
ops traceable by `torch.compile` and usable with fake tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _extension, fallback
from .numerics import one_thread_factorizations

__all__ = ["mean", "centered_matmul", "orthonormalize", "lowrank_update"]


def _native(op: str, device: torch.device) -> bool:
    if _extension.has_kernel(op, device.type):
        return True
    _extension.warn_fallback(op, device.type)
    return False


def mean(xs: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """T-way mean of same-shape floating tensors, summed in input order in
    float32 (float64 for float64 inputs) and returned in that type, or
    rounded once to `dtype` (fused on the CPU: no float32 copy is written)."""
    xs = list(xs)
    if not xs:
        raise ValueError("mean: expected at least one tensor")
    if _native("mean", xs[0].device):
        return torch.ops.ccsmerge.mean.default(xs, dtype)
    return fallback.mean(xs, dtype)


def centered_matmul(
    xs: Sequence[torch.Tensor], center: torch.Tensor | None, rhs: torch.Tensor, transpose: bool = False
) -> torch.Tensor:
    """(T, rows, l) stack of op(xs[t] - center) @ rhs_t, op = transpose or identity.

    rhs is (r, l), shared by every t, or (T, r, l). The centered matrices are
    never formed: the product is xs[t] @ rhs_t - center @ rhs_t."""
    xs = list(xs)
    if not xs:
        raise ValueError("centered_matmul: expected at least one tensor")
    if _native("centered_matmul", xs[0].device):
        return torch.ops.ccsmerge.centered_matmul.default(xs, center, rhs, transpose)
    return fallback.centered_matmul(xs, center, rhs, transpose)


def orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (same shape) of the column space of each tall panel of y."""
    with one_thread_factorizations(y.device):
        if _native("orthonormalize", y.device):
            return torch.ops.ccsmerge.orthonormalize.default(y)
        return fallback.orthonormalize(y)


def lowrank_update(
    center: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float, dtype: torch.dtype
) -> torch.Tensor:
    """center + alpha * left @ right, returned in dtype."""
    if _native("lowrank_update", center.device):
        return torch.ops.ccsmerge.lowrank_update.default(center, left, right, float(alpha), dtype)
    return fallback.lowrank_update(center, left, right, alpha, dtype)


if _extension.loaded:

    @torch.library.register_fake("ccsmerge::mean")
    def _mean_fake(xs, dtype=None):
        return xs[0].new_empty(xs[0].shape, dtype=dtype or fallback.compute_dtype(xs[0].dtype))

    @torch.library.register_fake("ccsmerge::centered_matmul")
    def _centered_matmul_fake(xs, center, rhs, transpose):
        rows = xs[0].shape[1] if transpose else xs[0].shape[0]
        return rhs.new_empty((len(xs), rows, rhs.shape[-1]))

    @torch.library.register_fake("ccsmerge::orthonormalize")
    def _orthonormalize_fake(y):
        return y.new_empty(y.shape)

    @torch.library.register_fake("ccsmerge::lowrank_update")
    def _lowrank_update_fake(center, left, right, alpha, dtype):
        return center.new_empty(center.shape, dtype=dtype)
