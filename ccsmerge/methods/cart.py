"""CART (Choi et al. 2024, "Revisiting Weight Averaging for Model Merging"):
theta_avg + lam * sum_t LowRank_k(theta_t - theta_avg) on weight matrices,
theta_avg elsewhere; on stacks of weight matrices (experts stored as
(E, m, n)) per slice. One orchestration (`cart_factors`) serves whole tensors,
row blocks, search and CART-indexing."""

from __future__ import annotations

import dataclasses
import warnings

import torch

from .. import accuracy_record, kernels
from ..accuracy import AUTO_MIN_TARGET
from ..errors import MergeError
from ..lowrank import adaptive_randomized_svd_over_rows, centered_exact_svd, randomized_svd_over_rows, sketch_width
from ..numerics import all_finite, compute_dtype, nonfinite_input, tensor_seed
from .elementwise import AVERAGE, _inputs
from .factored import cart_factored
from .params import ADAPTER_RANK_RATIO, LAM, LOWRANK_SELECTION, RANK, RANK_RATIO, SVD_ENGINE, TOLERANCE, lowrank_rank, lowrank_rule
from .spec import Cost, Decision, MethodSpec, Treatment
from .stacked import stacked, treatment_for


def cart_rule(name, shape, dtype, cfg, T) -> Decision:
    lowrank, why = lowrank_rule(name, shape, dtype, cfg)
    if not lowrank:
        return Decision("average", None, why)
    if T <= 2:
        # The two centered matrices are exact negatives: their rank-k parts cancel.
        return Decision("average", None, "2 models: CART is the average")
    return Decision(treatment_for("low-rank", shape), lowrank_rank(shape, cfg.rank_ratio, cfg.rank), why)


def oversample_for(cfg, k: int) -> int:
    return max(10, k) if cfg.oversample is None else cfg.oversample


# With a tolerance, power_iters is the cap of the adaptive iterations (this by default).
MAX_ADAPTIVE_POWER_ITERS = 8


def power_iters_for(cfg) -> int:
    if cfg.power_iters is not None:
        return cfg.power_iters
    return 4 if getattr(cfg, "tolerance", None) is None else MAX_ADAPTIVE_POWER_ITERS


def adaptive(cfg) -> bool:
    """Whether the power iterations adapt to a target: a tolerance is set ("auto" by
    default) and there are iterations to adapt (power_iters=0 is the plain sketch)."""
    return getattr(cfg, "tolerance", None) is not None and cfg.svd != "exact" and power_iters_for(cfg) > 0


def cart_factors(job, rows, spans, device, first_pass=None):
    """Top-k factors U (T, m, k), S (T, k), Vh (T, k, n) of every centered
    matrix theta_t - theta_avg, from rows(start, stop) -> (xs, theta_avg rows);
    the matrix's accuracy entry is noted (ccsmerge.accuracy_record)."""
    factors, entry = factors_and_accuracy(job, rows, spans, device, first_pass)
    accuracy_record.note(entry)
    return factors


