"""Moving a tensor's inputs to the compute device ahead of its merge.

The streaming pipeline's reader stages the next tensor's inputs while the
merge thread works on the current one; the merge thread then uses them and
says when it is done. One interface, two implementations:

- `Staging` (the CPU): nothing moves. Staging faults the memory-mapped
  inputs' pages in, so that reading them from disk happens on the reader.
- `CudaStaging`: the inputs go through a few fixed pinned host buffers
  (a ring: the host copy into one buffer overlaps the device copy out of the
  other) into device tensors, with non-blocking copies on a second CUDA
  stream; an event recorded after the last copy is what the merge's stream
  waits on. The device tensors are marked as used by the merge's stream
  (record_stream), so the caching allocator reuses their memory only once the
  merge's kernels are done, and `done` waits for that stream before the
  caller returns their bytes to the GPU budget. The pinned buffers are
  allocated once per merge: their bytes are part of the host budget
  (planning.staging_bytes). When the budget leaves no room for them, the
  copies on the second stream are made from the memory-mapped inputs
  directly (pageable memory: each copy returns once the driver has taken the
  data, and still overlaps the merge's kernels).

    staging = make_staging(device, pinned_bytes)
    staged = staging.stage(xs, base)      # reader thread
    xs, base = staging.use(staged)        # merge thread, before the merge
    ...                                   # merge
    staging.done(staged)                  # merge thread, after the merge
    staging.close()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .planning import STAGING_CHUNKS

_PAGE = 4096


@dataclass
class Staged:
    """One tensor's inputs (and base), on the compute device or on their way."""

    xs: list[torch.Tensor]
    base: torch.Tensor | None
    ready: object = None  # the event the merge waits on (CUDA), or None
    on_device: bool = False
    nbytes: int = 0  # device bytes of the staged inputs


def fault_in(tensor: torch.Tensor) -> None:
    """Touch one byte per page, so that reading a memory-mapped tensor from
    disk happens here rather than in the merge."""
    if tensor.numel() and tensor.is_contiguous():
        tensor.reshape(-1).view(torch.uint8)[::_PAGE].sum()


class Staging:
    """The CPU: the inputs stay where they are (memory-mapped views)."""

    pinned_bytes = 0

    def stage(self, xs: list[torch.Tensor], base: torch.Tensor | None) -> Staged:
        for x in xs + ([base] if base is not None else []):
            fault_in(x)
        return Staged(xs, base)

    def use(self, staged: Staged) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        return staged.xs, staged.base

    def done(self, staged: Staged) -> None:
        staged.xs, staged.base = [], None

    def close(self) -> None:
        pass


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat uint8 tensor (a view)."""
    return tensor.reshape(-1).view(torch.uint8)


class PinnedRing:
    """Copies host tensors into device tensors through `chunks` host buffers
    of `chunk_bytes` each: the host copy of a chunk into a free buffer, then
    an asynchronous copy from it on `stream`, and an event per buffer so that
    it is refilled only once its copy is done. With pin=False (and no stream)
    it copies synchronously on the CPU, the same way."""

    def __init__(self, chunk_bytes: int, chunks: int = STAGING_CHUNKS, *, pin: bool = True):
        self.chunk_bytes = chunk_bytes
        self.buffers = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(chunks)]
        self.pending: list[object] = [None] * chunks  # event of the last copy out of each buffer
        self.next = 0

    @property
    def nbytes(self) -> int:
        return self.chunk_bytes * len(self.buffers)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream=None) -> None:
        """dst <- src (same shape and dtype; dst contiguous, on the device of `stream`)."""
        source = _as_bytes(src.contiguous())
        target = _as_bytes(dst)
        total = source.numel()
        for offset in range(0, total, self.chunk_bytes):
            size = min(self.chunk_bytes, total - offset)
            i = self.next
            self.next = (i + 1) % len(self.buffers)
            if self.pending[i] is not None:
                self.pending[i].synchronize()
                self.pending[i] = None
            buffer = self.buffers[i][:size]
            buffer.copy_(source[offset : offset + size])
            target[offset : offset + size].copy_(buffer, non_blocking=stream is not None)
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
                self.pending[i] = event

    def wait(self) -> None:
        for i, event in enumerate(self.pending):
            if event is not None:
                event.synchronize()
                self.pending[i] = None


class CudaStaging(Staging):
    """Host-to-device copies of the next tensor's inputs on a second stream,
    through pinned buffers, overlapping the current tensor's merge."""

    def __init__(self, device: torch.device, pinned_bytes: int):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        chunk = pinned_bytes // STAGING_CHUNKS
        self.ring = PinnedRing(chunk, pin=True) if chunk else None

    @property
    def pinned_bytes(self) -> int:
        return self.ring.nbytes if self.ring is not None else 0

    def stage(self, xs: list[torch.Tensor], base: torch.Tensor | None) -> Staged:
        inputs = xs + ([base] if base is not None else [])
        if not xs[0].is_floating_point():
            # Integer and bool buffers are compared and copied on the host.
            return Staged(xs, base)
        moved = []
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for x in inputs:
                # Allocated on the copy stream: its memory is not in use by it.
                target = torch.empty(x.shape, dtype=x.dtype, device=self.device)
                if self.ring is not None:
                    self.ring.copy(target, x, self.stream)
                else:
                    target.copy_(x, non_blocking=True)
                moved.append(target)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        nbytes = sum(t.nbytes for t in moved)
        return Staged(moved[: len(xs)], moved[len(xs)] if base is not None else None, ready, True, nbytes)

    def use(self, staged: Staged) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        if staged.on_device:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(staged.ready)
            for t in staged.xs + ([staged.base] if staged.base is not None else []):
                t.record_stream(stream)
        return staged.xs, staged.base

    def done(self, staged: Staged) -> None:
        if staged.on_device:
            # Whatever the merge queued on these inputs has run before their
            # bytes go back to the budget.
            torch.cuda.current_stream(self.device).synchronize()
        staged.xs, staged.base = [], None

    def close(self) -> None:
        if self.ring is not None:
            self.ring.wait()
            self.ring.buffers = []
        self.stream.synchronize()


def make_staging(device: torch.device, pinned_bytes: int) -> Staging:
    """CudaStaging for a CUDA device (pinned_bytes: its host buffers, 0 for
    none), the no-op Staging otherwise."""
    if device.type == "cuda":
        return CudaStaging(device, pinned_bytes)
    return Staging()
