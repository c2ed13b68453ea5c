"""The executor: runs each tensor's job (decided by the method's rule, in
the plan or for an in-memory merge) with its treatment, whole or in row
blocks, on the compute device, and checks the result in its output dtype."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from . import kernels
from .errors import MergeError
from .methods import TensorJob, treatment_of
from .methods.spec import RowSource
from .numerics import all_finite, check_finite, compute_dtype, row_blocks


def to_compute_device(
    xs: list[torch.Tensor], base: torch.Tensor | None, device: torch.device
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The inputs (and base) on the compute device. Asynchronous copies only
    towards a GPU, whose stream orders them before the kernels; a CPU consumer
    would read a device-to-host copy unfinished."""
    non_blocking = device.type == "cuda"
    moved = [x.to(device, non_blocking=non_blocking) for x in xs]
    return moved, (base.to(device, non_blocking=non_blocking) if base is not None else None)


def _in_compute_dtype(job: TensorJob) -> TensorJob:
    return dataclasses.replace(job, out_dtype=compute_dtype(job.dtype))


def merge_whole(job: TensorJob, xs: list[torch.Tensor], base: torch.Tensor | None, device: torch.device):
    """The merged tensor, computed on `device` straight into job.out_dtype,
    returned on the inputs' device."""
    home = xs[0].device
    treatment = treatment_of(job)
    if job.treatment == "copied":  # compared and copied where they are
        return treatment.whole(job, xs, base)
    on_device, base_on_device = to_compute_device(xs, base, device)
    merged = treatment.whole(job, on_device, base_on_device)
    check_finite(
        job.name, merged, on_device, base_on_device, allow=job.cfg.allow_nonfinite,
        largest=lambda: float(treatment.whole(_in_compute_dtype(job), on_device, base_on_device).abs().max()),
    )
    return merged.to(home)


def merge_rows(job: TensorJob, source: RowSource, block_rows: int, device: torch.device) -> Iterator[torch.Tensor]:
    """The merged tensor's row blocks, in order, on the CPU, in job.out_dtype;
    source(start, stop) gives rows of the inputs and base on the CPU."""
    treatment = treatment_of(job)
    spans = row_blocks(job.shape[0], block_rows)

    def rows(start, stop):
        xs, base = source(start, stop)
        return to_compute_device(xs, base, device)

    for (start, stop), block in zip(spans, treatment.blocks(job, rows, spans, device)):
        if not job.cfg.allow_nonfinite and not all_finite(block):
            xs, base = rows(start, stop)

            def largest():  # the error path: the whole merge again in the compute dtype
                blocks = treatment.blocks(_in_compute_dtype(job), rows, spans, device)
                return max(float(b.abs().max()) for b in blocks)

            check_finite(job.name, block, xs, base, largest=largest)
        yield block.cpu()


def adapted_deltas(path: str, name: str, models) -> list:
    """Each model's LoRA factors (left, right) of a tensor on the "factors" path
    (None where a model leaves it alone); none on the "base" path."""
    return [m.factors(name) for m in models] if path == "factors" else []


def merged_update(job: TensorJob, deltas: list, device: torch.device, allow_nonfinite: bool = False):
    """(left, right, base_scale) of the method's factored merge, merged =
    base_scale * W0 + left @ right, from each model's factors (checked finite)."""
    for i, delta in enumerate(deltas):
        if delta is not None and not allow_nonfinite and not (all_finite(delta[0]) and all_finite(delta[1])):
            raise MergeError(f"tensor '{job.name}': model {i} has NaN or Inf in its LoRA factors")
    on_device = [None if d is None else (d[0].to(device), d[1].to(device)) for d in deltas]
    return treatment_of(job).factored(job, on_device)


def merge_adapted(
    job: TensorJob,
    path: str,
    deltas: list,
    base_rows,
    spans: list[tuple[int, int]],
    device: torch.device,
    allow_nonfinite: bool = False,
) -> Iterator[torch.Tensor]:
    """The row blocks of a tensor merged from LoRA factors (path "factors":
    deltas holds each model's (left, right) or None) or copied from the base
    (path "base": no input changes it), in job.out_dtype, on the CPU.
    base_rows(start, stop) gives the base's rows on the CPU."""
    if path == "base":
        for start, stop in spans:
            yield base_rows(start, stop).to(job.out_dtype)
        return
    left, right, base_scale = merged_update(job, deltas, device, allow_nonfinite)
    work = compute_dtype(job.dtype)
    left, right = left.to(work), right.to(work).contiguous()
    for start, stop in spans:
        w0 = base_rows(start, stop).to(device=device, dtype=work)
        if base_scale != 1.0:
            w0 = w0 * base_scale
        if left.shape[1] == 0:
            block = w0.to(job.out_dtype)
        else:
            block = kernels.lowrank_update(w0, left[start:stop].contiguous(), right, 1.0, job.out_dtype)
        if not allow_nonfinite and not all_finite(block):
            check_finite(job.name, block, [], w0, largest=lambda: float(
                (w0 + left[start:stop] @ right).abs().max()))
        yield block.cpu()
