"""merge_checkpoints: merge checkpoints on disk into a sharded safetensors
folder, tensor by tensor, with a peak memory set by a budget.

This module prepares a merge (opens the inputs' headers, validates the
options, sets the budgets and plans every tensor) and ties together the two
parts that run it: ccsmerge.output_folder (the partial folder beside the
target, its lock, resume, the final rename, one cleanup for all of it) and
ccsmerge.pipeline (the reader, merge and writer threads under the budgets).
Finished shards in the partial folder let `resume` continue an interrupted
merge, with identical bytes (the merge is deterministic)."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from . import accuracy_record
from ._version import __version__
from .adapters import LoraAdapter, is_adapter
from .checkpoint import Checkpoint
from .config import MergeConfig
from .devices import parse_device
from .distributed import Coordinator, TorchDistributed, assign_shards
from .errors import MergeError
from .merge import full_precision_matmuls, make_config, resolve_device
from .inputs import InputOptions, Inputs, InputView, open_inputs
from .layers import check_layer_range
from .output_folder import RECIPE_FILE, AuxFiles, OutputFolder, aux_files, output_path
from .output_folder import partial_folder  # noqa: F401 (imported from here by callers and tests)
from .pipeline import _stream
from .planning import GPU_BUDGET_FRACTION, MergePlan, averaging_tensors, averaging_warning, make_plan
from .recipe import DTYPES, Recipe, dump_recipe, recipe_of
from .shard_writer import write_index
from .sizes import parse_size

DEFAULT_SHARD_SIZE = "5GB"
OUTPUT_FORMATS = ("safetensors", "lora")


def default_budget() -> int:
    """Half of the memory available now: the rest stays for the page cache and other programs."""
    return int(psutil.virtual_memory().available // 2)


def default_gpu_budget(device: torch.device) -> int:
    """A share (GPU_BUDGET_FRACTION) of the device's free memory now."""
    if not torch.cuda.is_available():
        raise MergeError(
            "device: CUDA was requested but no CUDA device is available "
            "(to plan a GPU merge on this machine, give max_gpu_memory / --max-gpu-memory)"
        )
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * GPU_BUDGET_FRACTION)


def planning_device(device: str) -> torch.device:
    """The device a merge will run on, without requiring it to be present
    ("auto": CUDA when available)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return parse_device(device)


@dataclass
class PreparedMerge:
    plan: MergePlan
    cfg: MergeConfig
    models: list[InputView]
    base: InputView | None
    recipe: Recipe
    input_options: InputOptions = field(default_factory=InputOptions)
    inputs: Inputs | None = None

    @property
    def metadata(self) -> dict[str, str]:
        recipe = self.recipe.model_dump(by_alias=True, exclude_none=True)
        found = {"format": "pt", "ccsmerge_recipe": json.dumps(recipe, sort_keys=True)}
        if self.input_options.record():  # what changed the inputs: a resumed run must have the same
            found["ccsmerge_inputs"] = json.dumps(self.input_options.record(), sort_keys=True)
        return found

    def aux_files(self) -> AuxFiles:
        """The output's aux files: config and generation files from the base
        (or the first model), the tokenizer's from tokenizer_source, and
        config.json brought to the output's dtype, vocabulary and layers."""
        sources = ([self.base] if self.base else []) + self.models
        layer_range = self.input_options.layer_range
        inputs = self.inputs

        def edit(config: dict) -> bool:
            return inputs.edit_config(config, layer_range)

        edits = inputs is not None and (inputs.vocab_rows is not None or layer_range is not None)
        return aux_files(
            sources,
            _output_dtype(self.plan, self.input_options.input_dtype),
            tokenizer=inputs.tokenizer if inputs is not None else None,
            edit_config=edit if edits else None,
        )


