"""The accuracy record of a merge: per low-rank matrix, what the randomized engine
did (rank, power iterations, sketch width), how far its update is estimated to be
from the exact one, the target and the inputs' rounding floor it aimed at, and the
output dtype's rounding relative to the update.

The engine notes one `TensorAccuracy` per matrix (a stack of experts: one per
slice) into the record active in the calling thread (`collecting`); the
streaming pipeline carries them to the writer with the tensor's bytes, the
in-memory merge hands them to the caller's list (merge(..., record=[])). Recording reads what the merge
computed and a few sampled rows: the merged bytes do not depend on it."""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ACCURACY_FILE = "ccsmerge-accuracy.json"
# The output's rounding is reported when it exceeds the update's own estimated error
# (or, without an estimate, its target) by this factor: it then dominates the merge's error.
OUTPUT_ROUNDING_FACTOR = 4.0
# Rows of a matrix on which the output rounding is measured (every s-th row): the
# relative error of a rounding is an average over many entries, stable on 256 rows.
ROUNDING_SAMPLE_ROWS = 256


@dataclass(frozen=True)
class TensorAccuracy:
    """One matrix's record. estimated_error, target and rounding_floor are relative to
    the update sum_t LowRank_k(D_t); output_rounding is ||round_out(merged) - merged|| /
    ||merged - theta_avg|| (the update as applied, lam included), 0 when the output
    keeps the compute dtype. None: not computed (fixed power iterations, svd='exact')."""

    name: str
    shape: tuple[int, int]
    k: int
    svd: str  # "randomized" or "exact"
    tolerance: str | float | None  # as configured: "auto", a number, or None (fixed iterations)
    power_iters: int | None
    width: int | None
    estimated_error: float | None
    target: float | None
    rounding_floor: float | None
    reached_cap: bool
    out_dtype: str
    output_rounding: float | None = None

    def to_json(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict) -> TensorAccuracy:
        return cls(**{**data, "shape": tuple(data["shape"])})

    @property
    def bound(self) -> float | None:
        """What the update's error is stated as: the estimate, else the target."""
        return self.estimated_error if self.estimated_error is not None else self.target


_ACTIVE: contextvars.ContextVar[list | None] = contextvars.ContextVar("ccsmerge_accuracy", default=None)


_DEFER: contextvars.ContextVar[bool] = contextvars.ContextVar("ccsmerge_accuracy_defer", default=False)


@contextlib.contextmanager
def collecting(defer_warnings: bool = False) -> Iterator[list[TensorAccuracy]]:
    """Notes made in this context (this thread) go into the list it yields;
    defer_warnings: the engine does not warn per matrix at the cap, the caller
    warns once for all of them (a streaming merge, at its end)."""
    entries: list[TensorAccuracy] = []
    token, defer = _ACTIVE.set(entries), _DEFER.set(defer_warnings)
    try:
        yield entries
    finally:
        _ACTIVE.reset(token)
        _DEFER.reset(defer)


def deferring() -> bool:
    return _DEFER.get()


def cap_warning(found: dict) -> str | None:
    """One line naming the matrices stopped at the cap above their target."""
    count = found.get("reached_cap", 0)
    if not count:
        return None
    names = ", ".join(f"'{n}'" for n in found["reached_cap_names"]) + (", ..." if count > 10 else "")
    return (f"{count} matrices stopped at the power-iteration cap above their target ({names}; "
            f"{ACCURACY_FILE} has each estimate); raise power_iters or oversample, or use svd='exact'")


def note(entry: TensorAccuracy) -> None:
    entries = _ACTIVE.get()
    if entries is not None:
        entries.append(entry)


def drain(entries: list[TensorAccuracy]) -> list[TensorAccuracy]:
    """The entries noted so far, removed from the list."""
    taken = entries[:]
    del entries[:]
    return taken


@dataclass(frozen=True)
class Planned:
    """What the plan states of a matrix's accuracy before anything is read: the
    engine, the sketch width, the power iterations (the cap when they adapt) and the
    target: a number, or for "auto" the least it can be (the rest comes from the
    inputs' spectra), exact for inputs whose rounding floor is always far below it."""

    svd: str
    tolerance: str | float | None
    width: int | None
    power_iters: int | None
    target: float | None
    target_is_least: bool = False

    def describe(self) -> str:
        if self.svd == "exact":
            return "exact SVD"
        if self.tolerance is None:
            return f"l={self.width} q={self.power_iters} (fixed)"
        target = f"{'>=' if self.target_is_least else ''}{100 * self.target:.3g}%"
        return f"l={self.width} q<={self.power_iters} target {target}"


