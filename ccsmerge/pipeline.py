"""The reader/merge/writer pipeline of a streaming merge.

Three threads overlap the work: a reader maps the next tensors of every
input (and faults their pages in), the caller's thread merges, and a writer
streams results into the shards. A byte budget shared by the three bounds
what is in flight; a tensor whose merge does not fit is merged in row blocks
(ccsmerge.blockwise) while nothing else is in flight.

On a GPU the reader also copies the next tensor's inputs to the device
(ccsmerge.staging: pinned buffers, a second CUDA stream) while the current
one is merged, and a second budget bounds the device memory in flight: each
tensor holds its planned device working set from its staging until its merge
is done."""

from __future__ import annotations

import queue
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import torch

from .errors import MergeError, MergeInterrupted, Terminated
from .accuracy_record import collecting, drain, write_shard_record
from .execute import adapted_deltas, merge_adapted, merge_rows, merge_whole
from .numerics import row_blocks
from .planning import DEVICE_RESERVE, TensorPlan
from .shard_writer import ShardWriter, shard_filename
from .staging import Staged, Staging, fault_in, make_staging

if TYPE_CHECKING:
    from .streaming import PreparedMerge

_POLL = 0.1  # seconds between checks for a failed thread while waiting


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
        self.noted: list = []  # the accuracy entries of the tensor being merged
        self.recorded = any(t.accuracy is not None for t in plan.tensors)  # a method with a low-rank step

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
                if t.block_rows is None and t.path != "dense":  # the base (cast) and the factors, read ahead
                    base = self.p.base.read(t.name)
                    fault_in(base)
                    staged = (adapted_deltas(t.path, t.name, self.p.models), base)
                elif t.block_rows is None:
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
        recorded: list = []
        try:
            while True:
                item = self.get(self.to_write)
                if item is None:
                    return
                name, chunk, release, entries = item
                if name is not None:
                    index = self.shard_of[name]
                    if writer is None:
                        path = self.folder / shard_filename(index, len(shards))
                        writer = ShardWriter(path, shards[index], self.p.metadata)
                        recorded = []
                    writer.write(name, chunk)
                    recorded.extend(entries)
                    del chunk
                    if writer.complete:
                        if self.recorded:  # the record first: a shard with its final name always has one
                            write_shard_record(self.folder, index, len(shards), recorded)
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
        models, base = self.p.models, self.p.base
        held, held_gpu = held
        if t.path != "dense":  # LoRA factors and the base: read ahead, or here block by block
            spans = row_blocks(t.shape[0], t.block_rows or t.shape[0]) if t.shape else [(0, 1)]
            deltas, whole = staged if staged is not None else (adapted_deltas(t.path, t.name, self.p.models), None)

            def base_rows(start: int, stop: int):
                if whole is not None:
                    return whole[start:stop] if t.shape else whole
                return base.read_rows(t.name, start, stop)  # row blocks: whole is None only for a matrix

            for chunk in merge_adapted(t.job, t.path, deltas, base_rows, spans, self.device, t.job.cfg.allow_nonfinite):
                self.put(self.to_write, (t.name, chunk, 0, drain(self.noted)))
            self.gpu.release(held_gpu)
            self.put(self.to_write, (None, None, held, []))
            return
        if t.block_rows is None:
            xs, base_tensor = self.staging.use(staged)
            # Computed on the device, brought back to the host (which waits
            # for the merge's kernels), cast to the output dtype there.
            merged = merge_whole(t.job, xs, base_tensor, self.device).to("cpu")
            del xs, base_tensor
            self.staging.done(staged)
            self.gpu.release(held_gpu)
            keep = min(held, merged.nbytes)
            self.budget.release(held - keep)
            self.put(self.to_write, (t.name, merged, keep, drain(self.noted)))
            return

        def rows(start: int, stop: int):
            xs = [m.read_rows(t.name, start, stop) for m in models]
            return xs, (base.read_rows(t.name, start, stop) if base else None)

        for chunk in merge_rows(t.job, rows, t.block_rows, self.device):
            self.put(self.to_write, (t.name, chunk, 0, drain(self.noted)))
        self.gpu.release(held_gpu)  # every block is back on the host
        self.put(self.to_write, (None, None, held, []))  # the writer releases the budget once it has written all blocks

    def where_stopped(self, how: str = "interrupted") -> str:
        shards = len(self.p.plan.shards)
        finished = sum(1 for i in range(shards) if (self.folder / shard_filename(i, shards)).is_file())
        return (
            f"{how} while merging tensor '{self.current}' ({self.merged} of {len(self.todo)} tensors done); "
            f"{finished} of {shards} shards are finished in {self.folder}: rerun with --resume to continue"
        )

    def run(self) -> None:
        reader = threading.Thread(target=self.read, name="ccsmerge-reader", daemon=True)
        writer = threading.Thread(target=self.write, name="ccsmerge-writer", daemon=True)
        reader.start()
        writer.start()
        process = psutil.Process()
        try:
            with collecting(defer_warnings=True) as self.noted:  # what the engine notes per matrix, sent on with the bytes
                self._merge_all(process)
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

    def _merge_all(self, process) -> None:
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
    except KeyboardInterrupt as exc:
        how = str(exc) if isinstance(exc, Terminated) else "interrupted"
        raise MergeInterrupted(pipeline.where_stopped(how)) from None
    finally:
        if pipeline.bar is not None:
            pipeline.bar.close()
