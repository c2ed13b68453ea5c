"""Merging a tensor too big for the memory budget, row block by row block.

`source(start, stop)` returns rows start:stop of the T inputs (and of the
base, or None) on the CPU. Every method needs the whole tensor only through
quantities that add up over rows, so a few passes over the blocks give the
in-memory result:
- average and task arithmetic are elementwise: one pass;
- TIES needs each task vector's magnitude threshold (a k-th smallest value):
  an exact radix selection on the floats' bit patterns, 16 bits per pass,
  then the elementwise merge;
- CART's randomized SVD: Y = D Omega and the final reconstruction are
  computed block by block; D^T Q accumulates over blocks. The small
  (m x l) and (n x l) factors stay in memory; theta_avg is recomputed from
  the inputs in every pass instead of being stored."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from . import ops
from .config import SVD_FAMILY, MergeConfig
from .errors import MergeError
from .fallback import compute_dtype
from .lowrank import _top_triplets, gaussian_test_matrix, sketch_width
from .merge import to_compute_device
from .methods import (
    all_finite,
    average,
    cart_uses_lowrank,
    check_finite,
    lowrank_rank,
    task_arithmetic,
    tensor_seed,
    warn_nonfinite_average,
)
from .svd_family import mean_task_vector

RowSource = Callable[[int, int], "tuple[list[torch.Tensor], torch.Tensor | None]"]


def row_blocks(rows: int, block_rows: int) -> list[tuple[int, int]]:
    return [(start, min(start + block_rows, rows)) for start in range(0, rows, max(1, block_rows))]


def merge_in_blocks(
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    models: int,
    source: RowSource,
    cfg: MergeConfig,
    device: torch.device,
    block_rows: int,
) -> Iterator[torch.Tensor]:
    """Yield the merged tensor's row blocks, in order, on the CPU, in the inputs'
    dtype; `models` is the number of inputs T."""
    blocks = row_blocks(shape[0], block_rows)
    if cfg.method == "cart" and cart_uses_lowrank(name, shape, dtype, cfg, models):
        yield from _cart(name, shape, dtype, source, cfg, device, blocks)
    elif cfg.method == "ties":
        yield from _ties(name, shape, dtype, source, cfg, device, blocks)
    else:
        # Elementwise: the SVD family's tensors outside the low-rank selection
        # (the planner keeps their 2-D weights whole) are mean task vectors.
        merge = {"task_arithmetic": task_arithmetic, **dict.fromkeys(SVD_FAMILY, mean_task_vector)}.get(
            cfg.method, average
        )
        for start, stop in blocks:
            xs, base = _load(source, start, stop, device)
            merged = merge(name, xs, base, cfg)
            check_finite(name, merged, xs, base, allow=cfg.allow_nonfinite)
            yield merged.cpu()


def _load(source: RowSource, start: int, stop: int, device: torch.device):
    xs, base = source(start, stop)
    return to_compute_device(xs, base, device)


def _cart(name, shape, dtype, source, cfg, device, blocks) -> Iterator[torch.Tensor]:
    if cfg.svd == "exact":
        raise MergeError(
            f"tensor '{name}': svd='exact' needs the whole matrix in memory, which the memory budget "
            "does not allow; raise the budget or use svd='randomized'"
        )
    m, n = shape
    k = lowrank_rank(shape, cfg.rank_ratio)
    work = compute_dtype(dtype)
    width = sketch_width(k, cfg.oversample_for(k), m, n)
    omega = gaussian_test_matrix(n, width, tensor_seed(cfg.seed, name), work, device)

    def centered(start, stop):
        xs, _ = _load(source, start, stop, device)
        return xs, ops.mean(xs)

    def range_basis(rhs):  # orth(D rhs), D's row blocks one at a time
        y = None
        for start, stop in blocks:
            xs, center = centered(start, stop)
            if rhs is omega:
                check_finite(name, center, xs, allow=cfg.allow_nonfinite)
                if not all_finite(center):
                    raise _NonFinite()
            part = ops.centered_matmul(xs, center, rhs)
            if y is None:
                y = torch.empty((part.shape[0], m, width), dtype=work, device=device)
            y[:, start:stop] = part
        return ops.orthonormalize(y)

    def transposed_product(q):  # D^T q, summed over row blocks
        total = None
        for start, stop in blocks:
            xs, center = centered(start, stop)
            part = ops.centered_matmul(xs, center, q[:, start:stop].contiguous(), transpose=True)
            total = part if total is None else total.add_(part)
        return total

    try:
        q = range_basis(omega)
    except _NonFinite:  # allowed NaN/Inf: no SVD, the average
        warn_nonfinite_average(name)
        for start, stop in blocks:
            yield centered(start, stop)[1].to(dtype).cpu()
        return
    for _ in range(cfg.power_iters_for()):
        q = range_basis(ops.orthonormalize(transposed_product(q)))
    u, s, vh = _top_triplets(q, transposed_product(q), k)
    del q
    T = u.shape[0]
    left = (u * s.unsqueeze(-2)).permute(1, 0, 2).reshape(m, T * k)
    right = vh.reshape(T * k, n)
    for start, stop in blocks:
        xs, center = centered(start, stop)
        yield ops.lowrank_update(center, left[start:stop].contiguous(), right, cfg.scale, dtype).cpu()


class _NonFinite(Exception):
    pass


def _ties(name, shape, dtype, source, cfg, device, blocks) -> Iterator[torch.Tensor]:
    def task_vectors(start, stop):
        xs, base = _load(source, start, stop, device)
        work = compute_dtype(xs[0].dtype)
        b = base.to(work)
        return torch.stack([x.to(work).reshape(-1) - b.reshape(-1) for x in xs]), b  # (T, block numel)

    numel = math.prod(shape)
    keep = max(1, int(cfg.density * numel))
    threshold = None
    if keep < numel:
        threshold = _kth_smallest_magnitude(
            lambda: (task_vectors(start, stop)[0] for start, stop in blocks), numel - keep + 1
        )
    for start, stop in blocks:
        taus, b = task_vectors(start, stop)
        if threshold is not None:
            taus = taus * (taus.abs() >= threshold.unsqueeze(1))
        elected = torch.sign(taus.sum(0))
        agrees = (torch.sign(taus) == elected) & (taus != 0)
        kept_sum = (taus * agrees).sum(0)
        kept_count = agrees.sum(0).clamp_(min=1)
        merged = b.reshape(-1) + cfg.scale * kept_sum / kept_count
        if not all_finite(merged):
            xs, base = _load(source, start, stop, device)
            check_finite(name, merged, xs, base, allow=cfg.allow_nonfinite)
        yield merged.reshape(b.shape).to(dtype).cpu()


_DIGIT_BITS = 16


def _kth_smallest_magnitude(blocks: Callable[[], Iterator[torch.Tensor]], j: int) -> torch.Tensor:
    """Per row t, the j-th smallest (1-based) |value| over all blocks of the (T, *)
    stacks that blocks() yields: most significant 16 bits of the floats' bit
    patterns first (non-negative floats order like their bit patterns), one
    pass over the blocks per 16 bits."""
    prefix = remaining = None
    float_dtype = int_dtype = None
    width = 0
    level = 0
    while True:
        hist = None
        for taus in blocks():
            if hist is None:
                float_dtype = taus.dtype
                int_dtype = {torch.float32: torch.int32, torch.float64: torch.int64}[float_dtype]
                width = 8 * float_dtype.itemsize
                T = taus.shape[0]
                if prefix is None:
                    prefix = torch.zeros(T, dtype=torch.int64, device=taus.device)
                    remaining = torch.full((T,), j, dtype=torch.int64, device=taus.device)
                hist = torch.zeros(T, 1 << _DIGIT_BITS, dtype=torch.int64, device=taus.device)
            shift = width - _DIGIT_BITS * (level + 1)
            bits = taus.abs().view(int_dtype).to(torch.int64)
            digit = (bits >> shift) & ((1 << _DIGIT_BITS) - 1)
            match = (bits >> (shift + _DIGIT_BITS)) == prefix.unsqueeze(1) if level else None
            for t in range(T):
                d = digit[t] if match is None else digit[t][match[t]]
                hist[t] += torch.bincount(d, minlength=1 << _DIGIT_BITS)
        cumulative = hist.cumsum(1)
        chosen = (cumulative < remaining.unsqueeze(1)).sum(1)
        before = torch.where(chosen > 0, cumulative.gather(1, (chosen - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0)
        remaining = remaining - before
        prefix = (prefix << _DIGIT_BITS) | chosen
        level += 1
        if _DIGIT_BITS * level == width:
            return prefix.to(int_dtype).view(float_dtype)
