"""merge_checkpoints: merge checkpoints on disk into a sharded safetensors
folder, tensor by tensor, with a peak memory set by a budget.

Three threads overlap the work: a reader maps the next tensors of every
input (and faults their pages in), the caller's thread merges, and a writer
streams results into the shards. A byte budget shared by the three bounds
what is in flight; a tensor whose merge does not fit is merged in row blocks
(ccsmerge.blockwise) while nothing else is in flight.

On a GPU the reader also copies the next tensor's inputs to the device
(ccsmerge.staging: pinned buffers, a second CUDA stream) while the current
one is merged, and a second budget bounds the device memory in flight: each
tensor holds its planned device working set from its staging until its merge
is done.

The output is built in a hidden folder beside the target and renamed into
place when complete; finished shards in that folder let `resume` continue
an interrupted merge, with identical bytes (the merge is deterministic)."""

from __future__ import annotations

import json
import queue
import re
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from ._version import __version__
from .blockwise import merge_in_blocks
from .checkpoint import Checkpoint
from .config import NEEDS_BASE, MergeConfig
from .devices import parse_device
from .distributed import Coordinator, TorchDistributed, assign_shards
from .errors import MergeError, MergeInterrupted
from .merge import full_precision_matmuls, make_config, merge_tensor, resolve_device
from .planning import (
    DEVICE_RESERVE,
    GPU_BUDGET_FRACTION,
    MergePlan,
    TensorPlan,
    make_plan,
)
from .recipe import DTYPES, ModelEntry, Parameters, Recipe, dump_recipe
from .shard_writer import (
    ShardWriter,
    shard_filename,
    shard_header,
    shard_size,
    write_atomically,
    write_index,
)
from .sizes import parse_size
from .staging import Staged, Staging, make_staging

RECIPE_FILE = "ccsmerge.yml"
DEFAULT_SHARD_SIZE = "5GB"
_POLL = 0.1  # seconds between checks for a failed thread while waiting


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


def partial_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.ccsmerge-partial"


@dataclass
class PreparedMerge:
    plan: MergePlan
    cfg: MergeConfig
    models: list[Checkpoint]
    base: Checkpoint | None
    recipe: Recipe

    @property
    def metadata(self) -> dict[str, str]:
        recipe = self.recipe.model_dump(by_alias=True, exclude_none=True)
        return {"format": "pt", "ccsmerge_recipe": json.dumps(recipe, sort_keys=True)}