def factors_and_accuracy(job, rows, spans, device, first_pass=None):
    """cart_factors' factors and the matrix's TensorAccuracy (without the output rounding)."""
    cfg, k = job.cfg, job.rank
    entry = dict(name=job.name, shape=tuple(job.shape), k=k, svd=cfg.svd, tolerance=getattr(cfg, "tolerance", None),
                 out_dtype=str(job.out_dtype).removeprefix("torch."), reached_cap=False,
                 estimated_error=None, target=None, rounding_floor=None, power_iters=None, width=None)
    if cfg.svd == "exact":
        if len(spans) != 1:
            raise MergeError(
                f"tensor '{job.name}': svd='exact' needs the whole matrix in memory, which the memory budget "
                "does not allow; raise the budget or use svd='randomized'"
            )
        xs, center = rows(*spans[0])
        if first_pass is not None:
            first_pass(xs, center)
        return centered_exact_svd(xs, center, k), accuracy_record.TensorAccuracy(**{**entry, "tolerance": None})
    entry.update(width=_width(job), power_iters=power_iters_for(cfg))
    if adaptive(cfg):
        factors, report = adaptive_randomized_svd_over_rows(
            rows, job.shape, spans, k, oversample=oversample_for(cfg, k), tolerance=cfg.tolerance,
            max_power_iters=power_iters_for(cfg), seed=tensor_seed(cfg.seed, job.name),
            dtype=compute_dtype(job.dtype), device=device, storage_dtype=job.dtype, name=job.name,
            first_pass=first_pass, warn_at_cap=not accuracy_record.deferring(),
        )
        entry.update(power_iters=report.power_iters, width=report.width, estimated_error=report.estimated_error,
                     target=report.target, rounding_floor=report.rounding_floor, reached_cap=report.reached_cap)
        return factors, accuracy_record.TensorAccuracy(**entry)
    factors = randomized_svd_over_rows(
        rows,
        job.shape,
        spans,
        k,
        oversample=oversample_for(cfg, k),
        power_iters=power_iters_for(cfg),
        seed=tensor_seed(cfg.seed, job.name),
        dtype=compute_dtype(job.dtype),
        device=device,
        first_pass=first_pass,
    )
    return factors, accuracy_record.TensorAccuracy(**{**entry, "tolerance": None})


