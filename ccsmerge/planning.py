"""What a streaming merge will do, decided from the inputs' headers alone:
each tensor's policy, rank, output dtype, estimated memory and whether it is
merged whole or in row blocks, and the output shards.

For a merge on a GPU the plan also estimates each tensor's device working set
(its inputs on the device, the method's workspace, the sketches and factors,
the result) and chooses row blocks so that it fits the GPU memory budget too.
Planning needs no GPU: a CUDA merge can be planned on any machine."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch

from .adapters import AdapterView
from .checkpoint import Checkpoint
from .config import MergeConfig
from .errors import MergeError
from .merge import check_dtype
from .methods import TensorJob, decide, treatment_of
from .numerics import compute_dtype
from .recipe import DTYPES as DTYPE_NAMES
from .shard_writer import OutputTensor, plan_shards
from .sizes import format_size
from .tensor_values import resolver
from .vocab import is_vocab_tensor, vocab_mismatch


@dataclass(frozen=True)
class TensorPlan:
    job: TensorJob  # what the executor runs: treatment, rank, the rule that chose them, dtypes
    memory: int  # estimated peak bytes while this tensor is merged
    block_rows: int | None  # None: merged whole; else rows per block
    passes: int  # how many times the inputs are read
    device_memory: int | None = None  # estimated peak GPU bytes (None: merged on the CPU)
    # How the inputs are read: "dense" (every input's tensor); with LoRA adapters also
    # "factors" (the adapters' factors and the base: exact and O((m + n) R^2)) and
    # "base" (no input changes it: the base's tensor).
    path: str = "dense"
    update_rank: int | None = None  # "factors": R, the sum of the adapters' ranks on it

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.job.shape

    @property
    def dtype(self) -> torch.dtype:  # the inputs'
        return self.job.dtype

    @property
    def out_dtype(self) -> torch.dtype:
        return self.job.out_dtype

    @property
    def policy(self) -> str:  # the treatment: "low-rank", "average", "ties", "copied", ...
        return self.job.treatment

    @property
    def rank(self) -> int | None:
        return self.job.rank

    @property
    def rule(self) -> str:
        return self.job.rule

    @property
    def accuracy(self):
        """What the method states of this matrix's accuracy before reading it
        (ccsmerge.accuracy_record.Planned), or None (no low-rank step, or one
        computed exactly from LoRA factors: the path says so)."""
        planned = self.job.cfg.spec.planned_accuracy
        usable = planned is not None and self.rank is not None and self.path == "dense"
        return planned(self.job) if usable else None

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
    device: str = "cpu"  # the compute device's type: "cpu" or "cuda"
    gpu_budget: int | None = None  # the GPU memory budget (None: merged on the CPU)
    staging_bytes: int = 0  # pinned host buffers of the host-to-device copies (part of the host budget)

    @property
    def peak_memory(self) -> int:
        return max((t.memory for t in self.tensors), default=0) + self.staging_bytes

    @property
    def peak_gpu_memory(self) -> int | None:
        """Estimated peak GPU bytes, the workspace reserve included (None on the CPU)."""
        if self.gpu_budget is None:
            return None
        return max((t.device_memory or 0 for t in self.tensors), default=0) + DEVICE_RESERVE

    @property
    def read_bytes(self) -> int:
        return sum(self.read_bytes_per_pass[t.name] * t.passes for t in self.tensors)

    @property
    def write_bytes(self) -> int:
        return sum(t.output.nbytes for t in self.tensors)


# Bytes of the GPU budget kept for the libraries' workspaces (cuBLAS, cuSOLVER),
# which the CUDA caching allocator holds beside the tensors.
DEVICE_RESERVE = 64 * 2**20
# Default GPU budget: this share of the device's free memory when the merge starts.
GPU_BUDGET_FRACTION = 0.8
# Pinned host buffers for the host-to-device copies: STAGING_CHUNKS buffers of
# a power of two bytes, at most 1/32 of the host budget each, within these
# bounds, and only as much as the budget leaves beside the neediest tensor.
STAGING_CHUNKS = 2
STAGING_MIN_CHUNK = 4096
STAGING_MAX_CHUNK = 16 * 2**20


def staging_bytes(budget: int, room: int | None = None) -> int:
    """Pinned host bytes a GPU merge keeps for its host-to-device copies, out
    of `room` bytes of the host budget (default: all of it); 0 when not even
    the smallest buffers fit (the copies are then made from pageable memory)."""
    target = max(budget // 32, STAGING_MIN_CHUNK)
    chunk = min(1 << (target.bit_length() - 1), STAGING_MAX_CHUNK)
    room = budget if room is None else room
    while chunk >= STAGING_MIN_CHUNK and STAGING_CHUNKS * chunk > room:
        chunk //= 2
    return STAGING_CHUNKS * chunk if chunk >= STAGING_MIN_CHUNK else 0


def plan_tensor(
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    cfg: MergeConfig,
    T: int,
    has_base: bool,
    budget: int,
    out_dtype: torch.dtype | None,
    *,
    gpu_budget: int | None = None,
    read_itemsize: int | None = None,
) -> TensorPlan:
    """One tensor's plan. budget: the host memory budget; gpu_budget: the GPU
    memory budget when the merge runs on a GPU (DEVICE_RESERVE of it is kept
    for the libraries' workspaces), else None. The host estimate is the CPU
    merge's whatever the device (an upper bound for a GPU merge, which needs
    no workspace on the host), so the host decides the same on every device.
    The job (treatment, rank, rule) comes from the method's rule and is what
    the executor runs; memory comes from the treatment's cost model.
    read_itemsize: the host bytes an input element holds while it is read
    (default the dtype's: a view of a memory-mapped file; more where the
    reader casts or reorders it into a copy)."""
    job = decide(name, shape, dtype, cfg, T, out_dtype if dtype.is_floating_point else None)
    treatment = treatment_of(job)
    cost = treatment.cost
    floating = dtype.is_floating_point
    work = compute_dtype(dtype).itemsize if floating else dtype.itemsize
    per_element = cost.host(T, has_base, read_itemsize or dtype.itemsize, work, job.out_dtype.itemsize)
    on_gpu = gpu_budget is not None
    device_per_element = cost.device(T, has_base, dtype.itemsize, work) if on_gpu else 0
    numel = math.prod(shape)
    state = cost.state(job, work)
    device_state = cost.device_state(job, work) if on_gpu else 0
    whole = numel * per_element + state
    device_whole = numel * device_per_element + device_state if on_gpu else None
    host_room = budget
    device_room = gpu_budget - DEVICE_RESERVE if on_gpu else None
    host_fits = whole <= host_room
    device_fits = not on_gpu or device_whole <= device_room
    if (host_fits and device_fits) or len(shape) == 0 or numel == 0:
        return TensorPlan(job, whole, None, 1, device_whole)
    if job.treatment == "copied":
        raise MergeError(f"tensor '{name}': {format_size(whole)} of non-floating data does not fit the budget")
    # Row blocks: one input block per model plus the workspace, and one output
    # block waiting for the writer while the next is computed. On a GPU the
    # blocks come back to the host as soon as they are computed.
    row = numel // shape[0]
    per_row = row * (per_element + job.out_dtype.itemsize)
    available = host_room - state
    if available < per_row:
        need = state + per_row
        raise MergeError(
            f"tensor '{name}' {tuple(shape)}: merging it needs at least {format_size(need)} "
            f"({_least(treatment, shape, state)}), more than the memory budget of {format_size(budget)}"
        )
    device_per_row = row * device_per_element
    device_available = device_room - device_state if on_gpu else None
    if on_gpu and device_available < device_per_row:
        need = DEVICE_RESERVE + device_state + device_per_row
        least = _least(treatment, shape, device_state)
        raise MergeError(
            f"tensor '{name}' {tuple(shape)}: merging it on the GPU needs at least {format_size(need)} of GPU "
            f"memory (the libraries' workspaces, {least}), more than the GPU memory budget of {format_size(gpu_budget)}"
        )
    if host_fits:  # the GPU budget is the one that forces row blocks
        what, limit, size = "GPU memory budget", gpu_budget, device_whole + DEVICE_RESERVE
    else:
        what, limit, size = "memory budget", budget, whole
    if treatment.blocks is None:
        raise MergeError(
            f"tensor '{name}' {tuple(shape)}: {cfg.method} {treatment.refusal} "
            f"({format_size(size)}), more than the {what} of {format_size(limit)}"
        )
    if getattr(cfg, "svd", None) == "exact" and job.rank is not None and not treatment.per_slice:
        raise MergeError(
            f"tensor '{name}' {tuple(shape)}: svd='exact' needs the whole matrix in memory "
            f"({format_size(size)}), more than the {what} of {format_size(limit)}; "
            "raise the budget or use svd='randomized'"
        )
    block_rows = min(shape[0], available // per_row)
    if on_gpu and device_per_row:
        block_rows = min(block_rows, device_available // device_per_row)
    memory = state + block_rows * per_row
    device_memory = device_state + block_rows * device_per_row if on_gpu else None
    return TensorPlan(job, memory, block_rows, cost.passes(job), device_memory)


def _least(treatment, shape: tuple[int, ...], state: int) -> str:
    """What the smallest row block of a tensor holds, for a refusal."""
    if treatment.per_slice:  # blocks of whole slices, each merged whole
        m, n = shape[-2:]
        count = math.prod(shape[1:-2])
        slices = f"one {m} x {n} slice" if count == 1 else f"{count} {m} x {n} slices"
        return f"{slices} of every input and of the result, and the workspace of one slice"
    return f"{'the low-rank factors and ' if state else ''}one row block"


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
    for name in names:
        check_dtype(str(reference.path), name, reference.tensors[name].dtype)
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
                if is_vocab_tensor(name) and a.shape[1:] == b.shape[1:] and len(a.shape) > 0:
                    raise MergeError(vocab_mismatch(name, str(reference.path), a.shape[0], label, b.shape[0]))
                raise MergeError(f"{label}: tensor '{name}' has shape {b.shape}, {a.shape} in {reference.path}")
            if a.dtype != b.dtype:
                dtypes = "|".join(DTYPE_NAMES)
                raise MergeError(
                    f"{label}: tensor '{name}' has dtype {_short(b.dtype)}, {_short(a.dtype)} in {reference.path}: "
                    f"the models were saved in different dtypes; --input-dtype {dtypes} casts every input to one"
                )
    return names



def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_plan(
    models: list[Checkpoint],
    base: Checkpoint | None,
    cfg: MergeConfig,
    budget: int,
    out_dtype: torch.dtype | None,
    shard_bytes: int,
    *,
    gpu_budget: int | None = None,
    out_dtypes: dict[str, torch.dtype] | None = None,
) -> MergePlan:
    """The plan of a merge on the CPU, or on a GPU when gpu_budget is given
    (then the pinned staging buffers take what the host budget leaves beside
    the neediest tensor). out_dtypes: per-tensor output dtypes where out_dtype
    is None (the base's dtype where an adapter's change is read in the compute dtype)."""
    names = check_compatible(models, base)
    if gpu_budget is not None and gpu_budget <= DEVICE_RESERVE:
        raise MergeError(
            f"max_gpu_memory: {format_size(gpu_budget)} is not more than the {format_size(DEVICE_RESERVE)} "
            "kept for the GPU libraries' workspaces"
        )
    T = len(models)
    config_of = resolver(cfg, names, T)  # per-tensor and per-model values, resolved once
    adapted = any(isinstance(m, AdapterView) for m in models)
    tensors = []
    for name in names:
        info = models[0].tensors[name]
        held = max(m.held_itemsize(name) for m in [*models, *([base] if base is not None else [])])
        tensor_out = out_dtype if out_dtype is not None else (out_dtypes or {}).get(name)
        planned = None
        if adapted:
            floating_out = tensor_out if info.dtype.is_floating_point else None
            job = decide(name, info.shape, info.dtype, config_of(name), T, floating_out)
            planned = plan_adapted(job, models, base, budget)
            if planned is None:
                _check_dense_with_adapters(job)
        if planned is None:
            planned = plan_tensor(
                name, info.shape, info.dtype, config_of(name), T, base is not None, budget, tensor_out,
                gpu_budget=gpu_budget, read_itemsize=held,
            )
        tensors.append(planned)
    reserved = 0
    if gpu_budget is not None:
        reserved = staging_bytes(budget, budget - max((t.memory for t in tensors), default=0))
    per_pass = {t.name: _read_bytes(t, models, base) for t in tensors}
    shards = plan_shards([t.output for t in tensors], shard_bytes)
    device = "cpu" if gpu_budget is None else "cuda"
    return MergePlan(tensors, shards, budget, T, base is not None, per_pass, device, gpu_budget, reserved)


def _check_dense_with_adapters(job: TensorJob) -> None:
    """Refuse a method that takes each task vector's singular vectors on dense task
    vectors of adapters: beyond an adapter's rank (all of them where it leaves the
    tensor alone) they are arbitrary, and the result with them."""
    if treatment_of(job).per_task_spectra:
        raise MergeError(
            f"tensor '{job.name}': {job.cfg.method} needs each task vector's singular vectors, and on a LoRA "
            "adapter's dense task vector (as here: a full fine-tune among the inputs, or a tensor an adapter "
            "saves whole) those beyond its rank are arbitrary; merge the adapters alone (exact, from their "
            "factors), or use cart, iso_c or a method without per-task SVDs"
        )


def adapted_path(name: str, job: TensorJob, models) -> str:
    """"factors" where every input is an adapter that leaves the tensor alone or
    changes it by factors only and the method has a factored form, "base"
    where none changes it (and equal inputs merge to the base), else "dense"."""
    if not all(isinstance(m, AdapterView) for m in models):
        return "dense"
    kinds = {m.kind(name) for m in models}
    treatment = treatment_of(job)
    if kinds == {None}:
        return "base" if job.treatment == "copied" or treatment.keeps_equal(job.cfg) else "dense"
    if "full" in kinds or len(job.shape) != 2 or treatment.factored is None:
        return "dense"
    return "factors"


def plan_adapted(job: TensorJob, models, base, budget: int) -> TensorPlan | None:
    """A tensor's plan in a merge with adapters: None where the task vectors
    must be formed (the dense plan), else the base's rows (and the factors)
    under the budget. CART's k on adapter factors is adapter_rank_ratio times R, the
    sum of the adapters' ranks there (the centered task vectors' rank bound);
    the rank option sets it."""
    path = adapted_path(job.name, job, models)
    if path == "dense":
        return None
    held = base.held_itemsize(job.name)
    out_b = job.out_dtype.itemsize
    R = None
    state = 0
    if path == "factors":
        R = sum(m.adapter.factors[job.name].rank for m in models if m.kind(job.name) == "factors")
        if job.treatment == "low-rank":
            cfg = job.cfg
            k = cfg.rank if cfg.rank is not None else max(1, int(cfg.adapter_rank_ratio * R))
            job = dataclasses.replace(job, rank=k, rule=f"{job.rule}; LoRA factors of rank {R}")
        m, n = job.shape
        # float64 factors, their QR bases and the merged update's two factors, plus the cores.
        state = 8 * 6 * (m + n) * R + 8 * 4 * R * R
    work = compute_dtype(job.dtype).itemsize
    per_row = (math.prod(job.shape[1:]) if job.shape else 1) * (held + work + 2 * out_b)
    rows = job.shape[0] if job.shape else 1
    if state + rows * per_row <= budget or not job.shape:
        return TensorPlan(job, state + rows * per_row, None, 1, path=path, update_rank=R)
    if state + per_row > budget:
        raise MergeError(
            f"tensor '{job.name}' {tuple(job.shape)}: merging it needs at least {format_size(state + per_row)} "
            f"(the LoRA factors and one row block), more than the memory budget of {format_size(budget)}"
        )
    block_rows = (budget - state) // per_row
    return TensorPlan(job, state + block_rows * per_row, block_rows, 1, path=path, update_rank=R)


def _read_bytes(t: TensorPlan, models, base) -> int:
    """Bytes read per pass over a tensor: every input's, or for the adapted
    paths the base's (the factors are small)."""
    if t.path != "dense":
        return base.ckpt.tensors[t.name].nbytes
    return sum(m.tensors[t.name].nbytes for m in [*models, *([base] if base is not None else [])])


def averaging_tensors(plan: MergePlan) -> list[TensorPlan]:
    """Low-rank tensors merged from LoRA factors whose k reaches R, the
    centered task vectors' rank bound: there CART keeps every centered task
    vector whole, and they sum to zero, so the merge is the average."""
    return [
        t for t in plan.tensors
        if t.path == "factors" and t.policy == "low-rank" and t.rank is not None and t.rank >= t.update_rank
    ]


def averaging_warning(tensors: list[TensorPlan]) -> str:
    t = tensors[0]
    more = f" and {len(tensors) - 1} more" if len(tensors) > 1 else ""
    return (
        f"warning: CART on '{t.name}'{more} is the plain average: k = {t.rank} is not below R = {t.update_rank}, "
        "the rank of the adapters' centered updates; give rank (--rank) or adapter_rank_ratio below it"
    )