def prepare_merge(
    models: Sequence[str | Path],
    method: str = "cart",
    base: str | Path | None = None,
    *,
    max_memory: str | int | None = None,
    max_gpu_memory: str | int | None = None,
    dtype: str | None = None,
    out_shard_size: str | int = DEFAULT_SHARD_SIZE,
    local_device=None,
    **options,
) -> PreparedMerge:
    """Open the inputs (headers only), validate everything and plan the merge.
    local_device maps the device option to this process's device (one GPU
    per process in a distributed merge)."""
    if isinstance(models, (str, Path)) or len(models) < 2:
        count = 1 if isinstance(models, (str, Path)) else len(models)
        raise MergeError(f"merging needs at least 2 models, got {count}")
    cfg = make_config(method=method, **options)
    if cfg.method in NEEDS_BASE and base is None:
        raise MergeError(f"method '{cfg.method}' needs a base model (--base)")
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    budget = default_budget() if max_memory is None else _size("max_memory", max_memory)
    gpu_budget = None if max_gpu_memory is None else _size("max_gpu_memory", max_gpu_memory)
    device = planning_device(local_device(cfg.device) if local_device else cfg.device)
    if device.type != "cuda":
        gpu_budget = None  # a CPU merge has no GPU budget
    elif gpu_budget is None:
        gpu_budget = default_gpu_budget(device)
    shard_bytes = _size("out_shard_size", out_shard_size)
    opened = [Checkpoint(p) for p in models]
    base_ckpt = Checkpoint(base) if base is not None else None
    out_dtype = getattr(torch, dtype) if dtype else None
    plan = make_plan(opened, base_ckpt, cfg, budget, out_dtype, shard_bytes, gpu_budget=gpu_budget)
    recipe = Recipe(
        merge_method=cfg.method,
        base_model=str(Path(base).resolve()) if base is not None else None,
        models=[ModelEntry(model=str(Path(p).resolve())) for p in models],
        parameters=Parameters(
            rank_ratio=cfg.rank_ratio,
            lam=cfg.scale,
            density=cfg.density,
            common_space_fraction=cfg.common_space_fraction if cfg.method == "iso_cts" else None,
            svd=cfg.svd,
            oversample=cfg.oversample,
            power_iters=cfg.power_iters,
            seed=cfg.seed,
            lowrank_include=list(cfg.lowrank_include),
            lowrank_exclude=list(cfg.lowrank_exclude),
            allow_nonfinite=cfg.allow_nonfinite or None,
        ),
        dtype=dtype,
        ccsmerge_version=__version__,
    )
    return PreparedMerge(plan, cfg, opened, base_ckpt, recipe)


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
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    overlap: bool = True,
    distributed: bool = False,
    **options,
) -> Path:
    """Merge checkpoints on disk into the Hugging Face folder `out`.

    models/base: model folders or .safetensors/.bin/.pt files. options are
    ccsmerge.merge's (rank_ratio, lam, density, svd, oversample, power_iters,
    seed, device, lowrank_include, lowrank_exclude). max_memory: the budget
    ("2GB"; default half the available RAM); max_gpu_memory: the GPU memory
    budget of a merge on a GPU (default 80 % of the device's free memory;
    unused on the CPU); dtype: output dtype of floating tensors (default:
    each input's); out_shard_size: "5GB". The output appears only when
    complete; an existing non-empty `out` is refused unless overwrite; resume
    continues an interrupted merge. overlap=False reads, merges and writes
    one tensor at a time, in sequence, and copies inputs to the GPU in the
    merge itself (to measure what the overlap gains). distributed=True splits
    the shards over the processes of a torch.distributed job (torchrun);
    every process calls this with the same arguments. Returns `out`."""
    out = Path(out)
    coordinator = TorchDistributed() if distributed else Coordinator()
    try:
        return _merge_checkpoints(
            coordinator,
            models,
            out,
            method,
            base,
            dict(
                max_memory=max_memory, max_gpu_memory=max_gpu_memory, dtype=dtype, out_shard_size=out_shard_size,
                **options,
            ),
            overwrite=overwrite,
            resume=resume,
            progress=progress,
            overlap=overlap,
        )
    finally:
        coordinator.close()


def _merge_checkpoints(coordinator, models, out, method, base, options, *, overwrite, resume, progress, overlap):
    prepared = coordinator.agree(
        lambda: prepare_merge(models, method, base, local_device=coordinator.local_device, **options)
    )[coordinator.rank]
    partial = partial_folder(out)
    recipe_text = dump_recipe(prepared.recipe)

    def prepare_output() -> set[int]:  # on rank 0 only
        _check_output(out, prepared, overwrite)
        done = _reuse_partial(partial, prepared, recipe_text, resume, overwrite)
        partial.mkdir(parents=True, exist_ok=True)
        write_atomically(partial / RECIPE_FILE, recipe_text.encode())
        return done

    done = coordinator.agree(prepare_output, on_rank=0)[0]
    owner = assign_shards(prepared.plan, coordinator.world)
    skip = done | {i for i, rank in enumerate(owner) if rank != coordinator.rank}

    def stream() -> None:
        device = resolve_device(coordinator.local_device(prepared.cfg.device))
        with full_precision_matmuls():
            _stream(prepared, device, partial, skip, progress and coordinator.rank == 0, overlap)

    try:
        coordinator.agree(stream)
    except Exception as exc:
        # Bad input, a full disk, a failure (on any rank): nothing worth
        # resuming, and the space is freed. Only an interruption (Ctrl-C, a
        # kill) keeps the finished shards for `resume`.
        if coordinator.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        # No rank exits (and has the launcher stop the others) before the removal.
        coordinator.barrier()
        if isinstance(exc, OSError):
            where = exc.filename or out
            raise MergeError(f"{where}: {exc.strerror or exc}; the partial output {partial} was removed") from None
        raise

    def finish() -> None:  # on rank 0 only
        write_index(partial, prepared.plan.shards, {"ccsmerge_version": __version__})
        # Config and tokenizer files: the base's, or the first model's that has any.
        sources = ([prepared.base] if prepared.base else []) + prepared.models
        for aux in next((found for ckpt in sources if (found := ckpt.aux_files())), []):
            shutil.copyfile(aux, partial / aux.name)
        _publish(partial, out)

    coordinator.agree(finish, on_rank=0)
    return out


