"""TIES-Merging (Yadav et al. 2023), per tensor: keep each task vector's
top-`density` magnitudes, elect the sign with the larger total mass, and
average the kept values that agree with it. The sign election and disjoint
mean (`elect_and_merge`) serve every TIES-style method; in row blocks the
magnitude threshold is an exact radix selection over the blocks."""

from __future__ import annotations

import math

import torch

from ..numerics import compute_dtype, kth_smallest_magnitude
from .elementwise import _inputs
from .params import DENSITY, LAM
from .spec import Cost, Decision, MethodSpec, Treatment


def task_vectors(xs: list[torch.Tensor], base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, N) flattened theta_t - base in the compute dtype, and the base in it."""
    work = compute_dtype(xs[0].dtype)
    b = base.to(work)
    return torch.stack([x.to(work).reshape(-1) - b.reshape(-1) for x in xs]), b


def elect_and_merge(taus: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """TIES' sign election over (T, N) task vectors whose dropped entries are
    zero: per element, the values whose sign agrees with the sign of their
    sum, averaged (the disjoint mean) or, without normalize, summed (as
    mergekit's TIES-style methods do by default)."""
    elected = torch.sign(taus.sum(0))
    agrees = (torch.sign(taus) == elected) & (taus != 0)
    kept_sum = (taus * agrees).sum(0)
    if not normalize:
        return kept_sum
    kept_count = agrees.sum(0).clamp_(min=1)
    return kept_sum / kept_count


def kept(density: float, numel: int) -> int:
    return max(1, int(density * numel))


def top_magnitudes(taus: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    """taus with every |value| below its row's threshold zeroed (None: all kept)."""
    return taus if threshold is None else taus * (taus.abs() >= threshold.unsqueeze(1))


def whole_threshold(taus: torch.Tensor, keep: int) -> torch.Tensor | None:
    """Per row, the keep-th largest magnitude (values tied with it are all kept)."""
    numel = taus.shape[1]
    if keep >= numel:
        return None
    return taus.abs().kthvalue(numel - keep + 1, dim=1).values


def blocks_threshold(job, rows, spans, keep: int) -> torch.Tensor | None:
    numel = math.prod(job.shape)
    if keep >= numel:
        return None
    return kth_smallest_magnitude(lambda: (task_vectors(*rows(start, stop))[0] for start, stop in spans), numel - keep + 1)


def ties_whole(job, xs, base):
    if math.prod(job.shape) == 0:
        return base.to(job.out_dtype, copy=True)
    taus, b = task_vectors(xs, base)
    taus = top_magnitudes(taus, whole_threshold(taus, kept(job.cfg.density, taus.shape[1])))
    merged = b.reshape(-1) + job.cfg.lam * elect_and_merge(taus)
    return merged.reshape(b.shape).to(job.out_dtype)


def ties_blocks(job, rows, spans, device):
    threshold = blocks_threshold(job, rows, spans, kept(job.cfg.density, math.prod(job.shape)))
    for start, stop in spans:
        taus, b = task_vectors(*rows(start, stop))
        merged = b.reshape(-1) + job.cfg.lam * elect_and_merge(top_magnitudes(taus, threshold))
        yield merged.reshape(b.shape).to(job.out_dtype)


def ties_passes(job) -> int:
    """One pass to merge, plus one per 16 bits of the radix selection."""
    numel = math.prod(job.shape)
    if kept(job.cfg.density, numel) >= numel:
        return 1
    return 1 + 8 * compute_dtype(job.dtype).itemsize // 16


# Task vectors, magnitudes and masks; on a GPU in row blocks also the 64-bit radix digits.
TIES_COST = Cost(
    host=lambda T, has_base, in_b, work, out_b: _inputs(T, has_base, in_b) + 4 * T * work + 2 * work + in_b + out_b,
    device=lambda T, has_base, in_b, work: _inputs(T, has_base, in_b) + 10 * T * work + 2 * work + in_b,
    passes=ties_passes,
)

TIES = Treatment("ties", ties_whole, ties_blocks, TIES_COST)

METHODS = (
    MethodSpec(
        name="ties",
        title="TIES-Merging (Yadav et al. 2023)",
        summary="trim to the top density, elect signs, disjoint mean; base + lam * merged",
        reference="https://arxiv.org/abs/2306.01708",
        params=(LAM.with_default(1.0), DENSITY),
        needs_base=True,
        rule=lambda name, shape, dtype, cfg, T: Decision("ties", None, "elementwise"),
        treatments={"ties": TIES},
        search_axis="density",
    ),
)
