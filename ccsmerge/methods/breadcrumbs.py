"""Model Breadcrumbs (Davari & Belilovsky 2024), per task vector and tensor:
drop the largest `gamma` share of the magnitudes (outliers) and the smallest
ones, keeping a `density` share (density and gamma per model, as mergekit
allows), then mergekit's generalized task arithmetic (elementwise.combine:
per-model weights; TIES' sign election for `breadcrumbs_ties`); summed
unless `normalize`, as in mergekit.

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
from ..tensor_values import per_model
from .elementwise import _inputs, combine
from .params import DENSITY, LAM, NORMALIZE, WEIGHT, Param
from .spec import Cost, Decision, MethodSpec, Treatment
from .ties import sign_agreement, task_vectors

GAMMA = Param("gamma", float, 0.01, "share of the largest magnitudes dropped as outliers", ge=0.0, le=1.0,
              per_model=True)


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


def row_ranks(job) -> tuple[list[int], list[int], list[bool]] | None:
    """Per model: the kept ranks [low, high) and whether it is kept whole
    (its density >= 1); None when every model is kept whole."""
    numel = math.prod(job.shape)
    densities = per_model(job.cfg.density, job.tasks)
    gammas = per_model(job.cfg.gamma, job.tasks)
    ranks = [kept_ranks(d, g, numel) for d, g in zip(densities, gammas)]
    if all(r is None for r in ranks):
        return None
    lows = [0 if r is None else r[0] for r in ranks]
    highs = [numel if r is None else r[1] for r in ranks]
    return lows, highs, [r is None for r in ranks]


class Cuts:
    """Per task row: the kept ranks [low, high), the magnitudes at ranks low
    and high - 1 (None when no row drops anything on that side) and how many
    entries lie strictly below each; rows kept whole are left alone."""

    def __init__(self, ranks, low_value, high_value, below_low, below_high, device):
        lows, highs, whole = ranks
        self.low = torch.tensor(lows, dtype=torch.int64, device=device).unsqueeze(1)
        self.high = torch.tensor(highs, dtype=torch.int64, device=device).unsqueeze(1)
        self.whole = torch.tensor(whole, dtype=torch.bool, device=device).unsqueeze(1)
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
        return keep | self.whole

    @staticmethod
    def _tie_ranks(at, below, seen):
        """The rank of each tied entry: the entries below the value, the ties
        in earlier blocks and those before it in this block."""
        if seen is None:
            seen = torch.zeros_like(below)
        counts = at.cumsum(1)
        return below.unsqueeze(1) + seen.unsqueeze(1) + counts - 1, seen + counts[:, -1]


def _sides(ranks, numel: int) -> tuple[bool, bool]:
    """Whether any row drops low magnitudes, and whether any drops outliers."""
    lows, highs, _ = ranks
    return any(low > 0 for low in lows), any(high < numel for high in highs)


def _whole_cuts(taus: torch.Tensor, ranks) -> Cuts:
    a = taus.abs()
    numel = a.shape[1]
    lows, highs, _ = ranks
    has_low, has_high = _sides(ranks, numel)
    select = lambda ks: torch.stack([row.kthvalue(k).values for row, k in zip(a, ks)])
    low_value = select([low + 1 for low in lows]) if has_low else None
    high_value = select(highs) if has_high else None
    below = lambda v: None if v is None else (a < v.unsqueeze(1)).sum(1)
    return Cuts(ranks, low_value, high_value, below(low_value), below(high_value), taus.device)


def _blocks_cuts(job, rows, spans, ranks, device) -> Cuts:
    numel = math.prod(job.shape)
    lows, highs, _ = ranks
    has_low, has_high = _sides(ranks, numel)
    blocks = lambda: (task_vectors(*rows(start, stop))[0] for start, stop in spans)
    low_value = kth_smallest_magnitude(blocks, [low + 1 for low in lows]) if has_low else None
    high_value = kth_smallest_magnitude(blocks, highs) if has_high else None
    below_low = below_high = None
    for taus in blocks():  # the counts below each threshold
        a = taus.abs()
        if low_value is not None:
            n = (a < low_value.unsqueeze(1)).sum(1)
            below_low = n if below_low is None else below_low + n
        if high_value is not None:
            n = (a < high_value.unsqueeze(1)).sum(1)
            below_high = n if below_high is None else below_high + n
    return Cuts(ranks, low_value, high_value, below_low, below_high, device)


def _breadcrumbs_linear(job, taus, b):
    return combine(job, taus, b)


def _breadcrumbs_ties(job, taus, b):
    return combine(job, taus, b, sign_agreement)


def _treatment(name: str, combination) -> Treatment:
    def merge(job, xs, base, cuts):
        taus, b = task_vectors(xs, base)
        if cuts is not None:
            taus = taus * cuts.keep(taus)
        return combination(job, taus, b).reshape(b.shape).to(job.out_dtype)

    def whole(job, xs, base):
        numel = math.prod(job.shape)
        if numel == 0:
            return base.to(job.out_dtype, copy=True)
        ranks = row_ranks(job)
        cuts = None if ranks is None else _whole_cuts(task_vectors(xs, base)[0], ranks)
        return merge(job, xs, base, cuts)

    def blocks(job, rows, spans, device):
        ranks = row_ranks(job)
        cuts = None if ranks is None else _blocks_cuts(job, rows, spans, ranks, device)
        for start, stop in spans:
            yield merge(job, *rows(start, stop), cuts)

    return Treatment(name, whole, blocks, BREADCRUMBS_COST)


def breadcrumbs_passes(job) -> int:
    """One pass per 16 bits of each radix selection, one to count below the
    thresholds, and one to merge."""
    numel = math.prod(job.shape)
    ranks = row_ranks(job)
    if ranks is None:
        return 1
    selections = sum(_sides(ranks, numel))
    return 2 + selections * (8 * compute_dtype(job.dtype).itemsize // 16)


# Task vectors (a list and its stack while they are made), magnitudes, the
# kept values, the masks and two int64 tie ranks per entry; on a GPU in row
# blocks also the 64-bit radix digits.
BREADCRUMBS_COST = Cost(
    host=lambda T, has_base, in_b, work, out_b: _inputs(T, has_base, in_b) + 6 * T * work + 24 * T + 2 * work
    + in_b + out_b,
    device=lambda T, has_base, in_b, work: _inputs(T, has_base, in_b) + 12 * T * work + 24 * T + 2 * work + in_b,
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
        params=(LAM.with_default(1.0), BREADCRUMBS_DENSITY, GAMMA, WEIGHT, NORMALIZE),
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
        params=(LAM.with_default(1.0), BREADCRUMBS_DENSITY, GAMMA, WEIGHT, NORMALIZE),
        needs_base=True,
        rule=_everywhere("breadcrumbs-ties"),
        treatments={"breadcrumbs-ties": BREADCRUMBS_TIES},
        search_axis="density",
    ),
)