def _check_output(out: Path, prepared: PreparedMerge, overwrite: bool) -> None:
    target = out.resolve()
    inputs = prepared.models + ([prepared.base] if prepared.base else [])
    for ckpt in inputs:
        where = ckpt.path.resolve()
        if target == where or target in where.parents:
            raise MergeError(f"{out}: the output would replace the input {ckpt.path}")
        if where in target.parents:
            raise MergeError(f"{out}: the output would be written inside the input {ckpt.path}")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"{out}: exists and is not empty (pass --overwrite to replace it)")


def _reuse_partial(partial: Path, prepared: PreparedMerge, recipe_text: str, resume: bool, overwrite: bool) -> set[int]:
    """Indices of the shards an interrupted merge already finished (with resume)."""
    if not partial.exists():
        return set()
    if not resume:
        if not overwrite:
            raise MergeError(
                f"{partial}: an interrupted merge into this output is there; "
                "pass --resume to finish it or --overwrite to start again"
            )
        shutil.rmtree(partial)
        return set()
    recorded = partial / RECIPE_FILE
    if not recorded.is_file() or recorded.read_text() != recipe_text:
        raise MergeError(f"{recorded}: the interrupted merge used other inputs or options; it cannot be resumed")
    done = set()
    shards = prepared.plan.shards
    planned = {shard_filename(i, len(shards)) for i in range(len(shards))}
    for stale in partial.glob("model-*.safetensors*"):  # from a plan with another shard size
        if stale.name not in planned:
            stale.unlink()
    for i, shard in enumerate(shards):
        path = partial / shard_filename(i, len(shards))
        path.with_name(path.name + ".part").unlink(missing_ok=True)
        if path.is_file() and path.stat().st_size == shard_size(shard, prepared.metadata):
            header = shard_header(shard, prepared.metadata)
            with open(path, "rb") as f:
                if f.read(len(header)) == header:
                    done.add(i)
                    continue
        path.unlink(missing_ok=True)
    return done


