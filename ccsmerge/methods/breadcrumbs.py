"""Model Breadcrumbs (Davari & Belilovsky 2024), per task vector and tensor:
drop the largest `gamma` share of the magnitudes (outliers) and the smallest
ones, keeping a `density` share, then task arithmetic (`breadcrumbs`) or
TIES' sign election (`breadcrumbs_ties`); summed unless `normalize`, as in
mergekit (TIES: the disjoint mean).

The counts are mergekit's (`magnitude_outliers`): of N entries, keep
int(density * N) and drop the int(gamma * N) largest, fewer when density +
gamma exceed 1. Entries are ranked by (|value|, flat index), so ties are
broken as a stable ascending sort breaks them, and an entry's fate is
decided by two magnitude thresholds and the tie counts at them: in row blocks
the thresholds are exact radix selections over the blocks, and the merge is
the same as whole, bit for bit."""

from __future__ import annotations

import math

import torch

from ..numerics import compute_dtype, kth_smallest_magnitude
from .dare import NORMALIZE, combined, ties_consensus
from .elementwise import _inputs
from .params import DENSITY, LAM, Param
from .spec import Cost, Decision, MethodSpec, Treatment
from .ties import task_vectors

GAMMA = Param("gamma", float, 0.01, "share of the largest magnitudes dropped as outliers", ge=0.0, le=1.0)


def kept_ranks(density: float, gamma: float, numel: int) -> tuple[int, int] | None:
    """[low, high): the ranks (ascending by |value|, then index) kept, as
    mergekit counts them; None when density >= 1 (all kept, as in mergekit)."""
    if density >= 1:
        return None
    target = int(density * numel)
    top = int(gamma * numel)
    bottom = numel - target - top
    if bottom < 0:  # fewer outliers dropped, to keep `target`
        top += bottom
        bottom = 0
    return bottom, numel - top


class Cuts:
    """Per task row: the magnitudes at ranks low and high - 1 (None when that
    side drops nothing) and how many entries lie strictly below each."""

    def __init__(self, low, high, low_value, high_value, below_low, below_high):
        self.low, self.high = low, high
        self.low_value, self.high_value = low_value, high_value
        self.below_low, self.below_high = below_low, below_high
        self.seen_low = self.seen_high = None  # ties met in earlier blocks

    def keep(self, taus: torch.Tensor) -> torch.Tensor:
        """The kept entries of the next block (T, n) of task vectors."""
        a = taus.abs()
        keep = torch.ones_like(a, dtype=torch.bool)
        if self.low_value is not None:
            at = a == self.low_value.unsqueeze(1)
            rank, self.seen_low = self._tie_ranks(at, self.below_low, self.seen_low)
            keep &= (a > self.low_value.unsqueeze(1)) | (at & (rank >= self.low))
        if self.high_value is not None:
            at = a == self.high_value.unsqueeze(1)
            rank, self.seen_high = self._tie_ranks(at, self.below_high, self.seen_high)
            keep &= (a < self.high_value.unsqueeze(1)) | (at & (rank < self.high))
        return keep

    @staticmethod
    def _tie_ranks(at, below, seen):
        """The rank of each tied entry: the entries below the value, the ties
        in earlier blocks and those before it in this block."""
        if seen is None:
            seen = torch.zeros_like(below)
        counts = at.cumsum(1)
        return below.unsqueeze(1) + seen.unsqueeze(1) + counts - 1, seen + counts[:, -1]


def _whole_cuts(taus: torch.Tensor, low: int, high: int) -> Cuts:
    a = taus.abs()
    numel = a.shape[1]
    low_value = a.kthvalue(low + 1, dim=1).values if low > 0 else None
    high_value = a.kthvalue(high, dim=1).values if high < numel else None
    below = lambda v: None if v is None else (a < v.unsqueeze(1)).sum(1)
    return Cuts(low, high, low_value, high_value, below(low_value), below(high_value))


def _blocks_cuts(job, rows, spans, low: int, high: int) -> Cuts:
    numel = math.prod(job.shape)
    blocks = lambda: (task_vectors(*rows(start, stop))[0] for start, stop in spans)
    low_value = kth_smallest_magnitude(blocks, low + 1) if low > 0 else None
    high_value = kth_smallest_magnitude(blocks, high) if high < numel else None
    below_low = below_high = None
    for taus in blocks():  # the counts below each threshold
        a = taus.abs()
        if low_value is not None:
            n = (a < low_value.unsqueeze(1)).sum(1)
            below_low = n if below_low is None else below_low + n
        if high_value is not None:
            n = (a < high_value.unsqueeze(1)).sum(1)
            below_high = n if below_high is None else below_high + n
    return Cuts(low, high, low_value, high_value, below_low, below_high)


