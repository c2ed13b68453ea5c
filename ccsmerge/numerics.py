"""Small numerical helpers shared by the methods, the executor and search:
the compute dtype, finiteness checks, per-tensor seeds, row blocks, an
exact k-th smallest magnitude over row blocks, and one-thread factorisations."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator, Sequence

import torch

from .errors import MergeError


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating type is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def one_thread_factorizations(device: torch.device):
    """Run the engine's small factorisations (QR of tall l-column panels, Cholesky and eigh of
    l x l matrices) on one CPU thread. Their LAPACK routines synchronise the threads at every
    column block; with anything else on the cores (a merge's own reader and writer threads,
    another process) every barrier waits for a descheduled thread. Measured on 2 cores with one
    other busy process: QR of 5504 x 490 84 ms on one thread against 1.2-1.5 s on two, eigh of
    490 x 490 18 ms against 0.97-6.6 s. The GEMMs around them keep every thread. CUDA: nothing."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed that depends on the name only, not on the order in
    which tensors are merged."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def row_blocks(rows: int, block_rows: int) -> list[tuple[int, int]]:
    return [(start, min(start + block_rows, rows)) for start in range(0, rows, max(1, block_rows))]


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. A NaN or Inf anywhere makes the sum
    non-finite, and a sum is ~10x faster than isfinite(); only a sum that
    overflows needs the exact check."""
    # float16 sums overflow (max 65504): sum those in float32.
    total = tensor.sum(dtype=torch.float32) if tensor.dtype == torch.float16 else tensor.sum()
    if bool(torch.isfinite(total)):
        return True
    return bool(torch.isfinite(tensor).all())


def nonfinite_input(name: str, xs: list[torch.Tensor], base: torch.Tensor | None) -> None:
    """Raise MergeError naming the first input (model i or the base) holding NaN/Inf."""
    labelled = [(f"model {i}", x) for i, x in enumerate(xs)] + ([("base", base)] if base is not None else [])
    for label, x in labelled:
        if x.is_floating_point() and not all_finite(x):
            raise MergeError(f"tensor '{name}': {label} has NaN or Inf values")


def check_finite(
    name: str,
    result: torch.Tensor,
    xs: list[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    allow: bool = False,
    largest: Callable[[], float] | None = None,
) -> None:
    """Refuse a non-finite result (unless allow): name the input holding NaN/Inf,
    or, when every input is finite, say that the merged values do not fit the
    result's dtype, with the largest of them (largest() recomputes it in the
    compute dtype; called only on this error path)."""
    if allow or all_finite(result):
        return
    nonfinite_input(name, xs, base)
    dtype = result.dtype
    value = largest() if largest is not None else float("nan")
    limit = torch.finfo(dtype).max
    short = str(dtype).replace("torch.", "")
    if value == value and value != float("inf") and value > limit:
        raise MergeError(
            f"tensor '{name}': merged values reach {value:.6g}, beyond {short}'s range (±{limit:.6g}); "
            "choose a wider output dtype (--dtype float32), or pass --allow-nonfinite to write Inf"
        )
    raise MergeError(f"tensor '{name}': the merge overflowed (inputs are finite, the result is not)")


_DIGIT_BITS = 16


def kth_smallest_magnitude(blocks: Callable[[], Iterator[torch.Tensor]], j: int | Sequence[int]) -> torch.Tensor:
    """Per row t, the j-th (or j[t]-th) smallest (1-based) |value| over all
    blocks of the (T, *) stacks that blocks() yields: most significant 16 bits
    of the floats' bit patterns first (non-negative floats order like their
    bit patterns), one pass over the blocks per 16 bits."""
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
                    if isinstance(j, int):
                        remaining = torch.full((T,), j, dtype=torch.int64, device=taus.device)
                    else:
                        remaining = torch.tensor(list(j), dtype=torch.int64, device=taus.device)
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