def update_factors(factors) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_t U_t S_t Vh_t as one product left @ right over the concatenated factors."""
    u, s, vh = factors
    T, m, k = u.shape
    return (u * s.unsqueeze(-2)).permute(1, 0, 2).reshape(m, T * k), vh.reshape(T * k, -1)


class _NonFinite(Exception):
    pass


def _finite_or_average(job):
    """A first-pass check: NaN/Inf inputs are refused by name, or with
    allow_nonfinite the matrix (which has no SVD) is merged as the average."""

    def check(xs, center):
        if all_finite(center):
            return
        if not job.cfg.allow_nonfinite:
            nonfinite_input(job.name, xs, None)
        raise _NonFinite()

    return check


def _warn_average(name: str) -> None:
    warnings.warn(f"tensor '{name}': NaN/Inf inputs have no SVD; merged as the average (allow_nonfinite)")


def lowrank_whole(job, xs, base):
    center = kernels.mean(xs)
    try:
        factors, entry = factors_and_accuracy(job, lambda start, stop: (xs, center), [(0, job.shape[0])],
                                              xs[0].device, _finite_or_average(job))
    except _NonFinite:
        _warn_average(job.name)
        return center.to(job.out_dtype)
    left, right = update_factors(factors)
    rounding = accuracy_record.OutputRounding(job.shape[0], left, right, job.cfg.lam, job.out_dtype)
    rounding.add(0, center)
    accuracy_record.note(accuracy_record.with_output_rounding(entry, rounding))
    return kernels.lowrank_update(center, left, right, job.cfg.lam, job.out_dtype)


def lowrank_blocks(job, rows, spans, device):
    def centered(start, stop):
        xs, _ = rows(start, stop)
        return xs, kernels.mean(xs)

    try:
        factors, entry = factors_and_accuracy(job, centered, spans, device, _finite_or_average(job))
    except _NonFinite:
        _warn_average(job.name)
        for start, stop in spans:
            yield centered(start, stop)[1].to(job.out_dtype)
        return
    left, right = update_factors(factors)
    del factors
    rounding = accuracy_record.OutputRounding(job.shape[0], left, right, job.cfg.lam, job.out_dtype)
    for start, stop in spans:
        xs, center = centered(start, stop)
        rounding.add(start, center)
        if stop == spans[-1][1]:  # noted before the last block leaves: its consumer may stop there
            accuracy_record.note(accuracy_record.with_output_rounding(entry, rounding))
        yield kernels.lowrank_update(center, left[start:stop].contiguous(), right, job.cfg.lam, job.out_dtype)


def _width(job) -> int:
    return sketch_width(job.rank, oversample_for(job.cfg, job.rank), *job.shape)


def sketch_state_bytes(job, work: int) -> int:
    """Factors a CART merge keeps whole: Omega, the T bases Q (m x l) and
    D^T Q (n x l) with their orthonormalisation workspace, the T rank-k
    factors, and the float64 temporaries of the small SVDs (B^T, sigma V and
    the polar step's three k x n products)."""
    (m, n), T, k, width = job.shape, job.tasks, job.rank, _width(job)
    float64 = 8 * (n * (width + 5 * k) + 2 * T * width * width)  # one task's B^T at a time
    return work * (n * width + 3 * T * (m + n) * width + 2 * T * k * (m + n)) + float64


def device_sketch_state_bytes(job, work: int) -> int:
    """The same factors on a GPU, with more room for the orthonormalisation:
    CholeskyQR2 works on float64 copies of the (T, m, l) panel while the
    previous basis, the product and the panel of the other side are alive, and
    the centered products stack their right-hand sides."""
    (m, n), T, k, width = job.shape, job.tasks, job.rank, _width(job)
    float64 = 8 * (n * (width + 5 * k) + 2 * T * width * width)
    return work * (n * width + 7 * T * (m + n) * width + 3 * T * k * (m + n)) + float64


LOWRANK = Treatment(
    "low-rank",
    lowrank_whole,
    lowrank_blocks,
    Cost(  # the center and one input converted to the compute dtype; on a GPU also the accumulated update
        host=lambda T, has_base, in_b, work, out_b: _inputs(T, has_base, in_b) + 2 * work + in_b + out_b,
        device=lambda T, has_base, in_b, work: _inputs(T, has_base, in_b) + 3 * work + in_b,
        state=sketch_state_bytes,
        device_state=device_sketch_state_bytes,
        passes=lambda job: 3 + 2 * power_iters_for(job.cfg),
    ),
    factored=cart_factored,
)

STACKED_LOWRANK = stacked(LOWRANK)


def _check(cfg) -> None:
    if cfg.svd == "exact" and (cfg.oversample is not None or cfg.power_iters is not None):
        raise ValueError("oversample and power_iters apply to svd='randomized' only")
    # "auto" (the default) is what svd='exact' and power_iters=0 ignore; a number is refused with them.
    explicit = cfg.tolerance is not None and cfg.tolerance != "auto"
    if explicit and cfg.svd == "exact":
        raise ValueError("tolerance applies to svd='randomized' only (svd='exact' is the reference)")
    if explicit and cfg.power_iters == 0:
        raise ValueError("with a tolerance, power_iters caps the adaptive iterations: give at least 1")


def planned_accuracy(job):
    """The plan's statement of a low-rank job (a stack: of each slice)."""
    cfg = job.cfg
    if cfg.svd == "exact":
        return accuracy_record.Planned("exact", None, None, None, None)
    matrix = dataclasses.replace(job, shape=tuple(job.shape[-2:]))
    width, iters = _width(matrix), power_iters_for(cfg)
    if not adaptive(cfg):
        return accuracy_record.Planned("randomized", None, width, iters, None)
    if cfg.tolerance != "auto":
        return accuracy_record.Planned("randomized", cfg.tolerance, width, iters, cfg.tolerance)
    # float32 and float64 inputs: a floor of ~1e-5 or none, so auto's target is its least.
    floor_far_below = job.dtype not in (torch.bfloat16, torch.float16)
    return accuracy_record.Planned("randomized", "auto", width, iters, AUTO_MIN_TARGET,
                                   target_is_least=not floor_far_below)


def with_rank(job, rank: int):
    return dataclasses.replace(job, rank=rank)


METHODS = (
    MethodSpec(
        name="cart",
        title="CART (Choi et al. 2024)",
        summary="theta_avg + lam * sum_t LowRank_k(theta_t - theta_avg) on weight matrices",
        reference="https://arxiv.org/abs/2412.12153",
        params=(RANK_RATIO, RANK, ADAPTER_RANK_RATIO, LAM.with_default(2.0), *SVD_ENGINE, TOLERANCE, *LOWRANK_SELECTION),
        needs_base=False,
        rule=cart_rule,
        treatments={"low-rank": LOWRANK, STACKED_LOWRANK.name: STACKED_LOWRANK, "average": AVERAGE},
        search_axis="rank_ratio",
        extra_checks=_check,
        planned_accuracy=planned_accuracy,
    ),
)
