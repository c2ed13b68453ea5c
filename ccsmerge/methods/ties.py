"""TIES-Merging (Yadav et al. 2023), per tensor: keep each task vector's
top-`density` magnitudes (a density per model, as mergekit allows), weigh
it by its model's weight, elect the sign with the larger total mass, and
average the kept values that agree with it (the disjoint mean, divided by
the agreeing models' weights; without `normalize`: their sum). The sign
election (`sign_agreement`) serves every TIES-style method and is mergekit
0.1.5's: where the weighted sum is 0 the elected sign is +. In row blocks
the magnitude thresholds are exact radix selections over the blocks."""

from __future__ import annotations

import math

import torch

from ..numerics import compute_dtype, kth_smallest_magnitude
from ..tensor_values import per_model
from .elementwise import _inputs, combine
from .params import DENSITY, LAM, NORMALIZE, WEIGHT
from .spec import Cost, Decision, MethodSpec, Treatment


def task_vectors(xs: list[torch.Tensor], base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, N) flattened theta_t - base in the compute dtype, and the base in it."""
    work = compute_dtype(xs[0].dtype)
    b = base.to(work)
    return torch.stack([x.to(work).reshape(-1) - b.reshape(-1) for x in xs]), b


def sign_agreement(taus: torch.Tensor) -> torch.Tensor:
    """TIES' sign election over (T, N) task vectors whose dropped entries are
    zero: per element, the nonzero values whose sign is that of their sum
    (+ where the sum is 0)."""
    elected = torch.where(taus.sum(0) >= 0, 1, -1).to(taus.dtype)
    return torch.sign(taus) == elected


def kept(density: float, numel: int) -> int:
    return max(1, int(density * numel))


def keeps(job) -> list[int]:
    """Per model, how many magnitudes its task vector keeps."""
    numel = math.prod(job.shape)
    return [kept(d, numel) for d in per_model(job.cfg.density, job.tasks)]


def top_magnitudes(taus: torch.Tensor, thresholds: list[torch.Tensor | None]) -> torch.Tensor:
    """taus with every |value| below its row's threshold zeroed (None: the row kept whole)."""
    if all(t is None for t in thresholds):
        return taus
    return torch.stack([row if t is None else row * (row.abs() >= t) for row, t in zip(taus, thresholds)])


def whole_thresholds(taus: torch.Tensor, counts: list[int]) -> list[torch.Tensor | None]:
    """Per row, the keep-th largest magnitude (values tied with it are all kept)."""
    numel = taus.shape[1]
    return [None if keep >= numel else row.abs().kthvalue(numel - keep + 1).values for row, keep in zip(taus, counts)]


def blocks_thresholds(job, rows, spans, counts: list[int]) -> list[torch.Tensor | None]:
    numel = math.prod(job.shape)
    if all(keep >= numel for keep in counts):
        return [None] * len(counts)
    ranks = [numel - min(keep, numel) + 1 for keep in counts]
    found = kth_smallest_magnitude(lambda: (task_vectors(*rows(start, stop))[0] for start, stop in spans), ranks)
    return [None if keep >= numel else found[t] for t, keep in enumerate(counts)]


def ties_whole(job, xs, base):
    if math.prod(job.shape) == 0:
        return base.to(job.out_dtype, copy=True)
    taus, b = task_vectors(xs, base)
    taus = top_magnitudes(taus, whole_thresholds(taus, keeps(job)))
    return combine(job, taus, b, sign_agreement).reshape(b.shape).to(job.out_dtype)


def ties_blocks(job, rows, spans, device):
    thresholds = blocks_thresholds(job, rows, spans, keeps(job))
    for start, stop in spans:
        taus, b = task_vectors(*rows(start, stop))
        merged = combine(job, top_magnitudes(taus, thresholds), b, sign_agreement)
        yield merged.reshape(b.shape).to(job.out_dtype)


def ties_passes(job) -> int:
    """One pass to merge, plus one per 16 bits of the radix selection."""
    numel = math.prod(job.shape)
    if all(keep >= numel for keep in keeps(job)):
        return 1
    return 1 + 8 * compute_dtype(job.dtype).itemsize // 16


# Task vectors (plain, weighted and masked), magnitudes and masks; on a GPU in row blocks also the 64-bit radix digits.
TIES_COST = Cost(
    host=lambda T, has_base, in_b, work, out_b: _inputs(T, has_base, in_b) + 6 * T * work + 2 * work + in_b + out_b,
    device=lambda T, has_base, in_b, work: _inputs(T, has_base, in_b) + 12 * T * work + 2 * work + in_b,
    passes=ties_passes,
)

TIES = Treatment("ties", ties_whole, ties_blocks, TIES_COST)

METHODS = (
    MethodSpec(
        name="ties",
        title="TIES-Merging (Yadav et al. 2023)",
        summary="trim to the top density, elect signs, disjoint mean; base + lam * merged",
        reference="https://arxiv.org/abs/2306.01708",
        params=(LAM.with_default(1.0), DENSITY, WEIGHT, NORMALIZE.with_default(True)),
        needs_base=True,
        rule=lambda name, shape, dtype, cfg, T: Decision("ties", None, "elementwise"),
        treatments={"ties": TIES},
        search_axis="density",
        recipe_defaults={"density": 1.0},
    ),
)