def prepare_merge(
    models: Sequence[str | Path],
    method: str = "cart",
    base: str | Path | None = None,
    *,
    max_memory: str | int | None = None,
    max_gpu_memory: str | int | None = None,
    dtype: str | None = None,
    out_shard_size: str | int = DEFAULT_SHARD_SIZE,
    input_dtype: str | None = None,
    tokenizer_source: str | None = None,
    layer_range: tuple[int, int] | None = None,
    allow_config_mismatch: bool = False,
    local_device=None,
    **options,
) -> PreparedMerge:
    """Open the inputs (headers and config.json only), compare their
    configs, validate everything and plan the merge (see merge_checkpoints
    for the options). local_device maps the device option to this process's
    device (one GPU per process in a distributed merge)."""
    if isinstance(models, (str, Path)) or len(models) < 2:
        count = 1 if isinstance(models, (str, Path)) else len(models)
        raise MergeError(f"merging needs at least 2 models, got {count}")
    cfg = make_config(method=method, **options)
    if cfg.spec.needs_base and base is None:
        raise MergeError(f"method '{cfg.method}' needs a base model (--base)")
    for option, value in (("dtype", dtype), ("input_dtype", input_dtype)):
        if value is not None and value not in DTYPES:
            raise MergeError(f"{option}: '{value}' is not one of {', '.join(DTYPES)}")
    if tokenizer_source is not None and (not isinstance(tokenizer_source, (str, Path)) or str(tokenizer_source) == ""):
        raise MergeError(f"tokenizer_source: expected 'base' or a folder, got {tokenizer_source!r}")
    input_options = InputOptions(
        getattr(torch, input_dtype) if input_dtype else None,
        str(tokenizer_source) if tokenizer_source is not None else None,
        check_layer_range(layer_range) if layer_range is not None else None,
    )
    budget = default_budget() if max_memory is None else _size("max_memory", max_memory)
    gpu_budget = None if max_gpu_memory is None else _size("max_gpu_memory", max_gpu_memory)
    device = planning_device(local_device(cfg.device) if local_device else cfg.device)
    if device.type != "cuda":
        gpu_budget = None  # a CPU merge has no GPU budget
    elif gpu_budget is None:
        gpu_budget = default_gpu_budget(device)
    shard_bytes = _size("out_shard_size", out_shard_size)
    opened = [LoraAdapter(p) if is_adapter(p) else Checkpoint(p) for p in models]
    base_ckpt = Checkpoint(base) if base is not None else None
    inputs = open_inputs(opened, base_ckpt, input_options, allow_config_mismatch=allow_config_mismatch)
    out_dtype = getattr(torch, dtype) if dtype else None
    plan = make_plan(
        inputs.models, inputs.base, cfg, budget, out_dtype, shard_bytes, gpu_budget=gpu_budget,
        out_dtypes=inputs.out_dtypes,
    )
    recipe = recipe_of(cfg, models, base, dtype, input_dtype=input_dtype, tokenizer_source=tokenizer_source,
                       layer_range=layer_range)
    return PreparedMerge(plan, cfg, inputs.models, inputs.base, recipe, input_options, inputs)


def _size(option: str, value: str | int) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise MergeError(f"{option}: {exc}") from None


def plan_checkpoints(models: Sequence[str | Path], method: str = "cart", base=None, **options) -> MergePlan:
    """What merge_checkpoints would do with these arguments, without merging."""
    return prepare_merge(models, method, base, **options).plan


def merge_checkpoints(
    models: Sequence[str | Path],
    out: str | Path,
    method: str = "cart",
    base: str | Path | None = None,
    *,
    max_memory: str | int | None = None,
    max_gpu_memory: str | int | None = None,
    dtype: str | None = None,
    out_shard_size: str | int = DEFAULT_SHARD_SIZE,
    input_dtype: str | None = None,
    tokenizer_source: str | None = None,
    layer_range: tuple[int, int] | None = None,
    allow_config_mismatch: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    overlap: bool = True,
    distributed: bool = False,
    output_format: str = "safetensors",
    lora_rank: int | None = None,
    **options,
) -> Path:
    """Merge checkpoints on disk into the Hugging Face folder `out`.

    models/base: model folders or .safetensors/.bin/.pt files. options are
    ccsmerge.merge's (rank_ratio, lam, density, svd, oversample, power_iters,
    seed, device, lowrank_include, lowrank_exclude). max_memory: the budget
    ("2GB"; default half the available RAM); max_gpu_memory: the GPU memory
    budget of a merge on a GPU (default 80 % of the device's free memory;
    unused on the CPU); dtype: output dtype of floating tensors (default:
    the inputs', after input_dtype); out_shard_size: "5GB".

    What is read can be changed first (ccsmerge.inputs): input_dtype
    ("bfloat16", "float16", "float32") casts every floating input tensor
    to it (inputs saved in different dtypes are refused without it);
    tokenizer_source ("base" or a folder) gives the output that tokenizer
    and cuts, pads or reorders every input's embedding and head rows to its
    vocabulary as mergekit does (ccsmerge.vocab); layer_range (start, stop)
    keeps layers start..stop-1, renumbered from 0 (ccsmerge.layers). The
    inputs' config.json are compared first (ccsmerge.model_configs): a
    different architecture or shape is refused unless
    allow_config_mismatch. The output appears only when
    complete; an existing non-empty `out` is refused unless overwrite; resume
    continues an interrupted merge, if no input changed since (see
    ccsmerge.output_folder: also what is refused before anything is read,
    and the lock that keeps a second run out). overlap=False reads, merges and writes
    one tensor at a time, in sequence, and copies inputs to the GPU in the
    merge itself (to measure what the overlap gains). distributed=True splits
    the shards over the processes of a torch.distributed job (torchrun);
    every process calls this with the same arguments.

    output_format="lora" writes a PEFT adapter of the merged update over
    the base instead (ccsmerge.lora_output), exact where the update's rank
    fits lora_rank (None: always; required where the update is dense).
    Returns `out`."""
    out = output_path(out)
    if output_format not in OUTPUT_FORMATS:
        raise MergeError(f"output_format: '{output_format}' is not one of {', '.join(OUTPUT_FORMATS)}")
    prepare_options = dict(
        max_memory=max_memory, max_gpu_memory=max_gpu_memory, dtype=dtype, out_shard_size=out_shard_size,
        input_dtype=input_dtype, tokenizer_source=tokenizer_source, layer_range=layer_range,
        allow_config_mismatch=allow_config_mismatch, **options,
    )
    if output_format == "lora":
        not_applying = (("resume", resume), ("distributed", distributed), ("overlap", not overlap),
                        ("out_shard_size", out_shard_size != DEFAULT_SHARD_SIZE))
        for option, given in not_applying:
            if given:
                raise MergeError(f"{option}: not supported with output_format='lora' (the adapter is one file, "
                                 "written in one run)")
        from .lora_output import merge_to_adapter

        prepared = prepare_merge(models, method, base, **prepare_options)
        _warn_averaging(prepared.plan)
        given_models = [models] if isinstance(models, (str, Path)) else list(models)
        return merge_to_adapter(prepared, out, lora_rank=lora_rank, overwrite=overwrite, progress=progress,
                                dtype=dtype, inputs=[*given_models, *([base] if base is not None else [])])
    if lora_rank is not None:
        raise MergeError("lora_rank: applies to output_format='lora' only")
    coordinator = TorchDistributed() if distributed else Coordinator()
    try:
        return _merge_checkpoints(
            coordinator, models, out, method, base, prepare_options,
            overwrite=overwrite, resume=resume, progress=progress, overlap=overlap,
        )
    finally:
        coordinator.close()


