"""What a streaming merge will do, decided from the inputs' headers alone:
each tensor's policy, rank, output dtype, estimated memory and whether it is
merged whole or in row blocks, and the output shards."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint
from .config import SVD_FAMILY, MergeConfig
from .errors import MergeError
from .fallback import compute_dtype
from .lowrank import sketch_width
from .methods import cart_uses_lowrank, lowrank_rank
from .selection import lowrank_selected
from .shard_writer import OutputTensor, plan_shards
from .sizes import format_size


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # the inputs'
    out_dtype: torch.dtype
    policy: str  # "low-rank", "average", "task-arithmetic", "ties", "tsv-m", "iso-c", "iso-cts",
    # "mean-task-vector" or "copied"
    rank: int | None  # CART's k for low-rank tensors
    memory: int  # estimated peak bytes while this tensor is merged
    block_rows: int | None  # None: merged whole; else rows per block
    passes: int  # how many times the inputs are read

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def output(self) -> OutputTensor:
        return OutputTensor(self.name, self.shape, self.out_dtype)


@dataclass(frozen=True)
class MergePlan:
    tensors: list[TensorPlan]
    shards: list[list[OutputTensor]]
    budget: int
    models: int
    has_base: bool
    read_bytes_per_pass: dict[str, int]

    @property
    def peak_memory(self) -> int:
        return max((t.memory for t in self.tensors), default=0)

    @property
    def read_bytes(self) -> int:
        return sum(self.read_bytes_per_pass[t.name] * t.passes for t in self.tensors)

    @property
    def write_bytes(self) -> int:
        return sum(t.output.nbytes for t in self.tensors)


def _sketch_state_bytes(shape: tuple[int, ...], T: int, k: int, width: int, work: int) -> int:
    """Factors a CART merge keeps whole: Omega, the T bases Q (m x l) and
    D^T Q (n x l) with their orthonormalisation workspace, the T rank-k
    factors, and the float64 temporaries of the small SVDs (B^T, sigma V and
    the polar step's three k x n products)."""
    m, n = shape
    float64 = 8 * (n * (width + 5 * k) + 2 * T * width * width)  # one task's B^T at a time
    return work * (n * width + 3 * T * (m + n) * width + 2 * T * k * (m + n)) + float64


def _bytes_per_element(policy: str, T: int, has_base: bool, in_b: int, work: int, out_b: int) -> int:
    """Bytes held per element of the tensor while it is merged (inputs included)."""
    inputs = (T + has_base) * in_b
    result = in_b + out_b  # the merge in the inputs' dtype, then the cast to the output dtype
    if policy == "copied":
        return inputs + result
    if policy == "ties":
        return inputs + 4 * T * work + 2 * work + result
    if policy in ("tsv-m", "iso-c", "iso-cts"):
        return inputs + (T + 6) * work + result  # the T task vectors, their sum and full SVD factors
    if policy == "task-arithmetic":
        return inputs + 3 * work + result
    if policy == "low-rank":
        return inputs + 2 * work + result  # the center and one input converted to the compute dtype
    return inputs + work + result  # average: the float32 mean


def plan_tensor(
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    cfg: MergeConfig,
    T: int,
    has_base: bool,
    budget: int,
    out_dtype: torch.dtype | None,
) -> TensorPlan:
    floating = dtype.is_floating_point
    final_dtype = out_dtype if (out_dtype is not None and floating) else dtype
    if not floating:
        policy = "copied"
    elif cfg.method == "cart":
        policy = "low-rank" if cart_uses_lowrank(name, shape, dtype, cfg, T) else "average"
    elif cfg.method in SVD_FAMILY:
        lowrank = lowrank_selected(name, shape, dtype, cfg)
        policy = cfg.method.replace("_", "-") if lowrank else "mean-task-vector"
    else:
        policy = cfg.method.replace("_", "-")
    work = compute_dtype(dtype).itemsize if floating else dtype.itemsize
    per_element = _bytes_per_element(policy, T, has_base, dtype.itemsize, work, final_dtype.itemsize)
    numel = math.prod(shape)
    rank = state = None
    passes = 1
    if policy == "low-rank":
        rank = lowrank_rank(shape, cfg.rank_ratio)
        width = sketch_width(rank, cfg.oversample_for(rank), *shape)
        state = _sketch_state_bytes(shape, T, rank, width, work)
    whole = numel * per_element + (state or 0)
    if whole <= budget or len(shape) == 0 or numel == 0:
        return TensorPlan(name, shape, dtype, final_dtype, policy, rank, whole, None, passes)
    if policy == "copied":
        raise MergeError(f"tensor '{name}': {format_size(whole)} of non-floating data does not fit the budget")
    # Row blocks: one input block per model plus the workspace, and one output
    # block waiting for the writer while the next is computed.
    row = numel // shape[0]
    per_row = row * (per_element + final_dtype.itemsize)
    available = budget - (state or 0)
    if available < per_row:
        need = (state or 0) + per_row
        raise MergeError(
            f"tensor '{name}' {tuple(shape)}: merging it needs at least {format_size(need)} "
            f"({'the low-rank factors and ' if state else ''}one row block), "
            f"more than the memory budget of {format_size(budget)}"
        )
    if policy in ("tsv-m", "iso-c", "iso-cts"):
        raise MergeError(
            f"tensor '{name}' {tuple(shape)}: {cfg.method} needs the whole matrix in memory "
            f"({format_size(whole)}), more than the memory budget of {format_size(budget)}"
        )
    if policy == "low-rank" and cfg.svd == "exact":
        raise MergeError(
            f"tensor '{name}' {tuple(shape)}: svd='exact' needs the whole matrix in memory "
            f"({format_size(whole)}), more than the memory budget of {format_size(budget)}; "
            "raise the budget or use svd='randomized'"
        )
    block_rows = min(shape[0], available // per_row)
    if policy == "low-rank":
        passes = 3 + 2 * cfg.power_iters_for()
    elif policy == "ties":
        passes = 1 + (0 if max(1, int(cfg.density * numel)) >= numel else 8 * work // 16)
    memory = (state or 0) + block_rows * per_row
    return TensorPlan(name, shape, dtype, final_dtype, policy, rank, memory, block_rows, passes)


def natural_order(name: str) -> tuple:
    """Sort key that puts layers.2 before layers.10, so that shards follow the
    model's layers, whatever order (and layout) the inputs list tensors in."""
    parts = tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))
    return parts, name  # the name itself breaks ties such as a1 / a01


def check_compatible(models: list[Checkpoint], base: Checkpoint | None) -> list[str]:
    """The tensor names in output order, after checking every input has the
    same names, shapes and dtypes."""
    reference = models[0]
    names = sorted(reference.tensors, key=natural_order)
    others = [(str(m.path), m) for m in models[1:]] + ([(f"{base.path} (base)", base)] if base else [])
    for label, ckpt in others:
        missing = [n for n in names if n not in ckpt.tensors]
        if missing:
            raise MergeError(f"{label}: tensor '{missing[0]}' is missing ({len(missing)} missing in all)")
        extra = [n for n in ckpt.tensors if n not in reference.tensors]
        if extra:
            raise MergeError(f"{label}: tensor '{extra[0]}' is not in {reference.path} ({len(extra)} extra in all)")
        for name in names:
            a, b = reference.tensors[name], ckpt.tensors[name]
            if a.shape != b.shape:
                raise MergeError(f"{label}: tensor '{name}' has shape {b.shape}, {a.shape} in {reference.path}")
            if a.dtype != b.dtype:
                raise MergeError(f"{label}: tensor '{name}' has dtype {b.dtype}, {a.dtype} in {reference.path}")
    return names


def make_plan(
    models: list[Checkpoint],
    base: Checkpoint | None,
    cfg: MergeConfig,
    budget: int,
    out_dtype: torch.dtype | None,
    shard_bytes: int,
) -> MergePlan:
    names = check_compatible(models, base)
    T = len(models)
    tensors = []
    for name in names:
        info = models[0].tensors[name]
        tensors.append(plan_tensor(name, info.shape, info.dtype, cfg, T, base is not None, budget, out_dtype))
    per_pass = {t.name: (T + (base is not None)) * models[0].tensors[t.name].nbytes for t in tensors}
    shards = plan_shards([t.output for t in tensors], shard_bytes)
    return MergePlan(tensors, shards, budget, T, base is not None, per_pass)