class OutputRounding:
    """||round_out(merged) - merged|| / ||lam * update|| measured on every s-th row of
    the matrix (s = ceil(m / ROUNDING_SAMPLE_ROWS)), from the factors the merge used:
    merged = center + lam * left @ right in the compute dtype, rounded once to the
    output dtype as the kernel does. Rows arrive in blocks (start row, center rows)."""

    def __init__(self, m: int, left: torch.Tensor, right: torch.Tensor, lam: float, out_dtype: torch.dtype):
        self.stride = max(1, math.ceil(m / ROUNDING_SAMPLE_ROWS))
        self.left, self.right, self.lam, self.out_dtype = left, right, lam, out_dtype
        self.rounding = 0.0
        self.update = 0.0

    def add(self, start: int, center: torch.Tensor) -> None:
        first = -start % self.stride
        rows = torch.arange(first, center.shape[0], self.stride, device=center.device)
        if rows.numel() == 0:
            return
        center_rows = center[rows].to(self.right.dtype)
        update = self.lam * (self.left[start + rows] @ self.right)
        merged = center_rows + update
        rounded = merged.to(self.out_dtype).to(merged.dtype)
        self.rounding += float((rounded - merged).double().pow(2).sum())
        self.update += float(update.double().pow(2).sum())

    def value(self) -> float:
        if self.out_dtype == self.right.dtype or self.out_dtype == torch.float64:
            return 0.0
        if self.update == 0.0:
            return math.inf if self.rounding > 0 else 0.0
        return math.sqrt(self.rounding / self.update)


def with_output_rounding(entry: TensorAccuracy, rounding: OutputRounding) -> TensorAccuracy:
    return TensorAccuracy(**{**asdict(entry), "output_rounding": rounding.value()})


def _pct(x: float | None) -> str:
    if x is None:
        return "-"
    if x == math.inf:
        return "inf"
    return f"{100 * x:.3g} %"


def summary(entries: Iterable[TensorAccuracy]) -> dict:
    """Counts, the worst and median estimated errors, the targets, the power
    iterations, the rounding floors and the output rounding, and the matrices whose
    output rounding exceeds their update's error by OUTPUT_ROUNDING_FACTOR."""
    entries = list(entries)
    out: dict = {"matrices": len(entries)}
    if not entries:
        return out
    estimated = [e for e in entries if e.estimated_error is not None]
    out["estimated"] = len(estimated)
    out["reached_cap"] = sum(e.reached_cap for e in entries)
    out["reached_cap_names"] = [e.name for e in entries if e.reached_cap][:10]
    if estimated:
        worst = max(estimated, key=lambda e: e.estimated_error)
        out["estimated_error"] = {
            "median": statistics.median(e.estimated_error for e in estimated),
            "worst": worst.estimated_error,
            "worst_tensor": worst.name,
        }
        iters = [e.power_iters for e in estimated if e.power_iters is not None]
        if iters:
            out["power_iters"] = {"min": min(iters), "median": statistics.median(iters), "max": max(iters)}
    targets = [e.target for e in entries if e.target is not None]
    if targets:
        out["target"] = {"min": min(targets), "median": statistics.median(targets), "max": max(targets)}
    floors = [e.rounding_floor for e in entries if e.rounding_floor is not None]
    if floors:
        out["rounding_floor"] = {"median": statistics.median(floors), "min": min(floors)}
    rounded = [e for e in entries if e.output_rounding is not None]
    if rounded:
        worst = max(rounded, key=lambda e: e.output_rounding)
        out["output_rounding"] = {
            "dtype": worst.out_dtype,
            "median": statistics.median(e.output_rounding for e in rounded),
            "worst": worst.output_rounding,
            "worst_tensor": worst.name,
        }
        over = [e for e in rounded if e.bound is not None and e.output_rounding > OUTPUT_ROUNDING_FACTOR * e.bound]
        out["output_rounding_dominates"] = len(over)
    return out