def _breadcrumbs_linear(job, taus, b):
    return b.reshape(-1) + job.cfg.lam * combined(taus, job.cfg.normalize)


def _breadcrumbs_ties(job, taus, b):
    return b.reshape(-1) + job.cfg.lam * ties_consensus(taus, job.cfg.normalize)


def _treatment(name: str, combine) -> Treatment:
    def merge(job, xs, base, cuts):
        taus, b = task_vectors(xs, base)
        if cuts is not None:
            taus = taus * cuts.keep(taus)
        return combine(job, taus, b).reshape(b.shape).to(job.out_dtype)

    def whole(job, xs, base):
        numel = math.prod(job.shape)
        if numel == 0:
            return base.to(job.out_dtype, copy=True)
        ranks = kept_ranks(job.cfg.density, job.cfg.gamma, numel)
        cuts = None if ranks is None else _whole_cuts(task_vectors(xs, base)[0], *ranks)
        return merge(job, xs, base, cuts)

    def blocks(job, rows, spans, device):
        ranks = kept_ranks(job.cfg.density, job.cfg.gamma, math.prod(job.shape))
        cuts = None if ranks is None else _blocks_cuts(job, rows, spans, *ranks)
        for start, stop in spans:
            yield merge(job, *rows(start, stop), cuts)

    return Treatment(name, whole, blocks, BREADCRUMBS_COST)


def breadcrumbs_passes(job) -> int:
    """One pass per 16 bits of each radix selection, one to count below the
    thresholds, and one to merge."""
    numel = math.prod(job.shape)
    ranks = kept_ranks(job.cfg.density, job.cfg.gamma, numel)
    if ranks is None:
        return 1
    low, high = ranks
    selections = (low > 0) + (high < numel)
    return 2 + selections * (8 * compute_dtype(job.dtype).itemsize // 16)


# Task vectors (a list and its stack while they are made), magnitudes, the
# kept values, the masks and two int64 tie ranks per entry; on a GPU in row
# blocks also the 64-bit radix digits.
BREADCRUMBS_COST = Cost(
    host=lambda T, has_base, in_b, work, out_b: _inputs(T, has_base, in_b) + 4 * T * work + 24 * T + 2 * work
    + in_b + out_b,
    device=lambda T, has_base, in_b, work: _inputs(T, has_base, in_b) + 10 * T * work + 24 * T + 2 * work + in_b,
    passes=breadcrumbs_passes,
)

BREADCRUMBS = _treatment("breadcrumbs", _breadcrumbs_linear)
BREADCRUMBS_TIES = _treatment("breadcrumbs-ties", _breadcrumbs_ties)

# mergekit's defaults: density 1 (nothing dropped) unless given, gamma 0.01, lambda 1, no normalize.
BREADCRUMBS_DENSITY = DENSITY.with_default(1.0)


def _everywhere(treatment: str):
    return lambda name, shape, dtype, cfg, T: Decision(treatment, None, "elementwise")


METHODS = (
    MethodSpec(
        name="breadcrumbs",
        title="Model Breadcrumbs (Davari & Belilovsky 2024)",
        summary="drop the largest gamma and the smallest magnitudes, keep density; base + lam * sum_t",
        reference="https://arxiv.org/abs/2312.06795",
        params=(LAM.with_default(1.0), BREADCRUMBS_DENSITY, GAMMA, NORMALIZE),
        needs_base=True,
        rule=_everywhere("breadcrumbs"),
        treatments={"breadcrumbs": BREADCRUMBS},
        search_axis="density",
    ),
    MethodSpec(
        name="breadcrumbs_ties",
        title="Model Breadcrumbs with TIES (Davari & Belilovsky 2024)",
        summary="Breadcrumbs' masks, then TIES' sign election; base + lam * the agreeing values' sum",
        reference="https://arxiv.org/abs/2312.06795",
        params=(LAM.with_default(1.0), BREADCRUMBS_DENSITY, GAMMA, NORMALIZE),
        needs_base=True,
        rule=_everywhere("breadcrumbs-ties"),
        treatments={"breadcrumbs-ties": BREADCRUMBS_TIES},
        search_axis="density",
    ),
)
