"""Elementwise methods: averaging and task arithmetic, and the mean task
vector that the SVD family gives tensors outside its low-rank selection."""

from __future__ import annotations

import torch

from .. import kernels
from ..numerics import compute_dtype
from .params import LAM
from .spec import Cost, Decision, MethodSpec, Treatment

# Planner memory models, bytes per element: the inputs, the float32 work and
# the result (held in the inputs' and the output dtype while it is written).


def _inputs(T, has_base, in_b):
    return (T + has_base) * in_b


AVERAGE_COST = Cost(
    host=lambda T, has_base, in_b, work, out_b: _inputs(T, has_base, in_b) + work + in_b + out_b,
    device=lambda T, has_base, in_b, work: _inputs(T, has_base, in_b) + work + in_b,
)
TASK_VECTOR_COST = Cost(  # base, running sum and one converted input in the compute dtype
    host=lambda T, has_base, in_b, work, out_b: _inputs(T, has_base, in_b) + 3 * work + in_b + out_b,
    device=lambda T, has_base, in_b, work: _inputs(T, has_base, in_b) + 3 * work + in_b,
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


def task_arithmetic_whole(job, xs, base):
    """base + lam * sum_t (theta_t - base)."""
    work = compute_dtype(xs[0].dtype)
    b = base.to(work)
    total = torch.zeros_like(b)
    for x in xs:
        total += x.to(work) - b
    return torch.add(b, total, alpha=job.cfg.lam).to(job.out_dtype)


def mean_task_vector_whole(job, xs, base):
    """base + lam * mean_t (theta_t - base)."""
    work = compute_dtype(xs[0].dtype)
    b = base.to(work)
    return torch.add(b, kernels.mean(xs) - b, alpha=job.cfg.lam).to(job.out_dtype)


AVERAGE = Treatment("average", average_whole, elementwise_blocks(average_whole), AVERAGE_COST)
TASK_ARITHMETIC = Treatment(
    "task-arithmetic", task_arithmetic_whole, elementwise_blocks(task_arithmetic_whole), TASK_VECTOR_COST
)
MEAN_TASK_VECTOR = Treatment(
    "mean-task-vector",
    mean_task_vector_whole,
    elementwise_blocks(mean_task_vector_whole),
    Cost(host=AVERAGE_COST.host, device=TASK_VECTOR_COST.device),
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
        name="task_arithmetic",
        title="Task arithmetic (Ilharco et al. 2023)",
        summary="base + lam * sum_t (theta_t - base)",
        reference="https://arxiv.org/abs/2212.04089",
        params=(LAM.with_default(0.3),),
        needs_base=True,
        rule=_everywhere("task-arithmetic"),
        treatments={"task-arithmetic": TASK_ARITHMETIC},
    ),
)