def summary_lines(found: dict) -> list[str]:
    """The summary as lines for a terminal (the last one, when present, a warning)."""
    count = found.get("matrices", 0)
    if not count:
        return []
    lines = []
    error = found.get("estimated_error")
    if error is not None:
        iters = found.get("power_iters")
        spent = f"; power iterations {iters['min']}-{iters['max']}" if iters else ""
        lines.append(
            f"accuracy: {count} low-rank matrices; estimated update error median {_pct(error['median'])}, "
            f"worst {_pct(error['worst'])} ('{error['worst_tensor']}'); "
            f"{found['reached_cap']} at the power-iteration cap{spent}"
        )
    else:
        lines.append(f"accuracy: {count} low-rank matrices; update error not estimated (fixed power iterations or svd='exact')")
    floor = found.get("rounding_floor")
    if floor is not None:
        lines.append(f"accuracy: the inputs' rounding floor (how far they define the exact update): median {_pct(floor['median'])}")
    rounding = found.get("output_rounding")
    if rounding is not None and rounding["worst"] > 0:
        lines.append(
            f"accuracy: {rounding['dtype']} output rounding relative to the update: median {_pct(rounding['median'])}, "
            f"worst {_pct(rounding['worst'])} ('{rounding['worst_tensor']}')"
        )
        over = found.get("output_rounding_dominates", 0)
        if over:
            lines.append(
                f"warning: in {over} of {count} matrices the {rounding['dtype']} output's rounding is more than "
                f"{OUTPUT_ROUNDING_FACTOR:g}x the update's estimated error: it, not the engine, sets the merge's "
                "precision (--dtype float32 keeps the update whole)"
            )
    return lines


def summary_table(found: dict) -> list[str]:
    """The summary as a markdown table (for reports): matrices, estimated error, target,
    power iterations, cap, rounding floor and output rounding, as `summary` gives them."""
    count = found.get("matrices", 0)
    if not count:
        return ["No low-rank matrix was recorded."]
    rows = [("low-rank matrices", f"{count} ({found.get('estimated', 0)} with an error estimate)")]
    error = found.get("estimated_error")
    if error is not None:
        rows.append(("estimated update error", f"median {_pct(error['median'])}, worst {_pct(error['worst'])} "
                                               f"(`{error['worst_tensor']}`)"))
    target = found.get("target")
    if target is not None:
        rows.append(("target", f"median {_pct(target['median'])} ({_pct(target['min'])} to {_pct(target['max'])})"))
    iters = found.get("power_iters")
    if iters is not None:
        rows.append(("power iterations", f"min {iters['min']}, median {iters['median']:g}, max {iters['max']}"))
    rows.append(("stopped at the cap above the target", str(found.get("reached_cap", 0))))
    floor = found.get("rounding_floor")
    if floor is not None:
        rows.append(("rounding floor of the inputs", f"median {_pct(floor['median'])}, min {_pct(floor['min'])}"))
    rounding = found.get("output_rounding")
    if rounding is not None:
        rows.append((f"{rounding['dtype']} output rounding", f"median {_pct(rounding['median'])}, worst "
                                                             f"{_pct(rounding['worst'])}"
                     if rounding["worst"] > 0 else "none (the output keeps the compute dtype)"))
    return ["| accuracy record | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]


def record_json(entries: Iterable[TensorAccuracy]) -> dict:
    entries = list(entries)
    return {"summary": summary(entries), "tensors": [e.to_json() for e in entries]}


def _shard_record(folder: Path, index: int, count: int) -> Path:
    return folder / f".accuracy-{index + 1:05d}-of-{count:05d}.json"


def write_shard_record(folder: Path, index: int, count: int, entries: list[TensorAccuracy]) -> None:
    """The entries of one shard's tensors, beside it in the partial folder: a resumed or
    distributed merge assembles the record from every shard's."""
    from .shard_writer import write_atomically

    content = json.dumps([e.to_json() for e in entries]).encode()
    write_atomically(_shard_record(folder, index, count), content)


def assemble(folder: Path, count: int) -> tuple[list[TensorAccuracy], int]:
    """Every shard's entries in shard order, and how many shards had none recorded
    (finished by an older ccsmerge before a resume)."""
    entries, missing = [], 0
    for index in range(count):
        path = _shard_record(folder, index, count)
        try:
            entries += [TensorAccuracy.from_json(t) for t in json.loads(path.read_text())]
        except (OSError, ValueError, TypeError, KeyError):
            missing += 1
    return entries, missing


def remove_shard_records(folder: Path) -> None:
    for stale in folder.glob(".accuracy-*-of-*.json*"):
        stale.unlink(missing_ok=True)


def write_record(folder: Path, entries: list[TensorAccuracy], missing_shards: int = 0) -> dict:
    """ccsmerge-accuracy.json in folder; returns its summary."""
    from .shard_writer import write_atomically

    found = record_json(entries)
    if missing_shards:
        found["summary"]["shards_not_recorded"] = missing_shards
    write_atomically(folder / ACCURACY_FILE, (json.dumps(found, indent=1) + "\n").encode())
    return found["summary"]


def read_accuracy(folder: str | Path) -> list[TensorAccuracy]:
    """The per-matrix record of a merged folder (its ccsmerge-accuracy.json)."""
    data = json.loads((Path(folder) / ACCURACY_FILE).read_text())
    return [TensorAccuracy.from_json(t) for t in data["tensors"]]