def _publish(partial: Path, out: Path) -> None:
    """Move the finished folder into place (replacing an old output only now)."""
    if not out.exists():
        partial.rename(out)
        return
    previous = out.parent / f".{out.name}.ccsmerge-replaced"
    _remove(previous)
    out.rename(previous)
    partial.rename(out)
    _remove(previous)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class MemoryBudget:
    """Bytes in flight across the threads; acquire blocks until they fit."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0
        self.peak = 0  # the most bytes held at once
        self._cond = threading.Condition()
        self._cancelled = False

    def acquire(self, size: int) -> int:
        size = min(size, self.total)
        with self._cond:
            while self.used + size > self.total and not self._cancelled:
                self._cond.wait()
            self.used += size
            self.peak = max(self.peak, self.used)
        return size

    def release(self, size: int) -> None:
        with self._cond:
            self.used -= size
            self._cond.notify_all()

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()


class _Pipeline:
    def __init__(self, prepared: PreparedMerge, device: torch.device, folder: Path, done: set[int], bar, overlap: bool):
        self.p = prepared
        self.device = device
        self.folder = folder
        self.bar = bar
        plan = prepared.plan
        self.shard_of = {t.name: i for i, shard in enumerate(plan.shards) for t in shard}
        self.todo = [t for t in plan.tensors if self.shard_of[t.name] not in done]
        # The pinned staging buffers of a GPU merge hold their part of the host budget throughout.
        self.budget = MemoryBudget(plan.budget - plan.staging_bytes)
        # The device bytes in flight (none in a plan for the CPU).
        self.gpu = MemoryBudget(plan.gpu_budget - DEVICE_RESERVE if plan.gpu_budget is not None else 0)
        # Without overlap every tensor holds the whole budget until written, so
        # reading, merging and writing take turns, and inputs reach the GPU in
        # the merge itself.
        self.overlap = overlap
        self.staging = make_staging(device, plan.staging_bytes) if overlap else Staging()
        self.loaded: queue.Queue = queue.Queue(maxsize=2)
        self.to_write: queue.Queue = queue.Queue(maxsize=4)
        self.failed = threading.Event()
        self.errors: list[BaseException] = []
        self.current: str | None = None  # the tensor being merged
        self.merged = 0

    # Queue operations that give up once another thread has failed.
    def put(self, q: queue.Queue, item) -> None:
        while not self.failed.is_set():
            try:
                q.put(item, timeout=_POLL)
                return
            except queue.Full:
                pass
        raise _Stopped()

    def get(self, q: queue.Queue):
        while not self.failed.is_set():
            try:
                return q.get(timeout=_POLL)
            except queue.Empty:
                pass
        raise _Stopped()

    def fail(self, exc: BaseException) -> None:
        if not isinstance(exc, _Stopped):
            self.errors.append(exc)
        self.failed.set()
        self.budget.cancel()
        self.gpu.cancel()

    def read(self) -> None:
        try:
            for t in self.todo:
                whole_budget = t.block_rows is not None or not self.overlap
                held = self.budget.acquire(self.budget.total if whole_budget else t.memory)
                held_gpu = self.gpu.acquire(self.gpu.total if whole_budget else (t.device_memory or 0))
                staged = None
                if t.block_rows is None:
                    xs = [m.read(t.name) for m in self.p.models]
                    base = self.p.base.read(t.name) if self.p.base else None
                    staged = self.staging.stage(xs, base)
                    del xs, base
                self.put(self.loaded, (t, staged, (held, held_gpu)))
            self.put(self.loaded, None)
        except BaseException as exc:  # noqa: BLE001 (any failure stops the other threads, then is raised)
            self.fail(exc)

    def write(self) -> None:
        shards = self.p.plan.shards
        writer: ShardWriter | None = None
        try:
            while True:
                item = self.get(self.to_write)
                if item is None:
                    return
                name, chunk, release = item
                if name is not None:
                    index = self.shard_of[name]
                    if writer is None:
                        path = self.folder / shard_filename(index, len(shards))
                        writer = ShardWriter(path, shards[index], self.p.metadata)
                    writer.write(name, chunk)
                    del chunk
                    if writer.complete:
                        writer.close()
                        writer = None
                if release:
                    self.budget.release(release)
        except BaseException as exc:  # noqa: BLE001 (any failure stops the other threads, then is raised)
            self.fail(exc)
        finally:
            if writer is not None:
                writer.abort()

    def merge(self, t: TensorPlan, staged: Staged | None, held: tuple[int, int]) -> None:
        try:
            self._merge(t, staged, held)
        except MergeError as exc:
            raise MergeError(_name_inputs(str(exc), t.name, self.p)) from None

    def _merge(self, t: TensorPlan, staged: Staged | None, held: tuple[int, int]) -> None:
        cfg, models, base = self.p.cfg, self.p.models, self.p.base
        held, held_gpu = held
        if t.block_rows is None:
            xs, base_tensor = self.staging.use(staged)
            # Computed on the device, brought back to the host (which waits
            # for the merge's kernels), cast to the output dtype there.
            merged = merge_tensor(t.name, xs, base_tensor, cfg, self.device).to("cpu").to(t.out_dtype)
            del xs, base_tensor
            self.staging.done(staged)
            self.gpu.release(held_gpu)
            keep = min(held, merged.nbytes)
            self.budget.release(held - keep)
            self.put(self.to_write, (t.name, merged, keep))
            return

        def rows(start: int, stop: int):
            xs = [m.read_rows(t.name, start, stop) for m in models]
            return xs, (base.read_rows(t.name, start, stop) if base else None)

        for chunk in merge_in_blocks(t.name, t.shape, t.dtype, len(models), rows, cfg, self.device, t.block_rows):
            self.put(self.to_write, (t.name, chunk.to(t.out_dtype), 0))
        self.gpu.release(held_gpu)  # every block is back on the host
        self.put(self.to_write, (None, None, held))  # the writer releases the budget once it has written all blocks

    def where_stopped(self) -> str:
        shards = len(self.p.plan.shards)
        finished = sum(1 for i in range(shards) if (self.folder / shard_filename(i, shards)).is_file())
        return (
            f"interrupted while merging tensor '{self.current}' ({self.merged} of {len(self.todo)} tensors done); "
            f"{finished} of {shards} shards are finished in {self.folder}: rerun with --resume to continue"
        )

    def run(self) -> None:
        reader = threading.Thread(target=self.read, name="ccsmerge-reader", daemon=True)
        writer = threading.Thread(target=self.write, name="ccsmerge-writer", daemon=True)
        reader.start()
        writer.start()
        process = psutil.Process()
        try:
            for done, item in enumerate(iter(lambda: self.get(self.loaded), None), start=1):
                t, staged, held = item
                self.current = t.name
                self.merge(t, staged, held)
                self.merged = done
                del item, staged
                if self.bar is not None:
                    self.bar.set_postfix_str(
                        f"tensors {done}/{len(self.todo)} RSS {process.memory_info().rss / 1e9:.2f} GB", refresh=False
                    )
                    self.bar.update(self.p.plan.read_bytes_per_pass[t.name] * t.passes)
            self.put(self.to_write, None)
            writer.join()
        except BaseException as exc:  # noqa: BLE001 (any failure stops the other threads, then is raised)
            self.fail(exc)
        finally:
            reader.join()
            writer.join()
            try:
                self.staging.close()
            except Exception as exc:  # noqa: BLE001 (reported unless another failure came first)
                if not self.errors:
                    self.errors.append(exc)
        if self.errors:
            raise self.errors[0]


def _name_inputs(message: str, name: str, prepared: PreparedMerge) -> str:
    """The engine's messages say "model 2" or "base": add the files that holds the tensor."""
    labelled = [(f"model {i}", m) for i, m in enumerate(prepared.models)]
    labelled += [("base", prepared.base)] if prepared.base is not None else []
    named = [f"{label} = {ckpt.info(name).file}" for label, ckpt in labelled if re.search(rf"\b{label}\b", message)]
    return f"{message} ({'; '.join(named)})" if named else message


class _Stopped(Exception):
    """Another thread failed: this one stops without an error of its own."""


def _stream(
    prepared: PreparedMerge, device: torch.device, folder: Path, done: set[int], progress: bool, overlap: bool
) -> None:
    pipeline = _Pipeline(prepared, device, folder, done, None, overlap)
    if progress:
        from tqdm import tqdm

        per_pass = prepared.plan.read_bytes_per_pass
        total = sum(per_pass[t.name] * t.passes for t in pipeline.todo)
        pipeline.bar = tqdm(total=total, unit="B", unit_scale=True, desc="merging", dynamic_ncols=True)
    try:
        pipeline.run()
    except KeyboardInterrupt:
        raise MergeInterrupted(pipeline.where_stopped()) from None
    finally:
        if pipeline.bar is not None:
            pipeline.bar.close()
