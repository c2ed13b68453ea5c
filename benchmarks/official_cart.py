"""CART the way the paper's reference code does it: the baseline for the benchmarks.

All T state dicts are held in memory; for every 2-D floating weight,
theta_avg = mean_t theta_t, and each task's centered matrix theta_t - theta_avg
goes through a full torch.linalg.svd in float32, is truncated to its top k
singular triplets and reconstructed; the T reconstructions are summed, scaled
by lam and added to theta_avg. Other tensors get theta_avg. Nothing is fused,
sketched or batched: this is the straightforward implementation ccsmerge is
measured against, and (with exact SVDs) the reference for its accuracy.

k = max(1, int(rank_ratio * min(m, n))), as in ccsmerge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

StateDict = dict[str, torch.Tensor]


def rank_for(shape: Sequence[int], rank_ratio: float) -> int:
    return max(1, int(rank_ratio * min(shape)))


def truncated_reconstruction(delta: torch.Tensor, k: int, driver: str | None = None) -> torch.Tensor:
    """U_k diag(S_k) Vh_k of one matrix, through a full SVD."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False, driver=driver)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k, :]


def default_lowrank_filter(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and tensor.is_floating_point()


def cart_tensor(xs: Sequence[torch.Tensor], rank_ratio: float, lam: float, *, device: torch.device | str | None = None,
                driver: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(merged, theta_avg) of one 2-D weight, both float32 on `device`."""
    device = device or xs[0].device
    thetas = [x.to(device=device, dtype=torch.float32) for x in xs]
    avg = sum(thetas) / len(thetas)
    k = rank_for(avg.shape, rank_ratio)
    update = torch.zeros_like(avg)
    for theta in thetas:
        update += truncated_reconstruction(theta - avg, k, driver)
    return avg + lam * update, avg


def official_cart(
    models: Sequence[StateDict],
    rank_ratio: float = 0.12,
    lam: float = 2.0,
    *,
    device: torch.device | str | None = None,
    driver: str | None = None,
    lowrank_filter: Callable[[str, torch.Tensor], bool] = default_lowrank_filter,
) -> StateDict:
    """Merge T state dicts with CART; tensors are computed on `device` (default:
    where they are) and returned on the inputs' device in their dtype."""
    merged: StateDict = {}
    for name, first in models[0].items():
        xs = [sd[name] for sd in models]
        if lowrank_filter(name, first):
            out, _ = cart_tensor(xs, rank_ratio, lam, device=device, driver=driver)
        elif first.is_floating_point():
            out = sum(x.to(device=device or first.device, dtype=torch.float32) for x in xs) / len(xs)
        else:
            out = first.clone()
        merged[name] = out.to(device=first.device, dtype=first.dtype)
    return merged
