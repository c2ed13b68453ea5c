"""CART-indexing (Choi et al. 2024): keep θ_avg and every task's rank-k
centred update, and rebuild the model of any one task on demand.

An index is a Hugging Face folder of sharded safetensors holding, for every
tensor, θ_avg under its own name, and for every low-rank matrix and task t
the factors of LowRank_k(θ_t − θ_avg) = L_t R_t under `NAME::task<t>.left`
(m x k, U_t S_t) and `NAME::task<t>.right` (k x n, V_tᵀ), in float32 (for a
stack of matrices, E x m x k and E x k x n: every slice's factors). It
takes θ_avg plus T · k · (m + n) numbers per matrix instead of T models.
Task t's model is θ_avg + L_t R_t (θ_avg elsewhere), written like a merge.
Both steps go tensor by tensor and write through the streamed shard writer;
each matrix is processed whole."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from . import kernels as ops
from ._version import __version__
from .checkpoint import Checkpoint
from .errors import MergeError
from .merge import full_precision_matmuls, make_config, resolve_device
from .methods import decide
from .methods.cart import STACKED_LOWRANK, cart_factors
from .methods.stacked import slices
from .numerics import check_finite
from .planning import check_compatible, natural_order
from .output_folder import OutputFolder, aux_files
from .shard_writer import OutputTensor, ShardWriter, plan_shards, shard_filename, write_index
from .sizes import parse_size
from .streaming import DEFAULT_SHARD_SIZE

INDEX_FILE = "ccsmerge-index.json"
TASK_FILE = "ccsmerge-task.json"  # beside an exported model: the index and the task it came from
LOWRANK_TREATMENTS = ("low-rank", STACKED_LOWRANK.name)
_FACTOR = re.compile(r"^(?P<name>.*)::task(?P<task>\d+)\.(?P<side>left|right)$")


def _output(out: str | Path, inputs: Sequence[str | Path], overwrite: bool) -> OutputFolder:
    """The output folder, checked before any input is read. An index has no
    resume: an interrupted one is refused unless overwrite."""
    folder = OutputFolder(out, inputs, overwrite=overwrite, resumable=False)
    folder.check()
    return folder


def _write(partial: Path, outputs: list[OutputTensor], produce, shard_bytes: int, metadata: dict[str, str]) -> None:
    """Write outputs in order, produce(output) giving each tensor."""
    shards = plan_shards(outputs, shard_bytes)
    for i, shard in enumerate(shards):
        writer = ShardWriter(partial / shard_filename(i, len(shards)), shard, metadata)
        try:
            for out in shard:
                writer.write(out.name, produce(out))
            writer.close()
        except BaseException:
            writer.abort()
            raise
    write_index(partial, shards, {"ccsmerge_version": __version__})


def _write_folder(folder: OutputFolder, inputs, outputs, produce, shard_bytes, metadata, record) -> None:
    """A JSON record, shards, index and the aux files into the partial folder,
    then publish it; on any failure (an interruption too) it is removed."""
    name, content = record
    with folder.cleanup():
        folder.claim((name, (json.dumps(content, indent=2) + "\n").encode()), inputs)
        with full_precision_matmuls():
            _write(folder.partial, outputs, produce, shard_bytes, metadata)
        folder.publish(aux_files(inputs))


def build_index(
    models: Sequence[str | Path],
    out: str | Path,
    *,
    rank_ratio: float = 0.12,
    out_shard_size: str | int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    **options,
) -> Path:
    """Write the CART index of `models` (folders or files) to the folder `out`.
    options: svd, oversample, power_iters, seed, device, lowrank_include/exclude."""
    folder = _output(out, models, overwrite)
    cfg = make_config(method="cart", rank_ratio=rank_ratio, **options)
    if len(models) < 2:
        raise MergeError(f"an index needs at least 2 models, got {len(models)}")
    ckpts = [Checkpoint(p) for p in models]
    names = check_compatible(ckpts, None)
    T = len(ckpts)
    device = resolve_device(cfg.device)
    plan: list[OutputTensor] = []
    jobs = {name: decide(name, ckpts[0].tensors[name].shape, ckpts[0].tensors[name].dtype, cfg, T) for name in names}
    for name in names:
        info = ckpts[0].tensors[name]
        plan.append(OutputTensor(name, info.shape, info.dtype))
        if jobs[name].treatment in LOWRANK_TREATMENTS:
            *lead, m, n = info.shape
            k = jobs[name].rank
            for t in range(T):
                plan.append(OutputTensor(f"{name}::task{t}.left", (*lead, m, k), torch.float32))
                plan.append(OutputTensor(f"{name}::task{t}.right", (*lead, k, n), torch.float32))
    recipe = {
        "kind": "cart-index",
        "models": [str(Path(p).resolve()) for p in models],
        "rank_ratio": cfg.rank_ratio,
        "svd": cfg.svd,
        "seed": cfg.seed,
        "ccsmerge_version": __version__,
    }
    metadata = {"format": "pt", "ccsmerge_index": json.dumps(recipe, sort_keys=True)}
    factors: dict[str, torch.Tensor] = {}

    def produce(output: OutputTensor) -> torch.Tensor:
        if output.name in factors:
            return factors.pop(output.name)
        xs = [c.read(output.name).to(device) for c in ckpts]
        if not output.dtype.is_floating_point:
            return xs[0].cpu()
        center = ops.mean(xs)
        check_finite(output.name, center, xs, allow=cfg.allow_nonfinite)
        job = jobs[output.name]
        if job.treatment in LOWRANK_TREATMENTS:
            # A stack of matrices: every slice's factors, stacked like the slices.
            matrices = list(slices(job, xs, center)) if job.treatment == STACKED_LOWRANK.name else [(job, xs, center)]
            per_matrix = [
                cart_factors(one, lambda start, stop: (one_xs, one_center), [(0, one.shape[0])], device)
                for one, one_xs, one_center in matrices
            ]
            *lead, m, n = job.shape
            for t in range(T):
                left = torch.stack([(u[t] * s[t]).float().cpu() for u, s, _ in per_matrix])
                right = torch.stack([vh[t].float().cpu() for _, _, vh in per_matrix])
                factors[f"{output.name}::task{t}.left"] = left.reshape(*lead, m, job.rank)
                factors[f"{output.name}::task{t}.right"] = right.reshape(*lead, job.rank, n)
        return center.to(output.dtype).cpu()

    _write_folder(folder, ckpts, plan, produce, parse_size(out_shard_size), metadata, (INDEX_FILE, recipe))
    return folder.out


def export_task(
    index: str | Path,
    task: int,
    out: str | Path,
    *,
    out_shard_size: str | int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    device: str = "auto",
) -> Path:
    """Write task `task`'s model, θ_avg + LowRank_k(θ_task − θ_avg), from a CART index to `out`."""
    index = Path(index)
    folder = _output(out, [index], overwrite)
    if not (index / INDEX_FILE).is_file():
        raise MergeError(f"{index}: not a ccsmerge index (no {INDEX_FILE})")
    recipe = json.loads((index / INDEX_FILE).read_text())
    tasks = len(recipe["models"])
    if not 0 <= task < tasks:
        raise MergeError(f"{index}: task {task} out of range; the index holds tasks 0..{tasks - 1}")
    ckpt = Checkpoint(index)
    names = sorted((n for n in ckpt.tensors if not _FACTOR.match(n)), key=natural_order)
    outputs = [OutputTensor(n, ckpt.tensors[n].shape, ckpt.tensors[n].dtype) for n in names]
    compute = resolve_device(device)
    exported = {**recipe, "kind": "cart-index-task", "task": task, "task_model": recipe["models"][task]}
    metadata = {"format": "pt", "ccsmerge_recipe": json.dumps(exported, sort_keys=True)}

    def produce(output: OutputTensor) -> torch.Tensor:
        center = ckpt.read(output.name)
        left_name = f"{output.name}::task{task}.left"
        if left_name not in ckpt.tensors:
            return center
        left = ckpt.read(left_name).to(compute)
        right = ckpt.read(f"{output.name}::task{task}.right").to(compute)
        center = center.to(compute).float()
        if center.dim() == 2:
            return ops.lowrank_update(center, left, right, 1.0, output.dtype).cpu()
        m, n = center.shape[-2:]  # a stack of matrices, slice by slice
        k = left.shape[-1]
        pairs = zip(center.reshape(-1, m, n), left.reshape(-1, m, k), right.reshape(-1, k, n))
        merged = [ops.lowrank_update(c, lft, rgt, 1.0, output.dtype) for c, lft, rgt in pairs]
        return torch.stack(merged).reshape(center.shape).cpu()

    _write_folder(folder, [ckpt], outputs, produce, parse_size(out_shard_size), metadata, (TASK_FILE, exported))
    return folder.out
