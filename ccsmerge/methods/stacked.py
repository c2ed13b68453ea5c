"""Stacks of weight matrices: tensors of more than two dimensions whose
trailing two are a weight matrix (mixture-of-experts checkpoints store E
experts as one (E, m, n) tensor). `stacked(treatment)` runs a 2-D low-rank
treatment on every m x n slice as on a weight matrix of its own, with the
slice's own seed and name (`NAME[i]`, i the slice's index in the flattened
leading dimensions). Row blocks split the leading dimension, so a block is a
range of whole slices, each read once and merged whole: a slice's result is
the same bytes whole or in blocks, on every device."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch

from .elementwise import _inputs
from .spec import Cost, TensorJob, Treatment

PREFIX = "stacked-"


def slice_job(job: TensorJob, index: int) -> TensorJob:
    """The job of slice `index` of a stack: a 2-D weight of the slice's shape."""
    return dataclasses.replace(job, name=f"{job.name}[{index}]", shape=tuple(job.shape[-2:]))


def slices(
    job: TensorJob, xs: list[torch.Tensor], base: torch.Tensor | None, first_row: int = 0
) -> Iterator[tuple[TensorJob, list[torch.Tensor], torch.Tensor | None]]:
    """(slice job, the T inputs' slice, the base's slice) of every m x n slice
    of xs, which hold rows first_row.. of the stack's leading dimension."""
    m, n = job.shape[-2:]
    per_row = math.prod(job.shape[1:-2])
    flat = [x.reshape(-1, m, n) for x in xs]
    flat_base = base.reshape(-1, m, n) if base is not None else None
    for i in range(flat[0].shape[0]):
        yield (
            slice_job(job, first_row * per_row + i),
            [_aligned(x[i]) for x in flat],
            _aligned(flat_base[i]) if flat_base is not None else None,
        )


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """The slice itself, or a copy where it does not start on an aligned
    address: BLAS libraries choose kernels by their operands' alignment, so
    a slice merges to the same bytes whatever block (or whole) it came in."""
    alignment = 256 if x.device.type == "cuda" else 64
    return x if x.data_ptr() % alignment == 0 else x.clone()


def _merge_slices(job, whole, xs, base, first_row: int) -> torch.Tensor:
    m, n = job.shape[-2:]
    out = torch.empty(xs[0].shape, dtype=job.out_dtype, device=xs[0].device)
    flat = out.view(-1, m, n)
    for i, (one, one_xs, one_base) in enumerate(slices(job, xs, base, first_row)):
        flat[i] = whole(one, one_xs, one_base)
    return out


def _matrix(job: TensorJob) -> TensorJob:
    return dataclasses.replace(job, shape=tuple(job.shape[-2:]))


def stacked(treatment: Treatment) -> Treatment:
    """The per-slice form of a 2-D treatment, with its memory model: the
    stack's inputs and result per element, and kept beside them one slice's
    workspace (the 2-D treatment's cost of an m x n matrix, its inputs being
    views of the stack's or their aligned copies, plus its sketches and
    factors)."""
    cost = treatment.cost

    def whole(job, xs, base):
        return _merge_slices(job, treatment.whole, xs, base, 0)

    def blocks(job, rows, spans, device):
        for start, stop in spans:
            xs, base = rows(start, stop)
            yield _merge_slices(job, treatment.whole, xs, base, start)

    # Per element of one slice: its workspace, and the aligned copies of its inputs and base.
    def workspace(job, work):
        T, in_b, out_b = job.tasks, job.dtype.itemsize, job.out_dtype.itemsize
        extra = cost.host(T, False, in_b, work, out_b) - _inputs(T, False, in_b) + _inputs(T, True, in_b)
        return math.prod(job.shape[-2:]) * extra + cost.state(_matrix(job), work)

    def device_workspace(job, work):
        T, in_b = job.tasks, job.dtype.itemsize
        extra = cost.device(T, False, in_b, work) - _inputs(T, False, in_b) + _inputs(T, True, in_b)
        return math.prod(job.shape[-2:]) * extra + cost.device_state(_matrix(job), work)

    return Treatment(
        PREFIX + treatment.name,
        whole,
        blocks,
        Cost(
            host=lambda T, has_base, in_b, work, out_b: _inputs(T, has_base, in_b) + out_b,
            device=lambda T, has_base, in_b, work: _inputs(T, has_base, in_b) + work,
            state=workspace,
            device_state=device_workspace,
            passes=lambda job: 1,
        ),
        per_slice=True,
    )


def treatment_for(name: str, shape: tuple[int, ...]) -> str:
    """The treatment a low-rank rule gives a weight matrix (name) or a stack of them."""
    return PREFIX + name if len(shape) > 2 else name
