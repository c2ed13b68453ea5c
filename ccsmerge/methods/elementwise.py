"""Elementwise methods: averaging, linear (weighted averaging) and task
arithmetic, the mean task vector that the SVD family gives tensors outside
its low-rank selection, and mergekit's generalized task arithmetic
(`combine`), which task arithmetic, TIES, DARE and Breadcrumbs share: each
(sparsified) task vector times its model's weight, summed (TIES-style: the
values agreeing with the elected sign), divided by the sum of the weights
(of the agreeing ones) when `normalize`, times lam, added to the base, in
mergekit 0.1.5's order of operations."""

from __future__ import annotations

import torch

from .. import kernels
from ..numerics import compute_dtype
from ..tensor_values import per_model
from .factored import average_factored, linear_factored, mean_task_vector_factored, task_arithmetic_factored
from .params import LAM, NORMALIZE, WEIGHT
from .spec import Cost, Decision, MethodSpec, Treatment

# Planner memory models, bytes per element: the inputs, the float32 work and
# the result (held in the inputs' and the output dtype while it is written).


def _inputs(T, has_base, in_b):
    return (T + has_base) * in_b


AVERAGE_COST = Cost(
    host=lambda T, has_base, in_b, work, out_b: _inputs(T, has_base, in_b) + work + in_b + out_b,
    device=lambda T, has_base, in_b, work: _inputs(T, has_base, in_b) + work + in_b,
)
TASK_VECTOR_COST = Cost(  # the T weighted task vectors, the base, their sum and one temporary in the compute dtype
    host=lambda T, has_base, in_b, work, out_b: _inputs(T, has_base, in_b) + (T + 3) * work + in_b + out_b,
    device=lambda T, has_base, in_b, work: _inputs(T, has_base, in_b) + (T + 3) * work + in_b,
)
LINEAR_COST = Cost(  # the running sum and one converted input in the compute dtype
    host=lambda T, has_base, in_b, work, out_b: _inputs(T, has_base, in_b) + 2 * work + in_b + out_b,
    device=lambda T, has_base, in_b, work: _inputs(T, has_base, in_b) + 2 * work + in_b,
)


def elementwise_blocks(whole):
    """Row blocks of an elementwise merge: the whole-tensor merge on each block."""

    def blocks(job, rows, spans, device):
        for start, stop in spans:
            xs, base = rows(start, stop)
            yield whole(job, xs, base)

    return blocks


def average_whole(job, xs, base):
    return kernels.mean(xs, job.out_dtype)


def model_weights(job, like: torch.Tensor) -> torch.Tensor:
    """(T, 1): each model's weight, in like's dtype and device."""
    return torch.tensor(per_model(job.cfg.weight, job.tasks), dtype=like.dtype, device=like.device).unsqueeze(1)


def combine(job, taus: torch.Tensor, b: torch.Tensor, consensus=None) -> torch.Tensor:
    """The flat merged tensor from (T, N) task vectors (already sparsified)
    and the base: mergekit's generalized task arithmetic. consensus(taus)
    gives the (T, N) mask of the values kept (TIES' sign election) or is None."""
    weights = model_weights(job, taus)
    taus = taus * weights
    if consensus is not None:
        mask = consensus(taus)
        mixed = (taus * mask).sum(0)
        divisor = (weights * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = taus.sum(0)
        divisor = weights.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if job.cfg.normalize:
        mixed = mixed / divisor
    if job.cfg.lam != 1:
        mixed = mixed * job.cfg.lam
    return b.reshape(-1) + mixed


def task_arithmetic_whole(job, xs, base):
    """base + lam * sum_t w_t (theta_t - base) (normalize: / sum_t w_t)."""
    work = compute_dtype(xs[0].dtype)
    b = base.to(work)
    taus = torch.stack([x.to(work).reshape(-1) - b.reshape(-1) for x in xs])
    return combine(job, taus, b).reshape(b.shape).to(job.out_dtype)


def linear_whole(job, xs, base):
    """sum_t w_t theta_t (normalize: / sum_t w_t), summed in model order in
    the compute dtype, as mergekit's linear does."""
    work = compute_dtype(xs[0].dtype)
    weights = torch.tensor(per_model(job.cfg.weight, job.tasks), dtype=work, device=xs[0].device)
    total = torch.zeros(xs[0].shape, dtype=work, device=xs[0].device)
    for x, w in zip(xs, weights.unbind(0)):
        total.addcmul_(x, w)
    if job.cfg.normalize:
        total.div_(weights.sum())
    return total.to(job.out_dtype)


def _check_linear(cfg) -> None:
    weights = cfg.weight if isinstance(cfg.weight, tuple) else (cfg.weight,)
    if cfg.normalize and all(isinstance(w, (int, float)) for w in weights) and sum(weights) == 0:
        raise ValueError("weight: the weights sum to 0, and normalize divides by their sum")


def mean_task_vector_whole(job, xs, base):
    """base + lam * mean_t (theta_t - base)."""
    work = compute_dtype(xs[0].dtype)
    b = base.to(work)
    return torch.add(b, kernels.mean(xs) - b, alpha=job.cfg.lam).to(job.out_dtype)


AVERAGE = Treatment(
    "average", average_whole, elementwise_blocks(average_whole), AVERAGE_COST, factored=average_factored
)
LINEAR = Treatment(
    "linear", linear_whole, elementwise_blocks(linear_whole), LINEAR_COST, factored=linear_factored,
    keeps_equal=lambda cfg: cfg.normalize,  # without, sum_t w_t W0 is not W0
)
TASK_ARITHMETIC = Treatment(
    "task-arithmetic", task_arithmetic_whole, elementwise_blocks(task_arithmetic_whole), TASK_VECTOR_COST,
    factored=task_arithmetic_factored,
)
MEAN_TASK_VECTOR = Treatment(
    "mean-task-vector",
    mean_task_vector_whole,
    elementwise_blocks(mean_task_vector_whole),
    Cost(host=AVERAGE_COST.host, device=TASK_VECTOR_COST.device),
    factored=mean_task_vector_factored,
)


def _everywhere(treatment: str):
    return lambda name, shape, dtype, cfg, T: Decision(treatment, None, "elementwise")


METHODS = (
    MethodSpec(
        name="average",
        title="Averaging",
        summary="mean_t theta_t",
        reference="https://arxiv.org/abs/2203.05482",
        params=(),
        needs_base=False,
        rule=_everywhere("average"),
        treatments={"average": AVERAGE},
    ),
    MethodSpec(
        name="linear",
        title="Linear (weighted averaging, mergekit's linear)",
        summary="sum_t w_t theta_t / sum_t w_t (without normalize: not divided)",
        reference="https://arxiv.org/abs/2203.05482",
        params=(WEIGHT, NORMALIZE.with_default(True)),
        needs_base=False,
        rule=_everywhere("linear"),
        treatments={"linear": LINEAR},
        extra_checks=_check_linear,
    ),
    MethodSpec(
        name="task_arithmetic",
        title="Task arithmetic (Ilharco et al. 2023)",
        summary="base + lam * sum_t w_t (theta_t - base)",
        reference="https://arxiv.org/abs/2212.04089",
        params=(LAM.with_default(0.3), WEIGHT, NORMALIZE),
        needs_base=True,
        rule=_everywhere("task-arithmetic"),
        treatments={"task-arithmetic": TASK_ARITHMETIC},
        recipe_defaults={"lam": 1.0},
    ),
)
