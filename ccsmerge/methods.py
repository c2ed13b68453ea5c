"""Per-tensor merge methods. Each takes the T input tensors of one name (and
the base's, when the method needs one) already on the compute device, and
returns the merged tensor in the inputs' dtype."""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable

import torch

from . import ops, svd_family
from .config import MergeConfig
from .errors import MergeError
from .fallback import compute_dtype
from .lowrank import centered_exact_svd, centered_randomized_svd
from .selection import lowrank_selected

TensorMerge = Callable[[str, list[torch.Tensor], "torch.Tensor | None", MergeConfig], torch.Tensor]


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed that depends on the name only, not on the order in
    which tensors are merged."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def lowrank_rank(shape: torch.Size, rank_ratio: float) -> int:
    return max(1, int(rank_ratio * min(shape)))


def average(name: str, xs: list[torch.Tensor], base: torch.Tensor | None, cfg: MergeConfig) -> torch.Tensor:
    return ops.mean(xs, xs[0].dtype)


def task_arithmetic(name: str, xs: list[torch.Tensor], base: torch.Tensor | None, cfg: MergeConfig) -> torch.Tensor:
    dtype = compute_dtype(xs[0].dtype)
    b = base.to(dtype)
    total = torch.zeros_like(b)
    for x in xs:
        total += x.to(dtype) - b
    return torch.add(b, total, alpha=cfg.scale).to(xs[0].dtype)


def ties(name: str, xs: list[torch.Tensor], base: torch.Tensor | None, cfg: MergeConfig) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023), per tensor: keep each task vector's
    top-`density` magnitudes, elect the sign with the larger total mass, and
    average the kept values that agree with it."""
    dtype = compute_dtype(xs[0].dtype)
    b = base.to(dtype)
    numel = b.numel()
    if numel == 0:
        return base.clone()
    taus = torch.stack([x.to(dtype).reshape(-1) - b.reshape(-1) for x in xs])  # (T, N)
    keep = max(1, int(cfg.density * numel))
    if keep < numel:
        magnitude = taus.abs()
        # Values tied with the keep-th largest magnitude are all kept.
        threshold = magnitude.kthvalue(numel - keep + 1, dim=1, keepdim=True).values
        taus = taus * (magnitude >= threshold)
    elected = torch.sign(taus.sum(0))
    agrees = (torch.sign(taus) == elected) & (taus != 0)
    kept_sum = (taus * agrees).sum(0)
    kept_count = agrees.sum(0).clamp_(min=1)
    merged = b.reshape(-1) + cfg.scale * kept_sum / kept_count
    return merged.reshape(b.shape).to(xs[0].dtype)


def cart_factors(name: str, xs: list[torch.Tensor], center: torch.Tensor, cfg: MergeConfig):
    """Top-k factors of each centered task matrix xs[t] - center."""
    k = lowrank_rank(xs[0].shape, cfg.rank_ratio)
    if cfg.svd == "exact":
        return centered_exact_svd(xs, center, k)
    return centered_randomized_svd(
        xs,
        center,
        k,
        oversample=cfg.oversample_for(k),
        power_iters=cfg.power_iters_for(),
        seed=tensor_seed(cfg.seed, name),
    )


def cart_update(center: torch.Tensor, factors, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """center + scale * sum_t U_t S_t Vh_t as one GEMM over the concatenated factors."""
    u, s, vh = factors
    T, m, k = u.shape
    left = (u * s.unsqueeze(-2)).permute(1, 0, 2).reshape(m, T * k)
    right = vh.reshape(T * k, -1)
    return ops.lowrank_update(center, left, right, scale, dtype)


def cart_uses_lowrank(name: str, shape: tuple[int, ...], dtype: torch.dtype, cfg: MergeConfig, models: int) -> bool:
    """Whether CART gives this tensor the low-rank step (otherwise it is the average).

    With two models the centered matrices are exact negatives, so their rank-k
    parts cancel and CART is exactly the average."""
    return models > 2 and lowrank_selected(name, shape, dtype, cfg)


def cart(name: str, xs: list[torch.Tensor], base: torch.Tensor | None, cfg: MergeConfig) -> torch.Tensor:
    """CART (Choi et al. 2024): theta_avg + lam * sum_t LowRank_k(theta_t - theta_avg)."""
    center = ops.mean(xs)
    if not cart_uses_lowrank(name, tuple(xs[0].shape), xs[0].dtype, cfg, len(xs)):
        return center.to(xs[0].dtype)
    check_finite(name, center, xs, allow=cfg.allow_nonfinite)
    if cfg.allow_nonfinite and not all_finite(center):
        warn_nonfinite_average(name)
        return center.to(xs[0].dtype)
    return cart_update(center, cart_factors(name, xs, center, cfg), cfg.scale, xs[0].dtype)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. A NaN or Inf anywhere makes the sum
    non-finite, and a sum is ~10x faster than isfinite(); only a sum that
    overflows needs the exact check."""
    # float16 sums overflow (max 65504): sum those in float32.
    total = tensor.sum(dtype=torch.float32) if tensor.dtype == torch.float16 else tensor.sum()
    if bool(torch.isfinite(total)):
        return True
    return bool(torch.isfinite(tensor).all())


def warn_nonfinite_average(name: str) -> None:
    """With allow_nonfinite, a matrix holding NaN/Inf has no SVD: CART gives it the plain average."""
    warnings.warn(f"tensor '{name}': NaN/Inf inputs have no SVD; merged as the average (allow_nonfinite)")


def check_finite(
    name: str, probe: torch.Tensor, xs: list[torch.Tensor], base: torch.Tensor | None = None, *, allow: bool = False
) -> None:
    """Raise MergeError naming the model whose tensor is non-finite, when probe
    (a tensor computed from all inputs) is, unless allow."""
    if allow or all_finite(probe):
        return
    labelled = [(f"model {i}", x) for i, x in enumerate(xs)] + ([("base", base)] if base is not None else [])
    for label, x in labelled:
        if not all_finite(x):
            raise MergeError(f"tensor '{name}': {label} has NaN or Inf values")
    raise MergeError(f"tensor '{name}': the merge overflowed (inputs are finite, the result is not)")


METHODS: dict[str, TensorMerge] = {
    "average": average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "cart": cart,
    "tsv_m": svd_family.tsv_m,
    "iso_c": svd_family.iso_c,
    "iso_cts": svd_family.iso_cts,
}