def _merge_checkpoints(coordinator, models, out, method, base, options, *, overwrite, resume, progress, overlap):
    given = [models] if isinstance(models, (str, Path)) else list(models)  # one path: refused by prepare_merge
    folder = OutputFolder(out, [*given, *([base] if base is not None else [])], overwrite=overwrite, resume=resume)
    coordinator.agree(folder.check, on_rank=0)  # before anything is read
    prepared = coordinator.agree(
        lambda: prepare_merge(models, method, base, local_device=coordinator.local_device, **options)
    )[coordinator.rank]
    sources = ([prepared.base] if prepared.base else []) + prepared.models
    if coordinator.rank == 0:
        _warn_averaging(prepared.plan)

    def claim() -> tuple[set[int], AuxFiles]:  # on rank 0 only
        aux = prepared.aux_files()  # a config that cannot say the dtype: refused now
        folder.claim((RECIPE_FILE, dump_recipe(prepared.recipe).encode()), sources)
        done = folder.finished_shards(prepared.plan.shards, prepared.metadata) if folder.resumed else set()
        return done, aux

    with folder.cleanup(coordinator):
        done, aux = coordinator.agree(claim, on_rank=0)[0]
        owner = assign_shards(prepared.plan, coordinator.world)
        skip = done | {i for i, rank in enumerate(owner) if rank != coordinator.rank}

        def stream() -> None:
            device = resolve_device(coordinator.local_device(prepared.cfg.device))
            with full_precision_matmuls():
                _stream(prepared, device, folder.partial, skip, progress and coordinator.rank == 0, overlap)

        # Bad input, a full disk, a failure (on any rank): the cleanup removes
        # the partial folder. Only an interruption (Ctrl-C, SIGTERM, a kill)
        # keeps the finished shards for `resume`.
        coordinator.agree(stream)

        def finish() -> dict | None:  # on rank 0 only
            shards = prepared.plan.shards
            metadata, found = {"ccsmerge_version": __version__}, None
            if any(t.accuracy is not None for t in prepared.plan.tensors):  # a method with a low-rank step
                entries, missing = accuracy_record.assemble(folder.partial, len(shards))
                found = accuracy_record.write_record(folder.partial, entries, missing)
                metadata["ccsmerge_accuracy"] = found
            write_index(folder.partial, shards, metadata)
            folder.publish(aux)
            accuracy_record.remove_shard_records(out)
            return found

        found = coordinator.agree(finish, on_rank=0)[0]
    if coordinator.rank == 0 and found is not None:
        if progress:
            for line in accuracy_record.summary_lines(found):
                print(line, file=sys.stderr)
        capped = accuracy_record.cap_warning(found)
        if capped is not None:
            warnings.warn(capped, stacklevel=2)
    return out


def _warn_averaging(plan: MergePlan) -> None:
    averaged = averaging_tensors(plan)
    if averaged:
        warnings.warn(averaging_warning(averaged).removeprefix("warning: "), stacklevel=4)


def _output_dtype(plan: MergePlan, input_dtype: torch.dtype | None = None) -> torch.dtype | None:
    """The one dtype the floating tensors are written in, where it is not the
    inputs' as saved (--dtype, --input-dtype); None when the output keeps
    the inputs' dtypes."""
    floating = [t for t in plan.tensors if t.dtype.is_floating_point]
    dtypes = {t.out_dtype for t in floating}
    if len(dtypes) == 1 and (input_dtype is not None or any(t.dtype != t.out_dtype for t in floating)):
        return dtypes.pop()
    return None
